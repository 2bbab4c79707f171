"""PHC recovery (issue 25, part 2): BatchNorm recalibration and distillation of PHC models.

``ccnn-recalibrate --phc`` re-estimates the statistics a PHC fit moved: equal to a hand
computation with the Kronecker weight built in NumPy; ``auto`` compares with the dense original;
the artifact keeps A and F (also an artifact's own, trained ones, in another mode) and ccnn-eval
rebuilds the same PHC layers. ``ccnn-train --distill --phc`` trains A and F (the recipe's
``phc+norm+head``), leaves the dense original teacher untouched, and its best.pt goes through eval.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from ccnn_convert import ParameterError, convert
from ccnn_convert.cli.convert import app as convert_app
from ccnn_convert.cli.eval import app as eval_app
from ccnn_convert.cli.recalibrate import app as recalibrate_app
from ccnn_convert.cli.train import app as train_app
from ccnn_convert.core.phc import PHConv2d, is_phc_layer, nearest_kronecker_sum, phc_parameter_names
from ccnn_convert.data import decode_rgb
from ccnn_convert.models import ResolvedModel, load_artifact
from ccnn_convert.models.preprocessing import imagenet_preprocessing
from ccnn_convert.spec import ConversionSpec
from ccnn_convert.train.params import select_trainable
from test_calibrate import _hand_dilated_statistics, _normalise_with_batch_stats, _stats
from test_phc import SamePadConv, numpy_kronecker_sum
from test_train import _cli

# The 4->8 conv becomes a PHC layer at n=2 (relative fit error about 0.65: its BatchNorm's input
# statistics move); the 3-channel stem stays dense. Three classes: ImageNet wnid folders evaluate it.
NET = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
'''
WNIDS = ("n01440764", "n01443537", "n01484850")
SIZE = ("--resize", "16", "--crop", "16")
COMMON = (*SIZE, "--workers", "0", "--device", "cpu", "--trust-factory")


def _make() -> nn.Sequential:
    namespace: dict = {}
    exec(NET, namespace)
    return namespace["make"]().eval()


@pytest.fixture
def project(tmp_path, monkeypatch):
    """net.py:make and six 20x20 images, two per wnid folder (recalibration reads them all)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(NET)
    rng = np.random.default_rng(0)
    for wnid in WNIDS:
        (tmp_path / "photos" / wnid).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / "photos" / wnid / f"{i}.png")
    return tmp_path


def _one_batch(project) -> torch.Tensor:
    transform = imagenet_preprocessing().with_overrides(resize=16, crop=16).transform()
    return torch.stack([transform(decode_rgb(p)) for p in sorted((project / "photos").rglob("*.png"))])


def _kronecker_weight(state: dict, name: str) -> torch.Tensor:
    """The PHC layer's weight built in NumPy from the stored A and F (np.kron per kernel tap)."""
    A, Fs = (state[f"{name}.{key}"].double().numpy() for key in ("A", "F"))
    return torch.from_numpy(numpy_kronecker_sum(A, Fs)).float()


def _recalibrate(*args):
    return _cli(recalibrate_app, [*args, *COMMON])


# --------------------------------------------------------------------------------------------
# ccnn-recalibrate --phc


