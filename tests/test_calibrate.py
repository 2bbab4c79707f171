"""BatchNorm recalibration (issue 18): running statistics equal a hand computation over the same
images (mean and unbiased variance over batch, submaps and positions, averaged over batches:
torch's cumulative rule, momentum=None), no parameter changes, and ccnn-recalibrate writes an
artifact or fails in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from typer.testing import CliRunner

from ccnn_convert import convert
from ccnn_convert.cli.recalibrate import app as recalibrate_app
from ccnn_convert.data import decode_rgb
from ccnn_convert.models import load_artifact
from ccnn_convert.models.preprocessing import imagenet_preprocessing
from ccnn_convert.train.calibrate import converted_batchnorm_layers, recalibrate_batchnorm


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    with torch.no_grad():  # statistics and affines far from the ones recalibration finds
        for bn in (net[1], net[4]):
            bn.running_mean.fill_(3.0)
            bn.running_var.fill_(7.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net


def _batches(count=2, size=16):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(4, 3, size, size, generator=g) * (1 + i) + i for i in range(count)]


def _stats(y):
    return y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=True)


def _normalise_with_batch_stats(y, bn):
    mean, var = y.mean(dim=(0, 2, 3)), y.var(dim=(0, 2, 3), unbiased=False)
    shape = (1, -1, 1, 1)
    return (y - mean.view(shape)) / torch.sqrt(var.view(shape) + bn.eps) * bn.weight.view(shape) + bn.bias.view(shape)


def _hand_dilated_statistics(net, batches):
    """The dilated network written by hand: both convolutions at stride 1, the second dilated by 2;
    in train mode the first BatchNorm normalises with its batch's statistics."""
    per_batch = []
    with torch.no_grad():
        for x in batches:
            y1 = F.conv2d(x, net[0].weight, net[0].bias, stride=1, padding=1)
            h = F.relu(_normalise_with_batch_stats(y1, net[1]))
            y2 = F.conv2d(h, net[3].weight, net[3].bias, stride=1, padding=2, dilation=2)
            per_batch.append((_stats(y1), _stats(y2)))
    return [tuple(torch.stack([b[layer][k] for b in per_batch]).mean(0) for k in range(2)) for layer in range(2)]


@pytest.mark.parametrize("dilation", ["native", "multisample"])
def test_recalibrated_statistics_equal_a_hand_computation_dilated(dilation):
    net = _net()
    params = {k: v.clone() for k, v in net.named_parameters()}
    converted = convert(net, mode="dilated", dilation=dilation, example_input=torch.zeros(1, 3, 16, 16))
    batches = _batches()
    assert recalibrate_batchnorm(converted, batches) == 8
    expected = _hand_dilated_statistics(net, batches)
    for bn, (mean, var) in zip((net[1], net[4]), expected):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-5)
        assert bn.momentum == 0.1 and int(bn.num_batches_tracked) == 2
    for name, param in net.named_parameters():  # no gradient, no change
        assert torch.equal(param, params[name]) and param.grad is None
    assert not converted.training and not any(m.training for m in converted.modules())


