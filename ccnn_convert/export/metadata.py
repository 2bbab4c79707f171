"""What an exported ONNX file says about itself: source model, conversion, preprocessing.

Metadata props are all strings; values that are not plain strings are JSON. Keys written by
:func:`build_metadata` (and decoded by :func:`read_metadata`):

``source_model``, ``weights``, ``mode``, ``sampler``, ``keep_first``, ``density``, ``seed``,
``conversion`` (the :class:`~ccnn_convert.spec.ConversionSpec` as a dict), ``input_size``
(``[3, H, W]``), ``preprocessing`` (resize, crop, mean, std, interpolation), ``num_classes``,
``classes`` (the class names of a model trained on its own classes, in index order, else null),
``dtype``, ``opset``, ``ccnn_convert_version``.

This module imports onnx only: :mod:`.sessions` (and through it ``ccnn-eval``) reads metadata
without importing the exporter.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

from .._helpers import first_line, package_version
from ..errors import CCNNError
from ..spec import ORIGINAL, ConversionSpec

__all__ = ["METADATA_KEYS", "build_metadata", "class_names_of", "read_metadata", "scale_to_crop"]

METADATA_KEYS = ("source_model", "weights", "mode", "sampler", "keep_first", "density", "seed",
                 "conversion", "input_size", "preprocessing", "num_classes", "classes", "dtype", "opset",
                 "ccnn_convert_version")
_JSON_KEYS = ("keep_first", "density", "seed", "conversion", "input_size", "preprocessing",
              "num_classes", "classes", "opset")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def build_metadata(*, name: str, weights: str, conversion: ConversionSpec | None, input_size: int,
                   preprocessing, num_classes: int, dtype: str, opset: int,
                   class_names: Sequence[str] | None = None) -> dict[str, str]:
    """The metadata props for an export; ``conversion=None`` is the original model."""
    mode = conversion.mode if conversion is not None else ORIGINAL
    values = conversion.to_dict() if conversion is not None else {}
    return {
        "source_model": name,
        "weights": str(weights),
        "mode": mode,
        "sampler": str(values["sampler"]) if mode == "checkered" else "",  # a dilated model has none
        "keep_first": _json(values.get("keep_first")),
        "density": _json(values.get("density")),
        "seed": _json(values.get("seed")),
        "conversion": _json(values),
        "input_size": _json([3, input_size, input_size]),
        "preprocessing": _json(preprocessing.to_dict()),
        "num_classes": _json(int(num_classes)),
        "classes": _json(None if class_names is None else list(class_names)),
        "dtype": dtype,
        "opset": _json(opset),
        "ccnn_convert_version": package_version(),
    }


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata props of an ONNX file, JSON values decoded (keys written by
    :func:`build_metadata`; any other props are returned as strings)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # protobuf's DecodeError and friends
        raise CCNNError(f"{path} is not a readable ONNX file: {first_line(exc)}") from None
    out: dict[str, Any] = {}
    for prop in proto.metadata_props:
        out[prop.key] = prop.value
        if prop.key in _JSON_KEYS:
            try:
                out[prop.key] = json.loads(prop.value)
            except ValueError:
                pass
    return out


def class_names_of(metadata: dict[str, Any], where: str) -> tuple[int | None, tuple[str, ...] | None]:
    """``(num_classes, class names)`` from read metadata; None where the file does not say.
    Names are checked as an artifact's are: ``num_classes`` distinct non-empty strings."""
    classes, names = metadata.get("num_classes"), metadata.get("classes")
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int) or classes < 1):
        raise CCNNError(f"{where}: invalid num_classes {classes!r} in the ONNX metadata")
    if names is None:
        return classes, None
    if (not isinstance(names, list) or (classes is not None and len(names) != classes)
            or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names)):
        raise CCNNError(f"{where}: invalid class names in the ONNX metadata (need {classes} distinct names)")
    return len(names), tuple(names)


def scale_to_crop(preprocessing, crop: int):
    """``preprocessing`` for another input size: the crop becomes ``crop`` and the resize
    scales with it (256/224 stays 256/224), so the metadata describes what the graph takes."""
    if crop == preprocessing.crop:
        return preprocessing
    resize = max(crop, round(preprocessing.resize * crop / preprocessing.crop))
    return dataclasses.replace(preprocessing, crop=crop, resize=resize)
