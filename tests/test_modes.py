"""The table of modes and the spectral / diffstride / blurpool conversions on small models."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccnn_convert import ConversionSpec, conversion_report, convert
from ccnn_convert.core import CONVERSION_MODES, DiffStride2d, diffstride_layers
from ccnn_convert.core.blurpool import blur_pool
from ccnn_convert.core.modes import MODE_OPTIONS, MODES, RESAMPLING_MODES, modes_table
from ccnn_convert.core import spectral as spectral_module
from ccnn_convert.core.spectral import spectral_pool
from ccnn_convert.errors import ConversionError, ParameterError
from ccnn_convert.spec import check_options_used

NEW_MODES = ("spectral", "diffstride", "blurpool")


# --------------------------------------------------------------------------- the table


def test_the_table_is_the_one_list_of_modes_and_options():
    assert CONVERSION_MODES == ("checkered", "dilated", "traditional", "spectral", "diffstride", "blurpool")
    assert tuple(MODES) == CONVERSION_MODES
    convert_parameters = inspect.signature(convert).parameters
    spec_fields = ConversionSpec.__dataclass_fields__
    for name in MODE_OPTIONS:
        assert name in convert_parameters and name in spec_fields, name
    expected = {"checkered": {"sampler", "density", "seed", "edges"}, "dilated": {"dilation"}, "traditional": set(),
                "spectral": {"resample_at", "spectral_convention"},
                "diffstride": {"smoothness", "resample_at", "spectral_convention"},
                "blurpool": {"blur_size", "resample_at"}}
    assert {name: set(mode.options) for name, mode in MODES.items()} == expected
    assert RESAMPLING_MODES == NEW_MODES
    for mode in MODES.values():
        assert callable(mode.converter) and mode.computes and mode.cost and mode.training
        assert f"| `{mode.name}` |" in modes_table()


@pytest.mark.parametrize("mode,options,parameter", [
    ("spectral", {"smoothness": 2.0}, "smoothness"),
    ("spectral", {"blur_size": 3}, "blur_size"),
    ("spectral", {"density": 2}, "density"),
    ("spectral", {"edges": "exact"}, "edges"),
    ("spectral", {"dilation": "native"}, "dilation"),
    ("spectral", {"sampler": "random"}, "sampler"),
    ("blurpool", {"smoothness": 2.0}, "smoothness"),
    ("diffstride", {"blur_size": 5}, "blur_size"),
    ("checkered", {"smoothness": 1.0}, "smoothness"),
    ("dilated", {"blur_size": 3}, "blur_size"),
    ("diffstride", {"smoothness": 0}, "smoothness"),
    ("diffstride", {"smoothness": -1.0}, "smoothness"),
    ("diffstride", {"smoothness": "4"}, "smoothness"),
    ("diffstride", {"smoothness": float("inf")}, "smoothness"),
    ("blurpool", {"blur_size": 0}, "blur_size"),
    ("blurpool", {"blur_size": 8}, "blur_size"),
    ("blurpool", {"blur_size": 2.5}, "blur_size"),
    ("blurpool", {"blur_size": True}, "blur_size"),
    ("checkered", {"spectral_convention": "published"}, "spectral_convention"),
    ("blurpool", {"spectral_convention": "symmetric"}, "spectral_convention"),
    ("spectral", {"spectral_convention": "mean"}, "spectral_convention"),
    ("diffstride", {"spectral_convention": "Published"}, "spectral_convention"),
])
def test_an_option_that_does_nothing_or_is_bad_is_an_error(mode, options, parameter):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2))
    with pytest.raises(ParameterError) as info:
        convert(model, mode=mode, **options)
    assert info.value.parameter == parameter
    with pytest.raises(ParameterError):
        ConversionSpec(mode=mode, **options)


def test_options_used_by_no_requested_mode_are_refused():
    check_options_used(["original", "diffstride"], smoothness=2.0)
    check_options_used(["blurpool", "spectral"], blur_size=5)
    with pytest.raises(ParameterError, match="only applies to mode diffstride") as info:
        check_options_used(["original", "spectral", "blurpool"], smoothness=2.0)
    assert info.value.parameter == "smoothness"
    with pytest.raises(ParameterError, match="only applies to mode blurpool"):
        check_options_used(["checkered", "diffstride"], blur_size=3)


def test_spec_carries_the_new_options():
    spec = ConversionSpec.build("diffstride", smoothness=2.5, sampler="random", blur_size=None)
    assert (spec.smoothness, spec.sampler) == (2.5, "lattice")  # the checkered sampler is dropped
    assert ConversionSpec.from_dict(spec.to_dict()) == spec
    assert spec.describe() == "keep_first=0, smoothness=2.5, resample_at=activation, spectral_convention=published"  # recorded
    blur = ConversionSpec.build("blurpool", base=ConversionSpec(mode="blurpool", blur_size=5, keep_first=1))
    assert (blur.blur_size, blur.keep_first) == (5, 1)
    # an artifact's smoothness does not carry over to another mode
    assert ConversionSpec.build("spectral", base=spec).smoothness is None


# --------------------------------------------------------------------------- conversions


class _Mixed(nn.Module):
    """Module and functional strided layers, a ceil-mode max pool, an average pool."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.weight = nn.Parameter(torch.randn(6, 4, 3, 3) * 0.2)
        self.pool = nn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = F.conv2d(x, self.weight, None, 2, 0)
        x = self.pool(x)
        x = F.avg_pool2d(x, 2)
        return self.head(x.mean((2, 3)))


