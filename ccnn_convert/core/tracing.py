"""Trace a model with torch.fx and learn the shape of every value, without computing anything.

* **Leaf modules** are modules the tracer calls as one opaque node instead of tracing into them:
  code fx cannot trace (control flow on tensor values) still converts when it sits inside one.
  Leaves come from the caller (``leaf_modules``: classes, class names or qualified module names)
  or from a library that marks its untraceable modules once, as timm does, with
  :func:`register_notrace_module` (and :func:`register_notrace_function` for plain functions,
  which fx then records as one call).
* **Shape propagation** runs the traced graph on meta tensors (:func:`on_meta`: parameters and
  buffers swapped for meta copies, so a ResNet-152 costs nothing) and annotates every node with
  its output shape. Code that needs real values (a leaf branching on its input) gets one real
  no-grad pass instead. The analysis batch is :data:`ANALYSIS_BATCH` images, so a value whose
  first dimension is that size is per-image data.
"""

from __future__ import annotations

import contextlib
import copy
import io
import itertools
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn.utils.stateless import _reparametrize_module
from torchvision.models.feature_extraction import DualGraphModule

from .._helpers import first_line
from ..errors import ConversionError, ParameterError

__all__ = [
    "ANALYSIS_BATCH", "TracedCopy", "UntraceableError", "analysis_input", "check_leaf_modules", "copy_structure",
    "failing_node", "on_meta", "propagate_shapes", "register_notrace_function", "register_notrace_module", "trace",
    "trace_both_modes", "trace_copy", "unmatched_leaves",
]

ANALYSIS_BATCH = 2  # batch used for shape analysis: tells per-image tensors from others

_NOTRACE_MODULES: dict[type, None] = {}  # ordered sets
_NOTRACE_FUNCTIONS: dict[Callable, None] = {}

LeafSpec = Sequence["type | str"]


# --------------------------------------------------------------------------- leaf registry


def register_notrace_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Never trace into modules of class ``cls`` (or its subclasses): each call is one graph node.

    Usable as a class decorator, like timm's ``register_notrace_module``.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ParameterError("cls", f"{{param}} must be an nn.Module class, got {cls!r}")
    _NOTRACE_MODULES[cls] = None
    return cls


def register_notrace_function(fn: Callable) -> Callable:
    """Record calls to the plain function ``fn`` as one graph node (fx ``autowrap``) instead of
    tracing through it. ``fn`` must be called by its global name in the traced module's code.
    Usable as a decorator."""
    if not callable(fn) or isinstance(fn, type):
        raise ParameterError("fn", f"{{param}} must be a function, got {fn!r}")
    _NOTRACE_FUNCTIONS[fn] = None
    return fn


def check_leaf_modules(leaf_modules: LeafSpec) -> tuple[type | str, ...]:
    """``leaf_modules`` as a tuple, every entry an nn.Module class or a name."""
    if isinstance(leaf_modules, (str, type)):
        leaf_modules = (leaf_modules,)
    leaves = tuple(leaf_modules or ())
    for leaf in leaves:
        if not (isinstance(leaf, str) or (isinstance(leaf, type) and issubclass(leaf, nn.Module))):
            raise ParameterError("leaf_modules", f"{{param}} takes nn.Module classes or names, got {leaf!r}")
    return leaves


def _is_leaf(module: nn.Module, qualname: str, types: tuple[type, ...], names: set[str]) -> bool:
    return isinstance(module, types) or qualname in names or type(module).__name__ in names


def unmatched_leaves(model: nn.Module, leaf_modules: LeafSpec) -> list[str]:
    """The entries of ``leaf_modules`` that match no module of ``model`` (they would do nothing)."""
    modules = list(model.named_modules())
    unmatched = []
    for leaf in check_leaf_modules(leaf_modules):
        types = (leaf,) if isinstance(leaf, type) else ()
        names = {leaf} if isinstance(leaf, str) else set()
        if not any(_is_leaf(module, name, types, names) for name, module in modules):
            unmatched.append(leaf if isinstance(leaf, str) else leaf.__name__)
    return unmatched


# --------------------------------------------------------------------------- tracing


class UntraceableError(ConversionError, ParameterError):
    """fx cannot trace the model; the message names the module to make a leaf (``{param}`` is
    where the CLI puts its flag for ``leaf_modules``)."""


