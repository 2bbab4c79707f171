"""Dense feature maps from a converted model, like torchvision's ``create_feature_extractor``.

A converted model carries ``S`` submaps of every feature map folded into the batch (row
``s*B + b`` is submap ``s`` of image ``b``). A dense-prediction user wants one map per image on
the input grid instead. :func:`create_feature_extractor` converts the model, makes the requested
nodes the graph's outputs (found by the names torchvision's ``get_graph_node_names`` gives the
*original* model, e.g. ``"layer4"`` or ``"layer4.2.relu_2"``) and puts every submap back where it
samples:

    output ``(i, j)`` of submap ``s`` lies at ``origin_s + P * (i, j)`` of the input grid,

``P`` the product of the strides of the steps before the node and ``origin_s`` composed from the
window offsets of the sampler tables the graph really used (returned by the graph itself, so a
random sampler redrawn in training mode is placed right), as
:func:`ccnn_convert.visualize.compose_offsets` does. Positions are counted in units of the
*dense stride* ``g``: the product of the strides of the traditional steps before the first
converted one. The dense map is the map that enters the first converted step, ``H0 x W0``, at
full density: dilated fills every position (the map of the real dilated network),
checkered fills the positions its submaps sample and leaves the rest 0 with ``mask`` False.
Samples lying outside ``H0 x W0`` (the far-edge fill) are dropped. ``dilation="native"`` and the
traditional mode already return one map per image: it is returned as is, ``mask`` all True.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, fx, nn
from torchvision.models.feature_extraction import DualGraphModule

from . import layers
from ..errors import ConversionError, ParameterError
from .modes import RESAMPLING_MODES
from .ops import find_strided, is_whole_map_pool, tensor_meta
from .rewrite import convert

__all__ = ["DenseMap", "FeatureExtractor", "create_feature_extractor", "extract_features", "graph_node_names"]

_SAMPLED_MODULES = tuple(layers.MULTISAMPLE_MODULES.values())
_SAMPLED_FUNCTIONS = tuple(layers.MULTISAMPLE_FUNCTIONS.values())
_INSERTED_FUNCTIONS = (layers.submap_mean, layers.submap_amax, layers.submap_repeat)


class DenseMap(NamedTuple):
    """One feature map per image on the input grid.

    ``values`` ``(B, C, H', W')``; ``mask`` ``(H', W')``, True where a submap sampled the position
    (unfilled positions of ``values`` are 0); position ``(i, j)`` is the window anchored at input
    position ``stride * (i, j)``.
    """

    values: Tensor
    mask: Tensor
    stride: int


@dataclass(frozen=True)
class _Event:
    """A strided layer on the way to a node: kept traditional, or sampled with a sampler's table."""

    stride: tuple[int, int]
    table: int | None = None  # index of the sampler's output among the graph outputs


@dataclass(frozen=True)
class _Layout:
    value: int  # index of the feature value among the graph outputs
    events: tuple[_Event, ...]
    dense_source: int | None  # index of the map entering the first sampled layer (its size is H0 x W0)


# --------------------------------------------------------------------------- node names


def graph_node_names(graph: fx.Graph) -> dict[fx.Node, str]:
    """torchvision's qualified node names (``NodePathTracer``) for the nodes of a traced graph.

    A module call is named by its module path; any other node by the path of the module whose
    forward makes it, a dot, and its fx name without fx's global ``_N`` suffix; repeated names
    then get a ``_N`` suffix local to that name, as torchvision numbers them. Nodes the
    conversion inserted (samplers, submap means) have no name: they are not in the original.
    """
    names: dict[fx.Node, str] = {}
    last: dict[str, int] = {}  # base name -> index of its last use (0 = unsuffixed)
    for node in graph.nodes:
        if node.op == "output" or _inserted(node):
            continue
        if node.op == "call_module":
            name = str(node.target)
        else:
            stack = node.meta.get("nn_module_stack")
            owner = next(reversed(stack.values()))[0] if stack else ""
            name = f"{owner}.{node.name}" if owner else node.name
        if re.match(r".+_[0-9]+$", name):
            name = name.rsplit("_", 1)[0]
        if name in last:
            last[name] += 1
            names[node] = f"{name}_{last[name]}"
        else:
            last[name] = 0
            names[node] = name
    return names


def _inserted(node: fx.Node) -> bool:
    if node.op == "call_module":
        return str(node.target).startswith("ccnn_sampler_step")
    return node.op == "call_function" and node.target in _INSERTED_FUNCTIONS


