"""How images must be prepared for a model: resize, center crop, normalize.

Preprocessing travels with the model because the accuracy of a pretrained network depends on
it as much as on the weights. :func:`imagenet_preprocessing` is THE default (resize 256, crop
224, bilinear, ImageNet mean/std) for models that bring no preset of their own: factories,
in-memory modules and ONNX files without metadata.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass
from typing import Any

from ..errors import ModelResolutionError, ParameterError

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
    "MAX_IMAGE_SIDE",
    "PREPROCESSING_FIELDS",
    "TF_LITE_MEAN",
    "TF_LITE_STD",
    "Preprocessing",
    "check_image_side",
    "imagenet_preprocessing",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TF on (x*255 - 127) / 128; see docs/models.md for the numbers.
TF_LITE_MEAN = (127 / 255,) * 3
TF_LITE_STD = (128 / 255,) * 3

INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
PREPROCESSING_FIELDS = ("resize", "crop", "mean", "std", "interpolation")

# The largest image side any command accepts (resize, crop, --input-size, --size): above every
# usual dataset, below sides whose tensors could not be allocated (a 3 x 4096 x 4096 float image
# is 192 MiB; a converted network's activations are many times that).
MAX_IMAGE_SIDE = 4096


def check_image_side(value: Any, parameter: str) -> int:
    """``value`` if it is an image side from 1 to :data:`MAX_IMAGE_SIDE`, else a ParameterError."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_IMAGE_SIDE:
        raise ParameterError(parameter, f"{{param}} must be an image side from 1 to {MAX_IMAGE_SIDE} "
                                        f"pixels, got {value!r}")
    return value


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize``, center-crop ``crop``, normalize with mean/std."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        # Validated here so that a bad CLI override fails with one line, not deep in a transform.
        set_ = functools.partial(object.__setattr__, self)
        set_("resize", _image_side("resize", self.resize))
        set_("crop", _image_side("crop", self.crop))
        set_("mean", _triple("mean", self.mean))
        set_("std", _triple("std", self.std))
        if any(s <= 0 for s in self.std):
            raise ModelResolutionError(f"invalid preprocessing: std must be positive, got {self.std}")
        interpolation = str(self.interpolation).lower()
        if interpolation not in INTERPOLATIONS:
            raise ModelResolutionError(
                f"invalid preprocessing: interpolation {self.interpolation!r} is not one of "
                f"{', '.join(INTERPOLATIONS)}"
            )
        set_("interpolation", interpolation)

    def transform(self):
        """PIL image -> normalized float tensor (3, crop, crop)."""
        from torchvision import transforms as T

        return T.Compose([
            _ToRGB(),
            T.Resize(self.resize, interpolation=T.InterpolationMode(self.interpolation)),
            T.CenterCrop(self.crop),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    def to_dict(self) -> dict:
        """Plain data for artifacts, JSON reports and ONNX metadata."""
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: Any) -> "Preprocessing":
        """The inverse of :meth:`to_dict`; anything else raises ModelResolutionError."""
        if not isinstance(d, dict):
            raise ModelResolutionError(f"invalid preprocessing: expected a mapping, got {type(d).__name__}")
        unknown = sorted(str(k) for k in set(d) - set(PREPROCESSING_FIELDS))
        missing = [k for k in ("resize", "crop", "mean", "std") if k not in d]
        if unknown or missing:
            raise ModelResolutionError(
                f"invalid preprocessing: unknown {unknown} / missing {missing}")
        return cls(**d)

    def with_overrides(self, resize=None, crop=None, mean=None, std=None,
                       interpolation=None) -> "Preprocessing":
        """A copy with every non-None argument replacing the preset value."""
        given = dict(resize=resize, crop=crop, mean=mean, std=std, interpolation=interpolation)
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})


def imagenet_preprocessing() -> Preprocessing:
    """The one default: resize 256, center crop 224, bilinear, ImageNet mean and std."""
    return Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")


def _checked_overrides(overrides: dict) -> dict:
    """Preprocessing overrides by field name, None values dropped; unknown fields refused."""
    unknown = sorted(set(overrides) - set(PREPROCESSING_FIELDS))
    if unknown:
        raise ModelResolutionError(
            f"unknown preprocessing option(s) {', '.join(unknown)}; use {', '.join(PREPROCESSING_FIELDS)}")
    return {k: v for k, v in overrides.items() if v is not None}


class _ToRGB:
    """Grayscale/CMYK/RGBA images -> RGB (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __call__(self, image):
        return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image

    def __repr__(self) -> str:
        return "ToRGB()"


def _image_side(name: str, value: Any) -> int:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or value != int(value) or value < 1):
        raise ModelResolutionError(f"invalid preprocessing: {name} must be a positive integer, got {value!r}")
    if value > MAX_IMAGE_SIDE:
        raise ModelResolutionError(f"invalid preprocessing: {name} {int(value)} is above the largest image side, "
                                   f"{MAX_IMAGE_SIDE} pixels")
    return int(value)


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3 or not all(math.isfinite(v) for v in triple):
        raise ModelResolutionError(f"invalid preprocessing: {name} needs 3 numbers (R, G, B), got {value!r}")
    return triple  # type: ignore[return-value]
