"""Issue 24: what an adversarial probe found in the new modes, distillation, recalibration and
resume. One test (or one parametrized test) per item: the exit code, the single line, and the
state of the files involved (their md5 before and after)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import signal
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ccnn_convert.core.diffstride import DiffStride2d, diffstride_layers, kept_size
from ccnn_convert.models import conversion_state, load_artifact, resolve_model, save_artifact
from ccnn_convert.spec import ConversionSpec

from processes import stop_when_ready
from test_train import NET, _cli, project  # noqa: F401  (a tiny factory: conv/2 + BN, max pool 2, conv/2 + BN, 3 classes; the fixture)

LEARNED = ((3.0, 2.5), (1.5, 2.0), (2.25, 1.25))  # DiffStride's strides "learned" by a training run
SMOOTHNESS = 2.0


def _md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def _one_line(out: str) -> str:
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


def _images(folder: Path, count: int, seed: int = 0, size: int = 36) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3)).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def _save_diffstride_artifact(folder: Path, strides=LEARNED, name: str = "ds.pt") -> Path:
    """What ccnn-train --mode diffstride writes, with strides set instead of learned (fast)."""
    (folder / "net.py").write_text(NET)
    resolved = resolve_model(f"{folder / 'net.py'}:make")
    resolved.preprocessing = resolved.preprocessing.with_overrides(resize=32, crop=32)
    spec = ConversionSpec(mode="diffstride", smoothness=SMOOTHNESS, resample_at="layer")  # as _hand_statistics
    converted = resolved.converted(spec, 32)
    for (_, layer), value in zip(diffstride_layers(converted), strides):
        layer.strides.data = torch.tensor(value)
    trained = dataclasses.replace(resolved, conversion=spec, class_names=("cyan", "magenta", "yellow"),
                                  num_classes=3, conversion_state=conversion_state(converted, resolved.model),
                                  training={"epochs": 1})
    save_artifact(folder / name, trained, spec)
    return folder / name


@pytest.fixture
def diffstride_artifact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return _save_diffstride_artifact(tmp_path)


# --------------------------------------------------------------------------------------------
# item 1: ccnn-recalibrate of a trained DiffStride artifact recalibrates the learned network


def _hand_statistics(images: torch.Tensor, weights: dict, strides) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """NET with its strided layers at stride 1, each followed by DiffStride at the given strides,
    BatchNorm in train mode (batch statistics): -> (mean, unbiased var) of each BatchNorm's input."""
    pools = [DiffStride2d(s, SMOOTHNESS).eval() for s in strides]
    stats = []

    def batchnorm(x, index):
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True)
        stats.append((mean, var))
        scale = weights[f"{index}.weight"] / torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False) + 1e-5)
        return (x - mean[:, None, None]) * scale[:, None, None] + weights[f"{index}.bias"][:, None, None]

    with torch.no_grad():
        x = pools[0](F.conv2d(images, weights["0.weight"], weights["0.bias"], stride=1, padding=1))
        x = torch.relu(batchnorm(x, 1))
        x = pools[1](F.max_pool2d(x, 2, stride=1))
        x = pools[2](F.conv2d(x, weights["4.weight"], weights["4.bias"], stride=1, padding=1))
        batchnorm(x, 5)
    return stats


