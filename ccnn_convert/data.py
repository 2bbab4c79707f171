"""Evaluation data: the ImageNet class table, the two folder layouts, and decoding that never crashes.

Two layouts are read:

* ImageFolder: ``DATA/<wnid>/<image>``. Folder names are mapped to the *standard* 1000-class
  index (sorted wnid order), so a folder holding only some classes still gets the right labels.
* Flat folder + labels file: ``DATA/<image>`` with a labels file: either Kaggle's
  ``LOC_val_solution.csv`` (``ImageId,PredictionString``; the first token is the wnid) or a plain
  ``filename,label`` CSV (label = class index or wnid; an optional header row is skipped).

Files that cannot be decoded are not fatal: they come out of the dataset as :class:`Skipped`
and are counted by the evaluation loop. :func:`decode_rgb` is the one image decoder of the
package (evaluation, ONNX verification and visualisation all read images through it).
"""

from __future__ import annotations

import csv
import functools
import os
from collections import defaultdict
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from .errors import DataError, DataParameterError

__all__ = [
    "Batch", "DecodedImages", "ImageNetClass", "Item", "Samples", "Skipped", "class_folder_names", "collate_items",
    "decode_rgb", "find_samples", "imagenet_classes", "map_sorted_folders", "map_wnid_folders",
    "named_folder_mapper", "parse_label", "read_labels_file", "shard_indices", "stratified_indices", "wnid_to_index",
]

KAGGLE_HEADER = ("imageid", "predictionstring")


