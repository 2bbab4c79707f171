"""ccnn-convert: checkered (multisampling) and dilated conversions of pretrained PyTorch CNNs.

>>> import torch, torchvision
>>> from ccnn_convert import convert
>>> model = torchvision.models.resnet18().eval()
>>> ccnn = convert(model, mode="checkered", sampler="lattice")
>>> ccnn(torch.randn(2, 3, 64, 64)).shape
torch.Size([2, 1000])

The pipeline, one subpackage or module per stage (``docs/design.md`` has the map):
:mod:`.models` (resolve MODEL) -> :mod:`.core` (trace and rewrite) -> :mod:`.evaluate`,
:mod:`.bench`, :mod:`.export` -> :mod:`.cli`.

Names are imported on first use (PEP 562), so ``import ccnn_convert`` is cheap and the
command-line entry points can handle Ctrl-C before torch is loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "CCNNError": ".errors",
    "ConversionError": ".errors",
    "DataError": ".errors",
    "ExportError": ".errors",
    "ModelResolutionError": ".errors",
    "ParameterError": ".errors",
    "ConversionReport": ".core",
    "LayerRecord": ".core",
    "conversion_report": ".core",
    "convert": ".core",
    "create_feature_extractor": ".core",
    "DenseMap": ".core",
    "ConversionSpec": ".spec",
    "count_flops": ".flops",
    "use_huge_pages": ".cpu_memory",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
