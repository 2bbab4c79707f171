"""Train a toy CNN on the bundled 8x8 digits as a plain CNN and as a checkered CNN (Table 8 direction).

Sadigh & Sen 2018 ("Improving the Resolution of CNN Feature Maps Efficiently with Multisampling",
Table 8) train a small MNIST CNN as a traditional CNN and as a checkered CNN: test error
0.44 -> 0.39 % without augmentation, 0.42 -> 0.38 % with random shifts. This is an offline
reproduction of the *direction* of that comparison on scikit-learn's ``load_digits`` (1,797 8x8
images, no download):

* data: scaled to [0, 1], normalised with the train split's mean/std, zero-padded to 16x16
  (4 px each side, so shifts move real content), one fixed stratified 80/20 split;
* model: conv3x3(1->32) + three stride-2 conv3x3 stages (->64, ->64, ->128), BN + ReLU after each,
  global average pool, Linear(128, 10); converted with ``ccnn_convert.convert`` in mode
  ``traditional`` (the CNN) or ``checkered`` (``--sampler``, lattice by default), or, with
  ``--models``, ``spectral``, ``diffstride`` (learned strides, reported per seed; optional
  ``--stride-penalty``) and ``blurpool``, each with its defaults; ``--phc 0,2,4`` repeats every
  row with PHC layers of n Kronecker products (0: dense convolutions; the 1-channel stem stays
  dense: 1 is not divisible by n), Xavier-initialised as the published layers (issue 25);
* training: ``ccnn_convert.train.Trainer`` with one recipe for both (SGD, lr 0.05, cosine,
  batch 64, no label smoothing); "shift" adds a random translation of up to ``--shift`` pixels
  per axis (zero fill) to the training images, drawn with torch's global RNG;
* accuracy: test error (100 - final-epoch val top-1) per seed, mean ± std (n-1) over seeds;
* cost: seconds per epoch and peak RSS of each (model, checkpointing) pair at batch
  ``--cost-batch``, each in a fresh subprocess, with the resident memory
  before training, so that peak - baseline shows the training part.

Prints a markdown report and writes it to ``--output`` (default /tmp/digits_results.md).

    pip install -e ".[benchmarks]" && python benchmarks/train_digits.py
    python benchmarks/train_digits.py --epochs 5 --seeds 0,1 --sampler random   # a quick look
    python benchmarks/train_digits.py --models "CNN,spectral,diffstride,blurpool,checkered CNN" --shift 0 \
        --no-checkpointing-cost                                                  # issue 17's modes
    python benchmarks/train_digits.py --models "CNN,spectral,blurpool,checkered CNN,diffstride" --shift 0 \
        --phc 2,4 --skip-cost --jsonl digits_phc.jsonl                           # issue 25's PHC table
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ccnn_convert import convert
from ccnn_convert.runtime import peak_rss_since_reset, reset_peak_rss
from ccnn_convert.train import TrainConfig, Trainer

SIZE, PAD = 16, 4
# Row name -> conversion mode. The first two are the original benchmark (Table 8's direction);
# the others are issue 17's subsampling modes, on the same network and recipe.
MODES = {"CNN": "traditional", "checkered CNN": "checkered", "spectral": "spectral",
         "diffstride": "diffstride", "blurpool": "blurpool"}
DEFAULT_MODELS = ("CNN", "checkered CNN")


# --------------------------------------------------------------------------- data


def digits_sets() -> tuple[TensorDataset, TensorDataset]:
    """The fixed stratified train/test split, normalised and zero-padded to (N, 1, 16, 16)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(torch.arange(len(targets)).numpy(), test_size=0.2,
                                           stratify=digits.target, random_state=0)
    train_idx, test_idx = torch.as_tensor(train_idx), torch.as_tensor(test_idx)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    padded = nn.functional.pad((images - mean) / std, (PAD, PAD, PAD, PAD)).unsqueeze(1)
    return (TensorDataset(padded[train_idx], targets[train_idx]),
            TensorDataset(padded[test_idx], targets[test_idx]))


