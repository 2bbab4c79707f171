"""Multisampling layers against the slow per-position reference in tests/reference.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference
from ccnn_convert.core import layers, sequences


def _table(sequence):
    return sequences.offset_table(sequence)


def _run(op, x, table, **kw):
    if op == "conv":
        return layers.multisample_conv2d(x, table, kw["weight"], kw.get("bias"), kw["stride"], kw["padding"],
                                         kw["dilation"], kw["groups"])
    if op == "max":
        return layers.multisample_max_pool2d(x, table, kw["kernel"], kw["stride"], kw["padding"], kw["dilation"],
                                             kw["ceil_mode"])
    return layers.multisample_avg_pool2d(x, table, kw["kernel"], kw["stride"], kw["padding"], kw["ceil_mode"],
                                         kw["count_include_pad"])


@st.composite
def layer_cases(draw):
    op = draw(st.sampled_from(["conv", "max", "avg"]))
    stride = draw(st.integers(2, 4))
    kernel = draw(st.integers(1, 4))
    dilation = draw(st.integers(1, 2)) if op != "avg" else 1
    padding = draw(st.integers(0, kernel // 2))
    submaps = draw(st.sampled_from([1, 2, 3]))
    height = draw(st.integers(max(kernel * dilation, stride), 11))
    width = draw(st.integers(max(kernel * dilation, stride), 11))
    channels = draw(st.sampled_from([2, 4]))
    kind = draw(st.sampled_from(["naive", "lattice", "random", "dilated", "dense"]))
    if kind == "dilated":
        samples = stride * stride
    elif kind == "dense":
        samples = draw(st.integers(1, stride * stride))
    else:
        samples = stride
    kw = dict(kernel=kernel, stride=stride, padding=padding, dilation=dilation)
    if op == "conv":
        groups = draw(st.sampled_from([1, 2]))
        kw.update(weight=torch.randn(4, channels // groups, kernel, kernel, dtype=torch.float64),
                  bias=torch.randn(4, dtype=torch.float64), groups=groups)
    elif op == "max":
        kw.update(ceil_mode=draw(st.booleans()))
    else:
        kw.update(ceil_mode=draw(st.booleans()), count_include_pad=draw(st.booleans()))
    seq_kind = "naive" if kind in ("dilated", "dense") else kind
    generator = torch.Generator().manual_seed(draw(st.integers(0, 1000)))
    sequence = sequences.sampler_sequence(seq_kind, submaps, stride, samples, generator)
    x = torch.randn(submaps * 2, channels, height, width, dtype=torch.float64)
    return op, x, sequence, kw


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_cases())
def test_multisample_layers_match_slow_reference(case):
    op, x, sequence, kw = case
    expected = reference.multisample(op, x, sequence, **kw)
    actual = _run(op, x, _table(sequence), **kw)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layer_cases())
def test_sample_zero_of_naive_sampler_is_the_traditional_layer(case):
    """Offset (0, 0) must reproduce PyTorch's own strided op exactly, per submap."""
    op, x, _, kw = case
    if op == "avg" and kw["ceil_mode"] and kw["count_include_pad"]:
        return  # documented difference: fill counts like padding, PyTorch clips ceil-mode windows
    stride = kw["stride"]
    table = _table([[(0, 0)]] * 2)
    actual = _run(op, x, table, **kw)
    if op == "conv":
        expected = F.conv2d(x, kw["weight"], kw["bias"], stride, kw["padding"], kw["dilation"], kw["groups"])
    elif op == "max":
        expected = F.max_pool2d(x, kw["kernel"], stride, kw["padding"], kw["dilation"], kw["ceil_mode"])
    else:
        expected = F.avg_pool2d(x, kw["kernel"], stride, kw["padding"], kw["ceil_mode"], kw["count_include_pad"])
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_checkered_conv_by_hand():
    """A 4x4 single-channel map through a 1x1 stride-2 'identity' conv: samples are pixels."""
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    weight = torch.ones(1, 1, 1, 1)
    table = _table([[(0, 0), (1, 1)]])  # sampler 0
    out = layers.multisample_conv2d(x, table, weight, None, 2, 0, 1, 1)
    assert out[0, 0].tolist() == [[0.0, 2.0], [8.0, 10.0]]
    assert out[1, 0].tolist() == [[5.0, 7.0], [13.0, 15.0]]
    table = _table([[(0, 1), (1, 0)]])  # sampler 1
    out = layers.multisample_conv2d(x, table, weight, None, 2, 0, 1, 1)
    assert out[0, 0].tolist() == [[1.0, 3.0], [9.0, 11.0]]
    assert out[1, 0].tolist() == [[4.0, 6.0], [12.0, 14.0]]


def test_far_edge_fill_by_hand():
    """3x3 input, 2x2 max pool stride 2: the (1,1) sample reads the -inf fill past the edge."""
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    out = layers.multisample_max_pool2d(x, _table([[(1, 1)]]), 2, 2)
    assert out[0, 0].tolist() == [[8.0]]  # window rows 1-2, cols 1-2
    avg = layers.multisample_avg_pool2d(x, _table([[(1, 1)]]), 2, 2)
    assert avg[0, 0].tolist() == [[(4 + 5 + 7 + 8) / 4]]


def test_submap_order_is_sample_major():
    """After a layer on S submaps, sample j of submap i is submap j*S + i."""
    x = torch.randn(3 * 2, 1, 4, 4)  # 3 submaps, batch 2
    weight = torch.ones(1, 1, 1, 1)
    seq = [[(0, 0), (1, 1)], [(0, 1), (1, 0)], [(0, 0), (1, 1)]]
    out = layers.multisample_conv2d(x, _table(seq), weight, None, 2, 0, 1, 1).reshape(2, 3, 2, 1, 2, 2)
    grouped = x.reshape(3, 2, 1, 4, 4)
    for i, sampler in enumerate(seq):
        for j, (dy, dx) in enumerate(sampler):
            torch.testing.assert_close(out[j, i], grouped[i, :, :, dy::2, dx::2])


def test_submap_mean_and_repeat_roundtrip():
    x = torch.randn(4 * 3, 2, 5, 5)
    mean = layers.submap_mean(x, 4)
    torch.testing.assert_close(mean, torch.stack([x[i * 3:(i + 1) * 3] for i in range(4)]).mean(0))
    repeated = layers.submap_repeat(mean, 4)
    for i in range(4):
        torch.testing.assert_close(repeated[i * 3:(i + 1) * 3], mean)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_matches_float32(dtype):
    x = torch.randn(4, 8, 10, 10)
    weight = torch.randn(8, 8, 3, 3) / 8
    table = _table(sequences.sampler_sequence("lattice", 2, 2, 2))
    ref = layers.multisample_conv2d(x, table, weight, None, 2, 1, 1, 1)
    low = layers.multisample_conv2d(x.to(dtype), table, weight.to(dtype), None, 2, 1, 1, 1)
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), ref, rtol=5e-2, atol=5e-2)
    pooled = layers.multisample_max_pool2d(x.to(dtype), table, 3, 2, 1)
    torch.testing.assert_close(pooled.float(), layers.multisample_max_pool2d(x, table, 3, 2, 1), rtol=1e-2, atol=1e-2)
