"""The artifact format: what ``ccnn-convert -o`` writes and every command reloads. Pure data.

An artifact is one ``torch.save`` file holding only plain values and tensors, so it is read
with ``torch.load(weights_only=True)`` and unpickling runs no code:

``format``, ``version``
    ``"ccnn-convert-artifact"`` and :data:`ARTIFACT_VERSION`.
``spec``
    how to rebuild the architecture: a library name (resolved through that library's registry
    only), or the name of the factory that built it (information: rebuilding runs that code,
    which needs the user's consent, see :mod:`.factory`).
``state_dict``, ``preprocessing``, ``name``, ``weights``, ``num_classes``
    the original model's tensors and what is needed to use it.
``conversion``
    :meth:`ccnn_convert.spec.ConversionSpec.to_dict`, including the leaf modules.
``conversion_state`` (optional)
    tensors learned by the conversion itself (DiffStride's strides), keyed as in the converted
    model's state_dict.
``head``, ``classes``, ``training`` (version 3, each optional)
    a classifier replaced for transfer learning (:class:`~.head.Head`), the class names of a
    model trained on its own classes, and ``ccnn-train``'s summary of the run. A trained
    model's ``state_dict`` holds its trained weights: the artifact rebuilds the architecture,
    replaces the head, then loads them.

This module writes and validates that data; :func:`ccnn_convert.models.load_artifact` rebuilds
the model from it. Versions 1 (no leaf modules) and 2 (no head, classes, training) are still read.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._helpers import a_type, first_line, package_version
from ..errors import CCNNError, ModelResolutionError
from ..outputs import atomic_path, save_torch
from ..spec import ConversionSpec
from .head import Head
from .preprocessing import Preprocessing
from .record import ResolvedModel, learned_state_applies

__all__ = ["ARTIFACT_FORMAT", "ARTIFACT_VERSION", "ArtifactData", "is_artifact", "read_artifact", "save_artifact"]

ARTIFACT_FORMAT = "ccnn-convert-artifact"
ARTIFACT_VERSION = 3  # 2: conversion is ConversionSpec.to_dict() (adds leaf_modules); 3: head, classes, training
_READABLE_VERSIONS = (1, 2, 3)
_SAVABLE_SOURCES = ("torchvision", "efficientnet_lite", "timm", "factory")


@dataclass(frozen=True)
class ArtifactData:
    """The validated contents of an artifact, before any model is built."""

    spec: dict
    state_dict: dict
    conversion: ConversionSpec
    preprocessing: Preprocessing
    name: str
    weights: str
    num_classes: int
    head: Head | None = None
    class_names: tuple[str, ...] | None = None
    training: dict | None = None
    conversion_state: dict | None = None


def save_artifact(path, resolved: ResolvedModel, conversion: ConversionSpec, *, force: bool = False) -> None:
    """Write spec + original weights + conversion (+ the learned ``resolved.conversion_state``);
    loadable with weights_only=True."""
    if not isinstance(conversion, ConversionSpec):
        raise TypeError(f"conversion must be a ConversionSpec, not {type(conversion).__name__}")
    if resolved.spec.get("source") not in _SAVABLE_SOURCES:
        raise ModelResolutionError(
            f"cannot save {resolved.name} as an artifact: its architecture cannot be rebuilt from a file "
            "(build it with a factory, file.py:make)")
    meta = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "spec": dict(resolved.spec),
        "name": resolved.name,
        "weights": resolved.weights,
        "conversion": conversion.to_dict(),
        "preprocessing": resolved.preprocessing.to_dict(),
        "num_classes": int(resolved.num_classes),
        "ccnn_convert_version": package_version(),
        "head": None if resolved.head is None else resolved.head.to_dict(),
        "classes": None if resolved.class_names is None else list(resolved.class_names),
        "training": resolved.training,
    }
    _check_plain(meta, "artifact")
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
             for k, v in resolved.model.state_dict().items()}
    learned = {}
    if resolved.conversion_state and learned_state_applies(resolved.conversion, conversion):
        learned["conversion_state"] = {k: v.detach().cpu() for k, v in resolved.conversion_state.items()}
    with atomic_path(path, force=force) as tmp, open(tmp, "wb") as handle:
        save_torch({**meta, "state_dict": state, **learned}, handle)  # a file object: the same bytes whatever tmp's name


def is_artifact(obj: Any) -> bool:
    """Whether a loaded file is a ccnn-convert artifact (of any version)."""
    return isinstance(obj, dict) and obj.get("format") == ARTIFACT_FORMAT


def read_artifact(obj: dict, path: Path) -> ArtifactData:
    """Validate an artifact's contents; anything odd is one ModelResolutionError line."""
    version = obj.get("version")
    if isinstance(version, bool) or not isinstance(version, int):  # "3" is not version 3
        raise ModelResolutionError(f"{path}: invalid artifact version {version!r} (an integer: "
                                   f"{', '.join(map(str, _READABLE_VERSIONS))})")
    if version not in _READABLE_VERSIONS:
        raise ModelResolutionError(
            f"{path} is a version-{version} artifact; this ccnn-convert reads versions "
            f"{', '.join(map(str, _READABLE_VERSIONS))}")
    missing = [k for k in ("spec", "state_dict", "conversion", "preprocessing", "name", "weights") if k not in obj]
    if missing:
        raise ModelResolutionError(f"{path} is a damaged artifact (no {missing[0]!r})")
    spec, state = obj["spec"], obj["state_dict"]
    if not isinstance(spec, dict) or not all(isinstance(v, (str, type(None))) for v in spec.values()):
        raise ModelResolutionError(f"{path}: invalid spec in artifact")
    if not isinstance(state, dict):
        raise ModelResolutionError(f"{path}: invalid state_dict in artifact")
    name, weights, classes = obj["name"], obj["weights"], obj.get("num_classes", 1000)
    if not isinstance(name, str) or not isinstance(weights, str):
        raise ModelResolutionError(f"{path}: invalid name or weights in artifact")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ModelResolutionError(f"{path}: invalid num_classes {classes!r} in artifact")
    try:
        preprocessing = Preprocessing.from_dict(obj["preprocessing"])
    except ModelResolutionError as exc:
        raise ModelResolutionError(f"{path}: {exc}") from None
    head = obj.get("head")
    head = None if head is None else Head.from_dict(head, str(path))
    if head is not None and head.num_classes != classes:
        raise ModelResolutionError(f"{path}: head of {head.num_classes} classes in a {classes}-class artifact")
    # Checked against the stored tensors before anything is built: a head is allocated at its size.
    if head is not None:
        _check_head_weight(state, head, path)
    class_names = _class_names(obj.get("classes"), classes, path)
    training = obj.get("training")
    if training is not None and not isinstance(training, dict):
        raise ModelResolutionError(f"{path}: invalid training summary in artifact")
    learned = obj.get("conversion_state")
    if learned is not None and (not isinstance(learned, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in learned.items())):
        raise ModelResolutionError(f"{path}: invalid conversion_state in artifact")
    return ArtifactData(dict(spec), state, _conversion(obj["conversion"], version, path), preprocessing,
                        name, weights, classes, head, class_names, training, learned or None)


