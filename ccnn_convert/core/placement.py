"""Where a resampling mode puts its downsampler: ``resample_at="layer"`` or ``"activation"``.

``layer``: right after the strided layer run at stride 1 (the pass as it first was).

``activation`` (antialiased-cnns' placement, ``Conv(s1) -> norm -> activation -> BlurPool``):
after the **pointwise tail** of the strided layer, the chain of ops that act on each position
(and channel) alone: normalisation, activations, dropout. The chain ends at the first op that
mixes positions or channels, reads another per-image tensor, or at a value with more than one
user (the downsampled map must reach every user, and a branch may not take it). A low-pass
before the normalisation shrinks the variance its frozen statistics expect; after the
activation it does not, and the nonlinearity sees the full-resolution map as it was trained to.

One rule for the train and the eval graph: BatchNorm is in the tail in both. In training mode
its statistics are the batch's, which is not pointwise across the batch, but the running
statistics it accumulates are then those of the stride-1 map, the very map the eval-mode
BatchNorm normalises: moving the downsampler in one graph only would make the two disagree.

One exception, because it is exact and cheaper: a strided **1x1 convolution without padding**
(a ResNet shortcut) takes its downsampler on its input, as antialiased-cnns' ResNets do. A blur,
a spectral crop and DiffStride are linear, per channel, and keep a constant map constant, so
they commute with the 1x1 convolution (bias included) and with an eval-mode norm after it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

__all__ = ["DEFAULT_RESAMPLE_AT", "RESAMPLE_AT", "pointwise_tail_end", "resamples_input"]

RESAMPLE_AT = ("layer", "activation")
# The one place the default lives. "activation" measured far better on the pretrained
# efficientnet_lite0, untrained, 250 images (docs/results.md#recovery): blurpool 12.8 -> 42.8,
# spectral 36.4 -> 72.8, diffstride 12.8 -> 26.4 top-1. Artifacts that do not record it rebuild as "layer".
DEFAULT_RESAMPLE_AT = "activation"

# Modules that act on each position alone (per-channel affine at most).
_POINTWISE_MODULES: tuple[type, ...] = (
    nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.Hardswish, nn.Hardsigmoid,
    nn.GELU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.PReLU, nn.Sigmoid, nn.Tanh, nn.Mish, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
)
_POINTWISE_MODULE_NAMES = ("FrozenBatchNorm2d",)  # torchvision.ops, matched by name: core does not import it
_POINTWISE_FUNCTIONS = {
    F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.gelu, F.leaky_relu,
    F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh,
    F.dropout, F.dropout2d, F.batch_norm, torch.clamp, torch.clip,
}
_POINTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip",
                      "clip_", "contiguous"}


def _is_pointwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules.get(node.target)
        return isinstance(module, _POINTWISE_MODULES) or type(module).__name__ in _POINTWISE_MODULE_NAMES
    if node.op == "call_function":
        return node.target in _POINTWISE_FUNCTIONS
    return node.op == "call_method" and node.target in _POINTWISE_METHODS


def _reads_only(node: fx.Node, value: fx.Node) -> bool:
    """``value`` is the op's first input and every other node it reads is a parameter or buffer."""
    inputs = node.all_input_nodes
    return bool(inputs) and inputs[0] is value and node.args[:1] == (value,) \
        and all(other.op == "get_attr" for other in inputs[1:])


def pointwise_tail_end(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """The last node of ``node``'s pointwise tail (``node`` itself when it has none)."""
    end = node
    while len(end.users) == 1:
        user = next(iter(end.users))
        if not (_is_pointwise(user, modules) and _reads_only(user, end)):
            break
        end = user
    return end


def resamples_input(op: str, kernel: tuple[int, int], padding: tuple[int, int]) -> bool:
    """A strided 1x1 convolution without padding takes the downsampler on its input (exact, cheaper)."""
    return op == "conv2d" and tuple(kernel) == (1, 1) and tuple(padding) == (0, 0)
