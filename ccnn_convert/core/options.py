"""Validation of :func:`~.rewrite.convert`'s options: an option that would do nothing is an error."""

from __future__ import annotations

from ..errors import ParameterError
from .edge_pass import EDGES
from .sequences import SEQUENCES

__all__ = ["CONVERSION_MODES", "DILATIONS", "EDGES", "MAX_SEED", "check_options", "check_seed", "default_edges"]

CONVERSION_MODES = ("checkered", "dilated", "traditional")
MAX_SEED = 2**63 - 1  # step t draws with seed + t, which torch.Generator takes up to 2**64 - 1
DILATIONS = ("multisample", "native")


def default_edges(mode: str, edges: str | None) -> str:
    """The edge rule a conversion uses: ``edges``, else exact for dilated and reference otherwise."""
    if edges is not None:
        return edges
    return "exact" if mode == "dilated" else "reference"


def check_options(mode: str, sampler: str = "lattice", keep_first: int = 0, density: int | None = None,
                  seed: int | None = None, edges: str | None = None, dilation: str | None = None) -> None:
    """Validate :func:`convert`'s options; an option that would do nothing is an error, not ignored."""
    if mode not in CONVERSION_MODES:
        raise ParameterError("mode", f"unknown {{param}} {mode!r}; choose one of {', '.join(CONVERSION_MODES)}")
    if sampler not in SEQUENCES:
        raise ParameterError("sampler", f"unknown {{param}} {sampler!r}; choose one of {', '.join(SEQUENCES)}")
    if isinstance(keep_first, bool) or not isinstance(keep_first, int) or keep_first < 0:
        raise ParameterError("keep_first", f"{{param}} must be a non-negative integer, got {keep_first!r}")
    if density is not None:
        if isinstance(density, bool) or not isinstance(density, int) or density < 1:
            raise ParameterError("density", f"{{param}} must be a positive integer, got {density!r}")
        if mode != "checkered":
            raise ParameterError("density", f"{{param}} sets the samples per window of checkered mode "
                                            f"(1 = traditional, k*k = dilated); it does nothing with mode {mode!r}")
    if seed is not None:
        check_seed(seed)
        if sampler != "random" or mode != "checkered":
            raise ParameterError("seed", "{param} only seeds the random sampler of checkered mode "
                                         f"(mode {mode!r}, sampler {sampler!r})")
    _check_edges(mode, edges, dilation)


def check_seed(seed: int) -> None:
    """A seed the random sampler can use (callers check it before loading anything)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ParameterError("seed", f"{{param}} must be an integer from 0 to 2**63 - 1, got {seed!r}")


def _check_edges(mode: str, edges: str | None, dilation: str | None) -> None:
    if edges is not None:
        if edges not in EDGES:
            raise ParameterError("edges", f"unknown {{param}} {edges!r}; choose one of {', '.join(EDGES)}")
        if mode == "dilated" and edges != "exact":
            raise ParameterError("edges", "dilated mode is always exact at the edges; {param} "
                                          f"{edges!r} is only for checkered mode")
        if mode not in ("checkered", "dilated"):
            raise ParameterError("edges", f"{{param}} does nothing with mode {mode!r}")
    if dilation is not None and dilation not in DILATIONS:
        raise ParameterError("dilation", f"unknown {{param}} {dilation!r}; choose one of {', '.join(DILATIONS)}")
    if dilation is not None and mode != "dilated":
        raise ParameterError("dilation", f"{{param}} {dilation!r} only applies to mode 'dilated', not {mode!r}")
