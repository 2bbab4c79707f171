"""What every command shares: consoles, logging, one-line errors with flag names, and signals.

The library logs through ``logging.getLogger(__name__)`` and raises
:class:`~ccnn_convert.errors.CCNNError`; only this layer knows about terminals and flags:

* :func:`setup_logging` prints the package's log records on stderr, one line each;
* :func:`user_errors` turns an error into one line and exit 2, writing a
  :class:`~ccnn_convert.errors.ParameterError` with the command's own flag for the parameter;
* :func:`run_app` makes SIGTERM behave like Ctrl-C, so ``kill`` and ``timeout`` run the same
  clean-up (:mod:`ccnn_convert.outputs`) and leave nothing half-written behind.
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import warnings
from typing import Callable, Mapping, TypeVar

import inspect

import typer
from typer.models import ArgumentInfo, OptionInfo
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from ..cpu_memory import use_huge_pages
from ..errors import CCNNError, ParameterError
from . import signals

# Piped output (logs, CI, tests) gets wide tables instead of 80 columns of truncated names.
_WIDTH = None if sys.stdout.isatty() else 160
console = Console(stderr=False, highlight=False, width=_WIDTH)
err_console = Console(stderr=True, highlight=False, width=_WIDTH)

F = TypeVar("F", bound=Callable)

EXIT_USER_ERROR = 2


# C0 and C1 controls (ESC starts CSI/OSC sequences), DEL, and the Unicode bidi overrides.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: object) -> str:
    """``text`` with every control character written as an escape (``\\x1b``): strings read from
    files (an artifact's name, class folders, ONNX metadata) must not drive the terminal."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", str(text))


def plain(text: object, style: str = "") -> Text:
    """``text`` for rich, escaped (:func:`printable`) and never read as markup."""
    return Text(printable(text), style=style)


def fail(message: str, code: int = EXIT_USER_ERROR) -> "typer.Exit":
    """Print a one-line error and return the Exit to raise."""
    err_console.print(Text.assemble(("error:", "bold red"), f" {printable(message)}"), soft_wrap=True)
    return typer.Exit(code)


# --------------------------------------------------------------------------- logging


class _ConsoleHandler(logging.Handler):
    """One line per record on stderr: notes dim, warnings in yellow."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = printable(record.getMessage())
            if record.levelno >= logging.WARNING:
                err_console.print(Text.assemble(("warning:", "yellow"), f" {message}"), soft_wrap=True)
            else:
                err_console.print(Text(message, style="dim"), soft_wrap=True)
        except Exception:  # logging must never break the command
            self.handleError(record)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err_console.print(Text.assemble(("warning:", "yellow"), f" {printable(message)}"), soft_wrap=True)


def setup_logging(level: int = logging.INFO) -> None:
    """Route the package's log records and Python warnings to stderr as single lines."""
    logger = logging.getLogger("ccnn_convert")
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    logger.setLevel(level)
    logger.propagate = False
    warnings.showwarning = _show_warning


# --------------------------------------------------------------------------- option parsing


def parse_list(text: str | None) -> list[str] | None:
    """'original, checkered' -> ['original', 'checkered'] (None stays None)."""
    if text is None:
        return None
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_floats(text: str | None, flag: str, count: int = 3) -> tuple[float, ...] | None:
    """'0.485,0.456,0.406' -> (0.485, 0.456, 0.406), or a one-line error naming ``flag``."""
    if text is None:
        return None
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise CCNNError(f"{flag} must be {count} comma-separated numbers, got {text!r}")
    return values


def percent(value: float | None, signed: bool = False) -> str:
    """A percentage for a table: two decimals, no % sign, "-" when unknown."""
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def preprocessing_overrides(resize, crop, mean, std, interpolation) -> dict:
    """The preprocessing options a command was given (--resize, --crop, --mean, --std, --interpolation)."""
    values = {"resize": resize, "crop": crop, "mean": parse_floats(mean, "--mean"),
              "std": parse_floats(std, "--std"), "interpolation": interpolation}
    return {k: v for k, v in values.items() if v is not None}


# --------------------------------------------------------------------------- modes (from the table)


def mode_names(original: bool = True) -> str:
    """'original | checkered | dilated | ...': the modes a command takes, from the table of modes."""
    from ..core.modes import MODES as TABLE

    return " | ".join((["original"] if original else []) + list(TABLE))


def modes_described() -> str:
    """One clause per mode, 'name: what it computes', from the table of modes (core/modes.py)."""
    from ..core.modes import MODES as TABLE

    return "; ".join(f"{mode.name}: {mode.computes}" for mode in TABLE.values())


def smoothness_help() -> str:
    from ..core.options import DEFAULT_SMOOTHNESS

    return (f"Mode diffstride: width R of the Fourier mask's ramp, in frequency positions "
            f"[default: {DEFAULT_SMOOTHNESS:g}]")


def phc_help() -> str:
    return ("Every mode: make each convolution whose in/groups and out channels divide by N a PHC layer, "
            "weight = sum of N Kronecker products A_i (x) F_i (about 1/N the parameters); fitted to the "
            "pretrained weight (nearest Kronecker sum, SVD), Xavier-initialised with --weights none. "
            "[default: dense; an artifact's]")


def blur_size_help() -> str:
    from ..core.options import DEFAULT_BLUR_SIZE, MAX_BLUR_SIZE

    return (f"Mode blurpool: size of the binomial blur filter, 1 to {MAX_BLUR_SIZE} "
            f"[default: {DEFAULT_BLUR_SIZE}]")


def resample_at_help() -> str:
    from ..core.options import DEFAULT_RESAMPLE_AT, RESAMPLE_AT

    return (f"Modes spectral, diffstride, blurpool: where the downsampler goes, {' | '.join(RESAMPLE_AT)}: right "
            f"after the strided layer, or after its norm and activation (antialiased-cnns' placement) "
            f"[default: {DEFAULT_RESAMPLE_AT}].")


def spectral_convention_help() -> str:
    from ..core.options import CONVENTIONS
    from ..core.spectral import MODE_CONVENTION

    return (f"Modes spectral, diffstride: the Nyquist row of an even output size, {' | '.join(CONVENTIONS)}: "
            f"input row -h/2 as the published layers keep it, or the mean of rows +h/2 and -h/2 "
            f"[default: an artifact's, else {MODE_CONVENTION}; artifacts saved without it: spectral "
            f"symmetric, diffstride published].")


# --------------------------------------------------------------------------- errors


# Library parameters whose flag is not their name in every command.
COMMON_FLAGS = {"leaf_modules": "--leaf"}


def flag_for(parameter: str, command: Callable | None = None, aliases: Mapping[str, str] | None = None) -> str:
    """The command's flag for a library parameter (``keep_first`` -> ``--keep-first``): an alias,
    else the longest flag the command declares for a parameter of that name, else a guess."""
    aliases = {**COMMON_FLAGS, **(aliases or {})}
    if parameter in aliases:
        return aliases[parameter]
    declared = inspect.signature(command).parameters.get(parameter) if command is not None else None
    info = getattr(declared, "default", None)
    if isinstance(info, OptionInfo):
        flags = [d for d in info.param_decls if d.startswith("--")]
        if flags:
            return max(flags, key=len).split("/")[0]
    if isinstance(info, ArgumentInfo):
        return parameter.upper()
    return "--" + parameter.replace("_", "-")


def _literal_help(command: Callable) -> None:
    """Escape the square brackets of the command's help texts: typer renders them as rich markup,
    where ``[default: lattice]`` reads as a style tag and vanishes."""
    for parameter in inspect.signature(command).parameters.values():
        info = parameter.default
        if isinstance(info, (OptionInfo, ArgumentInfo)) and info.help and not getattr(info, "_ccnn_escaped", False):
            info.help = escape(info.help)
            info._ccnn_escaped = True  # decorating twice must not escape twice


def user_errors(func: F | None = None, *, flags: Mapping[str, str] | None = None):
    """Turn CCNNError (and a few OS-level errors) into one line on stderr and exit code 2.

    ``flags`` maps library parameter names to this command's flags where they differ
    (``{"leaf_modules": "--leaf"}``); the others are found among the command's options.
    """

    def decorate(command: F) -> F:
        _literal_help(command)

        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            try:
                return command(*args, **kwargs)
            except ParameterError as exc:
                others = {name: flag_for(name, command, flags) for name in exc.also}
                raise fail(exc.render(flag_for(exc.parameter, command, flags), others)) from None
            except CCNNError as exc:
                raise fail(str(exc)) from None
            except FileNotFoundError as exc:
                raise fail(f"file not found: {exc.filename or exc}") from None
            except PermissionError as exc:
                raise fail(f"permission denied: {exc.filename or exc}") from None
            except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (signals.Terminated)
                raise fail(signals.describe(exc), code=signals.exit_code(exc)) from None

        return wrapper  # type: ignore[return-value]

    return decorate(func) if func is not None else decorate


def command_name(argv0: str) -> str:
    """The command's name for its usage line: ``ccnn-eval``, also under ``python -m
    ccnn_convert.cli.eval``, whose argv[0] is the module's file (``eval.py``)."""
    name = argv0.replace("\\", "/").rsplit("/", 1)[-1]
    return f"ccnn-{name[:-3]}" if name.endswith(".py") else name


def run_app(app: typer.Typer, runs_models: bool = False) -> None:
    """Run a command's typer app: one-line errors, no pretty tracebacks, logging on stderr.

    Commands that run models (``runs_models``) back large CPU tensors with huge pages; this must
    happen before any tensor exists (:mod:`ccnn_convert.cpu_memory`), as :mod:`.entry` ensures.
    """
    if runs_models:
        use_huge_pages()
    signals.terminate_like_interrupt()  # again: harmless, and covers callers that skip entry.py
    setup_logging()
    try:
        app(prog_name=command_name(sys.argv[0]))
    finally:
        signals.exit_when_stopped()  # also under python -m, which skips entry.py
