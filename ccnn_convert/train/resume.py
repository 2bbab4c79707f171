"""The training state written after every epoch, and resuming from it exactly.

``OUT/checkpoint.pt`` holds everything the next epoch depends on: the model's state dict, the
optimizer's, the schedule's and the gradient scaler's, the RNG states (the random sampler
redraws from torch's generator, and so does augmentation in the main process), the number of
epochs done and the history so far. Like an artifact it is plain data, read with
``torch.load(weights_only=True)``. It also records the run's identity (model, weights, head,
classes, conversion, recipe): resuming with anything else is refused, since it would not
continue the same run.
"""

from __future__ import annotations

import math
from dataclasses import MISSING
from pathlib import Path
from typing import Any, Mapping

import torch

from ..core.diffstride import check_strides
from ..errors import CCNNError
from ..models.checkpoints import safe_load
from ..outputs import atomic_path, save_torch

__all__ = ["STATE_FORMAT", "check_identity", "check_training_state", "load_training_state", "rng_states",
           "restore_rng_states", "save_training_state"]

STATE_FORMAT = "ccnn-train-state"
STATE_VERSION = 1


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(path: str | Path, state: Mapping[str, Any]) -> None:
    """Write the state atomically (replacing the previous epoch's)."""
    with atomic_path(path, force=True) as tmp, open(tmp, "wb") as handle:
        save_torch({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, handle)  # bytes independent of tmp's name


def load_training_state(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CCNNError(f"resume checkpoint not found: {path}")
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CCNNError(f"{path} is not a ccnn-train checkpoint (resume from OUT/checkpoint.pt)")
    version = state.get("version")
    if version != STATE_VERSION:
        raise CCNNError(f"{path} is a version-{_short(version, 20)} training checkpoint; this ccnn-train "
                        f"reads version {STATE_VERSION}")
    missing = [key for key in _ENTRIES if key not in state]
    if missing:
        raise CCNNError(f"{path} is a damaged training checkpoint (no {missing[0]!r})")
    if not isinstance(state["identity"], dict):
        raise CCNNError(f"{path}: invalid identity in training checkpoint")
    return state


_ENTRIES = ("identity", "model", "optimizer", "scheduler", "scaler", "rng", "epoch", "history")


def check_training_state(state: Mapping[str, Any], path: str | Path, *, model_state: Mapping[str, torch.Tensor],
                         param_group_sizes: list[int], epochs: int, steps_per_epoch: int,
                         record_fields: tuple, fresh_optimizer: Mapping[str, Any] | None = None,
                         fresh_scheduler: Mapping[str, Any] | None = None, param_shapes: list | None = None,
                         lr_factor: Any = None, strides: tuple[str, ...] = ()) -> None:
    """Validate every entry of a loaded training state against the run it should continue,
    before any of it is used; anything odd is one CCNNError line.

    ``model_state`` is the model's own state dict (names, shapes and dtypes to match),
    ``param_group_sizes`` the parameter count of each optimizer group, ``record_fields`` the
    ``dataclasses.fields`` of an epoch record. ``fresh_optimizer`` and ``fresh_scheduler`` are the
    state dicts this run starts with: the saved groups' settings must be theirs, each group's
    learning rate its initial one times ``lr_factor(step)`` (the schedule), and each state
    tensor of the optimizer the shape of its parameter in ``param_shapes`` (by index).
    ``strides`` names the model's learned DiffStride strides: finite numbers >= 1.
    """
    def bad(entry: str, why: str) -> CCNNError:
        return CCNNError(f"cannot resume from {path}: invalid {entry} in training checkpoint ({why})")

    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1 or epoch > epochs:
        raise bad("epoch", f"{_short(epoch, 40)}; the run has epochs 1 to {epochs}")
    if epoch == epochs:
        raise CCNNError(f"cannot resume from {path}: that run is finished ({epochs} of {epochs} epochs); "
                        "its last.pt and best.pt are the results")
    _check_history(state["history"], epoch, record_fields, bad)
    _check_model(state["model"], model_state, bad)
    for key in strides:
        shown = check_strides(state["model"][key].tolist())
        if shown is not None:  # the layer would clamp them in silence, or fail on NaN
            raise bad("model", f"learned strides {key} = {shown}; each must be a finite number >= 1")
    _check_optimizer(state["optimizer"], param_group_sizes, bad)
    step = epoch * steps_per_epoch
    if fresh_optimizer is not None:
        _check_groups(state["optimizer"]["param_groups"], fresh_optimizer["param_groups"],
                      None if lr_factor is None else lr_factor(step), bad)
    if param_shapes is not None:
        _check_optimizer_shapes(state["optimizer"]["state"], param_shapes, bad)
    scheduler = state["scheduler"]
    if not isinstance(scheduler, dict) or scheduler.get("last_epoch") != step:
        raise bad("scheduler", f"expected a schedule at step {step}")
    if fresh_scheduler is not None:
        _check_schedule_settings(scheduler, fresh_scheduler, bad)
    scaler = state["scaler"]
    if not isinstance(scaler, dict) or not all(isinstance(k, str) and isinstance(v, (int, float, bool))
                                               for k, v in scaler.items()):
        raise bad("scaler", "expected a gradient scaler's numbers")
    _check_rng(state["rng"], bad)


def _check_history(history: Any, epoch: int, record_fields: tuple, bad) -> None:
    if not isinstance(history, list) or len(history) != epoch:
        raise bad("history", f"expected a list of {epoch} epoch record(s)")
    names = {f.name for f in record_fields}
    required = {f.name for f in record_fields if f.default is MISSING and f.default_factory is MISSING}
    nullable = {f.name for f in record_fields if "None" in str(f.type)}  # annotated "float | None"
    for number, record in enumerate(history, 1):
        if not isinstance(record, dict) or not required <= set(record) or not set(record) <= names:
            raise bad("history", f"record {number} does not have an epoch record's entries")
        for key, value in record.items():
            integral = key in ("epoch", "skipped", "peak_memory_bytes")
            kinds = (int,) if integral else (int, float)
            if value is None and key in nullable:
                continue
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise bad("history", f"record {number}: {key} is {_short(value, 40)}")
        if record["epoch"] != number:
            raise bad("history", f"record {number} is numbered {_short(record['epoch'], 40)}")


def _check_model(saved: Any, expected: Mapping[str, torch.Tensor], bad) -> None:
    if not isinstance(saved, dict) or not all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise bad("model", "expected a state dict of tensors")
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    if missing or extra:
        raise bad("model", f"missing {missing[0]!r}" if missing else f"unexpected {_short(extra[0], 80)}")
    for key, tensor in expected.items():
        if saved[key].shape != tensor.shape or saved[key].dtype != tensor.dtype:
            raise bad("model", f"{key} is {saved[key].dtype} {tuple(saved[key].shape)}, the model's is "
                               f"{tensor.dtype} {tuple(tensor.shape)}")


def _check_optimizer(saved: Any, group_sizes: list[int], bad) -> None:
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(groups, list):
        raise bad("optimizer", "expected an optimizer's state and parameter groups")
    sizes = [len(g["params"]) if isinstance(g, dict) and isinstance(g.get("params"), list) else None for g in groups]
    if sizes != group_sizes:
        raise bad("optimizer", f"parameter groups of {sizes} parameters, this run's have {group_sizes}")
    for index, value in saved["state"].items():
        if not isinstance(value, dict) or not all(isinstance(v, (torch.Tensor, int, float, type(None))) for v in value.values()):
            raise bad("optimizer", f"the state of parameter {_short(index, 20)} is not tensors and numbers")


def _check_groups(saved: list, fresh: list, factor: float | None, bad) -> None:
    """Every setting of each group as this run would have written it; lr as the schedule sets it."""
    for number, (group, own) in enumerate(zip(saved, fresh), 1):
        for key, value in own.items():
            if key in ("params", "lr"):
                continue
            if key not in group or group[key] != value or type(group[key]) is not type(value):
                raise bad("optimizer", f"group {number}: {key} is {_short(group.get(key), 40)}, this run's is "
                                       f"{_short(value, 40)}")
        if set(group) - set(own):
            raise bad("optimizer", f"group {number}: unexpected {_short(sorted(set(group) - set(own))[0], 40)}")
        if factor is None:
            continue
        lr, expected = group.get("lr"), own["initial_lr"] * factor
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isclose(
                lr, expected, rel_tol=1e-6, abs_tol=1e-12 * own["initial_lr"]):
            raise bad("optimizer", f"group {number}: lr is {_short(lr, 40)}; the schedule is at {expected:.6g}")


def _check_optimizer_shapes(saved: Mapping, shapes: list, bad) -> None:
    """A momentum buffer (or Adam's moments) has its parameter's shape; a step count is a scalar."""
    for index, values in saved.items():
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(shapes):
            raise bad("optimizer", f"state of parameter {_short(index, 20)}, which the run does not have")
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() and tuple(value.shape) != tuple(shapes[index]):
                raise bad("optimizer", f"{name} of parameter {index} is {tuple(value.shape)}, the parameter "
                                       f"is {tuple(shapes[index])}")


_SCHEDULE_PROGRESS = {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial",
                      "_schedulers"}


def _check_schedule_settings(saved: Mapping, fresh: Mapping, bad) -> None:
    """The schedule's settings (base rates, length, milestones, ...) as this run has them."""
    for key, value in fresh.items():
        if key in _SCHEDULE_PROGRESS:
            continue
        if saved.get(key) != value:
            raise bad("scheduler", f"{key} is {_short(saved.get(key), 40)}, this run's is {_short(value, 40)}")
    inner, own = saved.get("_schedulers"), fresh.get("_schedulers")
    if own is not None:
        if not isinstance(inner, list) or len(inner) != len(own) or not all(isinstance(i, dict) for i in inner):
            raise bad("scheduler", "expected this run's chained schedules")
        for part, fresh_part in zip(inner, own):
            _check_schedule_settings(part, fresh_part, bad)


def _check_rng(saved: Any, bad) -> None:
    size = torch.get_rng_state().numel()
    if not isinstance(saved, list) or not saved:
        raise bad("rng", "expected a list of RNG states, one per process")
    for states in saved:
        torch_state = states.get("torch") if isinstance(states, dict) else None
        if not (isinstance(torch_state, torch.Tensor) and torch_state.dtype == torch.uint8
                and torch_state.shape == (size,)):
            raise bad("rng", "expected torch generator states")
        cuda = states.get("cuda", [])
        if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 for t in cuda):
            raise bad("rng", "expected CUDA generator states")


def check_identity(saved: Mapping[str, Any], current: Mapping[str, Any], path: str | Path) -> None:
    """Refuse to resume a run of another model, conversion or recipe (names the first difference)."""
    for key in current:
        before, now = saved.get(key), current[key]
        if before == now:
            continue
        if isinstance(before, dict) and isinstance(now, dict):  # name the entry that differs
            entry = next(k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k))
            key, before, now = f"{key} ({entry})", before.get(entry), now.get(entry)
        raise CCNNError(f"cannot resume from {path}: it was trained with another {key}: "
                        f"{_short(before)} there, {_short(now)} now")


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
