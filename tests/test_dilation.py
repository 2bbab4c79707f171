"""Native dilation (``convert(..., mode="dilated", dilation="native")``): a real dilated network.

Oracles: torchvision's own dilated ResNet-50 (``replace_stride_with_dilation``), the original
network (the dense map sampled every ``factor`` positions is the original map), a hand-written
dilated average pool (unfold), and the multisample dilated pass.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import reference
from ccnn_convert import conversion_report, convert
from ccnn_convert.core.dilation import convert_native
from ccnn_convert.errors import ConversionError


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return reference.randomize_batchnorm(torchvision.models.resnet50()).eval()


# keep_first lines up with torchvision's per-stage flags: steps 1-2 are the stem conv and max pool.
FLAGS = {2: [True, True, True], 3: [False, True, True], 4: [False, False, True]}
CASES = [(2, (224, 224)), (2, (193, 193)), (2, (225, 225)), (2, (240, 320)),
         (3, (224, 224)), (3, (193, 193)), (4, (224, 224)), (4, (225, 225))]


@pytest.mark.parametrize("keep_first,size", CASES)
def test_native_equals_torchvision_dilated_resnet50(resnet50, keep_first, size):
    reference = torchvision.models.resnet50(replace_stride_with_dilation=FLAGS[keep_first]).eval()
    reference.load_state_dict(resnet50.state_dict())
    native = convert(resnet50, mode="dilated", dilation="native", keep_first=keep_first,
                     example_input=torch.zeros(1, 3, *size)).eval()
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        assert _rel(native(x), reference(x)) <= 1e-5


def test_native_shares_parameters_and_leaves_the_model_alone(resnet50):
    before = {name: module for name, module in resnet50.named_modules()}
    strides = {name: getattr(m, "stride", None) for name, m in before.items()}
    native = convert_native(resnet50, keep_first=2)
    assert list(native.state_dict()) == list(resnet50.state_dict())
    params = dict(resnet50.named_parameters())
    assert all(p is params[name] for name, p in native.named_parameters())
    assert {name: getattr(m, "stride", None) for name, m in resnet50.named_modules()} == strides
    assert resnet50.layer4[0].conv2.dilation == (1, 1) and native.get_submodule("layer4.0.conv2").dilation == (4, 4)
    report = conversion_report(native)
    assert report.mode == "dilated" and report.final_submaps == 1 and report.steps == 5
    assert [r.step for r in report.layers if r.converted] == [3, 3, 4, 4, 5, 5]


def _dilated_avg_pool(x, kernel, padding, dilation, count_include_pad):
    """Hand-written dilated average pool (stride 1) with unfold."""
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding)  # (B, C*k*k, L)
    b, c = x.shape[:2]
    sums = cols.view(b, c, kernel * kernel, -1).sum(2)
    if count_include_pad:
        counts = torch.full_like(sums[:1, :1], kernel * kernel)
    else:
        counts = F.unfold(torch.ones_like(x[:1, :1]), kernel, dilation=dilation, padding=padding).sum(1, keepdim=True)
    size = [s + 2 * padding - dilation * (kernel - 1) for s in x.shape[2:]]
    return (sums / counts).view(b, c, *size)


class _PoolNet(nn.Module):
    def __init__(self, count_include_pad: bool):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.avg = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=count_include_pad)
        self.down = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=count_include_pad)
        self.pool = nn.MaxPool2d(3, stride=1, padding=1)
        self.conv = nn.Conv2d(4, 5, 3, padding=1)

    def forward(self, x):
        return self.conv(self.pool(self.down(self.avg(self.stem(x)))))


@pytest.mark.parametrize("count_include_pad", [False, True])
@pytest.mark.parametrize("size", [16, 15])
def test_pools_after_a_converted_step_equal_a_hand_written_dilated_network(count_include_pad, size):
    torch.manual_seed(0)
    net = _PoolNet(count_include_pad).eval()
    x = torch.randn(2, 3, size, size)
    native = convert_native(net, example_input=x)
    with torch.no_grad():
        got = native(x)
        y = F.conv2d(x, net.stem.weight, net.stem.bias, 1, 1)  # stride removed: factor 2
        y = _dilated_avg_pool(y, 3, 2, 2, count_include_pad)
        y = _dilated_avg_pool(y, 3, 2, 2, count_include_pad)  # converted: factor 4 after
        y = F.max_pool2d(F.pad(y, (4, 4, 4, 4), value=-float("inf")), 3, 1, 0, 4)
        expected = F.conv2d(y, net.conv.weight, net.conv.bias, 1, 4, 4)
        assert _rel(got, expected) <= 1e-6
        # the original network is the dense map every 4 positions
        assert _rel(got[..., ::4, ::4], net(x)) <= 1e-6


class _CeilNet(nn.Module):
    """Squeezenet-like: ceil_mode max pools whose last window overhangs the map."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)

    def forward(self, x):
        return self.pool2(torch.relu(self.conv(self.pool1(self.stem(x))))).mean((2, 3))


