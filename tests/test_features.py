"""Dense feature maps (core.features) against torchvision's dilated ResNet-50 and its feature
extractor, and against the slow per-position reference (tests/reference.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor as tv_feature_extractor
from torchvision.models.feature_extraction import get_graph_node_names

import reference
from ccnn_convert.core import convert
from ccnn_convert.core.features import create_feature_extractor, graph_node_names
from ccnn_convert.errors import ParameterError
from ccnn_convert.visualize import input_position


@pytest.fixture(scope="module")
def resnets():
    """A randomized-BatchNorm ResNet-50 and torchvision's dilated one with the same weights."""
    torch.manual_seed(0)
    model = reference.randomize_batchnorm(torchvision.models.resnet50()).eval()
    dilated = torchvision.models.resnet50(replace_stride_with_dilation=[True, True, True]).eval()
    dilated.load_state_dict(model.state_dict())
    return model, dilated


def _rel_err(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _check_dilated_layer4(resnets, size, **kwargs):
    model, dilated = resnets
    x = torch.randn(1, 3, size, size)
    kwargs.setdefault("dilation", "multisample")  # reassembled from submaps unless the caller says native
    extractor = create_feature_extractor(model, ["layer4"], mode="dilated", keep_first=2, **kwargs)
    with torch.no_grad():
        dense = extractor(x)["layer4"]
        expected = tv_feature_extractor(dilated, ["layer4"])(x)["layer4"]
    assert dense.values.shape == expected.shape
    assert dense.mask.all() and dense.stride == 4
    assert _rel_err(dense.values, expected) <= 1e-5
    return dense


def test_node_names_are_torchvisions():
    model = torchvision.models.resnet50().eval()
    assert list(graph_node_names(convert(model).graph).values()) == get_graph_node_names(model)[1]
    # torchvision makes its ops (Conv2dNormActivation, ...) leaves and we trace into them: each of
    # its names is still one of ours or the module of some of ours, so it resolves the same way.
    model = torchvision.models.mobilenet_v3_small().eval()
    ours = list(graph_node_names(convert(model).graph).values())
    for name in get_graph_node_names(model)[1]:
        assert any(n == name or n.startswith(name + ".") for n in ours), name


def test_dilated_layer4_reassembled_equals_torchvision_dilated_resnet50_at_224(resnets):
    _check_dilated_layer4(resnets, 224)


def test_dilated_layer4_reassembled_equals_torchvision_dilated_resnet50_at_an_odd_size(resnets):
    _check_dilated_layer4(resnets, 193)


@pytest.mark.parametrize("size", [224, 193])
def test_multisample_dense_map_equals_native_dilation(resnets, size):
    model, _ = resnets
    x = torch.randn(1, 3, size, size)
    nodes = {"layer3.1.relu_1": "mid", "layer4": "out"}
    with torch.no_grad():
        multi = create_feature_extractor(model, nodes, mode="dilated", keep_first=2, dilation="multisample")(x)
        native = create_feature_extractor(model, nodes, mode="dilated", keep_first=2, dilation="native")(x)
    for name in nodes.values():
        assert native[name].mask.all() and native[name].stride == multi[name].stride == 4
        assert _rel_err(multi[name].values, native[name].values) <= 1e-5


def test_traditional_returns_torchvisions_plain_maps_under_the_given_names():
    torch.manual_seed(0)
    model = reference.randomize_batchnorm(torchvision.models.resnet18()).eval()
    x = torch.randn(2, 3, 64, 64)
    nodes = {"layer2": "c3", "layer3.0.relu_1": "mid"}
    for mode in ("traditional", "original"):
        with torch.no_grad():
            ours = create_feature_extractor(model, nodes, mode=mode)(x)
            expected = tv_feature_extractor(model, nodes)(x)
        assert list(ours) == ["c3", "mid"]
        for name in ours:
            assert torch.equal(ours[name].values, expected[name])
            assert ours[name].mask.all() and ours[name].mask.shape == expected[name].shape[2:]
        assert (ours["c3"].stride, ours["mid"].stride) == (8, 16)


class ChainNet(nn.Module):
    """Three stride-2 steps (conv, conv, max pool) and a head convolution."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.head = nn.Conv2d(8, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.down(x))
        x = self.head(self.pool(x))
        return self.fc(x.mean((2, 3)))


def _conv_kw(conv):
    return dict(kernel=conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                groups=conv.groups, weight=conv.weight, bias=conv.bias)


def _reference_submaps(net, model, x):
    """ChainNet's head output submap by submap with the slow reference, and each submap's
    window offsets per step (sample j of submap i becomes submap j*S + i)."""
    maps, paths = [x], [[]]
    layers = [("conv", net.stem, _conv_kw(net.stem)), ("conv", net.down, _conv_kw(net.down)),
              ("max", net.pool, dict(kernel=3, stride=2, padding=1, dilation=1, ceil_mode=False))]
    for step, (op, _, kw) in enumerate(layers, start=1):
        table = getattr(model, f"ccnn_sampler_step{step}")()
        out, out_paths = {}, {}
        for j in range(table.shape[0]):
            for i in range(table.shape[1]):
                dy, dx = table[j, i, 1:].tolist()
                out[j * len(maps) + i] = reference.sample(op, maps[i], dy, dx, **kw)
                out_paths[j * len(maps) + i] = paths[i] + [(dy, dx)]
        maps = [out[s] if op == "max" else F.relu(out[s]) for s in sorted(out)]
        paths = [out_paths[s] for s in sorted(out_paths)]
    return [net.head(m) for m in maps], paths


@pytest.mark.parametrize("sampler,size", [("lattice", (32, 32)), ("random", (32, 32)), ("lattice", (16, 24))])
def test_checkered_filled_positions_equal_the_per_position_reference(sampler, size):
    torch.manual_seed(0)
    net = ChainNet().eval()
    x = torch.randn(2, 3, *size)
    height, width = size
    rows, cols = height // 8, width // 8  # each submap after three stride-2 steps
    kwargs = {"seed": 5} if sampler == "random" else {}
    extractor = create_feature_extractor(net, ["head"], mode="checkered", sampler=sampler, **kwargs)
    model = convert(net, mode="checkered", sampler=sampler, **kwargs)  # same tables (same seed)
    with torch.no_grad():
        dense = extractor(x)["head"]
        submaps, paths = _reference_submaps(net, model, x)
    assert dense.values.shape == (2, 5, height, width) and dense.stride == 1
    expected = torch.zeros_like(dense.values)
    filled = torch.zeros(height, width, dtype=torch.bool)
    for submap, offsets in zip(submaps, paths):
        for a in range(rows):
            for b in range(cols):
                y, x_ = input_position((a, b), offsets, [2, 2, 2])
                assert not filled[y, x_]  # n-rooks: no two submaps share a position
                filled[y, x_] = True
                expected[:, :, y, x_] = submap[:, :, a, b]
    assert dense.mask.sum() == 8 * rows * cols  # submaps * h * w
    assert torch.equal(dense.mask, filled)
    torch.testing.assert_close(dense.values, expected, rtol=1e-4, atol=1e-5)
    # The same positions of the dilated map: a checkered submap is the dilated network on its lattice.
    with torch.no_grad():
        full = create_feature_extractor(net, ["head"], mode="dilated", dilation="multisample")(x)["head"]
    assert full.mask.all()
    torch.testing.assert_close(full.values[..., dense.mask], dense.values[..., dense.mask], rtol=1e-4, atol=1e-5)


def test_keep_first_counts_the_dense_stride_and_drops_far_edge_samples():
    torch.manual_seed(0)
    net = ChainNet().eval()
    x = torch.randn(1, 3, 27, 27)  # 27 -> 14 -> 7 -> 4: the last step's far-edge samples fall outside
    with torch.no_grad():
        dense = create_feature_extractor(net, ["head"], mode="dilated", dilation="multisample", keep_first=1)(x)["head"]
        plain = create_feature_extractor(net, ["stem"], mode="dilated", dilation="multisample", keep_first=1)(x)["stem"]
    assert dense.stride == plain.stride == 2
    assert dense.values.shape[-2:] == plain.values.shape[-2:] == (14, 14)
    assert dense.mask.all()


def test_bad_return_nodes_are_parameter_errors():
    net = ChainNet().eval()
    for nodes, needle in (([], "empty"), (["nope"], "'nope'"), (["fc"], "not a feature map"),
                          ({"stem": "a", "head": "a"}, "same output name")):
        with pytest.raises(ParameterError, match=needle) as info:
            create_feature_extractor(net, nodes, mode="checkered")
        assert info.value.parameter == "return_nodes"
