"""Opset conversion: write exactly the opset the user asked for, or say which node prevents it.

torch's dynamo exporter (torchlib) writes opset 18. Opset 17 (the default, still the most widely
deployed) differs from 18 in five ops, and each has an exact opset-17 form when its new inputs
are constants: Pad without ``axes``, Reduce* with constant axes (an input in 18, an attribute in
17), Split with ``num_outputs`` (sizes in 17) and Resize with its new attributes at their
defaults. :func:`convert_opset` rewrites those nodes here and leaves lower opsets to ONNX's
version converter. Anything without an exact equivalent raises an :class:`OpsetError` that
names the node: a file never claims an opset that its nodes do not follow.

The rewrites can leave constants that no node reads any more (the Reduce axes, for one);
:func:`ccnn_convert.export.exporter.export_onnx` removes them with onnxscript's optimizer.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .._helpers import first_line
from ..errors import ExportError, ParameterError

__all__ = ["MIN_OPSET", "NATIVE_OPSET", "OpsetError", "check_opset", "convert_opset", "default_opset"]

NATIVE_OPSET = 18  # what torch's dynamo exporter (torchlib) writes before any version conversion
MIN_OPSET = 13
_TRY_NATIVE = f"try {{param}} {NATIVE_OPSET}, the exporter's native opset"
_REDUCE_18 = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
              "ReduceMin", "ReduceProd", "ReduceSumSquare"}


class OpsetError(ParameterError, ExportError):
    """The model cannot be written in the requested opset; the message suggests another one."""

    def __init__(self, template: str):
        super().__init__("opset", template)


def check_opset(opset: int) -> int:
    """``opset`` if this onnx can write it (from :data:`MIN_OPSET`), else a ParameterError."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        raise ParameterError("opset", f"{{param}} must be an integer from {MIN_OPSET} to {newest} "
                                      f"(this onnx), got {opset!r}")
    return opset


def default_opset(proto) -> int:
    """The version of the default (ai.onnx) domain that ``proto`` imports."""
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def convert_opset(proto, target: int) -> None:
    """Convert ``proto`` (torchlib output, opset 18 or more) to opset ``target``, in place.

    Upward conversion uses ONNX's version converter. Downward, the ops that changed in opset 18
    get exact adapters here; below 17, ONNX's version converter takes over. An op without an
    exact equivalent in ``target`` raises an :class:`OpsetError` naming it.
    """
    import onnx

    current = default_opset(proto)
    if target == current:
        return
    try:
        if target > current:
            converted = onnx.version_converter.convert_version(proto, target)
        else:
            if current > NATIVE_OPSET:
                raise ExportError(f"cannot lower opset {current} models (the exporter wrote {current})")
            _lower_18_to_17(proto)
            _set_default_opset(proto, 17)
            converted = proto if target == 17 else onnx.version_converter.convert_version(proto, target)
    except ExportError:
        raise
    except Exception as exc:  # the converter raises plain RuntimeError/ValidationError types
        raise OpsetError(f"cannot write opset {target}: ONNX's version converter failed from opset "
                         f"{current} ({first_line(exc)}); {_TRY_NATIVE}") from exc
    if converted is not proto:
        proto.CopyFrom(converted)
    if default_opset(proto) != target:
        raise OpsetError(f"cannot write opset {target}: the converter produced opset "
                         f"{default_opset(proto)}; {_TRY_NATIVE}")


def _set_default_opset(proto, version: int) -> None:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version


