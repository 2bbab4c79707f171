"""The training recipe: its knobs (:class:`TrainConfig`), and the optimizer, schedule and loss.

A standard recipe, as in torchvision's reference scripts and timm: SGD with momentum (or AdamW),
a per-step cosine schedule after an optional linear warm-up, cross-entropy with label
smoothing, and weight decay on weights only (not on norm parameters and biases: timm's
``param_groups_weight_decay`` rule, every parameter of one dimension or less).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..errors import ParameterError
from .params import check_train_params

__all__ = ["OPTIMIZERS", "AUGMENTATIONS", "BATCH_MIXES", "IMAGE_AUGMENTATIONS", "TrainConfig", "build_optimizer", "build_scheduler",
           "parameter_groups"]

OPTIMIZERS = ("sgd", "adamw")
# Per image (in the data loader): random resized crop (area 8-100 %) + flip | Beyer et al.'s
# inception crop (area 5-100 %) + flip | flip only | neither. Per batch (on the loaded tensor):
# mixup or cutmix. ``augment`` names one of each, e.g. "strong,mixup"; a mix alone keeps "standard".
IMAGE_AUGMENTATIONS = ("standard", "strong", "flip", "none")
BATCH_MIXES = ("mixup", "cutmix")
AUGMENTATIONS = IMAGE_AUGMENTATIONS + BATCH_MIXES
_DEFAULT_LR = {"sgd": 0.01, "adamw": 1e-3}  # fine-tuning rates; from scratch, raise them
_DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run, validated when made.

    ``batch_size`` is the global batch: under torchrun each of N processes takes 1/N of it, so
    a run computes the same steps on any number of processes (BatchNorm statistics aside,
    which are per process unless ``sync_bn``). ``lr`` and ``weight_decay`` left at None take
    the optimizer's default. ``shift`` adds a random translation of up to that many pixels
    (zero-padded) after the other augmentation.
    """

    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float | None = None
    momentum: float | None = None  # SGD only (default 0.9)
    weight_decay: float | None = None
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    augment: str = "standard"
    shift: int = 0
    amp: bool = False
    checkpointing: bool = False
    sync_bn: bool = False
    seed: int = 0
    train_params: str = "all"  # all | norm | head | norm+head | phc+norm+head (.params)
    freeze_norm_stats: bool = False  # every normalisation layer keeps (and uses) its running statistics
    stride_penalty: float = 0.0  # DiffStride: loss += stride_penalty * diffstride_cost(model)

    def __post_init__(self) -> None:
        _positive("epochs", self.epochs)
        _positive("batch_size", self.batch_size)
        optimizer = str(self.optimizer).lower()
        if optimizer not in OPTIMIZERS:
            raise ParameterError("optimizer", f"unknown {{param}} {self.optimizer!r}; choose {', '.join(OPTIMIZERS)}")
        object.__setattr__(self, "optimizer", optimizer)
        if self.momentum is not None and optimizer != "sgd":
            raise ParameterError("momentum", f"{{param}} only applies to SGD, not {optimizer}")
        object.__setattr__(self, "augment", _normalised_augment(self.augment))
        for name in ("lr", "weight_decay", "momentum"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0 and (name != "lr" or value > 0)):
                raise ParameterError(name, f"{{param}} must be {'positive' if name == 'lr' else 'zero or more'}, "
                                           f"got {value}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ParameterError("warmup_epochs", f"{{param}} must be at least 0 and less than the {self.epochs} "
                                                  f"epochs, got {self.warmup_epochs}")
        if not 0 <= self.label_smoothing < 1:
            raise ParameterError("label_smoothing", f"{{param}} must be in [0, 1), got {self.label_smoothing}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ParameterError("seed", f"{{param}} must be an integer from 0 to 2**32 - 1, got {self.seed!r}")
        object.__setattr__(self, "train_params", check_train_params(self.train_params))
        if not isinstance(self.freeze_norm_stats, bool):
            raise ParameterError("freeze_norm_stats", f"{{param}} must be True or False, got {self.freeze_norm_stats!r}")
        if not (math.isfinite(self.stride_penalty) and self.stride_penalty >= 0):
            raise ParameterError("stride_penalty", f"{{param}} must be zero or more, got {self.stride_penalty}")
        if isinstance(self.shift, bool) or not isinstance(self.shift, int) or self.shift < 0:
            raise ParameterError("shift", f"{{param}} must be a number of pixels (0 or more), got {self.shift!r}")

    @property
    def image_augment(self) -> str:
        """The per-image augmentation: one of IMAGE_AUGMENTATIONS."""
        return self.augment.split(",")[0]

    @property
    def batch_mix(self) -> str | None:
        """mixup, cutmix or None: mixed into each loaded batch."""
        parts = self.augment.split(",")
        return parts[1] if len(parts) > 1 else None

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else _DEFAULT_LR[self.optimizer]

    @property
    def decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else _DEFAULT_WEIGHT_DECAY[self.optimizer]

    def to_dict(self) -> dict[str, Any]:
        """Plain data, with the defaults the run used filled in (history, artifacts, resume checks)."""
        data = asdict(self)
        data.update(lr=self.learning_rate, weight_decay=self.decay,
                    momentum=(self.momentum if self.momentum is not None else 0.9) if self.optimizer == "sgd" else None)
        for optional in ("stride_penalty", "freeze_norm_stats"):
            if not data[optional]:
                del data[optional]  # runs without it keep the recipe (and the resume identity) they had
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _normalised_augment(augment: Any) -> str:
    """"image" or "image,mix" from one or two comma- or plus-separated names (a mix alone: standard crops)."""
    parts = [p.strip() for p in str(augment).lower().replace("+", ",").split(",") if p.strip()]
    unknown = [p for p in parts if p not in AUGMENTATIONS]
    if unknown or not parts:
        raise ParameterError("augment", f"unknown {{param}} {augment!r}; choose one of {', '.join(IMAGE_AUGMENTATIONS)}, "
                                        f"optionally with one of {', '.join(BATCH_MIXES)} (e.g. strong,mixup)")
    image = [p for p in parts if p in IMAGE_AUGMENTATIONS]
    mix = [p for p in parts if p in BATCH_MIXES]
    if len(image) > 1 or len(mix) > 1:
        raise ParameterError("augment", f"{{param}} {augment!r} names more than one per-image augmentation or "
                                        "more than one batch mix")
    return ",".join((image or ["standard"]) + mix)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ParameterError(name, f"{{param}} must be a positive integer, got {value!r}")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights with decay; norm parameters, biases (ndim <= 1) and DiffStride's
    learnable strides without (decay would pull the strides towards 0, i.e. towards no
    subsampling; their cost is ``stride_penalty``'s business)."""
    from ..core.diffstride import diffstride_layers

    strides = {id(p) for _, layer in diffstride_layers(model) for p in layer.parameters()}
    decay, no_decay = [], []
    for _, param in _unique_trainable(model.named_parameters()):
        (no_decay if param.ndim <= 1 or id(param) in strides else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _unique_trainable(named: Iterable[tuple[str, nn.Parameter]]):
    seen: set[int] = set()
    for name, param in named:
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            yield name, param


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.learning_rate)
    momentum = config.to_dict()["momentum"]
    return torch.optim.SGD(groups, lr=config.learning_rate, momentum=momentum, nesterov=momentum > 0)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: linear warm-up from 1% of the rate, then cosine to zero (torch's own)."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if warmup == 0:
        return CosineAnnealingLR(optimizer, T_max=total)
    return SequentialLR(optimizer, [LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
                                    CosineAnnealingLR(optimizer, T_max=total - warmup)],
                        milestones=[warmup])


def lr_factor(config: TrainConfig, steps_per_epoch: int, step: int) -> float:
    """The schedule of :func:`build_scheduler` in closed form: the learning rate after ``step``
    steps over the initial one (what a resumed checkpoint's optimizer groups must hold)."""
    total = config.epochs * steps_per_epoch
    warmup = round(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return 0.01 + 0.99 * step / warmup
    return (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2
