"""Evaluate a classifier and its checkered / dilated conversions on labelled images.

The Python API behind ``ccnn-eval``. Layers, from small to large:

* metrics: :func:`topk_correct`, :func:`top1_agreement`, shift-consistency crops;
* :func:`evaluate`: the loop. Every image is decoded once; each batch is fed to every mode's
  model in turn (so modes are interleaved per batch), counts are summed and, under torchrun,
  all-reduced over ranks without the padding duplicates DistributedSampler would add;
* :func:`evaluate_model`: MODEL string -> original + converted models, data, then :func:`evaluate`.

All user-facing failures raise :class:`~ccnn_convert.errors.CCNNError` (data problems:
:class:`~ccnn_convert.errors.DataError`) with a one-line message.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ._io import atomic_path
from .data import (Batch, DecodedImages, Samples, Skipped, collate_items, find_samples,
                           shard_indices, stratified_indices)
from .errors import CCNNError, DataError
from .flops import count_flops

MODES = ("original", "traditional", "checkered", "dilated")
SAMPLERS = ("naive", "lattice", "random")
REFERENCE_MODE = "original"
DEFAULT_MODES = ("original", "checkered")
PREPROCESSING_KEYS = ("resize", "crop", "mean", "std", "interpolation")
CPU_FORWARD_BATCH = 4  # images per forward pass on CPU (see default_forward_batch)

Classifier = Callable[[Tensor], Tensor]


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many rows have their target among the k highest logits, for each k.

    k larger than the number of classes counts every row as correct (all classes are "top-k").
    """
    if logits.shape[0] == 0:
        return {k: 0 for k in ks}
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hits = top.eq(targets.view(-1, 1).to(top.device))
    return {k: int(hits[:, : min(k, max_k)].any(dim=1).sum()) for k in ks}


def top1_agreement(logits_a: Tensor, logits_b: Tensor) -> int:
    """How many rows have the same arg-max class in both."""
    return int(logits_a.argmax(dim=1).eq(logits_b.argmax(dim=1)).sum())


def shift_offsets(indices: Sequence[int], seed: int, room: int) -> Tensor:
    """Two random (top, left) crop offsets in [0, room] per image: shape (N, 2, 2).

    Seeded by (seed, dataset index), so an image gets the same two crops for every mode, for any
    batch size and under any sharding.
    """
    rows = [np.random.default_rng([seed, int(i)]).integers(0, room + 1, size=(2, 2)) for i in indices]
    return torch.as_tensor(np.array(rows, dtype=np.int64).reshape(-1, 2, 2))


def crops_at(images: Tensor, offsets: Tensor, size: int) -> Tensor:
    """Crop each image (C, H, W) at its own (top, left) offset to size x size."""
    return torch.stack([img[:, t:t + size, l:l + size] for img, (t, l) in zip(images, offsets.tolist())])


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def _percent(part: int | None, whole: int) -> float | None:
    return None if part is None or whole == 0 else 100.0 * part / whole


@dataclass
class ModeResult:
    """Counts and timings for one mode (summed over ranks)."""

    mode: str
    images: int = 0
    top1_correct: int = 0
    top5_correct: int = 0
    agree_with_original: int | None = None  # None when "original" is not among the modes
    consistent: int = 0
    consistency_images: int = 0
    batches: int = 0
    seconds: float = 0.0  # forward time for this mode only (consistency passes excluded)
    peak_memory_bytes: int | None = None
    flops: int | None = None  # per image, batch 1
    conversion: dict | None = None

    @property
    def top1(self) -> float | None:
        return _percent(self.top1_correct, self.images)

    @property
    def top5(self) -> float | None:
        return _percent(self.top5_correct, self.images)

    @property
    def agreement(self) -> float | None:
        return _percent(self.agree_with_original, self.images)

    @property
    def consistency(self) -> float | None:
        return _percent(self.consistent, self.consistency_images) if self.consistency_images else None

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    @property
    def seconds_per_batch(self) -> float | None:
        return self.seconds / self.batches if self.batches else None

    def to_dict(self, reference_top1: float | None = None) -> dict:
        change = None if reference_top1 is None or self.top1 is None else self.top1 - reference_top1
        return {
            "mode": self.mode, "top1": self.top1, "top5": self.top5, "top1_change": change,
            "images": self.images, "top1_correct": self.top1_correct, "top5_correct": self.top5_correct,
            "agreement": self.agreement, "consistency": self.consistency,
            "images_per_s": self.images_per_s, "seconds_per_batch": self.seconds_per_batch,
            "seconds": self.seconds, "peak_memory_bytes": self.peak_memory_bytes,
            "flops": self.flops, "conversion": self.conversion,
        }