def _by_hand(model: _Mixed, x: torch.Tensor, down) -> torch.Tensor:
    """Each strided layer at stride 1, then ``down(map, stride, original output size)``."""
    def sizes(y, k, s, p, ceil=False):
        return tuple(((n + 2 * p - k + (s - 1 if ceil else 0)) // s + 1) for n in y.shape[-2:])

    size = sizes(x, 3, 2, 1)
    y = torch.relu(down(F.conv2d(x, model.conv1.weight, model.conv1.bias, 1, 1), 2, size))
    size = sizes(y, 3, 2, 0)
    y = down(F.conv2d(y, model.weight, None, 1, 0), 2, size)
    size = sizes(y, 3, 2, 0, ceil=True)
    y = down(F.max_pool2d(y, 3, 1), 2, size)
    size = sizes(y, 2, 2, 0)
    y = down(F.avg_pool2d(y, 2, 1), 2, size)
    return model.head(y.mean((2, 3)))


@pytest.mark.parametrize("size", [32, 35, 36])  # 35, 36: the ceil-mode pool gives one more row
@pytest.mark.parametrize("mode", ["spectral", "blurpool"])
def test_conversion_is_stride_one_then_the_downsampler_at_the_original_size(mode, size):
    torch.manual_seed(0)
    model = _Mixed().eval()
    x = torch.randn(2, 3, size, size)
    converted = convert(model, mode=mode, resample_at="layer", example_input=x)  # (the placement by hand below)
    report = conversion_report(converted)
    assert (report.steps, report.converted_layers) == (4, 4)
    # same output size for every strided layer as the original: the classifier is unchanged
    originals = convert(model, mode="traditional", example_input=x)
    assert [r.output_size for r in report.layers] == [r.output_size for r in conversion_report(originals).layers]
    if mode == "spectral":
        def down(y, stride, out):
            return spectral_pool(y, out)
    else:
        def down(y, stride, out):
            return blur_pool(y, stride, 3, out)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), _by_hand(model, x, down))
    # the converted model keeps the original's parameters and adds none
    assert converted.state_dict().keys() == model.state_dict().keys()


def test_blur_size_reaches_the_blur():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1)).eval()
    x = torch.randn(1, 3, 16, 16)
    converted = convert(model, mode="blurpool", blur_size=5, example_input=x)
    with torch.no_grad():
        expected = blur_pool(F.conv2d(x, model[0].weight, model[0].bias, 1, 1), 2, 5)
        torch.testing.assert_close(converted(x), expected)


