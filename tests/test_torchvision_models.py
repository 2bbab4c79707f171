"""Every torchvision classification model converts and runs in checkered and dilated mode; the
smallest model of each family also in spectral, blurpool and diffstride mode.

Each converted model must keep the original's output shape, give finite outputs, and change
exactly the layers its report says it changed; spectral and blurpool keep every strided
layer's output size. Very large models (over 100 M parameters) and the largest variants of
families covered by smaller members are left to benchmarks/model_coverage.py, which writes
docs/models.md; the reason is printed.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torchvision

from ccnn_convert import conversion_report, convert
from ccnn_convert.errors import ConversionError

MAX_PARAMS = 100_000_000
# Larger variants of families the zoo already covers with smaller members: each took 10-45 s
# here (the suite's 20 minutes); benchmarks/model_coverage.py still converts them for docs/models.md.
LARGE_VARIANTS = ("efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
                  "efficientnet_v2_m", "resnet152", "wide_resnet50_2", "resnext101_32x8d", "resnext101_64x4d",
                  "regnet_x_16gf", "regnet_y_16gf", "convnext_small", "convnext_base", "swin_b", "swin_v2_s",
                  "swin_v2_b")
# The smallest input each family runs at (fixed-size transformers need their training size).
INPUT_SIZE = {"inception_v3": 75, "alexnet": 64, "googlenet": 64, "vit": 224, "maxvit": 224, "swin": 64}
HEAVY_DILATED = ("maxvit",)  # dilated at 224 px is minutes on 2 CPU cores; covered by benchmarks
# Native dilation needs a spatial layout a dilation can express: a fixed 6x6 adaptive pool
# (alexnet) or tokens folded from the map (transformers) are refused with a one-line error.
NATIVE_REFUSED = ("alexnet", "vit", "swin")
# Fixed-size transformers run only at their training size; every other model is compared at an
# odd size, where exact edges matter (samples of the multisample network fall outside the image).
FIXED_SIZE = ("vit", "maxvit", "swin")
# DiffStride's output size follows its strides and ramp (larger than the original's): a model
# whose code is fixed to the original sizes (ViT's token count, MaxViT's 7x7 windows) cannot take it.
DIFFSTRIDE_REFUSED = ("vit", "maxvit")


def _num_params(name: str) -> int:
    return torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"]


def _size(name: str) -> int:
    return next((size for prefix, size in INPUT_SIZE.items() if name.startswith(prefix)), 32)


def _models():
    for name in torchvision.models.list_models(module=torchvision.models):
        marks = []
        if _num_params(name) > MAX_PARAMS:
            marks.append(pytest.mark.skip(reason=f"{name}: over {MAX_PARAMS // 10**6} M parameters; "
                                                 "see benchmarks/model_coverage.py and docs/models.md"))
        elif name in LARGE_VARIANTS:
            marks.append(pytest.mark.skip(reason=f"{name}: a large variant of a family covered by smaller ones; "
                                                 "see benchmarks/model_coverage.py and docs/models.md"))
        yield pytest.param(name, marks=marks)


@pytest.mark.parametrize("name", list(_models()))
def test_torchvision_model_converts_and_runs(name):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    x = torch.randn(1, 3, _size(name), _size(name))
    with torch.no_grad():
        expected_shape = model(x).shape
    modes = ["checkered"] + ([] if name.startswith(HEAVY_DILATED) else ["dilated"])
    sizes = None
    for mode in modes:
        # dilation="multisample": this test counts submaps; native dilation has one map per image
        options = {"dilation": "multisample"} if mode == "dilated" else {}
        converted = convert(model, mode=mode, example_input=x, **options)
        report = conversion_report(converted)
        assert report.converted_layers >= 1, f"{name} {mode}: nothing converted"
        strides = {r.step: r.stride[0] for r in report.layers if r.converted}
        expected = 1
        for stride in strides.values():
            expected *= stride if mode == "checkered" else stride * stride
        assert report.final_submaps == expected, (name, mode, strides)
        with torch.no_grad():
            out = converted(torch.randn(2, *x.shape[1:]))
        assert out.shape == (2, *expected_shape[1:]), (name, mode)
        assert torch.isfinite(out).all(), (name, mode)
        sizes = sizes or [r.output_size for r in report.layers]  # the original's, from checkered's analysis
    if name in _family_representatives():
        _check_downsampling_modes(name, model, x, expected_shape, sizes)


@functools.lru_cache(maxsize=None)
def _family_representatives() -> frozenset[str]:
    """The smallest model of each family (resnet, efficientnet_v2, swin_v2, vit, ...)."""
    smallest: dict[str, str] = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        family = re.match(r"[a-z]+(?:_v\d)?", name).group()
        if family not in smallest or _num_params(name) < _num_params(smallest[family]):
            smallest[family] = name
    return frozenset(smallest.values())


def _check_downsampling_modes(name, model, x, expected_shape, sizes):
    """Spectral, blurpool and DiffStride (one pass, three downsamplers) on the smallest model of
    every family: the suite's time allows the zoo once, not four times over. One image: the
    converted layers run at stride 1."""
    for mode in ("spectral", "blurpool", "diffstride"):
        if mode == "diffstride" and name.startswith(DIFFSTRIDE_REFUSED):
            with pytest.raises(ConversionError, match="diffstride mode cannot express"):
                convert(model, mode=mode, example_input=x)
            continue
        converted = convert(model, mode=mode, example_input=x)
        report = conversion_report(converted)
        assert report.converted_layers >= 1 and not report.warnings, (name, mode, report.warnings)
        if mode != "diffstride":
            assert [r.output_size for r in report.layers] == sizes, (name, mode)
        with torch.no_grad():
            out = converted(x)
        assert out.shape == expected_shape and torch.isfinite(out).all(), (name, mode)


@pytest.mark.parametrize("name", [p for p in _models() if not p.values[0].startswith(HEAVY_DILATED)])
def test_native_dilation_equals_multisample_dilation(name):
    torch.manual_seed(0)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    size = _size(name) + (0 if name.startswith(FIXED_SIZE) else 1)
    x = torch.randn(1, 3, size, size)  # one image: the comparison needs no batch, the suite needs the time
    if name.startswith(NATIVE_REFUSED):
        with pytest.raises(ConversionError, match="native dilation cannot pass"):
            convert(model, mode="dilated", dilation="native", example_input=x)
        # By default dilated mode falls back to multisample submaps for such a model.
        assert conversion_report(convert(model, mode="dilated", example_input=x)).dilation == "multisample"
        return
    native = convert(model, mode="dilated", dilation="native", example_input=x)
    assert conversion_report(native).final_submaps == 1
    multisample = convert(model, mode="dilated", dilation="multisample", example_input=x)
    with torch.no_grad():
        expected = multisample(x)
        error = ((native(x) - expected).abs().max() / expected.abs().max()).item()
    assert error <= 1e-5, (name, error)
