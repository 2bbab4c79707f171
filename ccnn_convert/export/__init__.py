"""ONNX export of original and converted models: dynamic batch, metadata, verification, benchmark."""

from .pipeline import *  # noqa: F401,F403
from .pipeline import VerificationFailed, conversion_for  # noqa: F401
from .pipeline import __all__  # noqa: F401
