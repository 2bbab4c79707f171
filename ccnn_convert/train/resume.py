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

from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CCNNError
from ..models.checkpoints import safe_load
from ..outputs import atomic_path

__all__ = ["STATE_FORMAT", "check_identity", "load_training_state", "rng_states", "restore_rng_states",
           "save_training_state"]

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
    with atomic_path(path, force=True) as tmp:
        torch.save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, tmp)


def load_training_state(path: str | Path) -> dict[str, Any]:
    path = Path(path).expanduser()
    if not path.is_file():
        raise CCNNError(f"resume checkpoint not found: {path}")
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CCNNError(f"{path} is not a ccnn-train checkpoint (resume from OUT/checkpoint.pt)")
    if state.get("version") != STATE_VERSION:
        raise CCNNError(f"{path} is a version-{state.get('version')} training checkpoint; this ccnn-train "
                        f"reads version {STATE_VERSION}")
    return state


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
