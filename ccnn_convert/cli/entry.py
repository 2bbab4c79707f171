"""Console-script entry points: set up signals before the slow imports, then run the command.

Importing a command pulls in torch and torchvision (seconds). Ctrl-C or SIGTERM during that
time must still end with one line, not a traceback, so this module imports nothing heavy and
installs the handlers first. Commands that run models also switch on huge pages for large CPU
tensors here, before any tensor exists (:mod:`ccnn_convert.cpu_memory`).
"""

from __future__ import annotations

import importlib
import sys

from . import signals


def _start(module: str, runs_models: bool) -> None:
    signals.terminate_like_interrupt()
    try:
        if runs_models:
            from ..cpu_memory import use_huge_pages

            use_huge_pages()
        importlib.import_module(f"ccnn_convert.cli.{module}").main()
    except KeyboardInterrupt as exc:  # before the command's own handling: one line too
        sys.stderr.write(f"error: {signals.describe(exc)}\n")
        raise SystemExit(signals.exit_code(exc)) from None
    finally:
        signals.exit_when_stopped()  # the interpreter's exit comes next


def convert() -> None:
    _start("convert", runs_models=False)


def evaluate() -> None:
    _start("eval", runs_models=True)


def export() -> None:
    _start("export", runs_models=True)


def bench() -> None:
    _start("bench", runs_models=True)


def train() -> None:
    _start("train", runs_models=True)


def recalibrate() -> None:
    _start("recalibrate", runs_models=True)


def visualize() -> None:
    _start("visualize", runs_models=False)
