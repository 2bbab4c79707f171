"""ONNX export of original and converted models: dynamic batch, metadata, verification, benchmark.

The pipeline behind ``ccnn-export`` (every step is also a public function):

1. **Resolve** MODEL with :func:`ccnn_convert.models.resolve_model` and **convert** it with the
   conversion flags (a ccnn-convert artifact brings its own conversion; flags override it).
2. **Export** with torch's dynamo exporter (``torch.export`` + torchlib) with a symbolic batch
   dimension. The submap folding reshapes ``(S*B, ...)`` with ``-1``/shapes read in the graph, so
   the ONNX graph is the same for every batch size and runs at any batch size.
   torchlib writes ONNX opset 18 natively; a lower ``opset`` is produced by a small, checked
   down-conversion (:func:`convert_opset`). If an op cannot be expressed in the requested opset
   the export **fails** with the op named (we never silently write another opset); the opset
   actually written is recorded in the metadata (``opset``) and always equals the request.
3. **Write** into a staging folder next to the output (external data when the weights exceed
   2 GB), check with ``onnx.checker.check_model(full_check=True)``.
4. **Verify** (default): ONNX Runtime vs PyTorch on random inputs at two batch sizes (and on
   real images with ``data``): max abs / max relative difference and top-1 agreement. Beyond
   tolerance the export fails and nothing is left behind; otherwise the staged files are renamed
   onto the output path.
5. **Benchmark** (optional): PyTorch eager vs ONNX Runtime on the same batch, interleaved repeats,
   medians.

Metadata props (all strings; JSON where the value is not a plain string): ``source_model``,
``weights``, ``mode``, ``sampler``, ``keep_first``, ``density``, ``seed``, ``conversion`` (the
convert() kwargs), ``input_size`` (``[3, H, W]``), ``preprocessing`` (resize, crop, mean, std,
interpolation), ``num_classes``, ``dtype``, ``opset``, ``ccnn_convert_version``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import CCNNError, ExportError

__all__ = [
    "DEFAULT_OPSET",
    "NATIVE_OPSET",
    "PROVIDERS",
    "BenchmarkResult",
    "Check",
    "ExportResult",
    "OnnxInfo",
    "ProviderChoice",
    "Verification",
    "benchmark",
    "convert_opset",
    "create_session",
    "export",
    "export_onnx",
    "load_onnx_classifier",
    "read_metadata",
    "select_provider",
    "verify",
]

DEFAULT_OPSET = 17
NATIVE_OPSET = 18  # what torch's dynamo exporter (torchlib) writes before any version conversion
MIN_OPSET = 13
EXPORT_BATCH = 2  # example batch for torch.export: not 0/1, which torch.export would specialize
VERIFY_BATCHES = (1, 3)  # both differ from EXPORT_BATCH: verification also proves the dynamic batch
FP32_TOLERANCE = 1e-4  # max|ort - torch| / max|torch|
FP16_TOLERANCE = 1e-2
FP16_MIN_AGREEMENT = 0.9  # top-1 agreement required on real images for an fp16 export
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26  # protobuf's 2 GB limit, minus room for the graph itself
PROVIDERS = ("auto", "cuda", "tensorrt", "cpu")
INPUT_NAME, OUTPUT_NAME = "images", "logits"
MODES = ("original", "traditional", "checkered", "dilated")
CONVERT_KEYS = ("sampler", "keep_first", "density", "seed")
METADATA_KEYS = ("source_model", "weights", "mode", "sampler", "keep_first", "density", "seed",
                 "conversion", "input_size", "preprocessing", "num_classes", "dtype", "opset",
                 "ccnn_convert_version")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_ORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
              "tensorrt": "TensorrtExecutionProvider"}

Log = Callable[[str], None]


def _quiet_log(message: str) -> None:
    pass


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class ProviderChoice:
    """The ONNX Runtime execution provider to use, and why."""

    name: str  # cpu | cuda | tensorrt
    providers: list  # what to hand to ort.InferenceSession
    reason: str

    @property
    def ort_name(self) -> str:
        return _ORT_NAMES[self.name]

    @property
    def on_gpu(self) -> bool:
        return self.name != "cpu"


@dataclass
class Check:
    """ONNX Runtime vs PyTorch on one set of inputs."""

    inputs: str  # "random" or "images"
    batch: int
    max_abs: float
    max_rel: float  # max|ort - torch| / max|torch|
    top1_agreement: float  # fraction of rows with the same argmax
    tolerance: float
    min_agreement: float | None = None  # None: agreement is reported, not required

    @property
    def passed(self) -> bool:
        ok = math.isfinite(self.max_rel) and self.max_rel <= self.tolerance
        if self.min_agreement is not None:
            ok = ok and self.top1_agreement >= self.min_agreement
        return ok


@dataclass
class Verification:
    provider: str
    dtype: str
    tolerance: float
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failure(self) -> str:
        bad = [c for c in self.checks if not c.passed]
        if not bad:
            return ""
        c = bad[0]
        if not (math.isfinite(c.max_rel) and c.max_rel <= c.tolerance):
            return (f"verification failed: ONNX Runtime ({self.provider}) differs from PyTorch on {c.inputs} "
                    f"inputs at batch {c.batch}: max relative difference {c.max_rel:.3g} > tolerance "
                    f"{c.tolerance:g} (max abs {c.max_abs:.3g}, top-1 agreement {c.top1_agreement:.0%})")
        return (f"verification failed: top-1 agreement {c.top1_agreement:.0%} on {c.inputs} at batch {c.batch} "
                f"is below {c.min_agreement:.0%}")


@dataclass
class BenchmarkResult:
    batch: int
    repeats: int
    threads: int
    torch_device: str
    provider: str
    torch_ms: float  # median latency per batch
    ort_ms: float
    torch_ms_all: list[float] = field(default_factory=list)
    ort_ms_all: list[float] = field(default_factory=list)

    @property
    def torch_images_per_s(self) -> float:
        return self.batch / (self.torch_ms / 1000)

    @property
    def ort_images_per_s(self) -> float:
        return self.batch / (self.ort_ms / 1000)

    @property
    def speedup(self) -> float:
        """PyTorch latency / ORT latency: > 1 means ONNX Runtime is faster."""
        return self.torch_ms / self.ort_ms


@dataclass
class OnnxInfo:
    """What :func:`export_onnx` wrote."""

    path: Path
    opset: int
    nodes: int
    op_counts: dict[str, int]
    bytes: int  # model file + external data
    external_data: bool


@dataclass
class ExportResult:
    path: Path
    name: str
    mode: str
    info: OnnxInfo
    metadata: dict[str, str]
    provider: ProviderChoice | None
    verification: Verification | None
    benchmark: BenchmarkResult | None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# ONNX Runtime providers
# --------------------------------------------------------------------------------------------


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from None
    return onnxruntime


@contextlib.contextmanager
def _captured_fds() -> Iterator[io.StringIO]:
    """Capture what C/C++ code writes to fd 1 and 2 (ONNX Runtime logs provider failures there)."""
    out = io.StringIO()
    saved, tmp = [], tempfile.TemporaryFile(mode="w+b")
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
            except OSError:
                continue
        import sys

        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, _ in saved:
            os.dup2(tmp.fileno(), fd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield out
    finally:
        for fd, copy_fd in saved:
            os.dup2(copy_fd, fd)
            os.close(copy_fd)
        tmp.seek(0)
        out.write(tmp.read().decode("utf-8", "replace"))
        tmp.close()


def _ort_failure_reason(text: str) -> str:
    """The most useful line of ONNX Runtime's provider-loading chatter."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    match = re.search(r"Failed to load library \S+ with error: ([^\n]+)", text)
    if match:
        return match.group(1).strip()
    for pattern in (r"(Failed to create \w+ExecutionProvider[^\n]*?\.)", r"(CUDA failure[^\n]*)",
                    r"(Please install[^\n]*?\.)"):
        match = re.search(pattern, text)
        if match:
            return match.group(1).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no reason given"


