"""User code as MODEL: ``path/to/file.py:make`` or ``package.module:make``.

The callable is called with no arguments and must return an ``nn.Module``. This is the only
place where ccnn-convert imports code that is not a library, so the rules are strict:

* a factory named on the command line (or passed to :func:`resolve_model`) is the user's own
  choice and runs as named: a file is imported by its path, with its own folder (only) on
  ``sys.path`` while it loads and builds, so that it can import its neighbours; a module is
  imported from ``sys.path`` without the working directory: ``python -m`` and ``torchrun -m``
  put the working directory (or ``''``) first on ``sys.path``, and a file there named like the
  module must not win;
* a factory named inside an artifact is only information. Rebuilding it runs code, so it needs
  the user's consent in this run (``trust_factory=True``; a command flag in the CLI), and even then
  only an absolute ``.py`` path stored at save time, or a module importable as installed, runs,
  and only while its file has the SHA-256 recorded at save time.

The file that runs is logged by its resolved absolute path (symlinks followed), not by the name
stored in the artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from .._helpers import a_type, first_line
from ..errors import ModelResolutionError
from .checkpoints import _is_default, _is_weights_path, _no_weights, extract_state_dict, load_checked, safe_load
from .preprocessing import imagenet_preprocessing
from ..errors import ModelParameterError
from .record import ResolvedModel, count_classes

__all__ = ["build_trusted_factory", "parse_factory", "resolve_factory"]

log = logging.getLogger(__name__)

_IDENT = r"[A-Za-z_]\w*"
_FACTORY = re.compile(rf"^(?P<target>.+):(?P<attr>{_IDENT}(?:\.{_IDENT})*)$")
_DOTTED = re.compile(rf"^{_IDENT}(?:\.{_IDENT})*$")


def parse_factory(text: str) -> tuple[str, str] | None:
    """``(target, attr)`` for ``file.py:attr`` or ``pkg.mod:attr``; None for anything else."""
    match = _FACTORY.match(text)
    if match is None:
        return None
    target = match["target"]
    if target.endswith(".py") or _DOTTED.match(target):
        return target, match["attr"]
    return None


def resolve_factory(text: str, weights: str | None) -> ResolvedModel:
    """A factory the user named in this run, with optional ``weights=PATH``."""
    target, attr = parse_factory(text)  # type: ignore[misc]
    stored = str(Path(target).expanduser().resolve()) if target.endswith(".py") else target
    model, digest = _call(stored, attr, shown=text)
    description = "as built by the factory"
    if _is_weights_path(weights):
        path = Path(str(weights)).expanduser()
        load_checked(model, extract_state_dict(safe_load(path), path), f"checkpoint {path}")
        description = str(path)
    elif not (_is_default(weights) or _no_weights(weights)):
        raise ModelParameterError(
            "weights", f"with a factory MODEL, {{param}} must be a checkpoint file, not {weights!r}")
    name = f"{Path(target).name}:{attr}" if target.endswith(".py") else text
    # The absolute path is stored, so a later reload never depends on the working directory; the
    # file's digest, so that a reload refuses a file changed since.
    spec = {"source": "factory", "factory": f"{stored}:{attr}"}
    if digest is not None:
        spec["sha256"] = digest
    return ResolvedModel(model.eval(), name, imagenet_preprocessing(), spec, description,
                         num_classes=count_classes(model))


def build_trusted_factory(factory: Any, where: str, trust_factory: bool, sha256: str | None = None) -> nn.Module:
    """Rebuild the architecture of an artifact made by ``factory`` (its stored name), only with
    consent, only from an absolute file path or an installed module, and only while that file
    has the ``sha256`` recorded at save time (artifacts from before digests have none)."""
    parsed = parse_factory(factory) if isinstance(factory, str) else None
    if parsed is None:
        raise ModelResolutionError(f"{where}: invalid factory {factory!r} in artifact")
    if sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", str(sha256)):
        raise ModelResolutionError(f"{where}: invalid factory sha256 {sha256!r} in artifact")
    target, attr = parsed
    if target.endswith(".py") and not Path(target).is_absolute():
        # A relative path would pick whatever file of that name sits in the working directory.
        raise ModelResolutionError(
            f"{where} names factory file {target!r} by a relative path; only an absolute path "
            "is loaded (rebuild the artifact from its source)")
    if not trust_factory:
        runs = Path(target).resolve() if target.endswith(".py") else _locate(target)
        raise ModelParameterError("trust_factory", f"{where} was built by factory {factory!r}, which runs "
                                  f"{_describe(runs)}; loading it runs that code: pass {{param}} if you trust it")
    return _call(target, attr, shown=factory, expected=sha256, where=where)[0]


def _call(target: str, attr: str, shown: str, expected: str | None = None,
          where: str = "") -> tuple[nn.Module, str | None]:
    """Import ``target``, check its file against ``expected``, call ``attr``: (model, file digest)."""
    is_file = target.endswith(".py")
    origin = Path(target).resolve() if is_file else _locate(target)
    if is_file and not origin.is_file():
        raise ModelResolutionError(f"factory file not found: {target}")
    source = origin.read_bytes() if origin is not None else None
    digest = None if source is None else hashlib.sha256(source).hexdigest()
    if expected is not None and digest != expected:
        state = "has no file" if origin is None else f"is {origin}, which"
        raise ModelResolutionError(f"{where}: the factory {shown!r} {state} changed since the artifact was "
                                   "saved (its SHA-256 differs); refusing to run it, even with consent")
    if origin is None and not is_file and target not in sys.modules and target not in sys.builtin_module_names:
        raise ModelResolutionError(f"cannot import module {target!r}: not found on sys.path (the working "
                                   "directory is not searched; name a file instead: path/to/file.py:make)")
    log.info("running factory %s from %s", attr, _describe(origin))
    folder = origin.parent if is_file else None
    with _import_path(folder):
        factory: Any = _import_file(origin, source) if is_file else _import_module(target, origin)
        for part in attr.split("."):
            if not hasattr(factory, part):
                raise ModelResolutionError(f"{target} has no attribute {attr!r}")
            factory = getattr(factory, part)
        if not callable(factory):
            raise ModelResolutionError(f"{shown}: {attr} is {a_type(factory)}, not callable")
        try:
            model = factory()
        except SystemExit as exc:  # not an Exception: uncaught, it would end the command with its status
            raise ModelResolutionError(f"factory {shown} {_exited(exc)} instead of returning a model") from None
        except Exception as exc:
            raise ModelResolutionError(f"factory {shown} raised {type(exc).__name__}: {first_line(exc, 200)}") from None
    if not isinstance(model, nn.Module):
        raise ModelResolutionError(f"factory {shown} returned {type(model).__name__}, not a torch.nn.Module")
    return model, digest


def _exited(exc: SystemExit) -> str:
    return f"called exit({exc.code!r})"


def _describe(origin: Path | None) -> str:
    return str(origin) if origin is not None else "no file (a built-in module, or one not found outside the working directory)"


def _is_working_directory(entry: str) -> bool:
    if entry in ("", "."):
        return True
    try:
        return Path(entry).resolve() == Path.cwd().resolve()
    except (OSError, RuntimeError):
        return False


def _search_path() -> list[str]:
    """``sys.path`` without the working directory (``python -m`` puts it first)."""
    return [entry for entry in sys.path if isinstance(entry, str) and not _is_working_directory(entry)]


@contextlib.contextmanager
def _import_path(folder: Path | None) -> Iterator[None]:
    """While a factory loads and builds: ``sys.path`` without the working directory, with the
    factory file's own folder first; restored afterwards, whatever the factory did to it."""
    saved = list(sys.path)
    sys.path[:] = ([str(folder)] if folder is not None else []) + _search_path()
    try:
        yield
    finally:
        sys.path[:] = saved