def test_recalibrating_a_diffstride_artifact_estimates_the_learned_networks_statistics(diffstride_artifact, tmp_path):
    from ccnn_convert.cli.recalibrate import app

    data = _images(tmp_path / "photos", 4)
    before = _md5(diffstride_artifact)
    code, out = _cli(app, [diffstride_artifact, "--trust-factory", "--data", data, "--images", 4, "--batch-size", 4,
                           "--workers", 0, "--device", "cpu", "--recalibrate", "all", "-o", tmp_path / "recal.pt"])
    assert code == 0, out
    assert _md5(diffstride_artifact) == before
    result = load_artifact(tmp_path / "recal.pt", trust_factory=True)
    assert {k: v.tolist() for k, v in result.conversion_state.items()} == {
        f"ccnn_diffstride_step{i}.strides": list(s) for i, s in enumerate(LEARNED, 1)}
    pre = result.preprocessing
    images = torch.stack([pre.transform()(Image.open(data / f"{i}.png").convert("RGB")) for i in range(4)])
    weights = load_artifact(diffstride_artifact, trust_factory=True).model.state_dict()
    saved = result.model.state_dict()
    expected = _hand_statistics(images, weights, LEARNED)
    untrained = _hand_statistics(images, weights, [(2.0, 2.0)] * 3)
    for (mean, var), (wrong_mean, _), index in zip(expected, untrained, (1, 5)):
        torch.testing.assert_close(saved[f"{index}.running_mean"], mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(saved[f"{index}.running_var"], var, rtol=1e-4, atol=1e-5)
    # the untrained network's statistics are far from them: the test tells the two apart
    assert (expected[1][0] - untrained[1][0]).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------
# item 2: ccnn-convert and ccnn-visualize features default to the artifact's own mode and strides


def test_convert_of_a_diffstride_artifact_keeps_its_mode_and_learned_strides(diffstride_artifact, tmp_path):
    from ccnn_convert.cli.convert import app

    before = _md5(diffstride_artifact)
    code, out = _cli(app, [diffstride_artifact, "--trust-factory", "--input-size", 32, "-o", tmp_path / "again.pt"])
    assert code == 0, out
    assert _md5(diffstride_artifact) == before
    again = load_artifact(tmp_path / "again.pt", trust_factory=True)
    assert again.conversion.mode == "diffstride" and again.conversion.smoothness == SMOOTHNESS
    assert {k: tuple(v.tolist()) for k, v in again.conversion_state.items()} == {
        f"ccnn_diffstride_step{i}.strides": s for i, s in enumerate(LEARNED, 1)}
    # item 9: the original's parameters are unchanged; the 6 strides are the conversion's own
    text = " ".join(out.split())
    assert "CHANGED" not in text and "(+6: the conversion's own; the original's unchanged)" in text, out


def test_visualize_features_of_a_diffstride_artifact_shows_the_learned_strides_maps(diffstride_artifact, tmp_path):
    from ccnn_convert.cli.visualize import app

    image = _images(tmp_path / "one", 1) / "0.png"
    code, out = _cli(app, ["features", diffstride_artifact, "--trust-factory", "--image", image, "--step", 1,
                           "--out", tmp_path / "f.png"])
    assert code == 0, out
    h, w = kept_size(32, 32, LEARNED[0], SMOOTHNESS)  # 16x18; the untrained 2x2 strides keep 20x20
    assert (h, w) != kept_size(32, 32, (2.0, 2.0), SMOOTHNESS)
    assert f"shown: 1 submaps of {h}x{w} entering step 2" in " ".join(out.split()), out


# --------------------------------------------------------------------------------------------
# items 5 and 13: tampered learned strides are refused in one line


def _tamper_strides(path: Path, value: float) -> None:
    obj = torch.load(path, weights_only=True)
    obj["conversion_state"]["ccnn_diffstride_step2.strides"] = torch.tensor([value, 2.0])
    torch.save(obj, path)


@pytest.mark.parametrize("value", [float("nan"), 0.0, -3.0, 0.5, float("inf")])
@pytest.mark.parametrize("command", ["convert", "convert --mode diffstride", "eval"])
def test_tampered_learned_strides_are_one_line(diffstride_artifact, tmp_path, value, command):
    from ccnn_convert.cli.convert import app as convert_app
    from ccnn_convert.cli.eval import app as eval_app

    _tamper_strides(diffstride_artifact, value)
    before = _md5(diffstride_artifact)
    if command == "eval":
        data = tmp_path / "val"
        for name in ("cyan", "magenta", "yellow"):
            _images(data / name, 1)
        code, out = _cli(eval_app, [diffstride_artifact, "--trust-factory", "--data", data, "--workers", 0,
                                    "--device", "cpu"])
    else:
        code, out = _cli(convert_app, [diffstride_artifact, "--trust-factory", "--input-size", 32,
                                       *command.split()[1:], "-o", tmp_path / "out.pt"])
    assert code == 2, out
    line = _one_line(out)
    assert "invalid learned strides ccnn_diffstride_step2.strides" in line and ">= 1" in line, line
    assert _md5(diffstride_artifact) == before and not (tmp_path / "out.pt").exists()


# --------------------------------------------------------------------------------------------
# item 9: the "strides start at the original ones" line only where it is true


def test_the_untrained_strides_note_is_left_out_for_learned_strides(diffstride_artifact, caplog):
    import logging

    resolved = load_artifact(diffstride_artifact, trust_factory=True)
    with caplog.at_level(logging.INFO, logger="ccnn_convert"):
        resolved.converted(resolved.conversion, 32)
    messages = [record.getMessage() for record in caplog.records]
    assert not any("start at the original strides" in m for m in messages), messages
    assert any("learned conversion parameters loaded" in m for m in messages), messages
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ccnn_convert"):
        resolved.converted(dataclasses.replace(resolved.conversion, keep_first=1), 32)  # not what was learned
    assert any("start at the original strides" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------
# item 11: a signal while torch.save writes an artifact or a checkpoint


SAVE_RUNNER = textwrap.dedent("""
    import sys, threading, torch.serialization
    real_writer, never = torch.serialization._open_zipfile_writer, threading.Event()

    class BlockingBuffer:  # torch.save's zip writer writes here; its third write blocks
        def __init__(self, buffer):
            self.buffer, self.writes = buffer, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 3:  # mid-file: the writer's clean-up then fails too ("unexpected pos")
                print("ready", flush=True)
                while not never.wait(0.05):  # in slices: the handler runs in the main thread between them
                    pass
            return self.buffer.write(data)

        def flush(self):
            self.buffer.flush()

    torch.serialization._open_zipfile_writer = lambda f: real_writer(BlockingBuffer(f))
    sys.argv = sys.argv[1:]
    from ccnn_convert.cli import entry
    getattr(entry, sys.argv[0])()
""")



def _stop_inside_torch_save(folder: Path, argv: list[str], signum: int) -> tuple[int, str]:
    return stop_when_ready(SAVE_RUNNER, argv, folder, signum)


SAVING = {
    "convert": (["convert", "net.py:make", "--input-size", "32", "-o", "out.pt", "--force"], signal.SIGTERM, 143),
    # ccnn-recalibrate writes through the same save_artifact as ccnn-convert
    "train": (["train", "net.py:make", "--data", "data", "--out", "run", "--epochs", "1", "--batch-size", "4",
               "--workers", "0", "--resize", "32", "--crop", "32", "--device", "cpu"], signal.SIGINT, 130),
}


@pytest.mark.parametrize("command", sorted(SAVING))
def test_a_signal_inside_torch_save_is_one_line_and_leaves_the_old_file(tmp_path, command):
    argv, signum, code = SAVING[command]
    (tmp_path / "net.py").write_text(NET)
    for name in ("cyan", "magenta", "yellow"):
        _images(tmp_path / "data" / "train" / name, 2)
        _images(tmp_path / "data" / "val" / name, 1)
    (tmp_path / "out.pt").write_bytes(b"the previous file")
    before = _md5(tmp_path / "out.pt")
    listing = _files(tmp_path)
    returncode, stderr = _stop_inside_torch_save(tmp_path, argv, signum)
    word = "terminated" if signum == signal.SIGTERM else "interrupted"
    assert returncode == code, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1] == f"error: {word}", stderr
    assert sum("error" in line for line in stderr.splitlines()) == 1, stderr
    assert _md5(tmp_path / "out.pt") == before and _files(tmp_path) == listing  # nothing partial, no temporary


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


# --------------------------------------------------------------------------------------------
# item 3: --resume CK --force into another run's folder replaces that run's best.pt


def test_a_resume_forced_into_another_runs_folder_leaves_none_of_its_best_pt(project, monkeypatch):
    import shutil

    from ccnn_convert.cli.train import app as train_app
    from ccnn_convert.train import loop
    from test_train_resume import _args, _stop_after_first_epoch

    real_validate = loop.Trainer.validate

    def epoch_one_best(self):  # the resumed epochs never beat epoch 1, so best.pt is not rewritten
        loss, top1, top5, images, skipped = real_validate(self)
        return loss, images if self.epoch == 0 else 0.0, top5, images, skipped

    code, out = _cli(train_app, _args("other", 1))  # another run, whose best.pt is its epoch 1
    assert code == 0, out
    shutil.copytree(project / "other", project / "other2")
    monkeypatch.setattr(loop.Trainer, "validate", epoch_one_best)
    _stop_after_first_epoch("c", 3)
    theirs, ours = _md5(project / "other" / "best.pt"), _md5(project / "c" / "best.pt")
    assert theirs != ours
    code, out = _cli(train_app, _args("other", 3, "--resume", "c/checkpoint.pt", "--force"))
    assert code == 0, out
    assert _md5(project / "other" / "best.pt") == ours  # the resumed run's best epoch, not the other run's
    assert "other/best.pt" in out
    # without the resumed run's best.pt, the other run's is removed, and not claimed written
    (project / "c" / "best.pt").unlink()
    code, out = _cli(train_app, _args("other2", 3, "--resume", "c/checkpoint.pt", "--force"))
    assert code == 0, out
    assert not (project / "other2" / "best.pt").exists() and "other2/best.pt" not in out
    assert load_artifact(project / "other2" / "last.pt", trust_factory=True).training["epochs"] == 3


# --------------------------------------------------------------------------------------------
# item 4: the closed-form schedule a resumed checkpoint's learning rates are checked against


@pytest.mark.parametrize("warmup", [0, 1])
def test_the_resume_check_of_learning_rates_follows_torchs_schedule(warmup):
    import warnings

    from ccnn_convert.train.recipe import TrainConfig, build_scheduler, lr_factor

    config = TrainConfig(epochs=4, lr=0.1, warmup_epochs=warmup)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = build_scheduler(optimizer, config, steps_per_epoch=5)
    for step in range(20):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * lr_factor(config, 5, step), rel=1e-9, abs=1e-15)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no optimizer step before the schedule's: not the point here
            scheduler.step()