def shifted(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` (C, H, W) moved by (dy, dx) pixels, zero fill."""
    out = torch.zeros_like(image)
    h, w = image.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


class RandomShift(Dataset):
    """A random translation of up to ``pixels`` in each axis, drawn per item with torch's global RNG."""

    def __init__(self, base: Dataset, pixels: int):
        self.base, self.pixels = base, pixels

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int):
        image, target = self.base[index]
        dy, dx = torch.randint(-self.pixels, self.pixels + 1, (2,)).tolist()
        return shifted(image, dy, dx), target


# --------------------------------------------------------------------------- model


def conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """16x16 -> 8 -> 4 -> 2 (three stride-2 steps), global average pool, 10 classes."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_block(1, 32, 1), conv_block(32, 64, 2),
                                      conv_block(64, 64, 2), conv_block(64, 128, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def parameter_count(model: nn.Module | None = None) -> int:
    return sum(p.numel() for p in (model or DigitsCNN()).parameters())


def build(name: str, sampler: str, seed: int, phc: int = 0) -> nn.Module:
    """A freshly initialised (``seed``) DigitsCNN converted as ``name`` (a key of MODES), its
    convolutions PHC layers of ``phc`` Kronecker products (Xavier-initialised) unless 0."""
    torch.manual_seed(seed)
    mode = MODES[name]
    options = {"sampler": sampler} if mode == "checkered" else {}
    if phc:
        options.update(phc=phc, phc_init="xavier")
    return convert(DigitsCNN(), mode=mode, example_input=torch.zeros(1, 1, SIZE, SIZE), **options)


def config_for(epochs: int, batch: int, seed: int, checkpointing: bool = False,
               stride_penalty: float = 0.0) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=batch, optimizer="sgd", lr=0.05, warmup_epochs=0,
                       label_smoothing=0.0, augment="none", shift=0, seed=seed, checkpointing=checkpointing,
                       stride_penalty=stride_penalty)


def learned_strides(model: nn.Module) -> list[tuple[float, float]]:
    """The (height, width) strides of every DiffStride layer, in data-flow order."""
    from ccnn_convert.core.diffstride import diffstride_layers

    return [tuple(round(float(v), 3) for v in layer.strides.detach()) for _, layer in diffstride_layers(model)]


# --------------------------------------------------------------------------- accuracy runs


def train_one(name: str, sampler: str, shift: int, seed: int, epochs: int, data,
              stride_penalty: float = 0.0, phc: int = 0) -> tuple[float, float, list, int]:
    """-> (test error % after the last epoch, mean s/epoch, learned strides, parameters) of one run."""
    train_set, test_set = data
    if shift:
        train_set = RandomShift(train_set, shift)
    model = build(name, sampler, seed, phc)
    penalty = stride_penalty if MODES[name] == "diffstride" else 0.0
    records = Trainer(model, train_set, test_set, config_for(epochs, 64, seed, stride_penalty=penalty),
                      device="cpu", workers=0).fit()
    return (100.0 - records[-1].val_top1, statistics.mean(r.seconds for r in records), learned_strides(model),
            parameter_count(model))


def accuracy_table(args, data) -> list[dict]:
    rows = []
    for shift in sorted({0, args.shift}):
        for phc in args.phc:
            for name in args.models:
                rows.append(accuracy_row(args, data, name, shift, phc))
    return rows


def accuracy_row(args, data, name: str, shift: int, phc: int) -> dict:
    """Every seed of one (model, shift, phc); each run also appended to ``--jsonl`` as it ends."""
    errors, seconds, strides, params = [], [], [], 0
    for seed in args.seeds:
        start = time.perf_counter()
        error, per_epoch, learned, params = train_one(name, args.sampler, shift, seed, args.epochs, data,
                                                      args.stride_penalty, phc)
        errors.append(error)
        seconds.append(per_epoch)
        strides.append(learned)
        log(f"{name:14s} shift={shift} phc={phc} seed={seed}: error {error:.2f} % "
            f"({time.perf_counter() - start:.0f} s){f' strides {learned}' if learned else ''}")
        if args.jsonl:
            with args.jsonl.open("a") as out:  # one line per finished run: a long table survives a stop
                out.write(json.dumps({"model": name, "shift": shift, "phc": phc, "seed": seed, "error": error,
                                      "s_per_epoch": per_epoch, "strides": learned, "parameters": params,
                                      "epochs": args.epochs}) + "\n")
    return {"model": name, "shift": shift, "phc": phc, "errors": errors, "s_per_epoch": statistics.mean(seconds),
            "strides": strides, "seeds": list(args.seeds), "parameters": params}


# --------------------------------------------------------------------------- cost runs


def cost_one(name: str, sampler: str, checkpointing: bool, batch: int, epochs: int) -> dict:
    """Run in a fresh process: s/epoch, resident memory before training and the epochs' peak.

    ``EpochRecord.peak_memory_bytes`` is each training pass's own high-water mark (VmHWM, reset
    at the start of the epoch), so the imports' and the conversion's transient peaks do not count.
    """
    train_set, test_set = digits_sets()
    model = build(name, sampler, 0)
    trainer = Trainer(model, train_set, test_set, config_for(epochs, batch, 0, checkpointing),
                      device="cpu", workers=0)
    reset_peak_rss()
    baseline = peak_rss_since_reset()  # just reset: what is resident now
    records = trainer.fit()
    return {"s_per_epoch": statistics.mean(r.seconds for r in records), "baseline": baseline,
            "peak": max(r.peak_memory_bytes for r in records)}


def cost_table(args) -> list[dict]:
    rows = []
    for checkpointing in (False, True) if args.cost_checkpointing else (False,):
        for name in args.models:
            command = [sys.executable, __file__, "--cost-one", name, "--sampler", args.sampler,
                       "--cost-batch", str(args.cost_batch), "--cost-epochs", str(args.cost_epochs),
                       "--threads", str(args.threads)] + (["--checkpointing"] if checkpointing else [])
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append({"model": name, "checkpointing": checkpointing, **row})
            log(f"cost {name:14s} checkpointing={checkpointing}: {row}")
    return rows


# --------------------------------------------------------------------------- report


def mib(value: float) -> str:
    return f"{value / 2**20:.1f} MiB"


def accuracy_markdown(rows: list[dict], seeds: int) -> list[str]:
    lines = [f"| model | PHC n | parameters | augmentation | test error % (mean ± std, {seeds} seeds) | "
             "per-seed errors | s/epoch (batch 64) |",
             "|---|---|---:|---|---|---|---|"]
    for row in rows:
        errors = row["errors"]
        std = statistics.stdev(errors) if len(errors) > 1 else 0.0
        augmentation = f"shift ±{row['shift']} px" if row["shift"] else "none"
        lines.append(f"| {row['model']} | {row['phc'] or 'dense'} | {row['parameters']:,} | {augmentation} | "
                     f"{statistics.mean(errors):.2f} ± {std:.2f} | "
                     f"{', '.join(f'{e:.2f}' for e in errors)} | {row['s_per_epoch']:.3f} |")
    for row in rows:
        if any(row.get("strides") or ()):
            per_seed = "; ".join(f"seed {seed}: " + ", ".join(f"({h:.2f}, {w:.2f})" for h, w in learned)
                                 for seed, learned in zip(row["seeds"], row["strides"]))
            lines.append(f"\nStrides {row['model']} learned (height, width per step; initialised to 2, 2), "
                         f"shift {row['shift']}: {per_seed}")
    return lines


def cost_markdown(rows: list[dict]) -> list[str]:
    lines = ["| model | checkpointing | s/epoch | peak RSS | peak − baseline | ratio vs CNN (time / peak / peak − baseline) |",
             "|---|---|---|---|---|---|"]
    cnn = {row["checkpointing"]: row for row in rows if row["model"] == rows[0]["model"]}
    for row in rows:
        ref = cnn[row["checkpointing"]]
        extra, ref_extra = row["peak"] - row["baseline"], ref["peak"] - ref["baseline"]
        ratio = (f"{row['s_per_epoch'] / ref['s_per_epoch']:.2f} / {row['peak'] / ref['peak']:.2f} / "
                 f"{extra / ref_extra:.2f}" if ref_extra > 0 else "-")
        lines.append(f"| {row['model']} | {'yes' if row['checkpointing'] else 'no'} | {row['s_per_epoch']:.3f} | "
                     f"{mib(row['peak'])} | {mib(extra)} (baseline {mib(row['baseline'])}) | {ratio} |")
    return lines


def cost_note() -> str:
    return ("s/epoch: mean of the epochs' training seconds. Baseline: resident memory just before training. "
            "Peak RSS: the largest of the epochs' training-pass high-water marks (EpochRecord.peak_memory_bytes: "
            "VmHWM, reset at the start of each epoch; validation not included).")


def report(args, accuracy: list[dict], cost: list[dict], wall: float) -> str:
    train_size = len(digits_sets()[0])
    test_size = 1797 - train_size
    lines = [
        f"# Digits: {' vs '.join(args.models)} (Table 8's direction, Sadigh & Sen 2018; issue 17's modes)", "",
        f"- command: `{shlex.join([Path(sys.executable).name, *sys.argv])}`",
        f"- torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU; wall time {wall / 60:.1f} min",
        (f"- data: sklearn load_digits, {train_size} train / {test_size} test images (stratified, "
         "random_state=0), normalised with the train mean/std, zero-padded 8x8 -> 16x16"),
        (f"- model: DigitsCNN, {parameter_count():,} parameters (conv 1->32, stride-2 convs ->64 ->64 ->128, "
         f"BN+ReLU, GAP, Linear 128->10); checkered sampler: {args.sampler}"),
        (f"- recipe (both models): {args.epochs} epochs, batch 64, SGD nesterov momentum 0.9, lr 0.05 cosine "
         f"per step, weight decay 1e-4, no label smoothing; seeds {','.join(map(str, args.seeds))}"),
        ("- test error = 100 − final-epoch test top-1; std is the sample std (n−1); "
         f"one test image = {100 / test_size:.2f} %"), "",
    ]
    if accuracy:
        lines += ["## Accuracy", "", *accuracy_markdown(accuracy, len(args.seeds)), ""]
    if cost:
        lines += [
            f"## Cost (batch {args.cost_batch}, {args.cost_epochs} epochs, each row a fresh process)", "",
            cost_note(), "",
            *cost_markdown(cost), "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2, 3, 4],
                        help="comma-separated seeds (default 0,1,2,3,4)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sampler", default="lattice", help="checkered sampler: naive, lattice or random")
    parser.add_argument("--shift", type=int, default=2, help="max translation (px) of the shift augmentation")
    parser.add_argument("--cost-batch", type=int, default=256)
    parser.add_argument("--cost-epochs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=Path("/tmp/digits_results.md"))
    parser.add_argument("--skip-cost", action="store_true", help="only the accuracy runs")
    parser.add_argument("--skip-accuracy", action="store_true", help="only the cost runs")
    parser.add_argument("--models", type=lambda s: [m.strip() for m in s.split(",")], default=list(DEFAULT_MODELS),
                        help=f"comma-separated rows among: {', '.join(MODES)} (default: CNN,checkered CNN)")
    parser.add_argument("--stride-penalty", type=float, default=0.0,
                        help="diffstride: loss += this * diffstride_cost(model) (default 0: the same recipe)")
    parser.add_argument("--phc", type=lambda s: [int(v) for v in s.split(",")], default=[0],
                        help="comma-separated PHC n per row set (0: dense convolutions; default 0)")
    parser.add_argument("--jsonl", type=Path, default=None, help="append each finished run to this file")
    parser.add_argument("--no-checkpointing-cost", dest="cost_checkpointing", action="store_false",
                        help="cost rows without --checkpointing only")
    parser.add_argument("--cost-one", choices=list(MODES), help=argparse.SUPPRESS)  # internal: one cost run
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    unknown = [m for m in args.models if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown --models entry {unknown[0]!r}; choose from {', '.join(MODES)}")
    if any(n == 1 or n < 0 for n in args.phc):
        raise SystemExit(f"--phc takes 0 (dense) or integers of at least 2, got {args.phc}")
    torch.set_num_threads(args.threads)
    if args.cost_one:
        print(json.dumps(cost_one(args.cost_one, args.sampler, args.checkpointing, args.cost_batch, args.cost_epochs)))
        return
    start = time.perf_counter()
    accuracy = [] if args.skip_accuracy else accuracy_table(args, digits_sets())
    cost = [] if args.skip_cost else cost_table(args)
    text = report(args, accuracy, cost, time.perf_counter() - start)
    print(text)
    args.output.write_text(text)
    log(f"wrote {args.output}")


if __name__ == "__main__":
    main()
