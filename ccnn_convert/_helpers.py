"""Small helpers that several stages need; one copy of each (private to the package)."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from typing import Any, Iterator

__all__: list[str] = []  # private module


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if it has none), cut at ``limit``."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def a_type(value: Any) -> str:
    """'an int', 'a str': the type of ``value`` with its article."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def package_version() -> str:
    """ccnn-convert's version, also when running from a checkout that is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("ccnn-convert")
    except PackageNotFoundError:
        from . import __version__
        return __version__


def logits_of(output: Any) -> Any:
    """The class scores of a model's output: the first element of a (logits, aux, ...) tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


def counted(number: int, noun: str) -> str:
    """``"1 image"``, ``"3 images"``: a count and its noun, plural but for one."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def format_bytes(value: int | None) -> str:
    if not value:
        return "-"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def format_flops(value: int | None) -> str:
    if value is None:
        return "-"
    if value >= 1e12:
        return f"{value / 1e12:.2f} T"
    if value >= 1e9:
        return f"{value / 1e9:.2f} G"
    return f"{value / 1e6:.1f} M"


@contextlib.contextmanager
def captured_fds() -> Iterator[io.StringIO]:
    """Capture what C/C++ code writes to file descriptors 1 and 2 (ONNX Runtime, the profiler).

    Python-level writes to sys.stdout/sys.stderr are captured too. The text is available in the
    yielded buffer once the block ends; callers that only want silence ignore it.
    """
    out = io.StringIO()
    saved: list[tuple[int, int]] = []
    tmp = tempfile.TemporaryFile(mode="w+b")
    try:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
            except OSError:  # no such descriptor (a daemon, some test runners)
                continue
        for fd, _ in saved:
            os.dup2(tmp.fileno(), fd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield out
    finally:
        for fd, copy_fd in saved:
            os.dup2(copy_fd, fd)
            os.close(copy_fd)
        tmp.seek(0)
        out.write(tmp.read().decode("utf-8", "replace"))
        tmp.close()
