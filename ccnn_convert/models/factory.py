"""User code as MODEL: ``path/to/file.py:make`` or ``package.module:make``.

The callable is called with no arguments and must return an ``nn.Module``. This is the only
place where ccnn-convert imports code that is not a library, so the rules are strict:

* a factory named on the command line (or passed to :func:`resolve_model`) is the user's own
  choice and runs as named: a file is imported by its path, a module the normal way. Nothing is
  added to ``sys.path`` (not the working directory, not the file's folder);
* a factory named inside an artifact is only information. Rebuilding it runs code, so it needs
  the user's consent in this run (``trust_factory=True``; a command flag in the CLI), and even then
  only an absolute ``.py`` path stored at save time, or a module importable as installed, runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

from torch import nn

from .._helpers import first_line
from ..errors import ModelResolutionError
from .checkpoints import _is_default, _is_weights_path, _no_weights, extract_state_dict, load_checked, safe_load
from .preprocessing import imagenet_preprocessing
from ..errors import ModelParameterError
from .record import ResolvedModel, count_classes

__all__ = ["build_trusted_factory", "parse_factory", "resolve_factory"]

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
    model = _call(stored, attr, shown=text)
    description = "as built by the factory"
    if _is_weights_path(weights):
        path = Path(str(weights)).expanduser()
        load_checked(model, extract_state_dict(safe_load(path), path), f"checkpoint {path}")
        description = str(path)
    elif not (_is_default(weights) or _no_weights(weights)):
        raise ModelParameterError(
            "weights", f"with a factory MODEL, {{param}} must be a checkpoint file, not {weights!r}")
    name = f"{Path(target).name}:{attr}" if target.endswith(".py") else text
    # The absolute path is stored, so a later reload never depends on the working directory.
    return ResolvedModel(model.eval(), name, imagenet_preprocessing(),
                         {"source": "factory", "factory": f"{stored}:{attr}"},
                         description, num_classes=count_classes(model))


def build_trusted_factory(factory: Any, where: str, trust_factory: bool) -> nn.Module:
    """Rebuild the architecture of an artifact made by ``factory`` (its stored name), only with
    consent and only from an absolute file path or an installed module."""
    parsed = parse_factory(factory) if isinstance(factory, str) else None
    if parsed is None:
        raise ModelResolutionError(f"{where}: invalid factory {factory!r} in artifact")
    if not trust_factory:
        raise ModelParameterError("trust_factory", f"{where} was built by factory {factory!r}; "
                                              "loading it runs that code: pass {param} if you trust it")
    target, attr = parsed
    if target.endswith(".py") and not Path(target).is_absolute():
        # A relative path would pick whatever file of that name sits in the working directory.
        raise ModelResolutionError(
            f"{where} names factory file {target!r} by a relative path; only an absolute path "
            "is loaded (rebuild the artifact from its source)")
    return _call(target, attr, shown=factory)


def _call(target: str, attr: str, shown: str) -> nn.Module:
    factory: Any = _import_file(Path(target)) if target.endswith(".py") else _import_module(target)
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ModelResolutionError(f"{target} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelResolutionError(f"{shown}: {attr} is a {type(factory).__name__}, not callable")
    try:
        model = factory()
    except SystemExit as exc:  # not an Exception: uncaught, it would end the command with its status
        raise ModelResolutionError(f"factory {shown} {_exited(exc)} instead of returning a model") from None
    except Exception as exc:
        raise ModelResolutionError(f"factory {shown} raised {type(exc).__name__}: {first_line(exc, 200)}") from None
    if not isinstance(model, nn.Module):
        raise ModelResolutionError(f"factory {shown} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _exited(exc: SystemExit) -> str:
    return f"called exit({exc.code!r})"


def _import_module(target: str):
    """``pkg.mod`` as Python itself would import it: sys.path is left as it is."""
    try:
        return importlib.import_module(target)
    except SystemExit as exc:
        raise ModelResolutionError(f"importing {target} {_exited(exc)}") from None
    except ImportError as exc:
        raise ModelResolutionError(f"cannot import module {target!r}: {first_line(exc, 200)}") from None
    except Exception as exc:
        raise ModelResolutionError(f"importing {target} failed: {type(exc).__name__}: {first_line(exc, 200)}") from None


def _import_file(path: Path):
    """Import one file by its path under a private module name; sys.path is left as it is."""
    if not path.is_file():
        raise ModelResolutionError(f"factory file not found: {path}")
    name = "ccnn_factory_" + re.sub(r"\W", "_", str(path))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelResolutionError(f"cannot import {path} as Python code")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:
        del sys.modules[name]
        raise ModelResolutionError(f"importing {path} {_exited(exc)}") from None
    except Exception as exc:
        del sys.modules[name]
        raise ModelResolutionError(f"importing {path} failed: {type(exc).__name__}: {first_line(exc, 200)}") from None
    return module
