"""DiffStride (Riad et al., ICLR 2022, "Learning strides in convolutional neural networks").

Spectral pooling whose stride is learned. For a ``H x W`` map and strides ``(S_h, S_w)``:

* every frequency position gets the mask ``clip((R + T - pos) / R, 0, 1)``, ``R`` the
  smoothness (ramp width, in positions). Over the ``W//2 + 1`` rfft columns ``pos`` is the
  column index and ``T = W / (2 S_w) + 1``; over the rows ``pos`` counts from zero on both
  sides (row ``k`` is at ``min(k, H-1-k)``: frequency ``-f`` sits at ``f - 1``, as in the
  authors' implementation) and ``T = H / (2 S_h)``;
* the spectrum is multiplied by the mask, cropped to the positions where the mask is above 0,
  and taken back with ``irfft2``: ``h`` rows (the first and last ``ceil(R + T_h)``, or all) and
  ``w = 2 (c - 1)`` columns for ``c`` kept rfft columns, ``irfft2``'s default length, also when
  all are kept (an odd ``W`` then comes out ``W - 1`` wide).
  With R = 4 a 28x28 map at stride 2 keeps 22x22.
* The strides are clipped to ``[1, size/2]`` (at least 2 positions per axis); the mask carries
  the gradient to the strides; the crop (sizes) does not, as in the paper.
* Both clips pass the gradient at their bounds, as ``tf.clip_by_value`` does. At an integer
  stride (every initialisation) a mask position sits exactly on the ramp's top, where the loss
  has a kink: the gradient is then the right-hand derivative (stride growing).

``convention`` (:data:`~.spectral.CONVENTIONS`) says how the crop is taken back:

* ``"published"`` (the default): as the authors' code does, described above: the crop of
  :func:`~.spectral.crop_low` with input row ``-h/2`` as the output's Nyquist row, times its mask.
* ``"symmetric"``: the real part of the full complex crop (the Nyquist row of an even ``h`` is
  the mean of rows ``+h/2`` and ``-h/2``, times the mask of the kept one), and a map whose rfft
  columns are all kept keeps its width ``W`` (odd included).

The diffstride conversion mode builds each layer with the conversion's ``spectral_convention``
(default :data:`~.spectral.MODE_CONVENTION`, ``"published"``: measured, the two gave the same
top-1 on the pretrained sample; its comment).

The DFT pair keeps constants (``norm="forward"``). The authors' TensorFlow layer uses the
unnormalized pair: its values are ours times ``H*W / (h*w)``. With ``R`` near 0 and an integer
stride every kept position has mask 1, so the layer equals ``spectral_pool(x, (h, w), convention)``.

In eval mode the strides are read once (when switching to eval, or loading a state_dict in
eval mode) as Python numbers: the crop sizes and the mask are then constants, so ``torch.export``
and ONNX see a fixed graph.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .layers import pair
from .options import DEFAULT_SMOOTHNESS
from .spectral import Convention, check_convention, crop_low

__all__ = ["DiffStride2d", "check_strides", "diffstride_cost", "diffstride_layers", "diffstride_mask", "kept_size", "row_positions"]


def row_positions(height: int) -> list[int]:
    """Position of each FFT row: counted from zero at both ends (``min(k, H-1-k)``)."""
    return [min(k, height - 1 - k) for k in range(height)]


def check_strides(strides: Sequence) -> str | None:
    """None if ``strides`` are numbers a layer can use (finite, >= 1), else the offending values shown."""
    if all(isinstance(s, (int, float)) and not isinstance(s, bool) and 1 <= s < math.inf for s in strides):
        return None
    return "(" + ", ".join(f"{s:g}" if isinstance(s, float) else repr(s) for s in strides) + ")"


def _clipped(stride: float, size: int) -> float:
    return min(max(stride, 1.0), max(1.0, size / 2))


def kept_size(height: int, width: int, strides: Sequence[float], smoothness: float,
              convention: Convention = "published") -> tuple[int, int]:
    """The output size for these strides (before clipping), this smoothness and convention."""
    s_h, s_w = _clipped(strides[0], height), _clipped(strides[1], width)
    rows = math.ceil(smoothness + height / (2 * s_h))  # positions 0 .. rows-1 have mask > 0, both sides
    h = height if 2 * rows >= height else 2 * rows
    columns = min(math.ceil(smoothness + width / (2 * s_w) + 1), width // 2 + 1)
    if columns == width // 2 + 1 and (convention == "symmetric" or width == 1):
        return h, width  # a 1-wide map stays 1 wide: irfft2's default length would be 0
    return h, 2 * (columns - 1)


def clip_passing(x: Tensor, low: float, high: float) -> Tensor:
    """``x.clamp(low, high)`` whose gradient passes at the bounds too (``tf.clip_by_value``'s;
    torch's clamp stops it there)."""
    inside = (x >= low) & (x <= high)
    return torch.where(inside, x, x.detach().clamp(low, high))


def diffstride_mask(height: int, width: int, strides: Tensor, smoothness: float) -> tuple[Tensor, Tensor]:
    """The mask over the ``height`` FFT rows and the ``width // 2 + 1`` rfft columns (the 2-D mask
    is their outer product), for ``strides`` (a 2-value tensor: the gradient flows through it)."""
    dtype, device = strides.dtype, strides.device
    s_h = clip_passing(strides[0], 1.0, max(1.0, height / 2))
    s_w = clip_passing(strides[1], 1.0, max(1.0, width / 2))
    rows = torch.tensor(row_positions(height), dtype=dtype, device=device)
    columns = torch.arange(width // 2 + 1, dtype=dtype, device=device)
    # (R + T - pos) / R written as 1 + (T - pos) / R: exact at pos == T however small R is
    row_mask = clip_passing(1 + (height / (2 * s_h) - rows) / smoothness, 0.0, 1.0)
    column_mask = clip_passing(1 + (width / (2 * s_w) + 1 - columns) / smoothness, 0.0, 1.0)
    return row_mask, column_mask


class DiffStride2d(nn.Module):
    """DiffStride pooling with a learnable ``strides`` parameter (height, width). ``convention``:
    ``"published"`` (the authors' crop and output width) or ``"symmetric"`` (the module's
    docstring)."""

    def __init__(self, stride: float | Sequence[float] = 2.0, smoothness: float = DEFAULT_SMOOTHNESS,
                 convention: Convention = "published"):
        super().__init__()
        first = pair(stride) if isinstance(stride, int) else tuple(stride) if isinstance(stride, (tuple, list)) \
            else (stride, stride)
        if len(first) != 2 or check_strides(first) is not None:
            raise ValueError(f"DiffStride2d: stride must be one or two numbers >= 1, got {stride!r}")
        if isinstance(smoothness, bool) or not isinstance(smoothness, (int, float)) or not 0 < smoothness < math.inf:
            raise ValueError(f"DiffStride2d: smoothness must be a positive number, got {smoothness!r}")
        check_convention("DiffStride2d", convention)
        self.convention: Convention = convention
        self.strides = nn.Parameter(torch.tensor([float(s) for s in first]))
        self.smoothness = float(smoothness)
        self._frozen: tuple[float, float] | None = None
        self.register_load_state_dict_post_hook(_refreeze)

    def train(self, mode: bool = True) -> "DiffStride2d":
        super().train(mode)
        self._freeze()
        return self

    def _freeze(self) -> None:
        self._frozen = None if self.training else tuple(float(s) for s in self.strides.detach().tolist())

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """The output size for a ``height x width`` map at the current strides."""
        strides = self._frozen if self._frozen is not None else self.strides.detach().tolist()
        return kept_size(height, width, strides, self.smoothness, self.convention)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        h, w = self.output_size(height, width)
        spectrum = crop_low(torch.fft.rfft2(x, norm="forward"), (height, width), (h, w), self.convention)
        row_mask, column_mask = self._masks(height, width, h, w, spectrum.real.dtype, x.device)
        spectrum = spectrum * row_mask[:, None] * column_mask[None, :]
        return torch.fft.irfft2(spectrum, s=(h, w), norm="forward")

    def _masks(self, height: int, width: int, h: int, w: int, dtype: torch.dtype,
               device: torch.device) -> tuple[Tensor, Tensor]:
        """The mask at the kept rows and columns; differentiable in the strides when training."""
        if self._frozen is not None:
            strides = torch.tensor(self._frozen, dtype=dtype, device=device)
        else:
            strides = self.strides.to(dtype)
        rows, columns = diffstride_mask(height, width, strides, self.smoothness)
        if h < height:
            kept = torch.tensor([*range((h + 1) // 2), *range(height - h // 2, height)], device=device)
            rows = rows[kept]
        return rows, columns[: w // 2 + 1]

    def extra_repr(self) -> str:
        strides = ", ".join(f"{s:.3g}" for s in self.strides.detach().tolist())
        return f"strides=({strides}), smoothness={self.smoothness:g}, convention={self.convention}"


def _refreeze(module: DiffStride2d, _incompatible_keys) -> None:
    """After load_state_dict: an eval-mode layer reads its new strides (a plain function: picklable)."""
    module._freeze()


def diffstride_layers(model: nn.Module) -> list[tuple[str, DiffStride2d]]:
    """The model's DiffStride layers, ``(name, module)``, in registration (= data-flow) order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, DiffStride2d)]


def diffstride_cost(model: nn.Module) -> Tensor:
    """The paper's complexity regulariser: sum over DiffStride layers, in data-flow order, of the
    fraction of positions left after it, ``prod_{i <= l} 1 / (S_h^i S_w^i)`` (the cost of the
    layers that follow scales with it). Differentiable in the strides; 0 without such layers."""
    total = torch.zeros(())
    fraction = torch.ones(())
    for _, layer in diffstride_layers(model):
        strides = layer.strides.clamp(min=1.0)
        fraction = fraction.to(strides) / (strides[0] * strides[1])
        total = total.to(strides) + fraction
    return total
