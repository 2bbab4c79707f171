"""The record every MODEL form resolves to: a model with what is needed to use and rebuild it."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..spec import ConversionSpec
from .head import Head
from .preprocessing import Preprocessing, imagenet_preprocessing

__all__ = ["ResolvedModel", "count_classes"]


@dataclass
class ResolvedModel:
    """An original (unconverted) model in eval mode, with everything needed to use and rebuild it.

    ``spec`` says how to rebuild the architecture (see :func:`ccnn_convert.models.build_from_spec`);
    ``conversion`` is set when the model came from an artifact, which stores how to convert it.
    ``head`` records a classifier replaced for transfer learning, ``class_names`` the class
    folder names of a model trained on its own classes (index order), and ``training`` what
    ``ccnn-train`` reports about the run that produced the weights (all plain data).
    """

    model: nn.Module
    name: str
    preprocessing: Preprocessing
    spec: dict
    weights: str
    conversion: ConversionSpec | None = None
    num_classes: int = 1000
    head: Head | None = None
    class_names: tuple[str, ...] | None = None
    training: dict | None = None

    @classmethod
    def from_module(cls, module: nn.Module, name: str | None = None,
                    preprocessing: Preprocessing | None = None) -> "ResolvedModel":
        """Wrap an in-memory module (ImageNet preprocessing unless given). Its architecture
        cannot be rebuilt from a file, so it cannot be saved as an artifact."""
        shown = name or type(module).__name__
        spec = {"source": "module", "class": f"{type(module).__module__}.{type(module).__qualname__}"}
        return cls(module.eval(), shown, preprocessing or imagenet_preprocessing(), spec,
                   "(in memory)", None, count_classes(module))


def count_classes(model: nn.Module) -> int:
    """Best guess for a model we did not build: the width of its last Linear (or conv) layer."""
    last = None
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = module
    if isinstance(last, nn.Linear):
        return last.out_features
    if isinstance(last, nn.Conv2d):
        return last.out_channels
    return 1000
