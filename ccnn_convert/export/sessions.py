"""ONNX Runtime: choosing an execution provider, opening sessions, and the ONNX classifier.

A provider that ONNX Runtime *lists* may still fail to start (a CUDA build without the CUDA
libraries, for one), and ORT then falls back to the CPU silently. :func:`select_provider`
therefore starts a session on a one-node model before choosing a GPU provider, and
:func:`create_session` refuses a session that fell back; both say why, in one line, from ORT's
own log output.

:func:`load_onnx_classifier` is what ``ccnn-eval model.onnx`` uses. This module imports neither
torch.onnx nor the exporter, so evaluation never pays for them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .._helpers import captured_fds, first_line
from ..errors import CCNNError, ExportError, ParameterError
from .metadata import class_names_of, read_metadata, scale_to_crop

__all__ = ["PROVIDERS", "OnnxClassifier", "ProviderChoice", "create_session", "load_onnx_classifier",
           "run_session", "select_provider"]

PROVIDERS = ("auto", "cuda", "tensorrt", "cpu")
_ORT_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
              "tensorrt": "TensorrtExecutionProvider"}
_QUIET = 3  # ORT log severity: errors only (we report failures ourselves, in one line)


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


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise ExportError("onnxruntime is not installed: pip install onnxruntime (or onnxruntime-gpu)") from None
    return onnxruntime


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
    available = ort.get_available_providers()
    if wanted not in available:
        return False, f"{wanted} is not in onnxruntime's available providers ({', '.join(available)})"
    options = ort.SessionOptions()
    options.log_severity_level = _QUIET
    with captured_fds() as chatter:
        try:
            session = ort.InferenceSession(_probe_model(), options, providers=_provider_list(name))
            used, error = session.get_providers(), ""
        except Exception as exc:  # ORT raises plain RuntimeError/Fail types
            used, error = [], first_line(exc)
    if used and used[0] == wanted:
        return True, ""
    return False, f"{wanted} is listed but no session starts on it ({error or _ort_failure_reason(chatter.getvalue())})"


def select_provider(requested: str = "auto") -> ProviderChoice:
    """auto: CUDA when onnxruntime lists CUDAExecutionProvider *and* a session starts on it, else
    CPU. cuda/tensorrt: that provider or an ExportError saying why it is unavailable."""
    requested = str(requested).lower()
    if requested not in PROVIDERS:
        raise ParameterError("provider", f"{{param}}: unknown provider {requested!r}; choose one of "
                                         f"{', '.join(PROVIDERS)}")
    if requested == "cpu":
        return ProviderChoice("cpu", _provider_list("cpu"), "requested")
    if requested in ("cuda", "tensorrt"):
        ok, why = _try_provider(requested)
        if not ok:
            raise ExportError(f"provider {requested} is unavailable: {why}")
        return ProviderChoice(requested, _provider_list(requested), "requested")
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
    options.log_severity_level = _QUIET
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    try:
        with captured_fds() as chatter:
            session = ort.InferenceSession(str(path), options, providers=choice.providers)
    except Exception as exc:
        raise ExportError(f"ONNX Runtime cannot load {path}: {first_line(exc)}") from None
    if session.get_providers()[0] != choice.ort_name:
        raise ExportError(f"ONNX Runtime fell back from {choice.ort_name} to {session.get_providers()[0]} "
                          f"for {path}: {_ort_failure_reason(chatter.getvalue())}")
    return session


def run_session(session, images: torch.Tensor | np.ndarray) -> np.ndarray:
    """The session's first output for a float batch (cast to the model's input dtype)."""
    array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    wanted = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(array, dtype=wanted)})[0]


class OnnxClassifier:
    """Callable: float32 image batch (numpy or torch, (B, 3, H, W)) -> float32 logits tensor."""

    def __init__(self, path: str | os.PathLike, provider: str | ProviderChoice = "auto", threads: int | None = None):
        self.path = Path(path)
        self.choice = provider if isinstance(provider, ProviderChoice) else select_provider(provider)
        self.session = create_session(self.path, self.choice, threads)
        shape = self.session.get_inputs()[0].shape
        self.spatial = tuple(d if isinstance(d, int) else None for d in shape[2:4]) if len(shape) == 4 else (None, None)
        self.num_classes: int | None = None  # from the metadata, set by load_onnx_classifier
        self.class_names: tuple[str, ...] | None = None

    def __call__(self, images) -> torch.Tensor:
        array = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if array.ndim != 4:
            raise CCNNError(f"{self.path.name} takes (B, 3, H, W) image batches, got shape {array.shape}")
        expected = self.spatial
        if all(expected) and tuple(array.shape[2:]) != expected:
            raise ParameterError("crop", f"{self.path.name} takes {expected[0]}x{expected[1]} images, got "
                                         f"{array.shape[2]}x{array.shape[3]} (does {{param}} match the "
                                         f"exported input size?)")
        return torch.from_numpy(np.asarray(run_session(self.session, array), dtype=np.float32))

    def __repr__(self) -> str:
        return f"OnnxClassifier({str(self.path)!r}, {self.choice.ort_name})"


def load_onnx_classifier(path: str | os.PathLike, provider: str = "auto", threads: int | None = None):
    """``(callable, Preprocessing, name)`` for an ONNX classifier written by :func:`ccnn_convert.export.export`.

    The callable takes a float32 numpy/torch batch and returns float32 logits as a torch tensor
    (an fp16 model gets its input cast). Preprocessing comes from the metadata; a foreign ONNX file
    without it gets ImageNet preprocessing scaled to its input size. The callable's
    ``num_classes`` and ``class_names`` are the metadata's (None where it does not say).
    """
    from ..models import Preprocessing, imagenet_preprocessing

    path = Path(path).expanduser()
    if not path.is_file():
        raise CCNNError(f"ONNX model {path} does not exist")
    metadata = read_metadata(path)
    num_classes, class_names = class_names_of(metadata, str(path))
    classifier = OnnxClassifier(path, provider, threads)
    classifier.num_classes, classifier.class_names = num_classes, class_names
    if isinstance(metadata.get("preprocessing"), dict):
        preprocessing = Preprocessing.from_dict(metadata["preprocessing"])
    else:
        default = imagenet_preprocessing()
        preprocessing = scale_to_crop(default, classifier.spatial[0] or default.crop)
    source, mode = metadata.get("source_model"), metadata.get("mode")
    name = f"{source} ({mode}, onnx)" if source and mode else path.stem
    return classifier, preprocessing, name