def _probe_model() -> bytes:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    return model.SerializeToString()


def _provider_list(name: str) -> list:
    if name == "cpu":
        return ["CPUExecutionProvider"]
    cuda = ("CUDAExecutionProvider", {"use_tf32": "0"})  # fp32 must mean fp32 (TF32 breaks 1e-4)
    if name == "cuda":
        return [cuda, "CPUExecutionProvider"]
    return ["TensorrtExecutionProvider", cuda, "CPUExecutionProvider"]


def _try_provider(name: str) -> tuple[bool, str]:
    """Start a session on a one-node model with ``name``; (worked, reason if it did not)."""
    ort = _ort()
    wanted = _ORT_NAMES[name]
    if wanted not in ort.get_available_providers():
        return False, f"{wanted} is not in onnxruntime's available providers ({', '.join(ort.get_available_providers())})"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with _captured_fds() as chatter:
        try:
            session = ort.InferenceSession(_probe_model(), options, providers=_provider_list(name))
            used = session.get_providers()
        except Exception as exc:  # ORT raises plain RuntimeError/Fail types
            used, error = [], str(exc).strip().splitlines()[0]
        else:
            error = ""
    if used and used[0] == wanted:
        return True, ""
    return False, f"{wanted} is listed but no session starts on it ({error or _ort_failure_reason(chatter.getvalue())})"


