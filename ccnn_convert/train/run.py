"""MODEL + DIR -> a trained converted model: the Python API behind ``ccnn-train``.

:func:`train_model` resolves MODEL as every command does, gives it a new head when the data's
classes ask for one, converts it (the options of ``ccnn-convert``), trains it with a
:class:`~.loop.Trainer` and, after every epoch, writes under ``out``:

``checkpoint.pt``  the training state (:mod:`.resume`; continue with ``resume=``)
``last.pt``, ``best.pt``  artifacts of the last epoch and of the best val top-1, which
                   ``ccnn-eval``, ``ccnn-export`` and ``ccnn-bench`` take as MODEL
``history.json``, ``curves.png``  the epochs so far

An epoch's five files are one unit: they are written into a hidden staging folder in ``out``,
then renamed into place with ``checkpoint.pt`` last, while SIGINT and SIGTERM wait (a few
renames). A run stopped at any moment leaves the previous epoch's whole set or the new one,
and ``checkpoint.pt`` says which epoch the folder holds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .._helpers import first_line
from ..core.diffstride import diffstride_layers
from ..errors import CCNNError, ModelParameterError, ModelResolutionError, ParameterError
from ..models import ResolvedModel, conversion_state, replace_head, resolve_model, save_artifact
from ..models.checkpoints import safe_load
from ..outputs import check_output_dir
from ..runtime import distributed_from_env, resolve_device
from ..core.phc import check_phc
from ..spec import ConversionSpec, check_options_used
from .calibrate import check_recalibrate, recalibrate_before_training
from .data import ClassLabels, choose_labels, class_folders, training_sets
from .distill import (DistillConfig, DistillTrainer, HeldBackScore, build_teacher, check_distill_options,
                      check_teacher_classes, distill_recipe, untrained_is_better)
from .history import plot_curves, write_history
from .loop import EpochRecord, StepInfo, Trainer, best_record
from .recipe import TrainConfig, lr_factor
from .resume import check_identity, check_training_state, load_training_state, save_training_state
from .unlabelled import is_labelled_layout, unlabelled_sets

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
    resample_at: str | None = None, spectral_convention: str | None = None, recalibrate: str | None = None,
    phc: int | None = None,
    leaf_modules: Sequence[str] = (), weights: str = "DEFAULT",
    arch: str | None = None, num_classes: int | None = None, preprocessing: Mapping[str, Any] | None = None,
    trust_factory: bool = False, resume: str | os.PathLike | None = None, force: bool = False,
    workers: int = 2, device: str = "auto", on_start: Callable[[dict], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None, on_epoch: Callable[[EpochRecord], None] | None = None,
    distill: DistillConfig | None = None,
) -> TrainResult:
    """Resolve, convert and train ``model`` on ``data/train``, validating on ``data/val``.

    ``mode`` (default: the artifact's, else checkered; ``traditional`` trains the unconverted
    network), ``sampler``, ``keep_first``, ``density``, ``edges``, ``dilation``, ``smoothness``,
    ``blur_size``, ``resample_at``, ``spectral_convention``, ``phc`` and ``leaf_modules`` are
    ``ccnn-convert``'s (a diffstride model learns its
    strides: they are parameters, saved in the artifacts); the random sampler redraws on every training
    forward and its eval table is seeded with ``config.seed``. ``weights="none"`` trains from
    scratch; ``num_classes`` gives the model a new head. ``resume`` continues a run from its
    ``checkpoint.pt`` exactly, and may then replace the files in ``out``; otherwise existing
    files there need ``force``. ``distill`` trains against a teacher (:mod:`.distill`); ``data``
    may then be any folder of images. ``recalibrate`` (distillation only; default: the mode's recipe, :func:`~.distill.distill_recipe`) first
    re-estimates the BatchNorms whose input statistics the conversion changed
    (:func:`~.calibrate.recalibrate_before_training`); ``all``, every one; ``none``, none. Under torchrun, every process calls this; rank 0 writes.
    """
    config = config if config is not None else TrainConfig()
    _check_recalibration(recalibrate, distill)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ParameterError("workers", f"{{param}} must be 0 or more, got {workers!r}")
    if phc is not None:
        check_phc(phc)  # before the slow part
    folder = _check_out(out, resume, force)
    files = {key: folder / name for key, name in OUTPUT_FILES.items()}
    if mode is not None:  # before the slow part; an artifact's own mode is checked below
        check_options_used([mode], sampler=sampler, density=density, edges=edges, dilation=dilation,
                           smoothness=smoothness, blur_size=blur_size, resample_at=resample_at,
                           spectral_convention=spectral_convention, phc=phc)
        if config.stride_penalty and mode != "diffstride":
            _refuse_stride_penalty(mode)
    state = load_training_state(_resume_path(resume)) if resume is not None else None
    resume_folder = None if resume is None else Path(resume).expanduser().resolve().parent
    _seed_everything(config.seed)  # before the first draw: a new head, --weights none, a factory's init
    with distributed_from_env(device) as ctx:
        target = resolve_device(device, ctx.local_rank)
        resolved = _resolve(model, weights, arch, preprocessing, trust_factory)
        labelled = distill is None or is_labelled_layout(data)  # distillation also takes any folder of images
        if distill is not None:
            check_distill_options(distill, labelled, num_classes)
            teacher = build_teacher(distill, resolved, trust_factory=trust_factory)  # before training moves the weights
        labels = _labels(resolved, class_folders(data), num_classes) if labelled else None
        spec = _conversion(mode, resolved, config, sampler=sampler, keep_first=keep_first, density=density,
                           edges=edges, dilation=dilation, smoothness=smoothness, blur_size=blur_size,
                           resample_at=resample_at, spectral_convention=spectral_convention, phc=phc,
                           leaf_modules=leaf_modules)
        trained = _trained_record(resolved, labels, num_classes) if labels is not None else resolved
        identity = _identity(trained, weights, spec, config)
        if distill is not None:
            _check_default_teacher_classes(distill, teacher, trained)
            check_teacher_classes(teacher, trained.num_classes)
            identity["distill"] = {**distill.to_dict(), "teacher": teacher.name, "labelled": labelled}
        pre = trained.preprocessing
        converted = trained.converted(spec, pre.crop)  # a diffstride artifact's learned strides too
        if labels is not None:
            train_set, val_set = training_sets(data, labels, pre, config)
        else:
            train_set, val_set = unlabelled_sets(data, pre, config, distill.held_back)
        recalibrated = None
        rule = _recalibration_rule(recalibrate, distill, spec.mode)
        if rule is not None and state is None:  # (a resumed run's statistics are in its state)
            recalibrated = recalibrate_before_training(trained.model.to(target), converted.to(target),
                                                       [p for p, _ in train_set.samples], pre.transform(), rule, target)
            logger.info("recalibrated %d of %d BatchNorm layers (%s) on %d training images", recalibrated["layers"],
                        recalibrated["of"], rule, recalibrated["images"])
        make_trainer = Trainer if distill is None else functools.partial(
            DistillTrainer, teacher=teacher, distill=distill, labelled=labelled)
        trainer = make_trainer(converted, train_set, val_set, config, device=target, ctx=ctx, workers=workers,
                               on_step=on_step if ctx.is_main else None)
        untrained = _Untrained.measure(trainer) if distill is not None else None  # before a state loads
        if state is not None:
            _load_state(trainer, state, identity, resume)
            if ctx.is_main and resume_folder == folder.resolve():
                _note_unfinished_epoch(folder, trainer.epoch)
        info = {"model": trained.name, "conversion": spec.describe(), "mode": spec.mode, "device": str(target),
                "world_size": ctx.world_size, "rank": ctx.rank, "train_images": len(train_set),
                "val_images": len(val_set) if val_set is not None else 0, "classes": trained.num_classes,
                "new_head": labels.new_head if labels is not None else None, "distill": identity.get("distill"),
                "recalibrated": recalibrated,
                "steps_per_epoch": len(trainer.batches), "epochs": config.epochs, "start_epoch": trainer.epoch}
        if on_start is not None and ctx.is_main:
            on_start(info)
        if labels is not None and labels.new_head and ctx.is_main and state is None:
            logger.info(f"new {labels.new_head}-class head: {trained.head.module}")
        start_epoch = trainer.epoch
        # Until this run writes its first epoch here, a best.pt in a folder other than the resumed
        # one belongs to another run (--force): it is replaced by the resumed run's, or removed.
        foreign_best = {"source": None if resume_folder in (None, folder.resolve())
                        else resume_folder / OUTPUT_FILES["best"]}

        def finish_epoch(record: EpochRecord) -> None:
            training_state = trainer.state_dict()  # every process: RNG states are gathered
            if ctx.is_main:
                _write_epoch(folder, trainer, trained, spec, identity, training_state, data, foreign_best["source"],
                             untrained)
                foreign_best["source"] = None  # the folder's best.pt is this run's now
            if on_epoch is not None and ctx.is_main:
                on_epoch(record)

        try:
            trainer.fit(finish_epoch)
        finally:
            trainer.close()  # before distributed_from_env destroys the process group
        if untrained is not None:
            info["untrained"] = untrained.report(trainer.history, ctx.is_main)
        return TrainResult(trainer.history, folder, files, ctx.world_size, ctx.is_main, start_epoch, info)


def _check_default_teacher_classes(distill, teacher, trained: ResolvedModel) -> None:
    """No teacher was named: the mismatch is the student's new head's, and naming a teacher fixes it."""
    if distill.teacher is None and teacher.num_classes != trained.num_classes:
        raise ParameterError("teacher", f"the default teacher, {teacher.name}, has {teacher.num_classes} classes and "
                                        f"the student {trained.num_classes} (a new head): name a teacher with the "
                                        "student's classes with {param}")


def _check_recalibration(recalibrate: str | None, distill: DistillConfig | None) -> None:
    """``recalibrate`` is a rule, and given only with a distillation (checked before the slow part)."""
    if recalibrate is None:
        return
    if distill is None:
        raise ParameterError("recalibrate", "{param} re-estimates statistics before a distillation; "
                                            "it only applies with distill")
    check_recalibrate(recalibrate)


def _recalibration_rule(recalibrate: str | None, distill: DistillConfig | None, mode: str) -> str | None:
    """The rule that picks the norms to re-estimate before distilling: the one given, else the
    mode's distillation recipe's (None: no recalibration)."""
    if distill is None:
        return None
    rule = recalibrate if recalibrate is not None else distill_recipe(mode)["recalibrate"]
    return None if rule == "none" else rule


def _seed_everything(seed: int) -> None:
    """Seed every generator a run draws from (torch, numpy, Python's) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_out(out, resume, force: bool) -> Path:
    """The output folder, checked before any work. A resume may replace the files of the folder
    its checkpoint came from; any other folder's files need ``force``, as for a new run."""
    folder = Path(out).expanduser()
    own_folder = resume is not None and folder.resolve() == Path(resume).expanduser().resolve().parent
    if folder.is_dir() and not (force or own_folder):
        present = [name for name in OUTPUT_FILES.values() if (folder / name).exists()]
        if present and OUTPUT_FILES["state"] not in present:
            raise ParameterError("force", f"{folder} holds {', '.join(present)} but no checkpoint.pt (a run stopped "
                                          "before its first epoch was saved): nothing to resume; start over with {param}")
        if present:
            raise ParameterError("force", f"{folder} holds another run (checkpoint.pt); continue it with "
                                          f"{{param:resume}} {folder / OUTPUT_FILES['state']}, or replace it with "
                                          "{param}", also=("resume",))
    return check_output_dir(folder, list(OUTPUT_FILES.values()), force=force or own_folder, parents=True)


def _resume_path(resume) -> Path:
    """``resume``, or one line on what its folder holds when the checkpoint is not there."""
    path = Path(resume).expanduser()
    if not path.exists() and path.name == OUTPUT_FILES["state"] and path.parent.is_dir():
        present = [name for name in OUTPUT_FILES.values() if (path.parent / name).exists()]
        if present:
            raise ParameterError("force", f"cannot resume: {path.parent} holds {', '.join(present)} but no "
                                          "checkpoint.pt (a run stopped before its first epoch was saved); start it "
                                          "over, without resuming, with {param}")
    return path


def _load_state(trainer: Trainer, state: dict, identity: dict, path) -> None:
    """Check a loaded training state against this run, entry by entry, then restore it."""
    check_identity(_as_recorded_now(state["identity"]), identity, path)
    steps = len(trainer.batches)
    check_training_state(state, path, model_state=trainer.model.state_dict(),
                         param_group_sizes=[len(g["params"]) for g in trainer.optimizer.param_groups],
                         epochs=trainer.config.epochs, steps_per_epoch=steps,
                         record_fields=dataclasses.fields(EpochRecord),
                         fresh_optimizer=trainer.optimizer.state_dict(), fresh_scheduler=trainer.scheduler.state_dict(),
                         param_shapes=[tuple(p.shape) for g in trainer.optimizer.param_groups for p in g["params"]],
                         lr_factor=lambda step: lr_factor(trainer.config, steps, step),
                         strides=tuple(f"{name}.strides" for name, _ in diffstride_layers(trainer.model)))
    try:
        trainer.load_state_dict(state)
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:  # what the checks cannot see
        raise CCNNError(f"cannot resume from {path}: {first_line(exc, 200)}") from None


def _as_recorded_now(saved: dict) -> dict:
    """A checkpoint's identity with its conversion read as an artifact's is: a field it was saved
    without (``spectral_convention``, ``resample_at``) is what that conversion was built with."""
    conversion = saved.get("conversion")
    try:
        return {**saved, "conversion": ConversionSpec.from_dict(conversion).to_dict()}
    except (CCNNError, TypeError, ValueError):
        return saved  # check_identity names what differs


def _note_unfinished_epoch(folder: Path, epoch: int) -> None:
    """One line when the folder's other files are not checkpoint.pt's epoch (a hard kill while an
    epoch was renamed into place): checkpoint.pt decides, and they are replaced."""
    try:
        recorded = len(json.loads((folder / OUTPUT_FILES["history"]).read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    missing = [name for name in OUTPUT_FILES.values() if not (folder / name).exists()]
    if recorded != epoch or missing:
        logger.warning(f"{folder} holds a partial set of files beside checkpoint.pt; resuming from its whole "
                       f"epoch {epoch}, whose files the next epoch replaces")


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


def _trained_record(resolved: ResolvedModel, labels: ClassLabels, num_classes: int | None) -> ResolvedModel:
    """The record the artifacts describe: new head, class names; its model is trained in place."""
    head = resolved.head
    if labels.new_head is not None:
        try:
            head = replace_head(resolved.model, labels.new_head)
        except ModelParameterError:
            if num_classes is not None:
                raise
            raise ModelResolutionError(  # the head was the data's idea, not a flag's
                f"{resolved.name} has {resolved.num_classes} outputs and no nn.Linear classifier to replace, so it "
                f"cannot learn the data's own {labels.new_head} classes"
                + (" (name the class folders by ImageNet wnid)" if resolved.num_classes == 1000 else "")) from None
    return dataclasses.replace(resolved, head=head, class_names=labels.class_names,
                               num_classes=labels.num_classes)


def _identity(trained: ResolvedModel, weights: str, spec: ConversionSpec, config: TrainConfig) -> dict:
    """What must not change between a run and its resumption."""
    return {"model": trained.name, "architecture": dict(trained.spec), "weights": str(weights),
            "head": None if trained.head is None else trained.head.to_dict(),
            "classes": None if trained.class_names is None else list(trained.class_names),
            "conversion": spec.to_dict(), "preprocessing": trained.preprocessing.to_dict(),
            "recipe": {k: v for k, v in config.to_dict().items() if k not in ("checkpointing", "amp")}}


class _Untrained:
    """The untrained conversion of a distillation: its held-back score and its state, kept so
    that best.pt is the untrained conversion while no epoch beats it."""

    def __init__(self, score: HeldBackScore | None, state: dict[str, torch.Tensor]):
        self.score, self.state = score, state

    @classmethod
    def measure(cls, trainer: DistillTrainer) -> "_Untrained":
        score = trainer.held_back_score()
        if score is None and trainer.ctx.is_main:
            logger.info("no held-back images: the result is not compared with the untrained conversion")
        state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()} if score is not None else {}
        return cls(score, state)

    def beats(self, history: list[EpochRecord]) -> bool:
        return untrained_is_better(self.score, best_record(history))

    @contextlib.contextmanager
    def loaded(self, model: torch.nn.Module):
        """``model`` (which shares its tensors with the record being saved) holds the untrained state meanwhile."""
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.state)
        try:
            yield
        finally:
            model.load_state_dict(current)

    def report(self, history: list[EpochRecord], is_main: bool) -> dict | None:
        """The untrained conversion's scores beside the result's; warns when it is kept as best.pt."""
        if self.score is None:
            return None
        kept = self.beats(history)
        best = best_record(history)
        if kept and is_main:
            how = ("scores lower" if best.val_top1 is not None and self.score.top1 is not None
                   and best.val_top1 < self.score.top1 else "agrees less with the teacher"
                   if best.val_agreement < self.score.agreement else "agrees as often, with a higher KL,")
            logger.warning(f"the trained model {how} on the held-back images than the untrained conversion (best "
                           f"epoch {best.epoch}: {_scores(best.val_top1, best.val_agreement, best.val_kl)}; untrained: "
                           f"{_scores(self.score.top1, self.score.agreement, self.score.kl)}): best.pt is the "
                           "untrained conversion")
        return {**self.score.to_dict(), "kept_as_best": kept}


def _scores(top1: float | None, agreement: float, kl: float) -> str:
    return (f"top-1 {top1:.2f}%, " if top1 is not None else "") + f"agreement {agreement:.2f}%, KL {kl:.4g}"


def _write_epoch(folder: Path, trainer: Trainer, trained: ResolvedModel, spec: ConversionSpec, identity: dict,
                 training_state: dict, data, best_source: Path | None, untrained: _Untrained | None = None) -> None:
    """Write an epoch's files as one unit: into a staging folder, then renamed into ``folder``
    with checkpoint.pt last (signals wait during the renames). ``best_source`` is the best.pt of
    the run resumed from another folder, while ``folder``'s best.pt is not this run's: it is copied
    in its place, or, when it is not the best epoch's, the foreign best.pt is removed. ``untrained``:
    a distillation's untrained conversion, best.pt while it beats every epoch."""
    folder.mkdir(parents=True, exist_ok=True)  # made at the first epoch's end, not for a run that fails early
    for stale in folder.glob(".epoch.*.staging"):  # left by a hard kill (SIGKILL, power loss); only ever ours
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".epoch.", suffix=".staging", dir=folder))
    try:
        staged = {key: staging / name for key, name in OUTPUT_FILES.items()}
        history = trainer.history
        record = history[-1]
        summary = {"epochs": record.epoch, "val_top1": record.val_top1, "val_top5": record.val_top5,
                   "train_loss": record.train_loss, "data": str(data), "recipe": identity["recipe"],
                   "from_weights": identity["weights"], "images": len(trainer.train_set)}
        if "distill" in identity:
            summary.update(distilled_from=identity["distill"], val_agreement=record.val_agreement,
                           val_kl=record.val_kl)
        artifact = dataclasses.replace(trained, training=summary, conversion=spec,  # + learned strides
                                       conversion_state=conversion_state(trainer.model, trained.model) or None)
        save_artifact(staged["last"], artifact, spec)
        best = best_record(history)
        if untrained is not None and untrained.beats(history):
            with untrained.loaded(trainer.model):
                save_artifact(staged["best"], dataclasses.replace(
                    trained, training={**summary, "epochs": 0, "untrained": True, **untrained.score.to_dict()},
                    conversion=spec, conversion_state=conversion_state(trainer.model, trained.model) or None), spec)
        elif best is None or best is record:  # ties keep the earlier best
            save_artifact(staged["best"], artifact, spec)
        elif best_source is not None or not (folder / OUTPUT_FILES["best"]).exists():
            _copy_best(best_source, best.epoch, staged["best"])
        write_history(staged["history"], history, {"model": trained.name, "conversion": spec.to_dict(),
                                                   "recipe": identity["recipe"], "data": str(data)})
        plot_curves(staged["curves"], history, f"{trained.name}, {spec.mode} ({spec.describe()})")
        save_training_state(staged["state"], {"identity": identity, **training_state})
        with _signals_held():
            if best_source is not None and not staged["best"].exists():  # another run's: not this run's best
                (folder / OUTPUT_FILES["best"]).unlink(missing_ok=True)
            for key in sorted(staged, key=lambda k: k == "state"):  # checkpoint.pt last: it vouches for the rest
                if staged[key].exists():
                    os.replace(staged[key], folder / OUTPUT_FILES[key])
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _copy_best(source: Path | None, epoch: int, target: Path) -> None:
    """The resumed run's best.pt, when it is the artifact of the best epoch so far."""
    try:
        saved = safe_load(source) if source is not None and source.is_file() else None
    except CCNNError:
        saved = None
    training = saved.get("training") if isinstance(saved, dict) else None
    if isinstance(training, dict) and training.get("epochs") == epoch and type(training.get("epochs")) is int:
        shutil.copyfile(source, target)
    else:
        logger.warning(f"no best.pt of epoch {epoch} next to the resumed checkpoint: best.pt will be written "
                       "when an epoch beats it")


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM for the duration (a few renames), then deliver them."""
    kinds = (signal.SIGINT, signal.SIGTERM)
    previous = {kind: signal.getsignal(kind) for kind in kinds} if threading.current_thread() is threading.main_thread() else {}
    if not previous or any(handler is None for handler in previous.values()):
        yield  # not the main thread, or handlers set outside Python: nothing to hold
        return
    caught: list[int] = []
    for kind in kinds:
        signal.signal(kind, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for kind, handler in previous.items():
            signal.signal(kind, handler)
        if caught:
            signal.raise_signal(caught[0])
