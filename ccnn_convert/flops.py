"""FLOP counting with torch.utils.flop_counter (convolutions and matrix products).

By default the forward runs on meta tensors (:func:`~ccnn_convert.core.tracing.on_meta`), so
counting the FLOPs of even a dilated ResNet-152 computes nothing and takes a moment.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .core.tracing import on_meta as _on_meta

__all__ = ["count_flops"]


def count_flops(model: nn.Module, example_input: torch.Tensor, on_meta: bool = True) -> int:
    """FLOPs of one eval-mode forward of ``model`` on ``example_input`` (a multiply-add counts 2)."""
    was_training = model.training
    model.eval()
    try:
        if on_meta:
            return _count_on_meta(model, example_input)
        return _count(model, example_input)
    finally:
        model.train(was_training)


def _count(model: nn.Module, example_input: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(example_input)
    return int(counter.get_total_flops())


def _count_on_meta(model: nn.Module, example_input: torch.Tensor) -> int:
    try:
        with _on_meta(model):
            return _count(model, example_input.to("meta"))
    except Exception:  # code that needs real values (data-dependent branches): count for real
        return _count(model, example_input)
