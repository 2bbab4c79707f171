"""Writing outputs: one overwrite policy, and nothing half-written left behind.

Every file a command writes goes through :func:`atomic_path` (one file) or
:func:`staged_directory` (a file with companions, such as ONNX external data). Both check the
target first (:func:`check_output`), write into a hidden temporary next to it, and rename onto
the target only when everything succeeded. Their ``finally`` blocks remove the temporary on any
exception, including ``KeyboardInterrupt``; the commands turn SIGTERM into the same exception
(:func:`ccnn_convert.cli._common.run_app`), so ``kill`` and ``timeout`` clean up like Ctrl-C.

The policy: an existing file is replaced only with ``force=True``; a directory is never a file.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CCNNError, ParameterError

__all__ = ["atomic_path", "check_output", "check_output_dir", "save_torch", "staged_directory"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Fail early, with one line, if ``path`` cannot be written as a file (call before slow work)."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise CCNNError(f"cannot write {target}: it is a directory")
    if target.is_symlink() and not target.exists() and not force:  # a dangling link is still a name in use
        raise ParameterError("force", f"{target} is a link to a missing file (set {{param}} to replace the link)")
    if target.exists() and not force:
        raise ParameterError("force", f"{target} already exists (set {{param}} to overwrite it)")
    parent = target.parent
    if not parent.is_dir():
        raise CCNNError(f"cannot write {target}: directory {parent} does not exist")
    _check_writable(parent, target)
    return target


def _check_writable(parent: Path, target: Path) -> None:
    """Create and remove a file there: permission bits do not tell (root, /proc, read-only mounts)."""
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        raise CCNNError(f"cannot write {target}: directory {parent} is not writable "
                        f"({exc.strerror or type(exc).__name__})") from None


def check_output_dir(path: str | os.PathLike, names: list[str] | tuple[str, ...] = (), *,
                     force: bool = False, parents: bool = False) -> Path:
    """Check a folder that will receive ``names`` (created if missing; its parent must exist,
    or with ``parents`` its nearest existing ancestor must be a writable folder)."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CCNNError(f"cannot write to {folder}: it is a file, not a folder")
    parent = folder if folder.exists() else folder.parent
    while parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise CCNNError(f"cannot write to {folder}: {'directory ' + str(parent) + ' does not exist' if not parent.exists() else str(parent) + ' is a file'}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CCNNError(f"cannot write to {folder}: directory {parent} is not writable")
    if folder.is_dir():
        for name in names:
            check_output(folder / name, force=force)
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only on success.

    The temporary file lives in the target's directory so the final ``os.replace`` is atomic.
    """
    target = check_output(path, force=force)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any new file
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield ``path``'s name inside a hidden folder next to it; on success move every file the
    block wrote there into ``path``'s folder (the main file last), then remove the folder."""
    target = check_output(path, force=force)
    parent = target.parent
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging", dir=parent))
    except OSError as exc:
        raise CCNNError(f"cannot write {target}: {exc.strerror or exc}") from None
    try:
        yield folder / target.name
        files = sorted(folder.iterdir(), key=lambda p: p.name == target.name)
        for item in files:
            if item.name != target.name:
                check_output(parent / item.name, force=force)
        for item in files:
            os.replace(item, parent / item.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def save_torch(obj, handle) -> None:
    """``torch.save(obj, handle)``, where a stop (Ctrl-C, or SIGTERM raised as one) stays a stop.

    A KeyboardInterrupt raised inside torch.save makes its zip writer's clean-up fail too
    (``RuntimeError: unexpected pos``), which would hide the stop behind a second traceback:
    the interrupt is raised again instead, so the command ends in one line with its status.
    """
    import torch  # here: outputs is imported before torch by the entry points

    try:
        torch.save(obj, handle)
    except Exception as exc:
        stop = _interrupt_behind(exc)
        if stop is None:
            raise
        raise stop from None


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt that ``exc`` was raised while handling, if any."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return None
