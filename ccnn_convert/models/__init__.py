"""Resolve MODEL: names, checkpoints, factories and artifacts become a pretrained nn.Module."""

from .resolve import *  # noqa: F401,F403
from .resolve import IMAGENET_MEAN, IMAGENET_STD, count_classes  # noqa: F401
from .resolve import __all__  # noqa: F401
