"""ConversionSpec: one conversion record for flags, artifacts and metadata (issue 10), and
options that would do nothing are refused rather than ignored (issue 9, item 5)."""

import pytest
import torch
from torch import nn

from ccnn_convert import convert
from ccnn_convert.errors import ParameterError
from ccnn_convert.spec import MODES, ConversionSpec, check_checkered_options_used, check_modes, check_options_used


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
    check_checkered_options_used(["original", "dilated"], dilation="native")
    with pytest.raises(ParameterError) as info:  # dilated is always exact: the flag would do nothing
        check_checkered_options_used(["original", "dilated"], edges="exact")
    assert info.value.parameter == "edges"
    with pytest.raises(ParameterError) as info:
        check_checkered_options_used(["traditional"], keep_first=2)
    assert info.value.parameter == "keep_first"
    check_checkered_options_used(["traditional", "dilated"], keep_first=2)
    check_checkered_options_used(["traditional"], keep_first=0)
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


# --------------------------------------------------------------------------- spectral_convention


def test_the_spectral_convention_is_recorded_and_old_conversions_rebuild_as_they_were_built():
    assert ConversionSpec(mode="spectral").spectral_convention == "published"  # the default, written down
    assert ConversionSpec(mode="diffstride").spectral_convention == "published"
    assert ConversionSpec(mode="blurpool").spectral_convention is None
    symmetric = ConversionSpec.build("spectral", spectral_convention="symmetric", keep_first=1)
    assert ConversionSpec.from_dict(symmetric.to_dict()) == symmetric
    assert "spectral_convention=symmetric" in symmetric.describe()
    # an artifact saved before the field existed: each mode as its constant was then
    for mode, then in (("spectral", "symmetric"), ("diffstride", "published"), ("blurpool", None),
                       ("checkered", None)):
        old = {k: v for k, v in ConversionSpec(mode=mode).to_dict().items() if k != "spectral_convention"}
        assert ConversionSpec.from_dict(old).spectral_convention == then, mode
    # an artifact's convention carries over to its own mode; an explicit one wins; other modes drop it
    assert ConversionSpec.build("spectral", symmetric).spectral_convention == "symmetric"
    assert ConversionSpec.build("spectral", symmetric, spectral_convention="published").spectral_convention == "published"
    assert ConversionSpec.build("diffstride", symmetric).spectral_convention == "published"
    assert ConversionSpec.build("checkered", symmetric).spectral_convention is None


def test_the_spectral_convention_needs_a_spectral_or_diffstride_mode():
    check_options_used(["original", "diffstride"], spectral_convention="symmetric")
    with pytest.raises(ParameterError, match="only applies to mode spectral or diffstride") as info:
        check_options_used(["original", "checkered", "blurpool"], spectral_convention="published")
    assert info.value.parameter == "spectral_convention" and "\n" not in str(info.value)
    for data in ({"mode": "checkered", "spectral_convention": "published"},
                 {"mode": "spectral", "spectral_convention": "mean"}):
        with pytest.raises(ParameterError) as info:
            ConversionSpec.from_dict(data)
        assert info.value.parameter == "spectral_convention"


def _conventions_held(model: nn.Module) -> set[str]:
    return {node.args[2] for node in model.graph.nodes
            if node.op == "call_function" and node.target.__name__ == "spectral_downsample"}


def test_an_artifact_saved_without_the_convention_rebuilds_symmetric(tmp_path):
    """A spectral artifact from before the option (its conversion has no spectral_convention) was
    built with the symmetric crop, and loads as it was built; a new one records its own."""
    from ccnn_convert.models import load_artifact, resolve_model, save_artifact

    resolved = resolve_model("resnet18", weights="none")
    save_artifact(tmp_path / "new.pt", resolved, ConversionSpec(mode="spectral"))
    raw = torch.load(tmp_path / "new.pt", weights_only=True)
    assert raw["conversion"]["spectral_convention"] == "published"
    del raw["conversion"]["spectral_convention"]
    torch.save(raw, tmp_path / "old.pt")
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # every map even: Nyquist rows
    built = {}
    for name in ("new", "old"):
        loaded = load_artifact(tmp_path / f"{name}.pt")  # the same weights in both
        converted = loaded.converted(loaded.conversion, 64)
        built[name] = (loaded.conversion.spectral_convention, _conventions_held(converted))
        with torch.no_grad():
            built[name] += (converted(x),)
    assert built["new"][:2] == ("published", {"published"})
    assert built["old"][:2] == ("symmetric", {"symmetric"})
    with torch.no_grad():
        symmetric = convert(loaded.model.eval(), mode="spectral", spectral_convention="symmetric",
                            example_input=torch.zeros(1, 3, 64, 64)).eval()(x)
    assert torch.equal(built["old"][2], symmetric)
    assert (built["new"][2] - symmetric).abs().max() > 1e-6
