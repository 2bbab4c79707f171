"""What a conversion did: one :class:`LayerRecord` per strided layer, in a :class:`ConversionReport`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from ..errors import ConversionError

if TYPE_CHECKING:
    from .phc import PHCReport

__all__ = ["ConversionReport", "LayerRecord", "conversion_report"]

logger = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    """One strided layer of the model and what the conversion did with it."""

    name: str
    op: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    step: int
    converted: bool
    submaps_in: int
    submaps_out: int
    output_size: tuple[int, ...]
    note: str = ""


@dataclass
class ConversionReport:
    """What :func:`convert` did, for tables and summaries."""

    mode: str
    sampler: str
    keep_first: int
    density: int | None
    layers: list[LayerRecord] = field(default_factory=list)
    steps: int = 0
    final_submaps: int = 1
    averaged_at: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    edges: str = "reference"
    dilation: str | None = None  # dilated mode: "multisample" or "native"
    smoothness: float | None = None  # diffstride mode: the smoothness asked for (None: the default)
    blur_size: int | None = None  # blurpool mode: the filter size asked for (None: the default)
    resample_at: str | None = None  # resampling modes: "layer" or "activation" (where the downsampler went)
    spectral_convention: str | None = None  # spectral, diffstride: the Nyquist row's convention the graph holds
    phc: "PHCReport | None" = None  # the PHC pass before the mode's (.phc), if asked for

    @property
    def converted_layers(self) -> int:
        return sum(record.converted for record in self.layers)

    @property
    def kept_layers(self) -> int:
        return len(self.layers) - self.converted_layers

    def warn(self, message: str) -> None:
        """Log ``message`` as a warning and keep it here (once)."""
        if message not in self.warnings:
            self.warnings.append(message)
            logger.warning(message)

    def warn_if_nothing_converted(self) -> None:
        """After a pass: a ``keep_first`` past the model's steps leaves it as it was."""
        if self.keep_first > self.steps:
            self.warn(f"keep_first={self.keep_first} but the model has {self.steps} subsampling steps: "
                      "nothing is converted")


def conversion_report(model: nn.Module) -> ConversionReport:
    """The :class:`ConversionReport` of a model returned by :func:`convert`."""
    meta = getattr(model, "meta", {})  # any module may be passed: only ours has the report
    if "ccnn_report" not in meta:
        raise ConversionError("this model was not produced by ccnn_convert.convert")
    return meta["ccnn_report"]
