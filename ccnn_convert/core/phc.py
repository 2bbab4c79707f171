"""PHC: parameterized hypercomplex convolutions (Grassucci, Zhang and Comminiello, "Lightweight
convolutional neural networks by hypercomplex parameterization").

A PHC layer builds its weight as a sum of ``n`` Kronecker products,
``W = sum_i A_i (x) F_i``: ``A`` is ``(n, n, n)`` (the learned algebra rules), ``F`` is
``(n, out/n, in/n, kh, kw)``, and block ``(p, q)`` of ``W`` (``out/n`` rows, ``in/n`` columns
of kernels) is ``sum_i A[i, p, q] * F[i]``. Parameters fall to about ``1/n``.

* :class:`PHConv2d` is an ``nn.Conv2d`` whose ``weight`` is that sum, so every pass that knows
  convolutions (multisample, native dilation, stride-1 copies, exact edges) converts it as it is;
  in eval mode without gradients the weight is computed once and kept until the parameters
  change (their version counters) or the mode does.
* :func:`nearest_kronecker_sum` fits ``A`` and ``F`` to a pretrained weight: Van Loan and
  Pitsianis' rearrangement (block ``(p, q)`` becomes row ``p*n + q``) and the best rank-``n``
  approximation of that matrix by SVD, ``A_i = sqrt(s_i) u_i`` and ``F_i = sqrt(s_i) v_i``.
  The relative Frobenius error is the norm of the dropped singular values over the whole norm.
* :func:`convert_phc` swaps every eligible convolution of a model; :func:`dense_copy` turns the
  layers back into plain convolutions holding the materialised weight (for ONNX).
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, fx, nn

from ..errors import ParameterError
from .layers import MultisampleConv2d, pair
from .tracing import copy_structure, register_notrace_module

__all__ = ["PHC_INITS", "MultisamplePHConv2d", "PHCLayer", "PHCReport", "PHConv2d", "convert_phc", "dense_copy",
           "is_phc_layer", "kronecker_sum", "nearest_kronecker_sum", "phc_parameter_count", "phc_parameter_names"]

PHC_INITS = ("fit", "xavier")  # from a pretrained weight, or the published random initialisation


def kronecker_sum(A: Tensor, F: Tensor) -> Tensor:
    """``sum_i kron(A[i], F[i])``: ``(n*o, n*c, kh, kw)`` from ``A (n, n, n)`` and ``F (n, o, c, kh, kw)``."""
    n, o, c, kh, kw = F.shape
    # out[p, a, q, b] = sum_i A[i, p, q] F[i, a, b]: row block p, column block q
    return torch.einsum("ipq,iabhw->paqbhw", A, F).reshape(n * o, n * c, kh, kw)


_TRACED_WEIGHTS: dict[int, tuple] = {}  # id(F) -> (ref to F, ref to A, versions, weight)


def traced_kronecker_sum(A: Tensor, F: Tensor) -> Tensor:
    """:func:`kronecker_sum` as the graph of a conv traced through calls it (its class overrides
    ``forward``): one fx node, run at every forward, which :func:`dense_copy` replaces by the
    materialised weight. Without a graph to build (eval, no_grad) the weight is kept until ``A``
    or ``F`` change (their version counters), as :class:`PHConv2d` keeps its own."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return kronecker_sum(A, F)
    key = (A._version, F._version, A.device, A.dtype, F.device, F.dtype)
    cached = _TRACED_WEIGHTS.get(id(F))
    if cached is None or cached[0]() is not F or cached[1]() is not A or cached[2] != key:
        index = id(F)
        forget = lambda _ref: _TRACED_WEIGHTS.pop(index, None)  # noqa: E731 (F collected: drop its weight)
        cached = (weakref.ref(F, forget), weakref.ref(A), key, kronecker_sum(A, F))
        _TRACED_WEIGHTS[index] = cached
    return cached[3]


torch.fx.wrap("traced_kronecker_sum")


