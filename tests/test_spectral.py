"""Fixed spectral pooling against NumPy references written from the definitions.

The symmetric reference: the full complex DFT (``np.fft.fft2``), cropped to the ``h x w``
frequencies nearest zero (rows ``0 .. ceil(h/2)-1`` and the last ``floor(h/2)``, likewise
columns), the inverse DFT (``np.fft.ifft2``, which divides by ``h*w``), real part. The published
reference, written as the published code does it: ``np.fft.rfft2``, the rows gathered as they
are, the first ``w//2 + 1`` columns, ``np.fft.irfft2``. Both at the published (unnormalized)
scale; the conversion form keeps constants, i.e. the reference times ``h*w / (H*W)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ccnn_convert.core.spectral import SpectralPool2d, spectral_pool


def reference_pool(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """Published scale: np.fft.fft2, keep the low frequencies, np.fft.ifft2, real part."""
    height, width = x.shape[-2:]
    rows = [*range((h + 1) // 2), *range(height - h // 2, height)]
    columns = [*range((w + 1) // 2), *range(width - w // 2, width)]
    spectrum = np.fft.fft2(x)[..., rows, :][..., columns]
    return np.fft.ifft2(spectrum).real


def published_reference(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """The published crop: rfft2, rows 0 .. h/2-1 and H-h/2 .. H-1 as they are (row -h/2 is the
    output's Nyquist row), rfft columns 0 .. w//2, irfft2 at (h, w)."""
    height = x.shape[-2]
    rows = np.r_[0:(h + 1) // 2, height - h // 2:height]
    spectrum = np.fft.rfft2(x)[..., rows, :][..., : w // 2 + 1]
    return np.fft.irfft2(spectrum, s=(h, w))


def reference_conversion_pool(x: np.ndarray, h: int, w: int) -> np.ndarray:
    """The conversion form: the same, scaled so that a constant keeps its value."""
    height, width = x.shape[-2:]
    return reference_pool(x, h, w) * (h * w) / (height * width)


# (H, W, h, w): even and odd, both axes, a crop on one axis only, down to 1
SIZES = [(8, 8, 4, 4), (9, 7, 4, 3), (10, 12, 5, 6), (11, 13, 6, 7), (16, 16, 8, 8), (7, 7, 7, 4),
         (6, 9, 3, 9), (8, 8, 4, 8), (15, 15, 8, 8), (9, 10, 2, 2), (5, 5, 1, 1)]


@pytest.mark.parametrize("height,width,h,w", SIZES)
def test_conversion_form_equals_numpy_reference(height, width, h, w):
    rng = np.random.default_rng(height * 100 + width)
    x = rng.standard_normal((2, 3, height, width))
    got = spectral_pool(torch.from_numpy(x), (h, w), convention="symmetric")
    assert got.shape == (2, 3, h, w)
    np.testing.assert_allclose(got.numpy(), reference_conversion_pool(x, h, w), atol=1e-12)
    published = spectral_pool(torch.from_numpy(x), (h, w), convention="published")
    np.testing.assert_allclose(published.numpy(), published_reference(x, h, w) * h * w / (height * width),
                               atol=1e-12)


def test_float32_maps_pool_in_float32():
    x = torch.randn(1, 2, 13, 10)
    got = spectral_pool(x, (7, 5), convention="symmetric")
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), reference_conversion_pool(x.double().numpy(), 7, 5), atol=1e-5)


# (H, W, stride) -> the published output size, worked out by hand:
# height floor(H/s) made even (>= 2), width floor(W/s) (>= 2)
PUBLISHED = [(28, 28, 2, (14, 14)), (15, 9, 2, (6, 4)), (10, 11, 1.5, (6, 7)), (8, 8, 10, (2, 2)),
             (13, 17, 3, (4, 5)), (12, 12, 1, (12, 12))]


@pytest.mark.parametrize("height,width,stride,size", PUBLISHED)
def test_standalone_layer_follows_the_published_definition(height, width, stride, size):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 2, height, width))
    got = SpectralPool2d(stride)(torch.from_numpy(x))
    assert tuple(got.shape[-2:]) == size
    np.testing.assert_allclose(got.numpy(), published_reference(x, *size), atol=1e-12)
    # the constant-keeping form differs by the area ratio only
    kept = SpectralPool2d(stride, published_scale=False)(torch.from_numpy(x))
    ratio = size[0] * size[1] / (height * width)
    np.testing.assert_allclose(kept.numpy(), published_reference(x, *size) * ratio, atol=1e-12)
    # the symmetric convention is the real part of the full complex crop
    symmetric = SpectralPool2d(stride, convention="symmetric")(torch.from_numpy(x))
    np.testing.assert_allclose(symmetric.numpy(), reference_pool(x, *size), atol=1e-12)