@pytest.mark.parametrize("size", [32, 33, 40, 47])
def test_ceil_mode_pools_match_multisample_and_the_original_lattice(size):
    torch.manual_seed(0)
    net = _CeilNet().eval()
    x = torch.randn(2, 3, size, size)
    native = convert_native(net, example_input=x)
    multisample = convert(net, mode="dilated", dilation="multisample", example_input=x)
    with torch.no_grad():
        assert _rel(native(x), multisample(x)) <= 1e-5
        features = convert_native(nn.Sequential(net.stem, net.pool1, net.conv, nn.ReLU(), net.pool2),
                                  example_input=x)(x)
        original = net.pool2(torch.relu(net.conv(net.pool1(net.stem(x)))))
        assert _rel(features[..., ::8, ::8], original) <= 1e-6


class _GlobalMeanMax(nn.Module):
    def forward(self, x):
        return torch.cat([x.mean((2, 3)), x.amax((2, 3))], 1)


class _PaddedCeilNet(nn.Module):
    """A padded ceil_mode max pool between two convolutions: its last window may start in the
    right padding, which the dense pool must keep."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.pool(torch.tanh(self.stem(x))))


@pytest.mark.parametrize("size", [16, 17, 20])
def test_padded_ceil_mode_pool_matches_multisample_and_the_original_lattice(size):
    torch.manual_seed(0)
    net = _PaddedCeilNet().eval()
    x = torch.randn(2, 3, size, size + 3)
    pooled = nn.Sequential(net, _GlobalMeanMax())  # every position of the map counts
    with torch.no_grad():
        dense = convert_native(net, example_input=x)(x)
        original = net(x)
        native = convert_native(pooled, example_input=x)(x)
        multisample = convert(pooled, mode="dilated", dilation="multisample", example_input=x)(x)
    # the dense map holds the original every 2 positions, and its far edge (windows starting in
    # the right padding) agrees with the multisample pass's exact edges
    assert dense[..., ::2, ::2].shape == original.shape
    assert _rel(dense[..., ::2, ::2], original) <= 1e-6
    assert _rel(native, multisample) <= 1e-5


def test_native_refuses_what_a_dilation_cannot_express():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(4), nn.Flatten())
    with pytest.raises(ConversionError, match="cannot pass .*fixed size"):
        convert_native(net, example_input=torch.zeros(1, 3, 32, 32))
    tokens = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.Flatten(2))
    with pytest.raises(ConversionError, match="folds the spatial"):
        convert_native(tokens, example_input=torch.zeros(1, 3, 32, 32))


def test_keep_first_and_whole_map_pool():
    """A fixed 4x4 average pool that was the whole map pools the whole (larger) dense map."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                        nn.AvgPool2d(4), nn.Flatten()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for keep_first in (0, 1, 2):
            native = convert_native(net, keep_first=keep_first, example_input=x)
            multisample = convert(net, mode="dilated", dilation="multisample", keep_first=keep_first,
                                  example_input=x)
            assert _rel(native(x), multisample(x)) <= 1e-5
    assert conversion_report(convert_native(net, keep_first=1, example_input=x)).converted_layers == 1


