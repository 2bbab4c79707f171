"""MODEL + DIR -> a trained converted model: the Python API behind ``ccnn-train``.

:func:`train_model` resolves MODEL as every command does, gives it a new head when the data's
classes ask for one, converts it (the options of ``ccnn-convert``), trains it with a
:class:`~.loop.Trainer` and, after every epoch, writes under ``out``:

``checkpoint.pt``  the training state (:mod:`.resume`; continue with ``resume=``)
``last.pt``, ``best.pt``  artifacts of the last epoch and of the best val top-1, which
                   ``ccnn-eval``, ``ccnn-export`` and ``ccnn-bench`` take as MODEL
``history.json``, ``curves.png``  the epochs so far

Each file is replaced atomically, so a run stopped at any moment leaves the last finished
epoch's files whole.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..errors import ParameterError
from ..models import ResolvedModel, conversion_state, replace_head, resolve_model, save_artifact
from ..outputs import check_output_dir
from ..runtime import distributed_from_env, resolve_device
from ..spec import ConversionSpec, check_options_used
from .data import ClassLabels, choose_labels, class_folders, training_sets
from .history import plot_curves, write_history
from .loop import EpochRecord, StepInfo, Trainer, best_record
from .recipe import TrainConfig
from .resume import check_identity, load_training_state, save_training_state

__all__ = ["OUTPUT_FILES", "TrainResult", "train_model"]

logger = logging.getLogger(__name__)

OUTPUT_FILES = {"state": "checkpoint.pt", "last": "last.pt", "best": "best.pt", "history": "history.json",
                "curves": "curves.png"}


@dataclass
class TrainResult:
    history: list[EpochRecord]
    out: Path
    files: dict[str, Path]
    world_size: int = 1
    is_main: bool = True
    resumed_from_epoch: int = 0
    info: dict = field(default_factory=dict)

    @property
    def best(self) -> EpochRecord | None:
        return best_record(self.history)


def train_model(
    model: str | ResolvedModel, data: str | os.PathLike, out: str | os.PathLike, *,
    config: TrainConfig | None = None, mode: str | None = None, sampler: str | None = None,
    keep_first: int | None = None, density: int | None = None, edges: str | None = None,
    dilation: str | None = None, smoothness: float | None = None, blur_size: int | None = None,
    leaf_modules: Sequence[str] = (), weights: str = "DEFAULT",
    arch: str | None = None, num_classes: int | None = None, preprocessing: Mapping[str, Any] | None = None,
    trust_factory: bool = False, resume: str | os.PathLike | None = None, force: bool = False,
    workers: int = 2, device: str = "auto", on_start: Callable[[dict], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None, on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Resolve, convert and train ``model`` on ``data/train``, validating on ``data/val``.

    ``mode`` (default: the artifact's, else checkered; ``traditional`` trains the unconverted
    network), ``sampler``, ``keep_first``, ``density``, ``edges``, ``dilation``, ``smoothness``,
    ``blur_size`` and ``leaf_modules`` are ``ccnn-convert``'s (a diffstride model learns its
    strides: they are parameters, saved in the artifacts); the random sampler redraws on every training
    forward and its eval table is seeded with ``config.seed``. ``weights="none"`` trains from
    scratch; ``num_classes`` gives the model a new head. ``resume`` continues a run from its
    ``checkpoint.pt`` exactly, and may then replace the files in ``out``; otherwise existing
    files there need ``force``. Under torchrun, every process calls this; rank 0 writes.
    """
    config = config if config is not None else TrainConfig()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ParameterError("workers", f"{{param}} must be 0 or more, got {workers!r}")
    folder = check_output_dir(out, list(OUTPUT_FILES.values()), force=force or resume is not None)
    files = {key: folder / name for key, name in OUTPUT_FILES.items()}
    if mode is not None:  # before the slow part; an artifact's own mode is checked below
        check_options_used([mode], sampler=sampler, density=density, edges=edges, dilation=dilation,
                           smoothness=smoothness, blur_size=blur_size)
        if config.stride_penalty and mode != "diffstride":
            _refuse_stride_penalty(mode)
    state = load_training_state(resume) if resume is not None else None
    with distributed_from_env(device) as ctx:
        target = resolve_device(device, ctx.local_rank)
        resolved = _resolve(model, weights, arch, preprocessing, trust_factory)
        labels = _labels(resolved, class_folders(data), num_classes)
        spec = _conversion(mode, resolved, config, sampler=sampler, keep_first=keep_first, density=density,
                           edges=edges, dilation=dilation, smoothness=smoothness, blur_size=blur_size,
                           leaf_modules=leaf_modules)
        trained = _trained_record(resolved, labels)
        identity = _identity(trained, weights, spec, config)
        pre = trained.preprocessing
        converted = trained.converted(spec, pre.crop)  # a diffstride artifact's learned strides too
        train_set, val_set = training_sets(data, labels, pre, config)
        trainer = Trainer(converted, train_set, val_set, config, device=target, ctx=ctx, workers=workers,
                          on_step=on_step if ctx.is_main else None)
        if state is not None:
            check_identity(state["identity"], identity, resume)
            trainer.load_state_dict(state)
        info = {"model": trained.name, "conversion": spec.describe(), "mode": spec.mode, "device": str(target),
                "world_size": ctx.world_size, "rank": ctx.rank, "train_images": len(train_set),
                "val_images": len(val_set), "classes": labels.num_classes, "new_head": labels.new_head,
                "steps_per_epoch": len(trainer.batches), "epochs": config.epochs, "start_epoch": trainer.epoch}
        if on_start is not None and ctx.is_main:
            on_start(info)
        if labels.new_head and ctx.is_main and state is None:
            logger.info(f"new {labels.new_head}-class head: {trained.head.module}")
        start_epoch = trainer.epoch

        def finish_epoch(record: EpochRecord) -> None:
            training_state = trainer.state_dict()  # every process: RNG states are gathered
            if ctx.is_main:
                _write_epoch(files, trainer, trained, spec, identity, training_state, data)
            if on_epoch is not None and ctx.is_main:
                on_epoch(record)

        trainer.fit(finish_epoch)
        return TrainResult(trainer.history, folder, files, ctx.world_size, ctx.is_main, start_epoch, info)