def select_provider(requested: str = "auto") -> ProviderChoice:
    """auto: CUDA when onnxruntime lists CUDAExecutionProvider *and* a session starts on it, else
    CPU. cuda/tensorrt: that provider or an ExportError saying why it is unavailable."""
    requested = str(requested).lower()
    if requested not in PROVIDERS:
        raise ExportError(f"unknown provider {requested!r}; choose one of {', '.join(PROVIDERS)}")
    if requested == "cpu":
        return ProviderChoice("cpu", _provider_list("cpu"), "requested with --provider cpu")
    if requested in ("cuda", "tensorrt"):
        ok, why = _try_provider(requested)
        if not ok:
            raise ExportError(f"provider {requested} is unavailable: {why}")
        return ProviderChoice(requested, _provider_list(requested), f"requested with --provider {requested}")
    ok, why = _try_provider("cuda")
    if ok:
        return ProviderChoice("cuda", _provider_list("cuda"),
                              "auto: CUDAExecutionProvider is available and a session started on it")
    return ProviderChoice("cpu", _provider_list("cpu"), f"auto: no usable GPU ({why})")


def create_session(path: str | os.PathLike, choice: ProviderChoice | None = None, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` on ``path`` (all graph optimizations on)."""
    ort = _ort()
    choice = choice or select_provider("cpu")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        with _captured_fds() as chatter:
            session = ort.InferenceSession(str(path), options, providers=choice.providers)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load {path}: {_first_line(exc)}") from None
    if session.get_providers()[0] != choice.ort_name:
        raise ExportError(f"ONNX Runtime fell back from {choice.ort_name} to {session.get_providers()[0]} "
                          f"for {path}: {_ort_failure_reason(chatter.getvalue())}")
    return session


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


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
    text = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(str(e) for e in chain))
    op = re.search(r"op='([\w.]+)', overload='(\w+)'", text)
    op_name = f"{op.group(1)}.{op.group(2)}" if op else None
    if op_name is None and (target := re.search(r"target=(?:torch\.ops\.)?([\w.]+)\]", text)):
        op_name = target.group(1)
    node = re.search(r"translating node %(\w+)", text)
    where = re.search(r'The following call raised this error:\s*\n\s*File "([^"]+)", line (\d+), in \w+\s*\n\s*([^\n]+)', text)
    # The innermost exception says what went wrong; the outer ones are the exporter's wrappers.
    inner = next((e for e in reversed(chain) if _first_line(e) and not _is_wrapper(e)), chain[0])
    reason = _first_line(inner)
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


def export_onnx(module: nn.Module, path: str | os.PathLike, input_size: int | Sequence[int],
                opset: int = DEFAULT_OPSET, *, example_batch: int = EXPORT_BATCH,
                metadata: dict[str, str] | None = None, dtype: torch.dtype = torch.float32,
                external_data: bool | None = None) -> OnnxInfo:
    """Export ``module`` (eval mode, CPU) to ``path`` with a dynamic batch axis and check it.

    ``input_size`` is the (static) spatial size: an int or ``(H, W)``. ``external_data=None``
    chooses external data only when the weights exceed protobuf's 2 GB limit.
    Writes ``path`` directly (no staging, no verification: see :func:`export`).
    """
    import onnx

    opset = _check_opset(opset)
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    module = module.eval()
    example = torch.randn(example_batch, 3, h, w, generator=torch.Generator().manual_seed(0)).to(dtype)
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                module, (example,), None, dynamo=True, dynamic_shapes=({0: batch},),
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=max(opset, NATIVE_OPSET), optimize=True, verify=False, report=False,
                verbose=False)
            proto = program.model_proto
    except Exception as exc:  # the exporter raises many types; all mean "cannot export this"
        raise _export_failure(exc) from exc
    if len(proto.graph.output) != 1:
        raise ExportError(f"the model has {len(proto.graph.output)} outputs; ccnn-export expects one (the logits)")
    if opset != _default_opset(proto):
        convert_opset(proto, opset)
    _name_batch_axis(proto)
    if metadata:
        onnx.helper.set_model_props(proto, {k: str(v) for k, v in metadata.items()})
    proto.doc_string = "exported by ccnn-convert (torch.onnx dynamo exporter)"
    path = Path(path)
    if external_data is None:
        external_data = _initializer_bytes(proto) > EXTERNAL_DATA_THRESHOLD
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
        raise ExportError(f"the exported model fails onnx.checker: {_first_line(exc)}") from exc
    size = path.stat().st_size + ((path.parent / data_name).stat().st_size if external_data else 0)
    nodes, counts = _count_nodes(proto)
    return OnnxInfo(path, opset, nodes, counts, size, external_data)


def _check_opset(opset: int) -> int:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or isinstance(opset, bool) or not MIN_OPSET <= opset <= newest:
        raise ExportError(f"--opset must be an integer from {MIN_OPSET} to {newest} (this onnx), got {opset!r}")
    return opset


def _default_opset(proto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


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


# -- opset down-conversion ---------------------------------------------------------------------

_REDUCE_18 = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
              "ReduceMin", "ReduceProd", "ReduceSumSquare"}


def convert_opset(proto, target: int) -> None:
    """Convert ``proto`` (torchlib output, opset 18 or more) to opset ``target``, in place.

    Upward conversion uses ONNX's version converter. Downward, the ops that changed in opset 18
    get exact adapters here (Pad without ``axes``, Reduce* with constant axes, Split, Resize with
    default new attributes); below 17, ONNX's version converter takes over. An op without an exact
    equivalent in ``target`` raises an ExportError naming it: the file never claims an opset its
    nodes do not follow.
    """
    import onnx

    current = _default_opset(proto)
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
    except Exception as exc:
        raise ExportError(
            f"cannot write opset {target}: ONNX's version converter failed from opset {current} "
            f"({_first_line(exc)}); try --opset {NATIVE_OPSET}, the exporter's native opset") from exc
    if converted is not proto:
        proto.CopyFrom(converted)
    if _default_opset(proto) != target:
        raise ExportError(f"cannot write opset {target}: the converter produced opset {_default_opset(proto)}; "
                          f"try --opset {NATIVE_OPSET}")


def _set_default_opset(proto, version: int) -> None:
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = version


def _lower_18_to_17(proto) -> None:
    import onnx

    if proto.functions:
        raise ExportError(f"cannot lower model-local functions to opset 17; try --opset {NATIVE_OPSET}")
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
                raise ExportError(f"cannot write opset 17: {where} pads selected axes (opset 18 only); "
                                  f"try --opset {NATIVE_OPSET}")
        elif node.op_type in _REDUCE_18:
            _reduce_axes_to_attribute(node, constants, where)
        elif node.op_type == "Split":
            shapes = shapes or _inferred_shapes(proto)
            _split_outputs_to_sizes(proto, node, shapes, where)
        elif node.op_type == "Resize":
            _drop_default_attributes(node, {"antialias": 0, "keep_aspect_ratio_policy": b"stretch"}, where,
                                     forbidden=("axes",))
        else:
            raise ExportError(f"cannot write opset 17: {where} has no opset-17 equivalent; try --opset {NATIVE_OPSET}")


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
            raise ExportError(f"cannot write opset 17: {where} reduces over axes computed at run time; "
                              f"try --opset {NATIVE_OPSET}")
        axes = [int(a) for a in np.asarray(constants[axes_name]).reshape(-1)]
    else:
        axes = []
    if not axes and noop:
        raise ExportError(f"cannot write opset 17: {where} is a no-op reduction; try --opset {NATIVE_OPSET}")
    _remove_attribute(node, "noop_with_empty_axes")
    del node.input[1:]
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
        raise ExportError(f"cannot write opset 17: {where} splits a dimension of unknown size; "
                          f"try --opset {NATIVE_OPSET}")
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
            raise ExportError(f"cannot write opset 17: {where} uses '{name}' (opset 18 only); try --opset {NATIVE_OPSET}")
    for name, default in defaults.items():
        attr = _attribute(node, name)
        if attr is None:
            continue
        value = attr.i if attr.type == attr.INT else attr.s
        if value != default:
            raise ExportError(f"cannot write opset 17: {where} sets {name}={value!r} (opset 18 only); "
                              f"try --opset {NATIVE_OPSET}")
        _remove_attribute(node, name)


# --------------------------------------------------------------------------------------------
# Staged output: nothing appears at the output path unless everything succeeded
# --------------------------------------------------------------------------------------------


def _check_output(path: Path, force: bool) -> Path:
    path = Path(path).expanduser()
    if path.is_dir():
        raise ExportError(f"cannot write {path}: it is a directory")
    if path.exists() and not force:
        raise ExportError(f"{path} already exists (use --force to overwrite)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise ExportError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"cannot write {path}: directory {parent} is not writable")
    return path


@contextlib.contextmanager
def _staged(path: Path, force: bool) -> Iterator[Path]:
    """Yield a path in a private folder next to ``path``; on success move its files into place."""
    path = _check_output(path, force)
    parent = path.parent if str(path.parent) else Path(".")
    try:
        folder = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".staging", dir=parent))
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}") from None
    try:
        yield folder / path.name
        files = sorted(folder.iterdir(), key=lambda p: p.name == path.name)  # the model file last
        for item in files:
            target = parent / item.name
            if item.name != path.name and target.exists() and not force:
                raise ExportError(f"{target} already exists (use --force to overwrite)")
        for item in files:
            os.replace(item, parent / item.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Verification and benchmark
# --------------------------------------------------------------------------------------------


def _run_session(session, images: torch.Tensor | np.ndarray) -> np.ndarray:
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    wanted = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(array, dtype=wanted)})[0]


@contextlib.contextmanager
def _exact_cuda_math() -> Iterator[None]:
    """No TF32 while computing fp32 references on CUDA."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _torch_logits(model: nn.Module, images: torch.Tensor, device: torch.device, chunk: int = 8) -> torch.Tensor:
    outputs = []
    with torch.no_grad(), _exact_cuda_math():
        for start in range(0, images.shape[0], chunk):
            out = model(images[start:start + chunk].to(device))
            if isinstance(out, (tuple, list)):
                out = out[0]
            outputs.append(out.float().cpu())
    return torch.cat(outputs)


def compare(ort_logits: np.ndarray | torch.Tensor, torch_logits: torch.Tensor, inputs: str,
            tolerance: float, min_agreement: float | None = None) -> Check:
    """Max abs, max relative (max|diff| / max|torch|) difference and top-1 agreement."""
    ort_t = torch.as_tensor(np.asarray(ort_logits, dtype=np.float32))
    ref = torch_logits.float()
    if ort_t.shape != ref.shape:
        raise ExportError(f"ONNX Runtime output shape {tuple(ort_t.shape)} differs from PyTorch's {tuple(ref.shape)}")
    diff = (ort_t - ref).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    if not torch.isfinite(ort_t).all():
        max_abs = max_rel = math.inf
    agreement = float((ort_t.argmax(-1) == ref.argmax(-1)).float().mean()) if ref.dim() > 1 else 1.0
    return Check(inputs, int(ref.shape[0]), max_abs, max_rel, agreement, tolerance, min_agreement)


def verify(path: str | os.PathLike, reference: nn.Module, input_size: int, *,
           provider: ProviderChoice | None = None, batches: Sequence[int] = VERIFY_BATCHES,
           images: torch.Tensor | None = None, fp16: bool = False, tolerance: float | None = None,
           threads: int | None = None, seed: int = 0, session=None) -> Verification:
    """Run the ONNX file and the fp32 PyTorch ``reference`` on the same inputs and compare."""
    provider = provider or select_provider("cpu")
    session = session or create_session(path, provider, threads)
    tolerance = tolerance if tolerance is not None else (FP16_TOLERANCE if fp16 else FP32_TOLERANCE)
    device = torch.device("cuda") if provider.on_gpu and torch.cuda.is_available() else torch.device("cpu")
    reference = reference.eval()
    moved = _on_device(reference, device)
    result = Verification(provider.ort_name, "float16" if fp16 else "float32", tolerance)
    generator = torch.Generator().manual_seed(seed)
    try:
        for batch in batches:
            x = torch.randn(batch, 3, input_size, input_size, generator=generator)
            result.checks.append(compare(_run_session(session, x), _torch_logits(moved, x, device), "random", tolerance))
        if images is not None and len(images):
            ort_out = np.concatenate([_run_session(session, images[i:i + 8]) for i in range(0, len(images), 8)])
            result.checks.append(compare(ort_out, _torch_logits(moved, images, device), "images", tolerance,
                                         FP16_MIN_AGREEMENT if fp16 else None))
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"verification could not run: {_first_line(exc)}") from exc
    finally:
        if device.type != "cpu":
            _on_device(reference, torch.device("cpu"))
    return result


def _on_device(model: nn.Module, device: torch.device) -> nn.Module:
    return model if device.type == "cpu" and _module_device(model).type == "cpu" else model.to(device)


def _module_device(model: nn.Module) -> torch.device:
    tensor = next(iter(model.parameters()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def benchmark(path: str | os.PathLike, model: nn.Module, input_size: int, *, batch: int = 4,
              repeats: int = 10, warmup: int = 2, provider: ProviderChoice | None = None,
              threads: int | None = None, fp16: bool = False, session=None) -> BenchmarkResult:
    """Median latency of PyTorch eager and ONNX Runtime on the same batch, repeats interleaved.

    PyTorch runs on CUDA when the provider is a GPU one (and torch sees a GPU), else on CPU with
    ``threads`` threads, the same number ONNX Runtime gets. With ``fp16`` PyTorch runs the
    half-precision model too (on CPU, half is emulated and slow: the ratio then says little).
    """
    if batch < 1 or repeats < 1:
        raise ExportError("benchmark batch and repeats must be positive")
    provider = provider or select_provider("cpu")
    threads = threads or torch.get_num_threads()
    session = session or create_session(path, provider, threads)
    device = torch.device("cuda") if provider.on_gpu and torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.float16 if fp16 else torch.float32
    torch_model = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(1))
    x_dev = x.to(device=device, dtype=dtype)
    x_np = x.numpy().astype(np.float16 if fp16 else np.float32)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch_ms, ort_ms = [], []
    try:
        with torch.no_grad(), _exact_cuda_math():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                torch_model(x_dev)
                _sync(device)
                t_torch = time.perf_counter() - start
                start = time.perf_counter()
                _run_session(session, x_np)
                t_ort = time.perf_counter() - start
                if i >= warmup:
                    torch_ms.append(1000 * t_torch)
                    ort_ms.append(1000 * t_ort)
    finally:
        torch.set_num_threads(saved_threads)
    return BenchmarkResult(batch, repeats, threads, str(device), provider.ort_name,
                           statistics.median(torch_ms), statistics.median(ort_ms), torch_ms, ort_ms)


# --------------------------------------------------------------------------------------------
# Real images for verification
# --------------------------------------------------------------------------------------------


def load_images(data: str | os.PathLike, preprocessing, limit: int = 32) -> torch.Tensor:
    """Up to ``limit`` images from an ImageFolder-style DIR (round-robin over class folders; a
    flat folder of images works too), prepared with ``preprocessing``."""
    from PIL import Image

    root = Path(data).expanduser()
    if not root.is_dir():
        raise CCNNError(f"--data {root} is not a directory")
    if limit < 1:
        raise CCNNError("--data-limit must be positive")

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir()
                      if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)

    groups = [images_in(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    groups = [g for g in groups if g] or [images_in(root)]
    order = [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]
    transform = preprocessing.transform()
    tensors = []
    for path in order:
        if len(tensors) == limit:
            break
        try:
            with Image.open(path) as image:
                tensors.append(transform(image.convert("RGB")))
        except Exception:  # unreadable file: verification uses the others
            continue
    if not tensors:
        raise CCNNError(f"--data {root}: no readable images (ImageFolder layout DIR/<class>/<image>)")
    return torch.stack(tensors)


# --------------------------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------------------------


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def build_metadata(*, name: str, weights: str, mode: str, conversion: dict | None, input_size: int,
                   preprocessing, num_classes: int, dtype: str, opset: int) -> dict[str, str]:
    conversion = dict(conversion or {})
    return {
        "source_model": name,
        "weights": str(weights),
        "mode": mode,
        "sampler": str(conversion.get("sampler", "")) if mode != "original" else "",
        "keep_first": _json(conversion.get("keep_first")),
        "density": _json(conversion.get("density")),
        "seed": _json(conversion.get("seed")),
        "conversion": _json(conversion),
        "input_size": _json([3, input_size, input_size]),
        "preprocessing": _json(preprocessing.to_dict()),
        "num_classes": _json(int(num_classes)),
        "dtype": dtype,
        "opset": _json(opset),
        "ccnn_convert_version": _version(),
    }


def _version() -> str:
    from .. import __version__

    return __version__


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata props of an ONNX file, JSON values decoded (keys written by :func:`export`;
    any other props are returned as strings)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise CCNNError(f"{path} is not a readable ONNX file: {_first_line(exc)}") from None
    raw = {p.key: p.value for p in proto.metadata_props}
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("keep_first", "density", "seed", "conversion", "input_size", "preprocessing",
                   "num_classes", "opset"):
            try:
                out[key] = json.loads(value)
            except ValueError:
                out[key] = value
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# Loading an exported classifier (used by ccnn-eval model.onnx)
# --------------------------------------------------------------------------------------------


class OnnxClassifier:
    """Callable: float32 image batch (numpy or torch, (B, 3, H, W)) -> float32 logits tensor."""

    def __init__(self, path: str | os.PathLike, provider: str | ProviderChoice = "auto", threads: int | None = None):
        self.path = Path(path)
        self.choice = provider if isinstance(provider, ProviderChoice) else select_provider(provider)
        self.session = create_session(self.path, self.choice, threads)
        shape = self.session.get_inputs()[0].shape
        self.spatial = tuple(d if isinstance(d, int) else None for d in shape[2:4]) if len(shape) == 4 else (None, None)

    def __call__(self, images) -> torch.Tensor:
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if array.ndim != 4:
            raise CCNNError(f"{self.path.name} takes (B, 3, H, W) image batches, got shape {array.shape}")
        expected = self.spatial
        if all(expected) and tuple(array.shape[2:]) != expected:
            raise CCNNError(f"{self.path.name} takes {expected[0]}x{expected[1]} images, got "
                            f"{array.shape[2]}x{array.shape[3]} (does --crop match the exported input size?)")
        return torch.from_numpy(np.asarray(_run_session(self.session, array), dtype=np.float32))

    def __repr__(self) -> str:
        return f"OnnxClassifier({str(self.path)!r}, {self.choice.ort_name})"


def load_onnx_classifier(path: str | os.PathLike, provider: str = "auto", threads: int | None = None):
    """``(callable, Preprocessing, name)`` for an ONNX classifier written by :func:`export`.

    The callable takes a float32 numpy/torch batch and returns float32 logits as a torch tensor
    (an fp16 model gets its input cast). Preprocessing comes from the metadata; a foreign ONNX file
    without it gets ImageNet preprocessing with the crop set to its input size.
    """
    from ..models import IMAGENET_MEAN, IMAGENET_STD, Preprocessing

    path = Path(path).expanduser()
    if not path.is_file():
        raise CCNNError(f"ONNX model {path} does not exist")
    metadata = read_metadata(path)
    classifier = OnnxClassifier(path, provider, threads)
    if isinstance(metadata.get("preprocessing"), dict):
        preprocessing = Preprocessing.from_dict(metadata["preprocessing"])
    else:
        crop = classifier.spatial[0] or 224
        preprocessing = Preprocessing(round(crop / 0.875), crop, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    source, mode = metadata.get("source_model"), metadata.get("mode")
    name = f"{source} ({mode}, onnx)" if source and mode else path.stem
    return classifier, preprocessing, name


# --------------------------------------------------------------------------------------------
# The whole pipeline
# --------------------------------------------------------------------------------------------


def conversion_for(mode: str | None, artifact: dict | None, **flags) -> tuple[str, dict | None]:
    """(mode, convert() kwargs) from the flags, falling back to an artifact's own conversion
    (its values count only when the mode is the artifact's mode), then to convert()'s defaults."""
    artifact = dict(artifact or {})
    mode = (mode or artifact.get("mode") or "checkered").lower()
    if mode not in MODES:
        raise CCNNError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "original":
        given = sorted(k for k, v in flags.items() if v is not None and k in CONVERT_KEYS)
        if given:
            raise CCNNError(f"--mode original exports the unconverted model: drop --{given[0].replace('_', '-')}")
        return mode, None
    values: dict[str, Any] = {"sampler": "lattice", "keep_first": 0, "density": None, "seed": None}
    if artifact.get("mode") == mode:
        values.update({k: artifact[k] for k in values if k in artifact})
        if artifact.get("leaf_modules"):
            values["leaf_modules"] = list(artifact["leaf_modules"])
    for key, value in flags.items():
        if value is not None and (key in values or key == "leaf_modules"):
            values[key] = list(value) if key == "leaf_modules" else value
    if not values.get("leaf_modules"):
        values.pop("leaf_modules", None)
    return mode, {"mode": mode, **values}


def _output_default(name: str, mode: str, fp16: bool) -> Path:
    stem = re.sub(r"[^\w.-]+", "_", Path(name).stem if name.endswith((".pt", ".pth", ".py")) else name)
    return Path(f"{stem}_{mode}{'_fp16' if fp16 else ''}.onnx")


def export(model: str | nn.Module, output: str | os.PathLike | None = None, *, mode: str | None = None,
           sampler: str | None = None, keep_first: int | None = None, density: int | None = None,
           seed: int | None = None, leaf_modules: Sequence[str] | None = None, weights: str | None = "DEFAULT",
           arch: str | None = None, input_size: int | None = None, preprocessing: dict | None = None,
           opset: int = DEFAULT_OPSET, fp16: bool = False, provider: str = "auto", verify_output: bool = True,
           data: str | os.PathLike | None = None, data_limit: int = 32, tolerance: float | None = None,
           run_benchmark: bool = False, bench_batch: int = 4, bench_repeats: int = 10, bench_warmup: int = 2,
           threads: int | None = None, force: bool = False, log: Log | None = None) -> ExportResult:
    """Resolve, convert, export, verify (and optionally benchmark) MODEL; see the module docstring.

    ``model`` is a MODEL string for :func:`~ccnn_convert.models.resolve_model` or an nn.Module
    (ImageNet preprocessing). ``output`` defaults to ``<name>_<mode>[_fp16].onnx``. Raises
    CCNNError/ExportError with a one-line message; on any failure nothing is left at ``output``.
    """
    log = log or _quiet_log
    opset = _check_opset(opset)
    if tolerance is not None and not tolerance > 0:
        raise CCNNError("--tolerance must be positive")
    if threads is not None and threads < 1:
        raise CCNNError("--threads must be positive")
    if run_benchmark and (bench_batch < 1 or bench_repeats < 1):
        raise CCNNError("--bench-batch and --bench-repeats must be positive")
    if data is not None and data_limit < 1:
        raise CCNNError("--data-limit must be positive")
    if output is not None:
        _check_output(Path(output), force)  # fail before the slow part
    resolved = _resolve(model, weights, arch, preprocessing, log)
    mode, conversion = conversion_for(mode, resolved.conversion, sampler=sampler, keep_first=keep_first,
                                      density=density, seed=seed, leaf_modules=leaf_modules)
    path = _check_output(Path(output) if output is not None else _output_default(resolved.name, mode, fp16), force)
    choice = select_provider(provider) if (verify_output or run_benchmark) else None
    if choice is not None:
        log(f"provider: {choice.ort_name} ({choice.reason})")
    prep, size, notes = _input_size(resolved.preprocessing, input_size)
    images = load_images(data, prep, data_limit) if (data is not None and verify_output) else None
    torch_model = _build(resolved.model, conversion, size, log)
    exported = copy.deepcopy(torch_model).half() if fp16 else torch_model
    metadata = build_metadata(name=resolved.name, weights=resolved.weights, mode=mode, conversion=conversion,
                              input_size=size, preprocessing=prep, num_classes=resolved.num_classes,
                              dtype="float16" if fp16 else "float32", opset=opset)
    verification = bench = None
    with _staged(path, force) as staged:
        log(f"exporting to ONNX opset {opset} (torch.export, dynamic batch)...")
        start = time.perf_counter()
        info = export_onnx(exported, staged, size, opset, metadata=metadata,
                           dtype=torch.float16 if fp16 else torch.float32)
        log(f"exported {info.nodes} nodes in {time.perf_counter() - start:.1f} s")
        session = create_session(staged, choice, threads or torch.get_num_threads()) if choice else None
        if verify_output:
            log("verifying against PyTorch...")
            verification = verify(staged, torch_model, size, provider=choice, images=images, fp16=fp16,
                                  tolerance=tolerance, session=session)
            if not verification.passed:
                raise VerificationFailed(verification)
        if run_benchmark:
            log(f"benchmarking at batch {bench_batch} ({bench_repeats} interleaved repeats)...")
            bench = benchmark(staged, torch_model, size, batch=bench_batch, repeats=bench_repeats,
                              warmup=bench_warmup, provider=choice, threads=threads, fp16=fp16, session=session)
        del session
    info.path = path
    return ExportResult(path, resolved.name, mode, info, metadata, choice, verification, bench, notes)


class VerificationFailed(ExportError):
    """Raised by :func:`export` when ONNX Runtime and PyTorch disagree; carries the numbers."""

    def __init__(self, verification: Verification):
        super().__init__(verification.failure() + " (the file was not written)")
        self.verification = verification


@dataclass
class _Resolved:
    model: nn.Module
    name: str
    preprocessing: Any
    weights: str
    conversion: dict | None
    num_classes: int


def _resolve(model: str | nn.Module, weights, arch, preprocessing: dict | None, log: Log) -> _Resolved:
    from ..models import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, count_classes, resolve_model

    if isinstance(model, nn.Module):
        prep = Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
        if preprocessing:
            prep = prep.with_overrides(**preprocessing)
        classes = count_classes(model)
        return _Resolved(model.eval(), type(model).__name__, prep, "(in memory)", None, classes)
    log(f"resolving {model}...")
    resolved = resolve_model(str(model), weights=weights, arch=arch, preprocessing=preprocessing or None)
    return _Resolved(resolved.model, resolved.name, resolved.preprocessing, resolved.weights,
                     resolved.conversion, int(getattr(resolved, "num_classes", 1000)))


def _input_size(preprocessing, input_size: int | None):
    """(preprocessing, size, notes): the exported input size; a different --input-size than the
    preset crop moves the crop (and the resize, proportionally) so metadata stays consistent."""
    notes: list[str] = []
    if input_size is None:
        return preprocessing, preprocessing.crop, notes
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise CCNNError(f"--input-size must be a positive integer, got {input_size!r}")
    if input_size != preprocessing.crop:
        resize = max(input_size, round(preprocessing.resize * input_size / preprocessing.crop))
        notes.append(f"input size {input_size}: preprocessing crop {preprocessing.crop} -> {input_size}, "
                     f"resize {preprocessing.resize} -> {resize}")
        preprocessing = dataclasses.replace(preprocessing, crop=input_size, resize=resize)
    return preprocessing, input_size, notes


def _build(model: nn.Module, conversion: dict | None, size: int, log: Log) -> nn.Module:
    if conversion is None:
        return model.eval()
    from ..core import convert

    kwargs = dict(conversion)
    log(f"converting ({', '.join(f'{k}={v}' for k, v in kwargs.items() if v is not None)})...")
    leaf = kwargs.pop("leaf_modules", ())
    return convert(model, example_input=torch.zeros(1, 3, size, size), leaf_modules=leaf or (), **kwargs).eval()