class _Tracer(fx.Tracer):
    """fx tracer with extra leaf modules that remembers where it is, for error messages."""

    def __init__(self, leaf_modules: LeafSpec):
        super().__init__(autowrap_functions=tuple(_NOTRACE_FUNCTIONS))
        leaves = check_leaf_modules(leaf_modules)
        self.leaf_types = tuple(m for m in leaves if isinstance(m, type)) + tuple(_NOTRACE_MODULES)
        self.leaf_names = {m for m in leaves if isinstance(m, str)}
        self.path: list[tuple[str, nn.Module]] = []
        self.failed_in: tuple[str, nn.Module] | None = None  # innermost module being traced at a failure

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return _is_leaf(m, qualname, self.leaf_types, self.leaf_names) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args, kwargs):
        self.path.append((self.path_of_module(m), m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in = self.failed_in or self.path[-1]
            raise
        finally:
            self.path.pop()


def trace(model: nn.Module, leaf_modules: LeafSpec = ()) -> fx.Graph:
    """The fx graph of ``model`` in its current train/eval mode; a one-line error if fx cannot."""
    tracer = _Tracer(leaf_modules)
    try:
        return tracer.trace(model)
    except Exception as exc:  # fx raises many types; all mean "cannot trace this"
        message = f"cannot trace {type(model).__name__} with torch.fx: {first_line(exc)}"
        if not tracer.failed_in:
            raise ConversionError(message) from exc
        path, module = tracer.failed_in
        name = type(module).__name__
        raise UntraceableError("leaf_modules", f"{message} in {path or 'the model'} ({name}); "
                                               f"make it a leaf module ({{param}} {name})") from exc


# --------------------------------------------------------------------------- shapes


def analysis_input(example_input: torch.Tensor | None) -> torch.Tensor:
    """A zero batch of :data:`ANALYSIS_BATCH` images shaped like ``example_input``."""
    if example_input is None:
        return torch.zeros(ANALYSIS_BATCH, 3, 224, 224)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 3:
        raise ParameterError("example_input", "{param} must be an image batch tensor (B, C, H, W)")
    return example_input.new_zeros((ANALYSIS_BATCH, *example_input.shape[1:]))


@contextlib.contextmanager
def on_meta(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` with every parameter and buffer swapped for a meta copy (shapes only, no
    compute, no memory); the real tensors are back on exit. Inputs must be meta tensors too."""
    state = {name: torch.empty_like(t, device="meta")
             for name, t in itertools.chain(module.named_parameters(remove_duplicate=False),
                                              module.named_buffers(remove_duplicate=False))}
    with _reparametrize_module(module, state):
        yield module


def propagate_shapes(graph_module: fx.GraphModule, example: torch.Tensor, model: nn.Module) -> None:
    """Annotate every node of ``graph_module`` with its output shape (``node.meta["tensor_meta"]``).

    On meta tensors first; code that needs values (a leaf module branching on its input) gets a
    real no-grad pass instead. ``model`` names the model in errors.
    """
    try:
        with on_meta(graph_module):
            _shape_prop(graph_module, example.to("meta"))
        return
    except Exception:  # needs real values: fall through to a real pass
        pass
    try:
        with torch.no_grad():
            _shape_prop(graph_module, example)
    except Exception as exc:
        size = "x".join(str(s) for s in example.shape[1:])
        raise ConversionError(
            f"{type(model).__name__} cannot run on a {size} input (too small for its subsampling layers?): "
            f"{failing_node(graph_module)}{first_line(exc.__cause__ or exc)}"
        ) from exc


def _shape_prop(graph_module: fx.GraphModule, example: torch.Tensor) -> None:
    # ShapeProp prints a traceback before re-raising; users get our one-line error instead.
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        ShapeProp(graph_module).propagate(example)


def failing_node(graph_module: fx.GraphModule) -> str:
    """Describe the first node ShapeProp did not get through (it marks each node it ran)."""
    for node in graph_module.graph.nodes:
        if node.op != "placeholder" and "type" not in node.meta:
            if node.op == "call_module":
                return f"at {node.target} ({type(graph_module.get_submodule(node.target)).__name__}): "
            return f"at {node.name}: "
    return ""


# --------------------------------------------------------------------------- trace and analyse


def copy_structure(model: nn.Module) -> nn.Module:
    """Copy the module tree (so rewriting never touches ``model``) but share its tensors,
    as torchvision's create_feature_extractor does: no second copy of the weights."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=shared)


def trace_both_modes(model: nn.Module, leaf_modules: Sequence[type | str],
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


@dataclass
class TracedCopy:
    """What every conversion pass starts from and rewrites: a copy of the model's structure
    (sharing its tensors), its shape-annotated graphs by training flag, and the analysis input."""

    root: nn.Module
    graphs: dict[bool, fx.Graph]
    example: torch.Tensor

    def rewrite_each(self, rewrite: Callable[..., None]) -> None:
        """``rewrite(graph, record=...)`` on every graph, eval first: its report is the one kept."""
        for training in sorted(self.graphs):
            rewrite(self.graphs[training], record=not training)

    def graph_module(self, class_name: str, training: bool, meta: dict) -> fx.GraphModule:
        """The rewritten graphs as one module: torchvision's DualGraphModule when they differ."""
        if len(self.graphs) == 1:
            result = fx.GraphModule(self.root, self.graphs[False], class_name=class_name)
        else:
            result = DualGraphModule(self.root, self.graphs[True], self.graphs[False], class_name=class_name)
            result.meta = {}  # DualGraphModule skips GraphModule.__init__, which creates it
        result.train(training)
        result.meta.update(meta)
        return result


def trace_copy(model: nn.Module, leaf_modules: LeafSpec, example_input: torch.Tensor | None,
               warn: Callable[[str], None]) -> TracedCopy:
    """Check the leaf modules (``warn`` about those matching nothing), copy and trace ``model``."""
    leaf_modules = check_leaf_modules(leaf_modules)
    for leaf in unmatched_leaves(model, leaf_modules):
        warn(f"leaf module {leaf!r} matches nothing in the model")
    root = copy_structure(model)
    example = analysis_input(example_input)
    return TracedCopy(root, trace_both_modes(root, leaf_modules, example), example)


def _same_code(a: fx.Graph, b: fx.Graph) -> bool:
    return a.python_code("self").src == b.python_code("self").src
