"""The record every MODEL form resolves to: a model with what is needed to use and rebuild it."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from ..core.diffstride import check_strides, diffstride_layers
from ..core.downsample import UNTRAINED_STRIDES_NOTE
from ..core.phc import phc_parameter_names
from ..errors import ModelResolutionError

from ..spec import ConversionSpec
from .head import Head
from .preprocessing import Preprocessing, imagenet_preprocessing

__all__ = ["ResolvedModel", "conversion_state", "count_classes", "learned_state_applies", "phc_state"]

logger = logging.getLogger(__name__)


@dataclass
class ResolvedModel:
    """An original (unconverted) model in eval mode, with everything needed to use and rebuild it.

    ``spec`` says how to rebuild the architecture (see :func:`ccnn_convert.models.build_from_spec`);
    ``conversion`` is set when the model came from an artifact, which stores how to convert it.
    ``head`` records a classifier replaced for transfer learning, ``class_names`` the class
    folder names of a model trained on its own classes (index order), and ``training`` what
    ``ccnn-train`` reports about the run that produced the weights (all plain data).
    ``conversion_state`` holds what training learned in the conversion itself, beyond the
    original's weights (DiffStride's strides): the tensors of the converted model's state_dict
    that the original lacks (:func:`conversion_state`); :meth:`converted` puts them back.
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
    conversion_state: dict[str, torch.Tensor] | None = None

    def converted(self, spec: ConversionSpec, input_size: int | Sequence[int] = 224) -> nn.Module:
        """``spec`` applied to the model (eval mode), with the learned ``conversion_state`` loaded
        when ``spec`` is the conversion that learned it (same mode, keep_first and phc); learned
        PHC layers (A, F) also in another mode with the same phc."""
        learned = bool(self.conversion_state) and learned_state_applies(self.conversion, spec)
        # PHC layers of a model built from scratch start as the published ones, not fitted to random weights
        init = {"phc_init": "xavier" if self.weights == "none" else "fit"} if spec.phc is not None else {}
        with _untrained_note_hidden(learned):  # the learned strides replace the initial ones below
            model = spec.apply(self.model, input_size, **init)
        if not self.conversion_state:
            return model
        base = self.conversion
        if not learned:
            if base is not None and spec.phc is not None and spec.phc == base.phc:
                # A PHC layer's A and F are its weights in every mode (same names): they carry over
                if state := phc_state(model, self.conversion_state):
                    _load_conversion_state(model, state, self.name)
            if base is not None and spec.mode == base.mode:
                logger.warning(f"{self.name}: its learned {spec.mode} parameters belong to keep_first="
                               f"{base.keep_first}, phc={base.phc}, not keep_first={spec.keep_first}, "
                               f"phc={spec.phc}; using the untrained ones")
            return model
        _load_conversion_state(model, self.conversion_state, self.name)
        return model

    @classmethod
    def from_module(cls, module: nn.Module, name: str | None = None,
                    preprocessing: Preprocessing | None = None) -> "ResolvedModel":
        """Wrap an in-memory module (ImageNet preprocessing unless given). Its architecture
        cannot be rebuilt from a file, so it cannot be saved as an artifact."""
        shown = name or type(module).__name__
        spec = {"source": "module", "class": f"{type(module).__module__}.{type(module).__qualname__}"}
        return cls(module.eval(), shown, preprocessing or imagenet_preprocessing(), spec,
                   "(in memory)", None, count_classes(module))


def learned_state_applies(base: ConversionSpec | None, spec: ConversionSpec) -> bool:
    """Whether parameters learned in conversion ``base`` belong in conversion ``spec``."""
    return base is not None and (base.mode, base.keep_first, base.phc) == (spec.mode, spec.keep_first, spec.phc)


def phc_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries of ``state`` that are PHC layers' own parameters in ``model`` (A, F and bias)."""
    own = phc_parameter_names(model)  # also those of convs traced through (EfficientNet-Lite's)
    return {key: value for key, value in state.items() if key in own}


def conversion_state(converted: nn.Module, original: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``converted`` that ``original`` does not share (learned strides), by
    their names in ``converted``'s state_dict; buffers a conversion adds are rebuilt, not stored."""
    shared = {id(p) for p in original.parameters()}
    return {k: p.detach().cpu().clone() for k, p in converted.named_parameters() if id(p) not in shared}


@contextlib.contextmanager
def _untrained_note_hidden(hide: bool):
    """Leave out the engine's "strides start at the original ones" line while it is not true."""
    engine = logging.getLogger("ccnn_convert.core.downsample")
    drop = _DropMarked()
    if hide:
        engine.addFilter(drop)
    try:
        yield
    finally:
        engine.removeFilter(drop)


class _DropMarked(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, UNTRAINED_STRIDES_NOTE, False)


def _load_conversion_state(model: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    own = model.state_dict()
    for key, value in state.items():
        if key not in own or own[key].shape != value.shape:
            raise ModelResolutionError(f"{name}: the stored conversion parameter {key!r} does not fit "
                                       "the converted model")
    strides = {f"{layer}.strides" for layer, _ in diffstride_layers(model)}
    for key in sorted(strides & set(state)):
        bad = check_strides(state[key].tolist())
        if bad is not None:  # the layer would clamp it in silence, or fail on NaN
            raise ModelResolutionError(f"{name}: invalid learned strides {key} = {bad} (each must be a finite "
                                       "number >= 1)")
    model.load_state_dict(dict(state), strict=False)
    logger.info(f"{name}: learned conversion parameters loaded ({_shown(state)})")


def _shown(state: Mapping[str, torch.Tensor], most: int = 4) -> str:
    """Small tensors (learned strides) by their values; large ones (PHC layers' A and F), whose
    values would flood the log, by their count and shape."""
    small = [f"{k}={[round(v, 4) for v in t.flatten().tolist()]}" for k, t in state.items() if t.numel() <= most]
    large = [t for t in state.values() if t.numel() > most]
    if large:
        small.append(f"{len(large)} larger tensors, {sum(t.numel() for t in large):,} values")
    return ", ".join(small)


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
