"""The engine: trace a CNN with torch.fx and rewrite its subsampling layers into multisampling ones.

Read in this order: :mod:`.sequences` (which samples each submap takes), :mod:`.layers` (the
multisampling conv and pool ops), :mod:`.tracing` (the fx tracer, its leaf modules and shape
propagation), :mod:`.ops` (which graph nodes are strided layers and global pools),
:mod:`.rewrite` (the fx pass that puts them together).
"""

from .rewrite import CONVERSION_MODES, ConversionReport, LayerRecord, check_options, conversion_report, convert
from .tracing import register_notrace_function, register_notrace_module

__all__ = [
    "CONVERSION_MODES", "ConversionReport", "LayerRecord", "check_options", "conversion_report", "convert",
    "register_notrace_function", "register_notrace_module",
]
