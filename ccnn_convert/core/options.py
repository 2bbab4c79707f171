"""Validation of :func:`~.rewrite.convert`'s options: an option that would do nothing is an error.

Which mode takes which option comes from the table of modes (:mod:`.modes`).
"""

from __future__ import annotations

from ..errors import ParameterError
from .edge_pass import EDGES
from .modes import MODES, mode_options
from .placement import DEFAULT_RESAMPLE_AT, RESAMPLE_AT
from .sequences import SEQUENCES
from .spectral import CONVENTIONS

__all__ = ["CONVENTIONS", "CONVERSION_MODES", "DEFAULT_BLUR_SIZE", "DEFAULT_RESAMPLE_AT", "RESAMPLE_AT", "DEFAULT_SMOOTHNESS", "DILATIONS", "EDGES", "MAX_BLUR_SIZE",
           "MAX_SEED", "check_options", "check_seed", "chosen_convention", "default_edges"]

CONVERSION_MODES = tuple(MODES)
MAX_SEED = 2**63 - 1  # step t draws with seed + t, which torch.Generator takes up to 2**64 - 1
DILATIONS = ("multisample", "native")
DEFAULT_SMOOTHNESS = 4.0  # DiffStride's ramp width R, in frequency positions (the paper's default)
DEFAULT_BLUR_SIZE = 3  # antialiased-cnns' filt_size default in its models
MAX_BLUR_SIZE = 7  # the largest binomial filter antialiased-cnns ships


def default_edges(mode: str, edges: str | None) -> str:
    """The edge rule a conversion uses: ``edges``, else exact for dilated and reference otherwise."""
    if edges is not None:
        return edges
    return "exact" if mode == "dilated" else "reference"


def check_options(mode: str, sampler: str = "lattice", keep_first: int = 0, density: int | None = None,
                  seed: int | None = None, edges: str | None = None, dilation: str | None = None,
                  smoothness: float | None = None, blur_size: int | None = None,
                  resample_at: str | None = None, spectral_convention: str | None = None) -> None:
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
        if "density" not in mode_options(mode):
            raise ParameterError("density", f"{{param}} sets the samples per window of checkered mode "
                                            f"(1 = traditional, k*k = dilated); it does nothing with mode {mode!r}")
    if seed is not None:
        check_seed(seed)
        if sampler != "random" or "seed" not in mode_options(mode):
            raise ParameterError("seed", "{param} only seeds the random sampler of checkered mode "
                                         f"(mode {mode!r}, sampler {sampler!r})")
    _check_edges(mode, edges, dilation)
    _check_smoothness(mode, smoothness)
    _check_blur_size(mode, blur_size)
    _check_resample_at(mode, resample_at)
    _check_spectral_convention(mode, spectral_convention)
    if sampler != "lattice" and "sampler" not in mode_options(mode) and mode != "dilated":
        # (dilated mode takes every sample: any sampler gives the same network, as it always has)
        raise ParameterError("sampler", f"{{param}} {sampler!r} chooses checkered samples; it does nothing "
                                        f"with mode {mode!r}")


def _check_smoothness(mode: str, smoothness: float | None) -> None:
    if smoothness is None:
        return
    if isinstance(smoothness, bool) or not isinstance(smoothness, (int, float)) or not smoothness > 0 \
            or smoothness == float("inf"):
        raise ParameterError("smoothness", f"{{param}} must be a positive number, got {smoothness!r}")
    if "smoothness" not in mode_options(mode):
        raise ParameterError("smoothness", f"{{param}} is the ramp width of DiffStride's mask; it does nothing "
                                           f"with mode {mode!r}")


def _check_blur_size(mode: str, blur_size: int | None) -> None:
    if blur_size is None:
        return
    if isinstance(blur_size, bool) or not isinstance(blur_size, int) or not 1 <= blur_size <= MAX_BLUR_SIZE:
        raise ParameterError("blur_size", f"{{param}} must be an integer from 1 to {MAX_BLUR_SIZE}, got {blur_size!r}")
    if "blur_size" not in mode_options(mode):
        raise ParameterError("blur_size", f"{{param}} is the size of blurpool's binomial filter; it does nothing "
                                          f"with mode {mode!r}")


def _check_resample_at(mode: str, resample_at: str | None) -> None:
    if resample_at is None:
        return
    if resample_at not in RESAMPLE_AT:
        raise ParameterError("resample_at", f"unknown {{param}} {resample_at!r}; choose one of {', '.join(RESAMPLE_AT)}")
    if "resample_at" not in mode_options(mode):
        raise ParameterError("resample_at", f"{{param}} places the downsampler of a resampling mode; mode {mode!r} "
                                            "does not resample")


def _check_spectral_convention(mode: str, convention: str | None) -> None:
    if convention is None:
        return
    if convention not in CONVENTIONS:
        raise ParameterError("spectral_convention", f"unknown {{param}} {convention!r}; choose one of "
                                                    f"{', '.join(CONVENTIONS)}")
    if "spectral_convention" not in mode_options(mode):
        raise ParameterError("spectral_convention", f"{{param}} sets the Nyquist row of spectral and diffstride "
                                                    f"pooling; it does nothing with mode {mode!r}")


def chosen_convention(convention: str | None) -> str:
    """The convention a spectral or diffstride conversion uses: ``convention``, else the modes'
    default (:data:`~.spectral.MODE_CONVENTION`, read now: a conversion keeps what it was given)."""
    from . import spectral  # the module's current value, not the one imported above

    return spectral.MODE_CONVENTION if convention is None else convention


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
        if "edges" not in mode_options(mode) and mode != "dilated":
            raise ParameterError("edges", f"{{param}} does nothing with mode {mode!r}")
    if dilation is not None and dilation not in DILATIONS:
        raise ParameterError("dilation", f"unknown {{param}} {dilation!r}; choose one of {', '.join(DILATIONS)}")
    if dilation is not None and mode != "dilated":
        raise ParameterError("dilation", f"{{param}} {dilation!r} only applies to mode 'dilated', not {mode!r}")