@dataclass
class EvalReport:
    results: list[ModeResult]
    images: int
    skipped: list[Skipped]
    loader_wait_s: float
    wall_s: float
    memory_kind: str  # "cuda_max_allocated" | "process_rss_high_water"
    rank: int = 0
    world_size: int = 1
    model: str = ""
    data: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def result(self, mode: str) -> ModeResult | None:
        return next((r for r in self.results if r.mode == mode), None)

    def top1_change(self, result: ModeResult) -> float | None:
        ref = self.result(REFERENCE_MODE)
        if ref is None or ref.top1 is None or result.top1 is None:
            return None
        return result.top1 - ref.top1

    def to_dict(self) -> dict:
        ref = self.result(REFERENCE_MODE)
        return {
            "model": self.model,
            "results": [r.to_dict(ref.top1 if ref else None) for r in self.results],
            "data": {**self.data, "images": self.images, "skipped": len(self.skipped),
                     "skipped_files": [{"path": s.path, "reason": s.reason} for s in self.skipped]},
            "timing": {"loader_wait_s": self.loader_wait_s, "wall_s": self.wall_s},
            "memory_kind": self.memory_kind,
            "world_size": self.world_size,
            "settings": self.settings,
        }


def write_json(report: EvalReport, path: str | os.PathLike) -> None:
    """Write the report atomically (a failure never leaves a half-written file)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Devices and torchrun
# --------------------------------------------------------------------------------------------


def resolve_device(choice: str = "auto", local_rank: int = 0) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' | 'auto' -> torch.device; CUDA asked for but absent is an error."""
    choice = (choice or "auto").strip().lower()
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise CCNNError("--device cuda was requested but CUDA is not available on this machine")
        return torch.device(choice if ":" in choice else f"cuda:{local_rank}")
    raise CCNNError(f"unknown --device {choice!r} (choose cpu, cuda or auto)")


@dataclass
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise CCNNError(f"environment variable {name} is not an integer: {os.environ[name]!r}") from None


@contextlib.contextmanager
def distributed_from_env(device_choice: str = "auto") -> Iterator[DistributedContext]:
    """Join the torchrun job described by WORLD_SIZE/RANK/LOCAL_RANK (gloo on CPU, nccl on CUDA).

    A process group that already exists is reused and left alone; one made here is destroyed
    on exit.
    """
    if dist.is_available() and dist.is_initialized():
        yield DistributedContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
        return
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        yield DistributedContext()
        return
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# The evaluation loop
# --------------------------------------------------------------------------------------------


class _CallableClassifier:
    """Wrap a plain batch->logits callable (e.g. an ONNX session): CPU in, tensor out."""

    def __init__(self, fn: Callable, device: torch.device):
        self.fn, self.device = fn, device

    def __call__(self, images: Tensor) -> Tensor:
        return torch.as_tensor(self.fn(images.cpu())).to(self.device)


def _prepare(model: Classifier, device: torch.device) -> Classifier:
    if isinstance(model, nn.Module):
        return model.to(device).eval()
    return _CallableClassifier(model, device)


