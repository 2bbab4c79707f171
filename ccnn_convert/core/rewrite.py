"""Rewrite the subsampling layers of a traced model into multisampling ones: the fx pass.

The pass, in data-flow order:

1. **Trace** the model twice (train and eval mode, as torchvision's feature extraction does),
   with user and registered leaf modules (:mod:`.tracing`).
2. **Propagate shapes** on meta tensors (no compute) to know which values are per-image feature
   maps and to catch inputs that are too small (:mod:`.tracing`).
3. **Find strided layers** (:mod:`.ops`) and **group them into steps**: strided layers whose
   outputs meet (residual add, concatenation) are one step, so parallel branches sample
   identically.
4. **Rewrite**: each converted step gets one :class:`~.layers.SubmapSampler` node feeding all its
   layers; the submap count of every value is tracked; global pools reduce over submaps (mean or
   max, as the pool does); submaps are averaged right before the first op that leaves the spatial
   feature map (flatten, view, linear on 2-D, ...), so the unchanged classifier sees one map per
   image.

Nothing is ignored in silence: a step left traditional, a ``keep_first`` beyond the last step and
a leaf that matches no module are logged as warnings and kept in :attr:`ConversionReport.warnings`.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import DualGraphModule

from . import layers
from ..errors import ConversionError, ParameterError
from .ops import ARG_NAMES, Strided, call_args, find_strided, global_pool_kind, is_feature_map, \
    is_whole_map_pool, tensor_meta, tensor_metas
from .sequences import SEQUENCES
from .tracing import analysis_input, check_leaf_modules, propagate_shapes, trace, unmatched_leaves

__all__ = ["CONVERSION_MODES", "ConversionReport", "LayerRecord", "check_options", "conversion_report", "convert"]

logger = logging.getLogger(__name__)

CONVERSION_MODES = ("checkered", "dilated", "traditional")


# --------------------------------------------------------------------------- public records


@dataclass
class LayerRecord:
    """One strided layer of the model and what the conversion did with it."""

    name: str
    op: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    step: int
    converted: bool
    submaps_in: int
    submaps_out: int
    output_size: tuple[int, ...]
    note: str = ""


@dataclass
class ConversionReport:
    """What :func:`convert` did, for tables and summaries."""

    mode: str
    sampler: str
    keep_first: int
    density: int | None
    layers: list[LayerRecord] = field(default_factory=list)
    steps: int = 0
    final_submaps: int = 1
    averaged_at: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def converted_layers(self) -> int:
        return sum(record.converted for record in self.layers)

    @property
    def kept_layers(self) -> int:
        return len(self.layers) - self.converted_layers

    def warn(self, message: str) -> None:
        """Log ``message`` as a warning and keep it here (once)."""
        if message not in self.warnings:
            self.warnings.append(message)
            logger.warning(message)


# --------------------------------------------------------------------------- API


def convert(
    model: nn.Module,
    mode: str = "checkered",
    sampler: str = "lattice",
    keep_first: int = 0,
    density: int | None = None,
    seed: int | None = None,
    example_input: torch.Tensor | None = None,
    leaf_modules: Sequence[type | str] = (),
) -> fx.GraphModule:
    """Return a converted copy of ``model``; ``model`` itself is left untouched.

    Args:
        model: any torch.fx-traceable CNN taking ``(B, C, H, W)`` images.
        mode: ``"checkered"`` (k samples per k x k window, n-rooks), ``"dilated"`` (every sample:
            equal to removing the stride and dilating every later layer) or ``"traditional"``
            (nothing changes).
        sampler: sequence of samplers over submaps: ``"naive"``, ``"lattice"`` or ``"random"``.
        keep_first: the first N subsampling steps (in data-flow order) stay traditional.
        density: samples per window of checkered mode (1 = traditional, k*k = dilated).
        seed: makes the ``random`` sampler reproducible.
        example_input: an input for shape analysis (default ``(2, 3, 224, 224)``); the converted
            model still accepts any input size the original accepts.
        leaf_modules: module classes, class names or qualified names not to trace into (besides
            those registered with :func:`~ccnn_convert.core.register_notrace_module`).

    Returns:
        A ``torch.fx.GraphModule`` with the same parameters as ``model``: same names, and the
        very same tensors (shared, like torchvision's ``create_feature_extractor``; deep-copy
        ``model`` first if you fine-tune the result and want the original kept apart).
        Its :func:`conversion_report` says what was rewritten.
    """
    check_options(mode, sampler, keep_first, density, seed)
    leaf_modules = check_leaf_modules(leaf_modules)
    report = ConversionReport(mode, sampler, keep_first, density)
    for leaf in unmatched_leaves(model, leaf_modules):
        report.warn(f"leaf module {leaf!r} matches nothing in the model")

    model = _copy_structure(model)
    graphs = _trace_both_modes(model, leaf_modules, analysis_input(example_input))
    rewriter = _Rewriter(model, dict(model.named_modules()), report, seed)
    for training in sorted(graphs):  # eval first: its report is the one we keep
        rewriter.rewrite(graphs[training], record=not training)
    if mode != "traditional" and keep_first > report.steps:
        report.warn(f"keep_first={keep_first} but the model has {report.steps} subsampling steps: "
                    "nothing is converted")

    class_name = f"Checkered{type(model).__name__}"
    if len(graphs) == 1:
        result = fx.GraphModule(model, graphs[False], class_name=class_name)
    else:
        result = DualGraphModule(model, graphs[True], graphs[False], class_name=class_name)
        result.meta = {}  # DualGraphModule skips GraphModule.__init__, which creates it
    result.train(model.training)
    result.meta["ccnn_report"] = report
    return result


def conversion_report(model: nn.Module) -> ConversionReport:
    """The :class:`ConversionReport` of a model returned by :func:`convert`."""
    meta = getattr(model, "meta", {})  # any module may be passed: only ours has the report
    if "ccnn_report" not in meta:
        raise ConversionError("this model was not produced by ccnn_convert.convert")
    return meta["ccnn_report"]


def check_options(mode: str, sampler: str = "lattice", keep_first: int = 0, density: int | None = None,
                  seed: int | None = None) -> None:
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
        if mode != "checkered":
            raise ParameterError("density", f"{{param}} sets the samples per window of checkered mode "
                                            f"(1 = traditional, k*k = dilated); it does nothing with mode {mode!r}")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ParameterError("seed", f"{{param}} must be a non-negative integer, got {seed!r}")
        if sampler != "random" or mode != "checkered":
            raise ParameterError("seed", "{param} only seeds the random sampler of checkered mode "
                                         f"(mode {mode!r}, sampler {sampler!r})")


# --------------------------------------------------------------------------- trace and analyse


def _copy_structure(model: nn.Module) -> nn.Module:
    """Copy the module tree (so rewriting never touches ``model``) but share its tensors,
    as torchvision's create_feature_extractor does: no second copy of the weights."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=shared)