@pytest.mark.parametrize("height,width", [(16, 16), (15, 17), (28, 28), (7, 9)])
@pytest.mark.parametrize("stride", [1.5, 2, 3])
def test_published_layer_to_1e5_on_the_issue_maps(height, width, stride):
    """Issue 25's maps and strides, in float32 against the float64 published reference, to 1e-5
    of the largest output value; the symmetric Nyquist mean is far from it there."""
    x = np.random.default_rng(height * width).standard_normal((2, 3, height, width))
    got = SpectralPool2d(stride)(torch.from_numpy(x).float()).double().numpy()
    expected = published_reference(x, *got.shape[-2:])
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=1e-5 * scale, rtol=0)
    symmetric = SpectralPool2d(stride, convention="symmetric")(torch.from_numpy(x)).numpy()
    assert np.abs(symmetric - expected).max() > 0.05 * scale  # the test can tell the conventions apart


def _cosines(positions_y: np.ndarray, positions_x: np.ndarray, height: int, width: int) -> np.ndarray:
    """A fixed sum of cosines, frequencies (cycles per map) all below 5 on both axes."""
    waves = [(1.0, 0, 0, 0.0), (0.7, 1, 3, 0.3), (-0.4, 4, 1, 1.1), (0.25, 3, -4, -0.6), (0.5, 0, 2, 2.0)]
    y, x = np.meshgrid(positions_y, positions_x, indexing="ij")
    return sum(a * np.cos(2 * np.pi * (fy * y / height + fx * x / width) + phase) for a, fy, fx, phase in waves)


@pytest.mark.parametrize("height,width,h,w", [(32, 32, 16, 16), (30, 24, 20, 12), (33, 27, 11, 13)])
def test_band_limited_map_pools_to_its_samples(height, width, h, w):
    """Frequencies below the output's Nyquist limit: the pooled map is the analytic map sampled
    on the output grid (output pixel i at input position i * H / h; non-integer strides too)."""
    x = _cosines(np.arange(height), np.arange(width), height, width)
    got = spectral_pool(torch.from_numpy(x)[None, None], (h, w))[0, 0].numpy()
    expected = _cosines(np.arange(h) * height / h, np.arange(w) * width / w, height, width)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    if height % 2 == 0 and (height // 2) % 2 == 0 and h == height // 2 and w == width // 2:
        np.testing.assert_allclose(SpectralPool2d(2, published_scale=False)(torch.from_numpy(x)[None, None])[0, 0],
                                   expected, atol=1e-12)


@pytest.mark.parametrize("height,width,h,w", [(8, 8, 4, 4), (9, 7, 5, 2), (14, 11, 7, 6), (5, 5, 1, 1)])
def test_a_constant_map_stays_constant(height, width, h, w):
    x = torch.full((1, 2, height, width), 3.25, dtype=torch.float64)
    torch.testing.assert_close(spectral_pool(x, (h, w)), torch.full((1, 2, h, w), 3.25, dtype=torch.float64))
    # the published FFT pair scales the constant by the area ratio
    published = SpectralPool2d(max(height / h, 1.0))(x)
    out_h, out_w = published.shape[-2:]
    torch.testing.assert_close(published, torch.full_like(published, 3.25 * height * width / (out_h * out_w)))


def test_bad_sizes_are_refused():
    x = torch.zeros(1, 1, 8, 8)
    for size in ((9, 8), (0, 4)):
        with pytest.raises(ValueError, match="cannot pool"):
            spectral_pool(x, size)
    for stride in (0.5, math.inf, "2"):
        with pytest.raises(ValueError, match="stride"):
            SpectralPool2d(stride)
    with pytest.raises(ValueError, match="SpectralPool2d: convention must be one of published, symmetric"):
        SpectralPool2d(2, convention="mean")
    with pytest.raises(ValueError, match="spectral_pool: convention"):
        spectral_pool(x, 4, convention="Published")
