"""ONNX export of issue 17's modes: spectral (matrix products with fixed DFT bases), diffstride
with fixed strides (matrix products with bases measured from the layer itself) and blurpool
(plain convolutions), each with a dynamic batch and equal to eager PyTorch in ONNX Runtime to 1e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from ccnn_convert import convert
from ccnn_convert.core import spectral as spectral_module
from ccnn_convert.core.diffstride import DiffStride2d, diffstride_layers
from ccnn_convert.core.spectral import CONVENTIONS, spectral_pool
from ccnn_convert.errors import ExportError
from ccnn_convert.export import VerifyOptions, export
from ccnn_convert.export.diffstride_bases import MatrixDiffStride, separable_terms, with_matrix_diffstride
from ccnn_convert.export.spectral_bases import MatrixSpectralPool, matrix_form, with_matrix_spectral_pooling

ort = pytest.importorskip("onnxruntime")


def numpy_spectral_pool(x: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """The symmetric definition: 2-D DFT, keep the out[0] x out[1] frequencies nearest zero (rows
    0..ceil(h/2)-1 and the last floor(h/2), the same for columns), inverse DFT at that size,
    real part; scaled so that a constant stays the same constant."""
    (height, width), (h, w) = x.shape[-2:], out
    spectrum = np.fft.fft2(x) / (height * width)
    rows = [*range((h + 1) // 2), *range(height - h // 2, height)]
    columns = [*range((w + 1) // 2), *range(width - w // 2, width)]
    cropped = spectrum[..., rows, :][..., :, columns]
    return np.real(np.fft.ifft2(cropped) * (h * w))


def numpy_published_pool(x: np.ndarray, out: tuple[int, int]) -> np.ndarray:
    """The published definition: rfft2, rows 0..ceil(h/2)-1 and the last floor(h/2) as they are
    (input row -h/2 is the Nyquist row), rfft columns 0..w//2, irfft2 at (h, w); scaled so that
    a constant stays the same constant."""
    (height, width), (h, w) = x.shape[-2:], out
    rows = [*range((h + 1) // 2), *range(height - h // 2, height)]
    spectrum = np.fft.rfft2(x)[..., rows, :][..., : w // 2 + 1]
    return np.fft.irfft2(spectrum, s=(h, w)) * (h * w) / (height * width)


DEFINITIONS = {"symmetric": numpy_spectral_pool, "published": numpy_published_pool}


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("size,out", [((16, 16), (8, 8)), ((15, 15), (7, 7)), ((28, 28), (14, 14)), ((7, 7), (4, 4)),
                                      ((9, 9), (4, 4)), ((8, 8), (4, 4)), ((9, 7), (5, 3)), ((12, 10), (6, 5)),
                                      ((15, 16), (7, 8)), ((6, 6), (6, 3)), ((16, 12), (8, 12))])
def test_matrix_spectral_pooling_equals_spectral_pool_and_the_fft_definition(size, out, convention):
    x = np.random.default_rng(0).standard_normal((2, 3, *size))
    pooled = matrix_form(size, out, convention, torch.float64)(torch.from_numpy(x))
    expected = spectral_pool(torch.from_numpy(x), out, convention)
    assert pooled.shape == expected.shape == (2, 3, *out)
    torch.testing.assert_close(pooled, expected, atol=1e-12, rtol=0)
    np.testing.assert_allclose(pooled.numpy(), DEFINITIONS[convention](x, out), atol=1e-12)
    constant = matrix_form(size, out, convention, torch.float64)(torch.full((1, 1, *size), 3.0, dtype=torch.float64))
    np.testing.assert_allclose(constant.numpy(), 3.0, atol=1e-12)
    float32 = matrix_form(size, out, convention)(torch.from_numpy(x).float())
    torch.testing.assert_close(float32, expected.float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("size,out", [((16, 16), (8, 8)), ((28, 28), (14, 14)), ((7, 7), (4, 4)), ((9, 9), (4, 4))])
def test_the_conventions_bases_differ_where_the_nyquist_row_does(size, out):
    """An even output size has a Nyquist row: each convention gets its own bases (the test above
    could not tell them apart otherwise)."""
    x = torch.randn(2, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    published = matrix_form(size, out, "published", torch.float64)(x)
    symmetric = matrix_form(size, out, "symmetric", torch.float64)(x)
    assert (published - symmetric).abs().max() > 1e-3


def test_matrix_form_refuses_bases_that_are_not_spectral_pool(monkeypatch):
    """The check against spectral_pool itself is what stands between a wrong basis and the file."""
    from ccnn_convert.export import spectral_bases

    def wrong(layer, size):  # the other convention's bases
        return separable_terms(spectral_bases.SpectralPoolMap(layer.out, "symmetric"), size)

    monkeypatch.setattr(spectral_bases, "separable_terms", wrong)
    with pytest.raises(ExportError, match=r"\(published\) differs from spectral_pool"):
        spectral_bases.matrix_form((16, 16), (8, 8), "published")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).eval()


def _ort_matches_eager(path, model: nn.Module, size: int, batch: int = 5) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float(np.abs(got - expected).max() / np.abs(expected).max())


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("size", [32, 29])  # even maps (16, 8, 4: a Nyquist row each), and odd ones (15, 7, 4)
def test_spectral_exports_as_matrix_products_and_matches_eager(tmp_path, convention, size):
    model = _net()
    converted = convert(model, mode="spectral", spectral_convention=convention,
                        example_input=torch.zeros(1, 3, size, size)).eval()
    swapped, replaced = with_matrix_spectral_pooling(converted, (size, size))
    assert replaced == 3  # two strided convs and the max pool
    pools = [m for m in swapped.modules() if isinstance(m, MatrixSpectralPool)]
    assert len(pools) == 3 and {m.convention for m in pools} == {convention}
    result = export(converted, tmp_path / "spectral.onnx", mode="original", input_size=size, verify=VerifyOptions())
    assert result.verification.passed
    assert "DFT" not in result.info.op_counts and result.info.op_counts.get("MatMul", 0) >= 3
    assert _ort_matches_eager(result.path, converted, size) <= 1e-4  # batch 5: not one of the verified batches


def test_export_builds_the_bases_of_the_convention_the_model_was_converted_in(tmp_path, monkeypatch):
    """The convention travels in the converted graph: changing the default afterwards changes
    neither the model nor the bases its export builds; it changes the next conversion only."""
    model = _net()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    converted = convert(model, mode="spectral", example_input=torch.zeros(1, 3, 32, 32)).eval()  # the default
    with torch.no_grad():
        before = converted(x)
        other = convert(model, mode="spectral", spectral_convention="symmetric").eval()(x)
    assert (before - other).abs().max() > 1e-4  # the conventions differ on this model
    monkeypatch.setattr(spectral_module, "MODE_CONVENTION", "symmetric")
    with torch.no_grad():
        assert torch.equal(converted(x), before)
        torch.testing.assert_close(convert(model, mode="spectral").eval()(x), other, atol=0, rtol=0)
    swapped, _ = with_matrix_spectral_pooling(converted, (32, 32))
    assert {m.convention for m in swapped.modules() if isinstance(m, MatrixSpectralPool)} == {"published"}
    with torch.no_grad():
        torch.testing.assert_close(swapped(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size,strides", [((8, 8), (2.0, 2.0)), ((9, 7), (2.6, 1.7)), ((15, 16), (3.2, 2.0)),
                                          ((31, 30), (1.3, 4.1)), ((12, 10), (1.0, 5.0))])
def test_matrix_diffstride_equals_the_layer_itself(size, strides):
    """Whatever the layer's convention: the bases are measured from its forward, so the matrix
    form must equal the layer (float64, rounding only) on inputs it was not built from."""
    layer = DiffStride2d(strides).eval()
    x = torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = layer.double()(x)
    got = sum(a @ x @ b.T for a, b in separable_terms(layer, size))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)
    module = MatrixDiffStride(layer.float(), [size])
    with torch.no_grad():
        torch.testing.assert_close(module(x.float()), expected.float(), atol=1e-5, rtol=0)


class _SquaringDiffStride(DiffStride2d):
    def forward(self, x):
        return super().forward(x) ** 2  # not linear: no matrix form exists


def test_matrix_diffstride_refuses_a_layer_that_is_not_linear():
    with pytest.raises(ExportError, match="not a sum of separable matrix products"):
        separable_terms(_SquaringDiffStride(2.0).eval(), (12, 12))


def test_diffstride_with_learned_strides_exports_as_matrix_products(tmp_path):
    model = _net()
    converted = convert(model, mode="diffstride", example_input=torch.zeros(1, 3, 29, 29))
    with torch.no_grad():
        for value, (_, layer) in zip(((2.6, 1.7), (3.2, 1.0), (1.4, 2.9)), diffstride_layers(converted)):
            layer.strides.copy_(torch.tensor(value))  # as if trained: not the original strides
    converted.eval()
    swapped, replaced = with_matrix_diffstride(converted, (29, 29))
    assert replaced == len(diffstride_layers(converted)) == 3 and not diffstride_layers(swapped)
    result = export(converted, tmp_path / "diffstride.onnx", mode="original", input_size=29, verify=VerifyOptions())
    assert result.verification.passed
    assert "DFT" not in result.info.op_counts and result.info.op_counts.get("MatMul", 0) >= 6
    assert _ort_matches_eager(result.path, converted, 29) <= 1e-4  # batch 5, odd size: not verified batches


def test_blurpool_exports_as_convolutions(tmp_path):
    result = export(_net(), tmp_path / "blurpool.onnx", mode="blurpool", input_size=30, verify=VerifyOptions())
    assert result.verification.passed
    assert "DFT" not in result.info.op_counts and result.info.op_counts["Conv"] == 5  # 2 convs + 3 blurs
