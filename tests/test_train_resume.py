"""ccnn-train's output folder and resume: an epoch's files are one unit (real signals in a
subprocess, constructed partial folders), a resume replaces only its own run's files, and a
tampered or finished checkpoint.pt is refused in one line, before any of it is used."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from ccnn_convert.cli.train import app as train_app
from ccnn_convert.models import load_artifact
from processes import stop_when_ready
from test_train import NET, _cli, _write_images, project  # noqa: F401  (the fixture: a tiny net.py and data/)

RUN_FILES = sorted(["best.pt", "checkpoint.pt", "curves.png", "history.json", "last.pt"])


def _args(out="run", epochs=2, *extra):
    return ["net.py:make", "--data", "data", "--out", out, "--epochs", str(epochs), "--batch-size", "8",
            "--workers", "0", "--resize", "32", "--crop", "32", "--device", "cpu", "--lr", "0.05", *extra]


def _epochs_in(folder: Path) -> tuple[int, int, int]:
    """(checkpoint.pt's epoch, last.pt's epoch, history.json's epoch count): one unit agrees."""
    state = torch.load(folder / "checkpoint.pt", weights_only=True)["epoch"]
    last = load_artifact(folder / "last.pt", trust_factory=True).training["epochs"]
    history = len(json.loads((folder / "history.json").read_text())["epochs"])
    return state, last, history


# --------------------------------------------------------------------------------------------
# a real stop while an epoch is written


HOLD_RUNNER = '''
import os, sys, time
real_replace, seen = os.replace, []
name, in_out, nth, seconds = os.environ["HOLD_NAME"], os.environ["HOLD_IN_OUT"] == "1", int(os.environ["HOLD_NTH"]), float(os.environ["HOLD_SECONDS"])

def replace(src, dst):  # hold the nth rename onto `name` (in the output folder itself, or anywhere)
    if os.path.basename(dst) == name and (not in_out or os.path.basename(os.path.dirname(dst)) == "run"):
        seen.append(dst)
        if len(seen) == nth:
            print("ready", flush=True)
            end = time.monotonic() + seconds
            while time.monotonic() < end:  # in slices: a signal another thread got is handled between them
                time.sleep(0.05)
    real_replace(src, dst)

os.replace = replace
sys.argv = ["ccnn-train", *sys.argv[1:]]
from ccnn_convert.cli import entry
entry.train()
'''


def _stop_while_held(project, signum, hold: dict, epochs: int) -> tuple[int, str]:
    return stop_when_ready(HOLD_RUNNER, _args("run", epochs), project, signum, hold)


@pytest.mark.parametrize("signum,code,word", [(15, 143, "terminated"), (2, 130, "interrupted")])
def test_a_stop_while_the_first_epoch_is_written_leaves_no_partial_set(project, signum, code, word):
    """The issue's case: stopped after last.pt and best.pt of epoch 1 were written but before
    checkpoint.pt. Nothing of epoch 1 may be left, so the same command simply runs again."""
    returncode, stderr = _stop_while_held(project, signum, {"HOLD_NAME": "history.json", "HOLD_IN_OUT": "0",
                                                            "HOLD_NTH": "1", "HOLD_SECONDS": "120"}, epochs=1)
    assert returncode == code and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"error: {word}"
    assert os.listdir(project / "run") == []  # no file of the unfinished epoch, no staging folder
    exit_code, out = _cli(train_app, _args("run", 1))  # restartable as it is, without --force
    assert exit_code == 0, out
    assert sorted(os.listdir(project / "run")) == RUN_FILES


def test_a_stop_while_an_epoch_is_renamed_into_place_waits_for_the_whole_set(project):
    """SIGTERM while epoch 2's files are moved into place: the move finishes first (a whole
    epoch-2 set), then the run stops as terminated."""
    returncode, stderr = _stop_while_held(project, 15, {"HOLD_NAME": "last.pt", "HOLD_IN_OUT": "1",
                                                        "HOLD_NTH": "2", "HOLD_SECONDS": "3"}, epochs=3)
    assert returncode == 143 and "Traceback" not in stderr, stderr
    assert sorted(os.listdir(project / "run")) == RUN_FILES
    assert _epochs_in(project / "run") == (2, 2, 2)


def test_a_partial_folder_says_in_one_line_that_it_must_start_over(project):
    """best.pt, last.pt and history.json without checkpoint.pt (what a stop left before): no
    whole epoch to resume; a rerun and a resume both say so, and --force starts over."""
    code, out = _cli(train_app, _args("done", 1))
    assert code == 0, out
    (project / "run").mkdir()
    for name in ("best.pt", "last.pt", "history.json"):
        shutil.copy(project / "done" / name, project / "run" / name)
    (project / "run" / ".epoch.abc.staging").mkdir()  # what a hard kill leaves while an epoch is staged
    shutil.copy(project / "done" / "last.pt", project / "run" / ".epoch.abc.staging" / "last.pt")
    code, out = _cli(train_app, _args("run", 1))
    assert code == 2 and "Traceback" not in out
    assert "no checkpoint.pt" in out and "start over with --force" in out
    code, out = _cli(train_app, _args("run", 1, "--resume", "run/checkpoint.pt"))
    assert code == 2 and "Traceback" not in out
    assert "no checkpoint.pt" in out and "start it over" in out
    code, out = _cli(train_app, _args("run", 1, "--force"))
    assert code == 0, out
    assert sorted(os.listdir(project / "run")) == RUN_FILES  # the stale staging folder is gone too


def test_a_folder_whose_newer_files_outlived_a_stop_resumes_from_its_checkpoint(project, caplog):
    """checkpoint.pt of epoch 1 with last.pt and history.json of epoch 2 (a hard kill between
    the renames): the folder is judged by checkpoint.pt and resumes from epoch 1."""
    code, out = _cli(train_app, _args("whole", 2))
    assert code == 0, out

    _stop_after_first_epoch("run", 2)
    for name in ("last.pt", "history.json"):
        shutil.copy(project / "whole" / name, project / "run" / name)
    code, out = _cli(train_app, _args("run", 2, "--resume", "run/checkpoint.pt"))
    assert code == 0, out
    assert "resuming after epoch 1" in out and "epoch 2/2" in out
    notes = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert notes == ["run holds a partial set of files beside checkpoint.pt; resuming from its whole epoch 1, "
                     "whose files the next epoch replaces"]
    assert _epochs_in(project / "run") == (2, 2, 2)


# --------------------------------------------------------------------------------------------
# where a resume may write


def _stop_after_first_epoch(folder: str, epochs: int) -> None:
    from ccnn_convert.train import TrainConfig, train_model

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_model("net.py:make", "data", folder, config=TrainConfig(epochs=epochs, batch_size=8, lr=0.05),
                    preprocessing={"resize": 32, "crop": 32}, workers=0, device="cpu", on_epoch=stop)


def test_a_resumed_run_keeps_its_spectral_convention(project):
    """A checkpoint records its conversion's convention: resuming under another one is refused in
    one line, and one saved before the field existed is read as built (spectral: symmetric)."""
    from ccnn_convert.train import TrainConfig, train_model

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_model("net.py:make", "data", "s", config=TrainConfig(epochs=2, batch_size=8, lr=0.05), mode="spectral",
                    spectral_convention="symmetric", preprocessing={"resize": 32, "crop": 32}, workers=0,
                    device="cpu", on_epoch=stop)
    shutil.copytree(project / "s", project / "old")
    _tamper(project / "old" / "checkpoint.pt", lambda state: state["identity"]["conversion"].pop("spectral_convention"))
    for folder in ("s", "old"):
        code, out = _cli(train_app, _args(folder, 2, "--mode", "spectral", "--resume", f"{folder}/checkpoint.pt"))
        assert code == 2 and "Traceback" not in out, out
        assert "another conversion (spectral_convention): 'symmetric' there, 'published' now" in out, out
        code, out = _cli(train_app, _args(folder, 2, "--mode", "spectral", "--spectral-convention", "symmetric",
                                          "--resume", f"{folder}/checkpoint.pt"))
        assert code == 0, out
        assert load_artifact(project / folder / "last.pt", trust_factory=True).conversion.spectral_convention == \
            "symmetric"


def test_resume_does_not_replace_another_runs_files_without_force(project):
    code, output = _cli(train_app, _args("b", 2))
    assert code == 0, output
    _stop_after_first_epoch("c", 3)
    before = {name: (project / "b" / name).read_bytes() for name in RUN_FILES}
    code, out = _cli(train_app, _args("b", 3, "--resume", "c/checkpoint.pt"))
    assert code == 2 and "Traceback" not in out and "--force" in out
    assert {name: (project / "b" / name).read_bytes() for name in RUN_FILES} == before
    # into a new folder (its parents made), or back into its own: no --force needed
    code, out = _cli(train_app, _args("new/deeper", 3, "--resume", "c/checkpoint.pt"))
    assert code == 0, out
    assert sorted(os.listdir(project / "new" / "deeper")) == RUN_FILES
    code, out = _cli(train_app, _args("c", 3, "--resume", "c/checkpoint.pt"))
    assert code == 0, out
    code, out = _cli(train_app, _args("b", 3, "--resume", "c/checkpoint.pt", "--force"))
    assert code == 2 and "finished" in out  # a finished run: nothing to resume, nothing written
    assert {name: (project / "b" / name).read_bytes() for name in RUN_FILES} == before


def test_a_run_resumed_into_a_new_folder_keeps_its_best_epoch(project, monkeypatch):
    """Epoch 1 scores best (validation made to say so); resumed elsewhere for epochs 2 and 3,
    the new folder still has best.pt, and it is epoch 1's."""
    from ccnn_convert.train import loop

    real_validate = loop.Trainer.validate

    def epoch_one_best(self):
        loss, top1, top5, images, skipped = real_validate(self)
        return loss, images if self.epoch == 0 else 0.0, top5, images, skipped

    monkeypatch.setattr(loop.Trainer, "validate", epoch_one_best)
    _stop_after_first_epoch("c", 3)
    code, out = _cli(train_app, _args("elsewhere", 3, "--resume", "c/checkpoint.pt"))
    assert code == 0, out
    best = load_artifact(project / "elsewhere" / "best.pt", trust_factory=True)
    original = load_artifact(project / "c" / "best.pt", trust_factory=True)
    assert best.training["epochs"] == 1 and best.training["val_top1"] == 100.0
    for key, value in original.model.state_dict().items():
        assert torch.equal(best.model.state_dict()[key], value), key
    history = json.loads((project / "elsewhere" / "history.json").read_text())
    assert history["best"]["epoch"] == 1 and [e["epoch"] for e in history["epochs"]] == [1, 2, 3]


# --------------------------------------------------------------------------------------------
# a checkpoint.pt that must be refused


def _tamper(path: Path, change) -> None:
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def _drop_classifier_weight(state):
    key = next(k for k in state["model"] if k.endswith("weight") and state["model"][k].ndim == 2)
    del state["model"][key]


def _other_optimizer(state):
    state["optimizer"]["param_groups"] = state["optimizer"]["param_groups"][:1]


TAMPERED = {
    "epoch -1": (lambda s: s.update(epoch=-1), "invalid epoch"),
    "epoch '1'": (lambda s: s.update(epoch="1"), "invalid epoch"),
    "epoch 99": (lambda s: s.update(epoch=99), "invalid epoch"),
    "no classifier weight": (_drop_classifier_weight, "invalid model"),
    "replaced rng": (lambda s: s.update(rng={"torch": 1}), "invalid rng"),
    "rng of the wrong size": (lambda s: s["rng"][0].update(torch=torch.zeros(5, dtype=torch.uint8)), "invalid rng"),
    "another optimizer's groups": (_other_optimizer, "invalid optimizer"),
    "history a string": (lambda s: s.update(history="[]"), "invalid history"),
    "history of another length": (lambda s: s.update(history=s["history"] * 2), "invalid history"),
    "scheduler at another step": (lambda s: s["scheduler"].update(last_epoch=0), "invalid scheduler"),
    "no scaler": (lambda s: s.pop("scaler"), "damaged training checkpoint (no 'scaler')"),
    # issue 24, items 4 and 12
    "lr 1e9": (lambda s: s["optimizer"]["param_groups"][0].update(lr=1e9), "invalid optimizer"),
    "lr off the schedule": (lambda s: s["optimizer"]["param_groups"][1].update(
        lr=s["optimizer"]["param_groups"][1]["lr"] * 1.01), "group 2: lr is"),
    "another momentum": (lambda s: s["optimizer"]["param_groups"][0].update(momentum=0.5), "momentum is 0.5"),
    "a momentum buffer of another shape": (lambda s: s["optimizer"]["state"][0].update(
        momentum_buffer=torch.zeros(3)), "momentum_buffer of parameter 0 is (3,)"),
    "another base rate in the schedule": (lambda s: s["scheduler"].update(base_lrs=[1e9, 1e9]), "invalid scheduler"),
}


@pytest.fixture(scope="module")
def stopped_template(tmp_path_factory):
    """A run stopped after epoch 1 of 3, made once for the module, in a project like `project`."""
    root = tmp_path_factory.mktemp("template")
    (root / "net.py").write_text(NET)
    _write_images(root / "data", "train", per_class=8)
    _write_images(root / "data", "val", per_class=4)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        _stop_after_first_epoch("run", 3)
    finally:
        os.chdir(cwd)
    return root / "run"


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_checkpoint_is_one_line(stopped_template, monkeypatch, case):
    change, message = TAMPERED[case]
    monkeypatch.chdir(stopped_template.parent)  # the run's identity names its factory file's path
    folder = f"run-{list(TAMPERED).index(case)}"
    stopped_run = shutil.copytree(stopped_template, stopped_template.parent / folder)
    _tamper(stopped_run / "checkpoint.pt", change)
    before = {name: (stopped_run / name).read_bytes() for name in RUN_FILES}
    code, out = _cli(train_app, _args(folder, 3, "--resume", f"{folder}/checkpoint.pt"))
    assert code == 2, out
    assert "Traceback" not in out and message in out and len(out.strip().splitlines()) <= 2, out
    assert {name: (stopped_run / name).read_bytes() for name in RUN_FILES} == before


def test_a_finished_run_is_not_resumed_and_nothing_is_claimed_written(project):
    code, out = _cli(train_app, _args("run", 2))
    assert code == 0, out
    code, out = _cli(train_app, _args("elsewhere", 2, "--resume", "run/checkpoint.pt"))
    assert code == 2 and "Traceback" not in out
    assert "finished (2 of 2 epochs)" in out and "wrote" not in out
    assert not (project / "elsewhere").exists()
