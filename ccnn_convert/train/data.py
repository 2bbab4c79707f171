"""Training data: ``DIR/train`` and ``DIR/val`` class folders, augmentation, and global batches.

* :func:`class_folders` checks the layout and that both splits hold the same classes;
* :func:`choose_labels` maps the folders to the model's outputs: ImageNet indices for wnid
  folders and a 1000-class model (as ``ccnn-eval`` does), else the folders' own classes (sorted,
  as torchvision's ImageFolder), for which the model gets a new head when its output count differs;
* :func:`train_transform` is torchvision's augmentation, ending in the model's normalisation;
  validation uses the model's own eval preprocessing; :func:`mix_batch` mixes a loaded batch
  (torchvision's MixUp or CutMix), so that a teacher and its student see the same mixed tensor;
* :class:`GlobalBatchSampler` cuts one seeded permutation per epoch into global batches and
  gives each torchrun process its share, so N processes take the same steps as one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import Sampler

from ..data import DecodedImages, class_folder_names, find_samples, shard_indices, wnid_to_index
from ..errors import DataError, DataParameterError, ParameterError
from ..models import Preprocessing
from ..models.preprocessing import _ToRGB
from .recipe import TrainConfig

__all__ = ["CROP_AREAS", "ClassLabels", "GlobalBatchSampler", "choose_labels", "class_folders", "mix_batch",
           "training_sets", "train_transform"]

logger = logging.getLogger(__name__)

SPLITS = ("train", "val")


def class_folders(data: str | os.PathLike) -> list[str]:
    """The class folder names shared by ``DATA/train`` and ``DATA/val`` (sorted)."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataParameterError("data", f"{{param}} must be a folder holding train/ and val/, got {root}")
    found = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise DataError(f"no {split}/ folder in {root} (expected {root}/train/<class>/ and {root}/val/<class>/)")
        found[split] = class_folder_names(folder)
        if not found[split]:
            raise DataError(f"{folder} has no class folders (expected {folder}/<class>/<image>)")
    only_train = sorted(set(found["train"]) - set(found["val"]))
    only_val = sorted(set(found["val"]) - set(found["train"]))
    if only_train or only_val:
        parts = [f"only in train/: {', '.join(only_train[:5])}" if only_train else "",
                 f"only in val/: {', '.join(only_val[:5])}" if only_val else ""]
        raise DataError(f"train/ and val/ hold different classes ({'; '.join(p for p in parts if p)})")
    return found["train"]


@dataclass(frozen=True)
class ClassLabels:
    """How class folders become targets: ImageNet indices, or the folders' own classes."""

    folders: tuple[str, ...]
    class_names: tuple[str, ...] | None  # None: ImageNet indices
    new_head: int | None  # outputs of a new classifier head, if the model needs one

    @property
    def num_classes(self) -> int:
        return 1000 if self.class_names is None else len(self.class_names)


def choose_labels(folders: Sequence[str], model_classes: int, num_classes: int | None) -> ClassLabels:
    """ImageNet indices for wnid folders on a 1000-class model (unless ``num_classes`` asks for
    a new head); otherwise the folders' own classes, with a new head when the count differs."""
    folders = tuple(folders)
    wnids = wnid_to_index()
    if num_classes is None and model_classes == 1000 and all(f in wnids for f in folders):
        return ClassLabels(folders, None, None)
    if num_classes is not None and num_classes != len(folders):
        raise ParameterError("num_classes", f"{{param}} is {num_classes} but the data has {len(folders)} "
                                            "class folders")
    if num_classes is None and model_classes == len(folders):
        return ClassLabels(folders, folders, None)
    return ClassLabels(folders, folders, len(folders))


