"""Which models does the conversion handle? Writes the coverage table of docs/models.md.

For every torchvision classification model plus efficientnet_lite0..2 and the PyConv-ResNet-50
of ``tests/pyconv_resnet.py`` (random weights: coverage is about architecture, not accuracy)
this script

1. finds the smallest input (of 64, 96, 128, 224, 299 px) the original model accepts,
2. converts it with ``convert(model, mode=m, example_input=x)`` for m in checkered and dilated
   (dilated with ``dilation="multisample"``: the table counts its submaps),
3. counts FLOPs of original and converted models with ``ccnn_convert.count_flops``, on the
   ``meta`` device (shapes only, so even vit_h_14 dilated costs nothing to count; note that on
   CPU, eval-mode ``nn.MultiheadAttention`` takes a fused kernel the FLOP counter cannot see),
4. runs a real CPU forward of each converted model that costs at most ``--budget-gflops``
   (the others are checked on ``meta`` only: shapes, no numbers).

    python benchmarks/model_coverage.py                       # all models, rewrites docs/models.md
    python benchmarks/model_coverage.py --models resnet50 vgg16 --no-write
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ccnn_convert import conversion_report, convert, count_flops  # noqa: E402
from ccnn_convert.models import list_model_names, resolve_model  # noqa: E402
from ccnn_convert.outputs import atomic_path  # noqa: E402

MODES = ("checkered", "dilated")
_OPTIONS = {"dilated": {"dilation": "multisample"}}  # the table counts submaps; native has one map
SIZES = (64, 96, 128, 224, 299)
DOC = ROOT / "docs" / "models.md"
START, END = "<!-- coverage:start -->", "<!-- coverage:end -->"


@dataclass
class Row:
    name: str
    size: int | None = None
    found: int | None = None
    converted: dict = field(default_factory=dict)
    submaps: dict = field(default_factory=dict)
    ratio: dict = field(default_factory=dict)
    base_flops: int = 0
    forward: str = ""
    status: str = "ok"
    seconds: float = 0.0


# Architectures from the literature that no package here ships, as factories (MODEL file.py:callable).
FACTORIES = ("tests/pyconv_resnet.py:pyconv_resnet50",)


def all_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models)) + [
        "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", *FACTORIES]


def build(name: str, device: str) -> torch.nn.Module:
    name = str(ROOT / name) if name in FACTORIES else name  # factory files are relative to the checkout
    try:
        with torch.device(device):
            return resolve_model(name, weights="none").model.eval()
    except NotImplementedError:  # builders that compute widths with tensors (regnet) fail on meta
        return resolve_model(name, weights="none").model.to(device).eval()


def smallest_input(model: torch.nn.Module) -> int:
    failures = []
    for size in SIZES:
        try:
            with torch.no_grad():
                model(torch.empty(1, 3, size, size, device="meta"))
            return size
        except Exception as exc:  # too small for this architecture
            failures.append(f"{size}: {type(exc).__name__}")
    raise RuntimeError("no input size works (" + "; ".join(failures) + ")")


def one_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text[:160]}".replace("|", "/")


def analyse(name: str, budget: float, real_forward: bool) -> Row:
    start = time.monotonic()
    try:
        model = build(name, "meta")
        smallest = smallest_input(model)
        # A conversion may need more room than the original (e.g. pools after dilation):
        # take the smallest size at which both modes convert, else report the smallest.
        rows = []
        for size in [s for s in SIZES if s >= smallest]:
            rows.append(convert_at(name, model, size))
            if rows[-1].status == "ok":
                break
        row = rows[-1] if rows[-1].status == "ok" else rows[0]
        if row.ratio:
            try:
                row.forward = real_check(name, row, budget) if real_forward else "meta"
            except Exception as exc:
                row.forward, row.status = "failed", f"cpu forward: {one_line(exc)}"
    except Exception as exc:
        row = Row(name, status=one_line(exc))
        traceback.print_exc(limit=3)
    row.seconds = time.monotonic() - start
    return row


def convert_at(name: str, model: torch.nn.Module, size: int) -> Row:
    """Convert in every mode at one input size, on meta tensors; errors are recorded, not raised."""
    row = Row(name, size=size)
    x = torch.empty(2, 3, size, size, device="meta")
    row.base_flops = count_flops(model, x)
    errors = []
    for mode in MODES:
        try:
            converted = convert(model, mode=mode, example_input=x, **_OPTIONS.get(mode, {}))
            report = conversion_report(converted)
            row.found = len(report.layers)
            row.converted[mode] = report.converted_layers
            row.submaps[mode] = report.final_submaps
            row.ratio[mode] = count_flops(converted, x) / row.base_flops
        except Exception as exc:
            errors.append(f"{mode}: {one_line(exc)}")
    row.status = "; ".join(errors) or "ok"
    return row


def real_check(name: str, row: Row, budget: float) -> str:
    """Forward the converted models on real CPU tensors when cheap enough; the output shape must
    match the original's and be finite. Returns which modes ran for real."""
    cheap = [m for m in row.ratio if row.ratio[m] * row.base_flops / 1e9 <= budget]
    if not cheap:
        return "meta"
    model = build(name, "cpu")
    x = torch.randn(2, 3, row.size, row.size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).shape
        for mode in cheap:
            out = convert(model, mode=mode, example_input=x, **_OPTIONS.get(mode, {}))(x)
            if out.shape != expected or not torch.isfinite(out).all():
                raise RuntimeError(f"{mode}: output {tuple(out.shape)} vs {tuple(expected)} or not finite")
    return "cpu" if len(cheap) == len(row.ratio) else "cpu: " + ", ".join(cheap)


