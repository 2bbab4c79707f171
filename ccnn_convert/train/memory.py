"""Training memory: activation checkpointing over a converted model's blocks, and OOM errors.

:func:`checkpoint_blocks` splits a traced model's training graph into its blocks (a ResNet's
``layer1.0``, an EfficientNet's ``blocks.3``: the children of its ``nn.Sequential`` and
``nn.ModuleList`` containers, as timm's ``checkpoint_seq`` checkpoints the children of a
Sequential) with ``torch.fx``'s ``split_module``, and runs each block under
``torch.utils.checkpoint``: only block inputs are kept for the backward pass, and each block's
activations are recomputed there. A converted model's activations are its submaps, many times
the original's, which is what checkpointing removes.

The recomputation must not count twice: BatchNorm's running statistics are restored after
it (the recomputed outputs use batch statistics, so they are unchanged), and the random
sampler redraws the same table because ``checkpoint`` restores the RNG state.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from typing import Any, Iterator

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module
from torch.utils.checkpoint import checkpoint

from ..errors import ConversionError, ParameterError

__all__ = ["CheckpointedBlock", "checkpoint_blocks", "out_of_memory_error", "is_out_of_memory"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_IN_PLACE_OPERATORS = {operator.iadd: operator.add, operator.imul: operator.mul, operator.isub: operator.sub,
                       operator.itruediv: operator.truediv}


def _block_of(node: fx.Node) -> str | None:
    """The block a node belongs to: the child of the outermost container on its module stack
    (else its top-level module); None for nodes without a module stack (they join the previous)."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    if not stack:
        return node.target if node.op == "call_module" else None
    for (_, kind), child in zip(stack, stack[1:] + [None]):
        if isinstance(kind, type) and issubclass(kind, _CONTAINERS) and child is not None:
            return child[0]
    return stack[0][0]


def _partition(graph: fx.Graph) -> dict[fx.Node, int]:
    """Consecutive nodes of one block form one partition; ids only grow along the graph, so the
    split graph is a chain (values may still skip ahead, as a residual does)."""
    parts: dict[fx.Node, int] = {}
    current, block = 0, None
    for node in graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        key = _block_of(node)
        if key is not None and block is not None and key != block:
            current += 1
        block = key if key is not None else block
        parts[node] = current
    return parts


class CheckpointedBlock(nn.Module):
    """Runs ``block`` under ``torch.utils.checkpoint`` in training, directly otherwise."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args: Any) -> Any:
        if not (self.training and torch.is_grad_enabled()):
            return self.block(*args)
        calls = [0]

        def run(*inputs: Any) -> Any:
            calls[0] += 1
            if calls[0] == 1:
                return self.block(*inputs)
            with _running_stats_kept(self.block):  # the recomputation in backward
                return self.block(*inputs)

        return checkpoint(run, *args, use_reentrant=False, preserve_rng_state=True)


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for norm, buffers in zip(norms, saved):
                for name, value in buffers.items():
                    getattr(norm, name).copy_(value)


def _without_inplace(model: fx.GraphModule) -> fx.GraphModule:
    """A copy of the graph (sharing the modules) whose in-place ops write new tensors instead.

    A block's inputs are saved for its recomputation; an in-place ReLU or ``+=`` on a block
    input would change what was saved (autograd refuses to go on). Modules with ``inplace=True``
    are replaced by shallow copies without it, so the original model is left as it was.
    """
    graph = fx.Graph()
    output = graph.graph_copy(model.graph, {})
    graph.output(output)
    copied = fx.GraphModule(model, graph)
    for index, node in enumerate(graph.nodes):
        if node.op == "call_module" and getattr(copied.get_submodule(node.target), "inplace", False) is True:
            module = copy.copy(copied.get_submodule(node.target))
            module.inplace = False
            name = f"ccnn_out_of_place_{index}"
            copied.add_module(name, module)
            node.target = name
        elif node.op == "call_function" and node.kwargs.get("inplace") is True:
            node.kwargs = {**node.kwargs, "inplace": False}
        elif node.op == "call_function" and node.target in _IN_PLACE_OPERATORS:
            node.target = _IN_PLACE_OPERATORS[node.target]
    copied.recompile()
    return copied


def checkpoint_blocks(model: fx.GraphModule) -> fx.GraphModule:
    """The training graph of ``model`` split into checkpointed blocks; shares its parameters.

    Use it for training only (the returned module's eval mode runs the training graph's
    operations without checkpointing; evaluate ``model`` itself).
    """
    if not isinstance(model, fx.GraphModule):
        raise ParameterError("checkpointing", "{param} needs a traced (converted) model, not "
                                              f"{type(model).__name__}")
    model.train()  # a DualGraphModule switches to its training graph
    model = _without_inplace(model)
    parts = _partition(model.graph)
    if len(set(parts.values())) < 2:
        raise ConversionError("checkpointing found a single block in the model: nothing to recompute")
    split = split_module(model, model, lambda node: parts[node], keep_original_order=True)
    for name, child in list(split.named_children()):
        if name.startswith("submod_"):
            setattr(split, name, CheckpointedBlock(child))
    return split.train()


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("DefaultCPUAllocator" in text or "can't allocate memory" in text)


def out_of_memory_error(per_process_batch: int, checkpointing: bool) -> ParameterError:
    hint = "" if checkpointing else " or turn on {param:checkpointing}"
    return ParameterError("batch_size", f"a batch of {per_process_batch} images per process does not fit in "
                                        f"memory: lower {{param}}{hint}", also=("checkpointing",))
