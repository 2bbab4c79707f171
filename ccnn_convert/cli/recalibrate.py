"""ccnn-recalibrate: re-estimate a converted model's BatchNorm statistics on unlabelled images.

A thin typer front end over :func:`ccnn_convert.train.calibrate.recalibrate_model`: no gradient,
no label, one artifact out (which ccnn-eval, ccnn-export, ccnn-bench and ccnn-train take).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.text import Text

from ..train.calibrate import recalibrate_model
from ._common import (console, mode_names, phc_help, plain, preprocessing_overrides, resample_at_help, run_app,
                      spectral_convention_help, user_errors)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, help=__doc__.splitlines()[0])


@app.command()
@user_errors(flags={"leaf_modules": "--leaf"})
def recalibrate_command(
    model: str = typer.Argument(..., help="Model name (resnet50, efficientnet_lite0, ...), file.py:factory, a checkpoint with --arch, or an artifact."),
    data: Path = typer.Option(..., "--data", help="A folder of images in any layout (found recursively), or DIR with train/<class>/ (its train/ images are used)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to save the artifact (.pt)."),
    images: int = typer.Option(..., "--images", help="How many images to recalibrate on (picked with --seed)."),
    mode: Optional[str] = typer.Option(None, "--mode", help=f"{mode_names(original=False)} [default: the artifact's, else checkered]."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Checkered sampler: naive | lattice | random [default: lattice]."),
    keep_first: Optional[int] = typer.Option(None, "--keep-first", help="Keep the first N subsampling steps traditional [default: 0]."),
    density: Optional[int] = typer.Option(None, "--density", help="Checkered: samples per k x k window."),
    edges: Optional[str] = typer.Option(None, "--edges", help="Checkered edge rule: exact | reference [default: reference]."),
    dilation: Optional[str] = typer.Option(None, "--dilation", help="Dilated mode: native | multisample [default: native where possible]."),
    resample_at: Optional[str] = typer.Option(None, "--resample-at", help=resample_at_help()),
    phc: Optional[int] = typer.Option(None, "--phc", metavar="N", help=phc_help()),
    spectral_convention: Optional[str] = typer.Option(None, "--spectral-convention", help=spectral_convention_help()),
    leaf: Optional[List[str]] = typer.Option(None, "--leaf", help="Module class or qualified name not to trace into (repeatable)."),
    weights: str = typer.Option("DEFAULT", "--weights", help="Pretrained weights: DEFAULT, an enum name, or a file."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture when MODEL is a bare state dict."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Let an artifact built by a factory run that factory's code again."),
    recalibrate: Optional[str] = typer.Option(None, "--recalibrate", help="Which BatchNorms to re-estimate: auto (those whose input statistics the conversion changed, measured on the same images; the rest keep theirs) | all | none [default: auto]."),
    layers: Optional[str] = typer.Option(None, "--layers", help="The older choice: all | converted (those after the first converted step, by shapes); not with --recalibrate."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass (each batch's statistics count equally)."),
    seed: int = typer.Option(0, "--seed", help="Seed for picking the images (and a random sampler's eval table)."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Override the model's preprocessing: shorter side resized to this."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Override: the crop size."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Override: normalisation mean, e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, "--std", help="Override: normalisation std."),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="Override: bilinear | bicubic | nearest."),
    workers: int = typer.Option(2, "--workers", help="Data-loading worker processes."),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | auto."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
) -> None:
    """Convert MODEL, re-estimate the BatchNorm running statistics the conversion changed over N images of DATA, save an artifact."""
    summary = recalibrate_model(model, data, output, images=images, mode=mode, sampler=sampler, keep_first=keep_first,
                                density=density, edges=edges, dilation=dilation, resample_at=resample_at, phc=phc, seed=seed,
                                spectral_convention=spectral_convention,
                                leaf_modules=tuple(leaf or ()), weights=weights, arch=arch,
                                preprocessing=preprocessing_overrides(resize, crop, mean, std, interpolation),
                                trust_factory=trust_factory, batch_size=batch_size, recalibrate=recalibrate, layers=layers, workers=workers, device=device,
                                force=force)
    skipped = f" ({summary['skipped']} unreadable file(s) skipped)" if summary["skipped"] else ""
    console.print(Text.assemble(f"recalibrated the BatchNorm statistics ({summary['layers']}) on {summary['images']} "
                                f"images{skipped}; saved ", plain(output, "bold")), soft_wrap=True)


def main() -> None:
    run_app(app, runs_models=True)


if __name__ == "__main__":
    main()
