"""What the evaluation counts, and the report it returns.

* per batch: :func:`topk_correct`, :func:`top1_agreement`, and the seeded crops of the shift
  consistency test (:func:`shift_offsets`, :func:`crops_at`; Zhang 2019);
* per mode: :class:`ModeResult`, counts from which the percentages are derived, so that counts
  from several torchrun ranks can simply be summed;
* per run: :class:`EvalReport` and :func:`write_json`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from .data import Skipped
from .outputs import atomic_path
from .spec import ORIGINAL

__all__ = ["EvalReport", "ModeResult", "crops_at", "shift_offsets", "top1_agreement", "topk_correct",
           "write_json"]


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """How many rows have their target among the k highest logits, for each k.

    k larger than the number of classes counts every row as correct (all classes are "top-k").
    """
    if logits.shape[0] == 0:
        return {k: 0 for k in ks}
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices
    hits = top.eq(targets.view(-1, 1).to(top.device))
    return {k: int(hits[:, : min(k, max_k)].any(dim=1).sum()) for k in ks}


def top1_agreement(logits_a: Tensor, logits_b: Tensor) -> int:
    """How many rows have the same arg-max class in both."""
    return int(logits_a.argmax(dim=1).eq(logits_b.argmax(dim=1)).sum())


def shift_offsets(indices: Sequence[int], seed: int, room: int) -> Tensor:
    """Two random (top, left) crop offsets in [0, room] per image: shape (N, 2, 2).

    Seeded by (seed, dataset index), so an image gets the same two crops for every mode, for any
    batch size and under any sharding.
    """
    rows = [np.random.default_rng([seed, int(i)]).integers(0, room + 1, size=(2, 2)) for i in indices]
    return torch.as_tensor(np.array(rows, dtype=np.int64).reshape(-1, 2, 2))


def crops_at(images: Tensor, offsets: Tensor, size: int) -> Tensor:
    """Crop each image (C, H, W) at its own (top, left) offset to size x size."""
    return torch.stack([img[:, t:t + size, l:l + size] for img, (t, l) in zip(images, offsets.tolist())])


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def _percent(part: int | None, whole: int) -> float | None:
    return None if part is None or whole == 0 else 100.0 * part / whole


@dataclass
class ModeResult:
    """Counts and timings for one mode (summed over ranks)."""

    mode: str
    images: int = 0
    top1_correct: int = 0
    top5_correct: int = 0
    agree_with_original: int | None = None  # None when "original" is not among the modes
    consistent: int = 0
    consistency_images: int = 0
    batches: int = 0
    seconds: float = 0.0  # forward time for this mode only (consistency passes excluded)
    peak_memory_bytes: int | None = None
    flops: int | None = None  # per image, batch 1
    conversion: dict | None = None

    @property
    def top1(self) -> float | None:
        return _percent(self.top1_correct, self.images)

    @property
    def top5(self) -> float | None:
        return _percent(self.top5_correct, self.images)

    @property
    def agreement(self) -> float | None:
        return _percent(self.agree_with_original, self.images)

    @property
    def consistency(self) -> float | None:
        return _percent(self.consistent, self.consistency_images) if self.consistency_images else None

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.seconds > 0 else None

    @property
    def seconds_per_batch(self) -> float | None:
        return self.seconds / self.batches if self.batches else None

    def to_dict(self, reference_top1: float | None = None) -> dict:
        change = None if reference_top1 is None or self.top1 is None else self.top1 - reference_top1
        return {
            "mode": self.mode, "top1": self.top1, "top5": self.top5, "top1_change": change,
            "images": self.images, "top1_correct": self.top1_correct, "top5_correct": self.top5_correct,
            "agreement": self.agreement, "consistency": self.consistency,
            "images_per_s": self.images_per_s, "seconds_per_batch": self.seconds_per_batch,
            "seconds": self.seconds, "peak_memory_bytes": self.peak_memory_bytes,
            "flops": self.flops, "conversion": self.conversion,
        }


@dataclass
class EvalReport:
    results: list[ModeResult]
    images: int
    skipped: list[Skipped]
    loader_wait_s: float
    wall_s: float
    memory_kind: str  # "cuda_max_allocated" | "process_rss_high_water"
    rank: int = 0
    world_size: int = 1
    model: str = ""
    data: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def result(self, mode: str) -> ModeResult | None:
        return next((r for r in self.results if r.mode == mode), None)

    def top1_change(self, result: ModeResult) -> float | None:
        ref = self.result(ORIGINAL)
        if ref is None or ref.top1 is None or result.top1 is None:
            return None
        return result.top1 - ref.top1

    def to_dict(self) -> dict:
        ref = self.result(ORIGINAL)
        return {
            "model": self.model,
            "results": [r.to_dict(ref.top1 if ref else None) for r in self.results],
            "data": {**self.data, "images": self.images, "skipped": len(self.skipped),
                     "skipped_files": [{"path": s.path, "reason": s.reason} for s in self.skipped]},
            "timing": {"loader_wait_s": self.loader_wait_s, "wall_s": self.wall_s},
            "memory_kind": self.memory_kind,
            "world_size": self.world_size,
            "settings": self.settings,
        }


def write_json(report: EvalReport, path: str | os.PathLike, *, force: bool = False) -> None:
    """Write the report atomically; an existing file is replaced only with ``force``."""
    with atomic_path(path, force=force) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