def default_forward_batch(device: torch.device) -> int | None:
    """Images per forward pass: small on CPU, the whole batch on a GPU.

    A converted model's activations are many times the original's (32 submaps per image after
    five checkered steps); on CPU a pass over 25 images makes tensors of hundreds of MB, each
    page-faulted in afresh and evicted from the caches, and costs 2.5x more per image than passes
    over 4 (checkered efficientnet_lite0, one thread). Eval-mode results do not depend on it.
    """
    return CPU_FORWARD_BATCH if device.type == "cpu" else None


def _logits(model: Classifier, images: Tensor, amp: bool, forward_batch: int | None = None) -> Tensor:
    chunks = images.split(forward_batch) if forward_batch else (images,)
    outputs = []
    for chunk in chunks:
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            out = model(chunk)
        if isinstance(out, (tuple, list)):  # e.g. (logits, aux): the first output is the class scores
            out = out[0]
        outputs.append(out.float())
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _ordered_modes(models: Mapping[str, Classifier]) -> list[str]:
    """The reference mode first, so every other mode can be compared with its predictions."""
    names = list(models)
    return sorted(names, key=lambda n: n != REFERENCE_MODE)


def evaluate(
    models: Mapping[str, Classifier],
    dataset: DecodedImages,
    indices: Sequence[int] | None = None,
    *,
    batch_size: int = 32,
    workers: int = 0,
    device: str | torch.device = "cpu",
    amp: bool = False,
    forward_batch: int | None = None,
    consistency_crop: int | None = None,
    seed: int = 0,
    flops: Mapping[str, int | None] | None = None,
    conversions: Mapping[str, dict | None] | None = None,
    dist_context: DistributedContext | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_skip: Callable[[Skipped], None] | None = None,
) -> EvalReport:
    """Run every model on every image of ``dataset[indices]`` and count top-1/top-5.

    ``models`` maps a mode name to a module or a batch->logits callable; "original" (if present)
    is the reference for agreement. With ``consistency_crop`` the dataset must also yield the
    uncropped image; two seeded random crops of that size are classified per image and mode.
    Each batch goes through the models ``forward_batch`` images at a time (default: see
    :func:`default_forward_batch`). Under torchrun (``dist_context`` active, or WORLD_SIZE>1 in
    the environment) each rank evaluates its unpadded shard and the counts are all-reduced, so
    every rank returns the totals.
    """
    if dist_context is None:
        with distributed_from_env(str(device)) as ctx:
            return evaluate(models, dataset, indices, batch_size=batch_size, workers=workers,
                            device=device, amp=amp, forward_batch=forward_batch,
                            consistency_crop=consistency_crop, seed=seed, flops=flops,
                            conversions=conversions, dist_context=ctx, on_batch=on_batch, on_skip=on_skip)
    device = torch.device(device) if not isinstance(device, torch.device) else device
    if amp and device.type != "cuda":
        raise CCNNError("--amp needs a CUDA device")
    if forward_batch is None:
        forward_batch = default_forward_batch(device)
    if consistency_crop is not None and dataset.uncropped_transform is None:
        raise CCNNError("shift consistency needs a dataset with an uncropped transform")
    indices = list(range(len(dataset))) if indices is None else list(indices)
    shard = shard_indices(indices, dist_context.rank, dist_context.world_size)
    loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_items,
                        pin_memory=device.type == "cuda")

    order = _ordered_modes(models)
    prepared = {name: _prepare(models[name], device) for name in order}
    has_reference = REFERENCE_MODE in prepared
    results = {name: ModeResult(name, agree_with_original=0 if has_reference else None,
                                flops=(flops or {}).get(name), conversion=(conversions or {}).get(name))
               for name in order}
    skipped: list[Skipped] = []
    loader_wait = 0.0
    started = time.perf_counter()

    batches = iter(loader)
    with torch.no_grad():
        while True:
            waited = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                break
            loader_wait += time.perf_counter() - waited
            for item in batch.skipped:
                skipped.append(item)
                if on_skip:
                    on_skip(item)
            if len(batch.targets):
                _run_batch(batch, prepared, results, device, amp, forward_batch, consistency_crop, seed)
            if on_batch:
                on_batch(batch.files)

    wall = time.perf_counter() - started
    memory_kind = "cuda_max_allocated" if device.type == "cuda" else "process_rss_high_water"
    if device.type != "cuda":
        rss = process_peak_rss_bytes()
        for result in results.values():
            result.peak_memory_bytes = rss
    ordered = [results[name] for name in order]
    if dist_context.active:
        loader_wait, wall, skipped = _all_reduce(ordered, loader_wait, wall, skipped, device)
    images = ordered[0].images if ordered else 0
    return EvalReport(results=ordered, images=images, skipped=skipped, loader_wait_s=loader_wait,
                      wall_s=wall, memory_kind=memory_kind, rank=dist_context.rank,
                      world_size=dist_context.world_size)


