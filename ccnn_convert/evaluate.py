"""Evaluate a classifier and its checkered / dilated conversions on labelled images.

The Python API behind ``ccnn-eval``. Layers, from small to large:

* what is counted, and the report: :mod:`ccnn_convert.metrics` (re-exported here);
* :func:`evaluate`: the loop. Every image is decoded once; each batch is fed to every mode's
  model in turn (so modes are interleaved per batch), counts are summed and, under torchrun,
  all-reduced over ranks without the padding duplicates DistributedSampler would add;
* :func:`evaluate_model`: MODEL -> original + converted models (one
  :class:`~ccnn_convert.spec.ConversionSpec` per mode), data, then :func:`evaluate`.

Bad input raises a one-line :class:`~ccnn_convert.errors.CCNNError` (data problems:
:class:`~ccnn_convert.errors.DataError`; a bad argument: a
:class:`~ccnn_convert.errors.ParameterError` naming it). Notes go to ``logging``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from ._helpers import counted, first_line, logits_of
from .data import (Batch, DecodedImages, Skipped, collate_items, find_samples, shard_indices,
                   stratified_indices)
from .core.options import check_seed
from .errors import CCNNError, DataError, ParameterError
from .flops import count_flops
from .metrics import (EvalReport, ModeResult, crops_at, shift_offsets, top1_agreement, topk_correct,
                      write_json)
from .models import Preprocessing, ResolvedModel, resolve_model
from .runtime import (DistributedContext, default_forward_batch, distributed_from_env,
                      process_peak_rss_bytes, resolve_device, synchronize)
from .spec import ORIGINAL, ConversionSpec, check_modes, check_options_used

__all__ = [
    "DEFAULT_MODES", "EvalReport", "ModeResult", "crops_at", "evaluate", "evaluate_model",
    "shift_offsets", "top1_agreement", "topk_correct", "write_json",
]

logger = logging.getLogger(__name__)

DEFAULT_MODES = (ORIGINAL, "checkered")

Classifier = Callable[[Tensor], Tensor]  # an nn.Module, or a batch -> logits callable (ONNX)


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


def _logits(model: Classifier, images: Tensor, amp: bool, forward_batch: int | None = None) -> Tensor:
    chunks = images.split(forward_batch) if forward_batch else (images,)
    outputs = []
    for chunk in chunks:
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            out = model(chunk)
        outputs.append(logits_of(out).float())
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def _ordered_modes(models: Mapping[str, Classifier]) -> list[str]:
    """The reference mode first, so every other mode can be compared with its predictions."""
    names = list(models)
    return sorted(names, key=lambda n: n != ORIGINAL)


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
    :func:`~ccnn_convert.runtime.default_forward_batch`). Under torchrun (``dist_context`` active, or WORLD_SIZE>1 in
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
        raise ParameterError("amp", "{param} needs a CUDA device")
    if forward_batch is None:
        forward_batch = default_forward_batch(device)
    if consistency_crop is not None and dataset.uncropped_transform is None:
        raise ParameterError("consistency_crop", "{param} needs a dataset with an uncropped transform")
    indices = list(range(len(dataset))) if indices is None else list(indices)
    shard = shard_indices(indices, dist_context.rank, dist_context.world_size)
    loader = DataLoader(Subset(dataset, shard), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_items,
                        pin_memory=device.type == "cuda")

    order = _ordered_modes(models)
    prepared = {name: _prepare(models[name], device) for name in order}
    has_reference = ORIGINAL in prepared
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
        synchronize(device)
        start = time.perf_counter()
        logits = _logits(model, images, amp, forward_batch)
        synchronize(device)
        result.seconds += time.perf_counter() - start
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            result.peak_memory_bytes = max(result.peak_memory_bytes or 0, peak)

        counts = topk_correct(logits, targets, ks=(1, 5))
        result.images += len(targets)
        result.top1_correct += counts[1]
        result.top5_correct += counts[5]
        result.batches += 1
        if name == ORIGINAL:
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
# MODEL -> one model per mode -> report
# --------------------------------------------------------------------------------------------


def evaluate_model(
    model: str | ResolvedModel, data: str | os.PathLike, *, labels: str | os.PathLike | None = None,
    modes: Sequence[str] | None = None, sampler: str | None = None, keep_first: int | None = None,
    density: int | None = None, seed: int | None = None, leaf_modules: Sequence[str] = (),
    edges: str | None = None, dilation: str | None = None, smoothness: float | None = None,
    blur_size: int | None = None, resample_at: str | None = None, spectral_convention: str | None = None,
    phc: int | None = None, weights: str = "DEFAULT", arch: str | None = None, preprocessing: Mapping[str, Any] | None = None,
    trust_factory: bool = False, limit: int | None = None, batch_size: int = 32,
    forward_batch: int | None = None, workers: int = 2, device: str = "auto", amp: bool = False,
    consistency: bool = False, on_batch: Callable[[int], None] | None = None,
    on_skip: Callable[[Skipped], None] | None = None, on_start: Callable[[dict], None] | None = None,
) -> EvalReport:
    """Resolve ``model``, convert it once per mode, read ``data`` and :func:`evaluate` every mode.

    ``model`` is a MODEL string (a name, a checkpoint, a ``.py:factory``, a ccnn-convert artifact
    or an ``.onnx`` file, which runs as it is) or a :class:`~ccnn_convert.models.ResolvedModel`.
    ``modes`` defaults to original and checkered; for an artifact, original and its own mode.
    ``sampler``, ``keep_first``, ``density``, ``seed``, ``edges`` (checkered: exact | reference)
    ``dilation`` (dilated: multisample | native), ``smoothness`` (diffstride), ``blur_size``
    (blurpool), ``resample_at`` (the resampling modes), ``spectral_convention`` (spectral,
    diffstride) and ``phc`` (PHC layers, every converted mode) left at None take the artifact's value
    (when its mode is evaluated), else the default; an artifact's ``leaf_modules`` always carry
    over. ``seed`` also places the two shift-consistency crops (``consistency``). ``limit``
    picks images round-robin over classes. ``on_start`` receives the data description (a dict
    with "shard_images", "rank", ...) just before the loop, so a caller can size a progress bar.
    """
    _check_counts(limit=limit, batch_size=batch_size, forward_batch=forward_batch, workers=workers)
    if seed is not None:
        check_seed(seed)  # before the model is loaded
    with distributed_from_env(device) as ctx:
        target = resolve_device(device, ctx.local_rank)
        if amp and target.type != "cuda":
            raise ParameterError("amp", "{param} needs a CUDA device")
        classifier, name, pre, resolved = _load(model, weights, arch, preprocessing, trust_factory)
        modes = _modes(modes, resolved, onnx=resolved is None)
        specs = _conversion_specs(modes, resolved.conversion if resolved else None, sampler=sampler,
                                  keep_first=keep_first, density=density, seed=seed,
                                  leaf_modules=leaf_modules, edges=edges, dilation=dilation,
                                  smoothness=smoothness, blur_size=blur_size, resample_at=resample_at,
                                  spectral_convention=spectral_convention, phc=phc, consistency=consistency)
        if ctx.active and any(s.sampler == "random" and s.seed is None for s in specs.values()):
            raise ParameterError("seed", "the random sampler under torchrun needs {param} "
                                         "(every rank must build the same model)")
        # An ONNX graph says in its metadata what an artifact says (a foreign one: ImageNet).
        labelled = resolved if resolved is not None else classifier
        num_classes = getattr(labelled, "num_classes", None) or 1000
        class_names = getattr(labelled, "class_names", None)
        samples = find_samples(data, labels, imagenet_labels=num_classes == 1000, class_names=class_names)
        too_big = [t for t in samples.targets if t >= num_classes]
        if too_big:
            raise DataError(f"label {max(too_big)} is out of range for a {num_classes}-class model")
        indices = stratified_indices(samples.targets, limit)
        classes = len({samples.items[i][1] for i in indices})
        selection = _selection(len(indices), len(samples.items), limit, classes)
        crop, dataset = _dataset(samples.items, pre, consistency)
        if ctx.is_main:
            logger.info(f"{name}: modes {', '.join(modes)} on {target}; {selection}")
        models: dict[str, Any] = {}
        for mode in modes:
            if mode == ORIGINAL:
                models[mode] = classifier
                continue
            if ctx.is_main:
                logger.info(f"converting to {mode} ({specs[mode].describe()})")
            models[mode] = (resolved.converted(specs[mode], pre.crop) if resolved is not None
                            else specs[mode].apply(classifier, pre.crop))
        example = torch.zeros(1, 3, pre.crop, pre.crop)
        flops = {m: count_flops(c, example) if isinstance(c, nn.Module) else None for m, c in models.items()}
        described = {"path": str(data), "labels": None if labels is None else str(labels),
                     "layout": samples.layout, "files_found": len(samples.items),
                     "files_selected": len(indices), "classes_selected": classes, "limit": limit,
                     "selection": selection}
        if on_start:
            on_start({**described, "rank": ctx.rank, "world_size": ctx.world_size,
                      "shard_images": len(shard_indices(indices, ctx.rank, ctx.world_size)),
                      "device": str(target), "modes": modes, "model": name})
        crop_seed = seed if seed is not None else 0
        report = evaluate(models, dataset, indices, batch_size=batch_size, workers=workers,
                          device=target, amp=amp, forward_batch=forward_batch, consistency_crop=crop,
                          seed=crop_seed, flops=flops,
                          conversions={m: s.to_dict() for m, s in specs.items()},
                          dist_context=ctx, on_batch=on_batch, on_skip=on_skip)
    if report.images == 0:
        raise DataError(f"no image could be decoded: all {len(report.skipped)} selected files were skipped")
    if resolved is None:  # an ONNX graph ran as it is: its row is not a PyTorch "original"
        report = dataclasses.replace(report, results=[dataclasses.replace(r, mode=ONNX_ROW) for r in report.results])
    settings = {
        "modes": modes, "sampler": sampler, "keep_first": keep_first, "density": density, "seed": seed,
        "edges": edges, "dilation": dilation, "smoothness": smoothness, "blur_size": blur_size,
        "resample_at": resample_at, "spectral_convention": spectral_convention, "phc": phc,
        "leaf_modules": list(leaf_modules),
        "weights": weights, "arch": arch,
        "preprocessing": pre.to_dict(), "limit": limit, "batch_size": batch_size, "workers": workers,
        "device": str(target), "forward_batch": forward_batch or default_forward_batch(target),
        "amp": amp, "consistency": consistency,
        "consistency_protocol": ({"crop": crop, "square": pre.resize, "seed": crop_seed,
                                  "offsets": f"0..{pre.resize - crop} per axis, two per image"}
                                 if consistency else None),
        "world_size": ctx.world_size, "torch": torch.__version__,
    }
    return dataclasses.replace(report, model=name, data=described, settings=settings)


ONNX_ROW = "onnx"  # the label of an ONNX file's row (its own mode is in the model name)

_COUNT_RULES = {"limit": (1, "a positive number of images"), "batch_size": (1, "positive"),
                "forward_batch": (1, "positive"), "workers": (0, "0 or more")}


def _check_counts(**values: int | None) -> None:
    for name, value in values.items():
        least, wanted = _COUNT_RULES[name]
        if value is not None and value < least:
            raise ParameterError(name, f"{{param}} must be {wanted}, got {value}")


def _load(model: str | ResolvedModel, weights: str, arch: str | None,
          overrides: Mapping[str, Any] | None, trust_factory: bool):
    """-> (classifier, name, preprocessing, ResolvedModel or None for an ONNX graph)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(Preprocessing)})
    if unknown:
        raise ParameterError("preprocessing", f"unknown key(s) in {{param}}: {', '.join(unknown)}")
    if isinstance(model, ResolvedModel):
        pre = model.preprocessing.with_overrides(**overrides)
        return model.model, model.name, pre, dataclasses.replace(model, preprocessing=pre)
    if str(model).lower().endswith(".onnx"):
        try:  # ONNX Runtime is optional: import it only for ONNX files
            from .export.sessions import load_onnx_classifier
        except ImportError as exc:
            raise CCNNError(f"ONNX evaluation needs ONNX Runtime: {first_line(exc)}") from None
        fn, pre, name = load_onnx_classifier(model)
        return fn, name, pre.with_overrides(**overrides), None
    resolved = resolve_model(str(model), weights=weights, arch=arch, preprocessing=overrides or None,
                             trust_factory=trust_factory)
    return resolved.model, resolved.name, resolved.preprocessing, resolved


