"""BlurPool (Zhang, 2019, "Making convolutional networks shift-invariant again"): blur, then subsample.

A depthwise convolution with the normalized binomial filter of size ``blur_size`` (the outer
product of the row ``C(n-1, i)``, divided by its sum) and the stride, on the map padded by
reflection as antialiased-cnns' ``BlurPool`` pads it (``(n-1)//2`` before, ``ceil((n-1)/2)``
after, on both axes). :class:`BlurPool2d` is that layer; :func:`blur_pool` is the function the
conversion uses, which can also pad the far edge further to reach a given output size (the size
of a ``ceil_mode`` pool).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import IntPair, pair

__all__ = ["BlurPool2d", "binomial_filter", "blur_pads", "blur_pool"]


def binomial_filter(size: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> Tensor:
    """The ``size x size`` normalized binomial filter: outer product of ``C(size-1, i)``, sum 1."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"binomial_filter: size must be a positive integer, got {size!r}")
    row = torch.tensor([math.comb(size - 1, i) for i in range(size)], dtype=torch.float64)
    square = torch.outer(row, row)
    return (square / square.sum()).to(dtype=dtype, device=device)


def blur_pads(size: int) -> tuple[int, int]:
    """Reflection padding (before, after) of a blur of ``size``, as antialiased-cnns pads."""
    return (size - 1) // 2, size // 2


def blur_pool(x: Tensor, stride: int | IntPair, blur_size: int = 3, out_size: IntPair | None = None) -> Tensor:
    """Blur ``x`` with the binomial filter of ``blur_size`` and subsample by ``stride``.

    ``out_size``: pad the far edges further (by reflection) until the output has that size.
    A map too small to reflect (a pad as large as the map) is padded by replication instead.
    """
    sh, sw = pair(stride)
    before, after = blur_pads(blur_size)
    height, width = x.shape[-2:]
    extra_h = extra_w = 0
    if out_size is not None:
        extra_h = max(0, (out_size[0] - 1) * sh + blur_size - (height + before + after))
        extra_w = max(0, (out_size[1] - 1) * sw + blur_size - (width + before + after))
    pads = (before, after + extra_w, before, after + extra_h)
    if any(pads):
        fits = max(pads[:2]) < width and max(pads[2:]) < height
        x = F.pad(x, pads, mode="reflect" if fits else "replicate")
    channels = x.shape[1]
    weight = binomial_filter(blur_size, x.dtype, x.device).expand(channels, 1, blur_size, blur_size)
    out = F.conv2d(x, weight, stride=(sh, sw), groups=channels)
    if out_size is not None:
        out = out[..., : out_size[0], : out_size[1]]
    return out


class BlurPool2d(nn.Module):
    """antialiased-cnns' ``BlurPool(channels, filt_size=blur_size, stride=stride)`` (reflect padding)."""

    def __init__(self, channels: int, stride: int = 2, blur_size: int = 3):
        super().__init__()
        self.channels, self.stride, self.blur_size = channels, stride, blur_size
        filt = binomial_filter(blur_size)
        self.register_buffer("filt", filt[None, None].repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        before, after = blur_pads(self.blur_size)
        if before or after:
            x = F.pad(x, (before, after, before, after), mode="reflect")
        return F.conv2d(x, self.filt.to(x.dtype), stride=self.stride, groups=x.shape[1])

    def extra_repr(self) -> str:
        return f"channels={self.channels}, stride={self.stride}, blur_size={self.blur_size}"