def _run_batch(batch: Batch, models: Mapping[str, Classifier], results: dict[str, ModeResult],
               device: torch.device, amp: bool, forward_batch: int | None, consistency_crop: int | None,
               seed: int) -> None:
    """Feed one decoded batch to every mode (reference first) and add to its counts."""
    images = batch.images.to(device, non_blocking=True)
    targets = batch.targets.to(device)
    offsets = uncropped = None
    if consistency_crop is not None:
        uncropped = batch.uncropped.to(device, non_blocking=True)
        offsets = shift_offsets(batch.indices.tolist(), seed, uncropped.shape[-1] - consistency_crop)
    reference_logits = None
    for name, model in models.items():
        result = results[name]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _synchronize(device)
        start = time.perf_counter()
        logits = _logits(model, images, amp, forward_batch)
        _synchronize(device)
        result.seconds += time.perf_counter() - start
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            result.peak_memory_bytes = max(result.peak_memory_bytes or 0, peak)

        counts = topk_correct(logits, targets, ks=(1, 5))
        result.images += len(targets)
        result.top1_correct += counts[1]
        result.top5_correct += counts[5]
        result.batches += 1
        if name == REFERENCE_MODE:
            reference_logits = logits
        if reference_logits is not None:
            result.agree_with_original += top1_agreement(logits, reference_logits)
        if offsets is not None:
            first = _logits(model, crops_at(uncropped, offsets[:, 0], consistency_crop), amp, forward_batch)
            second = _logits(model, crops_at(uncropped, offsets[:, 1], consistency_crop), amp, forward_batch)
            result.consistent += top1_agreement(first, second)
            result.consistency_images += len(targets)


_SUMMED = ("images", "top1_correct", "top5_correct", "agree_with_original", "consistent",
           "consistency_images")


