"""ccnn-export: write a model (original, checkered or dilated) as a verified ONNX file.

A thin typer front end over :func:`ccnn_convert.export.export`: flags become typed parameters
and the option records; all logic lives in the library.
"""

from __future__ import annotations

import json
from typing import List, Optional

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from .._helpers import format_bytes
from ..errors import CCNNError
from ..spec import ConversionSpec
from ..export import (DEFAULT_OPSET, PROVIDERS, BenchmarkOptions, BenchmarkResult, ExportResult, Verification,
                      VerificationFailed, VerifyOptions, export)
from ._common import (blur_size_help, console, err_console, mode_names, phc_help, plain, preprocessing_overrides,
                      resample_at_help, run_app, smoothness_help, spectral_convention_help, user_errors)

app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0])

# Library parameters whose flag has another name.
_FLAGS = {"leaf_modules": "--leaf", "batch": "--bench-batch", "repeats": "--bench-repeats"}


def verification_table(v: Verification) -> Table:
    agreement_rule = any(c.min_agreement is not None for c in v.checks)
    table = Table(title=f"verification: ONNX Runtime {v.dtype} vs PyTorch float32",
                  title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), show_edge=False,
                  caption=f"max rel = max|ort - torch| / max|torch| <= {v.tolerance:g}"
                          + ("; images: top-1 agree >= 90%" if agreement_rule else ""),
                  caption_justify="left")
    for name, justify in (("inputs", "left"), ("batch", "right"), ("max abs", "right"), ("max rel", "right"),
                          ("top-1 agree", "right"), ("", "left")):
        table.add_column(name, justify=justify, no_wrap=True)
    for c in v.checks:
        table.add_row(c.inputs, str(c.batch), f"{c.max_abs:.3g}", f"{c.max_rel:.3g}", f"{c.top1_agreement:.1%}",
                      Text("ok", style="green") if c.passed else Text("FAIL", style="bold red"))
    return table


def benchmark_table(b: BenchmarkResult) -> Table:
    table = Table(title=f"benchmark: batch {b.batch}, median of {b.repeats} interleaved runs, {b.threads} threads",
                  title_justify="left", box=box.SIMPLE_HEAD,
                  padding=(0, 1), show_edge=False,
                  caption="ratio = PyTorch ms / ONNX Runtime ms (> 1: ONNX Runtime faster)",
                  caption_justify="left")
    for name in ("runtime", "device", "ms/batch", "img/s", "ratio"):
        table.add_column(name, justify="left" if name in ("runtime", "device") else "right", no_wrap=True)
    table.add_row("PyTorch eager", b.torch_device, f"{b.torch_ms:.1f}", f"{b.torch_images_per_s:.1f}", "1.00")
    table.add_row("ONNX Runtime", b.provider, f"{b.ort_ms:.1f}", f"{b.ort_images_per_s:.1f}", f"{b.speedup:.2f}")
    return table


def print_result(result: ExportResult) -> None:
    info, meta = result.info, result.metadata
    conversion = json.loads(meta.get("conversion") or "{}")  # the metadata as written: JSON strings
    described = ConversionSpec.from_dict(conversion).describe() if conversion else ""
    what = f"{result.mode}, {described}" if described else result.mode  # only the options of its mode
    console.print(plain(f"exported {result.name} ({what}) -> {result.path}"), soft_wrap=True)
    _, height, width = json.loads(meta["input_size"])
    details = (f"  opset {info.opset}, {info.nodes} nodes, {format_bytes(info.bytes)}"
               f"{' (external data)' if info.external_data else ''}, {meta.get('dtype')}, "
               f"input (batch, 3, {height}, {width}) with a dynamic batch")
    console.print(Text(details), soft_wrap=True)
    if result.provider is not None:  # printed here only: the library does not log it
        console.print(Text(f"  provider: {result.provider.ort_name} ({result.provider.reason})"), soft_wrap=True)
    for note in result.notes:
        console.print(plain(f"  note: {note}"), soft_wrap=True)
    if result.verification is not None:
        console.print(verification_table(result.verification))
    else:
        console.print(Text("  not verified (--no-verify)", style="yellow"))
    if result.benchmark is not None:
        console.print(benchmark_table(result.benchmark))


def _unused(flags: dict[str, object], because: str) -> None:
    given = [flag for flag, value in flags.items() if value is not None]
    if given:
        raise CCNNError(f"{given[0]} does nothing {because}")


def _given(**options: object) -> dict[str, object]:
    """The options the user set (the records keep their own defaults for the others)."""
    return {name: value for name, value in options.items() if value is not None}


