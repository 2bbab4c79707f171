"""Which BatchNorms recalibration re-estimates (``recalibrate=auto|all|none``): auto measures each
norm's input statistics in the original and the converted model. Checkered submaps keep them
(bit-identical statistics after ``ccnn-recalibrate``); a blur shrinks them (re-estimated, and equal
to a hand computation over the blurred maps)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ccnn_convert import convert
from ccnn_convert.core.blurpool import blur_pool
from ccnn_convert.data import decode_rgb
from ccnn_convert.models import load_artifact
from ccnn_convert.models.preprocessing import imagenet_preprocessing
from ccnn_convert.train.calibrate import STATISTICS_TOLERANCE, norm_layers_to_recalibrate, statistics_change

from test_calibrate import COMMON, _batches, _cli, _net, project  # noqa: F401 (project: a fixture)


def test_the_change_is_the_median_channels_log_variance_ratio_or_mean_shift():
    mean, var = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 4.0, 9.0])
    assert statistics_change((mean, var), (mean, var)) == 0
    assert statistics_change((mean, var), (mean, var * 4), eps=0) == pytest.approx(torch.log(torch.tensor(4.0)).item())
    shifted = mean + 0.5 * var.sqrt() * torch.tensor([1.0, 1.0, -3.0])  # the median channel moved 0.5 sd
    assert statistics_change((mean, var), (shifted, var), eps=0) == pytest.approx(0.5)


def _names(model, chosen):
    return [name for name, module in model.named_modules() if any(module is c for c in chosen)]


def test_auto_keeps_checkered_and_picks_the_norms_after_a_blur():
    net = _net().eval()
    batches = _batches()
    x = batches[0][:1]
    checkered = convert(net, mode="checkered", example_input=x)
    assert norm_layers_to_recalibrate(net, checkered, batches, "auto") == []
    at_layer = convert(net, mode="blurpool", resample_at="layer", example_input=x)  # after each conv: both norms
    assert _names(at_layer, norm_layers_to_recalibrate(net, at_layer, batches)) == ["1", "4"]
    # after the activation, the first norm sees the stride-1 conv: the same statistics, kept
    at_activation = convert(net, mode="blurpool", resample_at="activation", example_input=x)
    assert _names(at_activation, norm_layers_to_recalibrate(net, at_activation, batches)) == ["4"]
    assert _names(checkered, norm_layers_to_recalibrate(net, checkered, batches, "all")) == ["1", "4"]
    assert norm_layers_to_recalibrate(net, at_layer, batches, "none") == []
    assert STATISTICS_TOLERANCE > 0


def _original_statistics():
    from test_calibrate import NET

    scope: dict = {}
    exec(NET, scope)
    model = scope["make"]()
    return {k: v for k, v in model.state_dict().items() if "running" in k}


def _run(project, *options):
    code, out = _cli("net.py:make", "--data", "photos", "-o", "rec.pt", "--images", "6", "--batch-size", "6",
                     *options, *COMMON, "--force")
    assert code == 0, out
    artifact = load_artifact(project / "rec.pt", trust_factory=True)
    return artifact, {k: v for k, v in artifact.model.state_dict().items() if "running" in k}


def test_the_command_keeps_checkered_statistics_bit_identical(project):
    artifact, statistics = _run(project, "--mode", "checkered")
    assert artifact.training["layers"].startswith("auto (0 of 2")
    for name, value in _original_statistics().items():
        assert torch.equal(statistics[name], value), name


def test_the_command_re_estimates_only_the_changed_norms(project):
    original = _original_statistics()
    artifact, statistics = _run(project, "--mode", "blurpool", "--resample-at", "activation")
    assert artifact.training["layers"].startswith("auto (1 of 2")
    for name in ("1.running_mean", "1.running_var"):
        assert torch.equal(statistics[name], original[name])  # kept, bit for bit
    # the second norm: the statistics of its input, computed by hand over the six images
    model = artifact.model
    transform = imagenet_preprocessing().with_overrides(resize=16, crop=16).transform()
    x = torch.stack([transform(decode_rgb(p)) for p in sorted((project / "photos").rglob("*.png"))])
    with torch.no_grad():
        h = F.relu(model[1](F.conv2d(x, model[0].weight, model[0].bias, 1, 1)))
        y = F.conv2d(blur_pool(h, 2, 3), model[3].weight, model[3].bias, 1, 1)
    torch.testing.assert_close(statistics["4.running_mean"], y.mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(statistics["4.running_var"], y.var((0, 2, 3)), rtol=1e-5, atol=1e-5)
    # all: both re-estimated; none: neither
    _, every = _run(project, "--mode", "blurpool", "--recalibrate", "all")
    assert not torch.equal(every["1.running_var"], original["1.running_var"])
    _, nothing = _run(project, "--mode", "blurpool", "--recalibrate", "none")
    assert all(torch.equal(nothing[name], value) for name, value in original.items())


@pytest.mark.parametrize("options,flag", [
    (("--recalibrate", "some"), "--recalibrate"),
    (("--recalibrate", "all", "--layers", "all"), "--layers"),
])
def test_a_bad_choice_is_one_line(project, options, flag):
    code, out = _cli("net.py:make", "--data", "photos", "-o", "rec.pt", "--images", "3", *options, *COMMON)
    assert code == 2 and flag in out and len(out.strip().splitlines()) == 1, out


# --------------------------------------------------------------------------- before a distillation


def _distill(tmp_path, *options):
    from test_distill import NET as DISTILL_NET
    from test_distill import _cli as train_cli
    from test_distill import _distill_args, _png

    (tmp_path / "net.py").write_text(DISTILL_NET)
    for i in range(6):
        _png(tmp_path / "photos" / f"{i}.png", i)
    code, out = train_cli(_distill_args("photos", "run", "--force", *options))
    if code != 0:
        return code, out, None
    artifact = load_artifact(tmp_path / "run" / "last.pt", trust_factory=True)
    return code, out, {k: v for k, v in artifact.model.state_dict().items() if "running" in k}


def _distill_original():
    from test_distill import NET as DISTILL_NET

    scope: dict = {}
    exec(DISTILL_NET, scope)
    return {k: v for k, v in scope["make"]().state_dict().items() if "running" in k}


def test_distillation_first_re_estimates_the_changed_norms_and_keeps_the_rest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = _distill_original()
    # the distillation recipe freezes the statistics: what the artifact holds is what recalibration left
    code, out, statistics = _distill(tmp_path, "--mode", "blurpool", "--resample-at", "activation",
                                     "--recalibrate", "auto")
    assert code == 0, out
    assert torch.equal(statistics["1.running_var"], original["1.running_var"])  # its input kept its statistics
    assert not torch.equal(statistics["4.running_var"], original["4.running_var"])  # after the blur: re-estimated
    code, out, statistics = _distill(tmp_path, "--mode", "blurpool")  # its recipe: no recalibration
    assert code == 0, out
    assert all(torch.equal(statistics[name], value) for name, value in original.items())


def test_recalibrate_without_distill_is_one_line(tmp_path, monkeypatch):
    from test_distill import _cli as train_cli

    monkeypatch.chdir(tmp_path)
    code, out = train_cli(["resnet18", "--data", ".", "--out", "o", "--recalibrate", "all"])
    assert code == 2 and "--recalibrate" in out and len(out.strip().splitlines()) == 1, out
