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
    if op == "conv":
        weight, bias, groups = kw["weight"], kw.get("bias"), kw["groups"]
        out = torch.zeros(b, weight.shape[0], out_h, out_w, dtype=x.dtype)
    else:
        out = torch.zeros(b, x.shape[1], out_h, out_w, dtype=x.dtype)
    for oy in range(out_h):
        for ox in range(out_w):
            rows = [oy * sh + t * dh for t in range(kh)]
            cols = [ox * sw + t * dw for t in range(kw_)]
            window = shifted[:, :, rows][:, :, :, cols]
            if op == "conv":
                g = groups
                win = window.reshape(b, g, -1, kh, kw_)
                wgt = weight.reshape(g, -1, weight.shape[1], kh, kw_)
                value = torch.einsum("bgcij,gocij->bgo", win, wgt).reshape(b, -1)
                out[:, :, oy, ox] = value + (bias if bias is not None else 0)
            elif op == "max":
                out[:, :, oy, ox] = window.amax(dim=(-1, -2))
            else:
                if kw["count_include_pad"]:
                    count = kh * kw_
                else:
                    count = max(1, int(real[rows][:, cols].sum()))  # all-fill window -> 0
                out[:, :, oy, ox] = window.sum(dim=(-1, -2)) / count
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