def test_only_the_layers_after_the_first_converted_step_when_asked():
    """keep_first=1: the first BatchNorm sees what it always saw and keeps its statistics; the
    second, after the converted step (stride removed: a stride-1 conv), gets them by hand, with the
    first one normalising by its running statistics (eval mode)."""
    net = _net()
    first = (net[1].running_mean.clone(), net[1].running_var.clone())
    converted = convert(net, mode="dilated", keep_first=1, example_input=torch.zeros(1, 3, 16, 16))
    chosen = converted_batchnorm_layers(net, converted, torch.zeros(1, 3, 16, 16))
    assert chosen == [converted.get_submodule("4")]
    x = _batches(count=1)[0]
    recalibrate_batchnorm(converted, [x], layers=chosen)
    assert torch.equal(net[1].running_mean, first[0]) and torch.equal(net[1].running_var, first[1])
    with torch.no_grad():
        y1 = F.conv2d(x, net[0].weight, net[0].bias, stride=2, padding=1)
        h = F.relu(F.batch_norm(y1, first[0], first[1], net[1].weight, net[1].bias, False, 0.0, net[1].eps))
        y2 = F.conv2d(h, net[3].weight, net[3].bias, stride=1, padding=1)
    mean, var = _stats(y2)
    torch.testing.assert_close(net[4].running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(net[4].running_var, var, rtol=1e-5, atol=1e-5)


def test_recalibrated_statistics_are_those_of_the_checkered_samples():
    """Checkered, one step: the first BatchNorm sees the stride-1 convolution at the positions of
    one diagonal of every 2x2 window (two submaps), not all of them and not the other diagonal."""
    net = _net()
    converted = convert(net, mode="checkered", example_input=torch.zeros(1, 3, 16, 16))
    x = _batches(count=1)[0]
    recalibrate_batchnorm(converted, [x])
    with torch.no_grad():
        y = F.conv2d(x, net[0].weight, net[0].bias, stride=1, padding=1)
    candidates = {name: torch.cat([y[:, :, dy::2, dx::2] for dy, dx in offsets])
                  for name, offsets in (("main diagonal", ((0, 0), (1, 1))), ("anti-diagonal", ((0, 1), (1, 0))),
                                        ("every position", ((0, 0), (0, 1), (1, 0), (1, 1))))}
    matches = [name for name, samples in candidates.items()
               if all(torch.allclose(a, b, rtol=1e-5, atol=1e-5)
                      for a, b in zip(_stats(samples), (net[1].running_mean, net[1].running_var)))]
    assert len(matches) == 1 and matches[0] != "every position", matches


# --------------------------------------------------------------------------------------------
# ccnn-recalibrate


NET = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
'''


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(NET)
    for i in range(6):
        path = tmp_path / "photos" / ("nested" if i % 2 else "") / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 20, 3)).astype(np.uint8)).save(path)
    (tmp_path / "photos" / "notes.txt").write_text("not an image")
    return tmp_path


def _cli(*args):
    result = CliRunner().invoke(recalibrate_app, [str(a) for a in args])
    return result.exit_code, result.output


COMMON = ("--resize", "16", "--crop", "16", "--workers", "0", "--device", "cpu", "--trust-factory")


def test_the_command_writes_an_artifact_with_the_recalibrated_statistics(project):
    code, out = _cli("net.py:make", "--data", "photos", "-o", "rec.pt", "--images", "6", "--mode", "dilated",
                     "--batch-size", "6", "--recalibrate", "all", *COMMON)
    assert code == 0, out
    artifact = load_artifact(project / "rec.pt", trust_factory=True)
    assert artifact.conversion.mode == "dilated"
    assert artifact.training["images"] == 6 and artifact.training["method"] == "batchnorm recalibration"
    transform = imagenet_preprocessing().with_overrides(resize=16, crop=16).transform()
    files = sorted((project / "photos").rglob("*.png"))
    x = torch.stack([transform(decode_rgb(p)) for p in files])  # one batch: the six images' statistics
    mean, var = _hand_dilated_statistics(artifact.model, [x])[0]
    torch.testing.assert_close(artifact.model[1].running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(artifact.model[1].running_var, var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case,message", [
    ("too many", "--images 7 is more than the 6 images under photos"),
    ("empty", "no image files under"),
    ("exists", "rec.pt already exists (set --force to overwrite it)"),
])
def test_bad_input_is_one_line(project, case, message):
    data = "photos"
    if case == "empty":
        (project / "empty").mkdir()
        data = "empty"
    if case == "exists":
        (project / "rec.pt").write_text("an earlier file")
    code, out = _cli("net.py:make", "--data", data, "-o", "rec.pt", "--images", "7" if case == "too many" else "3",
                     *COMMON)
    assert code == 2, out
    assert message in out and "Traceback" not in out and len(out.strip().splitlines()) == 1
    assert case == "exists" or not (project / "rec.pt").exists()
