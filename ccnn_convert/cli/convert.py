"""``ccnn-convert``: convert a model's subsampling layers and save a reloadable artifact."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.table import Table

from ..core import ConversionReport, conversion_report
from ..flops import count_flops
from ..core.phc import PHCReport
from ..models import resolve_model, save_artifact
from ..models.record import conversion_state
from ..core.options import check_seed
from ..models.preprocessing import check_image_side
from ..outputs import check_output
from ..spec import ConversionSpec, check_options_used
from rich.text import Text

from ._common import (blur_size_help, console, err_console, mode_names, modes_described, phc_help, plain, printable,
                      resample_at_help, run_app, smoothness_help, spectral_convention_help, user_errors)

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Turn a CNN's strided convolutions and pools into checkered (multisampling), dilated, spectral, "
                       "diffstride or blurpool ones.")


@app.command()
@user_errors(flags={"leaf_modules": "--leaf"})
def main_command(
    model: str = typer.Argument("efficientnet_lite0", help="torchvision/timm name, efficientnet_lite0..2, "
                                "file.py:factory, module:factory, checkpoint (with --arch) or ccnn-convert artifact."),
    mode: Optional[str] = typer.Option(None, help=f"{mode_names(original=False)}. {modes_described()}. "
                                       "[default: an artifact's own mode, else checkered]"),
    sampler: Optional[str] = typer.Option(None, help="Sampler sequence over submaps (checkered mode): "
                                          "naive | lattice | random. [default: lattice]"),
    keep_first: Optional[int] = typer.Option(None, "--keep-first", help="Keep the first N subsampling steps "
                                             "traditional. [default: an artifact's, else 0]"),
    density: Optional[int] = typer.Option(None, help="Samples per window of checkered mode (1 = traditional, k*k = dilated)."),
    seed: Optional[int] = typer.Option(None, help="Seed for the random sampler (checkered mode)."),
    edges: Optional[str] = typer.Option(None, help="Checkered mode's edge rule: exact | reference "
                                        "(dilated is always exact). [default: reference]"),
    dilation: Optional[str] = typer.Option(None, help="How dilated mode is computed: multisample (submaps) | "
                                           "native (strides removed, later layers dilated). [default: native where a "
                                           "dilation can express the model, else multisample]"),
    smoothness: Optional[float] = typer.Option(None, "--smoothness", help=smoothness_help()),
    blur_size: Optional[int] = typer.Option(None, "--blur-size", help=blur_size_help()),
    resample_at: Optional[str] = typer.Option(None, "--resample-at", help=resample_at_help()),
    spectral_convention: Optional[str] = typer.Option(None, "--spectral-convention",
                                                      help=spectral_convention_help()),
    phc: Optional[int] = typer.Option(None, "--phc", metavar="N", help=phc_help()),
    weights: str = typer.Option("DEFAULT", help="DEFAULT, a weights enum name, none, or a state_dict path."),
    arch: Optional[str] = typer.Option(None, help="Architecture name for a checkpoint MODEL."),
    input_size: int = typer.Option(224, "--input-size", help="Input size used to analyse shapes and count FLOPs."),
    leaf: list[str] = typer.Option([], "--leaf", help="Module class or qualified name not to trace into (repeatable)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to save the artifact (.pt)."),
    force: bool = typer.Option(False, "--force", help="Overwrite OUTPUT if it exists."),
    trust_factory: bool = typer.Option(False, "--trust-factory",
                                       help="Let an artifact built by a factory run that factory's code again."),
) -> None:
    """Convert MODEL and print what changed; with -o, save an artifact that ccnn-eval/ccnn-export reload."""
    # Validated before any slow work: an option that would do nothing is an error, not ignored.
    check_image_side(input_size, "input_size")
    if seed is not None:  # whatever mode it ends up in, before any model is read
        check_seed(seed)
    given = dict(sampler=sampler, density=density, seed=seed, edges=edges, dilation=dilation,
                 smoothness=smoothness, blur_size=blur_size, resample_at=resample_at,
                 spectral_convention=spectral_convention, phc=phc)
    if mode is not None:  # else the artifact's own mode, known once it is read
        check_options_used([mode], keep_first=keep_first, **given)
    if output is not None:
        check_output(output, force=force)
    resolved = resolve_model(model, weights=weights, arch=arch, trust_factory=trust_factory)
    base = resolved.conversion
    if mode is None:
        mode = base.mode if base is not None else "checkered"
        check_options_used([mode], keep_first=keep_first, **given)
    # An artifact's own conversion (and what it learned: DiffStride's strides) is the default;
    # options given here win, as in the other commands.
    spec = ConversionSpec.build(mode, base, keep_first=keep_first, leaf_modules=leaf, **given)
    example = torch.zeros(1, 3, input_size, input_size)
    converted = resolved.converted(spec, input_size)  # an artifact's learned strides, if they apply
    if base is not None:
        err_console.print(plain(f"note: {model} is already a ccnn-convert artifact ({base.mode}); its model was "
                                "converted again, with the artifact's own options where none were given"),
                          soft_wrap=True)
    report = conversion_report(converted)
    if spec.mode == "dilated" and spec.dilation is None:  # the artifact says which one was used
        spec = dataclasses.replace(spec, dilation=report.dilation)
    console.print(layer_table(report, resolved.name))
    if report.phc is not None:
        console.print(phc_table(report.phc))
    print_summary(report, resolved.model, converted, example)
    if output is not None:
        if spec.phc is not None:  # the artifact stores the PHC layers' A and F (and learned strides)
            resolved = dataclasses.replace(resolved, conversion=spec,
                                           conversion_state=conversion_state(converted, resolved.model) or None)
        save_artifact(output, resolved, spec, force=force)
        console.print(Text.assemble("saved ", plain(output, "bold"),
                                    " (reload with ccnn-eval/ccnn-export, or ccnn_convert.models.load_artifact)"),
                      soft_wrap=True)


def layer_table(report: ConversionReport, name: str) -> Table:
    density = f", density {report.density}" if report.density is not None else ""
    how = {"checkered": f" ({report.sampler}{density}, {report.edges} edges)",
           "dilated": f" ({report.dilation})", "spectral": f" ({report.spectral_convention} convention)",
           "diffstride": f" ({report.spectral_convention} convention)"}.get(report.mode, "")
    table = Table(title=plain(f"{name}: {report.mode}{how}, keep_first={report.keep_first}"))
    for column in ("step", "layer", "op", "kernel/stride", "submaps in -> out", "output size", "status"):
        table.add_column(column, justify="right" if column in ("step", "output size") else "left")
    for record in report.layers:
        status = (Text("converted", style="green") if record.converted
                  else Text.assemble(("kept", "yellow"), printable(f" {record.note}".rstrip())))
        table.add_row(str(record.step), plain(record.name), record.op,
                      f"{_size(record.kernel)}/{_size(record.stride)}",
                      f"{record.submaps_in} -> {record.submaps_out}", _size(record.output_size), status)
    return table


def phc_table(phc: PHCReport) -> Table:
    """One row per convolution: params before -> after and the fit's relative Frobenius error."""
    how = "nearest Kronecker sums" if phc.init == "fit" else "Xavier-uniform initialisation"
    table = Table(title=plain(f"PHC n={phc.n} ({how})"))
    for column in ("layer", "weight", "params before -> after", "fit error", "status"):
        table.add_column(column, justify="right" if column.startswith(("params", "fit")) else "left")
    for layer in phc.layers:
        status = Text("PHC", style="green") if layer.converted else Text.assemble(("kept", "yellow"),
                                                                                  printable(f" {layer.kept}"))
        error = "-" if layer.error is None else f"{layer.error:.4f}"
        table.add_row(plain(layer.name), _size(layer.shape), f"{layer.params_before:,} -> {layer.params_after:,}",
                      error, status)
    return table


