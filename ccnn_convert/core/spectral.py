"""Fixed spectral pooling: keep the low frequencies of a map, go back at the smaller size.

:func:`spectral_pool` resizes a map to any smaller size ``(h, w)``: the 2-D DFT of the map,
cropped to the ``h x w`` frequencies nearest zero (rows ``0 .. ceil(h/2)-1`` and the last
``floor(h/2)``, the same for columns), then the inverse DFT at ``h x w``, real part. That is the
ideal low-pass filter followed by sampling on the coarser grid: a map made of frequencies below
the new Nyquist limit comes out as its exact samples on the output grid.

It runs on the real FFT (``rfft2``/``irfft2``: half the columns). Two conventions differ in one
row, the Nyquist row of an even output height ``h`` (:data:`CONVENTIONS`):

* ``"published"``: the crop of the published layers (Rippel et al.'s spectral pooling as Riad
  et al.'s DiffStride code writes it): rows ``0 .. h/2-1`` and ``H-h/2 .. H-1`` kept as they are,
  so input row ``-h/2`` becomes the output's Nyquist row, and the rfft columns ``0 .. w//2``
  as they are (``irfft2`` reads the real part of the DC and Nyquist columns);
* ``"symmetric"``: the real part of the full complex crop: the Nyquist row holds the mean of
  rows ``+h/2`` and ``-h/2`` (and, at an even ``w < W``, the corner ``(-h/2, -w/2)`` alone):
  frequencies ``+h/2`` and ``-h/2`` are treated alike.

:func:`spectral_pool` (the spectral mode's resize) takes ``convention`` and defaults to
:data:`MODE_CONVENTION` (published: see its comment for what was measured);
:class:`SpectralPool2d`, the published layer, and :class:`~.diffstride.DiffStride2d` default to
``"published"``. The spectral and diffstride modes take theirs from ``convert(...,
spectral_convention=...)``, default :data:`MODE_CONVENTION`, read when the model is converted:
the converted graph holds it (each ``spectral_downsample`` call, each ``DiffStride2d``).

Scale: the DFT pair is normalized so that a constant map keeps its value (``norm="forward"``).
The published spectral pooling (Rippel et al., 2015) uses the unnormalized pair (forward
unscaled, inverse divided by the output area), which multiplies every value by the area ratio
``H*W / (h*w)``; a network trained with it absorbs the factor, a pretrained one does not.
:class:`SpectralPool2d`, the published layer on its own, keeps the published scale by default.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from .layers import IntPair, pair

__all__ = ["CONVENTIONS", "MODE_CONVENTION", "Convention", "SpectralPool2d", "check_convention", "crop_low",
           "published_size", "spectral_pool"]

Convention = Literal["published", "symmetric"]
CONVENTIONS: tuple[str, ...] = ("published", "symmetric")
# The conversion modes' default convention, spectral and diffstride alike (a conversion records
# its own: ConversionSpec.spectral_convention). Measured (issue 25) on the pretrained
# efficientnet_lite0, 250 sample ImageNet images, untrained conversion, spectral mode: published
# 74.0 % top-1 against symmetric 72.8 % with the resampling after the activation (the default),
# 39.2 against 36.4 at the layer; the digits benchmark ties (0.19 % error both, 3 seeds).
# DiffStride: the same top-1 in both (12.8 %) on lite0, and digits' 16x16 maps crop nothing below
# stride 2.67 at R = 4. ONNX export builds its fixed bases for either (export/spectral_bases.py).
MODE_CONVENTION: Convention = "published"


def check_convention(owner: str, convention: object) -> None:
    """A one-line ValueError naming ``owner`` unless ``convention`` is one of :data:`CONVENTIONS`."""
    if convention not in CONVENTIONS:
        raise ValueError(f"{owner}: convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")


def crop_low(spectrum: Tensor, size: IntPair, out: IntPair, convention: Convention = "symmetric") -> Tensor:
    """The ``rfft2`` ``spectrum`` of a ``size`` map cropped for an ``out`` map: rows
    ``0 .. ceil(h/2)-1`` and ``-floor(h/2) .. -1``, rfft columns ``0 .. w//2``.

    ``"published"`` keeps those rows as they are. ``"symmetric"`` makes it the real part of the
    full complex crop once ``irfft2`` takes it back at ``out``: ``irfft2`` reads the column
    Nyquist as the full crop does; the row Nyquist (an even ``h`` below ``H``) is the mean of
    rows ``+h/2`` and ``-h/2``, except where it meets an even ``w < W``'s Nyquist column: there
    the full crop holds frequency ``(-h/2, -w/2)`` only.
    """
    (height, width), (h, w) = size, out
    cropped = spectrum[..., : w // 2 + 1]
    if h >= height:
        return cropped
    top, bottom = (h + 1) // 2, h // 2
    low = cropped[..., :top, :]
    if bottom == 0:
        return low
    high = cropped[..., height - bottom:, :]
    if h % 2 == 0 and convention == "symmetric":
        positive = cropped[..., bottom:bottom + 1, :]
        nyquist = (high[..., :1, :] + positive) / 2
        if w % 2 == 0 and w < width:
            # conj(X[-h/2, -w/2]) = X[+h/2, +w/2]: its real part is what the full crop keeps
            nyquist = torch.cat([nyquist[..., :-1], positive[..., -1:]], dim=-1)
        high = torch.cat([nyquist, high[..., 1:, :]], dim=-2)
    return torch.cat([low, high], dim=-2)


def spectral_pool(x: Tensor, size: int | IntPair, convention: Convention = MODE_CONVENTION) -> Tensor:
    """Resize ``x`` (``(..., H, W)``) to ``size`` (``h <= H``, ``w <= W``, any parity) by
    keeping its lowest frequencies (the Nyquist row as ``convention`` says: :func:`crop_low`);
    a constant map keeps its value."""
    check_convention("spectral_pool", convention)
    h, w = pair(size)
    height, width = x.shape[-2:]
    if h > height or w > width or h < 1 or w < 1:
        raise ValueError(f"spectral_pool: cannot pool a {height}x{width} map to {h}x{w}")
    if (h, w) == (height, width):
        return x
    spectrum = torch.fft.rfft2(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, norm="forward")
    spectrum = crop_low(spectrum, (height, width), (h, w), convention)
    return torch.fft.irfft2(spectrum, s=(h, w), norm="forward").to(x.dtype)


def published_size(height: int, width: int, stride: float) -> IntPair:
    """The published layer's output size: height ``floor(H/s)`` made even, width ``floor(W/s)``,
    each at least 2."""
    out_h = max(2, int(math.floor(height / stride)) // 2 * 2)
    out_w = max(2, int(math.floor(width / stride)))
    return min(out_h, height), min(out_w, width)


class SpectralPool2d(nn.Module):
    """Spectral pooling by a (real) ``stride >= 1``, as published (Rippel et al., 2015).

    Output ``published_size(H, W, stride)``; the kept rows are the first and last ``out_h/2``
    frequency rows, the kept columns the first ``out_w//2 + 1`` rfft columns. With
    ``published_scale=True`` (the default) values carry the published FFT pair's factor
    ``H*W / (out_h*out_w)``; with False a constant map keeps its value (:func:`spectral_pool`).
    ``convention="published"`` (the default) keeps input row ``-out_h/2`` as the output's Nyquist
    row, as the published code does; ``"symmetric"`` takes the mean of rows ``+out_h/2`` and
    ``-out_h/2`` (:func:`crop_low`).
    """

    def __init__(self, stride: float, published_scale: bool = True, convention: Convention = "published"):
        super().__init__()
        if isinstance(stride, bool) or not isinstance(stride, (int, float)) or not 1 <= stride < math.inf:
            raise ValueError(f"SpectralPool2d: stride must be a number >= 1, got {stride!r}")
        check_convention("SpectralPool2d", convention)
        self.stride, self.published_scale, self.convention = float(stride), published_scale, convention

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        out_h, out_w = published_size(height, width, self.stride)
        pooled = spectral_pool(x, (out_h, out_w), self.convention)
        if self.published_scale:
            pooled = pooled * (height * width / (out_h * out_w))
        return pooled

    def extra_repr(self) -> str:
        return f"stride={self.stride:g}, published_scale={self.published_scale}, convention={self.convention}"
