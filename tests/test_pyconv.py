"""A PyConv-ResNet: parallel strided grouped convolutions (kernels 3/5/7/9) and a strided
max-pool shortcut meet in one block, so they must form one step and sample identically."""

from __future__ import annotations

import pytest
import torch

from ccnn_convert import conversion_report, convert
from pyconv_resnet import tiny_pyconv_resnet
from test_convert import _conv_kw, _sequences_of, _strided


def _tiny():
    torch.manual_seed(0)
    net = tiny_pyconv_resnet().eval()
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 1.5)
    return net


def _block_reference(block, maps, sequence):
    """One PyConv bottleneck, submap by submap; every strided layer samples with ``sequence``."""
    reduced = [block.reduce(m) for m in maps]
    branches = [_strided("conv", reduced, sequence, **_conv_kw(conv)) for conv in block.pyconv[0].branches]
    pyconv = [block.pyconv[2](block.pyconv[1](torch.cat(parts, dim=1))) for parts in zip(*branches)]
    _, conv, bn = block.shortcut
    pooled = _strided("max", maps, sequence, kernel=3, stride=2, padding=1, dilation=1, ceil_mode=False)
    return [torch.relu(block.expand(p) + bn(conv(s))) for p, s in zip(pyconv, pooled)]


def _reference(net, x, seqs):
    maps = [net.stem(x)]
    for block, sequence in zip(net.blocks, seqs):
        maps = _block_reference(block, maps, sequence)
    features = torch.stack([net.pool(m).flatten(1) for m in maps]).mean(0)  # average of the submaps
    return net.fc(features)


def test_each_pyconv_block_is_one_step():
    net = _tiny()
    model = convert(net, mode="checkered", example_input=torch.zeros(1, 3, 16, 16))
    report = conversion_report(model)
    steps = {}
    for record in report.layers:
        steps.setdefault(record.step, []).append(record.name)
    assert steps == {
        1: [f"blocks.0.pyconv.0.branches.{i}" for i in range(4)] + ["blocks.0.shortcut.0"],
        2: [f"blocks.1.pyconv.0.branches.{i}" for i in range(3)] + ["blocks.1.shortcut.0"],
    }
    assert all(record.converted for record in report.layers) and report.final_submaps == 4
    dilated = conversion_report(convert(net, mode="dilated", dilation="multisample",
                                        example_input=torch.zeros(1, 3, 16, 16)))
    assert dilated.final_submaps == 16


@pytest.mark.parametrize("mode,sampler", [("checkered", "lattice"), ("checkered", "random"), ("dilated", "naive")])
def test_pyconv_resnet_matches_slow_reference(mode, sampler):
    net = _tiny()
    x = torch.randn(2, 3, 16, 16)
    options = {"dilation": "multisample"} if mode == "dilated" else {}  # the reference needs the submaps
    model = convert(net, mode=mode, sampler=sampler, seed=1 if sampler == "random" else None, example_input=x,
                    **options)
    seqs = _sequences_of(model, steps=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference(net, x, seqs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [16, 19])
def test_native_dilation_equals_multisample_dilation(size):
    """Native dilation (strides removed, later layers dilated) gives multisample dilation's logits."""
    net = _tiny()
    x = torch.randn(2, 3, size, size)
    native = convert(net, mode="dilated", dilation="native", example_input=x)
    multisample = convert(net, mode="dilated", dilation="multisample", example_input=x)
    assert conversion_report(native).final_submaps == 1
    assert [r.converted for r in conversion_report(native).layers] == \
        [r.converted for r in conversion_report(multisample).layers]
    with torch.no_grad():
        torch.testing.assert_close(native(x), multisample(x), rtol=1e-5, atol=1e-5)