def cell(values: dict, mode: str, fmt: str) -> str:
    return format(values[mode], fmt) if mode in values else "-"


HEADER = [
    "| model | input | strided layers (converted C / D) | checkered submaps | checkered FLOPs x "
    "| dilated submaps | dilated FLOPs x | forward | status |",
    "|---|---|---|---|---|---|---|---|---|",
]


def table_line(r: Row) -> str:
    layers = "-" if r.found is None else (
        f"{r.found} ({cell(r.converted, 'checkered', 'd')} / {cell(r.converted, 'dilated', 'd')})")
    return (f"| {r.name} | {r.size or '-'} | {layers} | {cell(r.submaps, 'checkered', 'd')} | "
            f"{cell(r.ratio, 'checkered', '.2f')} | {cell(r.submaps, 'dilated', 'd')} | "
            f"{cell(r.ratio, 'dilated', '.1f')} | {r.forward or '-'} | {r.status} |")


def table(lines: dict[str, str]) -> str:
    """Markdown table from model -> row line, in the canonical model order, with a summary."""
    order = [n for n in all_models() if n in lines] + sorted(set(lines) - set(all_models()))
    ok = sum(line.rstrip().endswith("| ok |") for line in lines.values())
    return "\n".join(HEADER + [lines[n] for n in order] +
                     ["", f"{ok} of {len(lines)} models convert in both modes."])


def existing_lines(doc: Path) -> dict[str, str]:
    """Rows already in the doc's coverage block, so a partial run (--models) updates in place."""
    text = doc.read_text() if doc.exists() else ""
    if START not in text or END not in text:
        return {}
    block = text[text.index(START):text.index(END)]
    rows = [line for line in block.splitlines() if line.startswith("| ") and line not in HEADER]
    return {line.split("|")[1].strip(): line for line in rows}


def write(doc: Path, text: str, command: str) -> None:
    block = f"{START}\n<!-- generated by: {command} -->\n\n{text}\n\n{END}"
    current = doc.read_text() if doc.exists() else ""
    if START in current and END in current:
        current = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, current, flags=re.S)
    else:
        current = current.rstrip() + "\n\n## Coverage\n\n" + block + "\n"
    with atomic_path(doc, force=True) as tmp:  # updating the doc's own block in place is the point
        tmp.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", help="default: every torchvision model + efficientnet_lite0..2")
    parser.add_argument("--budget-gflops", type=float, default=40.0,
                        help="largest dilated forward run for real on CPU (default 40)")
    parser.add_argument("--no-real-forward", action="store_true", help="check forwards on meta only")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="seconds after which the remaining models are listed as not run (0: none)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/models.md alone")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    warnings.filterwarnings("ignore")
    names = args.models or all_models()
    unknown = sorted(set(names) - set(list_model_names()) - set(FACTORIES))
    if unknown:
        parser.error(f"unknown models: {', '.join(unknown)}")
    rows = []
    start = time.monotonic()
    for name in names:
        if args.time_limit and time.monotonic() - start > args.time_limit:
            rows.append(Row(name, status=f"not run (--time-limit {args.time_limit:g} s reached)"))
            continue
        row = analyse(name, args.budget_gflops, not args.no_real_forward)
        rows.append(row)
        print(f"{name:24s} {row.seconds:6.1f}s  {row.status}", file=sys.stderr, flush=True)
    lines = {} if args.no_write else existing_lines(DOC)
    for row in rows:  # a model skipped for time keeps its earlier result, if any
        if not (row.status.startswith("not run") and row.name in lines):
            lines[row.name] = table_line(row)
    text = table(lines)
    print(text)
    print(f"\n{time.monotonic() - start:.0f} s in all", file=sys.stderr)
    if not args.no_write:
        command = "python benchmarks/model_coverage.py" + (
            f" --budget-gflops {args.budget_gflops:g}" if args.budget_gflops != 40.0 else "") + (
            " --no-real-forward" if args.no_real_forward else "") + (
            " (run in parts with --models / --time-limit)" if args.models or args.time_limit else "")
        write(DOC, text, command)


if __name__ == "__main__":
    main()
