"""Errors that users can act on.

Every failure caused by user input (an unknown model, a missing file, an input that is too
small, ...) is raised as a :class:`CCNNError` with a one-line message. The CLI prints that
line and exits non-zero; Python callers can catch it. Anything else is a bug.

The library speaks in parameters, not flags: a bad value for one parameter is a
:class:`ParameterError`, whose message names the parameter (``batch_size must be positive``).
The CLI re-renders the same message with the command's flag for that parameter in its place.
"""

from __future__ import annotations

__all__ = [
    "CCNNError",
    "ConversionError",
    "DataError",
    "ExportError",
    "DataParameterError",
    "ModelParameterError",
    "ModelResolutionError",
    "ParameterError",
]

_PLACEHOLDER = "{param}"


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


class ParameterError(CCNNError):
    """A bad value for one named parameter.

    ``template`` holds ``{param}`` where the parameter's name goes (plain text replacement, so
    paths with braces are safe). ``str(error)`` names the Python parameter; :meth:`render`
    lets the CLI put its flag there instead.
    """

    def __init__(self, parameter: str, template: str, also: tuple[str, ...] = ()):
        if _PLACEHOLDER not in template:
            template = f"{_PLACEHOLDER}: {template}"
        self.parameter = parameter
        self.template = template
        self.also = also  # other parameters the message names, as {param:NAME}
        super().__init__(self.render(parameter))

    def render(self, name: str, others: dict[str, str] | None = None) -> str:
        """The message with ``name`` for the parameter and ``others[NAME]`` for ``{param:NAME}``."""
        text = self.template
        for other in self.also:
            text = text.replace(f"{{param:{other}}}", (others or {}).get(other, other))
        return text.replace(_PLACEHOLDER, name)


class ModelParameterError(ParameterError, ModelResolutionError):
    """A model problem that one parameter fixes (weights, arch, trust_factory)."""


class DataParameterError(ParameterError, DataError):
    """A data problem that one parameter fixes (data, labels)."""
