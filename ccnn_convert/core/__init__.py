"""The engine: trace a CNN with torch.fx and rewrite its subsampling layers into multisampling ones.

Read in this order: :mod:`.sequences` (which samples each submap takes), :mod:`.layers` (the
multisampling conv and pool ops), :mod:`.tracing` (the fx tracer, its leaf modules and shape
propagation), :mod:`.ops` (which graph nodes are strided layers and global pools),
:mod:`.rewrite` (the fx pass that puts them together; :mod:`.report` records what it did),
:mod:`.edges` and :mod:`.edge_pass` (exact edges: samples outside the image are padding for
later layers), :mod:`.dilation` (dilated mode as a real dilated network) and :mod:`.features`
(dense feature maps from a converted model). :mod:`.modes` is the table of conversion modes;
:mod:`.downsample` is the pass of the modes that run a layer at stride 1 and then downsample:
:mod:`.spectral` (fixed spectral pooling), :mod:`.diffstride` (learnable strides) and
:mod:`.blurpool` (binomial blur).
"""

from .blurpool import BlurPool2d, binomial_filter
from .diffstride import DiffStride2d, diffstride_cost, diffstride_layers
from .features import DenseMap, FeatureExtractor, create_feature_extractor, extract_features, graph_node_names
from .modes import MODES, Mode
from .options import CONVERSION_MODES, DILATIONS, EDGES, check_options
from .report import ConversionReport, LayerRecord, conversion_report
from .rewrite import convert
from .spectral import SpectralPool2d, spectral_pool
from .tracing import register_notrace_function, register_notrace_module

__all__ = [
    "BlurPool2d", "DiffStride2d", "MODES", "Mode", "SpectralPool2d", "binomial_filter", "diffstride_cost",
    "diffstride_layers", "spectral_pool",
    "CONVERSION_MODES", "ConversionReport", "DILATIONS", "DenseMap", "EDGES", "FeatureExtractor", "LayerRecord",
    "check_options", "conversion_report", "convert", "create_feature_extractor", "extract_features",
    "graph_node_names",
    "register_notrace_function", "register_notrace_module",
]
