"""Op recognition: which nodes of a traced graph are strided layers, global pools and feature maps.

A *strided layer* is a conv or pool that subsamples: an ``nn.Conv2d``/``MaxPool2d``/``AvgPool2d``
module (or a subclass with the standard forward) or an ``F.conv2d``/``F.max_pool2d``/
``F.avg_pool2d`` call, with stride > 1. :func:`find_strided` normalizes each into a
:class:`Strided` (kernel, stride, and why it cannot be multisampled, if it cannot).

A *global pool* reduces each map over all its positions, so on a multisampled map it must also
reduce over the submaps, with the same reduction: :func:`global_pool_kind` recognizes adaptive
pools to 1x1 (module and functional), ``mean``/``amax`` over dims (2, 3) (method and function),
and :func:`is_whole_map_pool` the old-style pools whose window is the whole map.

Shapes come from :func:`~ccnn_convert.core.tracing.propagate_shapes` (``node.meta``).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from .layers import IntPair, pair
from .tracing import ANALYSIS_BATCH

__all__ = [
    "ARG_NAMES", "Strided", "VIEWS", "batch_nodes", "call_args", "find_strided", "function_op", "global_pool_kind",
    "group_steps", "is_feature_map", "is_whole_map_pool", "permuted_axes", "step_converts", "strided_steps",
    "tensor_meta",
    "tensor_metas", "zero_pads",
]

# Ops that reshape without moving data: they may change the rank and keep the spatial dims last.
VIEWS = ("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze")

_FUNCTION_OPS = {
    F.conv2d: "conv2d", torch.conv2d: "conv2d",
    F.max_pool2d: "max_pool2d", torch.max_pool2d: "max_pool2d",
    F.avg_pool2d: "avg_pool2d", torch._C._nn.avg_pool2d: "avg_pool2d",
}
ARG_NAMES = {
    "conv2d": ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
    "max_pool2d": ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
    "avg_pool2d": ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
}
_DEFAULTS = {
    "conv2d": {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1},
    "max_pool2d": {"stride": None, "padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False},
    "avg_pool2d": {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                   "divisor_override": None},
}
_MODULE_OPS = ((nn.Conv2d, "conv2d"), (nn.MaxPool2d, "max_pool2d"), (nn.AvgPool2d, "avg_pool2d"))
_UNSUPPORTED_MODULES = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.MaxPool3d, nn.AvgPool3d)
_ADAPTIVE_FUNCTIONS = {
    F.adaptive_avg_pool2d: "mean", torch._C._nn.adaptive_avg_pool2d: "mean",
    F.adaptive_max_pool2d: "max",
}
_RUNTIME = (0, 0)  # kernel/stride marker: computed from the input at run time


@dataclass
class Strided:
    """A strided conv/pool node, normalized."""

    node: fx.Node
    op: str  # conv2d | max_pool2d | avg_pool2d (or the class name of an unsupported layer)
    kernel: IntPair
    stride: IntPair
    unsupported: str = ""  # why it cannot be multisampled, if it cannot

    @property
    def name(self) -> str:
        """Module path of the layer (for a functional call: of the module that makes it)."""
        if self.node.op == "call_module":
            return self.node.target
        stack = self.node.meta.get("nn_module_stack")
        owner = next(reversed(stack.values()))[0] if stack else ""
        return owner or self.node.name


# --------------------------------------------------------------------------- strided layers


def call_args(node: fx.Node, op: str) -> dict[str, Any]:
    """Arguments of a functional conv/pool call by name, defaults filled in."""
    values = dict(_DEFAULTS[op])
    values.update(zip(ARG_NAMES[op], node.args))
    values.update(node.kwargs)
    return values


def find_strided(node: fx.Node, modules: dict[str, nn.Module]) -> Strided | None:
    """The strided conv/pool this node is, or None. ``modules``: the model's modules by name."""
    if node.op == "call_module":
        return _strided_module(node, modules[node.target])
    if node.op == "call_function" and (op := function_op(node.target)):
        return _strided_function(node, op)
    return None


def function_op(target: Any) -> str | None:
    return _lookup(_FUNCTION_OPS, target)


def _lookup(table: dict, target: Any) -> str | None:
    try:
        return table.get(target)
    except TypeError:  # an unhashable callable
        return None


def _strided_function(node: fx.Node, op: str) -> Strided | None:
    args = call_args(node, op)
    if _is_dynamic(args.get("kernel_size")) or _is_dynamic(args["stride"]):
        # Sizes computed from the input at run time (e.g. pooling over x.size()[2:]).
        return Strided(node, op, _RUNTIME, _RUNTIME, "kernel or stride computed at run time")
    if op == "conv2d":
        weight = tensor_meta(node.args[1] if len(node.args) > 1 else node.kwargs["weight"])
        kernel = tuple(weight.shape[2:4]) if weight is not None else (0, 0)
    else:
        kernel = pair(args["kernel_size"])
    stride = kernel if op != "conv2d" and args["stride"] in (None, [], ()) else pair(args["stride"])
    if max(stride) <= 1:
        return None
    return Strided(node, op, kernel, stride, _unsupported(op, stride, args))