def _resolve(model, weights, arch, preprocessing, trust_factory) -> ResolvedModel:
    overrides = {k: v for k, v in (preprocessing or {}).items() if v is not None}
    if isinstance(model, ResolvedModel):
        return dataclasses.replace(model, preprocessing=model.preprocessing.with_overrides(**overrides))
    return resolve_model(str(model), weights=weights, arch=arch, preprocessing=overrides or None,
                         trust_factory=trust_factory)


def _labels(resolved: ResolvedModel, folders: list[str], num_classes: int | None) -> ClassLabels:
    names = resolved.class_names
    if names is not None and num_classes is None and set(folders) == set(names):
        return ClassLabels(tuple(folders), names, None)  # an artifact trained on these classes
    return choose_labels(folders, resolved.num_classes, num_classes)


def _conversion(mode, resolved: ResolvedModel, config: TrainConfig, **options) -> ConversionSpec:
    base = resolved.conversion
    mode = mode or (base.mode if base is not None else "checkered")
    given = {k: v for k, v in options.items() if k != "leaf_modules"}
    check_options_used([mode], **given)  # an option that would do nothing is an error
    spec = ConversionSpec.build(mode, base, leaf_modules=options["leaf_modules"], **given)
    if config.stride_penalty and spec.mode != "diffstride":
        _refuse_stride_penalty(spec.mode)
    if spec.mode == "checkered" and spec.sampler == "random" and spec.seed is None:
        spec = dataclasses.replace(spec, seed=config.seed)  # the eval table, the same on every process
    return spec


def _refuse_stride_penalty(mode: str) -> None:
    raise ParameterError("stride_penalty", f"{{param}} penalises learned strides: mode diffstride only, not {mode}")


def _trained_record(resolved: ResolvedModel, labels: ClassLabels) -> ResolvedModel:
    """The record the artifacts describe: new head, class names; its model is trained in place."""
    head = resolved.head
    if labels.new_head is not None:
        head = replace_head(resolved.model, labels.new_head)
    return dataclasses.replace(resolved, head=head, class_names=labels.class_names,
                               num_classes=labels.num_classes)


def _identity(trained: ResolvedModel, weights: str, spec: ConversionSpec, config: TrainConfig) -> dict:
    """What must not change between a run and its resumption."""
    return {"model": trained.name, "architecture": dict(trained.spec), "weights": str(weights),
            "head": None if trained.head is None else trained.head.to_dict(),
            "classes": None if trained.class_names is None else list(trained.class_names),
            "conversion": spec.to_dict(), "preprocessing": trained.preprocessing.to_dict(),
            "recipe": {k: v for k, v in config.to_dict().items() if k not in ("checkpointing", "amp")}}


def _write_epoch(files: dict[str, Path], trainer: Trainer, trained: ResolvedModel, spec: ConversionSpec,
                 identity: dict, training_state: dict, data) -> None:
    files["state"].parent.mkdir(exist_ok=True)  # made at the first epoch's end, not for a run that fails early
    history = trainer.history
    record = history[-1]
    summary = {"epochs": record.epoch, "val_top1": record.val_top1, "val_top5": record.val_top5,
               "train_loss": record.train_loss, "data": str(data), "recipe": identity["recipe"],
               "from_weights": identity["weights"]}
    artifact = dataclasses.replace(trained, training=summary, conversion=spec,  # + learned strides
                                   conversion_state=conversion_state(trainer.model, trained.model) or None)
    save_artifact(files["last"], artifact, spec, force=True)
    if best_record(history) is record or record.val_top1 is None:  # ties keep the earlier best
        save_artifact(files["best"], artifact, spec, force=True)
    write_history(files["history"], history, {"model": trained.name, "conversion": spec.to_dict(),
                                              "recipe": identity["recipe"], "data": str(data)})
    plot_curves(files["curves"], history, f"{trained.name}, {spec.mode} ({spec.describe()})")
    save_training_state(files["state"], {"identity": identity, **training_state})
