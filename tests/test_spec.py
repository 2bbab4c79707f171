"""ConversionSpec: one conversion record for flags, artifacts and metadata (issue 10), and
options that would do nothing are refused rather than ignored (issue 9, item 5)."""

import pytest
import torch
from torch import nn

from ccnn_convert import convert
from ccnn_convert.errors import ParameterError
from ccnn_convert.spec import MODES, ConversionSpec, check_checkered_options_used, check_modes


def test_build_prefers_explicit_values_then_the_artifact_then_defaults():
    artifact = ConversionSpec("checkered", "random", keep_first=2, density=3, seed=7, leaf_modules=("Gate",))
    same_mode = ConversionSpec.build("checkered", artifact, keep_first=1)
    assert same_mode == ConversionSpec("checkered", "random", 1, 3, 7, ("Gate",))
    other_mode = ConversionSpec.build("dilated", artifact)
    # keep_first and the leaves describe the model; sampler/density/seed only checkered submaps
    assert other_mode == ConversionSpec("dilated", "lattice", 2, None, None, ("Gate",))
    assert ConversionSpec.build("checkered") == ConversionSpec()


def test_build_adds_leaves_to_the_artifacts_without_duplicates():
    artifact = ConversionSpec(leaf_modules=("Gate",))
    assert ConversionSpec.build("checkered", artifact, leaf_modules=["Gate", "Other"]).leaf_modules == ("Gate", "Other")


def test_round_trip_through_plain_data():
    spec = ConversionSpec("checkered", "random", 1, 3, 5, ("a.b", "Gate"))
    data = spec.to_dict()
    assert all(isinstance(v, (str, int, list, type(None))) for v in data.values())
    assert ConversionSpec.from_dict(data) == spec


@pytest.mark.parametrize("data, parameter", [
    ({"mode": "checkered", "payload": "os:system"}, "conversion"),
    ({"mode": "sideways"}, "mode"),
    ({"mode": "checkered", "sampler": "evil"}, "sampler"),
    ({"mode": "checkered", "keep_first": -1}, "keep_first"),
    ({"mode": "checkered", "keep_first": "2"}, "keep_first"),
    ({"mode": "checkered", "leaf_modules": "Gate"}, "conversion"),
    ({"mode": "checkered", "leaf_modules": [1]}, "leaf_modules"),
    (["mode", "checkered"], "conversion"),
])
def test_tampered_dicts_are_refused_naming_the_parameter(data, parameter):
    with pytest.raises(ParameterError) as info:
        ConversionSpec.from_dict(data)
    assert info.value.parameter == parameter
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, parameter", [
    (dict(mode="traditional", density=2), "density"),
    (dict(mode="dilated", density=4), "density"),
    (dict(mode="checkered", sampler="lattice", seed=3), "seed"),
    (dict(mode="dilated", sampler="random", seed=3), "seed"),
    (dict(mode="dilated", edges="reference"), "edges"),
    (dict(mode="traditional", edges="exact"), "edges"),
    (dict(mode="checkered", dilation="native"), "dilation"),
    (dict(mode="dilated", dilation="sideways"), "dilation"),
])
def test_options_that_would_do_nothing_are_errors(kwargs, parameter):
    with pytest.raises(ParameterError) as info:
        ConversionSpec(**kwargs)
    assert info.value.parameter == parameter
    with pytest.raises(ParameterError):  # the engine applies the same rule to API callers
        convert(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2)), **kwargs)


def test_parameter_errors_render_with_a_flag():
    with pytest.raises(ParameterError) as info:
        ConversionSpec(mode="checkered", sampler="naive", seed=1)
    assert str(info.value).startswith("seed ")
    assert info.value.render("--seed").startswith("--seed ")


def test_checkered_options_need_a_checkered_mode():
    check_checkered_options_used(["original", "checkered"], sampler="random", seed=1)
    with pytest.raises(ParameterError) as info:
        check_checkered_options_used(["original", "dilated"], density=3)
    assert info.value.parameter == "density"


def test_check_modes_validates_and_deduplicates():
    assert check_modes(["Original", "checkered", "original"]) == ["original", "checkered"]
    assert set(MODES) == {"original", "traditional", "checkered", "dilated", "spectral", "diffstride", "blurpool"}
    for bad in (["sideways"], []):
        with pytest.raises(ParameterError):
            check_modes(bad)


def test_apply_equals_convert_with_the_same_arguments():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    spec = ConversionSpec("checkered", "random", seed=4)
    x = torch.randn(2, 3, 32, 32)
    expected = convert(model, mode="checkered", sampler="random", seed=4,
                       example_input=torch.zeros(1, 3, 32, 32)).eval()(x)
    assert torch.equal(spec.apply(model, 32)(x), expected)


def test_edges_and_dilation_travel_with_the_spec():
    artifact = ConversionSpec("dilated", keep_first=2, dilation="native")
    assert ConversionSpec.build("dilated", artifact) == artifact
    assert ConversionSpec.build("dilated", artifact, dilation="multisample").dilation == "multisample"
    # dilation only shapes dilated mode, edges only checkered mode: dropped for the others
    assert ConversionSpec.build("checkered", artifact, dilation="native") == ConversionSpec("checkered", keep_first=2)
    assert ConversionSpec.build("dilated", edges="reference").edges is None
    checkered = ConversionSpec.build("checkered", edges="exact")
    assert ConversionSpec.from_dict(checkered.to_dict()) == checkered
    assert ConversionSpec.from_dict(artifact.to_dict()) == artifact
    old = {"mode": "dilated", "sampler": "lattice", "keep_first": 1, "density": None, "seed": None,
           "leaf_modules": []}  # an artifact written before edges/dilation existed
    assert ConversionSpec.from_dict(old) == ConversionSpec("dilated", keep_first=1)
    assert checkered.describe() == "sampler=lattice, keep_first=0, edges=exact"
    assert artifact.describe() == "keep_first=2, dilation=native"
    assert {"edges", "dilation"} <= set(artifact.convert_kwargs())


def test_dilation_and_edges_need_their_modes():
    check_checkered_options_used(["original", "dilated"], edges="exact", dilation="native")
    with pytest.raises(ParameterError) as info:
        check_checkered_options_used(["original", "checkered"], dilation="native")
    assert info.value.parameter == "dilation"
    with pytest.raises(ParameterError) as info:
        check_checkered_options_used(["dilated"], edges="reference")
    assert info.value.parameter == "edges"


def test_apply_with_native_dilation_equals_multisample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    x = torch.randn(2, 3, 30, 30)
    native = ConversionSpec("dilated", dilation="native").apply(model, 30)
    assert torch.allclose(native(x), ConversionSpec("dilated").apply(model, 30)(x), rtol=1e-5, atol=1e-6)
    assert native.meta["ccnn_report"].final_submaps == 1
