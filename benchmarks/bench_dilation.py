"""Native dilation against torchvision's dilated ResNet-50 (issue 11, part 2), in one run.

Three dilated ResNet-50s with the same (random) weights, all with the stem kept (keep_first=2,
torchvision's ``replace_stride_with_dilation=[True, True, True]``):

* ``torchvision``: torchvision's own dilated network (the reference, and the goal: ratio <= 1.0),
* ``native``: ``convert(model, mode="dilated", dilation="native")`` (strides removed, later
  layers dilated: the same network, built for any traced model),
* ``multisample``: ``convert(model, mode="dilated", dilation="multisample")`` (64 folded submaps).

It checks that the three agree, then times them interleaved (round ``r`` starts at variant
``r mod 3``, so drift of a shared machine hits all alike), and prints medians (wall clock and
process CPU time), peak memory of one forward pass (``ccnn_convert.bench.forward_peak_bytes``)
and the ratios to torchvision.

    python benchmarks/bench_dilation.py                    # batch 2, 224 px, 2 threads, 5 repeats
    python benchmarks/bench_dilation.py --errors           # also: errors at uneven sizes, keep_first 2-4

Like the commands, it first calls ``ccnn_convert.use_huge_pages()``; ``--no-huge-pages``
measures with 4 KiB pages (``docs/results.md`` has both).
    python benchmarks/bench_dilation.py --device cuda --batch 8 --repeats 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ccnn_convert import convert
from ccnn_convert.cpu_memory import SWITCH, use_huge_pages
from ccnn_convert.bench.measure import forward_peak_bytes, time_interleaved


def _random_resnet50() -> torch.nn.Module:
    """ResNet-50 with seeded random weights and BatchNorm statistics, so that differences show."""
    torch.manual_seed(0)
    base = torchvision.models.resnet50().eval()
    for module in base.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 1.5)
    return base


def _models(device: torch.device, size: int) -> dict[str, torch.nn.Module]:
    base = _random_resnet50()
    reference = torchvision.models.resnet50(replace_stride_with_dilation=[True, True, True]).eval()
    reference.load_state_dict(base.state_dict())
    example = torch.zeros(1, 3, size, size)
    models = {
        "torchvision": reference,
        "native": convert(base, mode="dilated", dilation="native", keep_first=2, example_input=example),
        "multisample": convert(base, mode="dilated", dilation="multisample", keep_first=2, example_input=example),
    }
    return {label: model.eval().to(device) for label, model in models.items()}


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out - reference).abs().max() / reference.abs().max()).item()


def print_errors(sizes=((193, 193), (224, 224), (225, 225), (299, 299), (240, 320))) -> None:
    """Max relative error of the logits against torchvision's dilated ResNet-50, batch 1.

    keep_first 2, 3, 4 line up with ``replace_stride_with_dilation`` [T, T, T], [F, T, T], [F, F, T].
    """
    base = _random_resnet50()
    print("\nmax relative error of the logits vs torchvision's dilated ResNet-50 (batch 1)")
    print(f"{'input':>8s} {'keep_first':>10s} {'multisample':>12s} {'native':>8s}")
    for keep_first, flags in ((2, [True] * 3), (3, [False, True, True]), (4, [False, False, True])):
        reference = torchvision.models.resnet50(replace_stride_with_dilation=flags).eval()
        reference.load_state_dict(base.state_dict())
        for height, width in sizes:
            x = torch.randn(1, 3, height, width)
            errors = []
            for dilation in ("multisample", "native"):
                model = convert(base, mode="dilated", dilation=dilation, keep_first=keep_first, example_input=x)
                with torch.no_grad():
                    errors.append(_relative_error(model.eval()(x), reference(x)))
            print(f"{height}x{width:<4d} {keep_first:>10d} {errors[0]:12.1e} {errors[1]:8.1e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-huge-pages", action="store_true", help="4 KiB pages instead of use_huge_pages()")
    parser.add_argument("--errors", action="store_true", help="also print errors at uneven sizes (CPU, a few minutes)")
    args = parser.parse_args(argv)
    if args.no_huge_pages:
        os.environ[SWITCH] = "0"
    pages = "huge pages" if use_huge_pages() else "4 KiB pages"  # before any tensor is made
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = _models(device, args.size)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)

    with torch.no_grad():
        outputs = {label: model(x) for label, model in models.items()}  # also the warm-up pass
    reference = outputs["torchvision"]
    for label, out in outputs.items():
        print(f"{label:12s} max relative error vs torchvision: {_relative_error(out, reference):.1e}")

    peaks = {label: forward_peak_bytes(model, x, device) for label, model in models.items()}
    runs = {label: (lambda m=model: m(x)) for label, model in models.items()}
    times = time_interleaved(runs, args.repeats, device)
    wall = {label: statistics.median(t for t, _ in passes) for label, passes in times.items()}
    cpu = {label: statistics.median(c for _, c in passes) for label, passes in times.items()}

    print(f"\nResNet-50 dilated (keep_first=2 = replace_stride_with_dilation=[True]*3), batch {args.batch}, "
          f"{args.size}x{args.size}, {device}, {args.threads} threads, {pages}, "
          f"median of {args.repeats} interleaved passes")
    print(f"{'variant':12s} {'time s':>8s} {'ratio':>6s} {'CPU s':>8s} {'ratio':>6s} {'peak MiB':>9s} {'ratio':>6s}")
    for label in models:
        print(f"{label:12s} {wall[label]:8.3f} {wall[label] / wall['torchvision']:6.2f} "
              f"{cpu[label]:8.3f} {cpu[label] / cpu['torchvision']:6.2f} "
              f"{peaks[label] / 2**20:9.1f} {peaks[label] / peaks['torchvision']:6.2f}")
    print(f"\nnative / torchvision time ratio: {wall['native'] / wall['torchvision']:.3f} (goal <= 1.0); "
          f"native / multisample: {wall['native'] / wall['multisample']:.3f}")
    if args.errors:
        print_errors()


if __name__ == "__main__":
    main()