def _modes(modes: Sequence[str] | None, resolved: ResolvedModel | None, onnx: bool) -> list[str]:
    """The modes asked for, or the default: an artifact compares original with its own
    conversion; an ONNX graph can only be evaluated as it is."""
    if modes is not None:
        checked = check_modes(modes)
    elif onnx:
        checked = [ORIGINAL]
    elif resolved is not None and resolved.conversion is not None:
        checked = [ORIGINAL, resolved.conversion.mode]
    else:
        checked = list(DEFAULT_MODES)
    if onnx and checked != [ORIGINAL]:
        raise ParameterError("modes", "an ONNX model can only be evaluated as it is: set {param} to original")
    return checked


def _conversion_specs(modes: Sequence[str], base: ConversionSpec | None, *, sampler, keep_first,
                      density, seed, leaf_modules, consistency: bool, edges: str | None = None,
                      dilation: str | None = None, smoothness: float | None = None,
                      blur_size: int | None = None, resample_at: str | None = None,
                      spectral_convention: str | None = None, phc: int | None = None) -> dict[str, ConversionSpec]:
    """One spec per converted mode; options that would change nothing are errors."""
    converted = [m for m in modes if m != ORIGINAL]
    check_options_used(modes, sampler=sampler, density=density, seed=None if consistency else seed,
                       edges=edges, dilation=dilation, smoothness=smoothness, blur_size=blur_size,
                       resample_at=resample_at, spectral_convention=spectral_convention, phc=phc,
                       keep_first=keep_first if converted else None)  # else: the message below
    for name, value in (("keep_first", keep_first), ("leaf_modules", list(leaf_modules) or None)):
        if value is not None and not converted:
            raise ParameterError(name, f"{{param}} only shapes conversions; no converted mode among "
                                       f"{', '.join(modes)}")
    specs = {}
    for mode in converted:
        spec = ConversionSpec.build(mode, base, sampler=sampler, keep_first=keep_first,
                                    density=density, leaf_modules=leaf_modules, edges=edges,
                                    dilation=dilation, smoothness=smoothness, blur_size=blur_size,
                                    resample_at=resample_at, spectral_convention=spectral_convention, phc=phc)
        if seed is not None and spec.mode == "checkered" and spec.sampler == "random":
            spec = dataclasses.replace(spec, seed=seed)
        specs[mode] = spec
    if seed is not None and not consistency and not any(s.seed == seed for s in specs.values()):
        raise ParameterError("seed", "{param} would do nothing: it seeds the random sampler and the "
                                     "consistency crops, and neither is used")
    return specs


def _selection(selected: int, total: int, limit: int | None, classes: int) -> str:
    """Files, not images: which of them decode is known only once they are read (skipped ones are
    counted apart)."""
    if limit is None or selected == total:
        return f"all {counted(total, 'file')}"
    return (f"{selected} of {total} files, stratified round-robin over classes "
            f"({classes} classes, spread over the class list)")


def _dataset(items, pre: Preprocessing, consistency: bool) -> tuple[int | None, DecodedImages]:
    """The decoded dataset; with ``consistency`` also the uncropped square (Zhang 2019: resize,
    take the resize x resize centre square, then crop twice at random)."""
    if not consistency:
        return None, DecodedImages(items, pre.transform())
    if pre.resize <= pre.crop:
        raise ParameterError("consistency", f"{{param}} needs room to shift: resize ({pre.resize}) "
                                            f"must exceed crop ({pre.crop})")
    return pre.crop, DecodedImages(items, pre.transform(), pre.with_overrides(crop=pre.resize).transform())
