"""Multisampling layers: strided convolutions and pools that keep several samples per window.

Where submaps live
------------------
Submaps are folded into the batch dimension, submap-major: a tensor carrying ``S`` submaps of a
batch of ``B`` images has shape ``(S * B, C, H, W)`` and row ``s * B + b`` is submap ``s`` of
image ``b``. Every unchanged layer (convolution, norm, activation, residual add, concatenation)
therefore runs on all submaps in one batched call, and BatchNorm in training mode takes its
statistics over batch, submaps and positions.

How a sample is computed
------------------------
The sample at window offset ``(dy, dx)`` is the layer, with its own stride, applied to its padded
input shifted by ``(dy, dx)`` and filled at the far edge with the layer's padding value (0 for
convolutions and average pools, -inf for max pools), so every submap has the traditional output
size. A layer with ``n`` samples on ``S`` submaps gathers the ``n * S`` shifted windows it needs
in one indexing op and then runs the original strided op once on the ``n * S * B`` batch: each
needed sample is computed exactly once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import sequences
from .edges import EdgeCounts, counted_map, pair

__all__ = [
    "IntPair", "MultisampleAvgPool2d", "MultisampleConv2d", "MultisampleMaxPool2d", "SubmapSampler",
    "MULTISAMPLE_FUNCTIONS", "MULTISAMPLE_MODULES", "multisample_avg_pool2d", "multisample_conv2d",
    "multisample_max_pool2d", "pair", "pooled_size",
    "submap_amax", "submap_mean", "submap_repeat",
]

IntPair = tuple[int, int]


def pooled_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """Traditional output length of a conv/pool along one axis (PyTorch's own formula)."""
    span = dilation * (kernel - 1) + 1
    numerator = size + 2 * pad - span + (stride - 1 if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


# --------------------------------------------------------------------------- submap bookkeeping


def submap_mean(x: Tensor, submaps: int) -> Tensor:
    """Average the ``submaps`` submaps of every image: ``(S*B, ...) -> (B, ...)``."""
    return x.reshape(submaps, -1, *x.shape[1:]).mean(dim=0)


def submap_amax(x: Tensor, submaps: int) -> Tensor:
    """Maximum over the submaps of every image (for global max pools)."""
    return x.reshape(submaps, -1, *x.shape[1:]).amax(dim=0)


def submap_repeat(x: Tensor, submaps: int) -> Tensor:
    """Give a one-map-per-image tensor to every submap: ``(B, ...) -> (S*B, ...)``."""
    return x.repeat(submaps, *([1] * (x.dim() - 1)))


# --------------------------------------------------------------------------- window gathering


def _gather_windows(x: Tensor, table: Tensor, size: IntPair) -> Tensor:
    """Crop a ``size`` window at each ``(dy, dx)`` of ``table`` from the padded input.

    ``x`` is ``(S*B, C, H, W)``; ``table`` is ``(n, S, 3)`` of ``[submap, dy, dx]``. Returns
    ``(n*S*B, C, h, w)`` ordered sample-major, so sample ``j`` of submap ``i`` is submap ``j*S+i``.
    """
    n, submaps, _ = table.shape
    h, w = size
    # Offsets next to the submap axis, so the indexed axes lead and the result needs no transpose
    # (an exported graph would otherwise transpose every window before gathering).
    grouped = x.reshape(submaps, -1, *x.shape[1:]).permute(0, 3, 4, 1, 2)  # (S, H, W, B, C), a view
    windows = grouped.unfold(1, h, 1).unfold(2, w, 1)  # (S, dy, dx, B, C, h, w), a view
    crops = windows[table[..., 0], table[..., 1], table[..., 2]]  # (n, S, B, C, h, w)
    return crops.reshape(-1, *crops.shape[3:])


def _gather_phases(x: Tensor, table: Tensor, stride: IntPair, size: IntPair) -> Tensor:
    """Like :func:`_gather_windows` for ops that read one phase only (1x1 kernels).

    Keeps only rows ``dy + k*m`` and columns ``dx + k*m``: ``k*k`` times less copying.
    """
    n, submaps, _ = table.shape
    (kh, kw), (h, w) = stride, size
    grouped = x[..., : h * kh, : w * kw].reshape(submaps, -1, x.shape[1], h, kh, w, kw)
    phases = grouped.permute(0, 4, 6, 1, 2, 3, 5)  # (S, dy, dx, B, C, h, w), a view; see above
    crops = phases[table[..., 0], table[..., 1], table[..., 2]]  # (n, S, B, C, h, w)
    return crops.reshape(-1, *crops.shape[3:])


def _pad(x: Tensor, before: IntPair, after: IntPair, value: float, mode: str = "constant") -> Tensor:
    """Pad H by ``before[0]/after[0]`` and W by ``before[1]/after[1]``."""
    if not any(before) and not any(after):
        return x
    pads = (before[1], after[1], before[0], after[0])
    if mode == "constant":
        return F.pad(x, pads, value=value)
    return F.pad(x, pads, mode=mode)


class _Window:
    """Geometry of one strided layer on one input size: padding, crop size, gather strategy."""

    def __init__(self, in_hw: IntPair, kernel: IntPair, stride: IntPair, padding: IntPair,
                 dilation: IntPair, ceil_mode: bool = False):
        self.stride, self.kernel, self.dilation = stride, kernel, dilation
        self.out = tuple(
            pooled_size(in_hw[a], kernel[a], stride[a], padding[a], dilation[a], ceil_mode) for a in (0, 1)
        )
        # A kernel whose taps all fall on one phase of the stride reads a sub-grid only.
        self.single_phase = all(kernel[a] == 1 or dilation[a] % stride[a] == 0 for a in (0, 1))
        if self.single_phase:
            self.crop = tuple(self.out[a] + (kernel[a] - 1) * dilation[a] // stride[a] for a in (0, 1))
            needed = tuple(self.crop[a] * stride[a] for a in (0, 1))
        else:
            self.crop = tuple((self.out[a] - 1) * stride[a] + dilation[a] * (kernel[a] - 1) + 1 for a in (0, 1))
            needed = tuple(self.crop[a] + stride[a] - 1 for a in (0, 1))
        padded = tuple(in_hw[a] + 2 * padding[a] for a in (0, 1))
        # Far-edge fill so that every shifted window exists.
        self.fill = tuple(max(0, needed[a] - padded[a]) for a in (0, 1))

    def gather(self, padded: Tensor, table: Tensor) -> Tensor:
        if self.single_phase:
            return _gather_phases(padded, table, self.stride, self.crop)
        return _gather_windows(padded, table, self.crop)

    @property
    def op_stride(self) -> IntPair:
        return (1, 1) if self.single_phase else self.stride

    @property
    def op_dilation(self) -> IntPair:
        if self.single_phase:
            return tuple(max(1, self.dilation[a] // self.stride[a]) for a in (0, 1))
        return self.dilation


# --------------------------------------------------------------------------- functional ops


def multisample_conv2d(x: Tensor, table: Tensor, weight: Tensor, bias: Tensor | None,
                       stride, padding, dilation, groups: int, padding_mode: str = "zeros") -> Tensor:
    """``F.conv2d`` that keeps the samples listed in ``table`` (see module docstring)."""
    kernel = (weight.shape[2], weight.shape[3])
    stride, dilation = pair(stride), pair(dilation)
    padding = (0, 0) if padding == "valid" else pair(padding)
    geo = _Window((x.shape[2], x.shape[3]), kernel, stride, padding, dilation)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    padded = _pad(x, padding, padding, 0.0, mode)
    padded = _pad(padded, (0, 0), geo.fill, 0.0)
    crops = geo.gather(padded, table)
    return F.conv2d(crops, weight, bias, geo.op_stride, 0, geo.op_dilation, groups)


def multisample_max_pool2d(x: Tensor, table: Tensor, kernel_size, stride=None, padding=0,
                           dilation=1, ceil_mode: bool = False) -> Tensor:
    """``F.max_pool2d`` that keeps the samples listed in ``table``."""
    kernel = pair(kernel_size)
    stride = kernel if stride is None or stride == [] or stride == () else pair(stride)
    padding, dilation = pair(padding), pair(dilation)
    geo = _Window((x.shape[2], x.shape[3]), kernel, stride, padding, dilation, ceil_mode)
    padded = _pad(x, padding, (padding[0] + geo.fill[0], padding[1] + geo.fill[1]), -math.inf)
    crops = geo.gather(padded, table)
    return F.max_pool2d(crops, kernel, geo.op_stride, 0, geo.op_dilation)


def multisample_avg_pool2d(x: Tensor, table: Tensor, kernel_size, stride=None, padding=0,
                           ceil_mode: bool = False, count_include_pad: bool = True,
                           divisor_override: int | None = None, edges: EdgeCounts | None = None) -> Tensor:
    """``F.avg_pool2d`` that keeps the samples listed in ``table``.

    The far-edge fill is treated like the layer's padding: zeros that count in the divisor
    exactly when ``count_include_pad`` does (the reference implementation's zero fill).
    With ``edges`` (exact edges; ``x`` already masked) the divisor counts what the dense
    network counts: real positions, plus the padding around them with ``count_include_pad``.
    """
    kernel = pair(kernel_size)
    stride = kernel if stride is None or stride == [] or stride == () else pair(stride)
    padding = pair(padding)
    geo = _Window((x.shape[2], x.shape[3]), kernel, stride, padding, (1, 1), ceil_mode)
    after = (padding[0] + geo.fill[0], padding[1] + geo.fill[1])
    crops = geo.gather(_pad(x, padding, after, 0.0), table)
    if edges is not None and edges.full and not (ceil_mode and count_include_pad):
        edges = None  # the counts below come out the same
    constant = count_include_pad and (edges is None or not ceil_mode)
    if divisor_override or constant or (padding == (0, 0) and geo.fill == (0, 0) and edges is None):
        # Every window lies inside the padded, filled input: the divisor is constant.
        return F.avg_pool2d(crops, kernel, geo.op_stride, 0, divisor_override=divisor_override)
    summed = F.avg_pool2d(crops, kernel, geo.op_stride, 0, divisor_override=1)
    if edges is None:
        real = _pad(x.new_ones((table.shape[1], 1, x.shape[2], x.shape[3])), padding, after, 0.0)
    else:
        size = (x.shape[2] + padding[0] + after[0], x.shape[3] + padding[1] + after[1])
        real = counted_map(edges, padding, size, count_include_pad, x.dtype, x.device)
    return _divide_by_counts(summed, real, table, geo)


def _divide_by_counts(summed: Tensor, real: Tensor, table: Tensor, geo: _Window) -> Tensor:
    """Divide window sums by how many counted positions (``real``, padded) each window covers."""
    n, submaps, _ = table.shape
    counts = F.avg_pool2d(geo.gather(real, table), geo.kernel, geo.op_stride, 0, divisor_override=1)
    per_submap = summed.reshape(n, submaps, -1, *summed.shape[1:])
    # A window lying wholly in the far-edge fill has no real position: it averages to 0.
    counts = counts.reshape(n, submaps, 1, *counts.shape[1:]).clamp(min=1)
    return (per_submap / counts).reshape(summed.shape)


# --------------------------------------------------------------------------- modules


class SubmapSampler(nn.Module):
    """The sampler table of one subsampling step, shared by every strided layer of that step.

    Its output feeds all layers of the step, so parallel branches (a ResNet block's strided conv
    and its strided shortcut) sample identically and their submaps line up. With the ``random``
    sequence, a new table is drawn on every forward in training mode; eval mode uses the table
    drawn at conversion (reproducible with ``seed``).
    """

    def __init__(self, kind: str, submaps: int, stride: int, samples: int, seed: int | None = None):
        super().__init__()
        self.kind, self.submaps, self.stride, self.samples = kind, submaps, stride, samples
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        table = sequences.offset_table(sequences.sampler_sequence(kind, submaps, stride, samples, generator))
        # Not persistent: the state_dict of a converted model stays the original model's.
        self.register_buffer("table", table, persistent=False)

    def forward(self) -> Tensor:
        if self.kind == "random" and self.training:
            sequence = sequences.sampler_sequence("random", self.submaps, self.stride, self.samples)
            return sequences.offset_table(sequence).to(self.table.device)
        return self.table

    def extra_repr(self) -> str:
        return f"{self.kind}, submaps={self.submaps}, stride={self.stride}, samples={self.samples}"


class MultisampleConv2d(nn.Module):
    """A strided ``nn.Conv2d`` that keeps several samples per window.

    Holds the original layer's ``weight`` and ``bias`` under the same names, so a converted
    model's state_dict has exactly the original's keys and values.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups, self.padding_mode = conv.groups, conv.padding_mode
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size

    def forward(self, x: Tensor, table: Tensor) -> Tensor:
        return multisample_conv2d(x, table, self.weight, self.bias, self.stride, self.padding,
                                  self.dilation, self.groups, self.padding_mode)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class MultisampleMaxPool2d(nn.Module):
    """A strided ``nn.MaxPool2d`` that keeps several samples per window."""

    def __init__(self, pool: nn.MaxPool2d):
        super().__init__()
        self.kernel_size, self.stride, self.padding = pool.kernel_size, pool.stride, pool.padding
        self.dilation, self.ceil_mode = pool.dilation, pool.ceil_mode

    def forward(self, x: Tensor, table: Tensor) -> Tensor:
        return multisample_max_pool2d(x, table, self.kernel_size, self.stride, self.padding,
                                      self.dilation, self.ceil_mode)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MultisampleAvgPool2d(nn.Module):
    """A strided ``nn.AvgPool2d`` that keeps several samples per window."""

    def __init__(self, pool: nn.AvgPool2d):
        super().__init__()
        self.kernel_size, self.stride, self.padding = pool.kernel_size, pool.stride, pool.padding
        self.ceil_mode, self.count_include_pad = pool.ceil_mode, pool.count_include_pad
        self.divisor_override = pool.divisor_override

    def forward(self, x: Tensor, table: Tensor, edges: EdgeCounts | None = None) -> Tensor:
        return multisample_avg_pool2d(x, table, self.kernel_size, self.stride, self.padding,
                                      self.ceil_mode, self.count_include_pad, self.divisor_override, edges)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


# The multisampling form of each strided op, as a function and as a module: the rewrite inserts
# them, the edge pass and the feature extractor recognise them.
MULTISAMPLE_FUNCTIONS = {"conv2d": multisample_conv2d, "max_pool2d": multisample_max_pool2d,
                         "avg_pool2d": multisample_avg_pool2d}
MULTISAMPLE_MODULES = {"conv2d": MultisampleConv2d, "max_pool2d": MultisampleMaxPool2d,
                       "avg_pool2d": MultisampleAvgPool2d}
