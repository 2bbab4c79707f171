"""ccnn-visualize: pictures of which input positions each submap samples, and of real feature submaps.

A thin typer front end over :mod:`ccnn_convert.visualize`; all logic lives there.

    ccnn-visualize positions --size 16 --steps 3 --out positions.png
    ccnn-visualize features efficientnet_lite0 --image cat.jpg --step 2 --out features.png
    ccnn-visualize features efficientnet_lite0 --image cat.jpg --step 3 --dense --out dense.png
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import List, Optional

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from ..errors import CCNNError, ParameterError
from ..outputs import check_output
from ._common import (console, mode_names, parse_list, plain, run_app, user_errors)

app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0], no_args_is_help=True)

_RANDOM_DEFAULT_SEED = 0
_MAX_POSITIONS_SIDE = 256  # one grid cell per position: beyond this a picture is unreadable (and slow)  # as ccnn-bench: pictures of the random sampler are reproducible by default


def _check_png(out: str, force: bool) -> Path:
    """The PNG to write, checked before any slow work (a directory is reported as one)."""
    path = Path(out)
    if not path.is_dir() and path.suffix.lower() != ".png":
        raise ParameterError("out", f"{{param}} must be a .png file, got {out!r}")
    return check_output(path, force=force)


def steps_table(size: int, steps: int, stride: int, samples: Optional[int]) -> Table:
    """Submap count and resolution after each step, for traditional, checkered and dilated."""
    from ..visualize import step_table

    table = Table(title=f"submaps per step ({size}x{size} input, stride {stride})", title_justify="left",
                  box=box.SIMPLE_HEAD, show_edge=False)
    for name in ("step", "submap size", "traditional", "checkered", "dilated", "checkered positions", "dilated positions"):
        table.add_column(name, justify="right")
    rows = zip(step_table(size, steps, stride, kind="traditional"),
               step_table(size, steps, stride, samples, kind="lattice"),
               step_table(size, steps, stride, kind="dilated"))
    for trad, check, dil in rows:
        table.add_row(str(trad.step), f"{trad.resolution[0]}x{trad.resolution[1]}", str(trad.submaps),
                      str(check.submaps), str(dil.submaps), f"{check.positions} ({check.ratio:g}x)",
                      f"{dil.positions} ({dil.ratio:g}x)")
    return table


@app.command("positions")
@user_errors
def positions_command(
    size: int = typer.Option(16, "--size", help="Side of the input, in positions."),
    steps: int = typer.Option(3, "--steps", help="Subsampling steps (one picture column each)."),
    stride: int = typer.Option(2, "--stride", help="Stride of every step."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Checkered samples per window [default: the stride]."),
    kinds: str = typer.Option("traditional,naive,lattice,random", "--kinds", help="Rows: comma list of traditional|naive|lattice|random|dilated."),
    seed: int = typer.Option(0, "--seed", help="Seed of the random sequence (step t uses seed + t, as convert() does)."),
    out: str = typer.Option("sample_positions.png", "--out", "-o", help="PNG file to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Which input positions every submap samples after 1..STEPS steps (one colour per submap)."""
    from ..visualize import plot_positions

    if size < 1 or steps < 1 or stride < 2:
        raise CCNNError("--size and --steps must be positive and --stride at least 2")
    if samples is not None and not 1 <= samples <= stride * stride:
        raise CCNNError(f"--samples must be between 1 and {stride * stride} for stride {stride}")
    if steps > 8:
        raise CCNNError("--steps above 8 makes an unreadable picture")
    if size > _MAX_POSITIONS_SIDE:
        raise CCNNError(f"--size above {_MAX_POSITIONS_SIDE} makes an unreadable picture (one cell per position)")
    rows = parse_list(kinds)
    if not rows:
        raise CCNNError("--kinds is empty")
    path = _check_png(out, force)
    plot_positions(path, size=size, steps=steps, stride=stride, kinds=rows, samples=samples, seed=seed, force=force)
    console.print(steps_table(size, steps, stride, samples))
    console.print(Text(f"  wrote {path}"), soft_wrap=True)


