"""How much does BatchNorm recalibration on a few images cost a model that conversion did not touch?

The pretrained (unconverted) efficientnet_lite0 has its BatchNorm statistics re-estimated on one
half of a seeded pick of the shared ImageNet sample (``recalibrate_batchnorm``, every layer) and
is scored on the other half, against the same model as shipped. Any loss is the sampling noise of
estimating statistics from few images: the reason ``ccnn-recalibrate --layers converted`` exists.
Run from the repository root::

    python benchmarks/recalibrate_original.py ../shared/data/imagenet-sample/val --images 160 --threads 1
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ccnn_convert.models import resolve_model
from ccnn_convert.spec import ConversionSpec
from ccnn_convert.train.calibrate import recalibrate_batchnorm

from distill_lite0 import folds, predictions, test_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images_root", type=Path)
    parser.add_argument("--images", type=int, default=160, help="images in all: half recalibrate, half score")
    parser.add_argument("--batches", default="80,16", help="recalibration batch sizes to try")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fold_a, fold_b = folds(args.images_root, args.images, seed=0)
    original = resolve_model("efficientnet_lite0")
    transform = original.preprocessing.transform()
    (calibration, _), (test, labels) = test_batch(fold_a, transform), test_batch(fold_b, transform)
    reference = predictions(original.model, test, 16)
    print(f"original: top-1 {int(reference.eq(labels).sum())}/{len(labels)}")
    for batch in (int(b) for b in args.batches.split(",")):
        model = ConversionSpec.build("traditional").apply(resolve_model("efficientnet_lite0").model, 224)
        recalibrate_batchnorm(model, [calibration[i:i + batch] for i in range(0, len(calibration), batch)])
        predicted = predictions(model, test, 16)
        print(f"recalibrated on {len(calibration)} images in batches of {batch}: top-1 "
              f"{int(predicted.eq(labels).sum())}/{len(labels)}, agreement {int(predicted.eq(reference).sum())}")


if __name__ == "__main__":
    main()
