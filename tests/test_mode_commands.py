"""Issue 17's modes on the commands: options refused where they would do nothing, mode lists
from the table of modes, and DiffStride's strides learned by ccnn-train, stored in the artifact
and used again by ccnn-eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ccnn_convert import convert
from ccnn_convert.cli.bench import app as bench_app
from ccnn_convert.cli.convert import app as convert_app
from ccnn_convert.cli.eval import app as eval_app
from ccnn_convert.cli.export import app as export_app
from ccnn_convert.cli.recalibrate import app as recalibrate_app
from ccnn_convert.cli.train import app as train_app
from ccnn_convert.core.diffstride import diffstride_layers, kept_size
from ccnn_convert.core.modes import MODES as MODE_TABLE
from ccnn_convert.models import load_artifact
from ccnn_convert.train import TrainConfig, Trainer, parameter_groups

from test_train import NET, _cli  # the same small training net and its CLI runner


# --------------------------------------------------------------------------------------------
# options that would do nothing, and --help


@pytest.mark.parametrize("app,args,flag", [
    (convert_app, ["efficientnet_lite0", "--mode", "spectral", "--smoothness", "3"], "--smoothness"),
    (convert_app, ["efficientnet_lite0", "--mode", "diffstride", "--blur-size", "5"], "--blur-size"),
    (eval_app, ["efficientnet_lite0", "--data", ".", "--modes", "original,spectral,diffstride", "--blur-size", "5"],
     "--blur-size"),
    (bench_app, ["efficientnet_lite0", "--modes", "checkered,blurpool", "--smoothness", "2"], "--smoothness"),
    (export_app, ["efficientnet_lite0", "--mode", "blurpool", "--smoothness", "2"], "--smoothness"),
    (train_app, ["efficientnet_lite0", "--data", ".", "--out", "o", "--mode", "spectral", "--stride-penalty", "0.1"],
     "--stride-penalty"),
    (train_app, ["efficientnet_lite0", "--data", ".", "--out", "o", "--mode", "checkered", "--blur-size", "3"],
     "--blur-size"),
    (convert_app, ["efficientnet_lite0", "--mode", "checkered", "--resample-at", "activation"], "--resample-at"),
    (eval_app, ["efficientnet_lite0", "--data", ".", "--modes", "original,dilated", "--resample-at", "layer"],
     "--resample-at"),
    (bench_app, ["efficientnet_lite0", "--modes", "checkered", "--resample-at", "activation"], "--resample-at"),
    (export_app, ["efficientnet_lite0", "--mode", "traditional", "--resample-at", "activation"], "--resample-at"),
    (train_app, ["efficientnet_lite0", "--data", ".", "--out", "o", "--mode", "checkered", "--resample-at",
                 "activation"], "--resample-at"),
    (convert_app, ["efficientnet_lite0", "--mode", "checkered", "--spectral-convention", "published"],
     "--spectral-convention"),
    (eval_app, ["efficientnet_lite0", "--data", ".", "--modes", "original,checkered,blurpool", "--spectral-convention",
                "symmetric"], "--spectral-convention"),
    (bench_app, ["efficientnet_lite0", "--modes", "checkered", "--spectral-convention", "published"],
     "--spectral-convention"),
    (export_app, ["efficientnet_lite0", "--mode", "checkered", "--spectral-convention", "symmetric"],
     "--spectral-convention"),
    (train_app, ["efficientnet_lite0", "--data", ".", "--out", "o", "--mode", "checkered", "--spectral-convention",
                 "published"], "--spectral-convention"),
    (recalibrate_app, ["resnet18", "--weights", "none", "--data", ".", "-o", "r.pt", "--images", "2", "--mode",
                       "checkered", "--spectral-convention", "published"], "--spectral-convention"),
])
def test_a_mode_option_without_its_mode_is_refused_in_one_line(app, args, flag, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out = _cli(app, args)
    assert code == 2, out
    assert flag in out and "Traceback" not in out and len(out.strip().splitlines()) == 1, out


@pytest.mark.parametrize("app,args,flag", [
    (convert_app, ["efficientnet_lite0", "--mode", "diffstride", "--smoothness", "0"], "--smoothness"),
    (convert_app, ["efficientnet_lite0", "--mode", "blurpool", "--blur-size", "9"], "--blur-size"),
    (convert_app, ["efficientnet_lite0", "--mode", "blurpool", "--resample-at", "norm"], "--resample-at"),
    (convert_app, ["efficientnet_lite0", "--mode", "spectral", "--spectral-convention", "mean"], "--spectral-convention"),
])
def test_a_bad_mode_option_value_is_one_line(app, args, flag):
    code, out = _cli(app, args)
    assert code == 2 and flag in out and len(out.strip().splitlines()) == 1, out


@pytest.mark.parametrize("app", [convert_app, eval_app, bench_app, export_app, train_app],
                         ids=["convert", "eval", "bench", "export", "train"])
def test_help_lists_every_mode_of_the_table(app):
    code, out = _cli(app, ["--help"])
    assert code == 0
    text = " ".join(out.replace("│", " ").split())
    for name in MODE_TABLE:
        assert name in text, f"{name} missing from --help"


def test_convert_help_says_what_each_mode_computes():
    text = " ".join(_cli(convert_app, ["--help"])[1].replace("│", " ").split())
    for mode in MODE_TABLE.values():
        assert " ".join(mode.computes.split()) in text


# --------------------------------------------------------------------------------------------
# DiffStride training


def _tiny_diffstride():
    namespace: dict = {}
    exec(NET, namespace)
    return convert(namespace["make"](), mode="diffstride", example_input=torch.zeros(1, 3, 32, 32))


def test_learned_strides_get_no_weight_decay():
    model = _tiny_diffstride()
    decay, no_decay = parameter_groups(model, 0.1)
    strides = [layer.strides for _, layer in diffstride_layers(model)]
    assert len(strides) == 3 and no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert all(any(s is p for p in no_decay["params"]) for s in strides)
    assert not any(s is p for s in strides for p in decay["params"])


def _pairs(count=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.arange(count) % 3
    images = torch.rand(count, 3, 32, 32, generator=generator)
    images[torch.arange(count), targets] *= 0.25  # a darkened channel: learnable in a few steps
    return list(zip(images, targets))


def _strides_after_training(penalty: float) -> torch.Tensor:
    model = _tiny_diffstride()
    config = TrainConfig(epochs=1, batch_size=8, lr=0.1, augment="none", label_smoothing=0.0, stride_penalty=penalty)
    Trainer(model, _pairs(), None, config, workers=0).fit()
    return torch.stack([layer.strides.detach() for _, layer in diffstride_layers(model)])


def test_the_stride_penalty_pushes_the_strides_up():
    # diffstride_cost is a sum of 1 / (S_h S_w) products: its gradient raises every stride
    free, penalised = _strides_after_training(0.0), _strides_after_training(1.0)
    assert not torch.equal(free, torch.full_like(free, 2.0))  # training alone moves them
    assert (penalised > free).all()


def _write_images(root, split, per_class, seed):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("cyan", "magenta", "yellow")):
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(80, 255, (36, 36, 3)).astype(np.uint8)
            pixels[..., c] //= 4
            Image.fromarray(pixels).save(folder / f"{i}.png")


def test_ccnn_train_learns_strides_and_ccnn_eval_uses_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(NET)
    _write_images(tmp_path / "data", "train", 8, 0)
    _write_images(tmp_path / "data", "val", 4, 1)
    code, out = _cli(train_app, ["net.py:make", "--data", "data", "--out", "run", "--mode", "diffstride",
                                 "--spectral-convention", "symmetric", "--smoothness", "2", "--stride-penalty", "0.01", "--epochs", "2", "--batch-size", "8",
                                 "--lr", "0.1", "--resize", "32", "--crop", "32", "--workers", "0", "--device", "cpu",
                                 "--augment", "none", "--label-smoothing", "0"])
    assert code == 0, out
    artifact = load_artifact(tmp_path / "run" / "last.pt", trust_factory=True)
    assert artifact.conversion.mode == "diffstride" and artifact.conversion.smoothness == 2
    assert artifact.conversion.spectral_convention == "symmetric"  # recorded: not the default
    learned = artifact.conversion_state
    assert sorted(learned) == [f"ccnn_diffstride_step{i}.strides" for i in (1, 2, 3)]
    assert all(not torch.equal(value, torch.tensor([2.0, 2.0])) for value in learned.values())

    reloaded = artifact.converted(artifact.conversion, 32)  # what ccnn-eval and ccnn-export build
    for name, layer in diffstride_layers(reloaded):
        assert torch.equal(layer.strides.detach(), learned[f"{name}.strides"]) and layer.convention == "symmetric"
        strides = learned[f"{name}.strides"].tolist()
        assert layer.output_size(16, 16) == kept_size(16, 16, strides, 2.0, "symmetric")  # the learned strides' crop
    code, out = _cli(eval_app, ["run/last.pt", "--trust-factory", "--data", "data/val", "--workers", "0",
                                "--device", "cpu", "--json", "eval.json"])
    assert code == 0, out
    top1 = {r["mode"]: r["top1"] for r in json.loads((tmp_path / "eval.json").read_text())["results"]}
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert top1["diffstride"] == pytest.approx(history["epochs"][-1]["val_top1"])  # same images, same model


def test_readme_table_of_modes_is_the_generated_one():
    from pathlib import Path

    from ccnn_convert.core.modes import modes_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = readme.index("<!-- modes table: generated")
    block = readme[readme.index("\n", start) + 1:readme.index("<!-- end of the modes table -->")]
    assert block.strip() == modes_table().strip()


def test_visualize_dense_refuses_a_mode_without_submaps(tmp_path):
    from ccnn_convert.cli.visualize import app as visualize_app

    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    code, out = _cli(visualize_app, ["features", "efficientnet_lite0", "--image", image, "--mode", "spectral", "--dense",
                                     "--out", tmp_path / "f.png"])
    assert code == 2 and "--dense" in out and "spectral" in out and len(out.strip().splitlines()) == 1, out
