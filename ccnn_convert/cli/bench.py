"""ccnn-bench: time, peak memory, FLOPs and parameters of models and their conversions, as ratios.

A thin typer front end over :mod:`ccnn_convert.bench`; all logic lives there.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from ..bench import BenchReport, describe_settings, run_bench, table_rows, write_outputs
from ..errors import CCNNError
from ._common import console, err_console, run_app, user_errors

app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


def results_table(report: BenchReport) -> Table:
    table = Table(title="cost per batch (x = relative to the original)", title_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False)
    headers, rows = table_rows(report.measurements)
    for index, name in enumerate(headers):
        table.add_column(name, justify="left" if index < 2 else "right", no_wrap=name != "time/batch")
    for row in rows:
        table.add_row(*row)
    return table


def _check_out(out: Optional[str]) -> None:
    if out is None:
        return
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CCNNError(f"--out {path} is a file, not a folder")
    parent = path if path.exists() else path.parent
    if not parent.exists():
        raise CCNNError(f"cannot write to {path}: {parent} does not exist")


@app.command()
@user_errors
def bench_command(
    models: List[str] = typer.Argument(..., help="Model names (resnet50, efficientnet_lite0, ...), factories or checkpoints."),
    modes: str = typer.Option("original,checkered,dilated", "--modes", help="Comma list of original|traditional|checkered|dilated (original is always measured: ratios are taken against it)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Images per timed batch."),
    size: Optional[int] = typer.Option(None, "--size", help="Input side in pixels [default: the model's crop size]."),
    device: str = typer.Option("auto", "--device", help="cpu|cuda|auto."),
    repeats: int = typer.Option(5, "--repeats", help="Timed passes per variant (the median is reported)."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed passes per variant before timing (the peak-memory pass counts as one)."),
    keep_first: int = typer.Option(0, "--keep-first", help="Leave the first N subsampling steps traditional."),
    sweep: bool = typer.Option(False, "--sweep-keep-first", help="Also measure keep_first = N+1 .. all steps (cost vs top-1)."),
    sampler: str = typer.Option("lattice", "--sampler", help="Checkered sampler: naive|lattice|random."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random sampler."),
    weights: str = typer.Option("DEFAULT", "--weights", help="Weights: DEFAULT, a torchvision enum name, none (random; fine for timing) or a file."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Measure peak memory (one extra profiled pass per variant)."),
    max_seconds: Optional[float] = typer.Option(None, "--max-seconds", help="Skip variants estimated (original time x FLOP ratio) to take longer per batch."),
    data: Optional[str] = typer.Option(None, "--data", help="Also measure top-1 on this image folder (<wnid>/<image>, or flat with --labels)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Labels for a flat --data folder."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Top-1 on N images, round-robin over classes."),
    eval_batch_size: int = typer.Option(32, "--eval-batch-size", help="Batch size for the top-1 pass."),
    workers: int = typer.Option(0, "--workers", help="Data-loading worker processes for the top-1 pass."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch.set_num_threads (CPU)."),
    out: Optional[str] = typer.Option(None, "--out", help="Write bench.json, bench.md, time_ratio.png (and sweep.png) to this folder."),
) -> None:
    """Measure MODEL... in every mode: variants are interleaved so machine drift cancels in the ratios."""
    _check_out(out)
    if threads is not None:
        if threads < 1:
            raise CCNNError("--threads must be positive")
        import torch

        torch.set_num_threads(threads)
    command = shlex.join(["ccnn-bench", *sys.argv[1:]]) if sys.argv and "bench" in sys.argv[0] else None

    def log(message: str) -> None:
        err_console.print(Text(message, style="dim"), soft_wrap=True)

    report = run_bench(models, modes=modes, batch_size=batch_size, image_size=size, device=device, repeats=repeats,
                       warmup=warmup, keep_first=keep_first, sweep=sweep, sampler=sampler, seed=seed,
                       weights=weights, memory=memory, max_seconds=max_seconds, data=data, labels=labels,
                       limit=limit, eval_batch_size=eval_batch_size, workers=workers, command=command, log=log)
    console.print(results_table(report))
    for key, value in describe_settings(report.settings).items():
        console.print(Text(f"  {key}: {value}"), soft_wrap=True)
    if out is not None:
        for path in write_outputs(report, out):
            console.print(Text(f"  wrote {path}"), soft_wrap=True)


def main() -> None:
    run_app(app, runs_models=True)


if __name__ == "__main__":
    main()
