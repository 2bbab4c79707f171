"""Spectral, DiffStride and BlurPool modes: each converted strided layer runs at stride 1 and a
downsampler follows it (work in progress: the fx pass comes in the next commit)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import fx, nn

from ..errors import ConversionError

__all__ = ["convert_downsample"]


def convert_downsample(model: nn.Module, mode: str, keep_first: int = 0, example_input: torch.Tensor | None = None,
                       leaf_modules: Sequence[type | str] = (), smoothness: float | None = None,
                       blur_size: int | None = None) -> fx.GraphModule:
    """:func:`~.rewrite.convert` for spectral, diffstride and blurpool mode (options already checked)."""
    raise ConversionError(f"mode {mode!r} is not implemented yet")