class ImageNetClass(NamedTuple):
    index: int
    wnid: str
    name: str


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[ImageNetClass, ...]:
    """The shipped 1000-class table (index = position in sorted wnid order)."""
    text = resources.files("ccnn_convert").joinpath("resources/imagenet_classes.tsv").read_text("utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line.strip()]
    return tuple(ImageNetClass(int(index), wnid, name) for index, wnid, name in rows)


@functools.lru_cache(maxsize=1)
def wnid_to_index() -> dict[str, int]:
    return {c.wnid: c.index for c in imagenet_classes()}


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


# --------------------------------------------------------------------------------------------
# Finding the samples
# --------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """(path, target) pairs found under DATA, before any image is decoded."""

    items: list[tuple[str, int]]
    layout: str  # "imagefolder" | "flat+kaggle" | "flat+csv"
    root: str

    @property
    def targets(self) -> list[int]:
        return [target for _, target in self.items]


class _StandardIndexImageFolder(ImageFolder):
    """ImageFolder whose class folders map to a given index (the ImageNet table) instead of
    their rank among the folders present; every non-hidden file is a candidate image, so that
    non-image files are reported as skipped rather than silently ignored."""

    def __init__(self, root: str, class_to_idx: Callable[[list[str]], dict[str, int]]):
        self._map_classes = class_to_idx
        super().__init__(root, is_valid_file=lambda p: not _is_hidden(os.path.basename(p)),
                         allow_empty=True)

    def find_classes(self, directory):
        folders = class_folder_names(directory)
        mapping = self._map_classes(folders)
        return sorted(mapping, key=mapping.get), mapping


def class_folder_names(directory: str | os.PathLike) -> list[str]:
    """The class folders of an ImageFolder layout: its non-hidden subfolders, sorted."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not _is_hidden(e.name))


def map_wnid_folders(folders: Sequence[str]) -> dict[str, int]:
    """Folder name (a wnid) -> standard ImageNet index; unknown names are a DataError."""
    table = wnid_to_index()
    unknown = [f for f in folders if f not in table]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        raise DataError(f"class folders that are not ImageNet wnids: {shown}")
    return {f: table[f] for f in folders}


def named_folder_mapper(class_names: Sequence[str]) -> Callable[[Sequence[str]], dict[str, int]]:
    """Folder name -> its index in ``class_names`` (a model trained on its own classes, whose
    artifact stores them); a folder that is not one of them is a DataError."""
    index = {name: i for i, name in enumerate(class_names)}

    def mapper(folders: Sequence[str]) -> dict[str, int]:
        unknown = [f for f in folders if f not in index]
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
            raise DataError(f"class folders that are not among the model's {len(index)} classes: {shown}")
        return {f: index[f] for f in folders}

    return mapper


def map_sorted_folders(folders: Sequence[str]) -> dict[str, int]:
    """torchvision's default: class index = rank of the folder name (for non-ImageNet models)."""
    return {f: i for i, f in enumerate(sorted(folders))}


def map_own_folders(folders: Sequence[str]) -> dict[str, int]:
    """For a model that is not a 1000-class ImageNet one and names no classes: wnid folders keep
    their ImageNet index (so that a class the model does not have is refused by the caller, not
    given another class's rank), other names their sorted rank."""
    table = wnid_to_index()
    if folders and all(f in table for f in folders):
        return {f: table[f] for f in folders}
    return map_sorted_folders(folders)


def find_samples(data: str | os.PathLike, labels: str | os.PathLike | None = None,
                 imagenet_labels: bool = True, class_names: Sequence[str] | None = None) -> Samples:
    """Scan DATA (and the labels file) into (path, target) pairs; layout errors are DataError.

    Class folders map to ImageNet indices (``imagenet_labels``), to their index in
    ``class_names`` when given (a model trained on its own classes), or to their sorted rank.
    """
    root = Path(data)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataParameterError("data", f"{{param}} must be a folder of images, got a file: {root}")
    entries = [e for e in os.scandir(root) if not _is_hidden(e.name)]
    has_dirs = any(e.is_dir() for e in entries)
    has_files = any(e.is_file() for e in entries)
    if not entries:
        raise DataError(f"data folder is empty: {root}")
    if labels is not None:
        if not has_files:
            raise DataParameterError("labels", f"{{param}} needs a flat folder of images, but {root} has no "
                                                "files at its top level")
        return _flat_folder_samples(root, Path(labels))
    if not has_dirs:
        raise DataParameterError("labels", f"{root} is a flat folder of files: pass {{param}} "
                                            "(LOC_val_solution.csv or a filename,label CSV) or use "
                                            "<wnid>/<image> folders")
    if class_names is not None:
        return _image_folder_samples(root, named_folder_mapper(class_names))
    return _image_folder_samples(root, map_wnid_folders if imagenet_labels else map_own_folders)


def _image_folder_samples(root: Path, mapper: Callable[[Sequence[str]], dict[str, int]]) -> Samples:
    folder = _StandardIndexImageFolder(str(root), mapper)
    if not folder.samples:
        raise DataError(f"no files in the class folders under {root}")
    return Samples(items=list(folder.samples), layout="imagefolder", root=str(root))


def _flat_folder_samples(root: Path, labels_path: Path) -> Samples:
    if not labels_path.is_file():
        raise DataError(f"labels file not found: {labels_path}")
    files = sorted((e for e in os.scandir(root) if e.is_file()), key=lambda e: e.name)  # read once
    names = {e.name for e in files}
    layout, by_name = read_labels_file(labels_path, names | {Path(name).stem for name in names})
    by_stem = {Path(name).stem: target for name, target in by_name.items()}
    items, unlabeled = [], []
    for entry in files:
        if _is_hidden(entry.name) or _same_file(entry.path, labels_path):
            continue
        target = by_name.get(entry.name, by_stem.get(Path(entry.name).stem))
        if target is not None:
            items.append((entry.path, target))
        elif entry.name.lower().endswith(IMG_EXTENSIONS):
            unlabeled.append(entry.name)
        # An unlisted non-image file (a README, ...) is not part of the data set: ignore it.
    if not items:
        raise DataError(f"labels file {labels_path.name} does not match the images: "
                        f"no file in {root} is listed in it")
    if unlabeled:
        raise DataError(f"labels file {labels_path.name} does not match the images: "
                        f"{len(unlabeled)} image(s) in {root} have no label (first: {unlabeled[0]})")
    return Samples(items=items, layout=layout, root=str(root))


def _same_file(a: str, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def read_labels_file(path: str | os.PathLike, names: set[str] | None = None) -> tuple[str, dict[str, int]]:
    """Read a labels CSV -> (layout, {filename or image id: standard index}).

    Kaggle's ``LOC_val_solution.csv`` is recognised by its header; anything else is read as
    ``filename,label`` rows where label is a class index or a wnid. A first row whose label is
    neither is a header, unless it names one of ``names`` (the folder's files, when known): then
    it is an image with an invalid label.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    except UnicodeDecodeError:
        raise DataError(f"labels file {path.name} is not a text CSV file") from None
    if not rows:
        raise DataError(f"labels file is empty: {path}")
    if tuple(cell.strip().lower() for cell in rows[0][:2]) == KAGGLE_HEADER:
        return "flat+kaggle", _kaggle_labels(path, rows[1:])
    return "flat+csv", _plain_labels(path, rows, names)


def _kaggle_labels(path: Path, rows: list[list[str]]) -> dict[str, int]:
    table, labels = wnid_to_index(), {}
    for line, row in enumerate(rows, start=2):
        tokens = row[1].split() if len(row) >= 2 else []
        if not tokens:
            raise DataError(f"{path.name} line {line}: expected ImageId,PredictionString")
        if tokens[0] not in table:
            raise DataError(f"{path.name} line {line}: unknown wnid {tokens[0]!r}")
        _add_label(labels, row[0].strip(), table[tokens[0]], path, line)
    return labels


def _plain_labels(path: Path, rows: list[list[str]], names: set[str] | None = None) -> dict[str, int]:
    labels = {}
    for line, row in enumerate(rows, start=1):
        if len(row) != 2:
            raise DataError(f"{path.name} line {line}: expected 2 columns (filename,label), got {len(row)}")
        name, raw = row[0].strip(), row[1].strip()
        target = parse_label(raw)
        if target is None:
            if line == 1 and (names is None or name not in names):
                continue  # a header row such as "filename,label"
            raise DataError(f"{path.name} line {line}: label {raw!r} is neither a class index nor a wnid")
        _add_label(labels, name, target, path, line)
    return labels


def _add_label(labels: dict[str, int], name: str, target: int, path: Path, line: int) -> None:
    """One label per file: a repeated row is harmless, a conflicting one is an error."""
    if labels.get(name, target) != target:
        raise DataError(f"{path.name} line {line}: {name!r} is labelled {target} here and {labels[name]} "
                        "on an earlier line")
    labels[name] = target


def parse_label(text: str) -> int | None:
    """A class index ("207") or an ImageNet wnid ("n02099601") -> index; None if neither."""
    if text.isdigit():
        return int(text)
    return wnid_to_index().get(text)


# --------------------------------------------------------------------------------------------
# Choosing a subset
# --------------------------------------------------------------------------------------------


def stratified_indices(targets: Sequence[int], limit: int | None) -> list[int]:
    """Pick ``limit`` samples round-robin over classes: one image of every class (classes in
    index order), then a second of every class, and so on. When a round has more classes than
    images still wanted, the classes taken are spread evenly over that round's classes, so a
    small limit still covers the whole class list instead of its first classes."""
    if limit is None or limit >= len(targets):
        return list(range(len(targets)))
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, target in enumerate(targets):
        by_class[target].append(i)
    queues = [by_class[c] for c in sorted(by_class)]
    picked: list[int] = []
    depth = 0
    while len(picked) < limit:
        available = [queue for queue in queues if depth < len(queue)]
        wanted = limit - len(picked)
        if len(available) > wanted:  # centre of each of ``wanted`` equal slices of the round
            available = [available[(2 * i + 1) * len(available) // (2 * wanted)] for i in range(wanted)]
        picked.extend(queue[depth] for queue in available)
        depth += 1
    return sorted(picked)


def shard_indices(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share: every world_size-th index. Unlike DistributedSampler nothing is
    padded or repeated, so summed counts equal a single-process run exactly."""
    return list(indices[rank::world_size])


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


class Skipped(NamedTuple):
    path: str
    reason: str


class Item(NamedTuple):
    index: int
    image: torch.Tensor
    uncropped: torch.Tensor | None  # for shift consistency: preprocessed, not yet cropped
    target: int


class Batch(NamedTuple):
    images: torch.Tensor
    uncropped: torch.Tensor | None
    targets: torch.Tensor
    indices: torch.Tensor
    skipped: list[Skipped]

    @property
    def files(self) -> int:
        return len(self.targets) + len(self.skipped)


def decode_rgb(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image file as RGB (grayscale, palette, CMYK and RGBA converted)."""
    with Image.open(path) as image:
        return image.convert("RGB")  # convert() forces the full decode, so truncation shows here


class DecodedImages(Dataset):
    """Decode each file once and apply one or two transforms; undecodable files -> Skipped."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable,
                 uncropped_transform: Callable | None = None):
        self.samples = list(samples)
        self.transform = transform
        self.uncropped_transform = uncropped_transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Item | Skipped:
        path, target = self.samples[index]
        try:
            image = decode_rgb(path)
        except Exception as exc:  # any decoder failure means "not a usable image"
            reason = " ".join(str(exc).split()) or type(exc).__name__
            return Skipped(path, reason[:200])
        uncropped = self.uncropped_transform(image) if self.uncropped_transform else None
        return Item(index, self.transform(image), uncropped, target)


def collate_items(batch: list[Item | Skipped]) -> Batch:
    """Stack the decoded items; pass the skipped ones through so they are counted."""
    items = [b for b in batch if isinstance(b, Item)]
    skipped = [b for b in batch if isinstance(b, Skipped)]
    if not items:
        empty = torch.empty(0)
        return Batch(empty, None, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped)
    uncropped = torch.stack([i.uncropped for i in items]) if items[0].uncropped is not None else None
    return Batch(
        images=torch.stack([i.image for i in items]),
        uncropped=uncropped,
        targets=torch.tensor([i.target for i in items], dtype=torch.long),
        indices=torch.tensor([i.index for i in items], dtype=torch.long),
        skipped=skipped,
    )
