"""ONNX Runtime vs PyTorch eager latency for exported original, checkered and dilated models.

For each model and mode: ``ccnn_convert.export.export`` (torch.export -> ONNX, verified against
PyTorch at two batch sizes), then its benchmark: PyTorch eager and ONNX Runtime on the same batch,
runs interleaved, medians, printed side by side with the ratio. Dilated networks at 224 px cost
hundreds of times the original, so they get ``--dilated-repeats`` timed runs (default 1) and no
warm-up run beyond the verification passes.

    python benchmarks/bench_export.py                       # resnet50, densenet169, efficientnet_lite0
    python benchmarks/bench_export.py --models resnet50 --modes checkered --repeats 10
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ccnn_convert import use_huge_pages  # noqa: E402
from ccnn_convert.export import BenchmarkOptions, export  # noqa: E402

MODELS = ("resnet50", "densenet169", "efficientnet_lite0")
MODES = ("original", "checkered", "dilated")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dilated-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--provider", default="cpu")
    args = parser.parse_args(argv)
    use_huge_pages()
    print(f"# python benchmarks/bench_export.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# batch {args.batch_size}, {args.threads} thread(s) for both, provider {args.provider}, "
          f"torch {torch.__version__}")
    header = (f"{'model':<19} {'mode':<10} {'nodes':>6} {'verify max rel':>14} {'PyTorch':>10} {'ORT':>10} "
              f"{'ORT / PyTorch':>13} {'runs':>4} {'export+verify':>13}")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as folder:
        for name in [m for m in args.models.split(",") if m]:
            weights = "DEFAULT" if name.startswith("efficientnet_lite") else "none"
            for mode in [m for m in args.modes.split(",") if m]:
                dilated = mode == "dilated"
                repeats = args.dilated_repeats if dilated else args.repeats
                began = time.perf_counter()
                timing = BenchmarkOptions(batch=args.batch_size, repeats=repeats, warmup=0 if dilated else 2)
                result = export(name, Path(folder) / f"{name}_{mode}.onnx", mode=mode, weights=weights,
                                provider=args.provider, benchmark=timing, threads=args.threads, force=True)
                b = result.benchmark
                worst = max(c.max_rel for c in result.verification.checks)
                total = time.perf_counter() - began
                print(f"{name:<19} {mode:<10} {result.info.nodes:>6} {worst:>14.2e} {b.torch_ms / 1000:>9.3f}s "
                      f"{b.ort_ms / 1000:>9.3f}s {b.ort_ms / b.torch_ms:>12.2f}x {repeats:>4} {total:>12.0f}s",
                      flush=True)
                Path(result.path).unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
