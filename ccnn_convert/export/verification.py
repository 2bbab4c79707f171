"""Does the ONNX file compute what the PyTorch model computes, and how fast?

:func:`verify` runs the exported file in ONNX Runtime and the float32 PyTorch model on the same
inputs: random batches at sizes the export never saw (so it also proves the dynamic batch), and
optionally real images. It reports max abs / max relative difference and top-1 agreement per
input set (:class:`Check`); :func:`ccnn_convert.export.export` writes nothing when a check fails.

:func:`benchmark` times PyTorch eager and ONNX Runtime on one batch, runs interleaved so that
both see the same machine state, and reports medians.

The settings :func:`ccnn_convert.export.export` takes for both stages are the frozen records
:class:`VerifyOptions` and :class:`BenchmarkOptions`, validated when made.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .._helpers import first_line, logits_of
from ..errors import ExportError, ParameterError
from ..runtime import synchronize
from .sessions import ProviderChoice, create_session, run_session, select_provider

__all__ = ["FP16_MIN_AGREEMENT", "FP16_TOLERANCE", "FP32_TOLERANCE", "VERIFY_BATCHES", "BenchmarkOptions",
           "BenchmarkResult", "Check", "Verification", "VerificationFailed", "VerifyOptions", "benchmark",
           "compare", "exact_cuda_math", "verify"]

VERIFY_BATCHES = (1, 3)  # both differ from the export's example batch (2)
FP32_TOLERANCE = 1e-4  # max|ort - torch| / max|torch|
FP16_TOLERANCE = 1e-2
FP16_MIN_AGREEMENT = 0.9  # top-1 agreement required on real images for an fp16 export


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(name, f"{{param}} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class VerifyOptions:
    """How :func:`ccnn_convert.export.export` verifies: ``data`` (an image folder) adds a check
    on up to ``data_limit`` real images; ``tolerance`` defaults to 1e-4 (fp16: 1e-2)."""

    data: str | os.PathLike | None = None
    data_limit: int = 32
    tolerance: float | None = None

    def __post_init__(self) -> None:
        _positive("data_limit", self.data_limit)
        if self.tolerance is not None and not (isinstance(self.tolerance, (int, float)) and self.tolerance > 0):
            raise ParameterError("tolerance", f"{{param}} must be positive, got {self.tolerance!r}")


@dataclass(frozen=True)
class BenchmarkOptions:
    """How :func:`ccnn_convert.export.export` benchmarks: ``repeats`` timed runs at ``batch``
    after ``warmup`` untimed ones."""

    batch: int = 4
    repeats: int = 10
    warmup: int = 2

    def __post_init__(self) -> None:
        _positive("batch", self.batch)
        _positive("repeats", self.repeats)
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ParameterError("warmup", f"{{param}} must be a non-negative integer, got {self.warmup!r}")


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
    def within_tolerance(self) -> bool:
        return math.isfinite(self.max_rel) and self.max_rel <= self.tolerance

    @property
    def passed(self) -> bool:
        agrees = self.min_agreement is None or self.top1_agreement >= self.min_agreement
        return self.within_tolerance and agrees


@dataclass
class Verification:
    """Every :class:`Check` of one verification run."""

    provider: str
    dtype: str
    tolerance: float
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def failure(self) -> str:
        """One line on the first failed check ('' when all passed)."""
        c = next((c for c in self.checks if not c.passed), None)
        if c is None:
            return ""
        if not c.within_tolerance:
            return (f"verification failed: ONNX Runtime ({self.provider}) differs from PyTorch on {c.inputs} "
                    f"inputs at batch {c.batch}: max relative difference {c.max_rel:.3g} > tolerance "
                    f"{c.tolerance:g} (max abs {c.max_abs:.3g}, top-1 agreement {c.top1_agreement:.0%})")
        return (f"verification failed: top-1 agreement {c.top1_agreement:.0%} on {c.inputs} at batch {c.batch} "
                f"is below {c.min_agreement:.0%}")


class VerificationFailed(ExportError):
    """Raised by :func:`ccnn_convert.export.export` when ONNX Runtime and PyTorch disagree; carries the numbers."""

    def __init__(self, verification: Verification):
        super().__init__(verification.failure() + " (the file was not written)")
        self.verification = verification


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


@contextlib.contextmanager
def exact_cuda_math() -> Iterator[None]:
    """No TF32 while computing fp32 references on CUDA."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _torch_logits(model: nn.Module, images: torch.Tensor, device: torch.device, chunk: int = 8) -> torch.Tensor:
    outputs = []
    with torch.no_grad(), exact_cuda_math():
        for start in range(0, images.shape[0], chunk):
            outputs.append(logits_of(model(images[start:start + chunk].to(device))).float().cpu())
    return torch.cat(outputs)