# --------------------------------------------------------------------------------------------
# item 6: a class folder whose images sit in a subfolder is not called empty


def test_images_in_a_class_subfolder_are_not_warned_as_missing(tmp_path, caplog):
    import logging

    from ccnn_convert.data import find_samples
    from ccnn_convert.train.data import _warn_empty_classes

    _images(tmp_path / "train" / "cyan" / "deeper" / "still", 2)
    _images(tmp_path / "train" / "magenta", 2)
    (tmp_path / "train" / "yellow").mkdir()
    samples = find_samples(tmp_path / "train", imagenet_labels=False)
    assert {Path(p).relative_to(tmp_path / "train").parts[0] for p, _ in samples.items} == {"cyan", "magenta"}
    with caplog.at_level(logging.WARNING, logger="ccnn_convert"):
        _warn_empty_classes(tmp_path / "train", ["cyan", "magenta", "yellow"], samples.items)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "1 class folder(s)" in warnings[0] and "'yellow'" in warnings[0], warnings
    assert "cyan" not in warnings[0]


# --------------------------------------------------------------------------------------------
# item 7: ccnn-eval counts files as files and images as images

TINY = '''
from torch import nn

def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 1000))
'''


def test_eval_says_how_many_files_were_found_and_how_many_images_read(tmp_path, monkeypatch):
    from ccnn_convert.cli.eval import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.py").write_text(TINY)
    folder = _images(tmp_path / "data" / "n01440764", 1)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("notes")
    code, out = _cli(app, ["tiny.py:make", "--data", "data", "--modes", "original", "--workers", 0, "--crop", 32,
                           "--resize", 36, "--device", "cpu"])
    assert code == 0, out
    text = " ".join(out.split())
    assert "tiny.py:make: 1 image " in text and "all 3 files" in text, out
    assert "data: all 3 files (imagefolder): 1 image read, 2 skipped" in text, out
    assert "all 3 images" not in text and "3 images" not in text