def _locate(target: str) -> Path | None:
    """The file that importing ``pkg.mod`` would run (symlinks resolved), found without running
    any code and without the working directory; None for a built-in module or none found."""
    loaded = sys.modules.get(target)
    if loaded is not None:
        origin = getattr(loaded, "__file__", None)
        return Path(origin).resolve() if origin and os.path.isfile(origin) else None
    path: list[str] | None = _search_path()
    spec = None
    parts = target.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        path = list(spec.submodule_search_locations or [])
    origin = spec.origin if spec is not None else None
    return Path(origin).resolve() if origin and os.path.isfile(origin) else None


def _import_module(target: str, origin: Path | None):
    """``pkg.mod`` from ``sys.path`` without the working directory (see :func:`_import_path`),
    from the file :func:`_locate` found."""
    try:
        module = importlib.import_module(target)
    except SystemExit as exc:
        raise ModelResolutionError(f"importing {target} {_exited(exc)}") from None
    except ImportError as exc:
        raise ModelResolutionError(f"cannot import module {target!r}: {first_line(exc, 200)}") from None
    except Exception as exc:
        raise ModelResolutionError(f"importing {target} failed: {type(exc).__name__}: {first_line(exc, 200)}") from None
    file = getattr(module, "__file__", None)
    if origin is not None and (file is None or Path(file).resolve() != origin):
        raise ModelResolutionError(f"module {target!r} was imported from {file}, not {origin}")
    return module


def _import_file(path: Path, source: bytes):
    """Run one file's ``source`` (the bytes whose digest was checked) as a private module."""
    name = "ccnn_factory_" + re.sub(r"\W", "_", str(path))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise ModelResolutionError(f"cannot import {path} as Python code")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)
    except SystemExit as exc:
        del sys.modules[name]
        raise ModelResolutionError(f"importing {path} {_exited(exc)}") from None
    except Exception as exc:
        del sys.modules[name]
        raise ModelResolutionError(f"importing {path} failed: {type(exc).__name__}: {first_line(exc, 200)}") from None
    return module
