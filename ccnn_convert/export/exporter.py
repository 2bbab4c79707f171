"""The export itself: torch.export + torchlib to an ONNX file with a dynamic batch axis.

:func:`export_onnx` runs torch's dynamo exporter with a symbolic batch dimension. The submap
folding of converted models reshapes ``(S*B, ...)`` with ``-1`` and shapes read in the graph, so
the ONNX graph is the same for every batch size. Then it

* converts to the requested opset (:mod:`.opset`),
* removes initializers and nodes that no output depends on, with onnxscript's optimizer (the
  opset rewrites leave some; ONNX Runtime would warn about each one on every load),
* writes the file (external data above protobuf's 2 GB limit) and runs ``onnx.checker``.

The exporter raises many exception types, wrapped several times; :func:`_export_failure` turns
them into one line naming the operator, the node and the source line that failed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from .._helpers import first_line
from ..errors import ExportError
from .opset import NATIVE_OPSET, check_opset, convert_opset, default_opset

__all__ = ["DEFAULT_OPSET", "EXTERNAL_DATA_THRESHOLD", "INPUT_NAME", "OUTPUT_NAME", "OnnxInfo",
           "export_onnx", "remove_unused"]

DEFAULT_OPSET = 17
EXPORT_BATCH = 2  # example batch for torch.export: not 0/1, which torch.export would specialize
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26  # protobuf's 2 GB limit, minus room for the graph itself
INPUT_NAME, OUTPUT_NAME = "images", "logits"


@dataclass
class OnnxInfo:
    """What :func:`export_onnx` wrote."""

    path: Path
    opset: int
    nodes: int
    op_counts: dict[str, int]
    bytes: int  # model file + external data
    external_data: bool


def export_onnx(module: nn.Module, path: str | os.PathLike, input_size: int | Sequence[int],
                opset: int = DEFAULT_OPSET, *, example_batch: int = EXPORT_BATCH,
                metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.float32,
                external_data: bool | None = None) -> OnnxInfo:
    """Export ``module`` (eval mode, CPU) to ``path`` with a dynamic batch axis and check it.

    ``input_size`` is the (static) spatial size: an int or ``(H, W)``. ``external_data=None``
    chooses external data only when the weights exceed protobuf's 2 GB limit.
    Writes ``path`` directly (no staging, no verification: see :func:`ccnn_convert.export.export`).
    """
    import onnx

    opset = check_opset(opset)
    proto = _torch_export(module.eval(), input_size, opset, example_batch, dtype)
    if len(proto.graph.output) != 1:
        raise ExportError(f"the model has {len(proto.graph.output)} outputs; export expects one (the logits)")
    if opset != default_opset(proto):
        convert_opset(proto, opset)
    remove_unused(proto)
    _name_batch_axis(proto)
    if metadata:
        onnx.helper.set_model_props(proto, {k: str(v) for k, v in metadata.items()})
    proto.doc_string = "exported by ccnn-convert (torch.onnx dynamo exporter)"
    path = Path(path)
    if external_data is None:
        external_data = _initializer_bytes(proto) > EXTERNAL_DATA_THRESHOLD
    size = _save(proto, path, external_data)
    nodes, counts = _count_nodes(proto)
    return OnnxInfo(path, opset, nodes, counts, size, external_data)


def remove_unused(proto) -> None:
    """Remove, in place, the nodes and initializers that no graph output depends on.

    onnxscript's dead-code pass (``onnx_ir``'s RemoveUnusedNodesPass) keeps the model's inputs
    and outputs as they are.
    """
    from onnxscript.optimizer import remove_unused_nodes

    remove_unused_nodes(proto)


def _torch_export(module: nn.Module, input_size, opset: int, example_batch: int, dtype: torch.dtype):
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    example = torch.randn(example_batch, 3, h, w, generator=torch.Generator().manual_seed(0)).to(dtype)
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet_exporter(), torch.no_grad():
            try:
                return _to_onnx(module, example, batch, opset)
            except Exception as exc:
                if not _is_complex_alias_failure(exc):
                    raise
                # torch.export writes a slice that keeps a whole complex spectrum (DiffStride keeping
                # every frequency of an axis) as aten.alias, which torchlib cannot translate for
                # complex values. An alias of an unmutated value is that value: drop it and retry.
                program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=False)
                return _to_onnx(_without_aliases(program), example, batch, opset)
    except Exception as exc:  # the exporter raises many types; all mean "cannot export this"
        raise _export_failure(exc) from exc


def _to_onnx(model, example: torch.Tensor, batch, opset: int):
    program = torch.onnx.export(
        model, (example,), None, dynamo=True, dynamic_shapes=({0: batch},),
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
        opset_version=max(opset, NATIVE_OPSET), optimize=True, verify=False, report=False,
        verbose=False)
    return program.model_proto


def _is_complex_alias_failure(exc: BaseException) -> bool:
    text = "\n".join(str(e) for e in _exception_chain(exc))
    return "aten.alias" in text and "complex" in text


def _without_aliases(program):
    """``program`` with its ``aten.alias`` nodes replaced by their input (no value is mutated in an
    inference graph, so an alias and its input are the same tensor)."""
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()
    return program


def _save(proto, path: Path, external_data: bool) -> int:
    """Write and check ``proto``; the bytes written (model file + external data)."""
    import onnx

    data_name = f"{path.name}.data"
    if external_data:
        (path.parent / data_name).unlink(missing_ok=True)  # save_model appends to an existing file
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported model fails onnx.checker: {first_line(exc)}") from exc
    return path.stat().st_size + ((path.parent / data_name).stat().st_size if external_data else 0)


# -- reading the exporter's failures ------------------------------------------------------------


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen and len(chain) < 12:
        chain.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return chain


def _export_failure(exc: BaseException) -> ExportError:
    """One line naming the op / node / source line where torch's ONNX exporter failed."""
    chain = _exception_chain(exc)
    text = _plain("\n".join(str(e) for e in chain))
    op = re.search(r"op='([\w.]+)', overload='(\w+)'", text)
    op_name = f"{op.group(1)}.{op.group(2)}" if op else None
    if op_name is None and (target := re.search(r"target=(?:torch\.ops\.)?([\w.]+)\]", text)):
        op_name = target.group(1)
    node = re.search(r"translating node %(\w+)", text)
    where = re.search(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in \w+\s*\n\s*([^\n]+)', text)
    # The innermost exception says what went wrong; the outer ones are the exporter's wrappers.
    inner = next((e for e in reversed(chain) if _plain(first_line(e)) and not _is_wrapper(e)), chain[0])
    reason = _plain(first_line(inner))
    step = "torch.export" if "step 1/3" in text else ("translation to ONNX" if "step 3/3" in text else "export")
    parts = [f"ONNX export failed ({step})"]
    if op_name and "No ONNX function found" in text:
        reason = f"no ONNX translation for operator {op_name}"
    elif op_name:
        parts.append(f"at operator {op_name}")
    if node:
        parts.append(f"(node %{node.group(1)})")
    if where:
        parts.append(f"at {where.group(1)}:{where.group(2)} `{where.group(3).strip()}`")
    return ExportError(" ".join(parts) + f": {reason}")


def _is_wrapper(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("torch.onnx") and type(exc).__name__ in (
        "TorchExportError", "ConversionError", "OnnxExporterError")


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.export / torch.onnx / onnxscript chatter (warnings, logs, graph dumps) stays hidden."""
    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir", "torch._dynamo",
             "torch.fx.experimental.symbolic_shapes", "torch._subclasses")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# -- small facts about a proto ------------------------------------------------------------------


def _initializer_bytes(proto) -> int:
    return sum(t.ByteSize() for t in proto.graph.initializer)


def _count_nodes(proto) -> tuple[int, dict[str, int]]:
    counts: dict[str, int] = {}

    def visit(graph) -> None:
        for node in graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    visit(sub)

    visit(proto.graph)
    for function in proto.functions:
        for node in function.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return sum(counts.values()), dict(sorted(counts.items()))


def _name_batch_axis(proto) -> None:
    """Call the symbolic batch dimension 'batch' on the input and the output."""
    for value in (*proto.graph.input, *proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_param"):
            dims[0].dim_param = "batch"
