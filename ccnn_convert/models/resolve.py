"""Resolve MODEL: the one place that turns a user's MODEL string into a pretrained nn.Module.

Every command takes the same MODEL argument, so every command must understand it the same way.
:func:`resolve_model` tries these rules in order; the first that applies wins:

1. **ccnn-convert artifact**: a ``.pt/.pth/.ckpt/.bin`` file written by
   :func:`~.artifact.save_artifact`. Its architecture is rebuilt from the stored spec (library
   names through the library's registry; a factory only with ``trust_factory=True``) and its
   weights loaded; ``conversion`` holds the :class:`~ccnn_convert.spec.ConversionSpec` to apply.
2. **factory**: ``path/to/file.py:make`` or ``package.module:make`` (:mod:`.factory`). The
   callable is called with no arguments; ``weights=PATH`` then loads a state_dict into it.
3. **checkpoint + architecture**: a checkpoint file (a state_dict, or a dict holding one under
   ``state_dict``/``model``; ``module.`` prefixes are stripped) together with ``arch=NAME``.
   ``resolve_model(NAME, weights=PATH)`` means the same.
4. **library names** (:mod:`.libraries`): ``efficientnet_lite0/1/2`` (bundled weights, fully
   offline), any torchvision classification builder, any timm model (``timm/NAME`` forces timm).
5. Anything else is an error that suggests the closest known names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ModelResolutionError
from .artifact import check_classes_in_state, is_artifact, read_artifact
from .checkpoints import _is_default, _is_weights_path, _looks_like_file, extract_state_dict, load_checked, safe_load
from .head import apply_head
from .factory import build_trusted_factory, parse_factory, resolve_factory
from .libraries import (LIBRARY_SOURCES, build_library_model, find_source, library_model_names,
                        resolve_library, resolve_library_checkpoint)
from .preprocessing import _checked_overrides
from ..errors import ModelParameterError
from .record import ResolvedModel, count_classes

__all__ = ["ResolvedModel", "build_from_spec", "count_classes", "list_model_names", "load_artifact",
           "resolve_model"]


def resolve_model(model: str, weights: str | None = "DEFAULT", arch: str | None = None,
                  preprocessing: dict | None = None, *, trust_factory: bool = False) -> ResolvedModel:
    """Turn MODEL (+ weights, arch, preprocessing overrides) into a ResolvedModel in eval mode.

    See the module docstring for the rules. ``trust_factory`` allows an artifact built by a
    factory to run that factory again. Every user mistake raises a CCNNError.
    """
    text = str(model).strip()
    if not text:
        raise ModelResolutionError("MODEL is empty")
    if _looks_like_file(text):
        resolved = _resolve_file(Path(text).expanduser(), weights, arch, trust_factory)
    elif parse_factory(text) is not None:
        _reject_arch(arch, text)
        resolved = resolve_factory(text, weights)
    else:
        _reject_arch(arch, text)
        resolved = _resolve_name(text, weights)
    if preprocessing:
        resolved.preprocessing = resolved.preprocessing.with_overrides(**_checked_overrides(preprocessing))
    resolved.model.eval()
    return resolved


def load_artifact(path, *, trust_factory: bool = False) -> ResolvedModel:
    """Read a file written by save_artifact; ``conversion`` is filled in."""
    path = Path(path).expanduser()
    obj = safe_load(path)
    if not is_artifact(obj):
        raise ModelResolutionError(f"{path} is not a ccnn-convert artifact")
    return _from_artifact(obj, path, trust_factory)


def build_from_spec(spec: dict, *, trust_factory: bool = False, where: str = "spec") -> nn.Module:
    """Rebuild an architecture (random weights) from ResolvedModel.spec, as artifacts are loaded."""
    source = spec.get("source") if isinstance(spec, dict) else None
    if source in LIBRARY_SOURCES:
        model = build_library_model(spec, where)
    elif source == "factory":
        if set(spec) - {"sha256"} != {"source", "factory"}:
            raise ModelResolutionError(f"{where}: invalid factory spec in artifact")
        model = build_trusted_factory(spec["factory"], where, trust_factory, spec.get("sha256"))
    else:
        raise ModelResolutionError(f"{where}: cannot rebuild a model of unknown source {source!r}")
    return model.eval()


def list_model_names() -> list[str]:
    """Every name MODEL may be: torchvision classification, efficientnet_lite0..2, timm if installed."""
    return library_model_names()


def _reject_arch(arch: str | None, model: str) -> None:
    if arch is not None:
        raise ModelParameterError("arch", f"{{param}} only applies when MODEL is a checkpoint file, not to {model!r}")


def _resolve_file(path: Path, weights: str | None, arch: str | None, trust_factory: bool) -> ResolvedModel:
    obj = safe_load(path)
    if is_artifact(obj):
        if arch is not None or not (_is_default(weights) or weights is None):
            raise ModelParameterError("arch" if arch is not None else "weights",
                                       f"{path} is a ccnn-convert artifact with its own architecture and "
                                       "weights; drop {param}")
        return _from_artifact(obj, path, trust_factory)
    if arch is None:
        raise ModelParameterError(
            "arch", f"{path} is a plain checkpoint, not a ccnn-convert artifact: name its architecture "
            "with {param} (e.g. {param} resnet50), or give it as the weights of a factory MODEL (file.py:make)")
    if not (_is_default(weights) or weights is None):
        raise ModelParameterError("weights", f"MODEL {path} already is the weights; drop {{param}} {weights}")
    return _resolve_checkpoint(arch.strip(), path, obj)


def _resolve_name(name: str, weights: str | None) -> ResolvedModel:
    source, canonical = find_source(name)
    if _is_weights_path(weights):
        path = Path(str(weights)).expanduser()
        return _resolve_checkpoint(canonical, path, safe_load(path), source)
    return resolve_library(source, canonical, weights)


def _resolve_checkpoint(arch: str, path: Path, obj: Any, source: str | None = None) -> ResolvedModel:
    if is_artifact(obj):
        raise ModelParameterError("weights", f"{path} is a ccnn-convert artifact: pass it as MODEL, "
                                              "not as {param}")
    if source is None:
        source, arch = find_source(arch)
    return resolve_library_checkpoint(source, arch, extract_state_dict(obj, path), path)


def _from_artifact(obj: dict, path: Path, trust_factory: bool) -> ResolvedModel:
    data = read_artifact(obj, path)  # everything validated before any model is built
    model = build_from_spec(data.spec, trust_factory=trust_factory, where=str(path))
    if data.head is not None:
        apply_head(model, data.head, str(path))
    load_checked(model, data.state_dict, f"artifact {path}")
    if data.head is None:
        check_classes_in_state(data.state_dict, data.num_classes, path)
    return ResolvedModel(model.eval(), data.name, data.preprocessing, data.spec, data.weights,
                         data.conversion, data.num_classes, data.head, data.class_names, data.training,
                         data.conversion_state)
