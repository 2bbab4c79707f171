"""Reading checkpoint files safely, and loading their tensors into a model that must fit.

Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers only,
never pickled code. When PyTorch refuses a file it suggests re-running with
``weights_only=False``; that advice is unsafe for a file from elsewhere, so our one-line
errors never pass it on.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._helpers import a_type, counted
from ..errors import ModelResolutionError

__all__ = ["CHECKPOINT_SUFFIXES", "extract_state_dict", "load_checked", "safe_load"]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile


def safe_load(path: Path) -> Any:
    """torch.load with weights_only=True (never runs pickled code), errors as one line."""
    path = Path(path)
    if not path.exists():
        raise ModelResolutionError(f"file not found: {path}")
    if not path.is_file():
        raise ModelResolutionError(f"{path} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # a pickle of classes, refused on purpose
            raise ModelResolutionError(
                f"{path} holds pickled Python objects, not just tensors; save model.state_dict() instead"
            ) from None
        raise _unreadable(path) from None
    except Exception:  # corrupt zip, truncated file, not a torch file at all
        raise _unreadable(path) from None


def _unreadable(path: Path) -> ModelResolutionError:
    # PyTorch's own text advises weights_only=False: unsafe, so it is deliberately not quoted.
    return ModelResolutionError(
        f"cannot read {path} as a PyTorch checkpoint (not a zip/pickle file or corrupted)")


def extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a plain state_dict or one wrapped under a usual key."""
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    tensors = ({k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
               if isinstance(obj, dict) else {})
    if not tensors:
        found = f"found keys: {', '.join(map(str, list(obj)[:6]))}" if isinstance(obj, dict) else \
            f"found {type(obj).__name__}"
        raise ModelResolutionError(
            f"{path} holds no state_dict (expected tensors by name, or under 'state_dict'/'model'; {found})")
    return _strip_prefixes(tensors)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (DataParallel's ``module.``) when every key carries it."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def load_checked(model: nn.Module, state: Any, source: str) -> None:
    """Load weights that must fit exactly; otherwise say how they differ, in one line."""
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise ModelResolutionError(f"{source} holds no state_dict (found {type(state).__name__})")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in state if k in expected and _shape(state[k]) != _shape(expected[k])]
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"{counted(len(missing), 'missing key')} ({_first(missing)})")
        if unexpected:
            parts.append(f"{counted(len(unexpected), 'unexpected key')} ({_first(unexpected)})")
        if reshaped:
            shown = [f"{k}: {_described(state[k])} in file, {_shape(expected[k])} in model" for k in reshaped[:3]]
            parts.append(f"{counted(len(reshaped), 'key')} with another shape ({'; '.join(shown)}"
                         f"{', ...' if len(reshaped) > 3 else ''})")
        raise ModelResolutionError(
            f"{source} does not fit {type(model).__name__}: {', '.join(parts)}")
    model.load_state_dict(state, strict=False)  # strict=False only for num_batches_tracked


def _shape(value: Any) -> list[int] | None:
    return list(value.shape) if isinstance(value, torch.Tensor) else None


def _described(value: Any) -> str:
    """A stored value's shape, or what it is when it is not a tensor (a string, a number)."""
    shape = _shape(value)
    return str(shape) if shape is not None else f"{a_type(value)}, not a tensor"


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


# The ``weights`` argument: DEFAULT, none/random, an enum or tag name, or a file.


def _looks_like_file(text: str) -> bool:
    return Path(text).suffix.lower() in CHECKPOINT_SUFFIXES or Path(text).expanduser().is_file()


def _is_weights_path(weights: str | None) -> bool:
    return isinstance(weights, (str, os.PathLike)) and (
        _looks_like_file(str(weights)) or os.sep in str(weights))


def _no_weights(weights: str | None) -> bool:
    return weights is None or str(weights).strip().lower() in ("none", "random")


def _is_default(weights: str | None) -> bool:
    return isinstance(weights, str) and weights.strip().upper() == "DEFAULT"
