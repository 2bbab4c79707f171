"""What a conversion costs: time per batch, peak memory, FLOPs and parameters, as ratios to the original.

The measuring half of ``ccnn-bench`` and ``benchmarks/bench_convert.py``.

What is measured, exactly
-------------------------
* **time per batch**: the median of ``repeats`` forward passes (``torch.no_grad``, eval mode) on
  one random batch, after ``warmup`` untimed passes (the peak-memory pass and the original's first
  pass count as such). The variants of one model (original, checkered, dilated, keep-first
  sweep) are *interleaved*: round ``r`` runs every variant once, starting at variant ``r mod V``,
  so slow drift of the machine (thermal, other processes) hits all variants alike and cancels in
  the ratios. On CUDA every pass is bracketed by ``torch.cuda.synchronize`` and timed with CUDA
  events; on CPU with ``time.perf_counter`` (wall clock) and also ``time.process_time`` (CPU
  time of all this process's threads: on a busy shared machine it is far steadier than the wall
  clock, and with one thread it is the compute time).
* **peak memory**: bytes held by PyTorch during one forward pass: the model's own tensors
  (parameters + buffers, each tensor counted once) + the input + the peak of what the forward
  allocates on top (activations, workspaces that go through PyTorch's allocator). On CUDA the
  peak is ``torch.cuda.max_memory_allocated`` minus what was allocated before the pass; on CPU
  it is the running maximum of the allocation/free events that ``torch.profiler`` records with
  ``profile_memory=True`` (scratch memory that a library such as oneDNN allocates by itself is
  not seen). It is *not* the process RSS (which includes the Python interpreter, libraries and
  allocator caches).
* **FLOPs**: ``torch.utils.flop_counter`` on the batch (a multiply-add counts 2), counted on
  meta tensors (nothing is computed), so even a dilated network that would take hours is counted.
* **parameters**: distinct parameter tensors; a converted model shares the original's.
* **top-1** (optional): a function from {label: model} to {label: top-1 %}, see :mod:`.run`.
* **ONNX Runtime time per batch** (optional, ``TimingOptions.onnx``): each variant exported as
  ``ccnn-export`` exports it and timed on ONNX Runtime's CPU provider, see :mod:`.ort`.

Ratios divide a variant's figure by the original's (same model, same batch, same run).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._helpers import captured_fds
from ..core import conversion_report
from ..errors import ParameterError
from ..flops import count_flops
from ..runtime import synchronize
from ..spec import ORIGINAL, ConversionSpec, check_modes
from .report import fmt_seconds

__all__ = ["DEFAULT_MODES", "Measurement", "Top1Fn", "TimingOptions", "Variant", "add_ratios", "bench_model",
           "build_variants", "count_parameters", "forward_peak_bytes", "measured_modes", "tensor_bytes",
           "time_interleaved", "time_once", "variant_label"]

logger = logging.getLogger(__name__)

DEFAULT_MODES = ("original", "checkered", "dilated")

Top1Fn = Callable[[Mapping[str, nn.Module]], Mapping[str, "float | None"]]
ConvertFn = Callable[[ConversionSpec, "tuple[int, int]"], nn.Module]  # (spec, input size) -> converted model


@dataclass
class Measurement:
    """Cost of one variant (mode, keep_first) of one model."""

    model: str
    label: str
    mode: str
    keep_first: int = 0
    batch_size: int = 1
    image_size: int = 224
    steps: int | None = None  # subsampling steps the conversion found
    submaps: int = 1  # submaps at the deepest point
    flops: int | None = None  # per batch
    params: int | None = None
    times_s: list[float] = field(default_factory=list)  # wall clock, per timed pass
    cpu_times_s: list[float] = field(default_factory=list)  # CPU time of this process (CPU device only)
    peak_memory_bytes: int | None = None
    activation_peak_bytes: int | None = None  # allocated during the forward, on top of model + input
    convert_s: float | None = None
    top1: float | None = None
    skipped: str | None = None  # why it was not timed
    onnx_times_s: list[float] = field(default_factory=list)  # ONNX Runtime (CPU), wall clock per pass
    onnx_skipped: str | None = None  # why it has no ONNX Runtime time
    time_ratio: float | None = None
    cpu_time_ratio: float | None = None
    flop_ratio: float | None = None
    memory_ratio: float | None = None
    param_ratio: float | None = None
    onnx_time_ratio: float | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def median_cpu_s(self) -> float | None:
        return statistics.median(self.cpu_times_s) if self.cpu_times_s else None

    @property
    def median_onnx_s(self) -> float | None:
        return statistics.median(self.onnx_times_s) if self.onnx_times_s else None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["median_s"] = self.median_s
        data["median_cpu_s"] = self.median_cpu_s
        data["median_onnx_s"] = self.median_onnx_s
        return data


@dataclass(frozen=True)
class TimingOptions:
    """How each variant is timed: batch, timed and untimed passes, the memory pass, a time cap.

    ``max_seconds``: variants whose estimated time per batch (the original's first pass x the
    FLOP ratio) exceeds it are not run; their FLOPs and parameters are still reported.
    ``onnx``: also export every variant and time it in ONNX Runtime (an export per variant: slow
    for large models, hence off by default).
    """

    batch_size: int = 4
    repeats: int = 5
    warmup: int = 1
    memory: bool = True
    max_seconds: float | None = None
    onnx: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ParameterError("batch_size", "{param} must be positive")
        if self.repeats < 1:
            raise ParameterError("repeats", "{param} must be at least 1")
        if self.warmup < 0:
            raise ParameterError("warmup", "{param} must be 0 or more")
        if self.max_seconds is not None and self.max_seconds < 0:
            raise ParameterError("max_seconds", "{param} must be 0 or more")


def measured_modes(modes: Sequence[str] | None) -> list[str]:
    """['checkered', 'dilated'] -> ['original', 'checkered', 'dilated']: the original always comes
    first (every ratio is taken against it). None gives the default modes; [] is refused, as in
    ccnn-eval (an empty list asks for nothing: ["original"] measures the original alone)."""
    if modes is None:
        return list(DEFAULT_MODES)
    return [ORIGINAL, *(mode for mode in check_modes(modes) if mode != ORIGINAL)]


# --------------------------------------------------------------------------- small measurements


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements, each distinct tensor counted once."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = p.numel()
    return sum(seen.values())


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each distinct storage counted once."""
    seen: dict[tuple, int] = {}
    tensors = itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
    for _, t in tensors:
        key = (t.device.type, t.untyped_storage().data_ptr()) if t.device.type != "meta" else (id(t),)
        seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