@app.command()
@user_errors(flags=_FLAGS)
def export_command(
    model: str = typer.Argument(..., help="Model name (resnet50, efficientnet_lite0, ...), a ccnn-convert artifact (.pt) or file.py:factory."),
    output: Optional[str] = typer.Option(None, "-o", "--output", help="Output .onnx path [default: <model>_<mode>.onnx]."),
    mode: Optional[str] = typer.Option(None, "--mode", help=f"{mode_names()} [default: checkered, or the artifact's]."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="Checkered sampler: naive|lattice|random [default: lattice, or the artifact's]."),
    keep_first: Optional[int] = typer.Option(None, "--keep-first", help="Leave the first N subsampling steps unconverted [default: 0, or the artifact's]."),
    density: Optional[int] = typer.Option(None, "--density", help="Samples per k x k window (1 = traditional, k*k = dilated)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the random sampler."),
    edges: Optional[str] = typer.Option(None, "--edges", help="Checkered edge rule: exact|reference [default: reference, or the artifact's; dilated is always exact]."),
    dilation: Optional[str] = typer.Option(None, "--dilation", help="How dilated mode is computed: multisample|native [default: the artifact's, else native where a dilation can express the model, else multisample]."),
    smoothness: Optional[float] = typer.Option(None, "--smoothness", help=smoothness_help()),
    blur_size: Optional[int] = typer.Option(None, "--blur-size", help=blur_size_help()),
    resample_at: Optional[str] = typer.Option(None, "--resample-at", help=resample_at_help()),
    spectral_convention: Optional[str] = typer.Option(None, "--spectral-convention", help=spectral_convention_help()),
    phc: Optional[int] = typer.Option(None, "--phc", metavar="N", help=phc_help()),
    leaf: Optional[List[str]] = typer.Option(None, "--leaf", help="Module type or name not to trace into (repeatable)."),
    weights: str = typer.Option("DEFAULT", "--weights", help="Pretrained weights (torchvision enum name, DEFAULT, none, or a file)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture when MODEL is a bare state dict."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Let an artifact built by a factory run that factory's code again."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="Input height = width [default: the preprocessing crop]."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Override: shorter side resized to this."),
    crop: Optional[int] = typer.Option(None, "--crop", help="Override: centre crop size."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Override: normalisation mean, e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, "--std", help="Override: normalisation std, e.g. 0.229,0.224,0.225."),
    interpolation: Optional[str] = typer.Option(None, "--interpolation", help="Override: bilinear|bicubic|nearest."),
    opset: int = typer.Option(DEFAULT_OPSET, "--opset", help="ONNX opset; fails (naming the op) if the model cannot be written in it."),
    fp16: bool = typer.Option(False, "--fp16", help="Export a float16 model (for GPU inference); verified with a looser tolerance."),
    provider: str = typer.Option("auto", "--provider", help=f"ONNX Runtime provider: {'|'.join(PROVIDERS)}."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare ONNX Runtime with PyTorch before writing the file."),
    data: Optional[str] = typer.Option(None, "--data", help="Also verify on real images: an ImageFolder-style DIR."),
    data_limit: Optional[int] = typer.Option(None, "--data-limit", help="Images used from --data [default: 32]."),
    tolerance: Optional[float] = typer.Option(None, "--tolerance", help="Max relative difference [default: 1e-4, fp16: 1e-2]."),
    benchmark: bool = typer.Option(False, "--benchmark", help="Time ONNX Runtime vs PyTorch eager on the same batch."),
    bench_batch: Optional[int] = typer.Option(None, "--bench-batch", help="Batch size for --benchmark [default: 4]."),
    bench_repeats: Optional[int] = typer.Option(None, "--bench-repeats", help="Timed repeats for --benchmark (interleaved, median) [default: 10]."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for PyTorch and ONNX Runtime [default: torch's]."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output file."),
) -> None:
    """Export MODEL to ONNX (dynamic batch, metadata), verify it against PyTorch, optionally benchmark."""
    preprocessing = preprocessing_overrides(resize, crop, mean, std, interpolation)
    verify_flags = {"--data": data, "--data-limit": data_limit, "--tolerance": tolerance}
    bench_flags = {"--bench-batch": bench_batch, "--bench-repeats": bench_repeats}
    if not verify:
        _unused(verify_flags, "with --no-verify")
    if not benchmark:
        _unused(bench_flags, "without --benchmark")
    verify_options = VerifyOptions(**_given(data=data, data_limit=data_limit, tolerance=tolerance)) if verify else None
    bench_options = BenchmarkOptions(**_given(batch=bench_batch, repeats=bench_repeats)) if benchmark else None
    try:
        result = export(model, output, mode=mode, sampler=sampler, keep_first=keep_first, density=density,
                        seed=seed, leaf_modules=leaf or None, edges=edges, dilation=dilation,
                        smoothness=smoothness, blur_size=blur_size, resample_at=resample_at,
                        spectral_convention=spectral_convention, phc=phc,
                        weights=weights, arch=arch,
                        trust_factory=trust_factory, preprocessing=preprocessing or None, input_size=input_size,
                        opset=opset, fp16=fp16, provider=provider, threads=threads, verify=verify_options,
                        benchmark=bench_options, force=force)
    except VerificationFailed as exc:
        err_console.print(verification_table(exc.verification))
        raise
    print_result(result)


def main() -> None:
    run_app(app, runs_models=True)


if __name__ == "__main__":
    main()
