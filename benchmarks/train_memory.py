"""Training cost of a converted model, with and without block checkpointing (``--checkpointing``).

For each model, (traditional | checkered) x (checkpointing off | on), in a fresh process each:
one untimed training step (forward + backward), then ``--steps`` timed steps. Reported: seconds
per step and the resident-memory peak of the timed steps above the memory in use before them
(Linux ``VmHWM`` after ``/proc/self/clear_refs``), and the ratios against the traditional model
without checkpointing, printed side by side::

    python benchmarks/train_memory.py resnet18 --size 112 --batch 16
    python benchmarks/train_memory.py efficientnet_lite0 --size 224 --batch 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

CONFIGS = [("traditional", False), ("traditional", True), ("checkered", False), ("checkered", True)]


def measure_one(name: str, mode: str, checkpointing: bool, size: int, batch: int, steps: int) -> dict:
    from ccnn_convert import convert, use_huge_pages
    from ccnn_convert.models import resolve_model
    from ccnn_convert.runtime import peak_rss_since_reset, reset_peak_rss
    from ccnn_convert.train import checkpoint_blocks

    use_huge_pages()
    torch.manual_seed(0)
    net = resolve_model(name, weights="none").model
    model = convert(net, mode=mode, example_input=torch.zeros(1, 3, size, size)).train()
    if checkpointing:
        model = checkpoint_blocks(model)
    images = torch.randn(batch, 3, size, size)

    def step() -> None:
        model(images).logsumexp(dim=1).mean().backward()
        for param in net.parameters():
            param.grad = None

    step()  # untimed: first-touch allocations
    reset_peak_rss()
    baseline = peak_rss_since_reset()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return {"seconds_per_step": (time.perf_counter() - start) / steps, "peak_above_baseline": peak_rss_since_reset() - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        mode, checkpointing = args.one[0], args.one[1] == "1"
        print(json.dumps(measure_one(args.model, mode, checkpointing, args.size, args.batch, args.steps)))
        return
    rows = {}
    for mode, checkpointing in CONFIGS:
        command = [sys.executable, __file__, args.model, "--size", str(args.size), "--batch", str(args.batch),
                   "--steps", str(args.steps), "--threads", str(args.threads), "--one", mode, str(int(checkpointing))]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows[mode, checkpointing] = json.loads(output.strip().splitlines()[-1])
    base = rows["traditional", False]
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {args.threads} threads, torch {torch.__version__}\n")
    print("| mode | checkpointing | s/step | peak above baseline | time / traditional | memory / traditional |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for (mode, checkpointing), r in rows.items():
        print(f"| {mode} | {'yes' if checkpointing else 'no'} | {r['seconds_per_step']:.2f} | "
              f"{r['peak_above_baseline'] / 2**20:.0f} MiB | {r['seconds_per_step'] / base['seconds_per_step']:.2f}x | "
              f"{r['peak_above_baseline'] / base['peak_above_baseline']:.2f}x |")


if __name__ == "__main__":
    main()