def forward_peak_bytes(model: Callable[[Tensor], Any], x: Tensor, device: torch.device) -> int:
    """Peak bytes allocated by one no-grad forward pass on top of what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            model(x)
        synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    # captured_fds: the profiler's kineto prints start/stop lines on the C++ stderr.
    with captured_fds(), torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and str(e.device_type()).endswith("CPU")]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        running += event.nbytes()
        peak = max(peak, running)
    return int(peak)


def time_interleaved(runs: Mapping[str, Callable[[], Any]], repeats: int, device: torch.device,
                     on_pass: Callable[[str, int, float], None] | None = None
                     ) -> dict[str, list[tuple[float, float]]]:
    """Time each callable ``repeats`` times, interleaved: round ``r`` starts at the ``r``-th one.

    Returns, per label, one ``(wall seconds, CPU seconds)`` pair per pass (see :func:`time_once`).
    """
    labels = list(runs)
    times: dict[str, list[tuple[float, float]]] = {label: [] for label in labels}
    for round_ in range(repeats):
        start = round_ % len(labels) if labels else 0
        for label in labels[start:] + labels[:start]:
            wall, cpu = time_once(runs[label], device)
            times[label].append((wall, cpu))
            if on_pass:
                on_pass(label, round_, wall)
    return times


def time_once(run: Callable[[], Any], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call.

    CUDA: synchronized and measured with CUDA events (the CPU seconds are then meaningless).
    CPU: ``time.perf_counter`` and ``time.process_time``; the CPU time is the work done by all of
    this process's threads, much less disturbed than the wall clock by other processes on a
    busy machine.
    """
    with torch.no_grad():
        if device.type == "cuda":
            synchronize(device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            run()
            end.record()
            synchronize(device)
            seconds = begin.elapsed_time(end) / 1000.0
            return seconds, seconds
        began, began_cpu = time.perf_counter(), time.process_time()
        run()
        return time.perf_counter() - began, time.process_time() - began_cpu


# --------------------------------------------------------------------------- variants


@dataclass
class Variant:
    """One model to measure: the original or one conversion of it."""

    label: str
    mode: str
    keep_first: int
    model: nn.Module
    steps: int | None = None
    submaps: int = 1
    convert_s: float | None = None


def variant_label(mode: str, keep_first: int, phc: int | None = None) -> str:
    """The row's name: the mode, then what sets it apart (keep_first, PHC layers)."""
    return ", ".join([mode] + ([f"keep_first={keep_first}"] if keep_first else []) + ([f"phc={phc}"] if phc else []))


def _as_spec(item: str | ConversionSpec) -> ConversionSpec:
    return item if isinstance(item, ConversionSpec) else ConversionSpec(mode=check_modes([item])[0])


def build_variants(original: nn.Module, conversions: Sequence[str | ConversionSpec], example: Tensor, *,
                   sweep: bool = False, convert: ConvertFn | None = None) -> list[Variant]:
    """The original plus one converted model per spec (and, with ``sweep``, per keep_first up to
    the number of steps). A plain mode name stands for that mode's default spec; "original" is
    always the first variant, whether listed or not. ``convert(spec, size)`` makes each converted
    model (default: ``spec.apply(original, size)``; an artifact's adds its learned strides)."""
    variants = [Variant(ORIGINAL, ORIGINAL, 0, original)]
    size = tuple(example.shape[-2:])
    convert = convert or (lambda spec, input_size: spec.apply(original, input_size))

    def make(spec: ConversionSpec) -> Variant:
        began = time.perf_counter()
        model = convert(spec, size)
        elapsed = time.perf_counter() - began
        report = conversion_report(model)
        return Variant(variant_label(spec.mode, spec.keep_first, spec.phc), spec.mode, spec.keep_first, model,
                       report.steps, report.final_submaps, elapsed)

    for item in conversions:
        if item == ORIGINAL:
            continue
        spec = _as_spec(item)
        first = make(spec)
        variants.append(first)
        if sweep and spec.mode != "traditional":
            variants += [make(dataclasses.replace(spec, keep_first=kf))
                         for kf in range(spec.keep_first + 1, (first.steps or 0) + 1)]
    if len(variants) > 1:
        variants[0].steps = variants[1].steps
    return variants


# --------------------------------------------------------------------------- one model


def bench_model(name: str, original: nn.Module, conversions: Sequence[str | ConversionSpec] = DEFAULT_MODES, *,
                image_size: int = 224, device: torch.device | str = "cpu", timing: TimingOptions = TimingOptions(),
                sweep: bool = False, top1: Top1Fn | None = None,
                convert: ConvertFn | None = None) -> list[Measurement]:
    """Measure the original and its conversions (see the module docstring for what is measured).

    ``conversions``: mode names or :class:`~ccnn_convert.spec.ConversionSpec`; the original is
    always measured first. ``top1``: a function from {label: model} to {label: top-1 %}, e.g.
    :func:`ccnn_convert.bench.run.top1_evaluator`.
    """
    if image_size < 1:
        raise ParameterError("image_size", "{param} must be positive")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    original = original.eval().to(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(timing.batch_size, 3, image_size, image_size, generator=generator)
    variants = build_variants(original, conversions, x[:1], sweep=sweep, convert=convert)
    x = x.to(device)
    for variant in variants:
        variant.model.to(device)
    measurements = [_static_costs(name, variant, x) for variant in variants]
    runnable = _runnable(name, variants, measurements, x, device, timing.max_seconds)
    _warm_up(runnable, x, device, timing, measure_memory=timing.memory, original=variants[0])
    _time(name, runnable, x, device, timing.repeats)
    if timing.onnx:
        from .ort import onnx_latency

        onnx_latency(variants, measurements, x, timing.repeats, timing.warmup)
    if top1 is not None:
        logger.info("%s: top-1 of %d variant(s)", name, len(runnable))
        scores = top1({variant.label: variant.model for variant, _ in runnable})
        for _, m in runnable:
            m.top1 = scores.get(m.label)
    add_ratios(measurements)
    return measurements


def _static_costs(name: str, variant: Variant, x: Tensor) -> Measurement:
    """What needs no timing: FLOPs (on meta tensors), parameters, steps and submaps."""
    return Measurement(
        model=name, label=variant.label, mode=variant.mode, keep_first=variant.keep_first,
        batch_size=x.shape[0], image_size=x.shape[-1], steps=variant.steps, submaps=variant.submaps,
        flops=count_flops(variant.model, x), params=count_parameters(variant.model), convert_s=variant.convert_s)


def _runnable(name: str, variants: list[Variant], measurements: list[Measurement], x: Tensor,
              device: torch.device, max_seconds: float | None) -> list[tuple[Variant, Measurement]]:
    """The variants to time: the original's first pass (a warm-up too) estimates the others'."""
    logger.info("%s: warming up the original", name)
    first, _ = time_once(lambda: variants[0].model(x), device)
    reference = measurements[0]
    runnable = []
    for variant, m in zip(variants, measurements):
        estimate = first * (m.flops / reference.flops if reference.flops else 1.0)
        if max_seconds is not None and variant is not variants[0] and estimate > max_seconds:
            m.skipped = f"~{fmt_seconds(estimate)} per batch estimated > max_seconds {max_seconds:g}"
            logger.info("%s %s: skipped, %s", name, variant.label, m.skipped)
        else:
            runnable.append((variant, m))
    return runnable


def _warm_up(runnable: list[tuple[Variant, Measurement]], x: Tensor, device: torch.device,
             timing: TimingOptions, *, measure_memory: bool, original: Variant) -> None:
    """The peak-memory pass, then untimed passes up to ``warmup`` (both count as warm-up)."""
    for variant, m in runnable:
        if measure_memory:
            logger.info("%s %s: peak memory pass", m.model, variant.label)
            extra = forward_peak_bytes(variant.model, x, device)
            m.activation_peak_bytes = extra
            m.peak_memory_bytes = tensor_bytes(variant.model) + x.numel() * x.element_size() + extra
        done = int(variant is original) + int(measure_memory)  # the original's yardstick pass counts
        for _ in range(max(0, timing.warmup - done)):
            time_once(lambda model=variant.model: model(x), device)


def _time(name: str, runnable: list[tuple[Variant, Measurement]], x: Tensor, device: torch.device,
          repeats: int) -> None:
    logger.info("%s: timing %d variant(s) x %d passes, interleaved", name, len(runnable), repeats)
    runs = {variant.label: (lambda model=variant.model: model(x)) for variant, _ in runnable}

    def on_pass(label: str, round_: int, seconds: float) -> None:
        logger.info("%s %s: pass %d/%d %s", name, label, round_ + 1, repeats, fmt_seconds(seconds))

    times = time_interleaved(runs, repeats, device, on_pass=on_pass)
    for variant, m in runnable:
        m.times_s = [wall for wall, _ in times[variant.label]]
        if device.type == "cpu":
            m.cpu_times_s = [cpu for _, cpu in times[variant.label]]


# --------------------------------------------------------------------------- ratios


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def add_ratios(measurements: Sequence[Measurement]) -> None:
    """Fill the ratios of every measurement against the original of the same model."""
    originals = {m.model: m for m in measurements if m.mode == ORIGINAL}
    for m in measurements:
        ref = originals.get(m.model)
        if ref is None:
            continue
        m.time_ratio = _ratio(m.median_s, ref.median_s)
        m.cpu_time_ratio = _ratio(m.median_cpu_s, ref.median_cpu_s)
        m.flop_ratio = _ratio(m.flops, ref.flops)
        m.memory_ratio = _ratio(m.peak_memory_bytes, ref.peak_memory_bytes)
        m.param_ratio = _ratio(m.params, ref.params)
        m.onnx_time_ratio = _ratio(m.median_onnx_s, ref.median_onnx_s)
