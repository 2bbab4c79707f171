"""Issue 2's performance benchmark: is a conversion's time ratio at most its FLOP ratio?

For every model (random weights) and mode, at batch 4 on 224x224 inputs, this prints side by
side: the original's and the converted model's time per batch, their ratio (wall clock and
process CPU time), the FLOP ratio, whether time ratio <= FLOP ratio, and the peak-memory ratio.
It also times ``convert()`` itself (target: resnet152 in under 2 s).

All measuring is :mod:`ccnn_convert.bench` (the same code as ``ccnn-bench``): variants of one
model are interleaved, FLOPs are counted on meta tensors, peak memory is PyTorch's own
allocation during one forward pass (see that module for the exact definitions).

Dilated networks at 224 px are very heavy (resnet152: 1024 submaps at the end, ~250x the
original's FLOPs). ``--max-seconds`` skips any variant whose estimated time per batch (the
original's first pass x its FLOP ratio) is larger; its FLOPs are still reported.

    python benchmarks/bench_convert.py                       # everything that fits --max-seconds
    python benchmarks/bench_convert.py --quick               # a few minutes
    python benchmarks/bench_convert.py --models resnet50 --modes checkered --repeats 5 --out out/bench

``--threads`` defaults to 1: on a small shared machine two OpenMP threads slow down by 10x or
more whenever other processes compete for the cores, while one thread stays steady (and then
the process CPU time is the compute time).

Like the commands, it first calls ``ccnn_convert.use_huge_pages()`` (see
``ccnn_convert/cpu_memory.py``); ``--no-huge-pages`` measures without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ccnn_convert import convert  # noqa: E402
from ccnn_convert._helpers import format_bytes  # noqa: E402
from ccnn_convert.bench import (BenchReport, Measurement, TimingOptions, bench_model, fmt_ratio,  # noqa: E402
                                fmt_seconds, load_average, machine_settings, output_names, write_outputs)
from ccnn_convert.cpu_memory import SWITCH, use_huge_pages  # noqa: E402
from ccnn_convert.errors import CCNNError, ParameterError  # noqa: E402
from ccnn_convert.models import resolve_model  # noqa: E402
from ccnn_convert.outputs import check_output_dir  # noqa: E402

MODELS = ("resnet50", "resnet152", "densenet169", "squeezenet1_1", "vgg16")
MODES = ("checkered", "dilated")
QUICK = {"models": ("squeezenet1_1", "resnet50"), "modes": ("checkered", "dilated"), "repeats": 3, "max_seconds": 60.0}


def time_conversion(name: str, modes, repeats: int) -> dict[str, float]:
    """Median seconds of convert(model, mode) at 224 px (shape analysis included)."""
    model = resolve_model(name, weights="none").model
    example = torch.zeros(1, 3, 224, 224)
    result = {}
    for mode in modes:
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            convert(model, mode=mode, example_input=example)
            times.append(time.perf_counter() - began)
        result[mode] = statistics.median(times)
    return result


def side_by_side(rows: list[Measurement]) -> str:
    """Plain-text table: one line per converted variant, with the original's figures beside it."""
    header = ("model", "mode", "submaps", "original", "converted", "time x", "CPU time x", "FLOPs x",
              "time x <= FLOPs x", "memory x", "peak memory", "convert")
    lines = [header]
    originals = {m.model: m for m in rows if m.mode == "original"}
    for m in rows:
        if m.mode == "original":
            continue
        ref = originals[m.model]
        if m.skipped:
            verdict = "not run"
        else:
            checks = [r for r in (m.time_ratio, m.cpu_time_ratio) if r is not None]
            verdict = "yes" if checks and all(r <= m.flop_ratio for r in checks) else (
                "wall only" if m.time_ratio is not None and m.time_ratio <= m.flop_ratio else "no")
        converted = fmt_seconds(m.median_s) if not m.skipped else m.skipped
        lines.append((m.model, m.label, str(m.submaps), fmt_seconds(ref.median_s), converted,
                      fmt_ratio(m.time_ratio), fmt_ratio(m.cpu_time_ratio), fmt_ratio(m.flop_ratio), verdict,
                      fmt_ratio(m.memory_ratio), "-" if m.peak_memory_bytes is None else format_bytes(m.peak_memory_bytes),
                      "-" if m.convert_s is None else f"{m.convert_s:.2f} s"))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    text = []
    for index, line in enumerate(lines):
        text.append("  ".join(str(cell).rjust(w) if i > 1 else str(cell).ljust(w)
                              for i, (cell, w) in enumerate(zip(line, widths))))
        if index == 0:
            text.append("  ".join("-" * w for w in widths))
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of torchvision names")
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of checkered,dilated,traditional")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per variant (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed passes per variant (the memory pass counts)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1, see above)")
    parser.add_argument("--max-seconds", type=float, default=300.0,
                        help="skip variants estimated to take longer per batch (default 300)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    parser.add_argument("--convert-model", default="resnet152", help="model whose convert() is timed ('' to skip)")
    parser.add_argument("--convert-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help=f"models {','.join(QUICK['models'])}, {QUICK['repeats']} repeats, "
                             f"--max-seconds {QUICK['max_seconds']:g} (explicit flags still win)")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="4 KiB pages for large tensors (PyTorch's default) instead of "
                             "ccnn_convert.use_huge_pages(), as the commands use")
    parser.add_argument("--out", help="also write bench.json, bench.md and time_ratio.png to this folder")
    parser.add_argument("--force", action="store_true", help="overwrite files already in the --out folder")
    args = parser.parse_args(argv)
    if args.out:
        try:  # before hours of measuring
            check_output_dir(args.out, output_names(sweep=False), force=args.force)
        except ParameterError as exc:
            parser.error(exc.render("--" + exc.parameter.replace("_", "-")))
        except CCNNError as exc:
            parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="  %(message)s", stream=sys.stderr)
    given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--"))
    if args.quick:
        if "--models" not in given:
            args.models = ",".join(QUICK["models"])
        if "--repeats" not in given:
            args.repeats = QUICK["repeats"]
        if "--max-seconds" not in given:
            args.max_seconds = QUICK["max_seconds"]
    if args.no_huge_pages:
        os.environ[SWITCH] = "0"
    allocator = "huge pages" if use_huge_pages() else "4 KiB pages"  # before any tensor is made
    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    device = torch.device("cpu")

    command = " ".join(["python benchmarks/bench_convert.py", *(argv if argv is not None else sys.argv[1:])])
    settings = machine_settings(device)
    load_before = load_average()
    print(f"# {command}")
    print(f"# {settings['device_name']}, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"batch {args.batch_size}, {args.size}x{args.size}, median of {args.repeats}, "
          f"load average {load_average()}, large tensors: {allocator}", flush=True)

    conversion = {}
    if args.convert_model:
        conversion = time_conversion(args.convert_model, modes, args.convert_repeats)
        for mode, seconds in conversion.items():
            verdict = "ok" if seconds < 2.0 else "over the 2 s target"
            print(f"convert({args.convert_model}, {mode}): {seconds:.2f} s (median of {args.convert_repeats}; {verdict})",
                  flush=True)

    rows: list[Measurement] = []
    started = time.perf_counter()
    for name in models:
        model = resolve_model(name, weights="none").model
        timing = TimingOptions(batch_size=args.batch_size, repeats=args.repeats, warmup=args.warmup,
                               memory=not args.no_memory, max_seconds=args.max_seconds)
        rows += bench_model(name, model, modes, image_size=args.size, device=device, timing=timing)
        print(f"{name} done ({time.perf_counter() - started:.0f} s so far)", flush=True)

    print()
    print(side_by_side(rows))
    print(f"\nload average after: {load_average()}; total {time.perf_counter() - started:.0f} s")
    if args.out:
        settings.update({"command": command, "batch_size": args.batch_size, "image_size": args.size,
                         "repeats": args.repeats, "warmup": args.warmup, "weights": "none", "modes": modes,
                         "max_seconds": args.max_seconds, "large_tensors": allocator,
                         "load_average": [load_before, load_average()],
                         "conversion_s": {f"{args.convert_model} {mode}": s for mode, s in conversion.items()}})
        for path in write_outputs(BenchReport(rows, settings), args.out, force=args.force):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
