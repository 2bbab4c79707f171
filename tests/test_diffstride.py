"""DiffStride: the mask by hand, the layer against a NumPy reimplementation written the published
way, gradients against finite differences (taken to the right at the kinks of integer strides),
the limit R -> 0, and a converted model that learns its strides and reloads them."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from ccnn_convert import ConversionSpec, conversion_report, convert
from ccnn_convert.core.diffstride import DiffStride2d, diffstride_cost, diffstride_layers, diffstride_mask, \
    kept_size
from ccnn_convert.core.spectral import spectral_pool


def published_diffstride(x: np.ndarray, strides: tuple[float, float], smoothness: float) -> np.ndarray:
    """Riad et al.'s layer, written as their code does it, in NumPy: unnormalized rfft2; mask
    positions 0, 1, ... from both ends of the rows (the second half counted back down) and along
    the rfft columns; thresholds H / S_h / 2 and W / S_w / 2 + 1; keep the rows and columns
    whose mask is above 0; irfft2 at its default lengths (the kept rows, 2 (columns - 1))."""
    height, width = x.shape[-2:]
    s_h = min(max(strides[0], 1.0), max(1.0, height / 2))
    s_w = min(max(strides[1], 1.0), max(1.0, width / 2))
    vertical = np.concatenate([np.arange((height + 1) // 2), np.arange(height // 2)[::-1]])
    horizontal = np.arange(width // 2 + 1)
    vertical_mask = np.clip((smoothness + height / s_h / 2 - vertical) / smoothness, 0, 1)
    horizontal_mask = np.clip((smoothness + width / s_w / 2 + 1 - horizontal) / smoothness, 0, 1)
    spectrum = np.fft.rfft2(x) * vertical_mask[:, None] * horizontal_mask[None, :]
    spectrum = spectrum[..., np.flatnonzero(vertical_mask > 0), :][..., np.flatnonzero(horizontal_mask > 0)]
    return np.fft.irfft2(spectrum)


ISSUE_SIZES = [(16, 16), (15, 17), (28, 28), (7, 9)]
ISSUE_STRIDES = [1.5, 2.0, 3.0, (2, 2), (2.3, 1.7)]


@pytest.mark.parametrize("height,width", ISSUE_SIZES)
@pytest.mark.parametrize("stride", ISSUE_STRIDES)
def test_layer_equals_the_published_layer(height, width, stride):
    """Issue 25's maps and strides: float32 against the float64 published reimplementation, to
    1e-5 of its largest value, once scaled by the documented factor H*W / (h*w)."""
    x = np.random.default_rng(height * width).standard_normal((2, 3, height, width))
    strides = (stride, stride) if isinstance(stride, float) else stride
    expected = published_diffstride(x, strides, 4.0)
    got = DiffStride2d(stride, smoothness=4.0)(torch.from_numpy(x).float()).detach().double().numpy()
    assert got.shape == expected.shape
    h, w = got.shape[-2:]
    got = got * height * width / (h * w)
    np.testing.assert_allclose(got, expected, atol=1e-5 * np.abs(expected).max(), rtol=0)


def test_odd_width_with_every_column_kept_comes_out_one_narrower():
    """irfft2's default length 2 (columns - 1): 17 -> 16 and 9 -> 8 when all are kept (stride 1.5,
    R = 4); the symmetric convention keeps 17 and 9."""
    for height, width in ((15, 17), (7, 9)):
        x = torch.randn(1, 1, height, width)
        assert DiffStride2d(1.5)(x).shape[-1] == width - 1
        assert DiffStride2d(1.5, convention="symmetric")(x).shape[-1] == width
    assert kept_size(15, 17, (1.5, 1.5), 4.0) == (15, 16)
    assert kept_size(15, 17, (1.5, 1.5), 4.0, "symmetric") == (15, 17)


def test_symmetric_convention_is_the_real_part_of_the_full_crop():
    """With R -> 0 at stride 2 every kept position has mask 1: the symmetric layer is
    spectral_pool's symmetric crop, the published one its published crop, and they differ."""
    x = torch.randn(1, 2, 16, 16, dtype=torch.float64)
    symmetric = DiffStride2d(2.0, smoothness=1e-9, convention="symmetric").double()(x)
    published = DiffStride2d(2.0, smoothness=1e-9).double()(x)
    torch.testing.assert_close(symmetric, spectral_pool(x, (10, 10), "symmetric"), atol=1e-12, rtol=0)
    torch.testing.assert_close(published, spectral_pool(x, (10, 10), "published"), atol=1e-12, rtol=0)
    assert (symmetric - published).abs().max() > 1e-2


