"""Spectral, DiffStride and BlurPool modes: each converted strided layer runs at stride 1, then a
downsampler brings the map down. The fx pass:

1. **Trace** both modes and **find the steps** exactly as the multisample pass does
   (:func:`~.ops.strided_steps`: strided layers whose outputs meet are one step), so
   ``keep_first`` counts the same steps in every mode.
2. **Each converted layer** becomes its stride-1 version (a module copy sharing the parameters,
   or the same functional call with stride 1; a ``ceil_mode`` pool loses ceil mode, which only
   matters with a stride), followed by the mode's downsampler:

   * ``spectral``: :func:`spectral_downsample`, fixed spectral pooling to exactly the original
     layer's output size (computed from the input size at run time, odd sizes included), in the
     conversion's ``spectral_convention``, which each call of the graph holds as an argument;
   * ``blurpool``: :func:`blur_downsample`, the binomial blur with the original stride, padded
     by reflection as antialiased-cnns pads, to the original output size (a ``ceil_mode`` pool's
     extra output row gets extra reflection at the far edge);
   * ``diffstride``: one :class:`~.diffstride.DiffStride2d` per step, registered on the root as
     ``ccnn_diffstride_step<N>`` (its strides are in the state_dict), shared by the step's layers
     so that the maps that meet keep one size, built with the conversion's ``spectral_convention``.
     The output size follows the learned strides.

   Where the downsampler goes is ``resample_at`` (:mod:`.placement`): right after the layer,
   or after its pointwise tail (norm, activation), as antialiased-cnns puts BlurPool.

3. **Check** (diffstride): shapes are propagated through the rewritten eval graph; a model that
   cannot take the new sizes (a layer fixed to the old ones) is a one-line ConversionError.
   Spectral and blurpool keep every size, so the original's shape analysis holds.

Strided layers the multisample pass cannot convert (non-square strides, ``return_indices``) stay
traditional here too, with the same warning.
"""

from __future__ import annotations

import copy
import logging
from typing import Sequence

import torch
from torch import Tensor, fx, nn

from .._helpers import first_line
from ..errors import ConversionError
from .blurpool import blur_pool
from .diffstride import DiffStride2d
from .layers import IntPair, pair, pooled_size
from .modes import mode_options
from .options import DEFAULT_BLUR_SIZE, DEFAULT_SMOOTHNESS, chosen_convention
from .placement import DEFAULT_RESAMPLE_AT, pointwise_tail_end, resamples_input
from .ops import ARG_NAMES, Strided, call_args, step_converts, strided_steps, tensor_meta
from .report import ConversionReport, LayerRecord
from .spectral import Convention, spectral_pool
from .tracing import failing_node, propagate_shapes, trace_copy

__all__ = ["Geometry", "blur_downsample", "convert_downsample", "original_size", "spectral_downsample"]

logger = logging.getLogger(__name__)

# Per axis: (kernel, stride, padding, dilation, ceil_mode) of the original strided layer.
Geometry = tuple[tuple[int, int, int, int, bool], tuple[int, int, int, int, bool]]


# --------------------------------------------------------------------------- downsamplers


def original_size(geometry: Geometry, size: IntPair) -> IntPair:
    """The original layer's output size, from the size of its stride-1 version's output."""
    out = []
    for (kernel, stride, padding, dilation, ceil_mode), length in zip(geometry, size):
        input_length = length + dilation * (kernel - 1) - 2 * padding  # invert the stride-1 size
        out.append(pooled_size(input_length, kernel, stride, padding, dilation, ceil_mode))
    return out[0], out[1]


def spectral_downsample(x: Tensor, geometry: Geometry, convention: Convention) -> Tensor:
    """Spectral pooling of a stride-1 layer's output to the original layer's output size, in the
    ``convention`` the conversion chose (an argument of the graph's call: a converted model keeps it)."""
    return spectral_pool(x, original_size(geometry, tuple(x.shape[-2:])), convention)


def blur_downsample(x: Tensor, blur_size: int, geometry: Geometry) -> Tensor:
    """BlurPool of a stride-1 layer's output, with the original stride, to its output size."""
    stride = (geometry[0][1], geometry[1][1])
    return blur_pool(x, stride, blur_size, original_size(geometry, tuple(x.shape[-2:])))


# --------------------------------------------------------------------------- API


