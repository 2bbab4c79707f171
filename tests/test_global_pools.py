"""Every global-pool form the rewrite recognises, at model level, against the slow reference.

A global pool on a multisampled map must reduce over the submaps too, with the pool's own
reduction: the maximum of all positions of all submaps for a max pool, their mean for an
average pool. The reference runs the two strided convs submap by submap (tests/reference.py)
and applies the pool to the dense map, every position of every submap at once; the converted
model must give the same logits in checkered and dilated mode.

A max pool reduced by the submap *mean* (or not recognised as global, so the submaps are
averaged before it) gives different logits: these tests fail if ``layers.submap_amax`` is wrong.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccnn_convert import conversion_report, convert
from test_convert import _conv_kw, _sequences_of, _strided

SIZE = 12  # 12 -> 6 -> 3: the map the global pool sees is 3x3
MAP = 3

# name: (kind, pool module or None, forward of the pool given the net and the feature map)
POOLS = {
    "nn.AdaptiveAvgPool2d(1)": ("mean", nn.AdaptiveAvgPool2d(1), lambda net, y: net.pool(y)),
    "nn.AdaptiveMaxPool2d(1)": ("max", nn.AdaptiveMaxPool2d((1, 1)), lambda net, y: net.pool(y)),
    "F.adaptive_avg_pool2d(x, 1)": ("mean", None, lambda net, y: F.adaptive_avg_pool2d(y, 1)),
    "F.adaptive_max_pool2d(x, 1)": ("max", None, lambda net, y: F.adaptive_max_pool2d(y, 1)),
    "F.adaptive_max_pool2d(x, output_size=(1, 1))": (
        "max", None, lambda net, y: F.adaptive_max_pool2d(y, output_size=(1, 1))),
    "x.mean((2, 3))": ("mean", None, lambda net, y: y.mean((2, 3))),
    "x.mean((-2, -1), keepdim=True)": ("mean", None, lambda net, y: y.mean((-2, -1), keepdim=True)),
    "x.amax((2, 3))": ("max", None, lambda net, y: y.amax((2, 3))),
    "x.amax(dim=(-1, -2), keepdim=True)": ("max", None, lambda net, y: y.amax(dim=(-1, -2), keepdim=True)),
    "torch.mean(x, dim=(2, 3))": ("mean", None, lambda net, y: torch.mean(y, dim=(2, 3))),
    "torch.amax(x, (2, 3))": ("max", None, lambda net, y: torch.amax(y, (2, 3))),
    "torch.amax(x, dim=(2, 3), keepdim=True)": ("max", None, lambda net, y: torch.amax(y, dim=(2, 3), keepdim=True)),
    "nn.MaxPool2d(map size)": ("max", nn.MaxPool2d(MAP), lambda net, y: net.pool(y)),
    "nn.AvgPool2d(map size)": ("mean", nn.AvgPool2d(MAP), lambda net, y: net.pool(y)),
    "F.max_pool2d(x, map size)": ("max", None, lambda net, y: F.max_pool2d(y, MAP)),
    "F.avg_pool2d(x, kernel_size=map size)": ("mean", None, lambda net, y: F.avg_pool2d(y, kernel_size=MAP)),
    "F.max_pool2d(x, x.size()[2:])": ("max", None, lambda net, y: F.max_pool2d(y, y.size()[2:])),
    "F.avg_pool2d(x, x.shape[2:])": ("mean", None, lambda net, y: F.avg_pool2d(y, y.shape[2:])),
}


class PoolNet(nn.Module):
    """Two stride-2 convs, a global pool, a classifier."""

    def __init__(self, name: str):
        super().__init__()
        _, pool, self.pool_forward = POOLS[name]
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        if pool is not None:
            self.pool = pool
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(torch.flatten(self.pool_forward(self, y), 1))


def _submaps(net: PoolNet, x: torch.Tensor, seqs) -> list[torch.Tensor]:
    """The feature maps of every submap, computed position by position (tests/reference.py)."""
    maps = [F.relu(m) for m in _strided("conv", [x], seqs[0], **_conv_kw(net.conv1))]
    return [F.relu(m) for m in _strided("conv", maps, seqs[1], **_conv_kw(net.conv2))]


def _reference(net: PoolNet, kind: str, x: torch.Tensor, seqs) -> torch.Tensor:
    """Submap by submap through the convs; then the global pool of the dense map."""
    maps = _submaps(net, x, seqs)
    dense = torch.cat([m.flatten(2) for m in maps], dim=2)  # (B, C, positions of all submaps)
    pooled = dense.amax(2) if kind == "max" else dense.mean(2)
    return net.fc(pooled)


@pytest.mark.parametrize("mode", ["checkered", "dilated"])
@pytest.mark.parametrize("name", list(POOLS))
def test_global_pool_of_converted_model_matches_the_dense_map_pool(name, mode):
    torch.manual_seed(0)
    net = PoolNet(name).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    options = {"dilation": "multisample"} if mode == "dilated" else {}  # the test reads the submaps
    model = convert(net, mode=mode, example_input=x, **options)
    report = conversion_report(model)
    assert report.converted_layers == 2 and report.final_submaps == (4 if mode == "checkered" else 16)
    kind = POOLS[name][0]
    assert any(f"({kind} of {report.final_submaps} submaps)" in where for where in report.averaged_at), \
        report.averaged_at
    seqs = _sequences_of(model, steps=2)
    with torch.no_grad():
        actual = model(x)
        expected = _reference(net, kind, x, seqs)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    if mode == "dilated":  # native dilation pools the same dense map, with no submaps at all
        native = convert(net, mode=mode, dilation="native", example_input=x)
        assert conversion_report(native).final_submaps == 1
        with torch.no_grad():
            torch.testing.assert_close(native(x), expected, rtol=1e-5, atol=1e-5)
    if kind == "max":  # the test can tell max from mean: the mean of the submaps' maxima differs
        maps_mean = net.fc(torch.stack([m.amax((2, 3)) for m in _submaps(net, x, seqs)]).mean(0))
        assert not torch.allclose(maps_mean, expected, rtol=1e-3, atol=1e-3)