class _Block(nn.Module):
    """Stem, then a residual block whose strided conv and shortcut meet (one step)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.shortcut = nn.Conv2d(8, 8, 1, stride=2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.conv(x)) + self.shortcut(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def test_diffstride_shares_one_learnable_stride_pair_per_step(caplog):
    torch.manual_seed(0)
    model = _Block().eval()
    x = torch.randn(2, 3, 40, 40)
    with caplog.at_level(logging.INFO, logger="ccnn_convert"):
        converted = convert(model, mode="diffstride", smoothness=2.0, example_input=x)
    messages = [r.getMessage() for r in caplog.records if "original strides" in r.getMessage()]
    assert len(messages) == 1 and "2 learnable stride pairs" in messages[0]
    layers = diffstride_layers(converted)
    assert [name for name, _ in layers] == ["ccnn_diffstride_step1", "ccnn_diffstride_step2"]
    assert all(layer.smoothness == 2.0 for _, layer in layers)
    # the state_dict: the original's parameters plus one stride pair per step
    extra = set(converted.state_dict()) - set(model.state_dict())
    assert extra == {"ccnn_diffstride_step1.strides", "ccnn_diffstride_step2.strides"}
    report = conversion_report(converted)
    assert [(r.name, r.step) for r in report.layers] == [("stem", 1), ("conv", 2), ("shortcut", 2)]
    # 40 -> stride-1 stem 40 -> DiffStride (R=2, S=2): rows ceil(2 + 10) = 12 per side, 24x24
    assert report.layers[0].output_size == (24, 24)
    assert report.layers[1].output_size == report.layers[2].output_size == (16, 16)  # ceil(2 + 6) = 8 per side
    # the step's two maps go through the very same module
    calls = [n.target for n in converted.graph.nodes if n.op == "call_module" and "diffstride" in str(n.target)]
    assert calls == ["ccnn_diffstride_step1", "ccnn_diffstride_step2", "ccnn_diffstride_step2"]
    # learned strides change the sizes of every map after them, and the model still runs
    converted.ccnn_diffstride_step2.strides.data.fill_(3.0)
    converted.ccnn_diffstride_step2.eval()
    with torch.no_grad():
        assert converted(x).shape == (2, 3)


def test_the_convention_is_bound_when_the_model_is_converted(monkeypatch):
    """Each spectral pooling call of the graph and each DiffStride2d holds the conversion's
    convention: the default is read when converting, and a converted model does not change when
    the default changes later (at 32 px every map is even: each pooling has a Nyquist row)."""
    torch.manual_seed(0)
    model = _Block().eval()
    x = torch.randn(2, 3, 32, 32)
    spectral = {c: convert(model, mode="spectral", spectral_convention=c, example_input=x).eval()
                for c in (None, "published", "symmetric")}
    diffstride = {c: convert(model, mode="diffstride", spectral_convention=c, example_input=x).eval()
                  for c in (None, "symmetric")}

    def held(converted):
        calls = [n.args[2] for n in converted.graph.nodes if n.op == "call_function" and n.target.__name__ ==
                 "spectral_downsample"]
        return calls + [layer.convention for _, layer in diffstride_layers(converted)]

    assert held(spectral[None]) == held(spectral["published"]) == ["published"] * 3
    assert held(spectral["symmetric"]) == ["symmetric"] * 3
    assert held(diffstride[None]) == ["published"] * 2 and held(diffstride["symmetric"]) == ["symmetric"] * 2
    assert conversion_report(spectral["symmetric"]).spectral_convention == "symmetric"
    with torch.no_grad():
        outputs = {c: m(x) for c, m in spectral.items()}
        strided = diffstride[None](x)
    assert torch.equal(outputs[None], outputs["published"])
    assert (outputs["published"] - outputs["symmetric"]).abs().max() > 1e-4  # the conventions differ here
    monkeypatch.setattr(spectral_module, "MODE_CONVENTION", "symmetric")
    with torch.no_grad():
        assert torch.equal(spectral[None](x), outputs[None]) and torch.equal(diffstride[None](x), strided)
    assert held(spectral[None]) == ["published"] * 3 and held(diffstride[None]) == ["published"] * 2
    assert held(convert(model, mode="spectral", example_input=x)) == ["symmetric"] * 3  # the next conversion's
    assert ConversionSpec(mode="diffstride").spectral_convention == "symmetric"


@pytest.mark.parametrize("mode", NEW_MODES)
def test_keep_first_keeps_the_first_steps(mode):
    torch.manual_seed(0)
    model = _Block().eval()
    x = torch.randn(1, 3, 32, 32)
    converted = convert(model, mode=mode, keep_first=1, example_input=x)
    report = conversion_report(converted)
    assert [r.converted for r in report.layers] == [False, True, True]
    assert report.layers[0].note == "(keep_first)"
    assert len(diffstride_layers(converted)) == (1 if mode == "diffstride" else 0)
    with torch.no_grad():  # the stem is the original strided conv
        stem = converted.stem(x)
        torch.testing.assert_close(stem, model.stem(x))
    everything = convert(model, mode=mode, keep_first=2, example_input=x)
    assert conversion_report(everything).converted_layers == 0
    with torch.no_grad():
        torch.testing.assert_close(everything(x), model(x))
    with pytest.raises(AssertionError):  # keep_first beyond the steps is a warning, not silence
        assert not conversion_report(convert(model, mode=mode, keep_first=3, example_input=x)).warnings


def test_diffstride_refuses_a_model_fixed_to_the_original_sizes():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.head = nn.Linear(4 * 8 * 8, 2)

        def forward(self, x):
            return self.head(self.conv(x).reshape(x.shape[0], 4 * 8 * 8))

    model = Fixed().eval()
    x = torch.randn(1, 3, 16, 16)
    assert convert(model, mode="spectral", example_input=x)(x).shape == (1, 2)
    with pytest.raises(ConversionError, match="diffstride mode cannot express Fixed"):
        convert(model, mode="diffstride", example_input=x)


def test_train_and_eval_graphs_share_the_learnable_strides():
    """A model that traces differently in train mode (dropout written as a branch) gets one
    DiffStride2d per step in both graphs."""
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

        def forward(self, x):
            y = self.conv(x)
            if self.training:
                y = y * 0.5
            return y.mean((2, 3))

    converted = convert(Branchy(), mode="diffstride", example_input=torch.randn(1, 3, 16, 16))
    assert [name for name, _ in diffstride_layers(converted)] == ["ccnn_diffstride_step1"]
    x = torch.randn(2, 3, 16, 16)
    converted.train()
    trained = converted(x)
    converted.eval()
    with torch.no_grad():
        torch.testing.assert_close(trained.detach(), converted(x) * 0.5)
    assert isinstance(converted.ccnn_diffstride_step1, DiffStride2d)


@pytest.mark.parametrize("mode", NEW_MODES)
def test_dense_feature_maps_are_refused_for_resampled_maps(mode):
    """Their maps are not samples of the input grid: no DenseMap with a wrong stride."""
    from ccnn_convert import create_feature_extractor
    model = _Block().eval()
    with pytest.raises(ParameterError, match=f"{mode} mode's maps are resampled"):
        create_feature_extractor(model, ["conv"], mode=mode, example_input=torch.zeros(1, 3, 32, 32))
