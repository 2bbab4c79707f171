"""Our checkered layers against the reference implementation's way of computing them.

The reference implementation (Sadigh & Sen's code) keeps submaps in a 5-D tensor
``(B, C, S, H, W)`` and runs every strided layer once per window offset (four times for stride
2), then keeps the samples each submap's sampler asks for: half of them in checkered mode. We do
not vendor that code. This script re-creates its cost model inside our converted graph: the
multisampling functions are swapped for the ``four_phase_*`` versions below (5-D layout, one 3-D
conv/pool call per offset, then a gather), and both graphs must give the same logits before
anything is timed. Every other layer is ours in both (submaps folded into the batch, one call),
so the reference's real cost is, if anything, underestimated here.

Printed side by side in one run, per model at batch 4, 224x224, one thread, checkered lattice:
time per batch of the original, ours and the reference-style model, the time and FLOP ratios,
and how much faster ours is.

    python benchmarks/bench_reference.py
    python benchmarks/bench_reference.py --models resnet50 --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ccnn_convert import convert, count_flops, use_huge_pages
from ccnn_convert.core import layers  # noqa: E402
from ccnn_convert.bench import fmt_ratio, fmt_seconds, time_interleaved  # noqa: E402
from ccnn_convert.models import resolve_model  # noqa: E402

MODELS = ("squeezenet1_1", "resnet50", "resnet152", "densenet169")


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[-1])


def _all_phases(x, table, run_3d, pad_value: float, kernel, stride, padding, dilation=1, ceil_mode=False):
    """Run ``run_3d`` on the 5-D input once per window offset; keep the samples ``table`` asks for.

    ``x`` is our folded ``(S*B, C, H, W)``; the phases are computed on the reference's 5-D layout
    ``(B, C, S, H, W)`` and the result is folded back, sample-major, like ours. Phase ``(dy, dx)``
    reads the padded input shifted by ``(dy, dx)``, filled at the far edge with ``pad_value``.
    """
    n, submaps, _ = table.shape
    kernel, stride, padding, dilation = _pair(kernel), _pair(stride), _pair(padding), _pair(dilation)
    out = [layers.pooled_size(x.shape[2 + a], kernel[a], stride[a], padding[a], dilation[a], ceil_mode)
           for a in (0, 1)]
    extent = [(out[a] - 1) * stride[a] + dilation[a] * (kernel[a] - 1) + 1 for a in (0, 1)]  # rows one phase reads
    far = [max(0, extent[a] + stride[a] - 1 - x.shape[2 + a] - padding[a]) for a in (0, 1)]
    x5 = x.reshape(submaps, -1, *x.shape[1:]).permute(1, 2, 0, 3, 4).contiguous()
    padded = F.pad(x5, (padding[1], far[1], padding[0], far[0]), value=pad_value)
    phases = torch.stack([run_3d(padded[..., dy:dy + extent[0], dx:dx + extent[1]])
                          for dy in range(stride[0]) for dx in range(stride[1])])
    phase = table[..., 1] * stride[1] + table[..., 2]  # (n, S)
    picked = phases[phase, :, :, torch.arange(submaps).expand(n, submaps)]  # (n, S, B, C, h, w)
    return picked.reshape(-1, *picked.shape[3:])


def four_phase_conv2d(x, table, weight, bias, stride, padding, dilation, groups, padding_mode="zeros"):
    assert padding_mode == "zeros" and not isinstance(padding, str)
    stride, dilation = _pair(stride), _pair(dilation)
    run = lambda p: F.conv3d(p, weight.unsqueeze(2), bias, (1, *stride), 0, (1, *dilation), groups)  # noqa: E731
    return _all_phases(x, table, run, 0.0, weight.shape[2:], stride, padding, dilation)


def four_phase_max_pool2d(x, table, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False):
    kernel, stride, dilation = _pair(kernel_size), _pair(stride or kernel_size), _pair(dilation)
    run = lambda p: F.max_pool3d(p, (1, *kernel), (1, *stride), 0, (1, *dilation))  # noqa: E731
    return _all_phases(x, table, run, -math.inf, kernel, stride, padding, dilation, ceil_mode)


def four_phase_avg_pool2d(x, table, kernel_size, stride=None, padding=0, ceil_mode=False,
                          count_include_pad=True, divisor_override=None):
    assert divisor_override is None and (count_include_pad or _pair(padding) == (0, 0))
    kernel, stride = _pair(kernel_size), _pair(stride or kernel_size)
    run = lambda p: F.avg_pool3d(p, (1, *kernel), (1, *stride), 0)  # noqa: E731
    return _all_phases(x, table, run, 0.0, kernel, stride, padding, 1, ceil_mode)


@contextlib.contextmanager
def reference_style():
    """Inside: converted models compute every strided layer the reference's way."""
    with mock.patch.object(layers, "multisample_conv2d", four_phase_conv2d), \
            mock.patch.object(layers, "multisample_max_pool2d", four_phase_max_pool2d), \
            mock.patch.object(layers, "multisample_avg_pool2d", four_phase_avg_pool2d):
        yield


def measure(name: str, repeats: int, batch: int, size: int) -> dict:
    torch.manual_seed(0)
    original = resolve_model(name, weights="none").model.eval()
    ours = convert(original, mode="checkered", sampler="lattice", example_input=torch.zeros(1, 3, size, size)).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        expected = ours(x)
        with reference_style():
            got = ours(x)
            reference_flops = count_flops(ours, x)
    # Same model computed two ways; random-weight logits can be ~1e5, so compare to their scale.
    difference = ((got - expected).abs().max() / expected.abs().max()).item()
    assert difference <= 1e-4, f"{name}: reference-style logits differ from ours by {difference:.2e} of their scale"

    def run_reference():
        with reference_style():
            ours(x)

    runs = {"original": lambda: original(x), "ours": lambda: ours(x), "reference-style": run_reference}
    with torch.no_grad():
        for run in runs.values():  # warm-up
            run()
    times = time_interleaved(runs, repeats, torch.device("cpu"))
    wall = {label: statistics.median(t[0] for t in passes) for label, passes in times.items()}
    flops = {"original": count_flops(original, x), "ours": count_flops(ours, x), "reference-style": reference_flops}
    return {"model": name, "wall": wall, "flops": flops}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    use_huge_pages()
    print(f"# python benchmarks/bench_reference.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# checkered lattice, batch {args.batch_size}, {args.size}x{args.size}, {args.threads} thread(s), "
          f"median of {args.repeats}, torch {torch.__version__}")
    header = f"{'model':<14} {'original':>9} {'ours':>9} {'reference':>10} {'ours x':>7} {'ref x':>7} " \
             f"{'FLOPs ours x':>12} {'FLOPs ref x':>11} {'ours faster by':>14}"
    print(header)
    print("-" * len(header))
    for name in [m for m in args.models.split(",") if m]:
        r = measure(name, args.repeats, args.batch_size, args.size)
        w, f = r["wall"], r["flops"]
        print(f"{name:<14} {fmt_seconds(w['original']):>9} {fmt_seconds(w['ours']):>9} "
              f"{fmt_seconds(w['reference-style']):>10} {fmt_ratio(w['ours'] / w['original']):>7} "
              f"{fmt_ratio(w['reference-style'] / w['original']):>7} {fmt_ratio(f['ours'] / f['original']):>12} "
              f"{fmt_ratio(f['reference-style'] / f['original']):>11} "
              f"{fmt_ratio(w['reference-style'] / w['ours']):>14}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