# --------------------------------------------------------------------------------------------
# item 8: an invalid label on line 1 of a labels CSV is not taken for a header


def test_an_invalid_label_on_line_one_is_named_as_such(tmp_path, monkeypatch):
    from ccnn_convert.cli.eval import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.py").write_text(TINY)
    _images(tmp_path / "flat", 2)
    (tmp_path / "labels.csv").write_text("0.png,banana\n1.png,3\n")
    before = _md5(tmp_path / "labels.csv")
    code, out = _cli(app, ["tiny.py:make", "--data", "flat", "--labels", "labels.csv", "--modes", "original",
                           "--workers", 0, "--device", "cpu"])
    assert code == 2 and _md5(tmp_path / "labels.csv") == before
    assert _one_line(out) == "error: labels.csv line 1: label 'banana' is neither a class index nor a wnid"
    # a real header (it names no file of the folder) is still skipped
    from ccnn_convert.data import find_samples

    (tmp_path / "labels.csv").write_text("filename,label\n0.png,1\n1.png,3\n")
    assert sorted(t for _, t in find_samples(tmp_path / "flat", labels=tmp_path / "labels.csv").items) == [1, 3]


# --------------------------------------------------------------------------------------------
# items 10 and 14: options that would do nothing, and seeds out of range, are one line


