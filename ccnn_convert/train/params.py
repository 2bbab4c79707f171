"""Which parameters train: ``all``, the normalisation layers (``norm``), the classifier
(``head``), both (``norm+head``), or both and the PHC layers' own parameters (``phc+norm+head``:
A, F and their biases, where a PHC fit moved the weights; the convolutions kept dense stay frozen).

With a few hundred images, training only the normalisation affines and the head is the robust
choice (few parameters, and the converted model's statistics are what conversion moves most).
Frozen parameters get ``requires_grad=False``, so the optimizer never holds them (and weight
decay never touches them). Normalisation layers that do not train also keep their running
statistics: :func:`hold_frozen_statistics` puts them in eval mode during training, so that
``head`` changes the classifier and nothing else. ``freeze_norm_stats`` does the same for
every normalisation layer, trained or not: their affines train against the running statistics
(as torchvision's FrozenBatchNorm2d fine-tunes detectors), which a few hundred images would
otherwise re-estimate badly (docs/results.md#distillation).
"""

from __future__ import annotations

from torch import nn

from ..core.phc import phc_parameter_names
from ..errors import ParameterError
from ..models.head import find_classifier

__all__ = ["NORM_TYPES", "TRAIN_PARAMS", "check_freeze_norm_stats", "check_train_params", "hold_frozen_statistics", "norm_modules",
           "select_trainable"]

TRAIN_PARAMS = ("all", "norm", "head", "norm+head", "phc+norm+head")
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def check_train_params(value: str) -> str:
    value = str(value).lower()
    if value not in TRAIN_PARAMS:
        raise ParameterError("train_params", f"unknown {{param}} {value!r}; choose {', '.join(TRAIN_PARAMS)}")
    return value


def norm_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, NORM_TYPES)]


def select_trainable(model: nn.Module, which: str) -> int:
    """Freeze every parameter outside ``which``; -> the number of parameter elements that train."""
    which = check_train_params(which)
    if which == "all":
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    chosen: dict[int, nn.Parameter] = {}
    if "norm" in which:
        chosen.update((id(p), p) for m in norm_modules(model) for p in m.parameters())
    if "head" in which:
        chosen.update((id(p), p) for p in _classifier(model).parameters())
    if "phc" in which:
        phc = phc_parameter_names(model)
        if not phc:
            raise ParameterError("train_params", f"{{param}} {which}: the model has no PHC layer to train")
        chosen.update((id(p), p) for name, p in model.named_parameters() if name in phc)
    if not chosen:
        raise ParameterError("train_params", f"{{param}} {which}: the model has no normalisation layer with "
                                             "parameters")
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen)
    return sum(p.numel() for p in chosen.values())


def check_freeze_norm_stats(model: nn.Module, freeze_norm_stats: bool) -> None:
    """Refuse freezing statistics that do not exist (as ``train_params`` norm is refused there)."""
    if freeze_norm_stats and not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in norm_modules(model)):
        raise ParameterError("freeze_norm_stats", f"{{param}}: the model has no normalisation layer with running "
                                                  "statistics to keep: turn it off")


def hold_frozen_statistics(model: nn.Module, which: str, freeze_norm_stats: bool = False) -> None:
    """Normalisation layers that do not train, or all of them with ``freeze_norm_stats``, use
    (and keep) their running statistics (call after .train())."""
    if (which == "all" or "norm" in which) and not freeze_norm_stats:
        return
    for module in norm_modules(model):
        module.eval()


def _classifier(model: nn.Module) -> nn.Module:
    try:
        return find_classifier(model)[1]
    except ParameterError:
        raise ParameterError("train_params", f"{{param}} head: the model has no nn.Linear classifier "
                                             f"({type(model).__name__})") from None
