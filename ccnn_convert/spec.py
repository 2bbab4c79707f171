"""One conversion spec, shared by every command, the artifact format and the ONNX metadata.

A :class:`ConversionSpec` is the whole of what :func:`ccnn_convert.convert` needs besides the
model: mode, sampler, keep_first, density, seed, the edge rule (``edges``), how dilated mode is
computed (``dilation``), DiffStride's ``smoothness``, blurpool's ``blur_size``, where the
resampling modes put their downsampler (``resample_at``), the Nyquist-row convention of spectral
and diffstride pooling (``spectral_convention``: the default is written into the spec, so a saved
conversion never follows a later default), ``phc`` (PHC layers with that many Kronecker
products, in every mode) and the leaf modules that make the model traceable. Which
option belongs to which mode comes from the table
of modes (:data:`ccnn_convert.core.modes.MODES`). It is built from a
command's options, from an artifact, or from both
(:meth:`ConversionSpec.build`: explicit values win over the artifact's, which win over the
defaults), is validated when made, and travels as plain data (:meth:`to_dict`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from .core import CONVERSION_MODES, check_options, convert
from .core.modes import MODE_OPTIONS, mode_options
from .core.options import DEFAULT_RESAMPLE_AT, chosen_convention
from .core.phc import check_phc
from .errors import ParameterError

__all__ = ["MODES", "ORIGINAL", "ConversionSpec", "check_checkered_options_used", "check_modes", "check_options_used"]

ORIGINAL = "original"  # the model as it was resolved, not traced
MODES = (ORIGINAL, *CONVERSION_MODES)  # what every command can run
# What a conversion saved before spectral_convention was recorded was built with: the spectral
# mode's constant was symmetric then, the diffstride mode's published.
CONVENTION_BEFORE_THE_OPTION = {"spectral": "symmetric", "diffstride": "published"}


@dataclass(frozen=True)
class ConversionSpec:
    """The arguments of :func:`ccnn_convert.convert` (besides the model), validated."""

    mode: str = "checkered"
    sampler: str = "lattice"
    keep_first: int = 0
    density: int | None = None
    seed: int | None = None
    leaf_modules: tuple[str, ...] = field(default=())
    edges: str | None = None
    dilation: str | None = None  # None: native where a dilation can express the model
    smoothness: float | None = None  # diffstride: the mask's ramp width (None: 4)
    blur_size: int | None = None  # blurpool: the binomial filter's size (None: 3)
    resample_at: str | None = None  # spectral, diffstride, blurpool: "layer" | "activation" (None: the default)
    spectral_convention: str | None = None  # spectral, diffstride: "published" | "symmetric" (None: the default)
    phc: int | None = None  # PHC layers of this many Kronecker products, before any mode (None: dense)

    def __post_init__(self) -> None:
        leaves = self.leaf_modules
        if isinstance(leaves, str) or not all(isinstance(name, str) and name for name in leaves):
            raise ParameterError("leaf_modules", "{param} must be a list of module class or qualified names")
        object.__setattr__(self, "leaf_modules", tuple(leaves))
        check_options(self.mode, self.sampler, self.keep_first, self.density, self.seed, self.edges,
                      self.dilation, self.smoothness, self.blur_size, self.resample_at, self.spectral_convention)
        # the defaults are written down, so that a saved spec never follows a later default
        if "spectral_convention" in mode_options(self.mode):
            object.__setattr__(self, "spectral_convention", chosen_convention(self.spectral_convention))
        if "resample_at" in mode_options(self.mode) and self.resample_at is None:
            object.__setattr__(self, "resample_at", DEFAULT_RESAMPLE_AT)
        if self.phc is not None:
            check_phc(self.phc)

    @classmethod
    def build(cls, mode: str, base: "ConversionSpec | None" = None, *, sampler: str | None = None,
              keep_first: int | None = None, density: int | None = None, seed: int | None = None,
              leaf_modules: Iterable[str] | None = None, edges: str | None = None,
              dilation: str | None = None, smoothness: float | None = None,
              blur_size: int | None = None, resample_at: str | None = None,
              spectral_convention: str | None = None, phc: int | None = None) -> "ConversionSpec":
        """The spec for ``mode``: explicit values, else ``base``'s (an artifact's), else defaults.

        ``base``'s mode-specific options (sampler, density, seed, edges, dilation, smoothness,
        blur_size, resample_at, spectral_convention) count only when ``mode`` is ``base``'s own
        mode; each is dropped for the modes that do not take it (the table of modes says which do), so one set of options can
        serve several modes (see :func:`check_options_used`).
        ``base``'s leaf modules and ``phc`` always carry over: they describe the model, not the mode.
        """
        values: dict[str, Any] = {}
        if base is not None:
            values["keep_first"] = base.keep_first
            values["phc"] = base.phc
            if base.mode == mode:
                values.update({name: getattr(base, name) for name in MODE_OPTIONS})
        given = dict(sampler=sampler, keep_first=keep_first, density=density, seed=seed, edges=edges,
                     dilation=dilation, smoothness=smoothness, blur_size=blur_size, resample_at=resample_at,
                     spectral_convention=spectral_convention, phc=phc)
        values.update({k: v for k, v in given.items() if v is not None})
        values = {k: v for k, v in values.items() if k not in MODE_OPTIONS or k in mode_options(mode)}
        leaves = list(base.leaf_modules) if base is not None else []
        leaves += [name for name in (leaf_modules or ()) if name not in leaves]
        return cls(mode=mode, leaf_modules=tuple(leaves), **values)

    def convert_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`ccnn_convert.convert`."""
        return {**asdict(self), "leaf_modules": list(self.leaf_modules)}

    def apply(self, model: nn.Module, input_size: int | Sequence[int] = 224, phc_init: str = "fit") -> nn.Module:
        """Convert ``model`` (shape analysis at ``input_size``); the result is in eval mode.
        ``phc_init``: PHC layers fitted to the weights (``"fit"``) or initialised (``"xavier"``)."""
        height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
        example = torch.zeros(1, 3, height, width)
        init = {"phc_init": phc_init} if self.phc is not None else {}
        return convert(model, example_input=example, **self.convert_kwargs(), **init).eval()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (str/int/None/list) for artifacts, JSON and ONNX metadata."""
        return self.convert_kwargs()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ConversionSpec":
        """The inverse of :meth:`to_dict`; unknown keys or bad values raise ParameterError."""
        if not isinstance(data, Mapping):
            raise ParameterError("conversion", f"{{param}} must be a mapping, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ParameterError("conversion", f"{{param}} has unknown key(s) {', '.join(unknown)}")
        values = dict(data)
        mode = str(values.get("mode", cls.mode))
        if "resample_at" not in values and "resample_at" in mode_options(mode):
            values["resample_at"] = "layer"  # saved before the option existed: the one placement there was
        if "spectral_convention" not in values and mode in CONVENTION_BEFORE_THE_OPTION:
            values["spectral_convention"] = CONVENTION_BEFORE_THE_OPTION[mode]  # as it was built then
        if "leaf_modules" in values:
            leaves = values["leaf_modules"]
            if not isinstance(leaves, (list, tuple)):
                raise ParameterError("conversion", "{param}: leaf_modules must be a list of names")
            values["leaf_modules"] = tuple(leaves)
        return cls(**values)

    def describe(self) -> str:
        """``sampler=lattice, keep_first=0``: the options that matter for this mode."""
        shown = asdict(self)
        shown.pop("mode")
        for key in MODE_OPTIONS:
            if key not in mode_options(self.mode):
                shown.pop(key)
        if self.leaf_modules:
            shown["leaf_modules"] = ",".join(self.leaf_modules)
        return ", ".join(f"{k}={v}" for k, v in shown.items() if v not in (None, (), ""))


def check_options_used(modes: Sequence[str], **given: Any) -> None:
    """Refuse a mode-specific option (sampler, density, seed, edges, dilation, smoothness,
    blur_size, resample_at, spectral_convention) that no requested mode takes, and a keep_first
    above 0 when no mode converts: they would do nothing. Dilated mode is always exact at the edges, so ``edges`` does nothing there."""
    if given.get("phc") is not None and all(mode == ORIGINAL for mode in modes):
        raise ParameterError("phc", "{param} makes a conversion's convolutions PHC layers; it does nothing with "
                                    "mode original (the unconverted model)")
    if given.get("keep_first") and all(mode in (ORIGINAL, "traditional") for mode in modes):
        raise ParameterError("keep_first", f"{{param}} leaves the first steps of a conversion traditional; it "
                                           f"does nothing with {', '.join(modes)}")
    for name in MODE_OPTIONS:
        if given.get(name) is None:
            continue
        if any(name in mode_options(mode) for mode in modes):
            continue
        takers = " or ".join(mode for mode in CONVERSION_MODES if name in mode_options(mode))
        what = "shapes checkered submaps" if takers == "checkered" else f"applies to mode {takers}"
        raise ParameterError(name, f"{{param}} only {what}; no {takers} mode among {', '.join(modes)}")


check_checkered_options_used = check_options_used  # its name before the table of modes


def check_modes(modes: Sequence[str], allowed: Sequence[str] = MODES) -> list[str]:
    """Validated, lower-cased, de-duplicated modes in the given order."""
    checked: list[str] = []
    for mode in (str(m).strip().lower() for m in modes):
        if mode not in allowed:
            raise ParameterError("modes", f"unknown mode {mode!r} in {{param}}; choose from {', '.join(allowed)}")
        if mode not in checked:
            checked.append(mode)
    if not checked:
        raise ParameterError("modes", "{param} is empty")
    return checked