UNTRAINED_STRIDES_NOTE = "ccnn_untrained_strides"  # marks the log record that says the strides start untrained


def convert_downsample(model: nn.Module, mode: str, keep_first: int = 0, example_input: torch.Tensor | None = None,
                       leaf_modules: Sequence[type | str] = (), smoothness: float | None = None,
                       blur_size: int | None = None, resample_at: str | None = None,
                       spectral_convention: str | None = None) -> fx.GraphModule:
    """:func:`~.rewrite.convert` for spectral, diffstride and blurpool mode (options already checked)."""
    convention = chosen_convention(spectral_convention) if "spectral_convention" in mode_options(mode) else None
    report = ConversionReport(mode, "", keep_first, None, edges="", smoothness=smoothness, blur_size=blur_size,
                              resample_at=DEFAULT_RESAMPLE_AT if resample_at is None else resample_at,
                              spectral_convention=convention)
    originals = dict(model.named_modules())
    traced = trace_copy(model, leaf_modules, example_input, report.warn)
    rewriter = _Downsampler(traced.root, originals, report, smoothness, blur_size, resample_at, convention)
    traced.rewrite_each(rewriter.rewrite)
    report.warn_if_nothing_converted()
    if mode == "diffstride":  # the other modes keep every size: the original's analysis holds
        _check_shapes(traced.root, traced.graphs[False], traced.example, model, mode)
        rewriter.record_sizes()
    result = traced.graph_module(f"{mode.capitalize()}{type(model).__name__}", model.training,
                                 {"ccnn_report": report})
    if mode == "diffstride" and rewriter.diffstride:
        strides = ", ".join(f"{s[0]}x{s[1]}" for s in rewriter.diffstride_strides)
        logger.info("diffstride: %d learnable stride pairs start at the original strides (%s); "
                    "train the model (ccnn-train) to learn them", len(rewriter.diffstride), strides,
                    extra={UNTRAINED_STRIDES_NOTE: True})  # a loader of learned strides leaves it out
    return result


def _check_shapes(root: nn.Module, graph: fx.Graph, example: Tensor, model: nn.Module, mode: str) -> None:
    graph_module = fx.GraphModule(root, graph)
    graph_module.eval()
    try:
        propagate_shapes(graph_module, example, model)
    except ConversionError as exc:
        cause = exc
        while cause.__cause__ is not None:  # ShapeProp wraps the error that says what went wrong
            cause = cause.__cause__
        raise ConversionError(f"{mode} mode cannot express {type(model).__name__}: the new map sizes do not "
                              f"fit it ({failing_node(graph_module)}{first_line(cause)})") from None


# --------------------------------------------------------------------------- the pass


