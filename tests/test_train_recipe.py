"""ccnn-train's recipe against independent expectations: --seed makes a run bit-identical, the
loss is label-smoothed cross-entropy by the hand formula, the random sampler draws one table
per step shared by the layers of a step, and small messages (empty classes, squeezenet)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import TensorDataset

from ccnn_convert import convert
from ccnn_convert.cli.train import app as train_app
from ccnn_convert.train import TrainConfig, Trainer
from test_train import _cli, project  # noqa: F401  (the fixture: a tiny net.py and data/)

UNSEEDED_NET = '''
from torch import nn

def make():  # draws its initial weights from torch's global generator, and has 5 outputs
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
'''


def _short_run(out, model, *extra):
    return ["--data", "data", "--out", out, "--epochs", "1", "--batch-size", "8", "--workers", "0",
            "--resize", "36", "--crop", "32", "--device", "cpu", "--seed", "7", *extra, model]


@pytest.mark.parametrize("model,extra", [
    ("shufflenet_v2_x0_5", ["--weights", "none", "--mode", "traditional"]),  # torchvision's init, a new head
    ("unseeded.py:make", ["--sampler", "random"]),  # a factory's init, a new head, the random sampler
])
def test_the_same_seed_gives_a_bit_identical_last_pt(project, model, extra):
    (project / "unseeded.py").write_text(UNSEEDED_NET)
    torch.manual_seed(1)  # whatever state the global generator is in before each run
    code, out = _cli(train_app, _short_run("a", model, *extra))
    assert code == 0, out
    torch.manual_seed(2)
    code, out = _cli(train_app, _short_run("b", model, *extra))
    assert code == 0, out
    assert (project / "a" / "last.pt").read_bytes() == (project / "b" / "last.pt").read_bytes()
    if model.endswith(":make"):  # and another seed, other weights (the last --seed given wins)
        code, out = _cli(train_app, _short_run("c", model, *extra, "--seed", "8"))
        assert code == 0, out
        assert (project / "c" / "last.pt").read_bytes() != (project / "a" / "last.pt").read_bytes()


def test_first_step_loss_is_label_smoothed_cross_entropy_by_hand():
    """Smoothing e: mean over images of (1 - e) * -log p_y + e * mean_k(-log p_k)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 4, 4, generator=generator)
    labels = torch.arange(12) % 5
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    with torch.no_grad():
        log_p = torch.log_softmax(model(images).double(), dim=1)
    e = 0.2
    expected = ((1 - e) * -log_p[torch.arange(12), labels] + e * (-log_p).mean(dim=1)).mean()
    losses = []
    config = TrainConfig(epochs=1, batch_size=12, lr=0.1, label_smoothing=e, augment="none")
    Trainer(model, TensorDataset(images, labels), None, config, on_step=lambda step: losses.append(step.loss)).fit()
    assert losses[0] == pytest.approx(float(expected), rel=1e-5)
    assert losses[0] != pytest.approx(float(-log_p[torch.arange(12), labels].mean()), rel=1e-3)  # e matters here


def test_the_layers_of_one_training_step_share_one_random_table():
    """A residual block's conv1 and its downsample subsample the same input: one table per step,
    drawn anew every step."""
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    model = convert(net, mode="checkered", sampler="random", example_input=torch.zeros(1, 3, 64, 64))
    modules = dict(model.named_modules())
    tables: dict[str, torch.Tensor] = {}
    for name in ("layer2.0.conv1", "layer2.0.downsample.0"):
        modules[name].register_forward_pre_hook(lambda module, args, name=name: tables.__setitem__(name, args[1].clone()))
    model.train()
    drawn = []
    with torch.no_grad():
        for _ in range(4):
            tables.clear()
            model(torch.randn(1, 3, 64, 64))
            assert set(tables) == {"layer2.0.conv1", "layer2.0.downsample.0"}
            assert torch.equal(tables["layer2.0.conv1"], tables["layer2.0.downsample.0"])
            drawn.append(tables["layer2.0.conv1"])
    assert any(not torch.equal(drawn[0], table) for table in drawn[1:])  # random: redrawn per step


def test_an_empty_training_class_is_warned_about(project, caplog):
    for image in (project / "data" / "train" / "magenta").iterdir():
        image.unlink()
    code, out = _cli(train_app, _short_run("run", "net.py:make"))
    assert code == 0, out
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == ["1 class folder(s) of data/train hold no file and are never trained: 'magenta'"]


def test_squeezenet_on_its_own_classes_does_not_blame_a_flag_that_was_not_given(project):
    code, out = _cli(train_app, _short_run("run", "squeezenet1_0", "--weights", "none"))
    assert code == 2 and "Traceback" not in out
    assert "--num-classes" not in out and "no nn.Linear classifier" in out and "3 classes" in out


@pytest.mark.parametrize("seed", ["-1", "4294967296", "1208925819614629174706176"])
def test_a_seed_out_of_range_is_one_line_before_any_work(project, seed):
    code, out = _cli(train_app, _short_run("run", "net.py:make", "--seed", seed))
    assert code == 2 and "Traceback" not in out
    assert out.strip() == f"error: --seed must be an integer from 0 to 2**32 - 1, got {seed}"
    assert not (project / "run").exists()