def _no_norm_project(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY.replace("1000", "3"))
    for split, count in (("train", 2), ("val", 1)):
        for name in ("cyan", "magenta", "yellow"):
            _images(tmp_path / "data" / split / name, count)


@pytest.mark.parametrize("command,args,flag", [
    ("train", ["tiny.py:make", "--data", "data", "--out", "run", "--epochs", "1", "--batch-size", "2", "--workers", "0",
               "--resize", "32", "--crop", "32", "--device", "cpu", "--freeze-norm-stats"], "--freeze-norm-stats"),
    ("bench", ["tiny.py:make", "--modes", ""], "--modes"),
    ("bench", ["tiny.py:make", "--modes", ",,"], "--modes"),
    ("recalibrate", ["tiny.py:make", "--data", "data", "--images", "1", "-o", "out.pt", "--seed", "-1"], "--seed"),
    ("recalibrate", ["tiny.py:make", "--data", "data", "--images", "1", "-o", "out.pt", "--seed", str(2**64)], "--seed"),
    ("visualize", ["positions", "--seed", "-1", "--out", "p.png"], "--seed"),
    ("visualize", ["positions", "--seed", str(2**64), "--out", "p.png"], "--seed"),
])
def test_an_option_that_would_do_nothing_or_a_seed_out_of_range_is_one_line(tmp_path, monkeypatch, command, args,
                                                                             flag):
    import importlib

    monkeypatch.chdir(tmp_path)
    _no_norm_project(tmp_path)
    before = _files(tmp_path)
    app = importlib.import_module(f"ccnn_convert.cli.{command}").app
    code, out = _cli(app, args)
    assert code == 2, out
    line = _one_line(out)
    assert line.startswith("error: ") and flag in line, line
    assert _files(tmp_path) == before  # nothing written


# --------------------------------------------------------------------------------------------
# the smaller items: --help, and messages


COMMANDS = ("convert", "eval", "export", "bench", "train", "recalibrate", "visualize")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_writes_each_default_once_and_in_one_style(command):
    import importlib
    import inspect

    from typer.models import OptionInfo

    app = importlib.import_module(f"ccnn_convert.cli.{command}").app
    for registered in app.registered_commands:
        for parameter in inspect.signature(registered.callback).parameters.values():
            info = parameter.default
            if not isinstance(info, OptionInfo) or not info.help:
                continue
            assert "(default" not in info.help, (command, parameter.name, info.help)  # typer's style: [default: X]
            typer_shows_one = info.default is not None and info.show_default and not isinstance(info.default, bool)
            assert not ("[default" in info.help and typer_shows_one), (command, parameter.name, info.help)


def test_python_m_usage_names_the_command(monkeypatch, capsys):
    from ccnn_convert.cli import _common
    from ccnn_convert.cli.convert import main

    assert _common.command_name("/usr/bin/ccnn-eval") == "ccnn-eval"
    for name in ("terminate_like_interrupt", "exit_when_stopped"):  # not in the test process: pytest keeps its own
        monkeypatch.setattr(_common.signals, name, lambda: None)
    monkeypatch.setattr(sys, "argv", [str(Path(_common.__file__).parent / "convert.py"), "--help"])  # python -m's
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 0
    assert "Usage: ccnn-convert [OPTIONS]" in capsys.readouterr().out