def test_cli_convert_takes_dilation_and_renders_misuse_with_the_flag():
    from typer.testing import CliRunner

    from ccnn_convert.cli.convert import app
    runner = CliRunner()
    result = runner.invoke(app, ["resnet18", "--weights", "none", "--mode", "dilated", "--dilation", "native",
                                 "--keep-first", "4", "--input-size", "64"])
    assert result.exit_code == 0, result.output
    assert "final submaps: 1" in result.output
    wrong = runner.invoke(app, ["resnet18", "--weights", "none", "--mode", "checkered", "--dilation", "native"])
    assert wrong.exit_code != 0 and "--dilation only applies to mode dilated" in wrong.output
    wrong = runner.invoke(app, ["resnet18", "--weights", "none", "--mode", "dilated", "--edges", "reference"])
    assert wrong.exit_code != 0 and "--edges" in wrong.output


class PaddedNet(nn.Module):
    """TF-style "same" padding done by hand (as EfficientNet-Lite does): a zero pad before a
    strided conv and another before a stride-1 conv, as modules or as ``F.pad``."""

    def __init__(self, modules: bool):
        super().__init__()
        self.modules_ = modules
        self.pad1, self.pad2 = nn.ZeroPad2d((1, 2, 1, 2)), nn.ZeroPad2d(2)
        self.down = nn.Conv2d(3, 4, 5, stride=2)
        self.conv = nn.Conv2d(4, 4, 5)

    def forward(self, x):
        if self.modules_:
            return self.conv(self.pad2(self.down(self.pad1(x)))).mean((2, 3))
        x = self.down(F.pad(x, (1, 2, 1, 2)))
        return self.conv(F.pad(x, (2, 2, 2, 2))).mean((2, 3))


def _hand_dilated(net: PaddedNet, x: torch.Tensor) -> torch.Tensor:
    """The dilated network written out: the strided conv without its stride, the later pad and
    conv twice as wide."""
    h = F.conv2d(F.pad(x, (1, 2, 1, 2)), net.down.weight, net.down.bias)
    return F.conv2d(F.pad(h, (4, 4, 4, 4)), net.conv.weight, net.conv.bias, dilation=2).mean((2, 3))


@pytest.mark.parametrize("size", [14, 15, 16])
@pytest.mark.parametrize("modules", [True, False], ids=["ZeroPad2d", "F.pad"])
@pytest.mark.parametrize("dilation", ["native", "multisample"])
def test_explicit_zero_pads_equal_a_hand_written_dilated_network(dilation, modules, size):
    torch.manual_seed(0)
    net = PaddedNet(modules).eval()
    x = torch.randn(2, 3, size, size + 1)
    model = convert(net, mode="dilated", dilation=dilation, example_input=x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _hand_dilated(net, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size,keep_first", [(224, 0), (193, 3)])
def test_efficientnet_lite0_native_equals_multisample(size, keep_first):
    """EfficientNet-Lite pads with nn.ZeroPad2d modules: native dilation scales them."""
    from ccnn_convert.models import resolve_model

    model = resolve_model("efficientnet_lite0", weights="none").model.eval()
    x = torch.randn(1, 3, size, size)
    native = convert(model, mode="dilated", dilation="native", keep_first=keep_first, example_input=x)
    multisample = convert(model, mode="dilated", dilation="multisample", keep_first=keep_first, example_input=x)
    assert conversion_report(native).final_submaps == 1
    with torch.no_grad():
        assert _rel(native(x), multisample(x)) <= 1e-5
