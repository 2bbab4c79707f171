"""A new classifier head for transfer learning, recorded so that an artifact can rebuild it.

:func:`replace_head` swaps a model's classifier (its last ``nn.Linear``) for a fresh one with
``num_classes`` outputs, as ``timm``'s ``reset_classifier`` does, but for any architecture; the
returned :class:`Head` is plain data that :func:`apply_head` replays on a freshly built model
before its trained weights are loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from torch import nn

from ..errors import ModelParameterError, ModelResolutionError

__all__ = ["Head", "apply_head", "find_classifier", "replace_head"]


@dataclass(frozen=True)
class Head:
    """Which module was replaced, and by how many outputs."""

    module: str
    num_classes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "head") -> "Head":
        fields = dict(data) if isinstance(data, Mapping) else {}
        module, classes = fields.get("module"), fields.get("num_classes")
        if (not isinstance(module, str) or not module or isinstance(classes, bool)
                or not isinstance(classes, int) or classes < 1 or set(fields) != {"module", "num_classes"}):
            raise ModelResolutionError(f"{where}: invalid head {data!r}")
        return cls(module, classes)


def find_classifier(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's classifier: its last ``nn.Linear`` in registration order."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ModelParameterError("num_classes", "cannot set {param}: the model has no nn.Linear classifier "
                                                 f"({type(model).__name__})")
    return found[-1]


def replace_head(model: nn.Module, num_classes: int) -> Head:
    """Replace the classifier with a new ``nn.Linear(in_features, num_classes)`` (in place)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelParameterError("num_classes", f"{{param}} must be a positive integer, got {num_classes!r}")
    name, old = find_classifier(model)
    new = nn.Linear(old.in_features, num_classes, bias=old.bias is not None,
                    device=old.weight.device, dtype=old.weight.dtype)
    model.set_submodule(name, new)
    if hasattr(model, "num_classes"):  # timm and some torchvision models keep the count
        model.num_classes = num_classes
    return Head(name, num_classes)


def apply_head(model: nn.Module, head: Head, where: str = "artifact") -> nn.Module:
    """Replay :func:`replace_head` on a freshly built model (before loading trained weights)."""
    try:
        module = model.get_submodule(head.module)
    except AttributeError:
        module = None
    if not isinstance(module, nn.Linear):
        raise ModelResolutionError(f"{where}: the head {head.module!r} is not a Linear layer of "
                                   f"{type(model).__name__}")
    replaced = replace_head(model, head.num_classes)
    if replaced.module != head.module:
        raise ModelResolutionError(f"{where}: the head {head.module!r} is not the model's classifier "
                                   f"({replaced.module!r})")
    return model
