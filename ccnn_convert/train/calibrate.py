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
less well. :func:`converted_batchnorm_layers` finds the layers whose input the conversion really
changed (those after the first converted step), so that only they are re-estimated
(``layers="converted"``).

:func:`recalibrate_model` is the command's API: MODEL + DIR -> an artifact.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..core.options import check_seed
from ..data import DecodedImages, collate_items
from ..errors import DataError, ParameterError
from ..models import ResolvedModel, resolve_model, save_artifact
from ..outputs import check_output
from ..runtime import resolve_device
from ..spec import ConversionSpec, check_checkered_options_used
from .unlabelled import UNLABELLED, find_images, is_labelled_layout

__all__ = ["LAYERS", "batchnorm_layers", "converted_batchnorm_layers", "recalibrate_batchnorm", "recalibrate_model"]

LAYERS = ("all", "converted")  # every BatchNorm | only those whose input the conversion changed


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


def recalibrate_model(
    model: str | ResolvedModel, data: str | os.PathLike, out: str | os.PathLike, *, images: int,
    mode: str | None = None, sampler: str | None = None, keep_first: int | None = None, density: int | None = None,
    edges: str | None = None, dilation: str | None = None, seed: int = 0,
    leaf_modules: Sequence[str] = (), weights: str = "DEFAULT", arch: str | None = None,
    preprocessing: Mapping[str, Any] | None = None, trust_factory: bool = False, batch_size: int = 64,
    layers: str = "all", workers: int = 2, device: str = "auto", force: bool = False,
) -> dict:
    """Convert MODEL, recalibrate its BatchNorm statistics over ``images`` images of ``data`` (eval
    preprocessing, in batches of ``batch_size``; ``seed`` picks them, and seeds a random sampler's eval
    table as in ``ccnn-train``), save an artifact at ``out``.
    ``layers="converted"`` recalibrates only the BatchNorms whose input the conversion changed.
    -> its ``training`` summary."""
    check_seed(seed)  # before anything is loaded, as the other commands
    if layers not in LAYERS:
        raise ParameterError("layers", f"unknown {{param}} {layers!r}; choose {', '.join(LAYERS)}")
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
    given = dict(sampler=sampler, keep_first=keep_first, density=density, edges=edges, dilation=dilation)
    check_checkered_options_used([mode], **given)
    spec = ConversionSpec.build(mode, base, leaf_modules=tuple(leaf_modules), **given)
    if spec.mode == "checkered" and spec.sampler == "random" and spec.seed is None:
        spec = dataclasses.replace(spec, seed=seed)
    paths = _calibration_images(data, images, seed)
    pre = resolved.preprocessing
    loader = DataLoader(DecodedImages([(p, UNLABELLED) for p in paths], pre.transform()), batch_size=batch_size,
                        num_workers=workers, collate_fn=collate_items)
    run_on = resolve_device(device)
    converted = resolved.converted(spec, pre.crop).to(run_on)  # an artifact's learned strides too
    chosen = None
    if layers == "converted":
        probe = torch.zeros(1, 3, pre.crop, pre.crop, device=run_on)
        chosen = converted_batchnorm_layers(resolved.model, converted, probe)
    seen = recalibrate_batchnorm(converted, (batch.images for batch in loader), run_on, chosen)
    count = len(batchnorm_layers(converted)) if chosen is None else len(chosen)
    summary = {"method": "batchnorm recalibration", "images": seen, "skipped": len(paths) - seen,
               "layers": f"{layers} ({count} of {len(batchnorm_layers(converted))} BatchNorm layers)",
               "batch_size": batch_size, "rule": "cumulative average of per-batch statistics (momentum=None)",
               "data": str(data), "from_weights": resolved.weights}
    resolved.model.to("cpu")
    save_artifact(target, dataclasses.replace(resolved, training=summary), spec, force=force)
    return summary