def rearranged(weight: Tensor, n: int) -> Tensor:
    """Van Loan and Pitsianis' rearrangement: block ``(p, q)`` of ``weight`` as row ``p*n + q``."""
    out, cin, kh, kw = weight.shape
    blocks = weight.reshape(n, out // n, n, cin // n, kh, kw).permute(0, 2, 1, 3, 4, 5)
    return blocks.reshape(n * n, -1)


def nearest_kronecker_sum(weight: Tensor, n: int) -> tuple[Tensor, Tensor, float]:
    """``(A, F, relative_error)``: the sum of ``n`` Kronecker products nearest ``weight`` in the
    Frobenius norm (rank-``n`` SVD of the rearranged weight, computed in float64)."""
    out, cin, kh, kw = weight.shape
    u, s, vh = torch.linalg.svd(rearranged(weight.detach().double(), n), full_matrices=False)
    kept = min(n, s.numel())  # a tiny layer may have fewer than n singular values: the rest are 0
    root = s[:kept].sqrt()
    A = torch.zeros(n, n * n, dtype=torch.float64)
    F = torch.zeros(n, vh.shape[1], dtype=torch.float64)
    A[:kept] = (u[:, :kept] * root).T
    F[:kept] = root[:, None] * vh[:kept]
    total = s.square().sum()
    error = float((s[kept:].square().sum() / total).sqrt()) if total > 0 else 0.0
    return (A.reshape(n, n, n).to(weight.dtype), F.reshape(n, out // n, cin // n, kh, kw).to(weight.dtype), error)


def phc_parameter_count(n: int, in_channels: int, out_channels: int, kernel_size, groups: int = 1,
                        bias: bool = True) -> int:
    """Parameters of a PHC layer: ``n^3 + out*in*kh*kw/(n*groups) + out``."""
    kh, kw = pair(kernel_size)
    return n ** 3 + out_channels * (in_channels // groups) * kh * kw // n + (out_channels if bias else 0)


class _KroneckerWeight:
    """The ``weight`` of a conv computed from ``A`` and ``F``; cached in eval mode without gradients."""

    n: int
    A: nn.Parameter
    F: nn.Parameter
    _weight_cache: tuple | None = None

    @property
    def weight(self) -> Tensor:
        if (self.training or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or isinstance(self.A, torch.fx.Proxy)):
            if isinstance(self.A, torch.fx.Proxy):
                return traced_kronecker_sum(self.A, self.F)  # traced through: one node of the graph
            return kronecker_sum(self.A, self.F)  # a training forward builds it once, with its graph
        key = (self.A._version, self.F._version, self.A.device, self.A.dtype, self.F.device, self.F.dtype)
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, kronecker_sum(self.A, self.F))
        return self._weight_cache[1]

    def train(self, mode: bool = True):
        self._weight_cache = None
        return super().train(mode)


@register_notrace_module  # one graph node: the passes convert it as the conv it is
class PHConv2d(_KroneckerWeight, nn.Conv2d):
    """A convolution whose weight is ``sum_i kron(A[i], F[i])``; ``bias`` as ``nn.Conv2d``'s.

    ``A`` and ``F`` start Xavier-uniform, as the published layers (torch's fans of their shapes);
    the bias as ``nn.Conv2d``'s. ``in_channels / groups`` and ``out_channels`` must be divisible
    by ``n``; ``name`` (the layer's path) makes that error name the layer.
    """

    def __init__(self, n: int, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, groups: int = 1, padding_mode: str = "zeros", name: str = ""):
        check_phc(n)
        where = f"layer {name}" if name else "PHConv2d"
        for what, count in (("in_channels / groups", in_channels // groups if in_channels % groups == 0 else 0),
                            ("out_channels", out_channels)):
            if count <= 0 or count % n:
                raise ParameterError("phc", f"{where}: {what} = {count} is not divisible by {{param}} = {n}")
        # nn.Conv2d's init makes a dense weight; it is dropped right away (a property replaces it)
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                           padding_mode)
        del self.weight
        kh, kw = self.kernel_size
        self.n = n
        self.A = nn.Parameter(torch.empty(n, n, n))
        self.F = nn.Parameter(torch.empty(n, out_channels // n, in_channels // groups // n, kh, kw))
        nn.init.xavier_uniform_(self.A)
        nn.init.xavier_uniform_(self.F)

    def reset_parameters(self) -> None:
        """The bias as ``nn.Conv2d``'s (uniform, 1/sqrt(fan_in)); A and F are set in ``__init__``."""
        if self.bias is not None:
            kh, kw = self.kernel_size
            bound = 1 / math.sqrt(self.in_channels // self.groups * kh * kw)
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def fitted(cls, conv: nn.Conv2d, n: int, name: str = "") -> tuple["PHConv2d", float]:
        """A PHC layer nearest ``conv`` (same geometry, its bias shared) and the fit's relative error."""
        layer = cls(n, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, conv.groups, conv.padding_mode, name)
        A, F, error = nearest_kronecker_sum(conv.weight, n)
        layer.A = nn.Parameter(A.to(conv.weight.device), requires_grad=conv.weight.requires_grad)
        layer.F = nn.Parameter(F.to(conv.weight.device), requires_grad=conv.weight.requires_grad)
        layer.bias = conv.bias
        return layer, error

    def multisample(self) -> "MultisamplePHConv2d":
        """This layer as the multisample pass's strided conv (sharing A, F and the bias)."""
        return MultisamplePHConv2d(self)

    def extra_repr(self) -> str:
        return f"n={self.n}, " + super().extra_repr()


class MultisamplePHConv2d(_KroneckerWeight, MultisampleConv2d):
    """:class:`~.layers.MultisampleConv2d` of a :class:`PHConv2d`: same A, F and bias, same names."""

    def __init__(self, conv: PHConv2d):
        nn.Module.__init__(self)
        self.n, self.A, self.F, self.bias = conv.n, conv.A, conv.F, conv.bias
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        self.groups, self.padding_mode = conv.groups, conv.padding_mode
        self.in_channels, self.out_channels, self.kernel_size = conv.in_channels, conv.out_channels, conv.kernel_size

    def extra_repr(self) -> str:
        return f"n={self.n}, " + super().extra_repr()


register_notrace_module(MultisamplePHConv2d)


# --------------------------------------------------------------------------- the pass


@dataclass
class PHCLayer:
    """One convolution and what the PHC pass did with it."""

    name: str
    shape: tuple[int, ...]  # the dense weight's
    params_before: int
    params_after: int
    error: float | None  # relative Frobenius error of the fit (None: initialised, or kept)
    kept: str = ""  # why the layer stays a dense conv
    norm2: float = 0.0  # squared Frobenius norm of the dense weight (weighs the total error)

    @property
    def converted(self) -> bool:
        return not self.kept


@dataclass
class PHCReport:
    """What :func:`convert_phc` did: per layer, and the totals."""

    n: int
    init: str
    layers: list[PHCLayer] = field(default_factory=list)

    @property
    def converted(self) -> list[PHCLayer]:
        return [layer for layer in self.layers if layer.converted]

    @property
    def kept(self) -> list[PHCLayer]:
        return [layer for layer in self.layers if not layer.converted]

    @property
    def params_before(self) -> int:
        return sum(layer.params_before for layer in self.layers)

    @property
    def params_after(self) -> int:
        return sum(layer.params_after for layer in self.layers)

    @property
    def error(self) -> float | None:
        """Relative Frobenius error over every fitted weight at once: sqrt(sum err^2 |W|^2 / sum |W|^2)."""
        fitted = [layer for layer in self.converted if layer.error is not None]
        if not fitted:
            return None
        total = sum(layer.norm2 for layer in fitted)
        dropped = sum(layer.error ** 2 * layer.norm2 for layer in fitted)
        return math.sqrt(dropped / total) if total > 0 else 0.0


def check_phc(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ParameterError("phc", f"{{param}} must be an integer of at least 2 (the number of Kronecker "
                                    f"products), got {n!r}")


def check_phc_init(init: str) -> None:
    if init not in PHC_INITS:
        raise ParameterError("phc_init", f"unknown {{param}} {init!r}; choose one of {', '.join(PHC_INITS)}")


def convert_phc(model: nn.Module, n: int, init: str = "fit") -> tuple[nn.Module, PHCReport]:
    """A copy of ``model`` (sharing every other tensor) whose convolutions are PHC layers.

    ``init="fit"``: :func:`nearest_kronecker_sum` of each pretrained weight; ``"xavier"``: the
    published random initialisation (a model trained from scratch). A conv whose ``in/groups`` or
    ``out`` channels are not divisible by ``n`` (the 3-channel stem, depthwise convs) stays dense
    and is listed in the report. A conv whose class overrides ``forward`` keeps it: only its
    ``weight`` becomes the Kronecker sum (:func:`_with_kronecker_weight`).
    """
    check_phc(n)
    check_phc_init(init)
    copied = copy_structure(model)
    report = PHCReport(n, init)
    for name, conv in list(copied.named_modules()):
        if not isinstance(conv, nn.Conv2d) or isinstance(conv, PHConv2d):
            continue
        record = _record(name, conv, n)
        report.layers.append(record)
        if record.kept:
            continue
        if init == "fit":
            layer, record.error = PHConv2d.fitted(conv, n, name)
        else:
            layer = PHConv2d(n, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                             conv.dilation, conv.bias is not None, conv.groups, conv.padding_mode, name)
            layer.to(conv.weight.device)
            if conv.bias is not None:
                with torch.no_grad():  # a copy: the original's bias tensor stays as it was
                    conv.bias = nn.Parameter(layer.bias.detach().clone())
        if type(conv).forward is not nn.Conv2d.forward:  # keep the class's forward, swap the weight
            layer = _with_kronecker_weight(conv, n, layer.A.data, layer.F.data)
        layer.train(conv.training)
        record.params_after = sum(p.numel() for p in layer.parameters())
        copied.set_submodule(name, layer)
    return copied, report


def is_phc_layer(module: nn.Module) -> bool:
    """Whether ``module``'s weight is a Kronecker sum of its ``A`` and ``F``."""
    return isinstance(module, _KroneckerWeight)


def phc_parameter_names(model: nn.Module) -> set[str]:
    """The names, as in ``model.named_parameters()``, of the PHC layers' own parameters (A, F and
    the bias): those of PHC modules, and those of convolutions traced through (in a GraphModule
    such a conv is a plain module holding A and F, found from the graph's ``traced_kronecker_sum`` nodes)."""
    owners = {name for name, module in model.named_modules() if is_phc_layer(module)}
    for prefix, module in model.named_modules():
        if not isinstance(module, fx.GraphModule):
            continue
        graphs = {id(g): g for g in (getattr(module, "train_graph", None), getattr(module, "eval_graph", None),
                                     module.graph) if isinstance(g, fx.Graph)}
        for graph in graphs.values():
            for node in graph.nodes:
                if node.op == "call_function" and node.target is traced_kronecker_sum:
                    owners.update(".".join(filter(None, (prefix, arg.target.rpartition(".")[0])))
                                  for arg in node.args if isinstance(arg, fx.Node) and arg.op == "get_attr")
    return {name for name, _ in model.named_parameters() if name.rpartition(".")[0] in owners}


_SWAPPED: dict[type, type] = {}


def _with_kronecker_weight(conv: nn.Conv2d, n: int, A: Tensor, F: Tensor) -> nn.Conv2d:
    """``conv`` itself (a class that overrides forward, e.g. EfficientNet-Lite's static "same"
    padding), its class swapped for a subclass whose ``weight`` is the Kronecker sum: its own
    forward reads ``self.weight`` and runs unchanged (traced through, as before)."""
    cls = type(conv)
    if cls not in _SWAPPED:
        _SWAPPED[cls] = type(f"PHC{cls.__name__}", (_KroneckerWeight, cls), {"__module__": __name__})
    requires_grad = conv.weight.requires_grad
    del conv.weight
    conv.__class__ = _SWAPPED[cls]
    conv.n, conv._weight_cache = n, None
    conv.A = nn.Parameter(A, requires_grad=requires_grad)
    conv.F = nn.Parameter(F, requires_grad=requires_grad)
    return conv


def _record(name: str, conv: nn.Conv2d, n: int) -> PHCLayer:
    params = sum(p.numel() for p in conv.parameters(recurse=False))
    record = PHCLayer(name, tuple(conv.weight.shape), params, params, None,
                      norm2=float(conv.weight.detach().double().square().sum()))
    per_group = conv.in_channels // conv.groups
    if per_group % n or conv.out_channels % n:
        what = "depthwise" if per_group == 1 else ("grouped" if conv.groups > 1 else "")
        record.kept = (f"{what + ': ' if what else ''}in/groups={per_group}, out={conv.out_channels} "
                       f"not both divisible by {n}")
    return record


# --------------------------------------------------------------------------- materialised (ONNX)


def dense_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (sharing other tensors) whose PHC layers are plain convolutions holding
    the materialised weight: what ONNX stores, and the same numbers."""
    replacements: dict[str, Callable[[], nn.Module]] = {}
    for name, module in model.named_modules():
        if isinstance(module, PHConv2d):
            replacements[name] = lambda m=module: _dense_conv(m)
        elif isinstance(module, MultisamplePHConv2d):
            replacements[name] = lambda m=module: MultisampleConv2d(_dense_conv(m))
    graph = getattr(model, "graph", None)
    traced = [node for node in graph.nodes if node.target is traced_kronecker_sum] if isinstance(graph, fx.Graph) else []
    if not replacements and not traced:
        return model
    # A deep-copied GraphModule starts in training mode; the mode is set first, since switching
    # it may switch the graph (train and eval graphs)
    copied = copy_structure(model).train(model.training)
    for name, make in replacements.items():
        copied.set_submodule(name, make())
    if traced:
        _materialise_traced(copied)
    return copied


def _materialise_traced(graph_module: fx.GraphModule) -> None:
    """Each ``traced_kronecker_sum(A, F)`` node of a conv traced through becomes a constant weight."""
    for index, node in enumerate([n for n in graph_module.graph.nodes if n.target is traced_kronecker_sum]):
        with torch.no_grad():
            A, F = (graph_module.get_parameter(arg.target) for arg in node.args)
            name = f"ccnn_phc_weight{index}"
            graph_module.register_buffer(name, kronecker_sum(A, F).detach().clone())
        with graph_module.graph.inserting_before(node):
            node.replace_all_uses_with(graph_module.graph.get_attr(name))
        sources = node.args
        graph_module.graph.erase_node(node)
        for arg in sources:
            if not arg.users:
                graph_module.graph.erase_node(arg)
    graph_module.recompile()


def _dense_conv(layer: nn.Module) -> nn.Conv2d:
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode,
                     device=layer.A.device, dtype=layer.A.dtype)
    with torch.no_grad():
        conv.weight = nn.Parameter(kronecker_sum(layer.A, layer.F).detach().clone(), requires_grad=False)
    conv.bias = layer.bias
    return conv.train(layer.training)
