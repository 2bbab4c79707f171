"""Dilated mode as a real dilated network: remove the stride, dilate every later spatial layer.

The multisample pass computes dilated mode as ``4^T`` folded submaps. This pass builds the
network torchvision's ``replace_stride_with_dilation`` builds, for any traced model: one
full-resolution map per image.

* Every value on the data path carries a **dilation factor** ``(fh, fw)``: the spacing, in its
  own positions, of the samples the original network would have kept. The input has factor 1.
* A **converted step** (same steps as the multisample pass, from :mod:`.rewrite`) loses its
  stride ``s``: its output factor is ``f * s``.
* A **later spatial layer** seeing factor ``f`` gets ``dilation *= f`` and ``padding *= f``
  (so original output ``j`` is dense output ``f * j`` and zero / -inf padding stays padding).
  Average pools become fixed-weight depthwise convolutions with that dilation; for
  ``count_include_pad=False`` the divisor is the same convolution of a ones-map. A converted
  ``ceil_mode`` max pool is padded with -inf at the far edge so that every window that starts
  inside the map is kept, as ceil mode keeps it.
* **Zero pads** (``F.pad``, ``nn.ZeroPad2d``: "same" padding done by hand) seeing factor ``f``
  pad ``f`` times as far, like the paddings of the layers.
* **Global pools** stay as they are (they now pool the larger map); a pool whose fixed window is
  the whole map becomes an adaptive pool to 1x1.
* Anything that depends on the spatial layout in another way (a non-global adaptive pool, a
  reshape that folds the spatial dims into tokens, a linear layer or layer norm over a spatial
  dim, a leaf module that is not element-wise) cannot be dilated: a one-line ConversionError.

Converted modules are new modules sharing the original's parameters, so ``state_dict`` keys and
tensors are those of the model.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from ..errors import ConversionError
from .layers import pair
from .options import check_options
from .ops import ARG_NAMES, VIEWS, call_args, function_op, global_pool_kind, permuted_axes, step_converts, \
    strided_steps, tensor_meta, tensor_metas, zero_pads
from .report import ConversionReport, LayerRecord
from .tracing import ANALYSIS_BATCH, propagate_shapes, trace_copy

__all__ = ["DilatedAvgPool2d", "NativeDilationError", "convert_native", "dilated_avg_pool2d", "padded_max_pool2d"]

logger = logging.getLogger(__name__)

Pair = tuple[int, int]
_ONE = (1, 1)
_SPATIAL_MODULES = {nn.Conv2d: "conv2d", nn.MaxPool2d: "max_pool2d", nn.AvgPool2d: "avg_pool2d"}
_ADAPTIVE = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_ADAPTIVE_FUNCTIONS = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch._C._nn.adaptive_avg_pool2d)


# --------------------------------------------------------------------------- dilated ops


def dilated_avg_pool2d(x: Tensor, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
                       count_include_pad: bool = True, divisor_override: int | None = None) -> Tensor:
    """An average pool with a dilation: a depthwise convolution with weight 1/(kh*kw)."""
    kh, kw = kernel_size
    channels = x.shape[1]
    weight = x.new_ones(channels, 1, kh, kw)
    summed = F.conv2d(x, weight, None, stride, padding, dilation, channels)
    if divisor_override:
        return summed / divisor_override
    if count_include_pad or max(padding) == 0:
        return summed / (kh * kw)
    ones = x.new_ones(1, 1, *x.shape[2:])
    count = F.conv2d(ones, x.new_ones(1, 1, kh, kw), None, stride, padding, dilation)
    return summed / count


class DilatedAvgPool2d(nn.Module):
    """:func:`dilated_avg_pool2d` as a module (no state: the weight is made at run time)."""

    def __init__(self, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
                 count_include_pad: bool = True, divisor_override: int | None = None):
        super().__init__()
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        self.count_include_pad, self.divisor_override = count_include_pad, divisor_override

    def forward(self, x: Tensor) -> Tensor:
        return dilated_avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                                  self.count_include_pad, self.divisor_override)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, count_include_pad={self.count_include_pad}")


def padded_max_pool2d(x: Tensor, kernel_size: Pair, stride: Pair, padding: Pair, dilation: Pair,
                      ceil_of: tuple[Pair, Pair] | None = None) -> Tensor:
    """A max pool padded with -inf outside the op (PyTorch refuses padding over half the kernel,
    which a dilated pool needs).

    ``ceil_of=(factor, stride)`` makes it the dense form of a converted ``ceil_mode`` pool of that
    stride on a map of that dilation factor: the far edge gets the extra -inf rows/columns that
    keep the windows ceil mode keeps (see :func:`_ceil_extra`).
    """
    (ph, pw) = padding
    eh, ew = (0, 0) if ceil_of is None else (
        _ceil_extra(x.shape[2 + a], kernel_size[a], padding[a], dilation[a], ceil_of[0][a], ceil_of[1][a])
        for a in (0, 1))
    x = F.pad(x, (pw, pw + ew, ph, ph + eh), value=-math.inf)
    return F.max_pool2d(x, kernel_size, stride, 0, dilation)


def _ceil_extra(size: int, kernel: int, padding: int, dilation: int, factor: int, stride: int) -> int:
    """Extra far-edge padding for a dense ceil-mode pool, on one axis.

    The samples of the dilated network (the multisample pass with exact edges) start before
    ``factor * stride * out`` (``out``: ceil mode's output length on the original lattice) and
    inside the map or its left padding; a stride-1 pool keeps only the windows that fit.
    """
    lattice = -(-size // factor)  # the original map: every factor-th position
    p, d = padding // factor, dilation // factor
    span = d * (kernel - 1) + 1
    out = (lattice + 2 * p - span + stride - 1) // stride + 1
    if (out - 1) * stride >= lattice + p:
        out -= 1
    keep = min(factor * stride * out, size + padding)
    return max(0, keep - (size + 2 * padding - dilation * (kernel - 1)))


# --------------------------------------------------------------------------- API


def convert_native(model: nn.Module, keep_first: int = 0, example_input: torch.Tensor | None = None,
                   leaf_modules: Sequence[type | str] = ()) -> fx.GraphModule:
    """Dilated mode as a dilated network: same steps and results as
    ``convert(model, mode="dilated", dilation="multisample")``, one full-resolution map per image.

    ``model`` is left untouched; the result shares its parameters (same ``state_dict``). Its
    :func:`~ccnn_convert.core.conversion_report` has ``final_submaps == 1``.
    """
    check_options("dilated", keep_first=keep_first)
    report = ConversionReport("dilated", "naive", keep_first, None, edges="exact", dilation="native")
    originals = dict(model.named_modules())
    traced = trace_copy(model, leaf_modules, example_input, report.warn)
    pass_ = _Dilator(traced.root, originals, report)
    traced.rewrite_each(pass_.rewrite)
    report.warn_if_nothing_converted()
    _check_runs(traced.root, traced.graphs, traced.example, model)
    return traced.graph_module(f"Dilated{type(model).__name__}", model.training, {"ccnn_report": report})


def _check_runs(root: nn.Module, graphs: dict[bool, fx.Graph], example: Tensor, model: nn.Module) -> None:
    """Shape-propagate the dilated graphs: a size baked into the code (a constant reshape) fails here."""
    for graph in graphs.values():
        graph_module = fx.GraphModule(root, graph)
        graph_module.eval()
        try:
            propagate_shapes(graph_module, example, model)
        except ConversionError as exc:
            raise NativeDilationError(f"the dilated network of {type(model).__name__} does not run: {exc}") from None


# --------------------------------------------------------------------------- the pass


class _Dilator:
    """Rewrites the train and eval graphs of one model; modules are changed once, consistently."""

    def __init__(self, root: nn.Module, originals: dict[str, nn.Module], report: ConversionReport):
        self.root, self.originals, self.report = root, originals, report
        self.done: dict[str, tuple] = {}  # module target -> the change made to it

    def rewrite(self, graph: fx.Graph, record: bool) -> None:
        batch, _, steps = strided_steps(graph, self.originals)
        warn = self.report.warn if record else None
        converted = {m.node for index, members in enumerate(steps, start=1)
                     if step_converts(members, index, self.report.keep_first, warn) for m in members}
        factors = self._propagate(graph, batch, converted)
        if record:
            self.report.steps = len(steps)
            self.report.final_submaps = 1
            for index, members in enumerate(steps, start=1):
                for member in members:
                    self._record(member, index, converted, factors)


    # -- factors over the graph

    def _propagate(self, graph: fx.Graph, batch: set[fx.Node], converted: set[fx.Node]) -> dict[fx.Node, Pair]:
        factors: dict[fx.Node, Pair] = {}
        axes: dict[fx.Node, Pair] = {}
        for node in list(graph.nodes):
            if node not in batch or node.op in ("placeholder", "output"):
                continue
            if tensor_metas(node) is None and not _is_container(node):
                continue  # size(), shape, dim(): metadata reads
            inputs = [arg for arg in node.all_input_nodes if factors.get(arg, _ONE) != _ONE]
            factor = self._meet(node, inputs, factors, axes)
            kind = self._spatial_kind(node)
            if kind is not None:
                factors[node] = self._dilate(graph, node, kind, factor, node in converted)
                axes[node] = (2, 3)
                continue
            if factor == _ONE:
                continue
            if global_pool_kind(node, self.originals):
                continue  # pools the whole (larger) map: factor 1 again
            if (pads := zero_pads(node, self.originals)) is not None and axes[inputs[0]] == (2, 3):
                self._scale_pad(node, pads, factor)  # "same" padding done by hand (TF-style models)
                axes[node] = (2, 3)
            else:
                axes[node] = self._layout(node, inputs[0], axes[inputs[0]])
            factors[node] = factor
        return factors

    def _scale_pad(self, node: fx.Node, pads: tuple[int, int, int, int], factor: Pair) -> None:
        """A zero pad of a dilated map pads ``factor`` times as far, as the conv paddings do."""
        left, right, top, bottom = pads
        x = node.args[0] if node.args else node.kwargs["input"]
        node.op, node.target = "call_function", F.pad
        node.args = (x, (left * factor[1], right * factor[1], top * factor[0], bottom * factor[0]))
        node.kwargs = {}

    def _meet(self, node: fx.Node, inputs: list[fx.Node], factors: dict, axes: dict) -> Pair:
        """The factor of the dilated inputs of ``node`` (they must agree); other feature maps
        may only meet them if they are 1x1 (broadcast, as a squeeze-excitation scale)."""
        if not inputs:
            return _ONE
        found = {(factors[arg], axes[arg]) for arg in inputs}
        if len(found) > 1:
            raise ConversionError(f"dilated maps with different factors meet at {node.name}: "
                                  f"{sorted(f for f, _ in found)}")
        (factor, (ah, aw)), = found
        for arg in node.all_input_nodes:
            meta = tensor_meta(arg)
            if arg in inputs or not hasattr(meta, "shape") or len(meta.shape) <= max(ah, aw):
                continue
            if _is_batch_map(arg) and (meta.shape[ah], meta.shape[aw]) != _ONE:
                raise ConversionError(f"a map with dilation {factor} meets an undilated map at {node.name}")
        return factor

    def _spatial_kind(self, node: fx.Node) -> str | None:
        if node.op == "call_module":
            module = self.originals.get(node.target)
            for cls, kind in _SPATIAL_MODULES.items():
                if isinstance(module, cls):
                    return kind
            return None
        return function_op(node.target) if node.op == "call_function" else None

    # -- the layout of a dilated value

    def _layout(self, node: fx.Node, source: fx.Node, spatial: Pair) -> Pair:
        """Where the spatial dims of ``node``'s output are, or a ConversionError if ``node``
        mixes them in a way no dilation can express."""
        meta = tensor_meta(source)
        if _is_container(node) or not isinstance(meta, TensorMetadata):
            return spatial  # a tuple of maps (chunk, split) or one item of it
        if node.op == "call_module":
            module = self.originals.get(node.target)
            if isinstance(module, (*_ADAPTIVE, *_SPATIAL_MODULES)):
                raise _cannot(node, "a pool to a fixed size other than 1x1")
            if next(module.children(), None) is not None:
                raise _cannot(node, f"{type(module).__name__} is a leaf module with layers inside")
            if isinstance(module, nn.Linear) and len(meta.shape) - 1 in spatial:
                raise _cannot(node, "a linear layer over a spatial dimension")
            if isinstance(module, nn.LayerNorm) and max(spatial) >= len(meta.shape) - len(module.normalized_shape):
                raise _cannot(node, "a layer norm over a spatial dimension")
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if node.op == "call_function" and node.target in _ADAPTIVE_FUNCTIONS:
            raise _cannot(node, "a pool to a fixed size other than 1x1")
        if name in ("permute", "transpose", "swapaxes"):
            return permuted_axes(node, name, len(meta.shape), spatial)
        if name in ("linear",) and len(meta.shape) - 1 in spatial:
            raise _cannot(node, "a linear layer over a spatial dimension")
        if name == "layer_norm":
            shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
            if max(spatial) >= len(meta.shape) - (1 if isinstance(shape, int) else len(shape)):
                raise _cannot(node, "a layer norm over a spatial dimension")
        return _kept_spatial(node, meta, spatial, name in VIEWS)

    # -- conv and pool layers

    def _dilate(self, graph: fx.Graph, node: fx.Node, kind: str, factor: Pair, convert: bool) -> Pair:
        if node.op == "call_module":
            args = dict(vars(self.originals[node.target]))
        else:
            args = call_args(node, kind)
        if pool := global_pool_kind(node, self.originals):  # its window may be sized at run time
            if factor != _ONE:
                self._to_global(graph, node, pool)
            return _ONE
        kernel = pair(args["kernel_size"]) if kind != "conv2d" else None
        stride = pair(args["stride"] if args["stride"] not in (None, [], ()) else args["kernel_size"])
        out = (factor[0] * stride[0], factor[1] * stride[1]) if convert else factor
        if factor == _ONE and not convert:
            return _ONE
        new = self._new_args(node, kind, args, kernel, stride, factor, convert)
        self._apply(graph, node, kind, new)
        return out

    def _new_args(self, node: fx.Node, kind: str, args: dict, kernel: Pair | None, stride: Pair,
                  factor: Pair, convert: bool) -> dict:
        dilation = pair(args.get("dilation", 1))
        padding = args["padding"]
        new = dict(args)
        new["dilation"] = (dilation[0] * factor[0], dilation[1] * factor[1])
        new["stride"] = _ONE if convert else stride
        if isinstance(padding, str):
            weight = tensor_meta(node.args[1]) if node.op == "call_function" else None
            size = kernel or (tuple(weight.shape[2:]) if weight is not None else
                              pair(self.originals[node.target].kernel_size))
            if padding == "same" and any(d * (k - 1) % 2 for d, k in zip(dilation, size)):
                raise _cannot(node, "padding='same' with an even kernel")
        else:
            padding = pair(padding)
            new["padding"] = (padding[0] * factor[0], padding[1] * factor[1])
        if kind != "conv2d" and args.get("ceil_mode") and max(stride) > 1:
            if not convert or kind == "avg_pool2d":
                raise _cannot(node, f"a ceil_mode {kind.replace('_', ' ')} with a dilated input")
            new["ceil_of"] = (factor, stride)
        if kind == "conv2d" and args.get("padding_mode", "zeros") != "zeros":
            raise _cannot(node, f"a convolution with padding_mode={args['padding_mode']!r}")
        if args.get("return_indices"):
            raise _cannot(node, "a max pool returning indices")
        return new

    def _apply(self, graph: fx.Graph, node: fx.Node, kind: str, new: dict) -> None:
        ceil_of = new.pop("ceil_of", None)
        if kind == "max_pool2d":
            x = node.args[0] if node.args else node.kwargs["input"]
            node.op, node.target = "call_function", padded_max_pool2d
            node.args = (x, pair(new["kernel_size"]), new["stride"], new["padding"], new["dilation"], ceil_of)
            node.kwargs = {}
            return
        if node.op == "call_module":
            self._set_module(node, kind, new)
            return
        x = node.args[0] if node.args else node.kwargs["input"]
        if kind == "avg_pool2d":
            node.target = dilated_avg_pool2d
            node.args = (x, pair(new["kernel_size"]), new["stride"], new["padding"], new["dilation"],
                         new["count_include_pad"], new["divisor_override"])
        else:
            node.args = (x, *(new[name] for name in ARG_NAMES[kind][1:]))
        node.kwargs = {}

    def _set_module(self, node: fx.Node, kind: str, new: dict) -> None:
        change = (kind, new["stride"], new["padding"], new["dilation"])
        if self.done.setdefault(node.target, change) != change:
            raise _cannot(node, "one module called at two different dilations")
        original = self.originals[node.target]
        if kind == "avg_pool2d":
            module = DilatedAvgPool2d(pair(original.kernel_size), new["stride"], new["padding"], new["dilation"],
                                      original.count_include_pad, original.divisor_override)
        else:
            module = copy.copy(original)  # a new module sharing the parameter tensors
            for attr in ("_parameters", "_buffers", "_modules"):
                setattr(module, attr, dict(getattr(original, attr)))
            module.stride, module.dilation = new["stride"], new["dilation"]
            module.padding = new["padding"]
        parent, _, child = node.target.rpartition(".")
        setattr(self.root.get_submodule(parent) if parent else self.root, child, module)

    def _to_global(self, graph: fx.Graph, node: fx.Node, pool: str) -> None:
        """A fixed window that was the whole map: pool the whole (larger) dilated map."""
        x = node.args[0] if node.args else node.kwargs["input"]
        node.op = "call_function"
        node.target = F.adaptive_max_pool2d if pool == "max" else F.adaptive_avg_pool2d
        node.args, node.kwargs = (x, 1), {}

    def _record(self, member, step: int, converted: set[fx.Node], factors: dict) -> None:
        out = tensor_meta(member.node)
        note = member.unsupported or ("(keep_first)" if step <= self.report.keep_first else "")
        self.report.layers.append(LayerRecord(
            name=member.name, op=member.op, kernel=member.kernel, stride=member.stride, step=step,
            converted=member.node in converted, submaps_in=1, submaps_out=1,
            output_size=tuple(out.shape[2:]) if out is not None else (), note=note))


# --------------------------------------------------------------------------- helpers


class NativeDilationError(ConversionError):
    """The model has a layer a dilation cannot express; multisample dilation still can.

    ``reason`` says what and where, without the advice the message adds.
    """

    def __init__(self, reason: str):
        super().__init__(f"{reason}; use dilation='multisample' for this model")
        self.reason = reason


def _cannot(node: fx.Node, what: str) -> NativeDilationError:
    return NativeDilationError(f"native dilation cannot pass {node.name} ({what})")


def _is_container(node: fx.Node) -> bool:
    meta = tensor_meta(node)
    return isinstance(meta, (tuple, list)) and not isinstance(meta, TensorMetadata) and bool(tensor_metas(node))


def _is_batch_map(node: fx.Node) -> bool:
    meta = tensor_meta(node)
    return hasattr(meta, "shape") and len(meta.shape) >= 4 and meta.shape[0] == ANALYSIS_BATCH


def _kept_spatial(node: fx.Node, source: Any, spatial: Pair, is_view: bool) -> Pair:
    """Element-wise and channel ops keep the spatial dims where they are; a view may change the
    rank if the spatial dims stay last."""
    metas = tensor_metas(node) or []
    in_shape = tuple(source.shape)
    sizes = (in_shape[spatial[0]], in_shape[spatial[1]])
    for meta in metas:
        shape = tuple(meta.shape)
        if len(shape) == len(in_shape) and (shape[spatial[0]], shape[spatial[1]]) == sizes:
            continue
        last = spatial == (len(in_shape) - 2, len(in_shape) - 1)
        if is_view and last and len(shape) >= 2 and shape[-2:] == sizes:
            return (len(shape) - 2, len(shape) - 1)
        raise _cannot(node, "an op that changes or folds the spatial dimensions")
    return spatial
