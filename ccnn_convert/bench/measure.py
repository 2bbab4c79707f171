"""What a conversion costs: time per batch, peak memory, FLOPs and parameters, as ratios to the original.

The API behind ``ccnn-bench`` and ``benchmarks/bench_convert.py``.

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
* **top-1** (optional): :func:`ccnn_convert.evaluate.evaluate` on an image folder, all variants
  on the same decoded images.

Ratios divide a variant's figure by the original's (same model, same batch, same run).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .._io import atomic_path
from ..errors import CCNNError
from ..evaluate import parse_modes as parse_eval_modes
from ..evaluate import resolve_device
from ..flops import count_flops

CONVERTED_MODES = ("traditional", "checkered", "dilated")
DEFAULT_MODES = ("original", "checkered", "dilated")
MEMORY_CPU = "cpu_profiler_peak"
MEMORY_CUDA = "cuda_max_allocated"

# Paper (Sadigh & Sen 2018), Table 3: ResNet-152, batch 4, GTX 1080 Ti; seconds per batch, GB.
PAPER_RESNET152 = {
    "original": {"seconds": 0.02, "memory_gb": 0.9},
    "checkered": {"seconds": 0.25, "memory_gb": 1.2},
    "dilated": {"seconds": 3.60, "memory_gb": 10.1},
}


# --------------------------------------------------------------------------- records


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
    time_ratio: float | None = None
    cpu_time_ratio: float | None = None
    flop_ratio: float | None = None
    memory_ratio: float | None = None
    param_ratio: float | None = None

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def median_cpu_s(self) -> float | None:
        return statistics.median(self.cpu_times_s) if self.cpu_times_s else None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["median_s"] = self.median_s
        data["median_cpu_s"] = self.median_cpu_s
        return data


@dataclass
class BenchReport:
    """Every measurement of one run, with the settings needed to reproduce and judge it."""

    measurements: list[Measurement]
    settings: dict = field(default_factory=dict)

    def for_model(self, model: str) -> list[Measurement]:
        return [m for m in self.measurements if m.model == model]

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(m.model for m in self.measurements))

    @property
    def has_sweep(self) -> bool:
        return any(m.keep_first > 0 for m in self.measurements)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "measurements": [m.to_dict() for m in self.measurements]}

    def to_markdown(self) -> str:
        lines = [markdown_table(self.measurements), ""]
        lines += [f"- {key}: {value}" for key, value in describe_settings(self.settings).items()]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- formatting


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{1000 * value:.1f} ms"


def fmt_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    if value >= 2**30:
        return f"{value / 2**30:.2f} GiB"
    return f"{value / 2**20:.1f} MiB"


def fmt_flops(value: int | None) -> str:
    if value is None:
        return "-"
    if value >= 1e12:
        return f"{value / 1e12:.2f} T"
    return f"{value / 1e9:.2f} G"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}x" if value < 100 else f"{value:.0f}x"


def fmt_count(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.2f} M"


TABLE_COLUMNS = ("model", "variant", "submaps", "time/batch", "time x", "CPU time x", "FLOPs/batch", "FLOPs x",
                 "peak memory", "memory x", "params", "top-1")
OPTIONAL_COLUMNS = ("CPU time x", "top-1")  # dropped when no row has a value


def table_row(m: Measurement) -> list[str]:
    """One row of the cost table, one cell per TABLE_COLUMNS entry."""
    time = fmt_seconds(m.median_s) if m.skipped is None else f"not run ({m.skipped})"
    return [m.model, m.label, str(m.submaps), time, fmt_ratio(m.time_ratio), fmt_ratio(m.cpu_time_ratio),
            fmt_flops(m.flops), fmt_ratio(m.flop_ratio), fmt_bytes(m.peak_memory_bytes), fmt_ratio(m.memory_ratio),
            fmt_count(m.params), "-" if m.top1 is None else f"{m.top1:.2f}"]


def table_rows(measurements: Sequence[Measurement]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the cost table (shared by the markdown file and the rich table)."""
    rows = [table_row(m) for m in measurements]
    keep = [i for i, name in enumerate(TABLE_COLUMNS)
            if name not in OPTIONAL_COLUMNS or any(row[i] != "-" for row in rows)]
    return [TABLE_COLUMNS[i] for i in keep], [[row[i] for i in keep] for row in rows]