def _is_dynamic(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_is_dynamic(v) for v in value)
    return isinstance(value, fx.Node)


def _strided_module(node: fx.Node, module: nn.Module) -> Strided | None:
    for cls, op in _MODULE_OPS:
        if isinstance(module, cls):
            stride = pair(module.stride if module.stride is not None else module.kernel_size)
            if max(stride) <= 1:
                return None
            reason = _unsupported(op, stride, vars(module))
            if type(module).forward is not cls.forward:
                reason = f"{type(module).__name__} overrides forward (not traced into)"
            return Strided(node, op, pair(module.kernel_size), stride, reason)
    if isinstance(module, _UNSUPPORTED_MODULES) and max(module.stride) > 1:
        name = type(module).__name__
        return Strided(node, name, (0, 0), (0, 0), f"{name} is not supported")
    return None


def _unsupported(op: str, stride: IntPair, args: dict[str, Any]) -> str:
    if stride[0] != stride[1]:
        return f"non-square stride {stride}"
    if args.get("return_indices"):
        return "max pool with return_indices"
    if op == "conv2d" and isinstance(args.get("padding"), str) and args["padding"] != "valid":
        return f"padding={args['padding']!r}"
    return ""


# --------------------------------------------------------------------------- global pools


def global_pool_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """``'mean'`` or ``'max'`` if the node pools a 4-D map over all its positions, else None."""
    if node.op == "call_module":
        module = modules.get(node.target)  # None for the sampler nodes the rewrite adds
        if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and pair(module.output_size) == (1, 1):
            return "mean" if isinstance(module, nn.AdaptiveAvgPool2d) else "max"
        if (found := _strided_module(node, module)) and is_whole_map_pool(found):
            return "max" if found.op == "max_pool2d" else "mean"
        return None
    if node.op == "call_function" and (kind := _adaptive_kind(node)):
        return kind
    if node.op == "call_function" and (op := function_op(node.target)):
        found = _strided_function(node, op)
        return ("max" if op == "max_pool2d" else "mean") if found and is_whole_map_pool(found) else None
    return _reduction_kind(node)


def _adaptive_kind(node: fx.Node) -> str | None:
    kind = _lookup(_ADAPTIVE_FUNCTIONS, node.target)
    if kind is None:
        return None
    size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
    return kind if size is not None and not isinstance(size, fx.Node) and pair(size) == (1, 1) else None