def test_recalibrated_phc_statistics_equal_a_hand_computation(project):
    """Traditional mode (PHC alone), every BatchNorm, one batch of the six images: the first
    BatchNorm sees the dense stem; the second, the Kronecker weight's convolution of the first's
    batch-normalised output (train mode). The Kronecker weight is far from the dense one, so the
    dense network's statistics would not pass."""
    code, out = _recalibrate("net.py:make", "--data", "photos", "-o", "rec.pt", "--images", "6", "--batch-size", "6",
                             "--mode", "traditional", "--phc", "2", "--recalibrate", "all")
    assert code == 0, out
    artifact = load_artifact(project / "rec.pt", trust_factory=True)
    assert artifact.conversion.phc == 2 and sorted(artifact.conversion_state) == ["3.A", "3.F"]
    net, dense = artifact.model, _make()
    weight = _kronecker_weight(artifact.conversion_state, "3")
    assert float((weight - dense[3].weight.detach()).norm() / dense[3].weight.detach().norm()) > 0.5  # the fit moved the weight
    x = _one_batch(project)
    with torch.no_grad():
        y1 = F.conv2d(x, dense[0].weight, dense[0].bias, stride=2, padding=1)
        h = F.relu(_normalise_with_batch_stats(y1, net[1]))
        y2 = F.conv2d(h, weight, dense[3].bias, stride=2, padding=1)
        y2_dense = F.conv2d(h, dense[3].weight, dense[3].bias, stride=2, padding=1)
    for bn, y in ((net[1], y1), (net[4], y2)):
        mean, var = _stats(y)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(net[4].running_var, _stats(y2_dense)[1], rtol=0.05)
    for name, tensor in dense.state_dict().items():  # only statistics changed: the weights are the original's
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(net.state_dict()[name], tensor), name


def test_recalibrated_phc_statistics_dilated_equal_the_hand_dilated_network(project):
    """PHC with a mode: dilated, its second conv the NumPy Kronecker weight, by hand (test_calibrate's)."""
    code, out = _recalibrate("net.py:make", "--data", "photos", "-o", "rec.pt", "--images", "6", "--batch-size", "6",
                             "--mode", "dilated", "--phc", "2", "--recalibrate", "all")
    assert code == 0, out
    artifact = load_artifact(project / "rec.pt", trust_factory=True)
    reference = _make()
    with torch.no_grad():
        reference[3].weight.copy_(_kronecker_weight(artifact.conversion_state, "3"))
    expected = _hand_dilated_statistics(reference, [_one_batch(project)])
    for bn, (mean, var) in zip((artifact.model[1], artifact.model[4]), expected):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-5)


def test_auto_compares_the_phc_model_with_the_dense_original(project):
    """In traditional mode only the fit changes anything: auto re-estimates the BatchNorm after the
    PHC layer (its input moved) and keeps the one after the dense stem. Compared with the PHC model
    itself it would find nothing to do."""
    code, out = _recalibrate("net.py:make", "--data", "photos", "-o", "rec.pt", "--images", "6", "--batch-size", "6",
                             "--mode", "traditional", "--phc", "2")
    assert code == 0, out
    assert "auto (1 of 2 BatchNorm layers)" in " ".join(out.split()), out
    net, dense = load_artifact(project / "rec.pt", trust_factory=True).model, _make()
    assert torch.equal(net[1].running_mean, dense[1].running_mean) and torch.equal(net[1].running_var,
                                                                                   dense[1].running_var)
    assert not torch.equal(net[4].running_var, dense[4].running_var)
    code, out = _recalibrate("net.py:make", "--data", "photos", "-o", "dense.pt", "--images", "6",
                             "--mode", "traditional")
    assert code == 0 and "auto (0 of 2 BatchNorm layers)" in " ".join(out.split()), out  # no PHC: nothing moved


def _perturbed(path, factor: float = 1.5) -> dict:
    """The artifact's stored A and F changed in place (as a trained PHC artifact's): -> the new ones."""
    obj = torch.load(path, weights_only=True)
    obj["conversion_state"] = {k: v * factor + 0.01 for k, v in obj["conversion_state"].items()}
    torch.save(obj, path)
    return obj["conversion_state"]


