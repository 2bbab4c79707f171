"""What do PHC layers cost at inference, against the same conversion with dense convolutions?

Issue 25 asks for the time of ``--phc 2`` and ``--phc 4`` against the dense conversion. One
``ccnn_convert.bench.bench_model`` run holds every variant (each mode dense, then with PHC
layers of each n, fitted to the pretrained weights), so their passes are interleaved and the
ratios are measured side by side under the same load. Run from the repository root::

    python benchmarks/phc_cost.py --model efficientnet_lite0 --modes traditional,checkered --phc 2,4 \
        --batch-size 4 --repeats 5 --threads 2 --json phc_cost.json

Prints, per variant: time per batch (median), parameters, FLOPs, and the time, FLOP and
parameter ratios to the same mode's dense conversion. PHC changes what a weight is, not how
much a convolution computes: the FLOPs above the dense ones are the Kronecker sums
(``2 n`` FLOPs per dense weight), which ``torch.utils.flop_counter`` counts in the pass it
measures, as a training step pays them; the timed eval passes keep each weight between passes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ccnn_convert.bench import TimingOptions, bench_model  # noqa: E402
from ccnn_convert.models import resolve_model  # noqa: E402
from ccnn_convert.outputs import atomic_path  # noqa: E402
from ccnn_convert.spec import ConversionSpec  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--modes", default="traditional,checkered", help="comma-separated conversion modes")
    parser.add_argument("--phc", default="2,4", help="comma-separated PHC n (each mode also runs dense)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.3f}x" if value and reference else "-"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    ns = [int(n) for n in args.phc.split(",") if n.strip()]
    specs = [ConversionSpec.build(mode, phc=n) for mode in modes for n in (None, *ns)]
    resolved = resolve_model(args.model)
    rows = bench_model(args.model, resolved.model, specs, image_size=args.image_size,
                       timing=TimingOptions(batch_size=args.batch_size, repeats=args.repeats, memory=False))
    dense = {row.mode: row for row in rows if "phc=" not in row.label}
    print(f"{args.model}, batch {args.batch_size}, {args.image_size}px, {args.threads} thread(s), "
          f"median of {args.repeats} interleaved passes")
    print(f"{'variant':28s} {'time/batch':>11s} {'params':>10s} {'FLOPs':>9s} {'time x dense':>12s} "
          f"{'FLOPs x dense':>13s} {'params x dense':>14s}")
    for row in rows:
        ref = dense[row.mode]
        print(f"{row.label:28s} {row.median_s * 1e3:9.1f}ms {row.params:>10,} {row.flops / 1e9:8.2f}G "
              f"{ratio(row.median_s, ref.median_s):>12s} {ratio(row.flops, ref.flops):>13s} "
              f"{ratio(row.params, ref.params):>14s}")
    if args.json:
        with atomic_path(args.json, force=True) as temporary:
            temporary.write_text(json.dumps({"command": sys.argv, "threads": args.threads,
                                             "rows": [row.to_dict() for row in rows]}, indent=1))


if __name__ == "__main__":
    main()