def _device_for(provider: ProviderChoice) -> torch.device:
    """PyTorch runs where ONNX Runtime runs: CUDA for a GPU provider (if torch sees one)."""
    return torch.device("cuda") if provider.on_gpu and torch.cuda.is_available() else torch.device("cpu")


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
    device = _device_for(provider)
    moved = reference.eval().to(device)  # in place: moved back to the CPU below
    result = Verification(provider.ort_name, "float16" if fp16 else "float32", tolerance)
    generator = torch.Generator().manual_seed(seed)
    try:
        for batch in batches:
            x = torch.randn(batch, 3, input_size, input_size, generator=generator)
            result.checks.append(compare(run_session(session, x), _torch_logits(moved, x, device), "random", tolerance))
        if images is not None and len(images):
            ort_out = np.concatenate([run_session(session, images[i:i + 8]) for i in range(0, len(images), 8)])
            result.checks.append(compare(ort_out, _torch_logits(moved, images, device), "images", tolerance,
                                         FP16_MIN_AGREEMENT if fp16 else None))
    except ExportError:
        raise
    except Exception as exc:  # ORT and torch failures alike: the export cannot be checked
        raise ExportError(f"verification could not run: {first_line(exc)}") from exc
    finally:
        if device.type != "cpu":
            reference.to("cpu")  # the caller's model stays where models live between stages
    return result


def benchmark(path: str | os.PathLike, model: nn.Module, input_size: int, *, batch: int = 4,
              repeats: int = 10, warmup: int = 2, provider: ProviderChoice | None = None,
              threads: int | None = None, fp16: bool = False, session=None) -> BenchmarkResult:
    """Median latency of PyTorch eager and ONNX Runtime on the same batch, repeats interleaved.

    PyTorch runs on CUDA when the provider is a GPU one (and torch sees a GPU), else on CPU with
    ``threads`` threads, the same number ONNX Runtime gets. With ``fp16`` PyTorch runs the
    half-precision model too (on CPU, half is emulated and slow: the ratio then says little).
    """
    BenchmarkOptions(batch, repeats, warmup)  # validates
    provider = provider or select_provider("cpu")
    threads = threads or torch.get_num_threads()
    session = session or create_session(path, provider, threads)
    device = _device_for(provider)
    dtype = torch.float16 if fp16 else torch.float32
    torch_model = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, 3, input_size, input_size, generator=torch.Generator().manual_seed(1))
    x_dev = x.to(device=device, dtype=dtype)
    x_np = x.numpy().astype(np.float16 if fp16 else np.float32)
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    torch_ms, ort_ms = [], []
    try:
        with torch.no_grad(), exact_cuda_math():
            for i in range(warmup + repeats):
                t_torch = _timed(lambda: torch_model(x_dev), device)
                t_ort = _timed(lambda: run_session(session, x_np), torch.device("cpu"))
                if i >= warmup:
                    torch_ms.append(t_torch)
                    ort_ms.append(t_ort)
    finally:
        torch.set_num_threads(saved_threads)
    return BenchmarkResult(batch, repeats, threads, str(device), provider.ort_name,
                           statistics.median(torch_ms), statistics.median(ort_ms), torch_ms, ort_ms)


def _timed(run, device: torch.device) -> float:
    """Milliseconds for one call, the device's queued work included."""
    start = time.perf_counter()
    run()
    synchronize(device)
    return 1000 * (time.perf_counter() - start)