@pytest.mark.parametrize("mode", [None, "checkered"])
def test_a_phc_artifact_recalibrated_keeps_its_A_and_F_and_eval_loads_them(project, mode):
    """ccnn-convert --phc 2 -o x.pt (its A and F then changed, as training would), ccnn-recalibrate
    x.pt in its own mode or another: the new artifact stores the very same A and F (not a new fit of
    the dense weights), and ccnn-eval builds the PHC layers from them."""
    code, out = _cli(convert_app, ["net.py:make", "--mode", "traditional", "--phc", "2", "--input-size", "16",
                                   "-o", "x.pt"])
    assert code == 0, out
    stored = _perturbed(project / "x.pt")
    code, out = _recalibrate("x.pt", "--data", "photos", "-o", "y.pt", "--images", "6", "--recalibrate", "all",
                             *(["--mode", mode] if mode else []))
    assert code == 0, out
    artifact = load_artifact(project / "y.pt", trust_factory=True)
    assert artifact.conversion.phc == 2 and artifact.conversion.mode == (mode or "traditional")
    assert artifact.conversion_state.keys() == stored.keys()
    assert all(torch.equal(artifact.conversion_state[k], v) for k, v in stored.items())
    model = artifact.converted(artifact.conversion, 16)  # what ccnn-eval builds
    layers = [m for m in model.modules() if is_phc_layer(m)]  # checkered: its multisample form
    assert len(layers) == 1 and torch.equal(layers[0].A.detach(), stored["3.A"])
    assert not torch.equal(artifact.model[4].running_var, _make()[4].running_var)  # recalibrated
    code, out = _cli(eval_app, ["y.pt", "--trust-factory", "--data", "photos", *SIZE, "--workers", "0",
                                "--device", "cpu", "--json", "eval.json"])
    assert code == 0, out
    result = json.loads((project / "eval.json").read_text())["results"][-1]
    assert result["mode"] == (mode or "traditional") and result["images"] == 6, result


def test_learned_phc_parameters_of_traced_convs_carry_over_to_another_mode():
    """A conv class with its own forward is traced through (EfficientNet-Lite's): its A and F live
    on a plain module of the graph, and a PHC artifact's learned ones still load in another mode."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), SamePadConv(8, 8, 3), nn.ReLU(),
                          SamePadConv(8, 16, 3, stride=2), nn.AdaptiveAvgPool2d(1)).eval()
    x = torch.randn(2, 3, 15, 16)
    traditional = ConversionSpec(mode="traditional", phc=2)
    converted = traditional.apply(model, (15, 16))
    assert not any(is_phc_layer(m) for m in converted.modules())  # traced through: no PHC module left
    assert phc_parameter_names(converted) == {"2.A", "2.F", "2.bias", "4.A", "4.F", "4.bias"}
    learned = {k: torch.randn_like(v) for k, v in converted.named_parameters() if k.endswith((".A", ".F"))}
    resolved = ResolvedModel(model, "samepad", imagenet_preprocessing(), {"source": "module"}, "(in memory)",
                             traditional, 16, conversion_state=learned)
    checkered = resolved.converted(ConversionSpec(mode="checkered", phc=2), (15, 16))
    state = checkered.state_dict()
    assert all(torch.equal(state[k], v) for k, v in learned.items())
    with torch.no_grad():
        assert not torch.allclose(checkered(x), ConversionSpec(mode="checkered", phc=2).apply(model, (15, 16))(x))


def test_recalibrate_help_shows_phc_and_a_bad_phc_is_one_line(tmp_path, monkeypatch):
    code, out = _cli(recalibrate_app, ["--help"])
    assert code == 0 and "--phc" in out
    monkeypatch.chdir(tmp_path)
    for value in ("1", "0", "-2"):
        code, out = _cli(recalibrate_app, ["efficientnet_lite0", "--data", ".", "-o", "x.pt", "--images", "2",
                                           "--phc", value])
        assert code == 2 and "--phc" in out and "Traceback" not in out and len(out.strip().splitlines()) == 1, out
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------------------------
# distillation trains A and F


def test_phc_norm_head_trains_the_phc_layers_norms_and_head_only():
    """Plain PHC layers and convs traced through (their A and F on plain graph modules) alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1), SamePadConv(8, 16, 3, stride=2),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3)).eval()
    converted = convert(model, mode="checkered", phc=2, example_input=torch.zeros(1, 3, 16, 16))
    select_trainable(converted, "phc+norm+head")
    training = sorted(name for name, p in converted.named_parameters() if p.requires_grad)
    assert training == ["1.bias", "1.weight", "2.A", "2.F", "2.bias", "3.A", "3.F", "3.bias", "7.bias", "7.weight"]
    with pytest.raises(ParameterError, match="no PHC layer"):
        select_trainable(convert(model, mode="checkered", example_input=torch.zeros(1, 3, 16, 16)), "phc+norm+head")