def test_mask_equals_hand_computation():
    # H=10, W=12, S=(2, 3), R=1.5.
    # rows: T = 10/4 = 2.5, positions min(k, 9-k) = 0 1 2 3 4 4 3 2 1 0,
    #   clip((1.5 + 2.5 - pos) / 1.5) = 1 1 1 2/3 0 0 2/3 1 1 1
    # columns: T = 12/6 + 1 = 3, positions 0..6, clip((1.5 + 3 - pos) / 1.5) = 1 1 1 1 1/3 0 0
    rows, columns = diffstride_mask(10, 12, torch.tensor([2.0, 3.0], dtype=torch.float64), 1.5)
    np.testing.assert_allclose(rows, [1, 1, 1, 2 / 3, 0, 0, 2 / 3, 1, 1, 1], atol=1e-12)
    np.testing.assert_allclose(columns, [1, 1, 1, 1, 1 / 3, 0, 0], atol=1e-12)
    # positions with mask > 0: rows 0..3 on both sides (8 rows), rfft columns 0..4 (width 2 * 4)
    assert kept_size(10, 12, (2.0, 3.0), 1.5) == (8, 8)


def test_the_issue_example_28_at_stride_2_keeps_22():
    assert DiffStride2d(2.0, smoothness=4.0)(torch.randn(1, 1, 28, 28)).shape[-2:] == (22, 22)


@pytest.mark.parametrize("fy,fx,factor", [(9, 10, 0.5 * 0.5), (-9, 10, 0.75 * 0.5), (3, 1, 1.0), (-10, 10, 0.5 * 0.5)])
def test_a_single_frequency_comes_out_scaled_by_its_mask(fy, fx, factor):
    """28x28 at stride 2, R = 4: rows T = 7, columns T = 8, 22x22 kept. A wave of row frequency
    fy and column frequency fx > 0 comes out as its samples on the output grid times the mask.
    Rows count from zero on both sides: row +9 is at position 9 (mask (4+7-9)/4 = 1/2), row -9
    at 8 (3/4), row -10 at 9 (1/2); column 10 has mask (4+8-10)/4 = 1/2, column 1 mask 1."""
    size, out = 28, 22
    y, x = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    wave = np.cos(2 * np.pi * (fy * y + fx * x) / size + 0.4)
    got = DiffStride2d(2.0, smoothness=4.0).double()(torch.from_numpy(wave)[None, None])[0, 0].detach().numpy()
    yo, xo = np.meshgrid(np.arange(out), np.arange(out), indexing="ij")
    expected = factor * np.cos(2 * np.pi * (fy * yo + fx * xo) / out + 0.4)
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_gradient_of_the_strides_matches_finite_differences():
    torch.manual_seed(0)
    layer = DiffStride2d((2.3, 1.7), smoothness=4.0).double()
    x = torch.randn(1, 2, 20, 20, dtype=torch.float64)
    weights = torch.randn(1, 2, *layer(x).shape[-2:], dtype=torch.float64)

    def loss(strides):
        return (functional_call(layer, {"strides": strides}, (x,)) * weights).sum()

    strides = layer.strides.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(strides), strides)
    eps = 1e-6
    for axis in (0, 1):
        step = torch.zeros(2, dtype=torch.float64)
        step[axis] = eps
        numeric = (loss(strides.detach() + step) - loss(strides.detach() - step)) / (2 * eps)
        assert abs(grad[axis].item()) > 1e-3, "the mask must carry a gradient"
        assert grad[axis].item() == pytest.approx(numeric.item(), rel=1e-5, abs=1e-8)