def markdown_table(measurements: Sequence[Measurement]) -> str:
    headers, rows = table_rows(measurements)
    lines = [headers, ["---"] * 2 + ["---:"] * (len(headers) - 2)] + rows
    return "\n".join("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in lines)


def describe_settings(settings: Mapping[str, Any]) -> dict[str, str]:
    """Human-readable lines for the settings that matter when reading the numbers."""
    out = {}
    if "device" in settings:
        threads = (f", {settings['threads']} thread(s)" if str(settings["device"]).startswith("cpu")
                   and settings.get("threads") else "")
        out["device"] = f"{settings['device']} ({settings.get('device_name', '?')}{threads})"
    if "batch_size" in settings:
        size = settings.get("image_size")
        size = f"{size}x{size} px" if isinstance(size, int) else "each model's crop size"
        out["input"] = f"batch {settings['batch_size']}, {size}, random values"
    if "repeats" in settings:
        out["timing"] = (f"median of {settings['repeats']} passes after {settings.get('warmup', 0)} untimed "
                         "pass(es), variants interleaved; time x = wall clock, CPU time x = process CPU time")
    if settings.get("memory_kind") == MEMORY_CPU:
        out["peak memory"] = ("model tensors + input + peak allocated during the forward "
                              "(torch.profiler memory events, CPU allocator)")
    elif settings.get("memory_kind") == MEMORY_CUDA:
        out["peak memory"] = "model tensors + input + peak CUDA allocation during the forward"
    out["FLOPs"] = "per batch, torch.utils.flop_counter on meta tensors (multiply-add = 2)"
    if settings.get("load_average"):
        before, after = settings["load_average"]
        out["load average (1 min)"] = f"{before:.2f} before, {after:.2f} after"
    if settings.get("data"):
        out["top-1"] = f"{settings['data']} ({settings.get('images', '?')} images)"
    if settings.get("command"):
        out["command"] = f"`{settings['command']}`"
    out["torch"] = settings.get("torch", torch.__version__)
    return out


# --------------------------------------------------------------------------- small measurements


def parse_modes(modes: str | Sequence[str] | None) -> list[str]:
    """'checkered,dilated' -> ['original', 'checkered', 'dilated']: the original always comes first
    (every ratio is taken against it)."""
    if modes is None:
        return list(DEFAULT_MODES)
    items = modes.split(",") if isinstance(modes, str) else list(modes)
    if not any(item.strip() for item in items):
        return ["original"]
    return ["original", *(mode for mode in parse_eval_modes(items) if mode != "original")]


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


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence C++ logging on file descriptor 2 (the profiler's kineto prints start/stop lines)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


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

    with _quiet_stderr(), torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
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
    label: str
    mode: str
    keep_first: int
    model: nn.Module
    steps: int | None = None
    submaps: int = 1
    convert_s: float | None = None


def variant_label(mode: str, keep_first: int) -> str:
    return mode if keep_first == 0 else f"{mode}, keep_first={keep_first}"


def build_variants(original: nn.Module, modes: Sequence[str], example: Tensor, *, keep_first: int = 0,
                   sweep: bool = False, sampler: str = "lattice", seed: int | None = 0) -> list[Variant]:
    """The original plus one converted model per mode (and, with ``sweep``, per keep_first = 1..steps)."""
    from ..core import conversion_report, convert

    variants = [Variant("original", "original", 0, original)]

    def make(mode: str, kf: int) -> Variant:
        began = time.perf_counter()
        model = convert(original, mode=mode, sampler=sampler, keep_first=kf, seed=seed,
                        example_input=example).eval()
        elapsed = time.perf_counter() - began
        report = conversion_report(model)
        return Variant(variant_label(mode, kf), mode, kf, model, report.steps, report.final_submaps, elapsed)

    for mode in modes:
        if mode == "original":
            continue
        first = make(mode, keep_first)
        variants.append(first)
        if sweep and mode != "traditional":
            variants += [make(mode, kf) for kf in range(keep_first + 1, (first.steps or 0) + 1)]
    if len(variants) > 1:
        variants[0].steps = variants[1].steps
    return variants


# --------------------------------------------------------------------------- one model


Top1Fn = Callable[[Mapping[str, nn.Module]], Mapping[str, float | None]]


def bench_model(name: str, original: nn.Module, *, modes: Sequence[str] = DEFAULT_MODES, batch_size: int = 4,
                image_size: int = 224, device: torch.device | str = "cpu", repeats: int = 5, warmup: int = 1,
                keep_first: int = 0, sweep: bool = False, sampler: str = "lattice", seed: int | None = 0,
                memory: bool = True, max_seconds: float | None = None, top1: Top1Fn | None = None,
                log: Callable[[str], None] | None = None) -> list[Measurement]:
    """Measure the original and its conversions (see the module docstring for what is measured).

    ``max_seconds``: variants whose estimated time per batch (the original's first pass x the
    FLOP ratio) exceeds it are not run; their FLOPs and parameters are still reported.
    ``top1``: a function from {label: model} to {label: top-1 %}, e.g. :func:`top1_evaluator`.
    """
    if repeats < 1:
        raise CCNNError("--repeats must be at least 1")
    if warmup < 0:
        raise CCNNError("--warmup must be 0 or more")
    if batch_size < 1:
        raise CCNNError("--batch-size must be positive")
    device = torch.device(device) if not isinstance(device, torch.device) else device
    say = log or (lambda message: None)
    modes = parse_modes(modes)
    original = original.eval().to(device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    variants = build_variants(original, modes, x[:1], keep_first=keep_first, sweep=sweep, sampler=sampler, seed=seed)
    for variant in variants:
        variant.model.to(device)

    measurements = []
    for variant in variants:
        measurements.append(Measurement(
            model=name, label=variant.label, mode=variant.mode, keep_first=variant.keep_first,
            batch_size=batch_size, image_size=image_size, steps=variant.steps, submaps=variant.submaps,
            flops=count_flops(variant.model, x), params=count_parameters(variant.model),
            convert_s=variant.convert_s))
    reference = measurements[0]

    # First pass of the original: a warm-up, and the yardstick for --max-seconds.
    say(f"{name}: warming up the original")
    first, _ = time_once(lambda: original(x), device)
    runnable = []
    for variant, m in zip(variants, measurements):
        estimate = first * (m.flops / reference.flops if reference.flops else 1.0)
        if max_seconds is not None and variant is not variants[0] and estimate > max_seconds:
            m.skipped = f"~{fmt_seconds(estimate)} per batch estimated > --max-seconds {max_seconds:g}"
            say(f"{name} {variant.label}: skipped, {m.skipped}")
        else:
            runnable.append((variant, m))

    for variant, m in runnable:
        if memory:
            say(f"{name} {variant.label}: peak memory pass")
            extra = forward_peak_bytes(variant.model, x, device)
            m.activation_peak_bytes = extra
            m.peak_memory_bytes = tensor_bytes(variant.model) + x.numel() * x.element_size() + extra
        # --warmup counts every untimed pass: the original's yardstick pass and the memory pass.
        done = int(variant is variants[0]) + int(memory)
        for _ in range(max(0, warmup - done)):
            time_once(lambda model=variant.model: model(x), device)

    say(f"{name}: timing {len(runnable)} variant(s) x {repeats} passes, interleaved")
    runs = {variant.label: (lambda model=variant.model: model(x)) for variant, _ in runnable}
    times = time_interleaved(runs, repeats, device,
                             on_pass=lambda label, r, s: say(f"{name} {label}: pass {r + 1}/{repeats} {fmt_seconds(s)}"))
    for variant, m in runnable:
        m.times_s = [wall for wall, _ in times[variant.label]]
        if device.type == "cpu":
            m.cpu_times_s = [cpu for _, cpu in times[variant.label]]

    if top1 is not None:
        say(f"{name}: top-1 of {len(runnable)} variant(s)")
        scores = top1({variant.label: variant.model for variant, _ in runnable})
        for _, m in runnable:
            m.top1 = scores.get(m.label)
    add_ratios(measurements)
    return measurements


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return value / reference


def add_ratios(measurements: Sequence[Measurement]) -> None:
    """Fill the ratios of every measurement against the original of the same model."""
    originals = {m.model: m for m in measurements if m.mode == "original"}
    for m in measurements:
        ref = originals.get(m.model)
        if ref is None:
            continue
        m.time_ratio = _ratio(m.median_s, ref.median_s)
        m.cpu_time_ratio = _ratio(m.median_cpu_s, ref.median_cpu_s)
        m.flop_ratio = _ratio(m.flops, ref.flops)
        m.memory_ratio = _ratio(m.peak_memory_bytes, ref.peak_memory_bytes)
        m.param_ratio = _ratio(m.params, ref.params)


# --------------------------------------------------------------------------- top-1


def top1_evaluator(data: str, preprocessing: Any, *, labels: str | None = None, limit: int | None = None,
                   batch_size: int = 32, workers: int = 0, device: torch.device | str = "cpu",
                   num_classes: int = 1000) -> tuple[Top1Fn, dict]:
    """A function {label: model} -> {label: top-1 %} over an image folder, and a description of the data.

    Uses :func:`ccnn_convert.evaluate.evaluate`: every image is decoded once and fed to every
    variant in turn.
    """
    from ..data import DecodedImages, find_samples, stratified_indices
    from ..evaluate import evaluate

    samples = find_samples(data, labels, imagenet_labels=num_classes == 1000)
    indices = stratified_indices(samples.targets, limit)
    dataset = DecodedImages(samples.items, preprocessing.transform())
    info = {"data": str(data), "images": len(indices)}

    def run(models: Mapping[str, nn.Module]) -> dict[str, float | None]:
        report = evaluate(dict(models), dataset, indices, batch_size=batch_size, workers=workers, device=device)
        info["images"] = report.images
        return {result.mode: result.top1 for result in report.results}

    return run, info


# --------------------------------------------------------------------------- many models


def machine_settings(device: torch.device) -> dict:
    settings = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        settings["device_name"] = torch.cuda.get_device_name(device)
        settings["memory_kind"] = MEMORY_CUDA
    else:
        settings["device_name"] = _cpu_name()
        settings["memory_kind"] = MEMORY_CPU
    return settings


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def run_bench(models: Sequence[str], *, modes: Sequence[str] | str | None = None, batch_size: int = 4,
              image_size: int | None = None, device: str = "auto", repeats: int = 5, warmup: int = 1,
              keep_first: int = 0, sweep: bool = False, sampler: str = "lattice", seed: int | None = 0,
              weights: str = "DEFAULT", memory: bool = True, max_seconds: float | None = None,
              data: str | None = None, labels: str | None = None, limit: int | None = None,
              eval_batch_size: int = 32, workers: int = 0, command: str | None = None,
              log: Callable[[str], None] | None = None) -> BenchReport:
    """Resolve every MODEL (:func:`ccnn_convert.models.resolve_model`) and :func:`bench_model` it."""
    from ..models import resolve_model

    if not models:
        raise CCNNError("give at least one MODEL")
    if image_size is not None and image_size < 1:
        raise CCNNError("--size must be positive")
    if limit is not None and limit < 1:
        raise CCNNError("--limit must be a positive number of images")
    parsed = parse_modes(modes)
    target = resolve_device(device)
    resolved = [resolve_model(name, weights=weights) for name in models]  # fail fast on a bad name
    settings = machine_settings(target)
    settings.update({"modes": parsed, "batch_size": batch_size, "image_size": image_size, "repeats": repeats,
                     "warmup": warmup, "keep_first": keep_first, "sweep": sweep, "sampler": sampler,
                     "seed": seed, "weights": weights, "max_seconds": max_seconds, "command": command})
    before = load_average()
    measurements: list[Measurement] = []
    for name, r in zip(models, resolved):
        top1 = None
        if data is not None:
            top1, info = top1_evaluator(data, r.preprocessing, labels=labels, limit=limit, batch_size=eval_batch_size,
                                        workers=workers, device=target, num_classes=r.num_classes)
            settings.update(info)
        size = image_size or r.preprocessing.crop
        measurements += bench_model(r.name, r.model, modes=parsed, batch_size=batch_size, image_size=size,
                                    device=target, repeats=repeats, warmup=warmup, keep_first=keep_first,
                                    sweep=sweep, sampler=sampler, seed=seed, memory=memory,
                                    max_seconds=max_seconds, top1=top1, log=log)
    settings["load_average"] = [before, load_average()] if before is not None else None
    settings["image_size"] = image_size or "model default"
    return BenchReport(measurements, settings)


# --------------------------------------------------------------------------- files


PLOT_SIZE_PX = (800, 400)  # every plot is exactly this size
_DPI = 100


def _agg():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    return path


def plot_time_ratios(report: BenchReport, path: str | Path) -> Path:
    """Bars: time per batch / original's, per model and mode (log scale); dots: the FLOP ratio."""
    plt = _agg()
    base = [m for m in report.measurements if m.keep_first == 0 and m.mode != "original"]
    labels = list(dict.fromkeys(m.label for m in base))
    models = report.models
    fig, ax = plt.subplots(figsize=(PLOT_SIZE_PX[0] / _DPI, PLOT_SIZE_PX[1] / _DPI), dpi=_DPI)
    width = 0.8 / max(len(labels), 1)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, label in enumerate(labels):
        xs, times, flops, flop_xs = [], [], [], []
        for j, model in enumerate(models):
            m = next((m for m in base if m.model == model and m.label == label), None)
            if m is None:
                continue
            x = j - 0.4 + width * (i + 0.5)
            if m.time_ratio is not None:
                xs.append(x)
                times.append(m.time_ratio)
            if m.flop_ratio is not None:
                flop_xs.append(x)
                flops.append(m.flop_ratio)
        colour = colours[i % len(colours)]
        ax.bar(xs, times, width * 0.9, color=colour, label=f"{label}: time")
        ax.scatter(flop_xs, flops, marker="_", s=400 * width, color="black", zorder=3,
                   label="FLOPs (same ratio)" if i == 0 else None)
        for x, value in zip(xs, times):
            ax.annotate(f"{value:.3g}", (x, value), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels(models, fontsize=8)
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("converted / original")
    device = report.settings.get("device", "?")
    batch = report.settings.get("batch_size", "?")
    ax.set_title(f"time per batch relative to the original (batch {batch}, {device})", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.1, top=0.9)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def plot_sweep(report: BenchReport, path: str | Path) -> Path:
    """The keep_first sweep: top-1 against time ratio (time ratio against keep_first without top-1)."""
    plt = _agg()
    fig, ax = plt.subplots(figsize=(PLOT_SIZE_PX[0] / _DPI, PLOT_SIZE_PX[1] / _DPI), dpi=_DPI)
    with_top1 = any(m.top1 is not None for m in report.measurements)
    for model in report.models:
        rows = report.for_model(model)
        original = next((m for m in rows if m.mode == "original"), None)
        for mode in dict.fromkeys(m.mode for m in rows if m.mode not in ("original", "traditional")):
            series = sorted((m for m in rows if m.mode == mode and m.time_ratio is not None), key=lambda m: m.keep_first)
            if with_top1:
                series = [m for m in series if m.top1 is not None]
                xs, ys = [m.time_ratio for m in series], [m.top1 for m in series]
            else:
                xs, ys = [m.keep_first for m in series], [m.time_ratio for m in series]
            if not series:
                continue
            ax.plot(xs, ys, marker="o", label=f"{model} {mode}")
            if with_top1:
                for m in series:
                    ax.annotate(f"k={m.keep_first}", (m.time_ratio, m.top1), textcoords="offset points",
                                xytext=(3, 3), fontsize=7)
        if with_top1 and original is not None and original.top1 is not None:
            ax.scatter([1.0], [original.top1], marker="*", s=80, color="black", zorder=3)
            ax.annotate(f"{model} original", (1.0, original.top1), textcoords="offset points", xytext=(4, -10), fontsize=7)
    if with_top1:
        ax.set_xscale("log")
        ax.set_xlabel("time per batch / original (log)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title("keep_first sweep: accuracy against cost (k = steps kept traditional)", fontsize=10)
    else:
        ax.set_yscale("log")
        ax.set_xlabel("keep_first (leading subsampling steps left traditional)")
        ax.set_ylabel("time per batch / original (log)")
        ax.set_title("keep_first sweep: cost", fontsize=10)
    ax.grid(True, which="both", linewidth=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.12, top=0.9)
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def write_outputs(report: BenchReport, out_dir: str | Path) -> list[Path]:
    """bench.json, bench.md, time_ratio.png (and sweep.png for a sweep) in ``out_dir``, atomically."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CCNNError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    with atomic_path(out / "bench.json") as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2, default=_jsonable) + "\n", encoding="utf-8")
    written.append(out / "bench.json")
    with atomic_path(out / "bench.md") as tmp:
        tmp.write_text(report.to_markdown(), encoding="utf-8")
    written.append(out / "bench.md")
    written.append(plot_time_ratios(report, out / "time_ratio.png"))
    if report.has_sweep:
        written.append(plot_sweep(report, out / "sweep.png"))
    return written


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
