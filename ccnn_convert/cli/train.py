"""ccnn-train: fine-tune or train a converted model on DIR/train, validating on DIR/val.

A thin typer front end over :func:`ccnn_convert.train.train_model`; all logic lives there.
Under torchrun (``torchrun --nproc-per-node N ccnn-train ...``) every process trains its share
of each global batch and rank 0 prints and writes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional

import typer
from rich import box
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from .._helpers import format_bytes
from ..errors import CCNNError
from ..train import EpochRecord, StepInfo, TrainConfig, TrainResult, train_model
from ..train.distill import PHC_TRAIN_PARAMS, TTA_SHIFT, DistillConfig, distill_recipe, recipe_mode, recipe_phc
from ._common import (blur_size_help, console, err_console, mode_names, parse_list, percent, phc_help, plain,
                      preprocessing_overrides, resample_at_help, run_app, smoothness_help, spectral_convention_help,
                      user_errors)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.splitlines()[0])


def epoch_line(record: EpochRecord, epochs: int, train_metric: str = "top-1") -> str:
    """One line per epoch: train loss and top-1, val loss, top-1 and top-5, speed, memory."""
    val = ("val -" if record.val_top1 is None else
           f"val loss {record.val_loss:.4f} top-1 {record.val_top1:.2f}% top-5 {record.val_top5:.2f}%")
    if record.val_agreement is not None:  # distillation: agreement with the teacher
        val = (val if record.val_top1 is not None else "val") + (
            f" agreement {record.val_agreement:.2f}% KL {record.val_kl:.4f}")
    skipped = f", {record.skipped} unreadable file(s) skipped" if record.skipped else ""
    return (f"epoch {record.epoch}/{epochs}: train loss {record.train_loss:.4f} {train_metric} {record.train_top1:.2f}% | "
            f"{val} | lr {record.lr:.3g} | {record.images_per_s:.1f} img/s, {record.seconds:.1f} s, "
            f"peak memory {format_bytes(record.peak_memory_bytes)}{skipped}")


def summary_table(result: TrainResult) -> Table:
    table = Table(title=plain(f"{result.info.get('model')}: {result.info.get('mode')} "
                              f"({result.info.get('conversion')})"), title_justify="left", box=box.SIMPLE_HEAD)
    distilled = bool(result.info.get("distill"))
    for name in ("", "epoch", "train loss", "val top-1", "val top-5", "img/s") + (("agreement", "KL") if distilled else ()):
        table.add_column(name, justify="left" if not name else "right")
    rows = [("last", result.history[-1])] if result.history else []
    untrained = result.info.get("untrained")
    if untrained is not None:  # distillation: the untrained conversion, measured before training
        rows.insert(0, ("untrained", EpochRecord(0, math.nan, math.nan, None, untrained["val_top1"], None, 0.0,
                                                 0.0, math.nan, None, val_agreement=untrained["val_agreement"],
                                                 val_kl=untrained["val_kl"])))
    if untrained is not None and untrained["kept_as_best"]:
        rows.append(("best: untrained", rows[0][1]))
    elif result.best is not None:
        rows.append(("best", result.best))
    for label, r in rows:
        extra = (percent(r.val_agreement), "-" if r.val_kl is None else f"{r.val_kl:.4f}") if distilled else ()
        trained = not math.isnan(r.train_loss)
        table.add_row(label, str(r.epoch), f"{r.train_loss:.4f}" if trained else "-", percent(r.val_top1),
                      percent(r.val_top5), f"{r.images_per_s:.1f}" if trained else "-", *extra)
    return table


@app.command()
@user_errors(flags={"leaf_modules": "--leaf"})
def train_command(
    model: str = typer.Argument(..., help="Model name (resnet50, efficientnet_lite0, ...), file.py:factory, a checkpoint with --arch, or a ccnn-convert/ccnn-train artifact."),
    data: Path = typer.Option(..., "--data", help="Folder with train/<class>/ and val/<class>/ images (wnid folders keep ImageNet's classes; other names get their own head); with --distill, also any folder of images."),
    out: Path = typer.Option(..., "--out", help="Folder for checkpoint.pt, last.pt, best.pt, history.json and curves.png (created if missing)."),
    mode: Optional[str] = typer.Option(None, "--mode", help=f"{mode_names(original=False)} (traditional: the network unconverted) [default: the artifact's, else checkered]."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Checkered sampler: naive | lattice | random (redrawn on every training forward) [default: lattice]."),
    keep_first: Optional[int] = typer.Option(None, "--keep-first", help="Keep the first N subsampling steps traditional [default: 0]."),
    density: Optional[int] = typer.Option(None, "--density", help="Checkered: samples per k x k window."),
    edges: Optional[str] = typer.Option(None, "--edges", help="Checkered edge rule: exact | reference [default: reference]."),
    dilation: Optional[str] = typer.Option(None, "--dilation", help="Dilated mode: native | multisample [default: native where possible]."),
    smoothness: Optional[float] = typer.Option(None, "--smoothness", help=smoothness_help()),
    blur_size: Optional[int] = typer.Option(None, "--blur-size", help=blur_size_help()),
    resample_at: Optional[str] = typer.Option(None, "--resample-at", help=resample_at_help()),
    spectral_convention: Optional[str] = typer.Option(None, "--spectral-convention", help=spectral_convention_help()),
    phc: Optional[int] = typer.Option(None, "--phc", metavar="N", help=phc_help()),
    stride_penalty: float = typer.Option(0.0, "--stride-penalty", help="Mode diffstride: add L x the cost the learned strides imply (the paper's complexity regulariser) to the loss."),
    leaf: Optional[List[str]] = typer.Option(None, "--leaf", help="Module class or qualified name not to trace into (repeatable)."),
    weights: str = typer.Option("DEFAULT", "--weights", help="Pretrained weights: DEFAULT, an enum name, a file, or none (train from scratch)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture when MODEL is a bare state dict."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Replace the classifier head with one of N classes (N = the number of class folders)."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Let an artifact built by a factory run that factory's code again."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help=f"Epochs to train [default: 10; with --distill: {distill_recipe('checkered')['epochs']}, the mode's recipe]."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global batch size (split over torchrun processes) [default: 64; with --distill: 16]."),
    optimizer: str = typer.Option("sgd", "--optimizer", help="sgd (with Nesterov momentum) | adamw."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate [default: 0.01 for sgd, 0.001 for adamw]."),
    momentum: Optional[float] = typer.Option(None, "--momentum", help="SGD momentum [default: 0.9]."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Weight decay, not applied to norm parameters and biases [default: 1e-4 for sgd, 0.05 for adamw]."),
    warmup_epochs: float = typer.Option(0.0, "--warmup-epochs", help="Linear warm-up (from 1% of --lr) before the cosine schedule."),
    label_smoothing: float = typer.Option(0.1, "--label-smoothing", help="Label smoothing of the cross-entropy loss."),
    augment: Optional[str] = typer.Option(None, "--augment", help="Per image: standard (random resized crop, 8-100% of the area, + flip) | strong (5-100%, + flip) | flip | none; optionally with a batch mix: mixup | cutmix, e.g. strong,mixup [default: standard; with --distill: strong,mixup]."),
    shift: int = typer.Option(0, "--shift", help="Also translate images randomly by up to N pixels (zero-padded)."),
    amp: bool = typer.Option(False, "--amp", help="Mixed precision: bfloat16 autocast on CPU, float16 with a grad scaler on CUDA."),
    checkpointing: bool = typer.Option(False, "--checkpointing", help="Recompute each block's activations in the backward pass (less memory, more time)."),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="BatchNorm statistics over all processes (CUDA under torchrun)."),
    seed: int = typer.Option(0, "--seed", help="Seed (0 to 2**32 - 1) for every draw: initial weights of a new head or of --weights none, shuffling, augmentation, the random sampler."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Override the model's preprocessing: shorter side resized to this."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Override: the crop size trained and validated at."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Override: normalisation mean, e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, "--std", help="Override: normalisation std."),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="Override: bilinear | bicubic | nearest."),
    workers: int = typer.Option(2, "--workers", help="Data-loading worker processes."),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | auto."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue exactly from a run's OUT/checkpoint.pt (same model, conversion and recipe)."),
    force: bool = typer.Option(False, "--force", help="Overwrite the files of an earlier run in --out."),
    train_params: Optional[str] = typer.Option(None, "--train-params", help=f"What trains: all | norm (normalisation layers) | head (the classifier) | norm+head | phc+norm+head (also the PHC layers' A, F and biases) [default: all; with --distill: norm+head, with --phc {PHC_TRAIN_PARAMS}]."),
    freeze_norm_stats: Optional[bool] = typer.Option(None, "--freeze-norm-stats/--no-freeze-norm-stats", help="Normalisation layers keep and use their running statistics while training (their affines still train): for a few hundred images [default: off; with --distill: on]."),
    distill: bool = typer.Option(False, "--distill", help="Learn from a teacher (MODEL unconverted and frozen, or --teacher) by temperature-scaled KL; --data may then be any folder of images."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="With --distill: another teacher (a MODEL or artifact with the same classes), or several, comma-separated: the mean of their softmaxes."),
    teacher_tta: Optional[str] = typer.Option(None, "--teacher-tta", help=f"With --distill: average the teacher's softmax over views of each image: flip (mirrored), shift (moved {TTA_SHIFT} px left, right, up, down), or flip,shift (10 views)."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="With --distill: the softmax temperature T (the loss is scaled by T^2) [default: 1]."),
    distill_weight: Optional[float] = typer.Option(None, "--distill-weight", help="With --distill and labels: weight a of the distillation loss, (1 - a) of the label loss [default: 1]."),
    recalibrate: Optional[str] = typer.Option(None, "--recalibrate", help="With --distill: which BatchNorms to re-estimate on the training images before training: auto (those whose input statistics the conversion changed, measured) | all | none [default: the mode's recipe: auto for checkered, none for the resampling modes]."),
    val_fraction: Optional[float] = typer.Option(None, "--val-fraction", help="With --distill on an unlabelled folder: the share held back to measure agreement [default: 0.1]."),
) -> None:
    """Train MODEL, converted, on DATA/train; validate each epoch on DATA/val; write artifacts to OUT."""
    recipe = recipe_defaults(distill, recipe_mode(model, mode) if distill else None,
                             recipe_phc(model, phc) if distill else None, epochs=epochs,
                             batch_size=batch_size, train_params=train_params, freeze_norm_stats=freeze_norm_stats,
                             augment=augment, recalibrate=recalibrate)
    recalibrate = recipe.pop("recalibrate", None)  # train_model's option, not TrainConfig's
    config = TrainConfig(optimizer=optimizer, lr=lr, momentum=momentum,
                         weight_decay=weight_decay, warmup_epochs=warmup_epochs, label_smoothing=label_smoothing,
                         shift=shift, amp=amp, checkpointing=checkpointing, sync_bn=sync_bn,
                         seed=seed, stride_penalty=stride_penalty, **recipe)
    options = dict(config=config, mode=mode, sampler=sampler, keep_first=keep_first, density=density, edges=edges,
                   dilation=dilation, smoothness=smoothness, blur_size=blur_size, resample_at=resample_at,
                   spectral_convention=spectral_convention,
                   recalibrate=recalibrate, phc=phc,
                   leaf_modules=tuple(leaf or ()),
                   weights=weights, arch=arch,
                   num_classes=num_classes, preprocessing=preprocessing_overrides(resize, crop, mean, std, interpolation),
                   trust_factory=trust_factory, resume=resume, force=force, workers=workers, device=device,
                   distill=distill_config(distill, teacher, temperature, distill_weight, val_fraction, teacher_tta))
    result = run_with_progress(model, data, out, **options)
    if not result.is_main:
        return
    console.print(summary_table(result))
    written = [str(p) for p in result.files.values() if p.exists()]  # best.pt may be missing after a resume
    console.print(Text(f"  wrote {', '.join(written)}"), soft_wrap=True)


def recipe_defaults(distill: bool, mode: str | None = None, phc: int | None = None, **given) -> dict:
    """The options given; those left unset take TrainConfig's defaults, or with --distill the
    distillation recipe of ``mode`` and ``phc`` (train.distill.DISTILL_RECIPES, distill_recipe)."""
    chosen = {k: v for k, v in given.items() if v is not None}
    return {**distill_recipe(mode or "checkered", phc), **chosen} if distill else chosen


def distill_config(distill: bool, teacher, temperature, weight, val_fraction, teacher_tta=None) -> DistillConfig | None:
    """--distill's options as a DistillConfig; given without --distill they would do nothing: an error."""
    given = {"--teacher": teacher, "--temperature": temperature, "--distill-weight": weight,
             "--val-fraction": val_fraction, "--teacher-tta": teacher_tta}
    if not distill:
        unused = [flag for flag, value in given.items() if value is not None]
        if unused:
            raise CCNNError(f"{', '.join(unused)} only apply with --distill")
        return None
    teachers = None if teacher is None else tuple(parse_list(teacher)) or teacher  # an empty list: DistillConfig says so
    views = None if teacher_tta is None else tuple(parse_list(teacher_tta)) or (teacher_tta,)
    chosen = {k: v for k, v in dict(teacher=teachers, temperature=temperature, weight=weight,
                                     val_fraction=val_fraction, teacher_tta=views).items() if v is not None}
    return DistillConfig(**chosen)