def _reduction_kind(node: fx.Node) -> str | None:
    """``x.mean((2, 3))``, ``torch.amax(x, dim=(-2, -1))``, ...: a reduction over both spatial dims."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function":
        name = getattr(node.target, "__name__", "")  # any callable can be a target; not all have names
    else:
        return None
    if name not in ("mean", "amax"):
        return None
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    source = tensor_meta(node.args[0]) if node.args else None
    if source is None or len(source.shape) != 4 or dims is None or _is_dynamic(dims):
        return None
    dims = {d % 4 for d in ((dims,) if isinstance(dims, int) else dims)}
    return ("mean" if name == "mean" else "max") if dims == {2, 3} else None


def is_whole_map_pool(strided: Strided) -> bool:
    """An old-style global pool: a pool whose window is the whole map (stride = kernel, or
    sizes computed from the input) and whose output is 1x1."""
    if strided.op not in ("max_pool2d", "avg_pool2d"):
        return False
    source, out = tensor_meta(strided.node.args[0]), tensor_meta(strided.node)
    if source is None or out is None or tuple(out.shape[2:]) != (1, 1):
        return False
    if strided.stride == _RUNTIME:
        return True
    return (strided.stride == strided.kernel and strided.kernel[0] >= source.shape[2]
            and strided.kernel[1] >= source.shape[3])


# --------------------------------------------------------------------------- shapes


def tensor_meta(node: Any) -> Any:
    """The shape metadata shape propagation left on a node (None for constants and non-tensors)."""
    return node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None


def tensor_metas(node: fx.Node) -> list[TensorMetadata] | None:
    """Output tensor metadata of a node (flattening tuples), or None for non-tensor outputs."""
    meta = tensor_meta(node)
    if meta is None:
        return None
    flat: list[TensorMetadata] = []

    def visit(item: Any) -> bool:
        if isinstance(item, TensorMetadata):
            flat.append(item)
            return True
        if isinstance(item, (tuple, list)):
            return all(visit(sub) for sub in item)
        if isinstance(item, dict):
            return all(visit(sub) for sub in item.values())
        return False

    return flat if visit(meta) and flat else None


def is_feature_map(node: fx.Node) -> bool:
    """True if every tensor this node outputs is per-image with spatial dims (rank >= 4)."""
    metas = tensor_metas(node)
    return bool(metas) and all(len(m.shape) >= 4 and m.shape[0] == ANALYSIS_BATCH for m in metas)


def folded_batch_submaps(node: fx.Node, submaps: Mapping[fx.Node, int]) -> int:
    """How many submaps a non-tensor value counts. A submapped tensor's batch size is S*B (its
    submaps are folded into the batch), and so is the first entry of its shape: such a read
    carries S, and so does arithmetic on it; spatial sizes, ``dim()`` and the rest carry 1."""
    args = node.args
    if node.op == "call_method" and node.target == "size" and args and args[0] in submaps:
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim")
        return submaps[args[0]] if dim in (None, 0) else 1
    if node.op == "call_function" and node.target is getattr and args[1] == "shape" and args[0] in submaps:
        return submaps[args[0]]
    if node.op == "call_function" and node.target is operator.getitem:
        source, index = args
        if isinstance(source, fx.Node) and source in submaps and tensor_metas(source) is None:
            takes_batch = index == 0 or (isinstance(index, slice) and index.start in (None, 0) and index.stop != 0)
            return submaps[source] if takes_batch else 1
        return 1
    counts = [submaps[arg] for arg in node.all_input_nodes if arg in submaps and tensor_metas(arg) is None]
    return max(counts, default=1)


def permuted_axes(node: fx.Node, name: str, rank: int, spatial: IntPair) -> IntPair:
    """Where the spatial axes ``spatial`` are after ``permute``/``transpose``/``swapaxes`` ``node``."""
    args = [a for a in node.args[1:]]
    if name == "permute":
        dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
        dims = [d % rank for d in dims]
        return tuple(dims.index(a) for a in spatial)
    a, b = (d % rank for d in args[:2])
    swap = {a: b, b: a}
    return tuple(swap.get(s, s) for s in spatial)


def zero_pads(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, int, int, int] | None:
    """``(left, right, top, bottom)`` of a zero pad of the last two dims (``nn.ZeroPad2d``,
    ``nn.ConstantPad2d(.., 0)``, ``F.pad(x, pads)``), else None."""
    if node.op == "call_module":
        module = modules.get(node.target)
        zero = isinstance(module, nn.ZeroPad2d) or (isinstance(module, nn.ConstantPad2d) and module.value == 0)
        pads = tuple(module.padding) if zero else None
    elif node.op == "call_function" and node.target in (F.pad, torch._C._nn.pad):
        pads = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        pads = tuple(pads) if mode == "constant" and not value and isinstance(pads, (list, tuple)) else None
    else:
        return None
    if pads is None or len(pads) not in (2, 4) or not all(isinstance(p, int) and p >= 0 for p in pads):
        return None
    return (*pads, 0, 0) if len(pads) == 2 else pads


# --------------------------------------------------------------------------- steps


def batch_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the model input (per-image data, not weights)."""
    batch: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(arg in batch for arg in node.all_input_nodes):
            batch.add(node)
    return batch


def group_steps(graph: fx.Graph, strided: dict[fx.Node, Strided], batch: set[fx.Node]) -> list[list[Strided]]:
    """Group strided layers whose outputs meet into steps, in data-flow order."""
    parent = {node: node for node in strided}

    def find(node: fx.Node) -> fx.Node:
        while parent[node] is not node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    front: dict[fx.Node, frozenset[fx.Node]] = {}
    for node in graph.nodes:
        if node not in batch:
            continue
        fronts = {front[arg] for arg in node.all_input_nodes if front.get(arg)}
        merged = frozenset().union(*fronts)
        if len(fronts) > 1:
            first, *rest = merged
            for other in rest:
                parent[find(other)] = find(first)
        front[node] = frozenset({node}) if node in strided else merged

    order = {node: index for index, node in enumerate(graph.nodes)}
    groups: dict[fx.Node, list[Strided]] = {}
    for node in sorted(strided, key=order.__getitem__):
        groups.setdefault(find(node), []).append(strided[node])
    return sorted(groups.values(), key=lambda members: order[members[0].node])


def strided_steps(graph: fx.Graph, modules: dict[str, nn.Module]
                  ) -> tuple[set[fx.Node], dict[fx.Node, Strided], list[list[Strided]]]:
    """The per-image nodes of ``graph``, its strided layers, and those grouped into steps
    (whole-map pools are global pools, not steps)."""
    batch = batch_nodes(graph)
    strided = {}
    for node in graph.nodes:
        if node in batch and (found := find_strided(node, modules)) and not is_whole_map_pool(found):
            strided[node] = found
    return batch, strided, group_steps(graph, strided, batch)


def step_converts(members: list[Strided], index: int, keep_first: int, warn: Callable[[str], None] | None = None
                  ) -> bool:
    """Whether step ``index`` (its strided layers ``members``) is converted: it is past the first
    ``keep_first`` steps, and its layers are supported and share one stride. ``warn`` hears why a
    step past ``keep_first`` stays traditional. Every mode's pass decides with this one rule."""
    if index <= keep_first:
        return False
    problems = [f"{m.name}: {m.unsupported}" for m in members if m.unsupported]
    strides = {m.stride for m in members}
    if len(strides) > 1:
        problems.append(f"layers with different strides {sorted(strides)} meet")
    if problems and warn is not None:
        warn(f"step {index} stays traditional ({'; '.join(problems)})")
    return not problems
