"""Distillation: the converted model learns to agree with the original, without labels.

Conversion keeps the weights, so the unconverted model is a free teacher: a frozen copy taken
before training, in eval mode, run under ``no_grad`` on the same batch in the same step
(:class:`DistillTrainer`). The loss is Hinton et al.'s (2015) temperature-scaled KL divergence,
``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` per image
(:func:`distillation_loss`); with labels, ``weight * that + (1 - weight) * cross-entropy``.

Function matching (Beyer et al., CVPR 2022, "Knowledge distillation: a good teacher is patient
and consistent"): teacher and student see the same tensor in every step, after the data
loader's augmentation and the batch's mixup or cutmix (:mod:`.loop`), so the augmentation only
widens the set of inputs the two functions are matched on. The teacher may be several models
and several views of each image (:class:`TeacherEnsemble`): its distribution is the mean of
their softmaxes at temperature T, ``p = mean_v softmax(z_v / T)``, and the loss is
``T^2 * KL(p || softmax(student / T))``. Averaging the tempered softmaxes (not the logits, nor
softmaxes at 1 re-tempered) keeps one teacher with one view exactly Hinton's loss.

Validation reports the student's top-1 agreement with that teacher (at T = 1) and the mean KL
(at temperature 1) on held-back images, besides top-1 and top-5 when the data has labels.
:func:`untrained_is_better` compares the result with the untrained conversion measured the same
way before training.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from .._helpers import logits_of
from ..errors import CCNNError, ParameterError
from ..models import Preprocessing, ResolvedModel, resolve_model
from ..models.artifact import is_artifact, read_artifact
from ..models.checkpoints import safe_load
from ..spec import ConversionSpec
from .loop import EpochRecord, Trainer, hard_targets
from .recipe import TrainConfig

__all__ = ["DISTILL_RECIPE", "DISTILL_RECIPES", "PHC_TRAIN_PARAMS", "TTA_SHIFT", "TTA_VIEWS", "DistillConfig", "DistillTrainer",
           "HeldBackScore", "Teacher", "TeacherEnsemble", "build_teacher", "check_distill_options",
           "check_teacher_classes", "distill_recipe", "recipe_mode", "recipe_phc", "distillation_loss", "kl_to_teacher", "tta_views",
           "untrained_is_better"]

logger = logging.getLogger(__name__)

DEFAULT_VAL_FRACTION = 0.1
# What ``ccnn-train --distill`` uses for the options left unset, per mode (distill_recipe): the
# recipes that did best in docs/results.md#recovery (efficientnet_lite0, 125 unlabelled ImageNet
# images a fold, top-1 on the fold never seen, original 89.6):
# * checkered: function matching (strong crops and mixup on the tensor teacher and student share),
#   norm+head against frozen statistics, 20 epochs: 88.8 at keep_first 0 (untrained 87.6; the
#   3-epoch standard recipe 88.0). Held-back agreement (12 images a fold) is flat within one
#   image after 4 epochs; at keep_first 3 the untrained conversion (90.0) was not beaten.
#   Recalibration ``auto`` re-estimates nothing here (submaps keep the original's statistics).
# * blurpool, spectral, diffstride (resampling after the activation): 3 epochs of the standard
#   augmentation, norm+head against the original's frozen statistics, no recalibration first:
#   81.2, 82.4 (82.8 with the published convention, now the default), 56.8 (recalibration alone:
#   79.2, 80.4, 56.0; function matching: 57.6, 72.8, 26.0;
#   recalibrating first and then distilling lost 15 to 40 points, which is not understood yet).
# * PHC layers (``phc``, any mode): the mode's recipe, but training the PHC layers' A, F and biases
#   besides norm+head (``phc+norm+head``, PHC_TRAIN_PARAMS). The fit's loss is in the convolutions'
#   weights (efficientnet_lite0 at phc=2: relative fit error 0.69, 0 % top-1 untrained), which
#   norm+head cannot reach. Not ``all``: the convolutions the fit kept dense (the 3-channel stem,
#   depthwise ones) and everything else hold the pretrained weights unchanged, and a few hundred
#   images would move them for no gain. Measured (docs/results.md#phc-lite0, 10 epochs, cross-
#   validated): 0 of 250 at phc 2 and 4, as fitted; SGD at lr 0.01 raised the training loss, AdamW
#   at 1e-3 lowered it without beating the untrained conversion's held-back KL. Kept as the
#   default because norm+head alone cannot reach the fit's loss at all.
# ``recalibrate`` is train_model's option; the others are TrainConfig's.
FUNCTION_MATCHING_EPOCHS = 20
DISTILL_RECIPE = {"epochs": FUNCTION_MATCHING_EPOCHS, "batch_size": 16, "train_params": "norm+head",
                  "freeze_norm_stats": True, "augment": "strong,mixup", "recalibrate": "auto"}
RESAMPLING_RECIPE = {"epochs": 3, "batch_size": 16, "train_params": "norm+head", "freeze_norm_stats": True,
                     "augment": "standard", "recalibrate": "none"}
DISTILL_RECIPES = {mode: RESAMPLING_RECIPE for mode in ("blurpool", "spectral", "diffstride")}
PHC_TRAIN_PARAMS = "phc+norm+head"  # what a distillation of PHC layers trains (above)
TTA_VIEWS = ("flip", "shift")
TTA_SHIFT = 8  # pixels: shift views translate by (+-8, 0) and (0, +-8), the border pixels repeated


@dataclass(frozen=True)
class DistillConfig:
    """``teacher``: None for the MODEL's own weights unconverted, else a MODEL string or a tuple
    of them (an ensemble: the mean of their softmaxes; every one scores the same classes).
    ``teacher_tta``: views of each image the teacher is averaged over (:data:`TTA_VIEWS`).
    ``weight``: the distillation share of the loss (1 = distillation only; below 1 needs labels).
    ``val_fraction``: the images held back from an unlabelled folder (None: 0.1)."""

    teacher: str | tuple[str, ...] | None = None
    temperature: float = 1.0
    weight: float = 1.0
    val_fraction: float | None = None
    teacher_tta: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        teachers = self.teachers
        if any(not isinstance(t, str) or not t.strip() for t in teachers) or (self.teacher is not None and not teachers):
            raise ParameterError("teacher", f"{{param}} must name one or more models, got {self.teacher!r}")
        object.__setattr__(self, "teacher", None if not teachers else teachers[0] if len(teachers) == 1 else teachers)
        views = tuple(self.teacher_tta)
        unknown = [v for v in views if v not in TTA_VIEWS]
        if unknown or len(set(views)) != len(views):
            raise ParameterError("teacher_tta", f"{{param}} takes distinct views from {', '.join(TTA_VIEWS)}, "
                                                f"got {','.join(map(str, views))!r}")
        object.__setattr__(self, "teacher_tta", tuple(v for v in TTA_VIEWS if v in views))
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ParameterError("temperature", f"{{param}} must be positive, got {self.temperature}")
        if not 0 <= self.weight <= 1:
            raise ParameterError("distill_weight", f"{{param}} must be in [0, 1], got {self.weight}")
        if self.val_fraction is not None and not 0 <= self.val_fraction < 1:
            raise ParameterError("val_fraction", f"{{param}} must be in [0, 1), got {self.val_fraction}")

    @property
    def teachers(self) -> tuple[str, ...]:
        """The teacher MODELs given (empty: MODEL itself, unconverted)."""
        return (self.teacher,) if isinstance(self.teacher, str) else tuple(self.teacher or ())

    @property
    def held_back(self) -> float:
        return DEFAULT_VAL_FRACTION if self.val_fraction is None else self.val_fraction

    def to_dict(self) -> dict[str, Any]:
        data = {"teacher": ",".join(self.teachers) or None, "temperature": self.temperature, "weight": self.weight,
                "val_fraction": self.val_fraction}
        if self.teacher_tta:  # runs without it keep the identity (and resume) they had
            data["teacher_tta"] = list(self.teacher_tta)
        return data


def distill_recipe(mode: str, phc: int | None = None) -> dict[str, Any]:
    """The training options a distillation uses for ``mode`` (with PHC layers of ``phc`` Kronecker
    products, or dense) where none is given (the CLI fills them in)."""
    recipe = dict(DISTILL_RECIPES.get(mode, DISTILL_RECIPE))
    if phc is not None:
        recipe["train_params"] = PHC_TRAIN_PARAMS
    return recipe


def recipe_mode(model: str, mode: str | None) -> str:
    """The mode a run will train in, for its recipe: ``mode``, else an artifact's own, else checkered."""
    if mode is not None:
        return mode
    conversion = _artifact_conversion(model)
    return conversion.mode if conversion is not None else "checkered"


