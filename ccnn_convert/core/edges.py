"""Exact edges: which samples of a multisampled map lie inside the image, and padding for the rest.

Why
---
A multisampling layer gives every submap the traditional output size. When a size along the
way is not divisible by the stride, a sample at offset ``dy > 0`` may need the far-edge fill:
its window reaches past the (padded) input. Such a sample lies *outside* the image. In a dilated
network it does not exist; later layers read zero padding there. With ``edges="exact"`` these
samples are padding for every later layer: zero for convolutions and average pools, -inf for
max pools, left out of ``count_include_pad=False`` divisors, of global pools and of the
submap average.

How
---
In each submap the real positions are a prefix of the rows and a prefix of the columns, so one
pair of counts per submap describes them: :class:`EdgeCounts`. The rewrite pass
(:mod:`.edge_pass`) threads an ``EdgeCounts`` value through the graph beside every feature map;
the functions here compute it from the run-time input size (plain Python ints) and mask a map
with it. A map whose counts equal its size is *full*: masking returns it untouched, so where
every size divides evenly (224 for the usual networks) no tensor op is added.

The rule for one layer (kernel ``K``, dilation ``d``, padding ``p`` before and ``q`` after,
stride ``k``) on a submap with ``r`` real rows: a window starting at padded row ``j`` is real
when it lies inside the padded real input, ``j + d(K-1) < r + p + q``; with ``ceil_mode`` also
when it starts inside the input or its left padding, ``j < r + p`` (PyTorch's ceil rule). Sample
``m`` of offset ``dy`` starts at ``j = dy + k*m``; a traditional layer has ``dy = 0``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AxisGeometry", "EdgeCounts", "counted_map", "edges_after", "edges_input", "edges_pad", "edges_reset",
    "exact_avg_pool2d", "first_tensor", "geometry", "pair", "global_submap_mean", "mask_edges", "masked_submap_mean",
]


class EdgeCounts(NamedTuple):
    """Real rows and columns of each submap (submap-major, as the batch is), and the map size."""

    rows: tuple[int, ...]
    cols: tuple[int, ...]
    height: int
    width: int

    @property
    def full(self) -> bool:
        return all(r == self.height for r in self.rows) and all(c == self.width for c in self.cols)

    @property
    def submaps(self) -> int:
        return len(self.rows)


class AxisGeometry(NamedTuple):
    """One axis of a conv or pool: kernel, stride, dilation, padding before/after, ceil_mode."""

    kernel: int
    stride: int
    dilation: int
    before: int
    after: int
    ceil_mode: bool = False

    @property
    def span(self) -> int:
        return self.dilation * (self.kernel - 1) + 1

    def out_size(self, size: int) -> int:
        """PyTorch's output length for an input of ``size``."""
        padded = size + self.before + self.after
        out = (padded - self.span + (self.stride - 1 if self.ceil_mode else 0)) // self.stride + 1
        if self.ceil_mode and (out - 1) * self.stride >= size + self.before:
            out -= 1
        return out

    def real_starts(self, real: int) -> int:
        """Window starts (padded coordinates) below this bound are real for ``real`` real inputs."""
        limit = real + self.before + self.after - self.span + 1
        return max(limit, real + self.before) if self.ceil_mode else limit

    def real_samples(self, real: int, offset: int, out: int) -> int:
        """How many of the ``out`` samples ``offset + stride*m`` are real."""
        limit = self.real_starts(real) - offset
        return min(out, max(0, -(-limit // self.stride)))


def pair(value: int | Sequence[int]) -> tuple[int, int]:
    """``3 -> (3, 3)``, ``[3] -> (3, 3)``, ``(3, 5) -> (3, 5)``: PyTorch's size arguments as a pair."""
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def geometry(kernel, stride, padding, dilation=(1, 1), ceil_mode: bool = False) -> tuple[AxisGeometry, AxisGeometry]:
    """Both axes of a layer from PyTorch's arguments (``padding`` may be ``"same"``/``"valid"``)."""
    kernel, stride, dilation = pair(kernel), pair(stride), pair(dilation)
    axes = []
    for a in (0, 1):
        if padding == "valid":
            before = after = 0
        elif padding == "same":
            total = dilation[a] * (kernel[a] - 1)
            before, after = total // 2, total - total // 2
        else:
            before = after = pair(padding)[a]
        axes.append(AxisGeometry(kernel[a], stride[a], dilation[a], before, after, bool(ceil_mode)))
    return axes[0], axes[1]


# --------------------------------------------------------------------------- propagation


def edges_input(x: Tensor) -> EdgeCounts:
    """The input image: one submap, every position real."""
    return EdgeCounts((x.shape[-2],), (x.shape[-1],), x.shape[-2], x.shape[-1])


def edges_after(edges: EdgeCounts, axes: tuple[AxisGeometry, AxisGeometry],
                offsets: Sequence[Sequence[Sequence[int]]] | Tensor | None = None) -> EdgeCounts:
    """Counts after a layer with geometry ``axes``.

    ``offsets`` is None for a traditional layer (one sample at offset 0), else the sampler table
    ``offsets[j][i] = (dy, dx)``: sample ``j`` of submap ``i`` becomes submap ``j*S + i``.
    """
    rows_geo, cols_geo = axes
    height, width = rows_geo.out_size(edges.height), cols_geo.out_size(edges.width)
    if offsets is None:
        if edges.full and _full_after(edges, axes):
            return EdgeCounts((height,) * edges.submaps, (width,) * edges.submaps, height, width)
        offsets = [[(0, 0)] * edges.submaps]
    elif isinstance(offsets, Tensor):  # the random sampler in training mode: drawn on every forward
        offsets = offsets[..., 1:].tolist()
    rows, cols = [], []
    for sample in offsets:
        for i, (dy, dx) in enumerate(sample):
            rows.append(rows_geo.real_samples(edges.rows[i], dy, height))
            cols.append(cols_geo.real_samples(edges.cols[i], dx, width))
    return EdgeCounts(tuple(rows), tuple(cols), height, width)


def _full_after(edges: EdgeCounts, axes: tuple[AxisGeometry, AxisGeometry]) -> bool:
    """A traditional layer on a full map gives a full map (every window starts at a real place)."""
    return all(axis.real_samples(size, 0, axis.out_size(size)) == axis.out_size(size)
               for axis, size in zip(axes, (edges.height, edges.width)))


def edges_pad(edges: EdgeCounts, pads: Sequence[int]) -> EdgeCounts:
    """Counts after ``F.pad(x, pads)`` with zeros: the pad is zero padding, so it counts as real."""
    left, right, top, bottom = (list(pads) + [0, 0, 0, 0])[:4]
    height, width = edges.height + top + bottom, edges.width + left + right
    return EdgeCounts(tuple(min(height, r + top + bottom) for r in edges.rows),
                      tuple(min(width, c + left + right) for c in edges.cols), height, width)


def edges_reset(edges: EdgeCounts, out: Tensor | Sequence[Tensor], spatial: tuple[int, int] = (-2, -1)) -> EdgeCounts:
    """An op the pass cannot follow (its input was masked): every output position counts as real.

    ``out`` may be a tuple of maps (``chunk``, ``split``); ``spatial`` names the spatial axes.
    """
    first = first_tensor(out)
    height, width = (first.shape[spatial[0]], first.shape[spatial[1]]) if first is not None else \
        (edges.height, edges.width)
    return EdgeCounts((height,) * edges.submaps, (width,) * edges.submaps, height, width)


def first_tensor(value) -> Tensor | None:
    """``value`` if it is a tensor, else the first tensor of a tuple or list of them."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((item for item in value if isinstance(item, Tensor)), None)
    return None


# --------------------------------------------------------------------------- masks


def _real_mask(edges: EdgeCounts, device: torch.device, start: tuple[int, int] = (0, 0),
               extra: tuple[int, int] = (0, 0), size: tuple[int, int] | None = None) -> Tensor:
    """``(S, 1, H, W)`` boolean mask: rows ``[start, start + r + extra)`` and likewise columns."""
    height, width = size or (edges.height, edges.width)
    rows = torch.arange(height, device=device)
    cols = torch.arange(width, device=device)
    row_end = torch.tensor([r + start[0] + extra[0] for r in edges.rows], device=device)
    col_end = torch.tensor([c + start[1] + extra[1] for c in edges.cols], device=device)
    row_ok = (rows >= start[0]) & (rows < row_end[:, None])  # (S, H)
    col_ok = (cols >= start[1]) & (cols < col_end[:, None])  # (S, W)
    return (row_ok[:, :, None] & col_ok[:, None, :])[:, None]


def mask_edges(x: Tensor, edges: EdgeCounts, fill: float = 0.0, spatial: tuple[int, int] = (2, 3)) -> Tensor:
    """Set the positions outside the image to ``fill``; a full map is returned as it is.

    ``spatial``: the axes of height and width, when a permute moved them (channels-last).
    """
    if edges.full:
        return x
    if tuple(spatial) != (2, 3) or x.dim() != 4:  # channels-last, or channels split in two axes
        moved = x.movedim(spatial, (-2, -1))
        flat = moved.reshape(moved.shape[0], -1, *moved.shape[-2:])
        return mask_edges(flat, edges, fill).reshape(moved.shape).movedim((-2, -1), spatial)
    mask = _real_mask(edges, x.device)  # (S, 1, H, W)
    grouped = x.reshape(edges.submaps, -1, *x.shape[1:])
    return torch.where(mask[:, None], grouped, torch.full((), fill, dtype=x.dtype, device=x.device)).reshape(x.shape)


def counted_map(edges: EdgeCounts, before: tuple[int, int], size: tuple[int, int], include_pad: bool,
                dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(S, 1, *size)`` map of the padded positions an average pool counts in its divisor.

    ``include_pad``: real positions and the padding around them (PyTorch's count_include_pad),
    else real positions only.
    """
    if include_pad:
        extra = (2 * before[0], 2 * before[1])
        mask = _real_mask(edges, device, (0, 0), extra, size)
    else:
        mask = _real_mask(edges, device, before, (0, 0), size)
    return mask.to(dtype)


def exact_avg_pool2d(x: Tensor, edges: EdgeCounts, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                     count_include_pad: bool = True, divisor_override: int | None = None) -> Tensor:
    """``F.avg_pool2d`` (traditional stride) whose divisor counts only what the dense network counts.

    ``x`` must already be masked. Needed for ``count_include_pad=False`` and for ``ceil_mode``
    windows that overhang; elsewhere the plain pool of the masked map is exact.
    """
    stride = kernel_size if stride is None or stride == [] or stride == () else stride
    if edges.full or divisor_override:
        return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    pad = pair(padding)
    summed = F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, True, divisor_override=1)
    size = (edges.height + 2 * pad[0] + pair(kernel_size)[0], edges.width + 2 * pad[1] + pair(kernel_size)[1])
    counted = counted_map(edges, pad, size, count_include_pad, x.dtype, x.device)
    counts = F.avg_pool2d(counted, kernel_size, stride, 0, ceil_mode, divisor_override=1)
    counts = counts[..., : summed.shape[-2], : summed.shape[-1]].clamp(min=1)
    per_submap = summed.reshape(edges.submaps, -1, *summed.shape[1:])
    return (per_submap / counts[:, None]).reshape(summed.shape)


# --------------------------------------------------------------------------- submap reductions


def global_submap_mean(pooled: Tensor, submaps: int, edges: EdgeCounts) -> Tensor:
    """Mean of a global average pool over the real positions of all submaps.

    ``pooled`` is the pool of the masked map: each submap's sum of real values over ``H*W``.
    """
    grouped = pooled.reshape(submaps, -1, *pooled.shape[1:])
    if edges.full:
        return grouped.mean(dim=0)
    total = sum(r * c for r, c in zip(edges.rows, edges.cols))
    return grouped.sum(dim=0) * (edges.height * edges.width / max(total, 1))


def masked_submap_mean(x: Tensor, submaps: int, edges: EdgeCounts) -> Tensor:
    """Position-wise mean over the submaps in which the position is real."""
    grouped = x.reshape(submaps, -1, *x.shape[1:])
    if edges.full:
        return grouped.mean(dim=0)
    mask = _real_mask(edges, x.device)[:, None].to(x.dtype)  # (S, 1, 1, H, W)
    counts = mask.sum(dim=0).clamp(min=1)
    return (grouped * mask).sum(dim=0) / counts

