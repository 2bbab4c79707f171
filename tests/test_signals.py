"""Stopping a command leaves nothing behind and ends in one line (issue 9, item 3).

Each command runs in a subprocess whose final rename (``os.replace``, the last step of every
write in :mod:`ccnn_convert.outputs`) first reports "ready" and then waits: at that moment the
complete output sits in a temporary file or staging folder. The test then sends SIGTERM (what
``kill`` and ``timeout`` send) or SIGINT (Ctrl-C) and checks that the folder is as it was.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

TINY = textwrap.dedent("""
    from torch import nn

    def make():
        return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1000))
""")

RUNNER = textwrap.dedent("""
    import os, sys, time
    real_replace = os.replace

    def replace_later(src, dst):
        print("ready", flush=True)
        # A slow rename, in slices: the kernel may hand the signal to another thread (torch's
        # workers), and Python runs the handler in the main thread at its next bytecode, which
        # one long sleep would put off for its whole length.
        for _ in range(2400):
            time.sleep(0.05)
        real_replace(src, dst)

    os.replace = replace_later
    sys.argv = sys.argv[1:]
    from ccnn_convert.cli import entry
    commands = {"ccnn-convert": entry.convert, "ccnn-eval": entry.evaluate, "ccnn-export": entry.export}
    commands[sys.argv[0]]()
""")


def _images(root: Path) -> Path:
    for wnid in ("n01440764", "n01443537"):
        (root / wnid).mkdir(parents=True)
        Image.new("RGB", (40, 30), (200, 20, 20)).save(root / wnid / "a.png")
    return root


COMMANDS = {
    "convert": ["ccnn-convert", "tiny.py:make", "-o", "out.pt"],
    "export": ["ccnn-export", "tiny.py:make", "-o", "out.onnx", "--no-verify", "--input-size", "32"],
    "evaluate": ["ccnn-eval", "tiny.py:make", "--data", "images", "--modes", "original", "--workers", "0",
                 "--crop", "32", "--resize", "36", "--json", "out.json"],
}


def _start(folder: Path, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", RUNNER, *argv], cwd=folder, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_ready(process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if line.strip() == "ready":
            return
        if not line and process.poll() is not None:
            raise AssertionError(f"command ended before writing: {process.stderr.read()}")
    process.kill()
    raise AssertionError("command never reached its final rename")


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("signum, code, word", [(signal.SIGTERM, 143, "terminated"),
                                                 (signal.SIGINT, 130, "interrupted")])
def test_a_signal_while_writing_leaves_nothing(tmp_path, command, signum, code, word):
    (tmp_path / "tiny.py").write_text(TINY)
    _images(tmp_path / "images")
    before = sorted(os.listdir(tmp_path))
    process = _start(tmp_path, COMMANDS[command])
    _wait_for_ready(process)
    assert any(name.startswith(".out.") for name in os.listdir(tmp_path))  # the temporary is there
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == f"error: {word}"
    assert sorted(os.listdir(tmp_path)) == before  # no output, no hidden temporary or staging folder


@pytest.mark.parametrize("signum, code, word", [(signal.SIGINT, 130, "interrupted"),
                                                 (signal.SIGTERM, 143, "terminated")])
def test_a_signal_during_start_up_ends_in_one_line(tmp_path, signum, code, word):
    code_text = ("import sys; sys.argv = ['ccnn-convert', 'resnet18', '--weights', 'none']\n"
                 "from ccnn_convert.cli import entry\nprint('started', flush=True)\nentry.convert()")
    process = subprocess.Popen([sys.executable, "-c", code_text], cwd=tmp_path, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().strip() == "started"  # handlers are in place; torch not yet loaded
    time.sleep(0.2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines() == [f"error: {word}"]
    assert process.returncode == code


# Sends itself the signal from an atexit callback: the command is over and its file written,
# exactly "right after saved", when the interpreter is shutting down.
AT_EXIT = textwrap.dedent("""
    import atexit, os, signal, sys, time

    def stop():
        os.kill(os.getpid(), signal.{name})
        time.sleep(5)  # the handler runs here
        print("not stopped", file=sys.stderr)

    atexit.register(stop)
    sys.argv = sys.argv[1:]
    from ccnn_convert.cli import entry
    entry.convert()
""")


@pytest.mark.parametrize("signum, code, word", [(signal.SIGTERM, 143, "terminated"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_a_signal_after_the_command_while_python_exits_says_it_was_stopped(tmp_path, signum, code, word):
    (tmp_path / "tiny.py").write_text(TINY)
    done = subprocess.run([sys.executable, "-c", AT_EXIT.format(name=signum.name), "ccnn-convert", "tiny.py:make",
                           "--input-size", "32", "-o", "out.pt"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == code, (done.returncode, done.stderr)
    assert "saved" in done.stdout  # the command had finished
    assert done.stderr.strip().splitlines()[-1] == f"error: {word}", done.stderr
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
    assert "not stopped" not in done.stderr
    import torch

    assert torch.load(tmp_path / "out.pt", weights_only=True)["format"] == "ccnn-convert-artifact"  # whole