def recipe_phc(model: str, phc: int | None) -> int | None:
    """The PHC layers a run will train, for its recipe: ``phc``, else an artifact's own (None: dense)."""
    if phc is not None:
        return phc
    conversion = _artifact_conversion(model)
    return conversion.phc if conversion is not None else None


def _artifact_conversion(model: str) -> ConversionSpec | None:
    """MODEL's conversion when it is an artifact (None otherwise, or when it cannot be read)."""
    path = Path(model).expanduser()
    if path.is_file():
        try:
            obj = safe_load(path)
            if is_artifact(obj):
                return read_artifact(obj, path).conversion
        except CCNNError:
            pass  # resolving MODEL reports it in one line
    return None


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean over the batch of ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` (Hinton et al.):
    the T^2 keeps the gradients' scale independent of T."""
    return kl_to_teacher(student_logits, F.log_softmax(teacher_logits / temperature, dim=1), temperature)


def kl_to_teacher(student_logits: Tensor, teacher_log_probs: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * KL(p || softmax(student/T))``, batch mean, for a teacher distribution ``p`` given as
    log-probabilities (already at temperature T)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), teacher_log_probs, reduction="batchmean",
                    log_target=True) * (t * t)


def tta_views(images: Tensor, views: tuple[str, ...]) -> list[Tensor]:
    """The images themselves, then the views ``views`` asks for: ``flip`` adds the horizontal
    mirror; ``shift`` translates each of those by TTA_SHIFT px left, right, up and down (the
    border pixels repeated into the gap). flip,shift: 2 x 5 = 10 views."""
    base = [images, images.flip(3)] if "flip" in views else [images]
    if "shift" not in views:
        return base
    s = TTA_SHIFT
    offsets = ((0, 0), (s, 0), (-s, 0), (0, s), (0, -s))
    return [_translated(view, dy, dx) for view in base for dy, dx in offsets]


def _translated(images: Tensor, dy: int, dx: int) -> Tensor:
    """``out[y, x] = images[y - dy, x - dx]``, edge-clamped."""
    if dy == dx == 0:
        return images
    s = max(abs(dy), abs(dx))
    height, width = images.shape[-2:]
    padded = F.pad(images, (s, s, s, s), mode="replicate")
    return padded[..., s - dy:s - dy + height, s - dx:s - dx + width]


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


class TeacherEnsemble(nn.Module):
    """What the student matches: the mean over ``members`` and over the ``views`` of each image
    (:func:`tta_views`) of the softmax at temperature T. Frozen, always in eval mode."""

    def __init__(self, members: list[Teacher], views: tuple[str, ...] = ()):
        super().__init__()
        self.members, self.views = nn.ModuleList(members).eval(), tuple(views)
        names = ", ".join(m.name for m in members)
        self.name = (names if len(members) == 1 else f"the mean of {names}") + (
            f" over views {','.join(views)}" if views else "")
        counts = {m.num_classes for m in members}
        if len(counts) > 1:
            raise ParameterError("teacher", f"the teachers {names} score {', '.join(map(str, sorted(counts)))} "
                                            "classes: an ensemble's members must score the same classes")
        self.num_classes = members[0].num_classes
        self.train(False)

    def train(self, mode: bool = True) -> "TeacherEnsemble":
        return super().train(False)  # always in eval mode

    @torch.no_grad()
    def log_probs(self, images: Tensor, temperature: float = 1.0) -> Tensor:
        """log of the mean, over members and views, of softmax(logits / temperature)."""
        logits = [member(view) for member in self.members for view in tta_views(images, self.views)]
        log_probs = torch.stack([F.log_softmax(z / temperature, dim=1) for z in logits])
        if len(logits) == 1:
            return log_probs[0]
        return torch.logsumexp(log_probs, dim=0) - math.log(len(logits))


def build_teacher(config: DistillConfig, student: ResolvedModel, *, trust_factory: bool = False) -> TeacherEnsemble:
    """The teacher: a frozen copy of the student's own (unconverted) model, taken before any
    training changes the weights it shares, or the MODEL(s) ``config.teacher`` names, as stored
    (an artifact runs converted if it was); averaged over ``config.teacher_tta``'s views."""
    if not config.teachers:
        if student.training is not None:
            logger.warning(f"the teacher is {student.name} as given, unconverted, and it was already trained "
                           f"({_made_by(student.training)}); pass a teacher for the original weights")
        members = [Teacher(copy.deepcopy(student.model), f"{student.name} (unconverted)", student.num_classes,
                           student.preprocessing, student.preprocessing)]
    else:
        members = [_named_teacher(name, student, trust_factory) for name in config.teachers]
    return TeacherEnsemble(members, config.teacher_tta)


def _named_teacher(name: str, student: ResolvedModel, trust_factory: bool) -> Teacher:
    resolved = resolve_model(name, trust_factory=trust_factory)
    model = resolved.model
    if resolved.conversion is not None:
        model = resolved.converted(resolved.conversion, resolved.preprocessing.crop)  # with what it learned
    if resolved.preprocessing.crop != student.preprocessing.crop:
        logger.info(f"the teacher {resolved.name} sees the student's {student.preprocessing.crop} px crops "
                    f"(its own preprocessing crops {resolved.preprocessing.crop} px)")
    return Teacher(model, resolved.name, resolved.num_classes, student.preprocessing, resolved.preprocessing)


def check_teacher_classes(teacher: TeacherEnsemble, student_classes: int) -> None:
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
                 teacher: TeacherEnsemble, distill: DistillConfig, labelled: bool, **kwargs):
        super().__init__(model, train_set, val_set, config, **kwargs)
        self.teacher = teacher.to(self.device)
        self.distill, self.labelled = distill, labelled
        self._agreement = torch.zeros(3, dtype=torch.float64)  # agreeing images, KL sum, images (this process)

    def uses_labels(self) -> bool:
        return self.labelled and self.distill.weight < 1

    def train_epoch(self) -> tuple[float, float, int, int, float]:
        self.teacher.eval()  # whatever a caller did to it: its statistics and dropout must not move
        return super().train_epoch()

    def loss(self, logits: Tensor, teacher_log_probs: Tensor, targets: Tensor) -> Tensor:
        """``teacher_log_probs`` at the distillation temperature; ``targets`` class indices or
        (mixed) class probabilities, read only when the label loss has a share."""
        _check_same_classes(logits, teacher_log_probs)
        loss = kl_to_teacher(logits, teacher_log_probs, self.distill.temperature)
        if self.uses_labels():
            return self.distill.weight * loss + (1 - self.distill.weight) * self.label_loss(logits, targets)
        return loss

    def _step(self, images: Tensor, targets: Tensor) -> tuple[Tensor, int]:
        with self._autocast():
            teacher_log_probs = self.teacher.log_probs(images, self.distill.temperature)  # no_grad, eval mode
            logits = logits_of(self.wrapped(images)).float()
        loss = self._regularised(self.loss(logits, teacher_log_probs, targets))
        self._update(loss)
        reference = hard_targets(targets) if self.labelled else teacher_log_probs.argmax(1)
        return loss.detach(), int(logits.argmax(1).eq(reference).sum())

    @torch.no_grad()
    def validate(self) -> tuple[float, float, float, float, int]:
        """Labelled counts as :meth:`Trainer.validate` (zero without labels); agreement and KL kept aside."""
        self._agreement = torch.zeros(3, dtype=torch.float64)
        return super().validate()

    def _validation_counts(self, images: Tensor, logits: Tensor, targets: Tensor) -> Tensor:
        with self._autocast():
            teacher_log_probs = self.teacher.log_probs(images, 1.0)
        _check_same_classes(logits, teacher_log_probs)
        kl = F.kl_div(F.log_softmax(logits, 1), teacher_log_probs, reduction="sum", log_target=True)
        self._agreement += torch.tensor([int(logits.argmax(1).eq(teacher_log_probs.argmax(1)).sum()),
                                         float(kl), len(images)], dtype=torch.float64)
        if self.labelled:
            return super()._validation_counts(images, logits, targets)
        return torch.zeros(5, dtype=torch.float64)

    def run_epoch(self) -> EpochRecord:
        record = super().run_epoch()
        agreement = self._held_back_agreement()
        if agreement is not None:
            record.val_agreement, record.val_kl = agreement
        return record

    def measure_agreement(self) -> tuple[float, float] | None:
        """(top-1 agreement %, mean KL) of the model as it is, on the held-back images (None without)."""
        score = self.held_back_score()
        return None if score is None else (score.agreement, score.kl)

    def held_back_score(self) -> "HeldBackScore | None":
        """Top-1 (with labels), agreement and KL of the model as it is, on the held-back images."""
        _, top1, _, labelled_images, _ = self._summed(list(self.validate()))
        agreement = self._held_back_agreement()
        if agreement is None:
            return None
        return HeldBackScore(100 * top1 / labelled_images if labelled_images else None, *agreement)

    def _held_back_agreement(self) -> tuple[float, float] | None:
        """(top-1 agreement %, mean KL) of the last validation, over every process (None without images)."""
        agree, kl, images = self._summed(self._agreement.tolist())
        return (100 * agree / images, kl / images) if images else None


@dataclass(frozen=True)
class HeldBackScore:
    """A model's top-1 (None without labels), agreement with the teacher (%) and mean KL on the held-back images."""

    top1: float | None
    agreement: float
    kl: float

    def to_dict(self) -> dict[str, Any]:
        return {"val_top1": self.top1, "val_agreement": self.agreement, "val_kl": self.kl}


def untrained_is_better(untrained: HeldBackScore | None, best: EpochRecord | None) -> bool:
    """Whether the untrained conversion beats the best epoch on the held-back images: by top-1
    where there are labels (as epochs are ranked), then agreement, then the lower KL."""
    if untrained is None or best is None or best.val_agreement is None:
        return False
    def key(top1, agreement, kl):
        return (top1 if top1 is not None else 0.0, agreement, -kl)
    return key(untrained.top1, untrained.agreement, untrained.kl) > key(best.val_top1, best.val_agreement, best.val_kl)


def _check_same_classes(logits: Tensor, teacher_logits: Tensor) -> None:
    if logits.shape != teacher_logits.shape:
        raise ParameterError("teacher", f"the teacher scores {teacher_logits.shape[-1]} classes and the student "
                                        f"{logits.shape[-1]}: a teacher must score the same classes")