def train_transform(pre: Preprocessing, config: TrainConfig):
    """torchvision augmentation at the model's crop size, then its normalisation."""
    from torchvision import transforms as T

    interpolation = T.InterpolationMode(pre.interpolation)
    steps: list = [_ToRGB()]
    augment = config.image_augment
    if augment in CROP_AREAS:
        steps.append(T.RandomResizedCrop(pre.crop, scale=CROP_AREAS[augment], interpolation=interpolation,
                                         antialias=True))
    else:
        steps += [T.Resize(pre.resize, interpolation=interpolation, antialias=True), T.CenterCrop(pre.crop)]
    if augment in ("standard", "strong", "flip"):
        steps.append(T.RandomHorizontalFlip())
    if config.shift:
        steps.append(T.RandomCrop(pre.crop, padding=config.shift))
    steps += [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    return T.Compose(steps)


# The share of the image's area a random resized crop keeps: torchvision's default, and the
# "inception crop" of Beyer et al. (CVPR 2022, big_vision's inception_crop(area_min=5)).
CROP_AREAS = {"standard": (0.08, 1.0), "strong": (0.05, 1.0)}
MIX_ALPHA = 1.0  # mixup's and cutmix's Beta(alpha, alpha), torchvision's default


def mix_batch(images: Tensor, targets: Tensor | None, kind: str, num_classes: int | None = None) -> tuple[Tensor, Tensor | None]:
    """``images`` mixed pairwise by torchvision's MixUp or CutMix (each image with the next in the
    batch, one weight per batch from Beta(1, 1), drawn from torch's generator); ``targets`` (class
    indices of ``num_classes``) become the matching mixed one-hot rows, or stay None when not given."""
    from torchvision.transforms import v2

    mixer = {"mixup": v2.MixUp, "cutmix": v2.CutMix}[kind]
    if targets is None:  # the same draw; a placeholder label that nothing reads
        mixed, _ = mixer(alpha=MIX_ALPHA)(images, torch.ones(len(images), 1))
        return mixed, None
    return mixer(alpha=MIX_ALPHA, num_classes=num_classes)(images, targets)


def training_sets(data: str | os.PathLike, labels: ClassLabels, pre: Preprocessing,
                  config: TrainConfig) -> tuple[DecodedImages, DecodedImages]:
    """The decoded train (augmented) and val (eval preprocessing) sets; unreadable files are
    skipped and reported, as in ``ccnn-eval``."""
    root = Path(data).expanduser()
    sets = []
    for split, transform in (("train", train_transform(pre, config)), ("val", pre.transform())):
        samples = find_samples(root / split, imagenet_labels=labels.class_names is None,
                               class_names=labels.class_names)
        if split == "train":
            _warn_empty_classes(root / split, labels.folders, samples.items)
        sets.append(DecodedImages(samples.items, transform))
    return sets[0], sets[1]


def _warn_empty_classes(folder: Path, classes: Sequence[str], items: Sequence[tuple[str, int]]) -> None:
    """A class folder without a file is a class the model never sees in training: say so."""
    present = {_class_folder(folder, Path(path)) for path, _ in items}  # images may sit in subfolders
    empty = [name for name in classes if name not in present]
    if empty:
        logger.warning(f"{len(empty)} class folder(s) of {folder} hold no file and are never trained: "
                       f"{', '.join(ascii(name) for name in empty[:5])}{', ...' if len(empty) > 5 else ''}")


def _class_folder(folder: Path, path: Path) -> str:
    try:
        return path.relative_to(folder).parts[0]
    except ValueError:  # not under it as written (a link resolved): its own folder
        return path.parent.name


class GlobalBatchSampler(Sampler[list[int]]):
    """Seeded shuffled global batches of ``batch_size``; process ``rank`` takes ``rank::world_size``
    of each. The last incomplete global batch is dropped (every step has the same size)."""

    def __init__(self, length: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        if batch_size % world_size:
            raise ParameterError("batch_size", f"{{param}} {batch_size} is the global batch: it must divide "
                                               f"evenly over {world_size} processes")
        if length < batch_size:
            raise ParameterError("batch_size", f"{{param}} {batch_size} is larger than the {length} training images")
        self.length, self.batch_size, self.rank, self.world_size = length, batch_size, rank, world_size
        self.seed, self.shuffle, self.epoch = seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.length)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield shard_indices(order[start:start + self.batch_size].tolist(), self.rank, self.world_size)
