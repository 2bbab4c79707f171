"""BlurPool against antialiased-cnns (an optional extra: skipped when absent) and its published
formula, and the shift-consistency it buys on a toy model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ccnn_convert import convert
from ccnn_convert.core.blurpool import BlurPool2d, binomial_filter, blur_pool
from ccnn_convert.metrics import crops_at, shift_offsets, top1_agreement

# The binomial rows (Pascal's triangle), written out.
ROWS = {1: [1], 2: [1, 1], 3: [1, 2, 1], 4: [1, 3, 3, 1], 5: [1, 4, 6, 4, 1]}


@pytest.mark.parametrize("size", sorted(ROWS))
def test_filter_is_the_normalized_outer_product_of_the_binomial_row(size):
    row = np.array(ROWS[size], dtype=np.float64)
    expected = np.outer(row, row) / np.outer(row, row).sum()
    np.testing.assert_allclose(binomial_filter(size, torch.float64).numpy(), expected, atol=1e-15)


@pytest.mark.parametrize("size", sorted(ROWS))
@pytest.mark.parametrize("stride", [2, 3])
@pytest.mark.parametrize("height,width", [(16, 16), (13, 10)])
def test_equals_antialiased_cnns(size, stride, height, width):
    antialiased_cnns = pytest.importorskip("antialiased_cnns")
    torch.manual_seed(size * 10 + stride)
    x = torch.randn(2, 4, height, width)
    peer = antialiased_cnns.BlurPool(4, filt_size=size, stride=stride)
    torch.testing.assert_close(peer.filt[0, 0], binomial_filter(size))
    expected = peer(x)
    torch.testing.assert_close(BlurPool2d(4, stride, size)(x), expected)
    torch.testing.assert_close(blur_pool(x, stride, size), expected)


def test_a_constant_map_stays_constant_at_the_borders():
    """Reflect padding repeats the map at its edges: no darkening, as zero padding would give."""
    x = torch.full((1, 2, 9, 9), 2.5)
    for size in (2, 3, 5):
        torch.testing.assert_close(BlurPool2d(2, 2, size)(x), torch.full((1, 2, 5, 5), 2.5))
        torch.testing.assert_close(blur_pool(x, 2, size), torch.full((1, 2, 5, 5), 2.5))


def test_out_size_pads_the_far_edge_by_reflection():
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    out = blur_pool(x, 2, 3, out_size=(4, 3))  # a ceil-mode pool's extra row
    # by hand: reflect-padded rows ... 0 1 2 3 4 5 4 3 ..., blurred [1, 2, 1] / 4 around rows 0, 2, 4, 6
    padded = torch.nn.functional.pad(x, (1, 1, 1, 3), mode="reflect")
    expected = torch.nn.functional.conv2d(padded, binomial_filter(3)[None, None], stride=2)[..., :4, :3]
    torch.testing.assert_close(out, expected)
    assert out.shape[-2:] == (4, 3)


class _Toy(nn.Module):
    """A small classifier with a strided conv and a max pool, the layers blurpool replaces."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))

    def forward(self, x):
        return self.features(x)


def _consistency(model: nn.Module, images: torch.Tensor, size: int) -> tuple[float, int]:
    """The peer's metric: how often two random crops of an image get the same class; and how
    many classes occur. With random weights one class offset shared by all images would decide
    every prediction: it is removed (the mean logit), so the class depends on the image."""
    offsets = shift_offsets(range(len(images)), seed=0, room=images.shape[-1] - size)
    with torch.no_grad():
        first = model(crops_at(images, offsets[:, 0], size))
        second = model(crops_at(images, offsets[:, 1], size))
    center = torch.cat([first, second]).mean(0)
    first, second = first - center, second - center
    return top1_agreement(first, second) / len(images), len(first.argmax(1).unique())


def test_blurpool_is_at_least_as_shift_consistent_as_the_original():
    torch.manual_seed(0)
    model = _Toy().eval()
    images = torch.nn.functional.avg_pool2d(torch.randn(256, 3, 40, 40), 3, 1, 1)  # some spatial correlation
    blurred = convert(model, mode="blurpool", example_input=images[:1, :, :32, :32])
    (original, classes), (blurpool, blurpool_classes) = _consistency(model, images, 32), _consistency(blurred, images, 32)
    assert min(classes, blurpool_classes) >= 5  # not one class for every image
    assert blurpool >= original, (blurpool, original)  # measured: 0.47 against 0.13
