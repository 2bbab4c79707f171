"""BatchNorm recalibration: the zero-cost way to win back some of what conversion costs.

A converted model sees its feature maps at more positions (every submap) than the original, so
the statistics its BatchNorm layers learned no longer match exactly. :func:`recalibrate_batchnorm`
re-estimates every BatchNorm's running mean and variance over unlabelled images, with no
gradient and no other change: the model runs in eval mode (fixed samplers, eval graph) with only
its BatchNorm layers in train mode, after ``reset_running_stats()`` and with ``momentum=None``.

The rule is torch's cumulative moving average (as in ``torch.optim.swa_utils.update_bn``): after
batches 1..K, ``running_mean`` is the average over batches of each batch's mean, and
``running_var`` the average of each batch's unbiased variance, both over batch, submaps and
positions (submaps are folded into the batch dimension). Every batch but the last has the same
size, so with one batch the statistics are exactly those of the N images.

The original's statistics come from its whole training set; a few hundred images estimate them
less well, so only the layers whose input the conversion changed should be re-estimated.
:func:`norm_layers_to_recalibrate` chooses them (``recalibrate``: ``auto | all | none``). ``auto``
*measures*: each BatchNorm's input statistics (per channel: mean and variance over images,
submaps and positions) on the calibration images, in the original and in the converted model,
eval mode. A layer is re-estimated when, for the median channel, the variance changed by more
than :data:`STATISTICS_TOLERANCE` in log or the mean by more than that many of the original's
standard deviations (:func:`statistics_change`). Shapes cannot tell (:func:`converted_batchnorm_layers`, the older rule):
a blur or a spectral crop keeps every shape and shrinks the variance; checkered submaps sample
the same map at other positions and keep the statistics up to sampling (measured on
efficientnet_lite0, below the tolerance in every layer; with ``edges="exact"`` they do change:
padding zeros enter the maps).

:func:`recalibrate_model` is the command's API: MODEL + DIR -> an artifact.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core.options import check_seed
from ..data import DecodedImages, collate_items
from ..errors import DataError, ParameterError
from ..core.phc import check_phc
from ..models import ResolvedModel, conversion_state, resolve_model, save_artifact
from ..outputs import check_output
from ..runtime import resolve_device
from ..spec import ConversionSpec, check_checkered_options_used
from .unlabelled import UNLABELLED, find_images, is_labelled_layout

__all__ = ["LAYERS", "RECALIBRATE", "STATISTICS_TOLERANCE", "batchnorm_layers", "check_recalibrate", "converted_batchnorm_layers",
           "input_statistics", "norm_layers_to_recalibrate", "recalibrate_batchnorm", "recalibrate_before_training", "recalibrate_model",
           "statistics_change"]

LAYERS = ("all", "converted")  # the older --layers choice: every BatchNorm | those after a converted step
RECALIBRATE = ("auto", "all", "none")  # measured | every BatchNorm | none
# auto: a layer whose median channel's variance changed by more than this in log (about 22 %), or
# whose mean moved by more than this many standard deviations, is re-estimated. Measured on
# efficientnet_lite0 (8 sample images): checkered's largest change is 0.135 (keep_first 0) and 0.093
# (keep_first 3); blurpool's is above it in most layers after the first converted step.
STATISTICS_TOLERANCE = 0.2


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def converted_batchnorm_layers(original: nn.Module, converted: nn.Module,
                               probe: torch.Tensor) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``converted`` whose input the conversion changed, found by
    running ``probe`` through both: their input has other shapes (submaps folded into the batch,
    or a denser map). The ones before the first converted step see what they always saw, and
    their statistics, estimated on the original's training set, are better left alone."""
    def input_shapes(model: nn.Module) -> dict[str, list]:
        shapes: dict[str, list] = {}
        handles = [module.register_forward_pre_hook(
                       lambda m, inputs, name=name: shapes.setdefault(name, []).append(tuple(inputs[0].shape)))
                   for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
        try:
            model.eval()(probe)
        finally:
            for handle in handles:
                handle.remove()
        return shapes

    before, after = input_shapes(original), input_shapes(converted)  # by name: a conversion may copy modules
    return [module for name, module in converted.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and after.get(name) != before.get(name)]


def _batches(images: torch.Tensor | Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    return [images] if isinstance(images, torch.Tensor) else images


@torch.no_grad()
def input_statistics(model: nn.Module, images: torch.Tensor | Iterable[torch.Tensor],
                     ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each BatchNorm's input statistics over ``images`` (a batch or an iterable of batches), by
    module name: per-channel (mean, variance) over images, submaps and positions, in float64, the
    model in eval mode (its own statistics untouched)."""
    sums: dict[str, list] = {}

    def accumulate(name: str, x: torch.Tensor) -> None:
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        entry = sums.setdefault(name, [0, 0.0, 0.0])
        entry[0] += flat.shape[1]
        entry[1] = entry[1] + flat.sum(1)
        entry[2] = entry[2] + (flat * flat).sum(1)

    handles = [module.register_forward_pre_hook(lambda m, inputs, name=name: accumulate(name, inputs[0]))
               for name, module in model.named_modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
    try:
        model.eval()
        for batch in _batches(images):
            model(batch)
    finally:
        for handle in handles:
            handle.remove()
    statistics = {}
    for name, (count, total, squares) in sums.items():
        mean = total / count
        statistics[name] = (mean, (squares / count - mean * mean).clamp_min(0))
    return statistics


def statistics_change(before: tuple[torch.Tensor, torch.Tensor], after: tuple[torch.Tensor, torch.Tensor],
                      eps: float = 1e-5) -> float:
    """How far ``after``'s per-channel (mean, variance) moved from ``before``'s, for the median
    channel: the larger of ``|log(var_after / var_before)|`` and the mean's shift in the
    original's standard deviations (``eps``: the norm's own). The median, because the change
    that matters is systematic (a low-pass shrinks the variance of nearly every channel), while
    sampling other positions (checkered) moves a few channels either way."""
    (mean0, var0), (mean1, var1) = before, after
    if mean0.shape != mean1.shape:
        return float("inf")
    scale = ((var1 + eps) / (var0 + eps)).log().median().abs()
    shift = ((mean1 - mean0) / (var0 + eps).sqrt()).median().abs()
    return float(max(scale, shift))


def check_recalibrate(rule: str) -> str:
    """``rule`` if it is one of :data:`RECALIBRATE`, else the one-line error naming the option."""
    if rule not in RECALIBRATE:
        raise ParameterError("recalibrate", f"unknown {{param}} {rule!r}; choose one of {', '.join(RECALIBRATE)}")
    return rule


def norm_layers_to_recalibrate(original: nn.Module, converted: nn.Module,
                               images: torch.Tensor | Iterable[torch.Tensor], rule: str = "auto",
                               tolerance: float = STATISTICS_TOLERANCE) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``converted`` to re-estimate; the others keep their statistics.

    ``rule``: ``"all"`` every one, ``"none"`` none, ``"auto"`` those whose input statistics on
    ``images`` (a batch, or an iterable of batches, on the models' device) moved by more than
    ``tolerance`` from the original's (:func:`statistics_change`). Layers are matched by name (a
    conversion copies modules); one the original lacks counts as changed. Both models end in eval
    mode; nothing else changes."""
    check_recalibrate(rule)
    layers = [(name, m) for name, m in converted.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if rule != "auto":
        return [m for _, m in layers] if rule == "all" else []
    batches = list(_batches(images))
    before, after = input_statistics(original, batches), input_statistics(converted, batches)
    return [module for name, module in layers  # (a layer the converted model never calls sees nothing)
            if name in after and (name not in before
                                  or statistics_change(before[name], after[name], module.eps) > tolerance)]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches, device: torch.device | str = "cpu",
                          layers: list[nn.modules.batchnorm._BatchNorm] | None = None) -> int:
    """Re-estimate the running statistics of ``model``'s BatchNorm layers (or of ``layers`` only)
    over ``batches`` (image tensors); -> the number of images seen. The model is left in eval mode,
    its parameters untouched."""
    layers = batchnorm_layers(model) if layers is None else list(layers)
    if not layers:
        raise ParameterError("model", "the model has no BatchNorm layer to recalibrate")
    momenta = [layer.momentum for layer in layers]
    model.eval()
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the batches
        layer.train()
    seen = 0
    try:
        for images in batches:
            if images.numel():
                model(images.to(device))
                seen += len(images)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        model.eval()
    if not seen:
        raise DataError("no image could be decoded for BatchNorm recalibration")
    return seen


def recalibrate_before_training(original: nn.Module, converted: nn.Module, paths: Sequence[str], transform,
                                rule: str, device: torch.device | str = "cpu", batch_size: int = 32) -> dict:
    """Before a distillation: re-estimate the BatchNorms ``rule`` chooses (:func:`norm_layers_to_recalibrate`)
    over the training images ``paths`` under the eval ``transform`` (the training run then keeps them,
    with the rest, frozen or not as its recipe says). ``converted`` may share ``original``'s tensors:
    the statistics are measured before anything changes. -> ``{"recalibrate", "layers", "of", "images"}``."""
    batches = _decoded_batches(paths, transform, batch_size, 0, device)
    chosen = norm_layers_to_recalibrate(original, converted, batches, rule) if batches else []
    seen = recalibrate_batchnorm(converted, batches, device, chosen) if chosen else 0
    return {"recalibrate": rule, "layers": len(chosen), "of": len(batchnorm_layers(converted)), "images": seen}


def _decoded_batches(paths: Sequence[str], transform, batch_size: int, workers: int,
                     device: torch.device | str) -> list[torch.Tensor]:
    """The images at ``paths`` under ``transform``, in batches on ``device`` (unreadable files left
    out): read once, since the choice of layers and the re-estimate both run over them."""
    loader = DataLoader(DecodedImages([(p, UNLABELLED) for p in paths], transform), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_items)
    return [batch.images.to(device) for batch in loader if batch.images.numel()]


def _calibration_images(data: str | os.PathLike, images: int, seed: int) -> list[str]:
    """``images`` files picked with ``seed`` from DIR/train (labelled layout) or from every image under DIR."""
    root = Path(data).expanduser()
    root = root / "train" if is_labelled_layout(root) else root  # the folder counted, named in the error
    paths = find_images(root)
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise ParameterError("images", f"{{param}} must be a positive number of images, got {images!r}")
    if images > len(paths):
        raise ParameterError("images", f"{{param}} {images} is more than the {len(paths)} images under {root}")
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed))[:images]
    return [paths[i] for i in sorted(order.tolist())]


