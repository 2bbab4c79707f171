"""Pictures of where submaps sample: from first principles, and on a real image.

The API behind ``ccnn-visualize``.

Which input positions does a submap see?
-----------------------------------------
Take a chain of ``T`` subsampling steps with strides ``k_1 .. k_T`` (every layer of a step has the
same stride). At step ``t`` a submap that the sequence gives the window offset ``(dy_t, dx_t)``
keeps, at its output position ``p``, the sample whose window starts at input position
``k_t * p + (dy_t, dx_t)`` of the step's input (this is exactly what
:mod:`ccnn_convert.core.layers` computes: the layer applied to its input shifted by the offset).
Composing the steps back to the image gives, for output position ``p`` of a final submap,

    input position = origin + P * p,    P = k_1 * k_2 * ... * k_T,
    origin = sum_t (k_1 * ... * k_{t-1}) * (dy_t, dx_t)

(:func:`compose_offsets`). The *origin* of a submap is the top-left position it samples;
submap ``s`` samples the lattice ``origin(s) + P * Z^2``. The position is the anchor of the
sampled window (its top-left corner, or its centre for ``3x3``/stride-2/padding-1 convolutions):
the picture is about which windows are kept, not about receptive fields.

Which offsets does a final submap have? :mod:`ccnn_convert.core.sequences` gives every input submap
``i`` of a step a sampler, a list of ``n`` offsets, and sample ``j`` of submap ``i`` becomes
output submap ``j * S + i`` (``S`` = input submap count). :func:`submap_offsets` unrolls this
bookkeeping over the steps, with the same per-step seeding as :func:`ccnn_convert.convert`
(step ``t`` uses ``seed + t``), so a picture drawn here is the conversion's own sampling.

For ``n = k`` (checkered) the ``k^T`` origins are distinct and lie in one ``P x P`` cell, one
per row and one per column of it (the *n-rooks* property), so every input position is sampled
by at most one submap and a picture can give each submap one colour. Traditional subsampling
keeps one submap (origin 0); dilation keeps all ``k^(2T)`` submaps, which tile every position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, fx, nn

from .core import conversion_report
from .core.features import DenseMap, extract_features, graph_node_names
from .core.options import check_seed
from .core.sequences import Offset, sampler_sequence
from .errors import CCNNError, ParameterError
from .models.record import ResolvedModel
from .plotting import pyplot, save_png
from .spec import ConversionSpec

__all__ = ["DEFAULT_KINDS", "KINDS", "StepRow", "compose_offsets", "dense_feature_map", "feature_submaps",
           "input_position", "plot_dense_maps", "plot_feature_submaps", "plot_positions", "sampling_map", "step_table",
           "submap_offsets", "submap_resolution"]

KINDS = ("traditional", "naive", "lattice", "random", "dilated")
DEFAULT_KINDS = ("traditional", "naive", "lattice", "random")
KIND_TITLES = {"traditional": "traditional", "naive": "checkered, naive", "lattice": "checkered, lattice",
               "random": "checkered, random", "dilated": "dilated"}
UNSAMPLED = -1


# --------------------------------------------------------------------------- positions


def compose_offsets(offsets: Sequence[Offset], strides: Sequence[int]) -> Offset:
    """Input position of output position ``(0, 0)`` after steps with these offsets and strides.

    ``origin = sum_t (k_1 * ... * k_{t-1}) * offset_t``: an offset chosen at step ``t`` moves the
    sample by that many positions of step ``t``'s input, each worth ``k_1 * ... * k_{t-1}`` image
    positions.

    >>> compose_offsets([(1, 1), (0, 1)], [2, 2])   # (1, 1) + 2 * (0, 1)
    (1, 3)
    """
    if len(offsets) != len(strides):
        raise ValueError("one offset per step is needed")
    y = x = 0
    scale = 1
    for (dy, dx), k in zip(offsets, strides):
        y, x = y + scale * dy, x + scale * dx
        scale *= k
    return (y, x)


def input_position(position: Offset, offsets: Sequence[Offset], strides: Sequence[int]) -> Offset:
    """Input position of output ``position`` of a submap: ``origin + (k_1 * ... * k_T) * position``."""
    oy, ox = compose_offsets(offsets, strides)
    period = math.prod(strides)
    return (oy + period * position[0], ox + period * position[1])


def _check_kind(kind: str, parameter: str) -> None:
    if kind not in KINDS:
        raise ParameterError(parameter, f"unknown sequence kind {kind!r} in {{param}}; choose from {', '.join(KINDS)}")


def _samples_for(kind: str, stride: int, samples: int | None) -> int:
    if kind == "traditional":
        return 1
    if kind == "dilated":
        return stride * stride
    return stride if samples is None else samples


def submap_offsets(kind: str, steps: int, stride: int = 2, samples: int | None = None,
                   seed: int | None = None) -> list[list[Offset]]:
    """Per final submap, its window offset at every step (the sequence's bookkeeping, unrolled).

    ``kind``: ``traditional`` (one sample per window), ``naive``/``lattice``/``random`` (checkered
    sequences with ``samples`` per window, default ``stride``) or ``dilated`` (every position).
    Submap numbering is the conversion's: sample ``j`` of submap ``i`` becomes ``j * S + i``.
    """
    _check_kind(kind, "kind")
    if steps < 0:
        raise ParameterError("steps", "{param} must be 0 or more")
    if stride < 1:
        raise ParameterError("stride", "{param} must be at least 1")
    n = _samples_for(kind, stride, samples)
    paths: list[list[Offset]] = [[]]
    for step in range(1, steps + 1):
        if kind == "traditional":
            sequence = [[(0, 0)] for _ in paths]
        else:
            sequence_kind = "naive" if kind == "dilated" else kind
            generator = torch.Generator().manual_seed(seed + step) if seed is not None else None
            sequence = sampler_sequence(sequence_kind, len(paths), stride, n, generator)
        paths = [paths[i] + [sequence[i][j]] for j in range(n) for i in range(len(paths))]
    return paths


def submap_resolution(size: int, steps: int, stride: int = 2) -> int:
    """Side of every submap after ``steps`` steps: ``ceil(size / stride)`` per step.

    That is the traditional output size of the usual subsampling layer, a stride-2 ``3x3``
    convolution with padding 1 (every submap of a converted layer has the traditional size).
    """
    for _ in range(steps):
        size = -(-size // stride)
    return size


def sampling_map(kind: str, size: int | tuple[int, int], steps: int, stride: int = 2,
                 samples: int | None = None, seed: int | None = None) -> np.ndarray:
    """An ``(H, W)`` array: the submap that samples each input position, ``-1`` where none does.

    Positions of a submap that fall outside the image (in the far-edge fill) are not drawn.
    Raises if two submaps sample one position (impossible for checkered, traditional and dilated
    sequences, whose origins are distinct).
    """
    height, width = (size, size) if isinstance(size, int) else size
    result = np.full((height, width), UNSAMPLED, dtype=np.int64)
    strides = [stride] * steps
    period = stride ** steps
    rows, cols = submap_resolution(height, steps, stride), submap_resolution(width, steps, stride)
    for submap, offsets in enumerate(submap_offsets(kind, steps, stride, samples, seed)):
        oy, ox = compose_offsets(offsets, strides)
        ys = oy + period * np.arange(rows)
        xs = ox + period * np.arange(cols)
        ys, xs = ys[ys < height], xs[xs < width]
        block = result[np.ix_(ys, xs)]
        if (block != UNSAMPLED).any():
            raise CCNNError(f"{kind}: two submaps sample the same position")  # more than k*k samples
        result[np.ix_(ys, xs)] = submap
    return result


@dataclass
class StepRow:
    """One subsampling step: submap count and resolution for one kind of sequence."""

    step: int
    submaps: int
    resolution: tuple[int, int]
    positions: int  # sampled positions of all submaps together (per channel, per image)

    @property
    def ratio(self) -> float:
        """Positions relative to traditional subsampling (= the submap count)."""
        return self.positions / (self.resolution[0] * self.resolution[1])


def step_table(size: int | tuple[int, int], steps: int, stride: int = 2, samples: int | None = None,
               kind: str = "lattice") -> list[StepRow]:
    """Submap count, submap resolution and sampled positions after each step (step 0 = input)."""
    height, width = (size, size) if isinstance(size, int) else size
    n = _samples_for(kind, stride, samples)
    rows = []
    for step in range(steps + 1):
        resolution = (submap_resolution(height, step, stride), submap_resolution(width, step, stride))
        submaps = n ** step
        rows.append(StepRow(step, submaps, resolution, submaps * resolution[0] * resolution[1]))
    return rows


# --------------------------------------------------------------------------- pictures


def _palette(count: int) -> np.ndarray:
    """``count`` distinguishable RGB colours in [0, 1]."""
    import matplotlib

    if count <= 10:
        colours = matplotlib.colormaps["tab10"](np.arange(count))
    elif count <= 20:
        colours = matplotlib.colormaps["tab20"](np.arange(count))
    else:
        colours = matplotlib.colormaps["hsv"](np.linspace(0, 1, count, endpoint=False))
    return colours[:, :3]


def _rgb(mapping: np.ndarray, count: int) -> np.ndarray:
    image = np.full((*mapping.shape, 3), 0.92)
    palette = _palette(max(count, 1))
    sampled = mapping != UNSAMPLED
    image[sampled] = palette[mapping[sampled]]
    return image


def _save(plt, fig, path: str | Path, force: bool) -> Path:
    try:
        return save_png(fig, path, force=force)
    finally:
        plt.close(fig)


def plot_positions(path: str | Path, size: int = 16, steps: int = 3, stride: int = 2,
                   kinds: Sequence[str] = DEFAULT_KINDS, samples: int | None = None,
                   seed: int | None = 0, panel_inches: float = 1.6, dpi: int = 100, *,
                   force: bool = False) -> Path:
    """One row per kind of sequence, one column per step: which positions each submap samples.

    Each submap has its own colour (submap ``s`` of a row is the same colour in every panel of
    that step); grey positions are sampled by no submap.
    """
    if seed is not None:
        check_seed(seed)
    if steps < 1:
        raise ParameterError("steps", "{param} must be at least 1")
    if size < 1:
        raise ParameterError("size", "{param} must be positive")
    if not kinds:
        raise ParameterError("kinds", "{param} is empty")
    for kind in kinds:
        _check_kind(kind, "kinds")
    plt = pyplot()
    fig, axes = plt.subplots(len(kinds), steps, figsize=(panel_inches * steps + 0.9, panel_inches * len(kinds) + 0.3),
                             dpi=dpi, squeeze=False)
    for row, kind in enumerate(kinds):
        for col in range(steps):
            ax = axes[row][col]
            mapping = sampling_map(kind, size, col + 1, stride, samples, seed)
            count = len(submap_offsets(kind, col + 1, stride, samples, seed))
            ax.imshow(_rgb(mapping, count), interpolation="nearest")
            ax.set_xticks(np.arange(-0.5, size, 1), minor=True)
            ax.set_yticks(np.arange(-0.5, size, 1), minor=True)
            ax.grid(which="minor", color="white", linewidth=0.4)
            ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
            if row == 0:
                ax.set_title(f"step {col + 1}", fontsize=8)
            ax.set_xlabel(f"{count} submap{'s' if count > 1 else ''}", fontsize=7, labelpad=1)
        axes[row][0].set_ylabel(KIND_TITLES[kind], fontsize=7)
    fig.suptitle(f"sampled positions on a {size}x{size} input, stride {stride}", fontsize=9)
    fig.subplots_adjust(left=0.08, right=0.99, bottom=0.03, top=0.9, wspace=0.12, hspace=0.3)
    return _save(plt, fig, path, force)


# --------------------------------------------------------------------------- real feature maps


class _Captured(Exception):
    def __init__(self, value: Tensor):
        super().__init__()
        self.value = value


class _StopAt(fx.Interpreter):
    """Runs a converted graph up to ``target`` and raises its first input (truncation)."""

    def __init__(self, module: fx.GraphModule, target: str):
        super().__init__(module)
        self.target = target

    def run_node(self, node: fx.Node):
        if node.op in ("call_module", "call_function") and self.target in _node_names(node):
            source = node.args[0] if node.args else node.kwargs.get("input")
            raise _Captured(self.env[source] if isinstance(source, fx.Node) else source)
        return super().run_node(node)


def _node_names(node: fx.Node) -> set[str]:
    """Names a conversion report may use for the layer a node computes: the module path of a
    module call; for a functional call its node name and the path of the module that makes it."""
    if node.op == "call_module":
        return {str(node.target)}
    names = {node.name}
    stack = node.meta.get("nn_module_stack")
    if stack:
        names.add(next(reversed(stack.values()))[0])
    return names


def _converted_up_to(model: nn.Module | ResolvedModel, image: Tensor, step: int, conversion: ConversionSpec | str, caller: str):
    """``(x, converted, target)``: the one image as a batch, the converted model and the name
    of the first layer of step ``step + 1``, whose input the caller shows."""
    spec = conversion if isinstance(conversion, ConversionSpec) else ConversionSpec(mode=conversion)
    x = image.unsqueeze(0) if image.dim() == 3 else image
    if x.shape[0] != 1:
        raise ParameterError("image", f"{caller} takes one image as {{param}}")
    size = tuple(x.shape[-2:])
    # A resolved artifact converts through the one path that loads what it learned (DiffStride's strides).
    converted = model.converted(spec, size) if isinstance(model, ResolvedModel) else spec.apply(model, size)
    model = model.model if isinstance(model, ResolvedModel) else model
    report = conversion_report(converted)
    if not 1 <= step < report.steps:
        raise ParameterError("step", f"{type(model).__name__} has {report.steps} subsampling steps: "
                                     f"{{param}} must be between 1 and {report.steps - 1}")
    target = next(layer.name for layer in report.layers if layer.step == step + 1)
    return x, converted, target


def feature_submaps(model: nn.Module | ResolvedModel, image: Tensor, step: int,
                    conversion: ConversionSpec | str = "checkered") -> Tensor:
    """Per-submap channel-mean activation of ``model`` converted, truncated after ``step`` steps.

    ``image`` is one preprocessed ``(3, H, W)`` image. The model is converted (``conversion``, a
    :class:`~ccnn_convert.spec.ConversionSpec` or a mode name), run up to the first layer of
    step ``step + 1`` and the feature map entering it is returned as ``(S, h, w)``: the mean
    over channels of each of its ``S`` submaps. A :class:`~ccnn_convert.models.ResolvedModel`
    (an artifact) is converted with what its conversion learned (DiffStride's strides).
    """
    x, converted, target = _converted_up_to(model, image, step, conversion, "feature_submaps")
    with torch.no_grad():
        try:
            _StopAt(converted, target).run(x)
        except _Captured as captured:
            value = captured.value
        else:  # pragma: no cover - the target is in the graph by construction
            raise CCNNError(f"layer {target} was not reached")
    submaps = value.shape[0]
    return value.float().mean(dim=1).reshape(submaps, *value.shape[2:])


def plot_feature_submaps(path: str | Path, image: Tensor, maps: Tensor, title: str,
                         reference: Tensor | None = None, mean: Sequence[float] = (0.0, 0.0, 0.0),
                         std: Sequence[float] = (1.0, 1.0, 1.0), dpi: int = 100, *, force: bool = False) -> Path:
    """The input image, the traditional feature map (``reference``) and every submap's map.

    All feature panels share one colour scale (1st to 99th percentile of all their values), so
    submaps can be compared by eye.
    """
    plt = pyplot()
    panels = [("input", None)]
    if reference is not None:
        panels.append(("traditional", reference[0]))
    panels += [(f"submap {s}", maps[s]) for s in range(maps.shape[0])]
    columns = min(len(panels), 6)
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.7 * columns, 1.8 * rows + 0.3), dpi=dpi, squeeze=False)
    values = torch.cat([maps.flatten()] + ([reference.flatten()] if reference is not None else [])).float()
    # 1st-99th percentile: a padding border or a few outliers must not wash out the colour scale.
    low, high = (float(v) for v in torch.quantile(values[:2**24], torch.tensor([0.01, 0.99])))
    shown = image.detach().cpu().float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= len(panels):
            continue
        label, data = panels[index]
        if data is None:
            ax.imshow(shown.clamp(0, 1).permute(1, 2, 0).numpy())
        else:
            ax.imshow(data.detach().cpu().numpy(), cmap="viridis", vmin=low, vmax=high, interpolation="nearest")
        ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.85 if rows == 1 else 0.9, wspace=0.05, hspace=0.2)
    return _save(plt, fig, path, force)


# --------------------------------------------------------------------------- dense maps


def dense_feature_map(model: nn.Module | ResolvedModel, image: Tensor, step: int,
                      conversion: ConversionSpec | str = "checkered") -> DenseMap:
    """The feature map entering step ``step + 1``, as one dense map on the input grid.

    The same map :func:`feature_submaps` shows submap by submap, put back together by
    :func:`ccnn_convert.core.features.create_feature_extractor`: every submap at the positions it
    samples (``mask`` True there), so checkered and dilated can be compared position by position.
    """
    x, converted, target = _converted_up_to(model, image, step, conversion, "dense_feature_map")
    layer = next(node for node in converted.graph.nodes
                 if node.op in ("call_module", "call_function") and target in _node_names(node))
    source = layer.args[0] if layer.args else layer.kwargs["input"]
    name = graph_node_names(converted.graph)[source]
    extractor = extract_features(converted, [name]).eval()  # the model converted above, not again
    with torch.no_grad():
        return extractor(x)[name]


def plot_dense_maps(path: str | Path, image: Tensor, maps: Sequence[tuple[str, DenseMap]], title: str,
                    mean: Sequence[float] = (0.0, 0.0, 0.0), std: Sequence[float] = (1.0, 1.0, 1.0),
                    panel_inches: float = 2.6, dpi: int = 100, *, force: bool = False) -> Path:
    """The input image and each dense map's channel-mean magnitude, positions no submap samples
    in grey. One colour scale for all maps (1st-99th percentile of their filled values); the
    picture's pixel size depends only on the number of panels."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(maps) + 1, figsize=(panel_inches * (len(maps) + 1), panel_inches + 0.5),
                             dpi=dpi, squeeze=False)
    shown = image.detach().cpu().float() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    axes[0][0].imshow(shown.clamp(0, 1).permute(1, 2, 0).numpy())
    axes[0][0].set_title("input", fontsize=8)
    magnitudes = [dense.values[0].detach().float().abs().mean(dim=0).cpu() for _, dense in maps]
    filled = torch.cat([m[dense.mask.cpu()] for m, (_, dense) in zip(magnitudes, maps)])
    low, high = (float(v) for v in torch.quantile(filled[:2**24], torch.tensor([0.01, 0.99])))
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=(0.85, 0.85, 0.85))
    for ax, magnitude, (label, dense) in zip(axes[0][1:], magnitudes, maps):
        data = np.ma.masked_array(magnitude.numpy(), mask=~dense.mask.cpu().numpy())
        ax.imshow(data, cmap=cmap, vmin=low, vmax=high, interpolation="nearest")
        filled_share = dense.mask.float().mean().item()
        ax.set_title(f"{label}\n{tuple(dense.mask.shape)}, stride {dense.stride}, {filled_share:.0%} filled",
                     fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.78, wspace=0.05)
    return _save(plt, fig, path, force)
