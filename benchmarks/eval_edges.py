"""Top-1 of checkered conversions with exact against reference edges, at a size that is not a multiple of 32.

At crop 240 the stride-2 steps of EfficientNet-Lite0 see 240, 120, 60, 30, 15: the last step
halves an odd size, so the far-edge samples of ``edges="reference"`` lie outside the image.
``edges="exact"`` treats them as padding. Every variant is built with
:func:`ccnn_convert.core.convert` and evaluated once over the same decoded images
(:func:`ccnn_convert.evaluate.evaluate`). Prints a markdown table.

    python benchmarks/eval_edges.py /work/shared/data/imagenet-sample/val --threads 2
    python benchmarks/eval_edges.py DATA --model efficientnet_lite0 --crop 240 --resize 272 --keep-first 0,1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ccnn_convert.core import convert  # noqa: E402
from ccnn_convert.data import DecodedImages, find_samples  # noqa: E402
from ccnn_convert.evaluate import evaluate  # noqa: E402
from ccnn_convert.models import resolve_model  # noqa: E402
from eval_variants import markdown  # noqa: E402  (beside this script)


def build_variants(model: torch.nn.Module, crop: int, keep_firsts: list[int], dilated: bool) -> dict:
    example = torch.zeros(2, 3, crop, crop)
    variants = {"original": model}
    for keep_first in keep_firsts:
        for edges in ("reference", "exact"):
            variants[f"checkered keep_first={keep_first} edges={edges}"] = convert(
                model, mode="checkered", keep_first=keep_first, edges=edges, example_input=example).eval()
    if dilated:
        variants["dilated (exact)"] = convert(model, mode="dilated", example_input=example).eval()
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="ImageFolder with <wnid>/ folders")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--crop", type=int, default=240)
    parser.add_argument("--resize", type=int, default=272)
    parser.add_argument("--keep-first", default="0")
    parser.add_argument("--dilated", action="store_true", help="also evaluate dilated mode (slow on CPU)")
    parser.add_argument("--batch-size", type=int, default=25)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        print(f"skipped: no image folder at {args.data}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    resolved = resolve_model(args.model)
    pre = resolved.preprocessing.with_overrides(resize=args.resize, crop=args.crop)
    variants = build_variants(resolved.model.eval(), args.crop, [int(k) for k in args.keep_first.split(",")],
                              args.dilated)
    samples = find_samples(args.data)
    began = time.perf_counter()
    report = evaluate(variants, DecodedImages(samples.items, pre.transform()), batch_size=args.batch_size)
    print(f"# python benchmarks/eval_edges.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# {resolved.name}, {report.images} images ({len(report.skipped)} skipped), preprocessing {pre}, "
          f"{torch.get_num_threads()} thread(s), {time.perf_counter() - began:.0f} s")
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
