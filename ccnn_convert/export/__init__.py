"""ONNX export of original and converted models: dynamic batch, metadata, verification, benchmark.

One concern per module, in pipeline order:

* :mod:`.exporter`: torch.export + torchlib to ONNX, exporter failures in one line, dead-code removal;
* :mod:`.opset`: exact down-conversion from the exporter's opset 18, or an error naming the node;
* :mod:`.metadata`: what the file says about itself (:func:`build_metadata`, :func:`read_metadata`);
* :mod:`.sessions`: ONNX Runtime providers and sessions, and :func:`load_onnx_classifier`
  (what ``ccnn-eval model.onnx`` uses; it does not import the exporter);
* :mod:`.verification`: ONNX Runtime vs PyTorch (:func:`verify`), and :func:`benchmark`;
* :mod:`.pipeline`: :func:`export`, all of the above behind ``ccnn-export``.

Names are loaded lazily (PEP 562), so ``import ccnn_convert.export.sessions`` costs only that module.
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = {
    "exporter": ("DEFAULT_OPSET", "EXTERNAL_DATA_THRESHOLD", "OnnxInfo", "export_onnx", "remove_unused"),
    "opset": ("MIN_OPSET", "NATIVE_OPSET", "OpsetError", "check_opset", "convert_opset"),
    "metadata": ("METADATA_KEYS", "build_metadata", "read_metadata"),
    "sessions": ("PROVIDERS", "OnnxClassifier", "ProviderChoice", "create_session", "load_onnx_classifier",
                 "select_provider"),
    "verification": ("FP16_TOLERANCE", "FP32_TOLERANCE", "BenchmarkOptions", "BenchmarkResult", "Check",
                     "Verification", "VerificationFailed", "VerifyOptions", "benchmark", "compare", "verify"),
    "pipeline": ("ExportResult", "conversion_spec", "export", "load_images", "with_matrix_products"),
}
_WHERE = {name: module for module, names in _SOURCES.items() for name in names}
# Convenience for callers that catch export errors next to the export functions.
_ERRORS = ("CCNNError", "ExportError", "ParameterError")

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name in _ERRORS:
        value = getattr(importlib.import_module("ccnn_convert.errors"), name)
    elif name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # cached: later lookups do not come back here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_ERRORS))
