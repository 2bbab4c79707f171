"""Errors that users can act on.

Every failure caused by user input (an unknown model, a missing file, an input that is too
small, ...) is raised as a :class:`CCNNError` with a one-line message. The CLI prints that
line and exits non-zero; Python callers can catch it. Anything else is a bug.
"""

from __future__ import annotations


class CCNNError(Exception):
    """Base class: a problem with the user's input, explained in one line."""


class ModelResolutionError(CCNNError):
    """MODEL could not be turned into an nn.Module (unknown name, bad file, bad weights)."""


class ConversionError(CCNNError):
    """The model could not be traced or rewritten (untraceable code, input too small, ...)."""


class DataError(CCNNError):
    """Evaluation data is missing, empty or in a layout we cannot read."""


class ExportError(CCNNError):
    """ONNX export or its verification failed."""