def _trace_both_modes(model: nn.Module, leaf_modules: Sequence[type | str],
                      example: torch.Tensor) -> dict[bool, fx.Graph]:
    """The train (True) and eval (False) graphs, shape-annotated; one graph if they are the same."""
    was_training = model.training
    graphs = {}
    for training in (True, False):
        model.train(training)
        graphs[training] = trace(model, leaf_modules)
    if _same_code(graphs[True], graphs[False]):
        graphs = {False: graphs[False]}  # one graph serves both modes
    # Shapes first, for every graph: rewriting replaces modules they share.
    for graph in graphs.values():
        graph_module = fx.GraphModule(model, graph)
        graph_module.eval()  # shapes only: never touch BatchNorm running statistics
        propagate_shapes(graph_module, example, model)
    model.train(was_training)
    return graphs


def _same_code(a: fx.Graph, b: fx.Graph) -> bool:
    return a.python_code("self").src == b.python_code("self").src


# --------------------------------------------------------------------------- steps


def _batch_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the model input (per-image data, not weights)."""
    batch: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(arg in batch for arg in node.all_input_nodes):
            batch.add(node)
    return batch


def _group_steps(graph: fx.Graph, strided: dict[fx.Node, Strided], batch: set[fx.Node]) -> list[list[Strided]]:
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


# --------------------------------------------------------------------------- the rewrite


class _Rewriter:
    """Rewrites the train and eval graphs of one model, sharing replaced modules and samplers."""

    def __init__(self, root: nn.Module, originals: dict[str, nn.Module], report: ConversionReport,
                 seed: int | None):
        self.root, self.originals, self.report, self.seed = root, originals, report, seed

    def rewrite(self, graph: fx.Graph, record: bool) -> None:
        batch = _batch_nodes(graph)
        strided = {}
        for node in graph.nodes:
            if node in batch and (found := find_strided(node, self.originals)) and not is_whole_map_pool(found):
                strided[node] = found
        steps = _group_steps(graph, strided, batch)
        plan = self._plan(steps)
        submaps = self._propagate(graph, batch, strided, plan, record)
        if record:
            self.report.steps = len(steps)
            self.report.final_submaps = max(submaps.values(), default=1)
            for index, members in enumerate(steps, start=1):
                for member in members:
                    self._record(member, index, plan, submaps)

    # -- which steps convert, with how many samples

    def _plan(self, steps: list[list[Strided]]) -> dict[fx.Node, tuple[int, int, int]]:
        """Map each converted strided node to (step index, stride k, samples n)."""
        plan = {}
        for index, members in enumerate(steps, start=1):
            samples = self._samples(members, index)
            if samples is None:
                continue
            for member in members:
                plan[member.node] = (index, member.stride[0], samples)
        return plan

    def _samples(self, members: list[Strided], index: int) -> int | None:
        if self.report.mode == "traditional" or index <= self.report.keep_first:
            return None
        problems = [f"{m.name}: {m.unsupported}" for m in members if m.unsupported]
        strides = {m.stride for m in members}
        if len(strides) > 1:
            problems.append(f"layers with different strides {sorted(strides)} meet")
        if problems:
            self.report.warn(f"step {index} stays traditional ({'; '.join(problems)})")
            return None
        k = members[0].stride[0]
        n = self.report.density or (k * k if self.report.mode == "dilated" else k)
        if n > k * k:
            raise ConversionError(f"density {n} is more than the {k * k} positions of a stride-{k} window")
        return None if n == 1 else n

    # -- submap bookkeeping over the graph

    def _propagate(self, graph: fx.Graph, batch: set[fx.Node], strided: dict[fx.Node, Strided],
                   plan: dict[fx.Node, tuple[int, int, int]], record: bool) -> dict[fx.Node, int]:
        submaps: dict[fx.Node, int] = {}
        samplers: dict[int, fx.Node] = {}
        reduced: dict[fx.Node, fx.Node] = {}
        first = next(n for n in graph.nodes if n.op != "placeholder")
        for node in list(graph.nodes):
            if node.op == "placeholder":
                submaps[node] = 1
                continue
            if node not in batch:
                continue
            inputs = [arg for arg in node.all_input_nodes if arg in submaps]
            if node.op == "output":
                for arg in inputs:
                    if submaps[arg] > 1:
                        node.replace_input_with(arg, self._reduce(graph, arg, submaps, reduced, "mean", record))
                continue
            if node in plan:
                index, k, n = plan[node]
                source = inputs[0]
                if index not in samplers:
                    samplers[index] = self._sampler_node(graph, first, index, submaps[source], k, n)
                self._replace_strided(node, strided[node], samplers[index])
                submaps[node] = submaps[source] * n
                continue
            if tensor_metas(node) is None:
                continue  # size(), shape, dim(): metadata reads of a submapped tensor stay as they are
            pool = global_pool_kind(node, self.originals)
            count = max((submaps[arg] for arg in inputs), default=1)
            if pool and count > 1:
                submaps[node] = count
                users = list(node.users)
                reduction = self._reduce(graph, node, submaps, reduced, pool, record)
                for user in users:
                    user.replace_input_with(node, reduction)
                continue
            if count > 1 and not is_feature_map(node):
                # The value leaves the spatial feature map: average the submaps first.
                for arg in inputs:
                    if submaps[arg] > 1:
                        node.replace_input_with(arg, self._reduce(graph, arg, submaps, reduced, "mean", record))
                submaps[node] = 1
                continue
            self._align(graph, node, inputs, submaps, count)
            submaps[node] = count
        return submaps

    def _align(self, graph: fx.Graph, node: fx.Node, inputs: list[fx.Node], submaps: dict[fx.Node, int],
               count: int) -> None:
        """Give one-map-per-image inputs (after a global pool) to every submap of the others."""
        counts = {submaps[arg] for arg in inputs if tensor_metas(arg)}
        if len(counts - {1}) > 1:
            raise ConversionError(
                f"submap layouts do not match at {node.name} ({sorted(counts)} submaps); "
                "this architecture joins feature maps from different subsampling steps")
        for arg in inputs:
            if submaps[arg] == 1 and count > 1 and tensor_metas(arg):
                with graph.inserting_before(node):
                    repeated = graph.call_function(layers.submap_repeat, (arg, count))
                repeated.meta = dict(arg.meta)
                submaps[repeated] = count
                node.replace_input_with(arg, repeated)

    def _reduce(self, graph: fx.Graph, node: fx.Node, submaps: dict[fx.Node, int],
                reduced: dict[fx.Node, fx.Node], kind: str, record: bool) -> fx.Node:
        if node not in reduced:
            function = layers.submap_mean if kind == "mean" else layers.submap_amax
            with graph.inserting_after(node):
                reduced[node] = graph.call_function(function, (node, submaps[node]))
            reduced[node].meta = dict(node.meta)
            submaps[reduced[node]] = 1
            if record:
                self.report.averaged_at.append(f"{node.name} ({kind} of {submaps[node]} submaps)")
        return reduced[node]

    def _sampler_node(self, graph: fx.Graph, first: fx.Node, index: int, submaps: int, k: int, n: int) -> fx.Node:
        name = f"ccnn_sampler_step{index}"
        kind = "naive" if n == k * k else self.report.sampler
        seed = None if self.seed is None else self.seed + index
        existing = getattr(self.root, name, None)
        if existing is None:
            self.root.add_module(name, layers.SubmapSampler(kind, submaps, k, n, seed))
        elif (existing.submaps, existing.stride, existing.samples) != (submaps, k, n):
            raise ConversionError(f"train and eval graphs disagree at subsampling step {index}")
        with graph.inserting_before(first):
            return graph.create_node("call_module", name)  # the module lives on the root, not the graph's owner

    def _replace_strided(self, node: fx.Node, strided: Strided, sampler: fx.Node) -> None:
        x = node.args[0] if node.args else node.kwargs["input"]
        if node.op == "call_module":
            replacements = {"conv2d": layers.MultisampleConv2d, "max_pool2d": layers.MultisampleMaxPool2d,
                            "avg_pool2d": layers.MultisampleAvgPool2d}
            current = self.root.get_submodule(node.target)
            if not isinstance(current, tuple(replacements.values())):
                _set_submodule(self.root, node.target, replacements[strided.op](current))
            node.args, node.kwargs = (x, sampler), {}
            return
        args = call_args(node, strided.op)
        functions = {"conv2d": layers.multisample_conv2d, "max_pool2d": layers.multisample_max_pool2d,
                     "avg_pool2d": layers.multisample_avg_pool2d}
        names = [name for name in ARG_NAMES[strided.op][1:] if name != "return_indices"]
        node.target = functions[strided.op]
        node.args = (x, sampler, *(args[name] for name in names))
        node.kwargs = {}

    def _record(self, member: Strided, step: int, plan: dict, submaps: dict[fx.Node, int]) -> None:
        node = member.node
        source = node.args[0] if node.args else None
        submaps_in = submaps.get(source, 1) if isinstance(source, fx.Node) else 1
        out = tensor_meta(node)
        note = member.unsupported or ("(keep_first)" if step <= self.report.keep_first
                                      and self.report.mode != "traditional" else "")
        self.report.layers.append(LayerRecord(
            name=member.name, op=member.op, kernel=member.kernel, stride=member.stride, step=step,
            converted=node in plan, submaps_in=submaps_in, submaps_out=submaps.get(node, submaps_in),
            output_size=tuple(out.shape[2:]) if out is not None else (), note=note))


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