def phc_summary(phc: PHCReport) -> str:
    error = "" if phc.error is None else f"; fit error {phc.error:.4f} (relative Frobenius, all fitted weights)"
    return (f"PHC n={phc.n}: {len(phc.converted)} convolutions, {len(phc.kept)} kept dense; their parameters "
            f"{phc.params_before:,} -> {phc.params_after:,}{error}")


def print_summary(report: ConversionReport, original: torch.nn.Module, converted: torch.nn.Module,
                  example: torch.Tensor) -> None:
    flops_before, flops_after = count_flops(original, example), count_flops(converted, example)
    if report.phc is not None:
        console.print(phc_summary(report.phc))
    console.print(
        f"layers converted: {report.converted_layers}, kept: {report.kept_layers} "
        f"(in {report.steps} subsampling steps); final submaps: {report.final_submaps}\n"
        f"FLOPs per image: {flops_before / 1e9:.3f} G original -> {flops_after / 1e9:.3f} G converted "
        f"({flops_after / max(flops_before, 1):.2f}x)\n"
        f"parameters: {_parameters_line(original, converted, report.phc is not None)}")
    if report.averaged_at:
        *inner, last = report.averaged_at
        pools = f" (and {len(inner)} pools inside the network over all submaps)" if inner else ""
        console.print(f"submaps averaged at: {last}{pools}")
    # report.warnings (keep_first beyond the steps, a leaf matching nothing) were logged by the
    # engine when found; the handler of run_app prints each once as a `warning:` line.


def _parameters_line(original: torch.nn.Module, converted: torch.nn.Module, phc: bool = False) -> str:
    """The original's parameter count, and what the conversion changed: the parameters it adds
    (DiffStride's strides) are counted, not called a change of the original's; PHC layers
    replace the convolutions' weights by design."""
    before = sum(p.numel() for p in original.parameters())
    after = sum(p.numel() for p in converted.parameters())
    if phc:
        return f"{before:,} -> {after:,} (PHC layers)"
    if _same_parameters(original, converted):
        return f"{before:,} (unchanged)"
    if after != before and _shares_original(original, converted):
        return f"{before:,} original -> {after:,} converted ({after - before:+,}: the conversion's own; the original's unchanged)"
    return f"{before:,} -> {after:,} ([red]CHANGED[/])"


def _shares_original(original: torch.nn.Module, converted: torch.nn.Module) -> bool:
    before, after = original.state_dict(), converted.state_dict()
    return before.keys() <= after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _same_parameters(original: torch.nn.Module, converted: torch.nn.Module) -> bool:
    before, after = original.state_dict(), converted.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _size(values) -> str:
    return "x".join(str(v) for v in values) if values else "-"


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
