"""What every command shares: one console, and turning user errors into one line + exit 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import typer
from rich.console import Console

from ..cpu_memory import use_huge_pages
from ..errors import CCNNError

# Piped output (logs, CI, tests) gets wide tables instead of 80 columns of truncated names.
_WIDTH = None if sys.stdout.isatty() else 160
console = Console(stderr=False, highlight=False, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, width=_WIDTH)

F = TypeVar("F", bound=Callable)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print a one-line error and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    return typer.Exit(code)


def user_errors(func: F) -> F:
    """Turn CCNNError (and a few OS-level errors) into one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except CCNNError as exc:
            raise fail(str(exc)) from None
        except FileNotFoundError as exc:
            raise fail(f"file not found: {exc.filename or exc}") from None
        except PermissionError as exc:
            raise fail(f"permission denied: {exc.filename or exc}") from None
        except KeyboardInterrupt:
            raise fail("interrupted", code=130) from None

    return wrapper  # type: ignore[return-value]


def run_app(app: typer.Typer, runs_models: bool = False) -> None:
    """Entry point used by the console scripts (pretty tracebacks off: errors are one line).

    Commands that run models (``runs_models``) back large CPU tensors with huge pages, before
    any tensor exists: see :mod:`ccnn_convert.cpu_memory`.
    """
    if runs_models:
        use_huge_pages()
    app(prog_name=sys.argv[0].rsplit("/", 1)[-1])
