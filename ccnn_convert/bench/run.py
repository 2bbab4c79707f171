"""A whole benchmark run: resolve every MODEL, measure it, and write the report files.

:func:`run_bench` is what ``ccnn-bench`` calls: it resolves each MODEL
(:func:`ccnn_convert.models.resolve_model`), builds one :class:`~ccnn_convert.spec.ConversionSpec`
per mode (the artifact's own conversion, if MODEL is one, is the base: its leaf modules always
carry over) and hands them to :func:`.measure.bench_model`. :func:`write_outputs` writes
bench.json, bench.md and the plots; :func:`output_names` says which, so a caller can check the
folder (:func:`ccnn_convert.outputs.check_output_dir`) before the slow part.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..errors import CCNNError, ParameterError
from ..outputs import atomic_path, check_output_dir
from ..runtime import resolve_device
from ..spec import ORIGINAL, ConversionSpec, check_options_used
from .machine import load_average, machine_settings
from .measure import Measurement, TimingOptions, Top1Fn, bench_model, measured_modes
from .plots import plot_sweep, plot_time_ratios
from .report import BenchReport

__all__ = ["OUTPUT_NAMES", "BenchOptions", "Top1Options", "conversion_specs", "output_names", "run_bench",
           "top1_evaluator", "write_outputs"]

logger = logging.getLogger(__name__)

OUTPUT_NAMES = ("bench.json", "bench.md", "time_ratio.png", "sweep.png")
_RANDOM_DEFAULT_SEED = 0  # the random sampler is seeded by default, so timings are reproducible


@dataclass(frozen=True)
class BenchOptions:
    """What to measure for every MODEL: which conversions, on what input, on which device.

    ``modes``: None for original, checkered and dilated; the original is always measured.
    ``sampler``, ``keep_first``, ``seed``, ``edges`` (checkered: exact | reference), ``dilation``
    (dilated: multisample | native), ``smoothness`` (diffstride), ``blur_size`` (blurpool),
    ``resample_at`` (the resampling modes), ``spectral_convention`` (spectral, diffstride), ``phc``
    (PHC layers in every converted mode): None
    keeps the artifact's value (or the default);
    the random sampler gets seed 0 unless one is given. ``image_size``: None for each model's
    crop size. ``sweep``: also every keep_first from ``keep_first + 1`` to the number of steps.
    """

    modes: tuple[str, ...] | None = None
    sampler: str | None = None
    keep_first: int | None = None
    seed: int | None = None
    leaf_modules: tuple[str, ...] = ()
    edges: str | None = None
    dilation: str | None = None
    smoothness: float | None = None
    blur_size: int | None = None
    resample_at: str | None = None
    spectral_convention: str | None = None
    phc: int | None = None
    sweep: bool = False
    image_size: int | None = None
    device: str = "auto"
    weights: str = "DEFAULT"
    trust_factory: bool = False
    timing: TimingOptions = TimingOptions()

    def __post_init__(self) -> None:
        if self.image_size is not None and self.image_size < 1:
            raise ParameterError("image_size", "{param} must be positive")
        modes = measured_modes(self.modes)
        object.__setattr__(self, "modes", tuple(modes))
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        check_options_used(modes, sampler=self.sampler, seed=self.seed, edges=self.edges, dilation=self.dilation,
                           smoothness=self.smoothness, blur_size=self.blur_size,
                           resample_at=self.resample_at, spectral_convention=self.spectral_convention, phc=self.phc)


@dataclass(frozen=True)
class Top1Options:
    """Top-1 on an image folder (``<wnid>/<image>``, or flat with a ``labels`` file)."""

    data: str
    labels: str | None = None
    limit: int | None = None
    batch_size: int = 32
    workers: int = 0

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ParameterError("limit", "{param} must be a positive number of images")
        if self.batch_size < 1:
            raise ParameterError("eval_batch_size", "{param} must be positive")
        if self.workers < 0:
            raise ParameterError("workers", "{param} must be 0 or more")


def conversion_specs(options: BenchOptions, base: ConversionSpec | None = None) -> list[ConversionSpec]:
    """One spec per converted mode: the options given, else ``base``'s (an artifact's), else defaults."""
    specs = []
    for mode in options.modes:
        if mode == ORIGINAL:
            continue
        spec = ConversionSpec.build(mode, base, sampler=options.sampler, keep_first=options.keep_first,
                                    seed=options.seed, leaf_modules=options.leaf_modules, edges=options.edges,
                                    dilation=options.dilation, smoothness=options.smoothness,
                                    blur_size=options.blur_size, resample_at=options.resample_at,
                                    spectral_convention=options.spectral_convention, phc=options.phc)
        if spec.sampler == "random" and spec.seed is None and spec.mode == "checkered":
            spec = dataclasses.replace(spec, seed=_RANDOM_DEFAULT_SEED)
        specs.append(spec)
    return specs


def top1_evaluator(options: Top1Options, preprocessing, *, device: torch.device | str = "cpu",
                   num_classes: int = 1000, class_names: Sequence[str] | None = None) -> tuple[Top1Fn, dict]:
    """A function {label: model} -> {label: top-1 %} over an image folder, and a description of the data.

    Uses :func:`ccnn_convert.evaluate.evaluate`: every image is decoded once and fed to every
    variant in turn.
    """
    from ..data import DecodedImages, find_samples, stratified_indices
    from ..evaluate import evaluate  # heavy; only needed with top-1

    samples = find_samples(options.data, options.labels, imagenet_labels=num_classes == 1000,
                           class_names=class_names)
    indices = stratified_indices(samples.targets, options.limit)
    dataset = DecodedImages(samples.items, preprocessing.transform())
    info = {"data": str(options.data), "images": len(indices)}

    def run(models: Mapping[str, nn.Module]) -> dict[str, float | None]:
        report = evaluate(dict(models), dataset, indices, batch_size=options.batch_size, workers=options.workers,
                          device=device)
        info["images"] = report.images
        return {result.mode: result.top1 for result in report.results}

    return run, info


def run_bench(models: Sequence[str], options: BenchOptions = BenchOptions(), top1: Top1Options | None = None, *,
              command: str | None = None) -> BenchReport:
    """Resolve every MODEL and measure it with :func:`bench_model` (see :class:`BenchOptions`)."""
    from ..models import resolve_model

    if not models:
        raise ParameterError("models", "give at least one model in {param}")
    target = resolve_device(options.device)
    resolved = [resolve_model(name, weights=options.weights, trust_factory=options.trust_factory)
                for name in models]  # fail fast on a bad name
    specs = [conversion_specs(options, r.conversion) for r in resolved]  # and on bad options
    settings = machine_settings(target)
    settings.update(_option_settings(options, command))
    before = load_average()
    measurements: list[Measurement] = []
    for r, conversions in zip(resolved, specs):
        scorer = None
        if top1 is not None:
            scorer, info = top1_evaluator(top1, r.preprocessing, device=target, num_classes=r.num_classes,
                                           class_names=r.class_names)
            settings.update(info)
        size = options.image_size or r.preprocessing.crop
        measurements += bench_model(r.name, r.model, conversions, image_size=size, device=target,
                                    timing=options.timing, sweep=options.sweep, top1=scorer,
                                    convert=r.converted)
    settings["load_average"] = [before, load_average()] if before is not None else None
    settings["image_size"] = options.image_size or "model default"
    return BenchReport(measurements, settings)


def _option_settings(options: BenchOptions, command: str | None) -> dict:
    timing = options.timing
    return {"modes": list(options.modes), "batch_size": timing.batch_size, "image_size": options.image_size,
            "repeats": timing.repeats, "warmup": timing.warmup, "keep_first": options.keep_first or 0,
            "sweep": options.sweep, "sampler": options.sampler or "lattice", "seed": options.seed,
            "edges": options.edges, "dilation": options.dilation, "smoothness": options.smoothness,
            "blur_size": options.blur_size, "resample_at": options.resample_at,
            "spectral_convention": options.spectral_convention, "phc": options.phc,
            "leaf_modules": list(options.leaf_modules), "weights": options.weights,
            "max_seconds": timing.max_seconds, "onnx": timing.onnx, "command": command}


# --------------------------------------------------------------------------- files


def output_names(sweep: bool = True) -> list[str]:
    """The files :func:`write_outputs` may write (sweep.png only for a keep_first sweep)."""
    return [name for name in OUTPUT_NAMES if sweep or name != "sweep.png"]


def write_outputs(report: BenchReport, out_dir: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """bench.json, bench.md, time_ratio.png (and sweep.png for a sweep) in ``out_dir``, atomically.

    Every file is checked before any is written: an existing one without ``force`` writes nothing.
    """
    out = check_output_dir(out_dir, output_names(report.has_sweep), force=force)
    try:
        out.mkdir(exist_ok=True)
    except OSError as exc:
        raise CCNNError(f"cannot create {out}: {exc.strerror or exc}") from None
    written = []
    for name, text in (("bench.json", report.to_json()), ("bench.md", report.to_markdown())):
        with atomic_path(out / name, force=force) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written.append(out / name)
    written.append(plot_time_ratios(report, out / "time_ratio.png", force=force))
    if report.has_sweep:
        written.append(plot_sweep(report, out / "sweep.png", force=force))
    return written
