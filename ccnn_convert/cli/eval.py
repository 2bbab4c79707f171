"""ccnn-eval: top-1/top-5 of a model and its checkered / dilated conversions on labelled images.

A thin typer front end over :func:`ccnn_convert.evaluate.evaluate_model`; all logic lives there.
"""

from __future__ import annotations

from typing import List, Optional

import typer
from rich import box
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table
from rich.text import Text

from .._helpers import counted, format_bytes, format_flops
from ..evaluate import EvalReport, evaluate_model, write_json
from ..flops import FFT_FLOPS_NOTE
from ..outputs import check_output
from ._common import (blur_size_help, console, err_console, mode_names, parse_list, percent, phc_help, plain,
                      preprocessing_overrides, printable, resample_at_help, run_app, smoothness_help,
                      spectral_convention_help, user_errors)

app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])


class ImagesPerSecondColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None and task.elapsed:  # batches slower than rich's 30 s window: overall rate
            speed = task.completed / task.elapsed
        return Text("-- img/s" if speed is None else f"{speed:.1f} img/s", style="progress.data.speed")


def results_table(report: EvalReport) -> Table:
    """One row per mode; percentages without the % sign so the table fits 80 columns."""
    consistency = any(r.consistency is not None for r in report.results)
    table = Table(title=plain(f"{report.model}: {counted(report.images, 'image')}"), title_justify="left",
                  box=box.SIMPLE_HEAD, padding=0, show_edge=False,
                  caption="top-1, top-5, agree (same top-1 as original)"
                          + (", shift (consistency)" if consistency else "")
                          + " in %; Δ top-1 in points vs original; ms per batch; FLOPs per image",
                  caption_justify="left")
    table.add_column("mode", no_wrap=True, min_width=len("traditional"))
    headers = ["top-1", "top-5", "Δ top-1", "agree"] + (["shift"] if consistency else [])
    for name in headers + ["img/s", "ms/batch", "memory", "FLOPs"]:
        table.add_column(name, justify="right", no_wrap=True)
    for r in report.results:
        row = [plain(r.mode), percent(r.top1), percent(r.top5), percent(report.top1_change(r), signed=True),
               percent(r.agreement)]
        if consistency:
            row.append(percent(r.consistency))
        ms = None if r.seconds_per_batch is None else 1000 * r.seconds_per_batch
        row += [
            "-" if r.images_per_s is None else f"{r.images_per_s:.1f}",
            "-" if ms is None else (f"{ms:.1f}" if ms < 10 else f"{ms:.0f}"),
            format_bytes(r.peak_memory_bytes),
            format_flops(r.flops),
        ]
        table.add_row(*row)
    return table


def print_notes(report: EvalReport, json_path: Optional[str]) -> None:
    s = report.settings
    limit = report.data.get("limit")
    selection = report.data.get("selection")
    if limit is not None and report.data.get("files_selected") != report.data.get("files_found"):
        selection = f"--limit {limit}: {selection}"
    read = f": {counted(report.images, 'image')} read, {len(report.skipped)} skipped" if report.skipped else ""
    notes = [f"data: {selection} ({report.data.get('layout')}){read}"]
    if report.memory_kind == "process_rss_high_water":
        largest = ", largest rank" if report.world_size > 1 else ""
        notes.append(f"peak memory: process RSS high-water mark (per process{largest}; all modes together, not per mode)")
    else:
        notes.append("peak memory: CUDA max allocated during each mode's forward pass")
    notes.append(f"loader wait: {report.loader_wait_s:.2f} s of {report.wall_s:.2f} s waiting for the next batch")
    notes.append(f"FLOPs: one forward pass at batch 1 (torch.utils.flop_counter); {FFT_FLOPS_NOTE}")
    protocol = s.get("consistency_protocol")
    if protocol:
        notes.append(f"shift consistency: two random {protocol['crop']}px crops of the {protocol['square']}px "
                     f"centre square per image (offsets {protocol['offsets'].split(' per')[0]}), seed {protocol['seed']}")
    if report.world_size > 1:
        notes.append(f"torchrun: {report.world_size} processes, counts summed over ranks (no padding duplicates)")
    if report.skipped:
        notes.append(f"skipped {len(report.skipped)} unreadable file(s) (not counted in the images above)")
    if json_path:
        notes.append(f"wrote {json_path}")
    for note in notes:
        console.print(plain(f"  {note}"), soft_wrap=True)


