"""The one table of conversion modes: what each computes, what it costs, which options it takes.

Everything that lists modes or per-mode options is derived from :data:`MODES`:
:data:`~.options.CONVERSION_MODES`, the option checks of :func:`~.options.check_options`,
:class:`~ccnn_convert.spec.ConversionSpec` (which options carry over to which mode) and the
README's table of modes (:func:`modes_table`). :func:`~.rewrite.convert` dispatches to
:attr:`Mode.converter`.

Options every mode takes (``keep_first``, ``example_input``, ``leaf_modules``) are not listed;
:attr:`Mode.options` are the mode-specific ones. ``edges="exact"`` is also accepted by dilated
mode, which is always exact (:func:`~.options.check_options`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

__all__ = ["MODES", "MODE_OPTIONS", "Mode", "RESAMPLING_MODES", "mode_options", "modes_table"]


@dataclass(frozen=True)
class Mode:
    """One conversion mode."""

    name: str
    computes: str  # one line: what a converted subsampling layer computes
    cost: str  # one line: time and memory against the original
    training: str  # whether the mode needs training to be useful, in a few words
    options: tuple[str, ...]  # mode-specific options of convert() it takes
    converter_path: str  # "module:function" under ccnn_convert.core (imported on use: no cycles)

    @property
    def converter(self) -> Callable:
        """The function that converts a model in this mode: ``f(model, mode=..., **options)``."""
        module, _, function = self.converter_path.partition(":")
        return getattr(importlib.import_module(module, __package__), function)


_MULTISAMPLE = ".rewrite:convert_multisample"
_DOWNSAMPLE = ".downsample:convert_downsample"

MODES: dict[str, Mode] = {mode.name: mode for mode in (
    Mode("checkered", "k samples per k x k window (n-rooks), each in its own submap; submaps averaged "
                      "before the classifier",
         "about k times the compute per converted step (submaps)", "no",
         ("sampler", "density", "seed", "edges"), _MULTISAMPLE),
    Mode("dilated", "every sample: the stride removed and later layers dilated (one full-resolution map)",
         "about k*k times the compute per converted step", "no", ("dilation",), _MULTISAMPLE),
    Mode("traditional", "nothing changes (the traced model as it is)", "same as the original", "no", (),
         _MULTISAMPLE),
    Mode("spectral", "the layer at stride 1, then fixed spectral pooling (rfft2, keep the low "
                     "frequencies, irfft2) to the original output size; an even size's Nyquist row as "
                     "spectral_convention says: published, the default, keeps input row -h/2 as the "
                     "published layer does; symmetric takes the mean of rows +h/2 and -h/2",
         "the layer at stride 1 (k*k its cost) plus two FFTs per map",
         "runs without; a pretrained network loses accuracy until fine-tuned", ("resample_at", "spectral_convention"),
         _DOWNSAMPLE),
    Mode("diffstride", "the layer at stride 1, then DiffStride: spectral pooling with a learnable "
                       "stride per axis (smooth mask in the Fourier domain); spectral_convention published by "
                       "default: crop and inverse as the authors' layer",
         "the layer at stride 1 plus two FFTs; later layers follow the learned strides",
         "to learn its strides (untrained: the original ones)",
         ("smoothness", "resample_at", "spectral_convention"), _DOWNSAMPLE),
    Mode("blurpool", "the layer at stride 1, then a depthwise binomial blur with the stride "
                     "(antialiased-cnns' BlurPool)",
         "the layer at stride 1 plus a depthwise blur",
         "runs without; a pretrained network loses accuracy until fine-tuned", ("blur_size", "resample_at"), _DOWNSAMPLE),
)}

# The modes that run a layer at stride 1 and resample its output (no submaps, no grid of samples).
RESAMPLING_MODES: tuple[str, ...] = tuple(name for name, mode in MODES.items() if mode.converter_path == _DOWNSAMPLE)

# Every mode-specific option, in the order convert() takes them.
MODE_OPTIONS: tuple[str, ...] = ("sampler", "density", "seed", "edges", "dilation", "smoothness", "blur_size",
                                  "resample_at", "spectral_convention")


def mode_options(mode: str) -> tuple[str, ...]:
    """The mode-specific options ``mode`` takes (empty for an unknown mode)."""
    entry = MODES.get(mode)
    return entry.options if entry else ()


def modes_table() -> str:
    """The README's table of modes, as Markdown."""
    lines = ["| mode | computes | cost | training | options |", "| --- | --- | --- | --- | --- |"]
    for mode in MODES.values():
        options = ", ".join(f"`{name}`" for name in mode.options) or "-"
        lines.append(f"| `{mode.name}` | {mode.computes} | {mode.cost} | {mode.training} | {options} |")
    return "\n".join(lines)