@app.command("features")
@user_errors(flags={"modes": "--mode", "leaf_modules": "--leaf"})
def features_command(
    model: str = typer.Argument(..., help="Model name (efficientnet_lite0, resnet18, ...), factory or checkpoint."),
    image: str = typer.Option(..., "--image", help="An image file."),
    step: int = typer.Option(2, "--step", help="Show the feature map after this many subsampling steps."),
    mode: Optional[str] = typer.Option(None, "--mode", help=f"{mode_names(original=False)} [default: an artifact's own mode, else checkered]."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="naive|lattice|random [default: an artifact's, else lattice]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for the random sampler [default: 0]."),
    dense: bool = typer.Option(False, "--dense", help="Show the submaps put back on the input grid: --mode's dense map beside the dilated one."),
    edges: Optional[str] = typer.Option(None, "--edges", help="exact|reference: what samples past the image edge are [default: the mode's]."),
    dilation: Optional[str] = typer.Option(None, "--dilation", help="multisample|native: how dilated mode is computed [default: native where a dilation can express the model, else multisample]."),
    leaf: List[str] = typer.Option([], "--leaf", help="Module class or qualified name not to trace into (repeatable)."),
    weights: str = typer.Option("DEFAULT", "--weights", help="Weights: DEFAULT, a torchvision enum name, none or a file."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Let an artifact rebuild its model by running the factory it names."),
    out: str = typer.Option("feature_submaps.png", "--out", "-o", help="PNG file to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Per-submap mean activation of MODEL, converted and cut after STEP steps, on a real image."""
    from ..core import CONVERSION_MODES, conversion_report
    from ..models import resolve_model
    from ..spec import ConversionSpec, check_modes
    from ..visualize import feature_submaps, plot_feature_submaps

    if mode is not None:  # else the artifact's own mode, known once it is read
        mode = check_modes([mode], allowed=CONVERSION_MODES)[0]
        _check_features_options(mode, dense, edges, dilation)
    if step < 1:
        raise ParameterError("step", "{param} must be at least 1")
    path = _check_png(out, force)
    picture = _load_image(image)
    resolved = resolve_model(model, weights=weights, trust_factory=trust_factory)
    if mode is None:
        mode = resolved.conversion.mode if resolved.conversion is not None else "checkered"
        _check_features_options(mode, dense, edges, dilation)
    extra = _given(edges=edges, dilation=None if dense and mode != "dilated" else dilation)
    spec = ConversionSpec.build(mode, resolved.conversion, sampler=sampler, seed=seed, leaf_modules=leaf, **extra)
    if spec.mode == "checkered" and spec.sampler == "random" and spec.seed is None:
        spec = dataclasses.replace(spec, seed=_RANDOM_DEFAULT_SEED)
    x = resolved.preprocessing.transform()(picture)
    if dense:
        _dense_picture(path, resolved, x, step, spec, dilation, force)
        return
    maps = feature_submaps(resolved, x, step, spec)  # with an artifact's learned strides
    reference = feature_submaps(resolved.model, x, step, ConversionSpec("traditional", leaf_modules=spec.leaf_modules))
    pre = resolved.preprocessing
    title = f"{resolved.name}, {mode} ({spec.describe()}): channel mean after {step} subsampling steps"
    plot_feature_submaps(path, x, maps, title, reference, pre.mean, pre.std, force=force)

    report = conversion_report(resolved.converted(spec, tuple(x.shape[-2:])))
    console.print(_steps_of(report, resolved.name, mode, x))
    console.print(Text(f"  shown: {maps.shape[0]} submaps of {maps.shape[1]}x{maps.shape[2]} entering step {step + 1}"),
                  soft_wrap=True)
    console.print(Text(f"  wrote {path}"), soft_wrap=True)


def _check_features_options(mode: str, dense: bool, edges: Optional[str], dilation: Optional[str]) -> None:
    """Options that would do nothing with ``mode`` (and --dense), refused in one line."""
    from ..spec import check_checkered_options_used

    if dense and mode not in _submap_modes():
        raise ParameterError("dense", f"{{param}} puts submaps back on the input grid; mode {mode} makes none "
                                      "(one map per image): drop {param}")
    shown = [mode, "dilated"] if dense else [mode]  # --dense adds a dilated panel
    check_checkered_options_used(shown, edges=edges, dilation=dilation)


def _submap_modes() -> list[str]:
    """The modes converted by multisampling (submaps), from the table of modes."""
    from ..core.modes import MODES as TABLE

    return [name for name, entry in TABLE.items() if entry.converter_path == TABLE["checkered"].converter_path]


def _given(**options) -> dict:
    """The options the user gave (the spec's defaults stay the spec's)."""
    return {name: value for name, value in options.items() if value is not None}


def _dense_picture(path: Path, resolved, x, step: int, spec, dilation: Optional[str], force: bool) -> None:
    """--dense: the mode's dense map beside the dilated one (--dilation applies to the latter)."""
    from ..spec import ConversionSpec
    from ..visualize import dense_feature_map, plot_dense_maps

    specs = [spec]
    if spec.mode != "dilated":
        specs.append(ConversionSpec.build("dilated", resolved.conversion, keep_first=spec.keep_first,
                                          leaf_modules=spec.leaf_modules, **_given(dilation=dilation)))
    maps = [(f"{s.mode} ({s.describe()})", dense_feature_map(resolved, x, step, s)) for s in specs]
    pre = resolved.preprocessing
    title = f"{resolved.name}: channel-mean |activation| entering step {step + 1}, on the input grid"
    plot_dense_maps(path, x, maps, title, pre.mean, pre.std, force=force)
    for label, dense in maps:
        filled = int(dense.mask.sum())
        console.print(Text(f"  {label}: {dense.mask.shape[0]}x{dense.mask.shape[1]} dense map, stride "
                           f"{dense.stride}, {filled} of {dense.mask.numel()} positions filled"), soft_wrap=True)
    console.print(Text(f"  wrote {path}"), soft_wrap=True)


def _steps_of(report, name: str, mode: str, x) -> Table:
    """The conversion's subsampling steps: layers, submaps in -> out, submap size."""
    table = Table(title=plain(f"{name} ({mode}): subsampling steps on a {x.shape[1]}x{x.shape[2]} input"),
                  title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for column in ("step", "layers", "submaps", "submap size"):
        table.add_column(column, justify="right" if column != "layers" else "left")
    for index in range(1, report.steps + 1):
        layers = [layer for layer in report.layers if layer.step == index]
        size = "x".join(str(v) for v in layers[0].output_size)
        table.add_row(str(index), plain(", ".join(layer.name for layer in layers)),
                      f"{layers[0].submaps_in} -> {layers[0].submaps_out}", size)
    return table


def _load_image(path: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            return picture.convert("RGB")
    except FileNotFoundError:
        raise CCNNError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise CCNNError(f"cannot read image {path}: {exc}") from None


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
