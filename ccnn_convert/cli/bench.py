"""ccnn-bench: time, peak memory, FLOPs and parameters of models and their conversions, as ratios.

A thin typer front end over :mod:`ccnn_convert.bench`; all logic lives there.
"""

from __future__ import annotations

import shlex
import sys
from typing import List, Optional

import typer
from rich import box
from rich.table import Table

from ..bench import (BenchOptions, BenchReport, TimingOptions, Top1Options, describe_settings, output_names,
                     run_bench, table_rows, write_outputs)
from ..errors import CCNNError, ParameterError
from ..core.options import check_seed
from ..models.preprocessing import check_image_side
from ..outputs import check_output_dir
from ._common import (blur_size_help, console, mode_names, parse_list, phc_help, plain, resample_at_help, run_app,
                      smoothness_help, spectral_convention_help, user_errors)

app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])

# Library parameters whose flag is not their own name.
_FLAGS = {"image_size": "--size", "leaf_modules": "--leaf", "models": "MODELS"}


_WRAPPING = ("time/batch", "ORT time/batch")  # "not run (why)", "cannot export: why"


def results_table(report: BenchReport) -> Table:
    table = Table(title="cost per batch (x = relative to the original)", title_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False)
    headers, rows = table_rows(report.measurements)
    for index, name in enumerate(headers):
        wraps = name in _WRAPPING  # their cells may hold a reason; the numbers still fit on one line
        table.add_column(name, justify="left" if index < 2 else "right", no_wrap=not wraps,
                         min_width=len("999.9 ms") if wraps else None)
    for row in rows:
        table.add_row(*(plain(cell) for cell in row))
    return table


@app.command()
@user_errors(flags=_FLAGS)
def bench_command(
    models: List[str] = typer.Argument(..., help="Model names (resnet50, efficientnet_lite0, ...), factories or checkpoints."),
    modes: str = typer.Option("original,checkered,dilated", "--modes", help=f"Comma list of {mode_names()} (original is always measured: ratios are taken against it)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Images per timed batch."),
    size: Optional[int] = typer.Option(None, "--size", help="Input side in pixels [default: the model's crop size]."),
    device: str = typer.Option("auto", "--device", help="cpu|cuda|auto."),
    repeats: int = typer.Option(5, "--repeats", help="Timed passes per variant (the median is reported)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed passes per variant before timing (the peak-memory pass counts as one)."),
    keep_first: Optional[int] = typer.Option(None, "--keep-first", help="Leave the first N subsampling steps traditional [default: an artifact's, else 0]."),
    sweep: bool = typer.Option(False, "--sweep-keep-first", help="Also measure keep_first = N+1 .. all steps (cost vs top-1)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Checkered sampler: naive|lattice|random [default: an artifact's, else lattice]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the random sampler [default: 0]."),
    edges: Optional[str] = typer.Option(None, "--edges", help="Checkered edge rule: exact|reference [default: an artifact's, else reference; dilated is always exact]."),
    dilation: Optional[str] = typer.Option(None, "--dilation", help="How dilated mode is computed: multisample|native [default: an artifact's, else native where a dilation can express the model, else multisample]."),
    smoothness: Optional[float] = typer.Option(None, "--smoothness", help=smoothness_help()),
    blur_size: Optional[int] = typer.Option(None, "--blur-size", help=blur_size_help()),
    resample_at: Optional[str] = typer.Option(None, "--resample-at", help=resample_at_help()),
    spectral_convention: Optional[str] = typer.Option(None, "--spectral-convention", help=spectral_convention_help()),
    phc: Optional[int] = typer.Option(None, "--phc", metavar="N", help=phc_help()),
    leaf: List[str] = typer.Option([], "--leaf", help="Module class or qualified name not to trace into (repeatable)."),
    weights: str = typer.Option("DEFAULT", "--weights", help="Weights: DEFAULT, a torchvision enum name, none (random; fine for timing) or a file."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Let an artifact rebuild its model by running the factory it names."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak memory (one extra profiled pass per variant)."),
    onnx: bool = typer.Option(False, "--onnx", help="Also export every variant to ONNX and time it in ONNX Runtime (CPU provider): the deployed cost. One export per variant, so off by default."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Skip variants estimated (original time x FLOP ratio) to take longer per batch."),
    data: Optional[str] = typer.Option(None, "--data", help="Also measure top-1 on this image folder (<wnid>/<image>, or flat with --labels)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Labels for a flat --data folder."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Top-1 on N images, round-robin over classes."),
    eval_batch_size: int = typer.Option(32, "--eval-batch-size", help="Batch size for the top-1 pass."),
    workers: int = typer.Option(0, "--workers", help="Data-loading worker processes for the top-1 pass."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch.set_num_threads (CPU)."),
    out: Optional[str] = typer.Option(None, "--out", help="Write bench.json, bench.md, time_ratio.png (and sweep.png) to this folder."),
    force: bool = typer.Option(False, "--force", help="Overwrite files already in the --out folder."),
) -> None:
    """Measure MODEL... in every mode: variants are interleaved so machine drift cancels in the ratios."""
    if seed is not None:
        check_seed(seed)
    if size is not None:  # before anything is allocated
        check_image_side(size, "image_size")
        if batch_size > 0:
            from ..runtime import check_fits_in_memory

            check_fits_in_memory(4 * 3 * size * size * batch_size, f"a batch of {batch_size} {size}x{size} images",
                                 "batch_size")
    timing = TimingOptions(batch_size=batch_size, repeats=repeats, warmup=warmup, memory=memory,
                           max_seconds=max_seconds, onnx=onnx)
    options = BenchOptions(modes=tuple(parse_list(modes)), sampler=sampler, keep_first=keep_first, seed=seed,
                           leaf_modules=tuple(leaf), edges=edges, dilation=dilation, smoothness=smoothness,
                           blur_size=blur_size, resample_at=resample_at,
                           spectral_convention=spectral_convention, phc=phc, sweep=sweep,
                           image_size=size, device=device, weights=weights,
                           trust_factory=trust_factory, timing=timing)
    top1 = _top1_options(data, labels, limit, eval_batch_size, workers)
    if out is not None:  # before any slow work
        check_output_dir(out, output_names(sweep or bool(keep_first)), force=force)
    elif force:
        raise ParameterError("force", "{param} does nothing without --out")
    if threads is not None:
        if threads < 1:
            raise CCNNError("--threads must be positive")
        import torch

        torch.set_num_threads(threads)
    command = shlex.join(["ccnn-bench", *sys.argv[1:]]) if sys.argv and "bench" in sys.argv[0] else None
    report = run_bench(models, options, top1, command=command)
    console.print(results_table(report))
    for key, value in describe_settings(report.settings).items():
        console.print(plain(f"  {key}: {value}"), soft_wrap=True)
    if out is not None:
        for path in write_outputs(report, out, force=force):
            console.print(plain(f"  wrote {path}"), soft_wrap=True)


def _top1_options(data: Optional[str], labels: Optional[str], limit: Optional[int], eval_batch_size: int,
                  workers: int) -> Optional[Top1Options]:
    """Top-1 options with --data; the top-1 flags without it would do nothing, so they are refused."""
    if data is not None:
        return Top1Options(data, labels=labels, limit=limit, batch_size=eval_batch_size, workers=workers)
    for flag, value in (("--labels", labels), ("--limit", limit)):
        if value is not None:
            raise CCNNError(f"{flag} only applies to the top-1 pass; give --data too")
    return None


def main() -> None:
    run_app(app, runs_models=True)


if __name__ == "__main__":
    main()