class _Downsampler:
    """Rewrites the train and eval graphs of one model; modules are changed once, consistently."""

    def __init__(self, root: nn.Module, originals: dict[str, nn.Module], report: ConversionReport,
                 smoothness: float | None, blur_size: int | None, resample_at: str | None = None,
                 convention: Convention | None = None):
        self.root, self.originals, self.report = root, originals, report
        self.convention = convention  # spectral, diffstride: bound into every call and layer
        self.smoothness = DEFAULT_SMOOTHNESS if smoothness is None else float(smoothness)
        self.blur_size = DEFAULT_BLUR_SIZE if blur_size is None else blur_size
        self.diffstride: dict[int, str] = {}  # step -> name of its DiffStride2d on the root
        self.diffstride_strides: list[IntPair] = []
        self.records: list[tuple[LayerRecord, fx.Node | None]] = []  # eval graph: record, its output node
        self.stride_one: set[str] = set()  # module targets already made stride 1
        self.resample_at = DEFAULT_RESAMPLE_AT if resample_at is None else resample_at
        self.modules = dict(root.named_modules())  # the tail's modules (pointwise ones are never replaced)

    def rewrite(self, graph: fx.Graph, record: bool) -> None:
        _, _, steps = strided_steps(graph, self.originals)
        for index, members in enumerate(steps, start=1):
            converts = step_converts(members, index, self.report.keep_first, self.report.warn if record else None)
            for member in members:
                after = self._replace(graph, member, index) if converts else None
                if record:
                    self._record(member, index, after)
        if record:
            self.report.steps = len(steps)



    # -- one strided layer: stride 1, then the downsampler

    def _replace(self, graph: fx.Graph, member: Strided, index: int) -> fx.Node:
        """Run ``member`` at stride 1 and insert its downsampler where :mod:`.placement` says;
        return the first node with the original size on the layer's path (for the report)."""
        node = member.node
        geometry = self._stride_one(node, member)
        if self.resample_at == "activation" and resamples_input(member.op, member.kernel,
                                                                 (geometry[0][2], geometry[1][2])):
            x = node.args[0]
            with graph.inserting_before(node):
                down = self._downsampler(graph, x, geometry, index, member)
            node.replace_input_with(x, down)
            return node
        end = pointwise_tail_end(node, self.modules) if self.resample_at == "activation" else node
        with graph.inserting_after(end):
            after = self._downsampler(graph, end, geometry, index, member)
        end.replace_all_uses_with(after, delete_user_cb=lambda user: user is not after)
        return after

    def _downsampler(self, graph: fx.Graph, x: fx.Node, geometry: Geometry, index: int, member: Strided) -> fx.Node:
        if self.report.mode == "spectral":
            return graph.call_function(spectral_downsample, (x, geometry, self.convention))
        if self.report.mode == "blurpool":
            return graph.call_function(blur_downsample, (x, self.blur_size, geometry))
        # the module lives on the root, not on the graph's owner: create_node skips that check
        return graph.create_node("call_module", self._diffstride_module(index, member.stride), (x,))

    def _stride_one(self, node: fx.Node, member: Strided) -> Geometry:
        """Make ``node`` its stride-1 version; return the original geometry."""
        op = member.op
        if node.op == "call_module":
            module = self.originals[node.target]
            values = {"padding": module.padding, "dilation": getattr(module, "dilation", 1),
                      "ceil_mode": getattr(module, "ceil_mode", False)}
            if node.target not in self.stride_one:  # train and eval graphs share the module
                self.root.set_submodule(node.target, _stride_one_copy(module))
                self.stride_one.add(node.target)
        else:
            values = call_args(node, op)
            x = node.args[0] if node.args else node.kwargs["input"]
            new = {**values, "stride": 1, **({"ceil_mode": False} if op != "conv2d" else {})}
            node.args, node.kwargs = (x, *(new[name] for name in ARG_NAMES[op][1:])), {}
        padding = (0, 0) if values["padding"] == "valid" else pair(values["padding"])
        dilation = pair(values["dilation"]) if op != "avg_pool2d" else (1, 1)
        ceil_mode = bool(values.get("ceil_mode", False)) and op != "conv2d"
        return tuple((member.kernel[a], member.stride[a], padding[a], dilation[a], ceil_mode)  # type: ignore[return-value]
                     for a in (0, 1))

    def _diffstride_module(self, index: int, stride: IntPair) -> str:
        if index not in self.diffstride:
            name = f"ccnn_diffstride_step{index}"
            self.root.add_module(name, DiffStride2d(tuple(float(s) for s in stride), self.smoothness,
                                                      convention=self.convention))
            self.diffstride[index] = name
            self.diffstride_strides.append(stride)
        return self.diffstride[index]

    # -- the report

    def _record(self, member: Strided, step: int, after: fx.Node | None) -> None:
        out = tensor_meta(member.node)
        note = member.unsupported or ("(keep_first)" if step <= self.report.keep_first else "")
        record = LayerRecord(name=member.name, op=member.op, kernel=member.kernel, stride=member.stride, step=step,
                             converted=after is not None, submaps_in=1, submaps_out=1,
                             output_size=tuple(out.shape[2:]) if out is not None else (), note=note)
        self.report.layers.append(record)
        self.records.append((record, after))

    def record_sizes(self) -> None:
        """Output sizes after the rewrite (DiffStride's follow its strides)."""
        for record, after in self.records:
            out = tensor_meta(after) if after is not None else None
            if out is not None:
                record.output_size = tuple(out.shape[2:])


def _stride_one_copy(module: nn.Module) -> nn.Module:
    """A stride-1 copy of a strided conv/pool module that shares its parameter tensors."""
    copied = copy.copy(module)
    for attr in ("_parameters", "_buffers", "_modules"):
        setattr(copied, attr, dict(getattr(module, attr)))
    copied.stride = (1, 1) if isinstance(module, nn.Conv2d) else 1
    if hasattr(copied, "ceil_mode"):
        copied.ceil_mode = False
    return copied
