"""The exact-edges pass: thread real-position counts through a rewritten graph (see :mod:`.edges`).

Runs after the multisampling rewrite, on the same graph. For every feature map it keeps the node
that computes its :class:`~.edges.EdgeCounts` (plain Python at run time, from the input size):

* the input placeholder starts them (:func:`~.edges.edges_input`);
* convolutions and pools (strided or not, multisampled or not) mask their input first when their
  window is larger than one position (zero, or -inf for max pools), then update the counts
  (:func:`~.edges.edges_after`, with the sampler's offsets for a multisampling layer);
  average pools whose divisor depends on the edge get it from the counts;
* global pools mask their input, and their submap reduction divides by the real positions of all
  submaps; the submap average before the classifier leaves out the positions outside the image;
* a zero pad (``F.pad``, ``nn.ZeroPad2d``) adds its pad to the counts; other ops that change the map size or are opaque
  modules see a masked input; ops that keep the size keep the counts;
* ``permute``/``transpose`` move the spatial axes (channels-last blocks, as in ConvNeXt): the pass
  follows them, and there ``nn.Linear``/``nn.LayerNorm`` over the channels act per position.

A full map (counts equal to its size) is never masked, so at sizes that divide evenly the
pass adds a few Python calls and no tensor op.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import edges, layers
from .ops import ARG_NAMES, VIEWS, call_args, function_op, global_pool_kind, is_feature_map, permuted_axes, \
    tensor_meta, tensor_metas, zero_pads

__all__ = ["EDGES", "apply_exact_edges"]

EDGES = ("reference", "exact")

_POINTWISE_MODULES = (
    nn.BatchNorm2d, nn.Identity, nn.Dropout, nn.Dropout2d, nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.Mish, nn.Softplus, nn.Flatten,
)
_SPATIAL_MODULES = {  # subclasses only with the standard forward (PHC layers)
    nn.Conv2d: "conv2d", nn.MaxPool2d: "max_pool2d", nn.AvgPool2d: "avg_pool2d",
    **{cls: op for op, cls in layers.MULTISAMPLE_MODULES.items()},
}
_MULTISAMPLE_FUNCTIONS = {function: op for op, function in layers.MULTISAMPLE_FUNCTIONS.items()}
_MULTISAMPLE_CLASSES = tuple(layers.MULTISAMPLE_MODULES.values())
_PAD_FUNCTIONS = (F.pad, torch._C._nn.pad)
_PERMUTES = ("permute", "transpose", "swapaxes")
NCHW = (2, 3)  # where the spatial axes of a feature map are unless a permute moved them


def apply_exact_edges(graph: fx.Graph, root: nn.Module, warn) -> None:
    """Add the edge counts and masks to ``graph`` (already rewritten); ``warn(message)`` reports."""
    _Pass(graph, root, warn).run()


class _Layer:
    """A conv or pool node, normalized: op, geometry, sampler node (None if traditional), params."""

    def __init__(self, op: str, params: dict[str, Any], sampler: fx.Node | None, kernel: tuple[int, int]):
        self.op, self.params, self.sampler = op, params, sampler
        stride = params.get("stride")
        if op != "conv2d" and stride in (None, [], ()):
            stride = params["kernel_size"]
        self.axes = edges.geometry(kernel, stride, params.get("padding", 0), params.get("dilation", 1),
                                   params.get("ceil_mode", False))
        self.window = max(axis.span for axis in self.axes)

    @property
    def exact_divisor(self) -> bool:
        """An average pool whose divisor depends on where the image ends."""
        p = self.params
        return (self.op == "avg_pool2d" and not p.get("divisor_override")
                and (not p.get("count_include_pad", True) or p.get("ceil_mode", False)))


class _Pass:
    def __init__(self, graph: fx.Graph, root: nn.Module, warn):
        self.graph, self.root, self.warn = graph, root, warn
        self.modules = dict(root.named_modules())
        self.state: dict[fx.Node, fx.Node] = {}  # feature map -> node computing its EdgeCounts
        self.pooled: dict[fx.Node, fx.Node] = {}  # global pool -> counts of its input
        self.spatial: dict[fx.Node, tuple[int, int]] = {}  # feature map -> its spatial axes, if not NCHW

    def run(self) -> None:
        for node in list(self.graph.nodes):
            if node.op == "placeholder":
                if is_feature_map(node):
                    self.state[node] = self._after(node, edges.edges_input, (node,))
                continue
            if node.op == "call_function" and node.target in (layers.submap_mean, layers.submap_amax):
                self._submap_reduction(node)
                continue
            source = next((arg for arg in node.all_input_nodes if arg in self.state), None)
            if source is None or node.op == "output":
                continue
            counts = self.state[source]
            if (kind := global_pool_kind(node, self.modules)) is not None:
                self._mask(node, source, counts, float("-inf") if kind == "max" else 0.0)
                self.pooled[node] = counts
            elif (layer := self._layer(node)) is not None:
                self._spatial(node, layer, source, counts)
            elif source not in self.spatial and (pads := zero_pads(node, self.modules)) is not None:
                # F.pad or nn.ZeroPad2d of an NCHW map
                self._mask(node, source, counts, 0.0)
                self.state[node] = self._after(node, edges.edges_pad, (counts, pads))
            elif node.op == "call_function" and node.target in _PAD_FUNCTIONS:  # reflect, replicate, a value
                self._mask(node, source, counts, 0.0)
                self.state[node] = self._after(node, edges.edges_reset, (counts, node))
            elif is_feature_map(node):
                self._other(node, source, counts)

    # -- node kinds

    def _spatial(self, node: fx.Node, layer: _Layer, source: fx.Node, counts: fx.Node) -> None:
        if layer.window > 1:
            self._mask(node, source, counts, float("-inf") if layer.op == "max_pool2d" else 0.0)
        if layer.op == "conv2d" and layer.params.get("padding_mode", "zeros") != "zeros":
            self.warn(f"exact edges: {node.name} pads with {layer.params['padding_mode']!r}; "
                      "positions outside the image read as zeros there")
        if layer.exact_divisor:
            if layer.sampler is not None:
                node.kwargs = {**node.kwargs, "edges": counts}
            else:
                self._exact_avg_pool(node, layer, counts)
        offsets = None
        if layer.sampler is not None:
            sampler = self.root.get_submodule(layer.sampler.target)
            # The random sampler redraws in training mode (and one graph may serve both modes):
            # read its table at run time. Every other table is fixed: a constant of the graph.
            offsets = layer.sampler if sampler.kind == "random" else \
                tuple(tuple(tuple(o) for o in row) for row in sampler.table[..., 1:].tolist())
        self.state[node] = self._after(node, edges.edges_after, (counts, layer.axes, offsets))

    def _exact_avg_pool(self, node: fx.Node, layer: _Layer, counts: fx.Node) -> None:
        p = layer.params
        node.op, node.target = "call_function", edges.exact_avg_pool2d
        node.args = (node.args[0], counts, p["kernel_size"], p.get("stride"), p.get("padding", 0),
                     p.get("ceil_mode", False), p.get("count_include_pad", True), p.get("divisor_override"))
        node.kwargs = {}

    def _other(self, node: fx.Node, source: fx.Node, counts: fx.Node) -> None:
        spatial = self.spatial.get(source, NCHW)
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if name in _PERMUTES and (rank := _rank(source)):
            self.state[node] = counts  # the same positions, on other axes
            self._set_spatial(node, permuted_axes(node, name, rank, spatial))
            return
        if name in VIEWS and (moved := _view_spatial(node, source, spatial)) is not None:
            self.state[node] = counts  # e.g. ShuffleNet's channel shuffle: (B, g, C/g, H, W)
            self._set_spatial(node, moved)
            return
        self._set_spatial(node, spatial)
        same_size = _spatial_size(node, spatial) == _spatial_size(source, spatial)
        module = self.modules.get(node.target) if node.op == "call_module" else None
        opaque = module is not None and not _per_position(module, spatial, _rank(source))
        if same_size and not opaque:
            self.state[node] = counts  # pointwise: the counts stay
            return
        self._mask(node, source, counts, 0.0)
        follow = edges.edges_reset if not same_size else _follow
        self.state[node] = self._after(node, follow, (counts, node, spatial))

    def _submap_reduction(self, node: fx.Node) -> None:
        source, submaps = node.args[0], node.args[1]
        if node.target is layers.submap_mean and source in self.pooled:
            node.target, node.args = edges.global_submap_mean, (source, submaps, self.pooled[source])
        elif node.target is layers.submap_mean and source in self.state:
            node.target, node.args = edges.masked_submap_mean, (source, submaps, self.state[source])

    # -- graph edits

    def _set_spatial(self, node: fx.Node, spatial: tuple[int, int]) -> None:
        if spatial != NCHW:
            self.spatial[node] = spatial

    def _mask(self, node: fx.Node, source: fx.Node, counts: fx.Node, fill: float) -> None:
        spatial = self.spatial.get(source, NCHW)
        args = (source, counts, fill) if spatial == NCHW else (source, counts, fill, spatial)
        with self.graph.inserting_before(node):
            masked = self.graph.call_function(edges.mask_edges, args)
        masked.meta = dict(source.meta)
        node.replace_input_with(source, masked)

    def _after(self, node: fx.Node, function, args: tuple) -> fx.Node:
        with self.graph.inserting_after(node):
            return self.graph.call_function(function, args)

    def _layer(self, node: fx.Node) -> _Layer | None:
        if node.op == "call_module":
            module = self.modules.get(node.target)
            op = next((op for cls, op in _SPATIAL_MODULES.items()
                       if isinstance(module, cls) and type(module).forward is cls.forward), None)
            if op is None:
                return None
            params = {name: getattr(module, name) for name in ARG_NAMES[op][1:] + ("padding_mode",)
                      if hasattr(module, name)}
            kernel = module.kernel_size
            params.setdefault("kernel_size", kernel)
            sampler = node.args[1] if isinstance(module, _MULTISAMPLE_CLASSES) else None
            return _Layer(op, params, sampler, edges.pair(kernel))
        if node.op != "call_function":
            return None
        if (op := _lookup(_MULTISAMPLE_FUNCTIONS, node.target)) is not None:
            names = [n for n in ARG_NAMES[op][1:] if n != "return_indices"]
            params = dict(zip(names, node.args[2:]))
            return _Layer(op, params, node.args[1], _kernel(op, params))
        if (op := function_op(node.target)) is not None:
            params = call_args(node, op)
            return _Layer(op, params, None, _kernel(op, params))
        return None


def _kernel(op: str, params: dict[str, Any]) -> tuple[int, int]:
    if op == "conv2d":
        weight = tensor_meta(params["weight"])
        return tuple(weight.shape[2:4]) if weight is not None else (1, 1)
    return edges.pair(params["kernel_size"])


def _lookup(table: dict, target: Any) -> str | None:
    try:
        return table.get(target)
    except TypeError:
        return None


def _rank(node: fx.Node) -> int | None:
    meta = tensor_meta(node)
    return len(meta.shape) if hasattr(meta, "shape") else None


def _view_spatial(node: fx.Node, source: fx.Node, spatial: tuple[int, int]) -> tuple[int, int] | None:
    """The spatial axes after a view that keeps them last (and their sizes), else None."""
    before, after = tensor_meta(source), tensor_meta(node)
    if not (hasattr(before, "shape") and hasattr(after, "shape")):
        return None
    rank_in, rank_out = len(before.shape), len(after.shape)
    sizes = tuple(before.shape[a] for a in spatial)
    if tuple(spatial) != (rank_in - 2, rank_in - 1) or rank_out < 4 or tuple(after.shape[-2:]) != sizes:
        return None
    return (rank_out - 2, rank_out - 1)


def _per_position(module: nn.Module, spatial: tuple[int, int], rank: int | None) -> bool:
    """A module that computes each position from that position alone (on these spatial axes)."""
    if isinstance(module, _POINTWISE_MODULES):
        return True
    if rank is None:
        return False
    if isinstance(module, nn.Linear):
        return rank - 1 not in spatial
    if isinstance(module, nn.LayerNorm):
        return max(spatial) < rank - len(module.normalized_shape)
    return False


def _spatial_size(node: fx.Node, spatial: tuple[int, int]) -> tuple[int, ...] | None:
    """The sizes of the spatial axes of ``node``'s output (of every tensor, if it is a tuple)."""
    metas = tensor_metas(node) or []
    sizes = {tuple(m.shape[a] for a in spatial) if len(m.shape) > max(spatial) else None for m in metas}
    return sizes.pop() if len(sizes) == 1 else None


def _follow(counts: edges.EdgeCounts, out, spatial: tuple[int, int] = NCHW) -> edges.EdgeCounts:
    """Counts after an opaque op that kept the size at analysis: the same while the size is."""
    first = edges.first_tensor(out)
    if first is not None and tuple(first.shape[a] for a in spatial) == (counts.height, counts.width):
        return counts
    return edges.edges_reset(counts, out, spatial)