def run_with_progress(model: str, data: Path, out: Path, **options) -> TrainResult:
    """train_model with a rich progress bar (loss, learning rate, images/s, ETA) and one line per epoch."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TextColumn("lr {task.fields[lr]}"),
                        TextColumn("{task.fields[speed]} img/s"), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=err_console, transient=True)
    state: dict = {"task": None, "epochs": options["config"].epochs}

    def on_start(info: dict) -> None:
        where = f" on {info['world_size']} processes" if info["world_size"] > 1 else ""
        resumed = f", resuming after epoch {info['start_epoch']}" if info["start_epoch"] else ""
        if info.get("distill"):
            err_console.print(plain(f"distilling from {info['distill']['teacher']}", style="dim"), soft_wrap=True)
            if not info["distill"]["labelled"]:  # unlabelled: train "top-1" is agreement with the teacher
                state["train_metric"] = "agreement"
        err_console.print(plain(f"training {info['model']} ({info['mode']}: {info['conversion']}) on "
                               f"{info['train_images']} images, validating on {info['val_images']}, "
                               f"{info['classes']} classes, {info['device']}{where}{resumed}", style="dim"),
                          soft_wrap=True)
        state["steps"] = info["steps_per_epoch"]
        progress.start()

    def on_step(step: StepInfo) -> None:
        if state["task"] is None or step.step == 1:
            if state["task"] is not None:
                progress.remove_task(state["task"])
            state["task"] = progress.add_task(f"epoch {step.epoch + 1}/{state['epochs']}", total=step.steps,
                                              loss="-", lr="-", speed="-")
        task = progress.tasks[-1]
        speed = step.images / task.elapsed if task.elapsed else None
        progress.update(state["task"], completed=step.step, loss=f"{step.loss:.4f}", lr=f"{step.lr:.3g}",
                        speed="-" if speed is None else f"{speed:.1f}")

    def on_epoch(record: EpochRecord) -> None:
        console.print(Text(epoch_line(record, state["epochs"], state.get("train_metric", "top-1"))), soft_wrap=True)  # stdout, above the bar

    try:
        return train_model(model, data, out, on_start=on_start, on_step=on_step, on_epoch=on_epoch, **options)
    finally:
        if progress.live.is_started:
            progress.stop()


def main() -> None:
    run_app(app, runs_models=True)


if __name__ == "__main__":
    main()
