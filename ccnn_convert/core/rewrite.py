"""Trace a model with torch.fx and rewrite its subsampling layers into multisampling ones.

The pass, in data-flow order:

1. **Trace** the model twice (train and eval mode, as torchvision's feature extraction does),
   with user-configurable leaf modules.
2. **Propagate shapes** on fake tensors (no compute) to know which values are per-image feature
   maps and to catch inputs that are too small.
3. **Find strided layers** (``nn.Conv2d``/``MaxPool2d``/``AvgPool2d`` modules, subclasses with the
   standard forward, and ``F.conv2d``/``F.max_pool2d``/``F.avg_pool2d`` calls) and **group them into
   steps**: strided layers whose outputs meet (residual add, concatenation) are one step, so
   parallel branches sample identically.
4. **Rewrite**: each converted step gets one :class:`~ccnn_convert.layers.SubmapSampler` node
   feeding all its layers; the submap count of every value is tracked; global pools reduce over
   submaps; submaps are averaged right before the first op that leaves the spatial feature map
   (flatten, view, linear on 2-D, ...), so the unchanged classifier sees one map per image.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.utils.stateless import _reparametrize_module
from torchvision.models.feature_extraction import DualGraphModule

from . import layers
from ..errors import ConversionError, ParameterError
from .sequences import SEQUENCES

CONVERSION_MODES = ("checkered", "dilated", "traditional")
ANALYSIS_BATCH = 2  # batch used for shape analysis: tells per-image tensors from others

_CONV_FUNCS = {F.conv2d, torch.conv2d}
_MAX_POOL_FUNCS = {F.max_pool2d, torch.max_pool2d}
_AVG_POOL_FUNCS = {F.avg_pool2d, torch._C._nn.avg_pool2d}
_ARG_NAMES = {
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


@dataclass
class _Strided:
    """A strided conv/pool node, normalized."""

    node: fx.Node
    op: str  # conv2d | max_pool2d | avg_pool2d
    kernel: tuple[int, int]
    stride: tuple[int, int]
    unsupported: str = ""  # why it cannot be multisampled, if it cannot

    @property
    def name(self) -> str:
        """Module path of the layer (for a functional call: of the module that makes it)."""
        if self.node.op == "call_module":
            return self.node.target
        stack = self.node.meta.get("nn_module_stack")
        owner = next(reversed(stack.values()))[0] if stack else ""
        return owner or self.node.name


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
        density: samples per window, overriding the mode (1 = traditional, k*k = dilated).
        seed: makes the ``random`` sampler reproducible.
        example_input: an input for shape analysis (default ``(2, 3, 224, 224)``); the converted
            model still accepts any input size the original accepts.
        leaf_modules: module types or qualified names not to trace into.

    Returns:
        A ``torch.fx.GraphModule`` with the same parameters as ``model``: same names, and the
        very same tensors (shared, like torchvision's ``create_feature_extractor``; deep-copy
        ``model`` first if you fine-tune the result and want the original kept apart).
        Its :func:`conversion_report` says what was rewritten.
    """
    check_options(mode, sampler, keep_first, density, seed)
    model = _copy_structure(model)
    was_training = model.training
    graphs = {}
    for training in (True, False):
        model.train(training)
        graphs[training] = _trace(model, leaf_modules)
    example = _analysis_input(example_input)
    originals = dict(model.named_modules())

    if _same_code(graphs[True], graphs[False]):
        graphs = {False: graphs[False]}  # one graph serves both modes
    # Shapes first, for every graph: rewriting replaces modules they share.
    for graph in graphs.values():
        graph_module = fx.GraphModule(model, graph)
        graph_module.eval()  # shapes only: never touch BatchNorm running statistics
        _propagate_shapes(graph_module, example, model)
    model.train(was_training)

    report = ConversionReport(mode, sampler, keep_first, density)
    rewriter = _Rewriter(model, originals, report, seed)
    for training in sorted(graphs):  # eval first: its report is the one we keep
        rewriter.rewrite(graphs[training], record=not training)

    if len(graphs) == 1:
        result = fx.GraphModule(model, graphs[False], class_name=f"Checkered{type(model).__name__}")
    else:
        result = DualGraphModule(model, graphs[True], graphs[False], class_name=f"Checkered{type(model).__name__}")
    result.train(was_training)
    if "meta" not in result.__dict__:
        result.meta = {}  # DualGraphModule skips GraphModule.__init__, which creates it
    result.meta["ccnn_report"] = report
    return result