def _loss_and_strides(layer: DiffStride2d, height: int, width: int, seed: int = 0):
    torch.manual_seed(seed)
    x = torch.randn(1, 2, height, width, dtype=torch.float64)
    weights = torch.randn(1, 2, *layer(x).shape[-2:], dtype=torch.float64)

    def loss(strides):
        return (functional_call(layer, {"strides": strides}, (x,)) * weights).sum()

    return loss, layer.strides.detach().clone()


def _one_sided_difference(loss, strides, axis: int, side: int, eps: float = 1e-7) -> float:
    """The finite difference of ``loss`` along stride ``axis``, taken to the right (``side`` +1,
    stride growing) or to the left (-1)."""
    step = torch.zeros(2, dtype=torch.float64)
    step[axis] = eps
    here = strides.detach()
    return float((loss(here + step) - loss(here)) / eps if side > 0 else (loss(here) - loss(here - step)) / eps)


@pytest.mark.parametrize("height,width,stride", [(16, 16, (2, 2)), (28, 28, (2, 2)), (12, 18, (3, 3)),
                                                 (20, 24, (2, 3))])
def test_gradient_at_integer_strides_is_the_right_hand_derivative(height, width, stride):
    """At integer strides a mask position sits on the ramp's top: the loss has a kink. The
    gradient is the derivative to the right (stride growing), as the published clip passes it."""
    layer = DiffStride2d(stride, smoothness=4.0).double()
    loss, strides = _loss_and_strides(layer, height, width)
    (grad,) = torch.autograd.grad(loss(strides.requires_grad_(True)), strides)
    for axis in (0, 1):
        right = _one_sided_difference(loss, strides, axis, +1)
        assert abs(right) > 1e-2
        assert grad[axis].item() == pytest.approx(right, rel=1e-5, abs=1e-6)


def test_the_kink_is_there_at_16x16_stride_2():
    """16x16 at strides (2, 2) keeps every frequency on both sides of the kink (the size does not
    change), so both one-sided derivatives exist: they differ, and the gradient is the right one."""
    layer = DiffStride2d((2, 2), smoothness=4.0).double()
    loss, strides = _loss_and_strides(layer, 16, 16)
    (grad,) = torch.autograd.grad(loss(strides.requires_grad_(True)), strides)
    for axis in (0, 1):
        right = _one_sided_difference(loss, strides, axis, +1)
        left = _one_sided_difference(loss, strides, axis, -1)
        assert abs(left - right) > 0.05 * abs(right)
        assert grad[axis].item() == pytest.approx(right, rel=1e-5)


@pytest.mark.parametrize("size,stride", [(28, 2), (27, 3), (16, 4)])
def test_small_smoothness_and_integer_stride_is_fixed_spectral_pooling(size, stride):
    """With R -> 0 every kept position has mask 1. DiffStride then keeps frequencies up to
    T = H/(2S) on the rows (T + 1 per side, ceil(T + 0) if T is not whole) and up to
    W/(2S) + 1 rfft columns: spectral pooling to (2 * rows, 2 * (columns - 1)), which here is
    (H/S + 2, W/S + 2) for even H/S. Both keep constants; the authors' unnormalized FFT pair
    gives these values times H*W / (h*w)."""
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    rows = int(np.ceil(size / (2 * stride) + 1e-9))
    columns = int(np.ceil(size / (2 * stride) + 1 + 1e-9))
    for convention in ("published", "symmetric"):
        got = DiffStride2d(float(stride), smoothness=1e-9, convention=convention).double()(x)
        expected = spectral_pool(x, (2 * rows, 2 * (columns - 1)), convention)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_strides_are_clipped():
    x = torch.randn(1, 1, 12, 12, dtype=torch.float64)
    identity = DiffStride2d(1.0).double()
    torch.testing.assert_close(identity(x), x, atol=1e-12, rtol=0)  # stride 1 keeps every frequency
    below = DiffStride2d(1.0).double()
    below.strides.data.fill_(0.4)
    torch.testing.assert_close(below(x), x, atol=1e-12, rtol=0)
    above = DiffStride2d(6.0, smoothness=0.5).double()
    above.strides.data.fill_(50.0)  # clipped to 12/2 = 6
    torch.testing.assert_close(above(x), DiffStride2d(6.0, smoothness=0.5).double()(x))


