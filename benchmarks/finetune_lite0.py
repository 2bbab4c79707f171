"""Fine-tune checkered efficientnet_lite0 for one epoch end to end, and check the artifact.

What it measures (docs/results.md, "Training"):

* a consistency check, not an accuracy claim: the top-1 that ``ccnn-eval`` gives the trained
  artifact (``best.pt``) equals the val top-1 that the training run printed for the same images;
* the training throughput (images/s over the epoch) of checkered efficientnet_lite0 against the
  same model trained unconverted (``--mode traditional``), with the same recipe, side by side.

Data: the shared ImageNet sample has one image per class, so the split is the same images twice:
``train/<wnid>/`` (augmented) and ``val/<wnid>/`` (the model's eval preprocessing), as symlinks
in a temporary folder. Run from the repository root::

    python benchmarks/finetune_lite0.py ../shared/data/imagenet-sample/val --images 96 --threads 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from ccnn_convert import use_huge_pages
from ccnn_convert.evaluate import evaluate_model
from ccnn_convert.train import TrainConfig, train_model


def make_split(source: Path, folder: Path, images: int) -> int:
    """train/ and val/ with the first ``images`` class folders of ``source`` (symlinks)."""
    classes = sorted(p for p in source.iterdir() if p.is_dir())[:images]
    for split in ("train", "val"):
        for cls in classes:
            (folder / split / cls.name).mkdir(parents=True)
            for image in sorted(cls.iterdir()):
                os.symlink(image.resolve(), folder / split / cls.name / image.name)
    return sum(1 for _ in (folder / "train").rglob("*.*"))


def train(mode: str, data: Path, out: Path, args):
    config = TrainConfig(epochs=1, batch_size=args.batch_size, lr=args.lr, label_smoothing=0.1, seed=0)
    return train_model("efficientnet_lite0", data, out, config=config, mode=mode, workers=args.workers,
                       device="cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images_root", type=Path, help="ImageNet-style <wnid>/<image> folder (the shared sample)")
    parser.add_argument("--images", type=int, default=96, help="how many class folders (one image each) to use")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    use_huge_pages()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        count = make_split(args.images_root, tmp / "data", args.images)
        print(f"{count} images, the same in train/ and val/; torch {torch.__version__}, {args.threads} threads")
        rows = {}
        for mode in ("traditional", "checkered"):
            rows[mode] = train(mode, tmp / "data", tmp / mode, args).history[-1]
        record = rows["checkered"]
        report = evaluate_model(str(tmp / "checkered" / "best.pt"), tmp / "data" / "val", workers=args.workers,
                                device="cpu")
        evaluated = {r.mode: r.top1 for r in report.results}["checkered"]
    print("\n| training (1 epoch) | train img/s | epoch s | val top-1 printed by training |")
    print("| --- | --- | --- | --- |")
    for mode, r in rows.items():
        print(f"| {mode} | {r.images_per_s:.2f} | {r.seconds:.1f} | {r.val_top1:.2f} |")
    ratio = rows["checkered"].images_per_s / rows["traditional"].images_per_s
    print(f"\nthroughput checkered / traditional: {ratio:.3f}x "
          f"({1 / ratio:.2f}x the time per image)")
    print(f"ccnn-eval top-1 of checkered best.pt on val/: {evaluated:.2f} "
          f"(training printed {record.val_top1:.2f}): {'equal' if abs(evaluated - record.val_top1) < 1e-9 else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
