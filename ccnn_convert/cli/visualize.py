"""ccnn-visualize: pictures of which input positions each submap samples, and of real feature submaps.

A thin typer front end over :mod:`ccnn_convert.visualize`; all logic lives there.

    ccnn-visualize positions --size 16 --steps 3 --out positions.png
    ccnn-visualize features efficientnet_lite0 --image cat.jpg --step 2 --out features.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from ..errors import CCNNError
from ._common import console, run_app, user_errors

app = typer.Typer(add_completion=False, help=__doc__.splitlines()[0], no_args_is_help=True)

CONVERT_MODES = ("checkered", "dilated", "traditional")
SAMPLERS = ("naive", "lattice", "random")


def _check_png(out: str) -> Path:
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise CCNNError(f"--out must be a .png file, got {out!r}")
    if path.is_dir():
        raise CCNNError(f"--out {path} is a folder")
    if not path.parent.is_dir():
        raise CCNNError(f"cannot write {path}: directory {path.parent} does not exist")
    return path


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
) -> None:
    """Which input positions every submap samples after 1..STEPS steps (one colour per submap)."""
    from ..visualize import plot_positions

    if size < 1 or steps < 1 or stride < 2:
        raise CCNNError("--size and --steps must be positive and --stride at least 2")
    if samples is not None and not 1 <= samples <= stride * stride:
        raise CCNNError(f"--samples must be between 1 and {stride * stride} for stride {stride}")
    if steps > 8:
        raise CCNNError("--steps above 8 makes an unreadable picture")
    rows = [k.strip() for k in kinds.split(",") if k.strip()]
    if not rows:
        raise CCNNError("--kinds is empty")
    path = _check_png(out)
    plot_positions(path, size=size, steps=steps, stride=stride, kinds=rows, samples=samples, seed=seed)
    console.print(steps_table(size, steps, stride, samples))
    console.print(Text(f"  wrote {path}"), soft_wrap=True)


@app.command("features")
@user_errors
def features_command(
    model: str = typer.Argument(..., help="Model name (efficientnet_lite0, resnet18, ...), factory or checkpoint."),
    image: str = typer.Option(..., "--image", help="An image file."),
    step: int = typer.Option(2, "--step", help="Show the feature map after this many subsampling steps."),
    mode: str = typer.Option("checkered", "--mode", help="checkered|dilated|traditional."),
    sampler: str = typer.Option("lattice", "--sampler", help="naive|lattice|random."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random sampler."),
    weights: str = typer.Option("DEFAULT", "--weights", help="Weights: DEFAULT, a torchvision enum name, none or a file."),
    out: str = typer.Option("feature_submaps.png", "--out", "-o", help="PNG file to write."),
) -> None:
    """Per-submap mean activation of MODEL, converted and cut after STEP steps, on a real image."""
    from ..models import resolve_model
    from ..core import conversion_report, convert
    from ..visualize import feature_submaps, plot_feature_submaps

    if mode not in CONVERT_MODES:
        raise CCNNError(f"unknown mode {mode!r} (choose from {', '.join(CONVERT_MODES)})")
    if sampler not in SAMPLERS:
        raise CCNNError(f"unknown sampler {sampler!r} (choose from {', '.join(SAMPLERS)})")
    if step < 1:
        raise CCNNError("--step must be at least 1")
    path = _check_png(out)
    picture = _load_image(image)
    resolved = resolve_model(model, weights=weights)
    x = resolved.preprocessing.transform()(picture)
    maps = feature_submaps(resolved.model, x, step, mode=mode, sampler=sampler, seed=seed)
    reference = feature_submaps(resolved.model, x, step, mode="traditional")
    pre = resolved.preprocessing
    title = f"{resolved.name}, {mode} ({sampler}): channel mean after {step} subsampling steps"
    plot_feature_submaps(path, x, maps, title, reference, pre.mean, pre.std)

    report = conversion_report(convert(resolved.model, mode=mode, sampler=sampler, seed=seed,
                                       example_input=x.unsqueeze(0)))
    table = Table(title=f"{resolved.name} ({mode}): subsampling steps on a {x.shape[1]}x{x.shape[2]} input",
                  title_justify="left", box=box.SIMPLE_HEAD, show_edge=False)
    for name in ("step", "layers", "submaps", "submap size"):
        table.add_column(name, justify="right" if name != "layers" else "left")
    for index in range(1, report.steps + 1):
        layers = [layer for layer in report.layers if layer.step == index]
        size = "x".join(str(v) for v in layers[0].output_size)
        table.add_row(str(index), ", ".join(layer.name for layer in layers),
                      f"{layers[0].submaps_in} -> {layers[0].submaps_out}", size)
    console.print(table)
    console.print(Text(f"  shown: {maps.shape[0]} submaps of {maps.shape[1]}x{maps.shape[2]} entering step {step + 1}"),
                  soft_wrap=True)
    console.print(Text(f"  wrote {path}"), soft_wrap=True)


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
