"""ccnn-train and ccnn_convert.train: DDP equals one process, resume equals an uninterrupted run,
training lowers the loss and its artifacts go through ccnn-eval and ccnn-export, the recipe,
and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from ccnn_convert.cli.eval import app as eval_app
from ccnn_convert.cli.export import app as export_app
from ccnn_convert.cli.train import app as train_app
from ccnn_convert.errors import CCNNError, ParameterError
from ccnn_convert.models import load_artifact
from ccnn_convert.train import TrainConfig, build_scheduler, parameter_groups, train_model
from ccnn_convert.train.data import GlobalBatchSampler

NET = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
'''


def _write_images(root: Path, split: str, classes=("cyan", "magenta", "yellow"), per_class=8, seed=0) -> None:
    """Colour classes: one channel darkened, the rest noise; learnable in a few steps."""
    rng = np.random.default_rng(seed + len(split))
    for c, name in enumerate(classes):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(80, 255, (36, 36, 3)).astype(np.uint8)
            pixels[..., c % 3] //= 4
            Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(NET)
    _write_images(tmp_path / "data", "train", per_class=8)
    _write_images(tmp_path / "data", "val", per_class=4)
    return tmp_path


def _options(**overrides):
    config = dict(epochs=2, batch_size=8, lr=0.05, augment="flip", shift=2, label_smoothing=0.0)
    config.update(overrides)
    return TrainConfig(**config)


def _train(project, out, config, **kwargs):
    return train_model(str(project / "net.py") + ":make", project / "data", project / out, config=config,
                       preprocessing={"resize": 32, "crop": 32}, workers=0, device="cpu", **kwargs)


# --------------------------------------------------------------------------------------------
# resume


def test_resume_continues_exactly(project):
    """2 epochs in one go == 1 epoch, a stop, a resume and 1 more (the random sampler redraws
    every forward and augmentation draws from the same generator, so the RNG must be restored)."""
    config = _options(epochs=2)
    whole = _train(project, "whole", config, sampler="random")

    def stop_after_first(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(project, "split", config, sampler="random", on_epoch=stop_after_first)
    assert sorted(os.listdir(project / "split")) == sorted(["best.pt", "checkpoint.pt", "curves.png",
                                                            "history.json", "last.pt"])
    resumed = _train(project, "split", config, sampler="random", resume=project / "split" / "checkpoint.pt")
    assert resumed.resumed_from_epoch == 1 and [r.epoch for r in resumed.history] == [1, 2]
    a = load_artifact(project / "whole" / "last.pt", trust_factory=True).model.state_dict()
    b = load_artifact(project / "split" / "last.pt", trust_factory=True).model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert whole.history[-1].train_loss == resumed.history[-1].train_loss


def test_resume_refuses_another_model_or_conversion(project):
    _train(project, "run", _options(epochs=1))
    state = project / "run" / "checkpoint.pt"
    with pytest.raises(CCNNError, match=r"another conversion \(sampler\): .lattice. there, .naive. now"):
        _train(project, "other", _options(epochs=1), sampler="naive", resume=state)
    with pytest.raises(CCNNError, match=r"another recipe \(lr\): 0.05 there, 0.2 now"):
        _train(project, "other", _options(epochs=1, lr=0.2), resume=state)
    with pytest.raises(CCNNError, match="not a ccnn-train checkpoint"):
        _train(project, "other", _options(epochs=1), resume=project / "run" / "last.pt")


# --------------------------------------------------------------------------------------------
# DDP


DDP_WORKER = '''
import sys, torch
from torch import nn
from torch.utils.data import TensorDataset
from ccnn_convert import convert
from ccnn_convert.runtime import distributed_from_env
from ccnn_convert.train import Trainer, TrainConfig

torch.manual_seed(0)
net = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2, 2),
                    nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                    nn.Flatten(), nn.Linear(8, 4))
images = torch.randn(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))
labels = torch.arange(24) % 4
before = {k: v.clone() for k, v in net.state_dict().items()}
model = convert(net, mode="checkered", sampler="lattice", example_input=images[:1])
config = TrainConfig(epochs=1, batch_size=8, lr=0.1, augment="none", label_smoothing=0.0)
with distributed_from_env("cpu") as ctx:
    if ctx.active:  # and recompute blocks in backward: still the same steps
        config = TrainConfig(**{**config.__dict__, "checkpointing": True})
    trainer = Trainer(model, TensorDataset(images, labels), None, config, device="cpu", ctx=ctx)
    assert len(trainer.batches) == 3 and trainer.batches.world_size == ctx.world_size
    trainer.fit()
    trainer.close()  # the DDP wrapper lets go of the process group before it is destroyed
    if ctx.is_main:
        torch.save({"before": before, "after": net.state_dict()}, sys.argv[1])
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_take_the_same_steps_as_one(tmp_path):
    """One process with batch 8 against two with 4 each (and block checkpointing), after 3 steps."""
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    single = subprocess.run([sys.executable, str(script), str(tmp_path / "one.pt")], env=base,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "two.pt")],
                              env={**base, "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    errors = []
    try:
        for proc in procs:  # generous: two processes and their gloo threads share a loaded machine
            errors.append(proc.communicate(timeout=600)[1])
    finally:
        for proc in procs:  # never leave a child behind, whatever happened
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, err in zip(procs, errors):
        assert proc.returncode == 0 and "terminate called" not in err, err
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for key in one["after"]:
        assert not torch.equal(one["after"][key], one["before"][key]), f"{key} did not train"
        torch.testing.assert_close(two["after"][key], one["after"][key], rtol=0, atol=1e-5, msg=key)


def test_global_batches_are_split_over_processes_without_overlap():
    whole = list(GlobalBatchSampler(20, 8, seed=3))
    parts = [list(GlobalBatchSampler(20, 8, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(whole) == 2  # the incomplete third batch is dropped
    for step, batch in enumerate(whole):
        assert sorted(parts[0][step] + parts[1][step]) == sorted(batch)
    with pytest.raises(ParameterError, match="divide evenly"):
        GlobalBatchSampler(20, 7, world_size=2)
    with pytest.raises(ParameterError, match="larger than the 5 training images"):
        GlobalBatchSampler(5, 8)


# --------------------------------------------------------------------------------------------
# the recipe


def test_no_weight_decay_on_norm_parameters_and_biases():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = parameter_groups(net, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(net[0].weight), id(net[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(net[0].bias), id(net[1].weight), id(net[1].bias),
                                                   id(net[3].bias)}


def test_schedule_is_linear_warmup_then_cosine_by_hand():
    param = nn.Parameter(torch.zeros(1))
    config = TrainConfig(epochs=4, lr=0.1, warmup_epochs=1)
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=5)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    warmup = [0.1 * (0.01 + 0.99 * step / 5) for step in range(5)]
    cosine = [0.1 * (1 + math.cos(math.pi * step / 15)) / 2 for step in range(15)]
    assert rates == pytest.approx(warmup + cosine, rel=1e-6)


def test_options_that_would_do_nothing_are_errors():
    with pytest.raises(ParameterError, match="momentum"):
        TrainConfig(optimizer="adamw", momentum=0.9)
    with pytest.raises(ParameterError, match="warmup_epochs"):
        TrainConfig(epochs=2, warmup_epochs=2)
    with pytest.raises(ParameterError, match="sync_bn"):
        from ccnn_convert.train import Trainer
        Trainer(nn.Linear(2, 2), torch.utils.data.TensorDataset(torch.zeros(4, 2), torch.zeros(4).long()), None,
                TrainConfig(batch_size=2, sync_bn=True))


# --------------------------------------------------------------------------------------------
# end to end, through the commands


def _cli(app, args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_training_lowers_the_loss_and_its_artifact_goes_through_eval_and_export(project):
    code, out = _cli(train_app, ["net.py:make", "--data", "data", "--out", "run", "--epochs", "4", "--batch-size", "8",
                                 "--lr", "0.05", "--resize", "32", "--crop", "32", "--workers", "0", "--device", "cpu",
                                 "--augment", "flip", "--label-smoothing", "0"])
    assert code == 0, out
    assert "epoch 4/4: train loss" in out and "val loss" in out
    history = json.loads((project / "run" / "history.json").read_text())
    losses = [e["train_loss"] for e in history["epochs"]]
    assert losses[-1] < losses[0]
    assert (project / "run" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    artifact = load_artifact(project / "run" / "last.pt", trust_factory=True)
    assert artifact.class_names == ("cyan", "magenta", "yellow") and artifact.num_classes == 3
    assert artifact.conversion.mode == "checkered" and artifact.training["epochs"] == 4
    code, out = _cli(eval_app, ["run/last.pt", "--trust-factory", "--data", "data/val", "--workers", "0",
                                "--device", "cpu", "--json", "eval.json"])
    assert code == 0, out
    report = json.loads((project / "eval.json").read_text())
    top1 = {r["mode"]: r["top1"] for r in report["results"]}
    assert top1["checkered"] == pytest.approx(history["epochs"][-1]["val_top1"])  # the same images, the same model
    code, out = _cli(export_app, ["run/last.pt", "--trust-factory", "-o", "model.onnx"])
    assert code == 0, out
    assert (project / "model.onnx").stat().st_size > 0


def test_amp_on_cpu_trains_in_bfloat16(project):
    result = _train(project, "amp", _options(epochs=1, amp=True))
    assert math.isfinite(result.history[0].train_loss)


# --------------------------------------------------------------------------------------------
# bad input: one line, exit 2


@pytest.mark.parametrize("breakage,message", [
    ("no_val", "no val/ folder"),
    ("other_classes", "different classes (only in train/: yellow; only in val/: zebra)"),
])
def test_bad_data_is_one_line(project, breakage, message):
    import shutil

    if breakage == "no_val":
        shutil.rmtree(project / "data" / "val")
    else:
        (project / "data" / "val" / "yellow").rename(project / "data" / "val" / "zebra")
    code, out = _cli(train_app, ["net.py:make", "--data", "data", "--out", "run", "--workers", "0"])
    assert code == 2
    assert message in out and "Traceback" not in out
    assert not (project / "run").exists()


def test_existing_outputs_need_force(project):
    (project / "run").mkdir()
    (project / "run" / "last.pt").write_text("an earlier run")
    code, out = _cli(train_app, ["net.py:make", "--data", "data", "--out", "run", "--workers", "0"])
    assert code == 2 and "--force" in out
    assert (project / "run" / "last.pt").read_text() == "an earlier run"


def test_a_batch_that_does_not_fit_names_the_flags(project, monkeypatch):
    from ccnn_convert.train import loop

    def out_of_memory(self, images, targets):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(loop.Trainer, "_step", out_of_memory)
    code, out = _cli(train_app, ["net.py:make", "--data", "data", "--out", "run", "--workers", "0",
                                 "--batch-size", "8", "--resize", "32", "--crop", "32"])
    assert code == 2 and "Traceback" not in out
    assert "8 images per process does not fit in memory: lower --batch-size" in out and "--checkpointing" in out


def test_num_classes_must_match_the_class_folders(project):
    with pytest.raises(ParameterError, match="num_classes is 5 but the data has 3 class folders"):
        _train(project, "run", _options(epochs=1), num_classes=5)


def test_an_unreadable_image_is_skipped_and_counted(project):
    (project / "data" / "train" / "cyan" / "broken.png").write_bytes(b"not a png")
    # One global batch of all 25 files, so the broken one is surely drawn.
    code, out = _cli(train_app, ["net.py:make", "--data", "data", "--out", "run", "--epochs", "1", "--batch-size", "25",
                                 "--resize", "32", "--crop", "32", "--workers", "0", "--device", "cpu"])
    assert code == 0, out
    assert "1 unreadable file(s) skipped" in out
