"""Slow reference multisampling, written independently of ccnn_convert.core.layers.

It loops over submaps, samples and output positions and computes each output value from
its window by hand, following the definition: the sample at offset (dy, dx) is the layer,
with its own stride, applied to its padded input shifted by (dy, dx), the far edge filled with
the padding value (0 for convolutions and average pools, -inf for max pools).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def traditional_size(op: str, x: torch.Tensor, **kw) -> tuple[int, int]:
    """Output size of the traditional layer: simply run it."""
    if op == "conv":
        out = F.conv2d(x, kw["weight"], None, kw["stride"], kw["padding"], kw["dilation"], kw["groups"])
    elif op == "max":
        out = F.max_pool2d(x, kw["kernel"], kw["stride"], kw["padding"], kw["dilation"], kw["ceil_mode"])
    else:
        out = F.avg_pool2d(x, kw["kernel"], kw["stride"], kw["padding"], kw["ceil_mode"], kw["count_include_pad"])
    return tuple(out.shape[2:])


def _shifted_padded(x, padding, dy, dx, fill, extra):
    """Padded input, shifted by (dy, dx), far edge filled; plus a mask of real positions."""
    ph, pw = padding
    b, c, h, w = x.shape
    big_h, big_w = h + 2 * ph + extra, w + 2 * pw + extra
    padded = torch.full((b, c, big_h, big_w), fill, dtype=x.dtype)
    padded[:, :, ph:ph + h, pw:pw + w] = x
    real = torch.zeros(big_h, big_w, dtype=torch.bool)
    real[ph:ph + h, pw:pw + w] = True
    shifted = torch.full_like(padded, fill)
    shifted[:, :, : big_h - dy, : big_w - dx] = padded[:, :, dy:, dx:]
    shifted_real = torch.zeros_like(real)
    shifted_real[: big_h - dy, : big_w - dx] = real[dy:, dx:]
    return shifted, shifted_real


def _window_output(op: str, window: torch.Tensor, count: int | None, **kw) -> torch.Tensor:
    """One output position from its ``(B, C, kh, kw)`` window: the grouped convolution, the max,
    or the sum over ``count`` positions (an all-padding window counts 1)."""
    if op == "conv":
        weight, bias, groups = kw["weight"], kw.get("bias"), kw["groups"]
        b, kh, kw_ = window.shape[0], *window.shape[-2:]
        win = window.reshape(b, groups, -1, kh, kw_)
        wgt = weight.reshape(groups, -1, weight.shape[1], kh, kw_)
        value = torch.einsum("bgcij,gocij->bgo", win, wgt).reshape(b, -1)
        return value + (bias if bias is not None else 0)
    if op == "max":
        return window.amax(dim=(-1, -2))
    return window.sum(dim=(-1, -2)) / max(count, 1)


def sample(op: str, x: torch.Tensor, dy: int, dx: int, **kw) -> torch.Tensor:
    """One sample of one submap, position by position."""
    kh, kw_ = _pair(kw["kernel"])
    sh, sw = _pair(kw["stride"])
    dh, dw = _pair(kw.get("dilation", 1))
    padding = _pair(kw["padding"])
    out_h, out_w = traditional_size(op, x, **kw)
    fill = -math.inf if op == "max" else 0.0
    extra = max(sh, sw) * 2 + max(kh * dh, kw_ * dw)
    shifted, real = _shifted_padded(x, padding, dy, dx, fill, extra)
    b = x.shape[0]
    channels = kw["weight"].shape[0] if op == "conv" else x.shape[1]
    out = torch.zeros(b, channels, out_h, out_w, dtype=x.dtype)
    for oy in range(out_h):
        for ox in range(out_w):
            rows = [oy * sh + t * dh for t in range(kh)]
            cols = [ox * sw + t * dw for t in range(kw_)]
            window = shifted[:, :, rows][:, :, :, cols]
            count = None
            if op == "avg":
                count = kh * kw_ if kw["count_include_pad"] else int(real[rows][:, cols].sum())
            out[:, :, oy, ox] = _window_output(op, window, count, **kw)
    return out


def multisample(op: str, x: torch.Tensor, sequence, **kw) -> torch.Tensor:
    """All samples of all submaps, in the documented order: sample j of submap i -> j*S + i."""
    submaps = len(sequence)
    batch = x.shape[0] // submaps
    outputs = {}
    for i, sampler in enumerate(sequence):
        x_i = x[i * batch:(i + 1) * batch]
        for j, (dy, dx) in enumerate(sampler):
            outputs[j * submaps + i] = sample(op, x_i, dy, dx, **kw)
    return torch.cat([outputs[k] for k in sorted(outputs)])


# --------------------------------------------------------------------------- exact edges
#
# The exact rule, from windows: a submap carries (r, c), its real rows and columns (a prefix).
# Values beyond them are padding (0, or -inf for max pools). A sample is real when its window
# lies inside the padded real input (rows < r + 2p); with ceil_mode also when it starts inside
# the input or its left padding (start < r + p), as PyTorch's ceil rule allows. Average pools
# divide by the window positions inside the padded real input (count_include_pad) or by the
# real positions in the window (count_include_pad=False).


def sample_exact(op: str, x: torch.Tensor, dy: int, dx: int, real, **kw):
    """One sample of one submap under exact edges: ``(output, (real rows, real cols))``."""
    kh, kw_ = _pair(kw["kernel"])
    sh, sw = _pair(kw["stride"])
    dh, dw = _pair(kw.get("dilation", 1))
    ph, pw = _pair(kw["padding"])
    r, c = real
    ceil = kw.get("ceil_mode", False)
    fill = -math.inf if op == "max" else 0.0
    out_h, out_w = traditional_size(op, x, **kw)
    b, _, h, w = x.shape
    big_h, big_w = h + 2 * ph + dy + sh * out_h + kh * dh, w + 2 * pw + dx + sw * out_w + kw_ * dw
    padded = torch.full((b, x.shape[1], big_h, big_w), fill, dtype=x.dtype)
    padded[:, :, ph:ph + r, pw:pw + c] = x[:, :, :r, :c]  # everything else is padding
    channels = kw["weight"].shape[0] if op == "conv" else x.shape[1]
    out = torch.zeros(b, channels, out_h, out_w, dtype=x.dtype)
    real_rows = [_real_window(dy + oy * sh, kh, dh, r, ph, ceil) for oy in range(out_h)]
    real_cols = [_real_window(dx + ox * sw, kw_, dw, c, pw, ceil) for ox in range(out_w)]
    for oy in range(out_h):
        for ox in range(out_w):
            rows = [dy + oy * sh + t * dh for t in range(kh)]
            cols = [dx + ox * sw + t * dw for t in range(kw_)]
            window = padded[:, :, rows][:, :, :, cols]
            count = None
            if op == "avg" and kw["count_include_pad"]:
                count = sum(1 for i in rows for j in cols if i < r + 2 * ph and j < c + 2 * pw)
            elif op == "avg":
                count = sum(1 for i in rows for j in cols if ph <= i < ph + r and pw <= j < pw + c)
            out[:, :, oy, ox] = _window_output(op, window, count, **kw)
    return out, (_prefix(real_rows), _prefix(real_cols))


def _real_window(start: int, kernel: int, dilation: int, real: int, pad: int, ceil: bool) -> bool:
    inside = start + dilation * (kernel - 1) < real + 2 * pad
    return inside or (ceil and start < real + pad)


def _prefix(flags: list[bool]) -> int:
    count = sum(flags)
    assert all(flags[:count]) and not any(flags[count:]), f"real samples are not a prefix: {flags}"
    return count


def multisample_exact(op: str, maps: list, reals: list, sequence, **kw):
    """Every submap of a list through one layer under exact edges; ``sequence`` None = traditional.

    Sample j of submap i becomes submap j*S + i. Returns ``(maps, reals)``.
    """
    if sequence is None:
        sequence = [[(0, 0)]] * len(maps)
    results = {}
    for i, (m, real, sampler) in enumerate(zip(maps, reals, sequence)):
        for j, (dy, dx) in enumerate(sampler):
            results[j * len(maps) + i] = sample_exact(op, m, dy, dx, real, **kw)
    ordered = [results[k] for k in sorted(results)]
    return [o for o, _ in ordered], [rc for _, rc in ordered]


def global_mean_exact(maps: list, reals: list) -> torch.Tensor:
    """Mean over the real positions of all submaps: ``(B, C)``."""
    total = sum(r * c for r, c in reals)
    sums = sum(m[:, :, :r, :c].sum(dim=(2, 3)) for m, (r, c) in zip(maps, reals))
    return sums / total


def global_max_exact(maps: list, reals: list) -> torch.Tensor:
    return torch.stack([m[:, :, :r, :c].amax(dim=(2, 3)) for m, (r, c) in zip(maps, reals)]).amax(0)


# --------------------------------------------------------------------------- test models


def randomize_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm statistics and affine parameters far from the identity, so that a position or
    a submap mixed up shows in the outputs (fresh torchvision models have mean 0, var 1)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return model