def _check_head_weight(state: dict, head: Head, path: Path) -> None:
    weight = state.get(f"{head.module}.weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != head.num_classes:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
        raise ModelResolutionError(f"{path}: head {head.module!r} of {head.num_classes} classes, but its stored "
                                   f"weight is {'missing' if shape is None else f'of shape {shape}'}")


def check_classes_in_state(state: dict, classes: int, path: Path) -> None:
    """A model's classifier holds a tensor with one row (or channel) per class: a num_classes
    that no stored tensor has is not the model's (checked once the weights fit the model)."""
    if not any(isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == classes for t in state.values()):
        raise ModelResolutionError(f"{path}: num_classes {classes} in artifact, but no stored tensor has "
                                   f"{classes} rows (a classifier would)")


def _class_names(names: Any, classes: int, path: Path) -> tuple[str, ...] | None:
    if names is None:
        return None
    if (not isinstance(names, list) or len(names) != classes or len(set(names)) != len(names)
            or not all(isinstance(n, str) and n for n in names)):
        raise ModelResolutionError(f"{path}: invalid class names in artifact (need {classes} distinct names)")
    return tuple(names)


def _conversion(data: Any, version: int, path: Path) -> ConversionSpec:
    if version == 1 and isinstance(data, dict):
        data = _from_version_1(data)
    try:
        return ConversionSpec.from_dict(data)
    except (CCNNError, TypeError, ValueError) as exc:
        raise ModelResolutionError(f"{path}: invalid conversion in artifact: {first_line(exc, 200)}") from None


def _from_version_1(data: dict) -> dict:
    """Version 1 stored every convert() argument, also those that did nothing: drop those."""
    data = dict(data)
    if data.get("mode") != "checkered":
        data.pop("density", None)
    if data.get("mode") != "checkered" or data.get("sampler") != "random":
        data.pop("seed", None)
    return data


def _check_plain(obj: Any, where: str) -> None:
    """Refuse anything torch.load(weights_only=True) could not read back."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ModelResolutionError(f"{where}: key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif obj is not None and not isinstance(obj, (str, int, float, bool)):
        raise ModelResolutionError(f"{where} is {a_type(obj)}; artifacts hold only plain values")