def test_eval_mode_reads_the_strides_once():
    layer = DiffStride2d(2.0).eval()
    x = torch.randn(1, 1, 28, 28)
    before = layer(x)
    layer.strides.data.fill_(3.0)
    torch.testing.assert_close(layer(x), before)  # a fixed graph: the strides were read on eval()
    layer.load_state_dict({"strides": torch.tensor([3.0, 3.0])})
    assert layer(x).shape[-2:] == kept_size(28, 28, (3.0, 3.0), 4.0) == (18, 18)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), layer(x))


def test_cost_is_the_product_of_inverse_strides():
    model = nn.Sequential(DiffStride2d(2.0), nn.Identity(), DiffStride2d((2.0, 4.0)))
    cost = diffstride_cost(model)
    assert cost.item() == pytest.approx(1 / 4 + 1 / 4 * 1 / 8)
    cost.backward()
    first = model[0].strides.grad
    # d/dS_h of 1/(S_h S_w) + 1/(S_h S_w S'_h S'_w) at S = 2, 2, S' = 2, 4: -(1/8 + 1/64)
    assert first[0].item() == pytest.approx(-(1 / 8 + 1 / 64))
    assert [name for name, _ in diffstride_layers(model)] == ["0", "2"]


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(x.mean((2, 3)))


def _toy_task(n: int = 64, size: int = 24, seed: int = 0):
    """Stripes: class 0 coarse, class 1 fine (the strides decide what survives)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    period = torch.where(labels == 0, 8.0, 3.0)
    phase = torch.rand(n, generator=g) * 6.28
    positions = torch.arange(size, dtype=torch.float32)
    stripes = torch.cos(2 * torch.pi * positions[None, :] / period[:, None] + phase[:, None])
    images = stripes[:, None, None, :].expand(n, 3, size, size) + 0.3 * torch.randn(n, 3, size, size, generator=g)
    return images, labels


def test_a_trained_conversion_learns_strides_and_reloads_them(caplog):
    torch.manual_seed(0)
    original = _Toy().eval()
    images, labels = _toy_task()
    with caplog.at_level(logging.INFO, logger="ccnn_convert"):
        model = convert(original, mode="diffstride", example_input=images[:1])
    assert any("start at the original strides" in r.getMessage() for r in caplog.records)
    layers = diffstride_layers(model)
    assert [name for name, _ in layers] == ["ccnn_diffstride_step1", "ccnn_diffstride_step2"]
    start = [layer.strides.detach().clone() for _, layer in layers]
    assert all(torch.equal(s, torch.tensor([2.0, 2.0])) for s in start)

    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(images), labels) + 0.1 * diffstride_cost(model)
        loss.backward()
        optimizer.step()
    model.eval()
    learned = [layer.strides.detach().clone() for _, layer in layers]
    assert all((a - b).abs().max() > 1e-3 for a, b in zip(learned, start)), learned

    # As artifacts do: the spec rebuilds the conversion, load_state_dict restores the strides.
    spec = ConversionSpec.from_dict(ConversionSpec(mode="diffstride").to_dict())
    reloaded = spec.apply(original, input_size=24)
    reloaded.load_state_dict(model.state_dict())
    for (_, layer), strides in zip(diffstride_layers(reloaded), learned):
        torch.testing.assert_close(layer.strides.detach(), strides)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images[:4]), model(images[:4]))
    assert conversion_report(reloaded).mode == "diffstride"


def test_the_mode_uses_the_published_layer():
    """diffstride mode on an odd map: its DiffStride layer is the published one (a 15x17 map at
    strides 2, R = 4, keeps every column and comes out 16 wide), after the stride-1 conv."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1)).eval()
    x = torch.randn(1, 2, 15, 17)
    converted = convert(model, mode="diffstride", example_input=x)
    expected = DiffStride2d(2.0)(nn.functional.conv2d(x, model[0].weight, model[0].bias, 1, 1))
    with torch.no_grad():
        got = converted(x)
    assert got.shape[-2:] == (15, 16)
    torch.testing.assert_close(got, expected)