def _find_nodes(graph: fx.Graph, queries: Mapping[str, str]) -> dict[str, fx.Node]:
    """Output name -> node, torchvision's rule: the last node whose name is the query or lies
    under it (``"layer4"`` is the last node of module ``layer4``)."""
    names = graph_node_names(graph)
    found: dict[str, fx.Node] = {}
    pending = dict(queries)
    for node in reversed(list(names)):
        parts = names[node].split(".")
        for query in list(pending):
            if ".".join(parts[: query.count(".") + 1]) == query:
                found[pending.pop(query)] = node
                break
    if pending:
        missing = ", ".join(repr(q) for q in pending)
        raise ParameterError("return_nodes", f"node {missing} of {{param}} is not in the model; "
                                             "torchvision's get_graph_node_names(model) lists the names")
    for output, node in found.items():
        meta = tensor_meta(node)
        if meta is None or len(meta.shape) != 4:
            raise ParameterError("return_nodes", f"{{param}}: {output!r} ({names[node]}) is not a feature "
                                                 "map (B, C, H, W)")
    return {name: found[name] for name in queries.values()}


# --------------------------------------------------------------------------- the graph


def _lineages(graph: fx.Graph, root: nn.Module) -> dict[fx.Node, tuple[tuple, ...]]:
    """Per node, the strided layers on its way from the input: ``("kept", stride)`` or
    ``("sampled", stride, sampler_node, input_node)``. Where branches meet, the longest wins
    (they went through the same steps: branches that meet share their step)."""
    modules = dict(root.named_modules())
    lineage: dict[fx.Node, tuple[tuple, ...]] = {}
    for node in graph.nodes:
        inputs = [lineage[arg] for arg in node.all_input_nodes if arg in lineage]
        before = max(inputs, key=len, default=())
        sampler = _sampler_of(node, modules)
        if sampler is not None:
            k = modules[str(sampler.target)].stride
            lineage[node] = before + (("sampled", (k, k), sampler, node.args[0]),)
        elif (strided := _kept_strided(node, modules)) is not None:
            lineage[node] = before + (("kept", strided.stride),)
        else:
            lineage[node] = before
    return lineage