def _copy_structure(model: nn.Module) -> nn.Module:
    """Copy the module tree (so rewriting never touches ``model``) but share its tensors,
    as torchvision's create_feature_extractor does: no second copy of the weights."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=shared)


def _same_code(a: fx.Graph, b: fx.Graph) -> bool:
    return a.python_code("self").src == b.python_code("self").src


def conversion_report(model: nn.Module) -> ConversionReport:
    """The :class:`ConversionReport` of a model returned by :func:`convert`."""
    meta = getattr(model, "meta", {})
    if "ccnn_report" not in meta:
        raise ConversionError("this model was not produced by ccnn_convert.convert")
    return meta["ccnn_report"]


# --------------------------------------------------------------------------- validation, tracing


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


class _Tracer(fx.Tracer):
    """fx tracer with extra leaf modules that remembers where it is, for error messages."""

    def __init__(self, leaf_modules: Sequence[type | str]):
        super().__init__()
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.ccnn_path: list[tuple[str, nn.Module]] = []
        self.failed_in: tuple[str, nn.Module] | None = None  # innermost module being traced at a failure

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, self.leaf_types) or qualname in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args, kwargs):
        self.ccnn_path.append((self.path_of_module(m), m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or self.ccnn_path[-1]
            raise
        finally:
            self.ccnn_path.pop()


def _trace(model: nn.Module, leaf_modules: Sequence[type | str]) -> fx.Graph:
    tracer = _Tracer(leaf_modules)
    try:
        return tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean "cannot trace this"
        where = ""
        if tracer.failed_in:
            path, module = tracer.failed_in
            where = (f" in {path or 'the model'} ({type(module).__name__}); make it a leaf module "
                     f"(leaf_modules=[{type(module).__name__!r}], CLI --leaf {type(module).__name__})")
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConversionError(f"cannot trace {type(model).__name__} with torch.fx: {reason}{where}") from exc


def _analysis_input(example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is None:
        return torch.zeros(ANALYSIS_BATCH, 3, 224, 224)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 3:
        raise ConversionError("example_input must be an image batch tensor (B, C, H, W)")
    return example_input.new_zeros((ANALYSIS_BATCH, *example_input.shape[1:]))


def _propagate_shapes(graph_module: fx.GraphModule, example: torch.Tensor, model: nn.Module) -> None:
    """Annotate every node with its output shape.

    First on meta tensors (parameters swapped for meta copies: nothing is computed); code that
    needs values (a leaf module branching on its input) gets a real no-grad pass instead.
    """
    meta_state = {name: torch.empty_like(t, device="meta")
                  for name, t in itertools.chain(graph_module.named_parameters(), graph_module.named_buffers())}
    try:
        with _reparametrize_module(graph_module, meta_state):
            _shape_prop(graph_module, example.to("meta"))
        return
    except Exception:
        pass
    try:
        with torch.no_grad():
            _shape_prop(graph_module, example)
    except Exception as exc:
        size = "x".join(str(s) for s in example.shape[1:])
        message = str(exc.__cause__ or exc).strip().splitlines()[0]
        raise ConversionError(
            f"{type(model).__name__} cannot run on a {size} input (too small for its subsampling layers?): "
            f"{_failing_node(graph_module)}{message}"
        ) from exc


def _shape_prop(graph_module: fx.GraphModule, example: torch.Tensor) -> None:
    # ShapeProp prints a traceback before re-raising; users get our one-line error instead.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        ShapeProp(graph_module).propagate(example)


def _failing_node(graph_module: fx.GraphModule) -> str:
    """Describe the first node ShapeProp did not get through (it marks each node it ran)."""
    for node in graph_module.graph.nodes:
        if node.op != "placeholder" and "type" not in node.meta:
            if node.op == "call_module":
                return f"at {node.target} ({type(graph_module.get_submodule(node.target)).__name__}): "
            return f"at {node.name}: "
    return ""


# --------------------------------------------------------------------------- analysis helpers


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    value = tuple(value)
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])


def _call_args(node: fx.Node, op: str) -> dict[str, Any]:
    """Arguments of a functional conv/pool call by name, defaults filled in."""
    values = dict(_DEFAULTS[op])
    values.update(zip(_ARG_NAMES[op], node.args))
    values.update(node.kwargs)
    return values


def _function_op(target: Any) -> str | None:
    if target in _CONV_FUNCS:
        return "conv2d"
    if target in _MAX_POOL_FUNCS:
        return "max_pool2d"
    if target in _AVG_POOL_FUNCS:
        return "avg_pool2d"
    return None


def _find_strided(node: fx.Node, originals: dict[str, nn.Module]) -> _Strided | None:
    """The strided conv/pool this node is, or None."""
    if node.op == "call_module":
        return _strided_module(node, originals[node.target])
    if node.op == "call_function" and (op := _function_op(node.target)):
        args = _call_args(node, op)
        if _is_dynamic(args.get("kernel_size")) or _is_dynamic(args["stride"]):
            # Sizes computed from the input at run time (e.g. pooling over x.size()[2:]).
            return _Strided(node, op, (0, 0), (0, 0), "kernel or stride computed at run time")
        if op == "conv2d":
            weight = node.args[1] if len(node.args) > 1 else node.kwargs["weight"]
            kernel = tuple(_meta(weight).shape[2:4]) if _meta(weight) is not None else (0, 0)
        else:
            kernel = _pair(args["kernel_size"])
        stride = kernel if op != "conv2d" and args["stride"] in (None, [], ()) else _pair(args["stride"])
        if max(stride) <= 1:
            return None
        return _Strided(node, op, kernel, stride, _unsupported(op, stride, args))
    return None


def _is_dynamic(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return any(_is_dynamic(v) for v in value)
    return isinstance(value, fx.Node)


def _strided_module(node: fx.Node, module: nn.Module) -> _Strided | None:
    kinds = ((nn.Conv2d, "conv2d"), (nn.MaxPool2d, "max_pool2d"), (nn.AvgPool2d, "avg_pool2d"))
    for cls, op in kinds:
        if isinstance(module, cls):
            stride = _pair(module.stride if module.stride is not None else module.kernel_size)
            if max(stride) <= 1:
                return None
            kernel = _pair(module.kernel_size)
            reason = _unsupported(op, stride, vars(module))
            if type(module).forward is not cls.forward:
                reason = f"{type(module).__name__} overrides forward (not traced into)"
            return _Strided(node, op, kernel, stride, reason)
    if isinstance(module, (nn.Conv1d, nn.Conv3d, nn.ConvTranspose2d, nn.MaxPool3d, nn.AvgPool3d)):
        if max(getattr(module, "stride", (1,))) > 1:
            return _Strided(node, type(module).__name__, (0, 0), (0, 0), f"{type(module).__name__} is not supported")
    return None


def _unsupported(op: str, stride: tuple[int, int], args: dict[str, Any]) -> str:
    if stride[0] != stride[1]:
        return f"non-square stride {stride}"
    if args.get("return_indices"):
        return "max pool with return_indices"
    if op == "conv2d" and isinstance(args.get("padding"), str) and args["padding"] != "valid":
        return f"padding={args['padding']!r}"
    return ""


def _meta(node: Any) -> Any:
    return node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None


def _tensor_metas(node: fx.Node) -> list[TensorMetadata] | None:
    """Output tensor metadata of a node (flattening tuples), or None for non-tensor outputs."""
    meta = _meta(node)
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


def _is_feature_map(node: fx.Node) -> bool:
    """True if every tensor this node outputs is per-image with spatial dims (rank >= 4)."""
    metas = _tensor_metas(node)
    return bool(metas) and all(len(m.shape) >= 4 and m.shape[0] == ANALYSIS_BATCH for m in metas)


def _global_pool_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """'mean' or 'max' if the node pools a 4-D map over all its positions, else None."""
    if node.op == "call_module":
        module = modules.get(node.target)
        if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and _pair(module.output_size) == (1, 1):
            return "mean" if isinstance(module, nn.AdaptiveAvgPool2d) else "max"
        return None
    target = node.target
    if target in (F.adaptive_avg_pool2d, torch._C._nn.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                  torch.adaptive_max_pool1d) or getattr(target, "__name__", "") == "adaptive_max_pool2d":
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        if size is not None and not isinstance(size, fx.Node) and _pair(size) == (1, 1):
            return "max" if "max" in getattr(target, "__name__", "") else "mean"
        return None
    name = target if node.op == "call_method" else getattr(target, "__name__", "")
    if name in ("mean", "amax") and node.op in ("call_method", "call_function"):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        source = _meta(node.args[0]) if node.args else None
        if source is not None and len(source.shape) == 4 and dims is not None and not isinstance(dims, fx.Node):
            dims = {d % 4 for d in ((dims,) if isinstance(dims, int) else dims)}
            if dims == {2, 3}:
                return "mean" if name == "mean" else "max"
    return None


def _is_whole_map_pool(strided: _Strided) -> bool:
    """An old-style global pool: a pool whose window is the whole map (stride = kernel, or
    sizes computed from the input) and whose output is 1x1."""
    if strided.op == "conv2d":
        return False
    source, out = _meta(strided.node.args[0]), _meta(strided.node)
    if source is None or out is None or tuple(out.shape[2:]) != (1, 1):
        return False
    if strided.stride == (0, 0):  # computed at run time
        return True
    return (strided.stride == strided.kernel and strided.kernel[0] >= source.shape[2]
            and strided.kernel[1] >= source.shape[3])


# --------------------------------------------------------------------------- steps


def _batch_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes whose value depends on the model input (per-image data, not weights)."""
    batch: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(arg in batch for arg in node.all_input_nodes):
            batch.add(node)
    return batch


