"""Resolve MODEL: names, checkpoints, factories and artifacts become a pretrained nn.Module.

* :mod:`.resolve`: the dispatch (:func:`resolve_model`), :func:`load_artifact`;
* :mod:`.record`: :class:`ResolvedModel`, what every form resolves to;
* :mod:`.preprocessing`: :class:`Preprocessing` and THE default, :func:`imagenet_preprocessing`;
* :mod:`.checkpoints`: safe ``torch.load`` and state_dict loading;
* :mod:`.artifact`: the artifact format (plain data), :func:`save_artifact`;
* :mod:`.head`: a new classifier head for transfer learning, replayed when an artifact loads;
* :mod:`.libraries`: torchvision, EfficientNet-Lite and timm, through their registries;
* :mod:`.factory`: user code (``file.py:make``, ``module:make``).
"""

from .artifact import ARTIFACT_FORMAT, ARTIFACT_VERSION, save_artifact
from .head import Head, replace_head
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, imagenet_preprocessing
from .record import ResolvedModel, conversion_state, count_classes
from .resolve import build_from_spec, list_model_names, load_artifact, resolve_model

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Head",
    "Preprocessing",
    "ResolvedModel",
    "build_from_spec",
    "conversion_state",
    "count_classes",
    "imagenet_preprocessing",
    "list_model_names",
    "replace_head",
    "load_artifact",
    "resolve_model",
    "save_artifact",
]
