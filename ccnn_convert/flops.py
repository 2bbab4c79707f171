"""FLOP counting with torch.utils.flop_counter (convolutions and matrix products).

By default the forward runs on meta tensors (parameters, buffers and input swapped for meta
copies), so counting the FLOPs of even a dilated ResNet-152 computes nothing and takes a moment.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils.flop_counter import FlopCounterMode


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
    meta_state = {name: torch.empty_like(t, device="meta")
                  for name, t in itertools.chain(model.named_parameters(remove_duplicate=False),
                                                   model.named_buffers(remove_duplicate=False))}
    try:
        with _reparametrize_module(model, meta_state):
            return _count(model, example_input.to("meta"))
    except Exception:  # code that needs real values (data-dependent branches): count for real
        return _count(model, example_input)