def test_a_class_count_mismatch_without_a_teacher_does_not_blame_the_teacher_flag(project):
    from ccnn_convert.cli.train import app

    (project / "tiny.py").write_text(TINY)  # 1000 classes; the data's 3 class folders give the student a new head
    code, out = _cli(app, ["tiny.py:make", "--data", "data", "--out", "run", "--distill", "--workers", 0, "--resize", 32,
                           "--crop", 32, "--device", "cpu"])
    assert code == 2, out
    line = _one_line(out)
    assert not line.startswith("error: --teacher") and "the default teacher" in line and line.endswith("--teacher")
    assert "1000 classes and the student 3" in line and not (project / "run").exists()


def test_recalibrate_names_the_folder_it_counted(project):
    from ccnn_convert.cli.recalibrate import app

    code, out = _cli(app, ["net.py:make", "--data", "data", "--images", 99, "-o", "out.pt"])
    assert code == 2 and not (project / "out.pt").exists()
    assert _one_line(out) == f"error: --images 99 is more than the 24 images under {Path('data') / 'train'}"


def test_a_resume_message_names_the_resume_flag(project):
    from ccnn_convert.cli.train import app
    from test_train_resume import _args

    (project / "run").mkdir()
    (project / "run" / "checkpoint.pt").write_bytes(b"another run's")
    code, out = _cli(app, _args("run", 1))
    assert code == 2 and _md5(project / "run" / "checkpoint.pt") == _md5_of(b"another run's")
    line = _one_line(out)
    assert "continue it with --resume run/checkpoint.pt, or replace it with --force" in line, line


def _md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_a_factory_that_is_an_int_is_an_int(tmp_path, monkeypatch):
    from ccnn_convert.cli.convert import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.py").write_text("make = 3\n")
    code, out = _cli(app, ["f.py:make"])
    assert code == 2 and "make is an int, not callable" in _one_line(out)


def test_a_diffstride_teacher_artifact_runs_with_its_learned_strides(diffstride_artifact):
    from ccnn_convert.train.distill import DistillConfig, build_teacher

    student = load_artifact(diffstride_artifact, trust_factory=True)
    teacher = build_teacher(DistillConfig(teacher=str(diffstride_artifact)), student, trust_factory=True)
    assert [tuple(layer.strides.tolist()) for _, layer in diffstride_layers(teacher.members[0].model)] == list(LEARNED)


def test_no_command_converts_a_resolved_model_around_the_one_path():
    """Item 1: ResolvedModel.converted loads what a conversion learned; converting a resolved
    model's module directly (spec.apply(resolved.model, ...)) would drop it in silence."""
    import re

    package = Path(__file__).resolve().parents[1] / "ccnn_convert"
    pattern = re.compile(r"\.apply\(\s*[\w.]*resolved[\w.]*\.model\b|conversion\.apply\(")
    offenders = [f"{path.relative_to(package)}:{number}" for path in sorted(package.rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_tampered_learned_strides_in_a_training_checkpoint_are_one_line(project):
    from ccnn_convert.cli.train import app as train_app
    from ccnn_convert.train import TrainConfig, train_model

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_model("net.py:make", "data", "run", config=TrainConfig(epochs=2, batch_size=8, lr=0.05), mode="diffstride",
                    preprocessing={"resize": 32, "crop": 32}, workers=0, device="cpu", on_epoch=stop)
    state = torch.load(project / "run" / "checkpoint.pt", weights_only=True)
    state["model"]["ccnn_diffstride_step1.strides"] = torch.tensor([float("nan"), 2.0])
    torch.save(state, project / "run" / "checkpoint.pt")
    before = {name: _md5(project / "run" / name) for name in os.listdir(project / "run")}
    code, out = _cli(train_app, ["net.py:make", "--data", "data", "--out", "run", "--epochs", 2, "--batch-size", 8,
                                 "--lr", 0.05, "--mode", "diffstride", "--resize", 32, "--crop", 32, "--workers", 0,
                                 "--device", "cpu", "--resume", "run/checkpoint.pt"])
    assert code == 2, out
    line = _one_line(out)
    assert "invalid model" in line and "learned strides ccnn_diffstride_step1.strides = (nan, 2)" in line, line
    assert {name: _md5(project / "run" / name) for name in os.listdir(project / "run")} == before