def _lower_18_to_17(proto) -> None:
    import onnx

    if proto.functions:
        raise OpsetError(f"cannot lower model-local functions to opset 17; {_TRY_NATIVE}")
    constants = _constant_values(proto.graph)
    shapes = None
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        since = onnx.defs.get_schema(node.op_type, NATIVE_OPSET, "").since_version
        if since <= 17:
            continue  # same definition in 17 and 18
        where = f"{node.op_type} node {node.name or '(unnamed)'}"
        if node.op_type == "Pad":
            if len(node.input) > 3 and node.input[3]:
                raise OpsetError(f"cannot write opset 17: {where} pads selected axes (opset 18 only); "
                                 f"{_TRY_NATIVE}")
        elif node.op_type in _REDUCE_18:
            _reduce_axes_to_attribute(node, constants, where)
        elif node.op_type == "Split":
            shapes = shapes or _inferred_shapes(proto)
            _split_outputs_to_sizes(proto, node, shapes, where)
        elif node.op_type == "Resize":
            _drop_default_attributes(node, {"antialias": 0, "keep_aspect_ratio_policy": b"stretch"}, where,
                                     forbidden=("axes",))
        else:
            raise OpsetError(f"cannot write opset 17: {where} has no opset-17 equivalent; {_TRY_NATIVE}")


def _constant_values(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
                elif attr.name == "value_ints":
                    values[node.output[0]] = np.array(list(attr.ints), dtype=np.int64)
    return values


def _attribute(node, name: str):
    return next((a for a in node.attribute if a.name == name), None)


def _remove_attribute(node, name: str) -> None:
    kept = [a for a in node.attribute if a.name != name]
    del node.attribute[:]
    node.attribute.extend(kept)


def _reduce_axes_to_attribute(node, constants: dict, where: str) -> None:
    from onnx import helper

    noop = _attribute(node, "noop_with_empty_axes")
    noop = bool(noop.i) if noop is not None else False
    axes_name = node.input[1] if len(node.input) > 1 else ""
    if axes_name:
        if axes_name not in constants:
            raise OpsetError(f"cannot write opset 17: {where} reduces over axes computed at run time; "
                             f"{_TRY_NATIVE}")
        axes = [int(a) for a in np.asarray(constants[axes_name]).reshape(-1)]
    else:
        axes = []
    if not axes and noop:
        raise OpsetError(f"cannot write opset 17: {where} is a no-op reduction; {_TRY_NATIVE}")
    _remove_attribute(node, "noop_with_empty_axes")
    del node.input[1:]  # the axes constant may now be unused: the exporter's clean-up removes it
    if axes:
        node.attribute.append(helper.make_attribute("axes", axes))


def _inferred_shapes(proto) -> dict[str, list[int | None]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for tensor in proto.graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes


def _split_outputs_to_sizes(proto, node, shapes: dict, where: str) -> None:
    from onnx import numpy_helper

    count = _attribute(node, "num_outputs")
    if count is None:
        return  # sizes come from the 'split' input, as in opset 13
    axis = _attribute(node, "axis")
    axis = axis.i if axis is not None else 0
    shape = shapes.get(node.input[0])
    size = shape[axis] if shape and -len(shape) <= axis < len(shape) else None
    if size is None:
        raise OpsetError(f"cannot write opset 17: {where} splits a dimension of unknown size; {_TRY_NATIVE}")
    chunk = -(-size // count.i)
    sizes = [min(chunk, size - i * chunk) for i in range(count.i)]
    name = f"{node.name or node.output[0]}_split_sizes"
    proto.graph.initializer.append(numpy_helper.from_array(np.array(sizes, dtype=np.int64), name))
    _remove_attribute(node, "num_outputs")
    inputs = list(node.input[:1]) + [name]
    del node.input[:]
    node.input.extend(inputs)


def _drop_default_attributes(node, defaults: dict, where: str, forbidden: Sequence[str] = ()) -> None:
    for name in forbidden:
        if _attribute(node, name) is not None:
            raise OpsetError(f"cannot write opset 17: {where} uses '{name}' (opset 18 only); {_TRY_NATIVE}")
    for name, default in defaults.items():
        attr = _attribute(node, name)
        if attr is None:
            continue
        value = attr.i if attr.type == attr.INT else attr.s
        if value != default:
            raise OpsetError(f"cannot write opset 17: {where} sets {name}={value!r} (opset 18 only); "
                             f"{_TRY_NATIVE}")
        _remove_attribute(node, name)
