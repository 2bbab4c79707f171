"""Unlabelled images for distillation: every image file under DIR, in any layout.

A user with their own pictures rarely has ``train/<class>/`` folders. Distillation needs none:
:func:`find_images` takes every image file under DIR (recursively, by extension, hidden files and
folders left out, sorted so that a seed means the same split everywhere) and
:func:`held_back_split` sets a seeded fraction aside, on which validation measures agreement
with the teacher. Targets are :data:`UNLABELLED`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..data import DecodedImages
from ..errors import DataError, DataParameterError, ParameterError
from ..models import Preprocessing
from .data import train_transform
from .recipe import TrainConfig

__all__ = ["UNLABELLED", "find_images", "held_back_split", "is_labelled_layout", "unlabelled_sets"]

logger = logging.getLogger(__name__)

UNLABELLED = -1  # the target of an image without a label


def is_labelled_layout(data: str | os.PathLike) -> bool:
    """DIR/train/ and DIR/val/ exist: the labelled layout of ``ccnn-train``."""
    root = Path(data).expanduser()
    return (root / "train").is_dir() and (root / "val").is_dir()


def find_images(data: str | os.PathLike) -> list[str]:
    """Every image file under ``data`` (any depth; non-image files are left out and counted in the log)."""
    root = Path(data).expanduser()
    if not root.is_dir():
        raise DataParameterError("data", f"{{param}} must be a folder of images, got {root}")
    images, others = [], 0
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            if name.lower().endswith(IMG_EXTENSIONS):
                images.append(os.path.join(folder, name))
            else:
                others += 1
    if not images:
        raise DataError(f"no image files under {root} (looked for {', '.join(IMG_EXTENSIONS)} at any depth)")
    if others:
        logger.info(f"{others} file(s) under {root} are not images by their extension and are left out")
    return images


def held_back_split(paths: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(trained, held back): a seeded ``fraction`` of ``paths`` (at least one when above 0) set aside."""
    if not 0 <= fraction < 1:
        raise ParameterError("val_fraction", f"{{param}} must be in [0, 1), got {fraction}")
    count = max(1, round(len(paths) * fraction)) if fraction > 0 else 0
    if count >= len(paths):
        raise ParameterError("val_fraction", f"{{param}} {fraction} leaves none of the {len(paths)} images "
                                             "to train on")
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return ([p for i, p in enumerate(paths) if i not in held], [p for i, p in enumerate(paths) if i in held])


def unlabelled_sets(data: str | os.PathLike, pre: Preprocessing, config: TrainConfig,
                    val_fraction: float) -> tuple[DecodedImages, DecodedImages | None]:
    """The decoded trained part (augmented) and held-back part (eval preprocessing; None at fraction 0)."""
    trained, held = held_back_split(find_images(data), val_fraction, config.seed)
    train_set = DecodedImages([(p, UNLABELLED) for p in trained], train_transform(pre, config))
    val_set = DecodedImages([(p, UNLABELLED) for p in held], pre.transform()) if held else None
    return train_set, val_set
