"""Top-1 of one pretrained model and many conversions of it, on the same decoded images.

``ccnn-eval`` compares modes with one sampler and one keep_first per run; the results table in
``docs/results.md`` needs several of each. This script builds every variant, then runs
:func:`ccnn_convert.evaluate.evaluate` once over the data, so each image is decoded once and
every variant sees exactly the same tensors. It prints a markdown table.

    python benchmarks/eval_variants.py ../shared/data/imagenet-sample/val
    python benchmarks/eval_variants.py DATA --model efficientnet_lite0 --keep-first 0,1,2 --samplers naive,lattice
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ccnn_convert import use_huge_pages  # noqa: E402
from ccnn_convert.data import DecodedImages, find_samples  # noqa: E402
from ccnn_convert.evaluate import evaluate  # noqa: E402
from ccnn_convert.flops import count_flops  # noqa: E402
from ccnn_convert.models import resolve_model  # noqa: E402
from ccnn_convert.spec import ConversionSpec  # noqa: E402


def build_variants(model: torch.nn.Module, crop: int, samplers: list[str], keep_firsts: list[int],
                   dilated: bool) -> tuple[dict, dict]:
    specs = {f"checkered {sampler} keep_first={keep_first}": ConversionSpec("checkered", sampler, keep_first)
             for sampler in samplers for keep_first in keep_firsts}
    if dilated:
        specs["dilated"] = ConversionSpec("dilated")
    variants = {"original": model, **{name: spec.apply(model, crop) for name, spec in specs.items()}}
    settings = {"original": None, **{name: spec.to_dict() for name, spec in specs.items()}}
    return variants, settings


def markdown(report) -> str:
    """The report as a markdown table; a GFLOPs column when the report counted FLOPs."""
    flops = any(result.flops is not None for result in report.results)
    lines = ["| variant | top-1 % | top-5 % | change | agreement % | images/s |" + (" GFLOPs/image |" if flops else ""),
             "|---|---:|---:|---:|---:|---:|" + ("---:|" if flops else "")]
    for result in report.results:
        change = report.top1_change(result)
        lines.append(f"| {result.mode} | {result.top1:.1f} | {result.top5:.1f} | "
                     f"{'' if change is None else f'{change:+.1f}'} | {result.agreement:.1f} | "
                     f"{result.images_per_s:.1f} |" + (f" {result.flops / 1e9:.2f} |" if flops else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="ImageFolder with <wnid>/ folders")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--samplers", default="naive,lattice")
    parser.add_argument("--keep-first", default="0,1,2")
    parser.add_argument("--no-dilated", action="store_true")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    use_huge_pages()
    resolved = resolve_model(args.model)
    pre = resolved.preprocessing
    variants, settings = build_variants(resolved.model.eval(), pre.crop, args.samplers.split(","),
                                        [int(k) for k in args.keep_first.split(",")], not args.no_dilated)
    flops = {name: count_flops(m, torch.zeros(1, 3, pre.crop, pre.crop)) for name, m in variants.items()}
    samples = find_samples(args.data)
    began = time.perf_counter()
    report = evaluate(variants, DecodedImages(samples.items, pre.transform()), batch_size=args.batch_size,
                      flops=flops, conversions=settings)
    print(f"# python benchmarks/eval_variants.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# {resolved.name}, {report.images} images ({len(report.skipped)} skipped), preprocessing {pre}, "
          f"{torch.get_num_threads()} thread(s), {time.perf_counter() - began:.0f} s")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
