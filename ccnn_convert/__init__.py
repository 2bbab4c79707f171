"""ccnn-convert: checkered (multisampling) and dilated conversions of pretrained PyTorch CNNs.

>>> import torch, torchvision
>>> from ccnn_convert import convert
>>> model = torchvision.models.resnet18().eval()
>>> ccnn = convert(model, mode="checkered", sampler="lattice")
>>> ccnn(torch.randn(2, 3, 64, 64)).shape
torch.Size([2, 1000])
"""

from .cpu_memory import use_huge_pages
from .errors import CCNNError, ConversionError, DataError, ExportError, ModelResolutionError
from .flops import count_flops
from .rewrite import ConversionReport, LayerRecord, conversion_report, convert

__version__ = "0.1.0"

__all__ = [
    "CCNNError",
    "ConversionError",
    "ConversionReport",
    "DataError",
    "ExportError",
    "LayerRecord",
    "ModelResolutionError",
    "__version__",
    "conversion_report",
    "convert",
    "count_flops",
    "use_huge_pages",
]