@app.command()
@user_errors(flags={"leaf_modules": "--leaf"})
def eval_command(
    model: str = typer.Argument(..., help="Model name (resnet50, efficientnet_lite0, ...), a ccnn-convert artifact (.pt) or an .onnx file."),
    data: str = typer.Option(..., "--data", help="Images: <wnid>/<image> folders, or a flat folder with --labels."),
    labels: Optional[str] = typer.Option(None, "--labels", help="Labels for a flat folder: LOC_val_solution.csv or a filename,label CSV (label = index or wnid)."),
    modes: Optional[str] = typer.Option(None, "--modes", help=f"Comma list of {mode_names()} [default: original,checkered; for an artifact: original and its own mode]"),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Checkered sampler: naive|lattice|random [default: lattice, or the artifact's]"),
    keep_first: Optional[int] = typer.Option(None, "--keep-first", help="Leave the first N subsampling layers unconverted [default: 0, or the artifact's]"),
    density: Optional[int] = typer.Option(None, "--density", help="Checkered: samples per k x k window (1 = traditional, k*k = dilated)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the random sampler and the shift-consistency crops."),
    edges: Optional[str] = typer.Option(None, "--edges", help="Checkered edge rule: exact|reference [default: reference, or the artifact's; dilated is always exact]"),
    dilation: Optional[str] = typer.Option(None, "--dilation", help="How dilated mode is computed: multisample|native [default: the artifact's, else native where a dilation can express the model, else multisample]"),
    smoothness: Optional[float] = typer.Option(None, "--smoothness", help=smoothness_help()),
    blur_size: Optional[int] = typer.Option(None, "--blur-size", help=blur_size_help()),
    resample_at: Optional[str] = typer.Option(None, "--resample-at", help=resample_at_help()),
    spectral_convention: Optional[str] = typer.Option(None, "--spectral-convention", help=spectral_convention_help()),
    phc: Optional[int] = typer.Option(None, "--phc", metavar="N", help=phc_help()),
    leaf: Optional[List[str]] = typer.Option(None, "--leaf", help="Module class or qualified name to keep whole when tracing (repeatable); an artifact's own leaves always apply."),
    weights: str = typer.Option("DEFAULT", "--weights", help="Pretrained weights (torchvision enum name, DEFAULT, none, or a file)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture when MODEL is a bare state dict."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Allow an artifact to re-run the model factory it names (runs that code)."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Override: shorter side resized to this."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Override: centre crop size."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Override: normalisation mean, e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, "--std", help="Override: normalisation std, e.g. 0.229,0.224,0.225."),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="Override: bilinear|bicubic|nearest."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate N images, chosen round-robin over classes (spread over the class list)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per batch."),
    forward_batch: Optional[int] = typer.Option(None, "--forward-batch", help="Images per forward pass [default: 4 on CPU, where small passes keep converted models' large activations in cache; the whole batch on CUDA]."),
    workers: int = typer.Option(2, "--workers", help="Data-loading worker processes."),
    device: str = typer.Option("auto", "--device", help="cpu|cuda|auto."),
    amp: bool = typer.Option(False, "--amp", help="float16 autocast (CUDA only)."),
    consistency: bool = typer.Option(False, "--consistency", help="Also measure shift consistency (Zhang 2019)."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Write the results as JSON to this path (atomically)."),
    force: bool = typer.Option(False, "--force", help="Overwrite the --json file if it exists."),
) -> None:
    """Evaluate MODEL in several modes on the same decoded images and print one row per mode."""
    if json_path:
        check_output(json_path, force=force)  # fail now, not after a long evaluation
    options = dict(
        labels=labels, modes=parse_list(modes), sampler=sampler, keep_first=keep_first, density=density,
        seed=seed, edges=edges, dilation=dilation, smoothness=smoothness, blur_size=blur_size,
        resample_at=resample_at, spectral_convention=spectral_convention, phc=phc,
        leaf_modules=tuple(leaf or ()), weights=weights, arch=arch,
        preprocessing=preprocessing_overrides(resize, crop, mean, std, interpolation),
        trust_factory=trust_factory, limit=limit, batch_size=batch_size, forward_batch=forward_batch,
        workers=workers, device=device, amp=amp, consistency=consistency,
    )
    report = run_with_progress(model, data, **options)
    if not report.is_main:
        return  # under torchrun only rank 0 prints and writes
    if json_path:
        write_json(report, json_path, force=force)
    console.print(results_table(report))
    print_notes(report, json_path)


def run_with_progress(model: str, data: str, **options) -> EvalReport:
    """evaluate_model with one rich progress bar (images/s) and live skip warnings on rank 0."""
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        ImagesPerSecondColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=err_console)
    state: dict = {"task": None, "main": True}

    def on_start(info: dict) -> None:
        state["main"] = info["rank"] == 0
        if not state["main"]:
            return
        progress.start()
        label = f"evaluating (rank 0 of {info['world_size']})" if info["world_size"] > 1 else "evaluating"
        state["task"] = progress.add_task(label, total=info["shard_images"])

    def on_batch(files: int) -> None:
        if state["task"] is not None:
            progress.advance(state["task"], files)

    def on_skip(item) -> None:
        if state["main"]:
            progress.console.print(Text.assemble(("warning:", "yellow"), printable(f" skipped {item.path}: {item.reason}")),
                                   soft_wrap=True)

    try:
        return evaluate_model(model, data, on_batch=on_batch, on_skip=on_skip, on_start=on_start, **options)
    finally:
        if progress.live.is_started:  # stopping a bar never shown would print a blank line
            progress.stop()


def main() -> None:
    run_app(app, runs_models=True)


if __name__ == "__main__":
    main()
