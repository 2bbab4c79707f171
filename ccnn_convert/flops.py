"""FLOP counting with torch.utils.flop_counter (convolutions and matrix products), plus FFTs.

By default the forward runs on meta tensors (:func:`~ccnn_convert.core.tracing.on_meta`), so
counting the FLOPs of even a dilated ResNet-152 computes nothing and takes a moment.

``torch.utils.flop_counter`` has no formula for the FFT ops (spectral pooling and DiffStride
use ``rfft2`` / ``irfft2``), so they would count as free. Here each transform counts the usual
radix-2 estimate, ``5 N log2 N`` for a transform of ``N`` points (Cooley-Tukey's operation count
for complex data, as FFTW's benchmarks count it), once per transformed signal: a real FFT is not
counted as half of a complex one. ``N`` is the product of the transformed sizes (the input's for
``rfft``/``fft``, the output's for ``irfft``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .core.tracing import on_meta as _on_meta

__all__ = ["FFT_FLOPS_NOTE", "count_flops", "fft_flops"]

FFT_FLOPS_NOTE = "FFTs counted as 5 N log2 N per transform of N points (torch.utils.flop_counter has no FFT formula)"

aten = torch.ops.aten


def fft_flops(signal_sizes: Sequence[int], signals: int) -> int:
    """``signals`` transforms of ``prod(signal_sizes)`` points each: ``signals * 5 N log2 N``."""
    points = math.prod(int(s) for s in signal_sizes)
    if points <= 1:
        return 0
    return round(signals * 5 * points * math.log2(points))


def _transform_flops(shape: Sequence[int], dims: Sequence[int], signal_sizes: Sequence[int]) -> int:
    transformed = {d % len(shape) for d in dims}
    signals = math.prod(int(s) for i, s in enumerate(shape) if i not in transformed)
    return fft_flops(signal_sizes, signals)


def _r2c_flops(input_shape, dim, normalization, onesided, *, out_shape=None, **kwargs) -> int:
    return _transform_flops(input_shape, dim, [input_shape[d] for d in dim])


def _c2c_flops(input_shape, dim, normalization, forward, *, out_shape=None, **kwargs) -> int:
    return _transform_flops(input_shape, dim, [input_shape[d] for d in dim])


def _c2r_flops(input_shape, dim, normalization, last_dim_size, *, out_shape=None, **kwargs) -> int:
    return _transform_flops(out_shape, dim, [out_shape[d] for d in dim])


FFT_FORMULAS = {aten._fft_r2c: _r2c_flops, aten._fft_c2c: _c2c_flops,
                aten._fft_c2r: _c2r_flops}


def count_flops(model: nn.Module, example_input: torch.Tensor, on_meta: bool = True) -> int:
    """FLOPs of one eval-mode forward of ``model`` on ``example_input`` (a multiply-add counts 2;
    an FFT of N points counts ``5 N log2 N``)."""
    was_training = model.training
    model.eval()
    try:
        if on_meta:
            return _count_on_meta(model, example_input)
        return _count(model, example_input)
    finally:
        model.train(was_training)


def _count(model: nn.Module, example_input: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=FFT_FORMULAS) as counter:
        model(example_input)
    return int(counter.get_total_flops())


def _count_on_meta(model: nn.Module, example_input: torch.Tensor) -> int:
    try:
        with _on_meta(model):
            return _count(model, example_input.to("meta"))
    except Exception:  # code that needs real values (data-dependent branches): count for real
        return _count(model, example_input)