def _selection_rule(recalibrate: str | None, layers: str | None) -> str:
    """``recalibrate``'s rule, or the older ``layers`` choice (``converted``: by shapes)."""
    if layers is not None:
        if recalibrate is not None:
            raise ParameterError("layers", "{param} is the older way to choose the layers; give it or recalibrate, "
                                           "not both")
        if layers not in LAYERS:
            raise ParameterError("layers", f"unknown {{param}} {layers!r}; choose {', '.join(LAYERS)}")
        return layers
    return check_recalibrate("auto" if recalibrate is None else recalibrate)


def recalibrate_model(
    model: str | ResolvedModel, data: str | os.PathLike, out: str | os.PathLike, *, images: int,
    mode: str | None = None, sampler: str | None = None, keep_first: int | None = None, density: int | None = None,
    edges: str | None = None, dilation: str | None = None, resample_at: str | None = None, phc: int | None = None,
    spectral_convention: str | None = None, seed: int = 0,
    leaf_modules: Sequence[str] = (), weights: str = "DEFAULT", arch: str | None = None,
    preprocessing: Mapping[str, Any] | None = None, trust_factory: bool = False, batch_size: int = 64,
    recalibrate: str | None = None, layers: str | None = None, workers: int = 2, device: str = "auto",
    force: bool = False,
) -> dict:
    """Convert MODEL, recalibrate its BatchNorm statistics over ``images`` images of ``data`` (eval
    preprocessing, in batches of ``batch_size``; ``seed`` picks them, and seeds a random sampler's eval
    table as in ``ccnn-train``), save an artifact at ``out``.
    ``recalibrate`` chooses the BatchNorms (:func:`norm_layers_to_recalibrate`; default ``auto``:
    those whose input statistics the conversion changed, measured on the same images); ``layers``
    is the older choice (``all``, or ``converted``: by shapes, :func:`converted_batchnorm_layers`).
    ``phc``: PHC layers (as ``ccnn-convert``'s; default an artifact's), whose A and F the artifact
    stores; ``auto`` compares them with the dense original, whose statistics the fit moved.
    -> its ``training`` summary."""
    check_seed(seed)  # before anything is loaded, as the other commands
    if phc is not None:
        check_phc(phc)
    rule = _selection_rule(recalibrate, layers)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ParameterError("batch_size", f"{{param}} must be a positive integer, got {batch_size!r}")
    target = check_output(out, force=force)
    overrides = {k: v for k, v in (preprocessing or {}).items() if v is not None}
    if isinstance(model, ResolvedModel):
        resolved = dataclasses.replace(model, preprocessing=model.preprocessing.with_overrides(**overrides))
    else:
        resolved = resolve_model(str(model), weights=weights, arch=arch, preprocessing=overrides or None,
                                 trust_factory=trust_factory)
    base = resolved.conversion
    mode = mode or (base.mode if base is not None else "checkered")
    given = dict(sampler=sampler, keep_first=keep_first, density=density, edges=edges, dilation=dilation,
                 resample_at=resample_at, phc=phc, spectral_convention=spectral_convention)
    check_checkered_options_used([mode], **given)
    spec = ConversionSpec.build(mode, base, leaf_modules=tuple(leaf_modules), **given)
    if spec.mode == "checkered" and spec.sampler == "random" and spec.seed is None:
        spec = dataclasses.replace(spec, seed=seed)
    paths = _calibration_images(data, images, seed)
    pre = resolved.preprocessing
    run_on = resolve_device(device)
    batches = _decoded_batches(paths, pre.transform(), batch_size, workers, run_on)
    if not batches:
        raise DataError("no image could be decoded for BatchNorm recalibration")
    # The converted copy's buffers are its own once moved: the measure runs the original beside it.
    resolved.model.to(run_on)
    converted = resolved.converted(spec, pre.crop).to(run_on)  # an artifact's learned strides too
    if rule == "converted":
        probe = torch.zeros(1, 3, pre.crop, pre.crop, device=run_on)
        chosen = converted_batchnorm_layers(resolved.model, converted, probe)
    else:  # measured before any statistic changes
        chosen = norm_layers_to_recalibrate(resolved.model, converted, batches, rule)
    seen = recalibrate_batchnorm(converted, batches, run_on, chosen) if chosen else sum(len(b) for b in batches)
    summary = {"method": "batchnorm recalibration", "images": seen, "skipped": len(paths) - seen,
               "layers": f"{rule} ({len(chosen)} of {len(batchnorm_layers(converted))} BatchNorm layers)",
               "batch_size": batch_size, "rule": "cumulative average of per-batch statistics (momentum=None)",
               "data": str(data), "from_weights": resolved.weights}
    resolved.model.to("cpu")
    record = dataclasses.replace(resolved, training=summary)
    if spec.phc is not None:  # the PHC layers' A and F (an artifact's own, also in another mode), as ccnn-convert's
        record = dataclasses.replace(record, conversion=spec,
                                     conversion_state=conversion_state(converted, resolved.model) or None)
    save_artifact(target, record, spec, force=force)
    return summary