def _sampler_of(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node | None:
    sampled = (node.op == "call_module" and isinstance(modules.get(str(node.target)), _SAMPLED_MODULES)) or \
              (node.op == "call_function" and node.target in _SAMPLED_FUNCTIONS)
    return node.args[1] if sampled else None


def _kept_strided(node: fx.Node, modules: dict[str, nn.Module]):
    if node.op == "call_module" and str(node.target) not in modules:
        return None
    strided = find_strided(node, modules)
    if strided is None or is_whole_map_pool(strided):
        return None
    if min(strided.stride) < 1:
        raise ConversionError(f"{strided.name}: the stride is computed at run time; its feature positions "
                              "cannot be placed on the input grid")
    return strided


def _extractor_graph(graph: fx.Graph, root: nn.Module, queries: Mapping[str, str]) -> tuple[fx.Graph, dict]:
    """A copy of ``graph`` whose outputs are the requested values, the sampler tables they used
    and the maps whose size is each dense map's size; with the layout to reassemble them."""
    found = _find_nodes(graph, queries)
    lineage = _lineages(graph, root)
    outputs: list[fx.Node] = []

    def index(node: fx.Node) -> int:
        if node not in outputs:
            outputs.append(node)
        return outputs.index(node)

    layouts = {}
    for name, node in found.items():
        events, dense_source = [], None
        for event in lineage[node]:
            if event[0] == "kept":
                events.append(_Event(tuple(event[1])))
                continue
            _, stride, sampler, source = event
            dense_source = index(source) if dense_source is None else dense_source
            events.append(_Event(stride, index(sampler)))
        layouts[name] = _Layout(index(node), tuple(events), dense_source)
    copy, mapping = fx.Graph(), {}
    copy.graph_copy(graph, mapping)
    copy.output(tuple(mapping[node] for node in outputs))
    owner = fx.GraphModule(root, copy)  # fx's dead-code pass needs the graph's owner for purity checks
    owner.graph.eliminate_dead_code()
    return owner.graph, layouts


# --------------------------------------------------------------------------- reassembly


def _dense(value: Tensor, batch: int, layout: _Layout, outputs: Sequence) -> DenseMap:
    """Put every submap of ``value`` at the input-grid positions it samples."""
    origins = torch.zeros(1, 2, dtype=torch.long)
    scale, dense_stride = (1, 1), None
    for event in layout.events:
        if event.table is not None:
            dense_stride = dense_stride or scale
            table = outputs[event.table].to("cpu")  # (n, S_in, 3) of [submap, dy, dx]
            offsets = table[..., 1:] * torch.tensor(scale)
            origins = (origins[table[..., 0]] + offsets).reshape(-1, 2)  # submap j*S_in + i
        scale = (scale[0] * event.stride[0], scale[1] * event.stride[1])
    submaps = value.shape[0] // batch
    if dense_stride is None or submaps != origins.shape[0]:
        if submaps != 1:
            raise ConversionError(f"{submaps} submaps where {origins.shape[0]} were expected")
        # One map per image: traditional, native dilation, or submaps already merged.
        mask = torch.ones(value.shape[-2:], dtype=torch.bool, device=value.device)
        return DenseMap(value, mask, _square(scale))
    height, width = outputs[layout.dense_source].shape[-2:]
    h, w = value.shape[-2:]
    rows = (origins[:, 0, None] + scale[0] * torch.arange(h)) // dense_stride[0]  # (S, h)
    cols = (origins[:, 1, None] + scale[1] * torch.arange(w)) // dense_stride[1]  # (S, w)
    inside = (rows[:, :, None] < height) & (cols[:, None, :] < width)  # (S, h, w): drop far-edge fill
    flat = (rows[:, :, None] * width + cols[:, None, :])[inside].to(value.device)
    inside = inside.to(value.device)
    maps = value.reshape(submaps, batch, value.shape[1], h, w).permute(1, 2, 0, 3, 4)  # (B, C, S, h, w)
    dense = value.new_zeros(batch, value.shape[1], height * width)
    dense[:, :, flat] = maps[:, :, inside]
    mask = torch.zeros(height * width, dtype=torch.bool, device=value.device)
    mask[flat] = True
    return DenseMap(dense.reshape(batch, -1, height, width), mask.reshape(height, width), _square(dense_stride))


def _square(stride: tuple[int, int]) -> int:
    if stride[0] != stride[1]:
        raise ConversionError(f"non-square stride {stride}: dense maps need square strides")
    return stride[0]


class FeatureExtractor(nn.Module):
    """A converted model cut at the requested nodes; ``forward(x)`` -> ``{name: DenseMap}``."""

    def __init__(self, graph_module: fx.GraphModule, layouts: dict[bool, dict[str, _Layout]]):
        super().__init__()
        self.graph_module = graph_module
        self._layouts = layouts

    def forward(self, x: Tensor) -> dict[str, DenseMap]:
        outputs = self.graph_module(x)
        layouts = self._layouts[self.training if self.training in self._layouts else False]
        return {name: _dense(outputs[layout.value], x.shape[0], layout, outputs) for name, layout in layouts.items()}


# --------------------------------------------------------------------------- API


def create_feature_extractor(model: nn.Module, return_nodes: Sequence[str] | Mapping[str, str],
                             **convert_kwargs) -> FeatureExtractor:
    """Convert ``model`` (``convert_kwargs`` as :func:`~ccnn_convert.core.convert`, plus
    ``mode="original"``, the same as ``"traditional"``) and return its dense feature maps.

    ``return_nodes``: node names of the original model, as torchvision's
    ``create_feature_extractor`` takes them (a list, or a dict node name -> output name).
    The result's ``forward(x)`` returns ``{output name: DenseMap}``.
    """
    if convert_kwargs.get("mode") == "original":
        convert_kwargs["mode"] = "traditional"
    return extract_features(convert(model, **convert_kwargs), return_nodes)


def extract_features(converted: fx.GraphModule, return_nodes: Sequence[str] | Mapping[str, str]) -> FeatureExtractor:
    """:func:`create_feature_extractor` for a model :func:`~ccnn_convert.core.convert` returned
    (node names are still those of the original model)."""
    queries = _queries(return_nodes)
    mode = converted.meta["ccnn_report"].mode if "ccnn_report" in getattr(converted, "meta", {}) else None
    if mode in RESAMPLING_MODES:
        # their maps are not samples of the original grid (low-passed, or at learned strides)
        raise ParameterError("mode", f"dense feature maps place samples on the input grid; {mode} mode's maps "
                                     "are resampled, not sampled: use torchvision's create_feature_extractor "
                                     "on the converted model")
    model_name = type(converted).__name__
    if isinstance(converted, DualGraphModule):
        train, train_layouts = _extractor_graph(converted.train_graph, converted, queries)
        evaluate, eval_layouts = _extractor_graph(converted.eval_graph, converted, queries)
        module = DualGraphModule(converted, train, evaluate, class_name=f"{model_name}Features")
        layouts = {True: train_layouts, False: eval_layouts}
    else:
        graph, eval_layouts = _extractor_graph(converted.graph, converted, queries)
        module = fx.GraphModule(converted, graph, class_name=f"{model_name}Features")
        layouts = {False: eval_layouts}
    module.meta = {"ccnn_report": converted.meta["ccnn_report"]}
    extractor = FeatureExtractor(module, layouts)
    return extractor.train(converted.training)


def _queries(return_nodes) -> dict[str, str]:
    if isinstance(return_nodes, str):
        return_nodes = [return_nodes]
    if isinstance(return_nodes, Mapping):
        queries = {str(k): str(v) for k, v in return_nodes.items()}
    else:
        queries = {str(n): str(n) for n in (return_nodes or ())}
    if not queries:
        raise ParameterError("return_nodes", "{param} is empty: name at least one node")
    if len(set(queries.values())) != len(queries):
        raise ParameterError("return_nodes", "{param} gives two nodes the same output name")
    return queries