def _group_steps(graph: fx.Graph, strided: dict[fx.Node, _Strided], batch: set[fx.Node]) -> list[list[_Strided]]:
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
    groups: dict[fx.Node, list[_Strided]] = {}
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
            if node in batch and (found := _find_strided(node, self.originals)) and not _is_whole_map_pool(found):
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

    def _plan(self, steps: list[list[_Strided]]) -> dict[fx.Node, tuple[int, int, int]]:
        """Map each converted strided node to (step index, stride k, samples n)."""
        plan = {}
        for index, members in enumerate(steps, start=1):
            samples = self._samples(members, index)
            if samples is None:
                continue
            for member in members:
                plan[member.node] = (index, member.stride[0], samples)
        return plan

    def _samples(self, members: list[_Strided], index: int) -> int | None:
        if self.report.mode == "traditional" or index <= self.report.keep_first:
            return None
        problems = [f"{m.name}: {m.unsupported}" for m in members if m.unsupported]
        strides = {m.stride for m in members}
        if len(strides) > 1:
            problems.append(f"layers with different strides {sorted(strides)} meet")
        if problems:
            self._warn(f"step {index} stays traditional ({'; '.join(problems)})")
            return None
        k = members[0].stride[0]
        n = self.report.density or (k * k if self.report.mode == "dilated" else k)
        if n > k * k:
            raise ConversionError(f"density {n} is more than the {k * k} positions of a stride-{k} window")
        return None if n == 1 else n

    def _warn(self, message: str) -> None:
        if message not in self.report.warnings:
            self.report.warnings.append(message)
            warnings.warn(message, stacklevel=3)

    # -- submap bookkeeping over the graph

    def _propagate(self, graph: fx.Graph, batch: set[fx.Node], strided: dict[fx.Node, _Strided],
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
            if _tensor_metas(node) is None:
                continue  # size(), shape, dim(): metadata reads of a submapped tensor stay as they are
            pool = self._global_pool(node)
            count = max((submaps[arg] for arg in inputs), default=1)
            if pool and count > 1:
                submaps[node] = count
                users = list(node.users)
                reduction = self._reduce(graph, node, submaps, reduced, pool, record)
                for user in users:
                    user.replace_input_with(node, reduction)
                continue
            if count > 1 and not _is_feature_map(node):
                # The value leaves the spatial feature map: average the submaps first.
                for arg in inputs:
                    if submaps[arg] > 1:
                        node.replace_input_with(arg, self._reduce(graph, arg, submaps, reduced, "mean", record))
                submaps[node] = 1
                continue
            self._align(graph, node, inputs, submaps, count)
            submaps[node] = count
        return submaps

    def _global_pool(self, node: fx.Node) -> str | None:
        """'mean'/'max' if the node pools each map over all its positions."""
        kind = _global_pool_kind(node, self.originals)
        if kind is None and (found := _find_strided(node, self.originals)) and _is_whole_map_pool(found):
            kind = "max" if found.op == "max_pool2d" else "mean"
        return kind

    def _align(self, graph: fx.Graph, node: fx.Node, inputs: list[fx.Node], submaps: dict[fx.Node, int],
               count: int) -> None:
        """Give one-map-per-image inputs (after a global pool) to every submap of the others."""
        counts = {submaps[arg] for arg in inputs if _tensor_metas(arg)}
        if len(counts - {1}) > 1:
            raise ConversionError(
                f"submap layouts do not match at {node.name} ({sorted(counts)} submaps); "
                "this architecture joins feature maps from different subsampling steps")
        for arg in inputs:
            if submaps[arg] == 1 and count > 1 and _tensor_metas(arg):
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

    def _replace_strided(self, node: fx.Node, strided: _Strided, sampler: fx.Node) -> None:
        x = node.args[0] if node.args else node.kwargs["input"]
        if node.op == "call_module":
            replacements = {"conv2d": layers.MultisampleConv2d, "max_pool2d": layers.MultisampleMaxPool2d,
                            "avg_pool2d": layers.MultisampleAvgPool2d}
            current = self.root.get_submodule(node.target)
            if not isinstance(current, tuple(replacements.values())):
                _set_submodule(self.root, node.target, replacements[strided.op](current))
            node.args, node.kwargs = (x, sampler), {}
            return
        args = _call_args(node, strided.op)
        functions = {"conv2d": layers.multisample_conv2d, "max_pool2d": layers.multisample_max_pool2d,
                     "avg_pool2d": layers.multisample_avg_pool2d}
        names = [name for name in _ARG_NAMES[strided.op][1:] if name != "return_indices"]
        node.target = functions[strided.op]
        node.args = (x, sampler, *(args[name] for name in names))
        node.kwargs = {}

    def _record(self, member: _Strided, step: int, plan: dict, submaps: dict[fx.Node, int]) -> None:
        node = member.node
        source = node.args[0] if node.args else None
        submaps_in = submaps.get(source, 1) if isinstance(source, fx.Node) else 1
        out = _meta(node)
        note = member.unsupported or ("(keep_first)" if step <= self.report.keep_first
                                      and self.report.mode != "traditional" else "")
        self.report.layers.append(LayerRecord(
            name=member.name, op=member.op, kernel=member.kernel, stride=member.stride, step=step,
            converted=node in plan, submaps_in=submaps_in, submaps_out=submaps.get(node, submaps_in),
            output_size=tuple(out.shape[2:]) if out is not None else (), note=note))


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, child = target.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)