def test_the_distillation_recipe_of_a_phc_model_trains_phc_norm_head(project):
    from ccnn_convert.train.distill import distill_recipe, recipe_phc

    assert distill_recipe("traditional", 2)["train_params"] == "phc+norm+head"
    assert distill_recipe("blurpool", 3) == {**distill_recipe("blurpool"), "train_params": "phc+norm+head"}
    assert distill_recipe("checkered")["train_params"] == "norm+head"
    code, out = _cli(convert_app, ["net.py:make", "--mode", "traditional", "--phc", "2", "--input-size", "16",
                                   "-o", "x.pt"])
    assert code == 0, out
    assert recipe_phc("x.pt", None) == 2 and recipe_phc("x.pt", 4) == 4 and recipe_phc("net.py:make", None) is None


def test_distill_with_phc_trains_A_and_F_keeps_the_teacher_and_best_loads_in_eval(project, monkeypatch):
    import ccnn_convert.train.run as run

    teachers = []

    def build_teacher(*args, **kwargs):
        teachers.append(real(*args, **kwargs))
        return teachers[-1]

    real = run.build_teacher
    monkeypatch.setattr(run, "build_teacher", build_teacher)
    original = _make().state_dict()
    code, out = _cli(train_app, ["net.py:make", "--data", "photos", "--out", "run", "--distill", "--phc", "2",
                                 "--mode", "traditional", "--epochs", "1", "--batch-size", "2", "--lr", "0.5",
                                 "--val-fraction", "0.34", *COMMON[:-1]])
    assert code == 0, out
    last = load_artifact(project / "run" / "last.pt", trust_factory=True)
    assert last.training["recipe"]["train_params"] == "phc+norm+head" and last.conversion.phc == 2
    fitted_A, fitted_F, _ = nearest_kronecker_sum(_make()[3].weight, 2)
    assert not torch.allclose(last.conversion_state["3.A"], fitted_A, atol=1e-4)  # trained from the fit
    assert not torch.allclose(last.conversion_state["3.F"], fitted_F, atol=1e-4)
    state = last.model.state_dict()
    for name in ("0.weight", "0.bias", "3.weight"):  # the dense stem and the dense weight behind the PHC layer
        assert torch.equal(state[name], original[name]), name
    assert not torch.equal(state["8.weight"], original["8.weight"])  # the head trains too
    (teacher,) = teachers
    member = teacher.members[0].model
    assert not any(is_phc_layer(m) for m in member.modules())  # the dense original
    assert all(torch.equal(member.state_dict()[k], v) for k, v in original.items())  # untouched
    best = load_artifact(project / "run" / "best.pt", trust_factory=True)
    model = best.converted(best.conversion, 16)  # what ccnn-eval builds
    (layer,) = [m for m in model.modules() if isinstance(m, PHConv2d)]
    assert torch.equal(layer.A.detach(), best.conversion_state["3.A"])
    code, out = _cli(eval_app, ["run/best.pt", "--trust-factory", "--data", "photos", *SIZE, "--workers", "0",
                                "--device", "cpu", "--json", "eval.json"])
    assert code == 0, out
    results = json.loads((project / "eval.json").read_text())["results"]
    assert results[-1]["mode"] == "traditional" and results[-1]["images"] == 6, results