def _all_reduce(results: list[ModeResult], loader_wait: float, wall: float,
                skipped: list[Skipped], device: torch.device):
    """Sum the counts over ranks; time, batches and memory are the largest rank's (ranks run in
    parallel, so the slowest one sets images/s and time per batch)."""
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
    sums = torch.tensor([[getattr(r, f) or 0 for f in _SUMMED] for r in results],
                        dtype=torch.float64, device=comm)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    maxes = torch.tensor([[r.seconds, float(r.peak_memory_bytes or 0), r.batches] for r in results]
                         + [[loader_wait, wall, 0]], dtype=torch.float64, device=comm)
    dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    for result, row, (seconds, peak, batches) in zip(results, sums.tolist(), maxes.tolist()):
        for name, value in zip(_SUMMED, row):
            if getattr(result, name) is not None:
                setattr(result, name, int(round(value)))
        result.seconds, result.batches = seconds, int(batches)
        result.peak_memory_bytes = int(peak) if result.peak_memory_bytes is not None else None
    gathered: list[list[Skipped]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(gathered, [tuple(s) for s in skipped])
    all_skipped = [Skipped(*s) for rank_list in gathered for s in rank_list]
    loader_wait, wall, _ = maxes[-1].tolist()
    return loader_wait, wall, all_skipped


# --------------------------------------------------------------------------------------------
# MODEL string -> models per mode -> report
# --------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """Everything ``ccnn-eval`` takes. ``None`` for sampler/keep_first/density/seed means "the
    artifact's value if MODEL is a ccnn-convert artifact, else the default"."""

    model: str
    data: str
    labels: str | None = None
    modes: Sequence[str] | str | None = None
    sampler: str | None = None
    keep_first: int | None = None
    density: int | None = None  # samples per window (1 = traditional, k*k = dilated)
    seed: int | None = None
    weights: str = "DEFAULT"
    arch: str | None = None
    preprocessing: dict = field(default_factory=dict)  # overrides: resize, crop, mean, std, interpolation
    limit: int | None = None
    batch_size: int = 32
    forward_batch: int | None = None  # images per forward pass (None: 4 on CPU, the batch on CUDA)
    workers: int = 2
    device: str = "auto"
    amp: bool = False
    consistency: bool = False


@dataclass
class LoadedClassifier:
    model: Any  # nn.Module, or a batch->logits callable for ONNX
    name: str
    preprocessing: Any  # ccnn_convert.models.Preprocessing
    num_classes: int = 1000
    conversion: dict | None = None
    convertible: bool = True


def parse_modes(modes: Sequence[str] | str | None, default: Sequence[str] = DEFAULT_MODES) -> list[str]:
    """'original,checkered' (or a list) -> validated, de-duplicated list of modes."""
    if modes is None:
        return list(default)
    items = modes.split(",") if isinstance(modes, str) else list(modes)
    parsed: list[str] = []
    for item in (m.strip().lower() for m in items):
        if not item:
            continue
        if item not in MODES:
            raise CCNNError(f"unknown mode {item!r} (choose from {', '.join(MODES)})")
        if item not in parsed:
            parsed.append(item)
    if not parsed:
        raise CCNNError("--modes is empty")
    return parsed


def parse_floats(text: str | Sequence[float] | None, what: str, count: int = 3) -> tuple[float, ...] | None:
    """'0.485,0.456,0.406' -> (0.485, 0.456, 0.406)."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise CCNNError(f"{what} must be {count} comma-separated numbers, got {text!r}") from None
    if len(values) != count:
        raise CCNNError(f"{what} must be {count} comma-separated numbers, got {text!r}")
    return values


def validate_config(config: EvalConfig) -> None:
    checks = [
        (config.limit is not None and config.limit <= 0, "--limit must be a positive number of images"),
        (config.batch_size <= 0, "--batch-size must be positive"),
        (config.forward_batch is not None and config.forward_batch <= 0, "--forward-batch must be positive"),
        (config.workers < 0, "--workers must be 0 or more"),
        (config.keep_first is not None and config.keep_first < 0, "--keep-first must be 0 or more"),
        (config.density is not None and config.density < 1, "--density must be a positive number of samples per window"),
        (config.seed is not None and config.seed < 0, "--seed must be 0 or more"),
        (config.sampler is not None and config.sampler not in SAMPLERS,
         f"unknown --sampler {config.sampler!r} (choose from {', '.join(SAMPLERS)})"),
    ]
    for failed, message in checks:
        if failed:
            raise CCNNError(message)
    unknown = set(config.preprocessing) - set(PREPROCESSING_KEYS)
    if unknown:
        raise CCNNError(f"unknown preprocessing override(s): {', '.join(sorted(unknown))}")


def load_classifier(config: EvalConfig) -> LoadedClassifier:
    """MODEL -> the original classifier, its preprocessing (with overrides) and any conversion."""
    overrides = {k: v for k, v in config.preprocessing.items() if v is not None}
    if config.model.lower().endswith(".onnx"):
        return _load_onnx(config.model, overrides)
    from .models import resolve_model  # imported late: loading model code is slow

    resolved = resolve_model(config.model, weights=config.weights, arch=config.arch,
                             preprocessing=overrides or None)
    return LoadedClassifier(model=resolved.model, name=resolved.name, preprocessing=resolved.preprocessing,
                            num_classes=getattr(resolved, "num_classes", 1000),
                            conversion=resolved.conversion)


def _load_onnx(path: str, overrides: dict) -> LoadedClassifier:
    try:
        from .export import load_onnx_classifier
    except ImportError as exc:
        detail = "" if exc.name in ("ccnn_convert.export", None) else f" ({exc})"
        raise CCNNError(f"ONNX evaluation needs ccnn_convert.export{detail}") from None
    fn, preprocessing, name = load_onnx_classifier(path)
    if overrides:
        preprocessing = preprocessing.with_overrides(**overrides)
    return LoadedClassifier(model=fn, name=name, preprocessing=preprocessing, convertible=False)


def modes_for(config: EvalConfig, loaded: LoadedClassifier) -> list[str]:
    """--modes, or the default: an artifact compares original with its own conversion; an ONNX
    graph can only be evaluated as it is."""
    if loaded.conversion and config.modes is None:
        default = [REFERENCE_MODE, loaded.conversion.get("mode", "checkered")]
    elif not loaded.convertible:
        default = [REFERENCE_MODE]
    else:
        default = list(DEFAULT_MODES)
    modes = parse_modes(config.modes, default)
    if not loaded.convertible and modes != [REFERENCE_MODE]:
        raise CCNNError("an ONNX model can only be evaluated as it is: use --modes original")
    return modes


def conversion_kwargs(mode: str, config: EvalConfig, artifact: dict | None) -> dict:
    """convert() keyword arguments for one mode: explicit flag > artifact's value > default."""
    values: dict[str, Any] = {"sampler": "lattice", "keep_first": 0, "density": None, "seed": None}
    if artifact and artifact.get("mode") == mode:
        values.update({k: artifact[k] for k in values if k in artifact})
    for key in values:
        explicit = getattr(config, key)
        if explicit is not None:
            values[key] = explicit
    if mode != "checkered":  # sampler, density and seed only shape the checkered submaps
        values = {"keep_first": values["keep_first"]}
    return {"mode": mode, **values}


def count_flops_per_image(model: Any, example: Tensor) -> int | None:
    """FLOPs of one forward pass at batch 1 (None for non-module classifiers such as ONNX)."""
    if not isinstance(model, nn.Module):
        return None
    return count_flops(model, example)


def convert_model(model: nn.Module, **kwargs) -> nn.Module:
    from .core import convert  # imported late: the data and metrics code works without it

    return convert(model, **kwargs)


def build_models(loaded: LoadedClassifier, modes: Sequence[str], config: EvalConfig,
                 crop: int, log: Callable[[str], None] | None = None) -> tuple[dict, dict]:
    """One model per mode: the original as loaded, the others from convert()."""
    example = torch.zeros(1, 3, crop, crop)
    models: dict[str, Any] = {}
    conversions: dict[str, dict | None] = {}
    for mode in modes:
        if mode == REFERENCE_MODE:
            models[mode], conversions[mode] = loaded.model, None
            continue
        kwargs = conversion_kwargs(mode, config, loaded.conversion)
        if log:
            log(f"converting to {mode} ({', '.join(f'{k}={v}' for k, v in kwargs.items() if k != 'mode')})")
        models[mode] = convert_model(loaded.model, example_input=example, **kwargs).eval()
        conversions[mode] = kwargs
    return models, conversions


def _check_targets(samples: Samples, num_classes: int) -> None:
    too_big = [t for t in samples.targets if t >= num_classes]
    if too_big:
        raise DataError(f"label {max(too_big)} is out of range for a {num_classes}-class model")


def limit_note(selected: int, total: int, limit: int | None, classes: int) -> str:
    if limit is None or selected == total:
        return f"all {total} images"
    return (f"--limit {limit}: {selected} of {total} images, stratified round-robin over classes "
            f"({classes} classes, spread over the class list)")


def evaluate_model(config: EvalConfig, *, on_batch: Callable[[int], None] | None = None,
                   on_skip: Callable[[Skipped], None] | None = None,
                   on_start: Callable[[dict], None] | None = None,
                   log: Callable[[str], None] | None = None) -> EvalReport:
    """The whole ``ccnn-eval`` run: resolve MODEL, convert per mode, read DATA, evaluate.

    ``on_start`` receives the data description (a dict with "shard_images", "rank", ...) just
    before the loop starts, so a caller can size its progress bar.
    """
    validate_config(config)
    with distributed_from_env(config.device) as ctx:
        log = log if ctx.rank == 0 else None  # under torchrun only rank 0 talks
        device = resolve_device(config.device, ctx.local_rank)
        if config.amp and device.type != "cuda":
            raise CCNNError("--amp needs a CUDA device (--device cuda)")
        if ctx.active and config.sampler == "random" and config.seed is None:
            raise CCNNError("--sampler random under torchrun needs --seed (every rank must build the same model)")

        loaded = load_classifier(config)
        modes = modes_for(config, loaded)
        samples = find_samples(config.data, config.labels, imagenet_labels=loaded.num_classes == 1000)
        _check_targets(samples, loaded.num_classes)
        indices = stratified_indices(samples.targets, config.limit)
        chosen_classes = len({samples.items[i][1] for i in indices})

        pre = loaded.preprocessing
        consistency_crop = None
        uncropped_transform = None
        if config.consistency:
            if pre.resize <= pre.crop:
                raise CCNNError(f"--consistency needs room to shift: resize ({pre.resize}) must exceed crop ({pre.crop})")
            consistency_crop = pre.crop
            # Zhang 2019: resize, take the resize x resize centre square, then crop twice at random.
            uncropped_transform = pre.with_overrides(crop=pre.resize).transform()
        dataset = DecodedImages(samples.items, pre.transform(), uncropped_transform)

        selection = limit_note(len(indices), len(samples.items), config.limit, chosen_classes)
        if log:
            log(f"{loaded.name}: modes {', '.join(modes)} on {device}; {selection}")
        models, conversions = build_models(loaded, modes, config, pre.crop, log)
        flops = {}
        for mode, model in models.items():
            flops[mode] = count_flops_per_image(model, torch.zeros(1, 3, pre.crop, pre.crop))

        data = {"path": str(config.data), "labels": config.labels, "layout": samples.layout,
                "files_found": len(samples.items), "files_selected": len(indices),
                "classes_selected": chosen_classes,
                "limit": config.limit,
                "selection": selection}
        if on_start:
            on_start({**data, "rank": ctx.rank, "world_size": ctx.world_size,
                      "shard_images": len(shard_indices(indices, ctx.rank, ctx.world_size)),
                      "device": str(device), "modes": modes, "model": loaded.name})
        seed = config.seed if config.seed is not None else 0
        report = evaluate(models, dataset, indices, batch_size=config.batch_size, workers=config.workers,
                          device=device, amp=config.amp, forward_batch=config.forward_batch,
                          consistency_crop=consistency_crop, seed=seed,
                          flops=flops, conversions=conversions, dist_context=ctx,
                          on_batch=on_batch, on_skip=on_skip)
    if report.images == 0:
        raise DataError(f"no image could be decoded: all {len(report.skipped)} selected files were skipped")
    settings = {
        "modes": modes, "sampler": config.sampler, "keep_first": config.keep_first,
        "density": config.density, "seed": config.seed, "weights": config.weights, "arch": config.arch,
        "preprocessing": _preprocessing_dict(pre), "limit": config.limit,
        "batch_size": config.batch_size, "workers": config.workers, "device": str(device),
        "forward_batch": config.forward_batch or default_forward_batch(device),
        "amp": config.amp, "consistency": config.consistency,
        "consistency_protocol": ({"crop": consistency_crop, "square": pre.resize, "seed": seed,
                                  "offsets": f"0..{pre.resize - consistency_crop} per axis, two per image"}
                                 if config.consistency else None),
        "world_size": ctx.world_size, "torch": torch.__version__,
    }
    return dataclasses.replace(report, model=loaded.name, data=data, settings=settings)


def _preprocessing_dict(pre: Any) -> dict:
    if hasattr(pre, "to_dict"):
        return pre.to_dict()
    return {k: getattr(pre, k, None) for k in PREPROCESSING_KEYS}
