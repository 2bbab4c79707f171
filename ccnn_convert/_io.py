"""Atomic file output: a crash or an error never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CCNNError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | os.PathLike, *, force: bool = True) -> Path:
    """Fail early, with one line, if ``path`` cannot be written (commands call this before slow work)."""
    target = Path(path)
    if target.exists() and not force:
        raise CCNNError(f"{target} already exists (use --force to overwrite)")
    if target.is_dir():
        raise CCNNError(f"cannot write {target}: it is a directory")
    parent = target.parent
    if not parent.is_dir():
        raise CCNNError(f"cannot write {target}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise CCNNError(f"cannot write {target}: directory {parent} is not writable")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the target's directory so the final ``os.replace`` is atomic.
    """
    target = check_writable(path, force=force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any new file
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
