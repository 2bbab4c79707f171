"""Distillation: the converted model learns to agree with the original, without labels.

Conversion keeps the weights, so the unconverted model is a free teacher: a frozen copy taken
before training, in eval mode, run under ``no_grad`` on the same batch in the same step
(:class:`DistillTrainer`). The loss is Hinton et al.'s (2015) temperature-scaled KL divergence,
``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per image
(:func:`distillation_loss`); with labels, ``weight * that + (1 - weight) * cross-entropy``.

Validation reports the student's top-1 agreement with the teacher and the mean KL (at
temperature 1) on held-back images, besides top-1 and top-5 when the data has labels.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset

from .._helpers import logits_of
from ..data import shard_indices
from ..errors import ParameterError
from ..metrics import topk_correct
from ..models import Preprocessing, ResolvedModel, resolve_model
from .loop import EpochRecord, Trainer, _as_batch
from .recipe import TrainConfig

__all__ = ["DISTILL_RECIPE", "DistillConfig", "DistillTrainer", "Teacher", "build_teacher", "check_distill_options",
           "check_teacher_classes", "distillation_loss"]

logger = logging.getLogger(__name__)

DEFAULT_VAL_FRACTION = 0.1
# What ``ccnn-train --distill`` uses for the options left unset: the recipe that did best in
# docs/results.md#distillation (efficientnet_lite0, checkered, 125 unlabelled ImageNet images a fold).
DISTILL_RECIPE = {"epochs": 3, "batch_size": 16, "train_params": "norm+head", "freeze_norm_stats": True}


@dataclass(frozen=True)
class DistillConfig:
    """``teacher``: None for the MODEL's own weights unconverted, else a MODEL string (same classes).
    ``weight``: the distillation share of the loss (1 = distillation only; below 1 needs labels).
    ``val_fraction``: the images held back from an unlabelled folder (None: 0.1)."""

    teacher: str | None = None
    temperature: float = 1.0
    weight: float = 1.0
    val_fraction: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ParameterError("temperature", f"{{param}} must be positive, got {self.temperature}")
        if not 0 <= self.weight <= 1:
            raise ParameterError("distill_weight", f"{{param}} must be in [0, 1], got {self.weight}")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise ParameterError("val_fraction", f"{{param}} must be in [0, 1), got {self.val_fraction}")

    @property
    def held_back(self) -> float:
        return DEFAULT_VAL_FRACTION if self.val_fraction is None else self.val_fraction

    def to_dict(self) -> dict[str, Any]:
        return {"teacher": self.teacher, "temperature": self.temperature, "weight": self.weight,
                "val_fraction": self.val_fraction}


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over the batch of ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` (Hinton et al.):
    the T^2 keeps the gradients' scale independent of T."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                    reduction="batchmean", log_target=True) * (t * t)


class Teacher(nn.Module):
    """A frozen model in eval mode; inputs normalised for the student are renormalised for it."""

    def __init__(self, model: nn.Module, name: str, num_classes: int, student: Preprocessing, own: Preprocessing):
        super().__init__()
        self.model, self.name, self.num_classes = model.eval().requires_grad_(False), name, num_classes
        student_std, own_std = torch.tensor(student.std), torch.tensor(own.std)
        # x_own = (raw - own_mean) / own_std, with raw = x * student_std + student_mean
        self.register_buffer("scale", (student_std / own_std).view(1, -1, 1, 1))
        self.register_buffer("shift", ((torch.tensor(student.mean) - torch.tensor(own.mean)) / own_std).view(1, -1, 1, 1))
        self.renormalise = not (student.mean == own.mean and student.std == own.std)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # always in eval mode

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if self.renormalise:
            images = images * self.scale + self.shift
        return logits_of(self.model(images)).float()


def build_teacher(config: DistillConfig, student: ResolvedModel, *, trust_factory: bool = False) -> Teacher:
    """The teacher: a frozen copy of the student's own (unconverted) model, taken before any
    training changes the weights it shares, or the MODEL ``config.teacher`` names, as stored
    (an artifact runs converted if it was)."""
    if config.teacher is None:
        if student.training is not None:
            logger.warning(f"the teacher is {student.name} as given, unconverted, and it was already trained "
                           f"({_made_by(student.training)}); pass a teacher for the original weights")
        return Teacher(copy.deepcopy(student.model), f"{student.name} (unconverted)", student.num_classes,
                       student.preprocessing, student.preprocessing)
    resolved = resolve_model(config.teacher, trust_factory=trust_factory)
    model = resolved.model
    if resolved.conversion is not None:
        model = resolved.converted(resolved.conversion, resolved.preprocessing.crop)  # with what it learned
    if resolved.preprocessing.crop != student.preprocessing.crop:
        logger.info(f"the teacher {resolved.name} sees the student's {student.preprocessing.crop} px crops "
                    f"(its own preprocessing crops {resolved.preprocessing.crop} px)")
    return Teacher(model, resolved.name, resolved.num_classes, student.preprocessing, resolved.preprocessing)


def check_teacher_classes(teacher: Teacher, student_classes: int) -> None:
    if teacher.num_classes != student_classes:
        raise ParameterError("teacher", f"the teacher ({teacher.name}) has {teacher.num_classes} classes and the "
                                        f"student {student_classes}: a teacher must score the same classes")


def check_distill_options(config: DistillConfig, labelled: bool, num_classes: int | None) -> None:
    """Options that need labels, or that an unlabelled folder would ignore, are errors."""
    if labelled and config.val_fraction is not None:
        raise ParameterError("val_fraction", "{param} holds back part of an unlabelled folder; this data has "
                                             "train/ and val/, and val/ is the held-back part")
    if not labelled and config.weight < 1:
        raise ParameterError("distill_weight", f"{{param}} {config.weight} mixes in the label loss, but the data "
                                               "has no train/<class>/ and val/<class>/ folders")
    if not labelled and num_classes is not None:
        raise ParameterError("num_classes", "{param} gives the student a new head, which the teacher cannot "
                                            "teach without labelled class folders")


def _made_by(training: dict) -> str:
    return ", ".join(f"{k} {training[k]}" for k in ("epochs", "data") if k in training) or "a training summary"


class DistillTrainer(Trainer):
    """A :class:`~.loop.Trainer` whose loss is the distillation loss (mixed with cross-entropy
    when ``labelled`` and ``distill.weight < 1``). Without labels, train top-1 is agreement
    with the teacher, and validation reports agreement and KL only."""

    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Dataset | None, config: TrainConfig, *,
                 teacher: Teacher, distill: DistillConfig, labelled: bool, **kwargs):
        super().__init__(model, train_set, val_set, config, **kwargs)
        self.teacher = teacher.to(self.device)
        self.distill, self.labelled = distill, labelled
        self._agreement = [0.0, 0.0, 0.0]  # agreeing images, KL sum, images (this process)

    def loss(self, logits: Tensor, teacher_logits: Tensor, targets: Tensor) -> Tensor:
        _check_same_classes(logits, teacher_logits)
        loss = distillation_loss(logits, teacher_logits, self.distill.temperature)
        if self.labelled and self.distill.weight < 1:
            return self.distill.weight * loss + (1 - self.distill.weight) * self.loss_fn(logits, targets)
        return loss

    def _step(self, images: Tensor, targets: Tensor) -> tuple[Tensor, int]:
        with self._autocast():
            teacher_logits = self.teacher(images).float()  # no_grad, eval mode
            logits = logits_of(self.wrapped(images)).float()
        loss = self._regularised(self.loss(logits, teacher_logits, targets))
        self._update(loss)
        reference = targets if self.labelled else teacher_logits.argmax(1)
        return loss.detach(), int(logits.argmax(1).eq(reference).sum())

    @torch.no_grad()
    def validate(self) -> tuple[float, float, float, float, int]:
        """Labelled counts as :meth:`Trainer.validate` (zero without labels); agreement and KL kept aside."""
        self.model.eval()
        if self.ctx.active:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)
        totals = torch.zeros(5, dtype=torch.float64)
        agreement = torch.zeros(3, dtype=torch.float64)
        if self.val_set is not None:
            shard = Subset(self.val_set, shard_indices(range(len(self.val_set)), self.ctx.rank, self.ctx.world_size))
            per_process = max(1, self.config.batch_size // self.ctx.world_size)
            for batch in self._loader(shard, batch_size=per_process, shuffle=False):
                images, targets, skipped = _as_batch(batch)
                totals[4] += skipped
                if images.numel() == 0:
                    continue
                images, targets = images.to(self.device), targets.to(self.device)
                with self._autocast():
                    logits = logits_of(self.model(images)).float()
                    teacher_logits = self.teacher(images).float()
                _check_same_classes(logits, teacher_logits)
                kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(teacher_logits, 1), reduction="sum",
                              log_target=True)
                agreement += torch.tensor([int(logits.argmax(1).eq(teacher_logits.argmax(1)).sum()), float(kl),
                                           len(images)], dtype=torch.float64)
                if self.labelled:
                    hits = topk_correct(logits, targets, (1, 5))
                    loss = F.cross_entropy(logits, targets, reduction="sum")
                    totals += torch.tensor([float(loss), hits[1], hits[5], len(targets), 0], dtype=torch.float64)
        self._agreement = agreement.tolist()
        return tuple(totals.tolist())  # type: ignore[return-value]

    def run_epoch(self) -> EpochRecord:
        record = super().run_epoch()
        agree, kl, images = self._summed(self._agreement)
        if images:
            record.val_agreement, record.val_kl = 100 * agree / images, kl / images
        return record

    def measure_agreement(self) -> tuple[float, float] | None:
        """(top-1 agreement %, mean KL) of the model as it is, on the held-back images (None without)."""
        self.validate()
        agree, kl, images = self._summed(self._agreement)
        return (100 * agree / images, kl / images) if images else None


def _check_same_classes(logits: Tensor, teacher_logits: Tensor) -> None:
    if logits.shape != teacher_logits.shape:
        raise ParameterError("teacher", f"the teacher scores {teacher_logits.shape[-1]} classes and the student "
                                        f"{logits.shape[-1]}: a teacher must score the same classes")
