"""``resample_at="activation"``: the downsampler after the strided layer's pointwise tail, checked
against networks with antialiased-cnns' BlurPool inserted by hand by the same rule (strided layer
at stride 1, its norm and activation, then BlurPool; a max pool at stride 1, then BlurPool)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ccnn_convert import ConversionSpec, conversion_report, convert
from ccnn_convert.core.downsample import original_size
from ccnn_convert.core.spectral import spectral_pool
from ccnn_convert.errors import ParameterError

antialiased_cnns = pytest.importorskip("antialiased_cnns")
torchvision = pytest.importorskip("torchvision")


def _blur(channels: int) -> nn.Module:
    return antialiased_cnns.BlurPool(channels, filt_size=3, stride=2)


def _hand_resnet18(model: nn.Module) -> nn.Module:
    """antialiased-cnns' placement, by editing torchvision's modules. ReLU after ReLU -> BlurPool is
    the same as one ReLU (a blur of non-negative values is non-negative), so a block's shared
    ``relu`` may stay where it is."""
    hand = copy.deepcopy(model)
    hand.conv1.stride = (1, 1)
    hand.maxpool = nn.Sequential(_blur(64), nn.MaxPool2d(3, stride=1, padding=1), _blur(64))
    for layer in (hand.layer2, hand.layer3, hand.layer4):
        block = layer[0]
        channels = block.conv1.out_channels
        block.conv1.stride = (1, 1)
        block.bn1 = nn.Sequential(block.bn1, nn.ReLU(), _blur(channels))
        block.downsample[0].stride = (1, 1)
        block.downsample.append(_blur(channels))  # conv 1x1, its norm, then BlurPool (the rule)
    return hand


def _hand_mobilenet_v2(model: nn.Module) -> nn.Module:
    hand = copy.deepcopy(model)
    for unit in hand.features:
        convs = [m for m in unit.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
        for conv in convs:  # the stem and the depthwise convs: each in a Conv2dNormActivation
            holder = next(m for m in unit.modules() if isinstance(m, nn.Sequential) and len(m) and m[0] is conv)
            conv.stride = (1, 1)
            holder.append(_blur(conv.out_channels))  # after conv, norm, ReLU6
    return hand


def _hand_lite0(model: nn.Module) -> nn.Module:
    """ReLU6 after ReLU6 -> BlurPool is one ReLU6 (a blur keeps values in [0, 6])."""
    hand = copy.deepcopy(model)
    hand._conv_stem.stride = [1, 1]
    hand._bn0 = nn.Sequential(hand._bn0, nn.ReLU6(), _blur(hand._bn0.num_features))
    for block in hand._blocks:
        if list(block._depthwise_conv.stride) == [2, 2]:
            block._depthwise_conv.stride = [1, 1]
            block._bn1 = nn.Sequential(block._bn1, nn.ReLU6(), _blur(block._bn1.num_features))
    return hand


def _randomize_statistics(model: nn.Module, size: int = 32) -> nn.Module:
    """Random weights, random BatchNorm affines and running statistics estimated on random images
    (so that the signal neither vanishes nor saturates, and the statistics matter)."""
    generator = torch.Generator().manual_seed(1)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for module in norms:
        module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
        module.bias.data.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
        module.momentum = None  # a cumulative average over the pass below
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, size, size, generator=generator))
    return model.eval()


def _check_equal(model: nn.Module, hand: nn.Module, x: torch.Tensor, against_layer: bool = True) -> None:
    converted = convert(model, mode="blurpool", resample_at="activation", example_input=x).eval()
    with torch.no_grad():
        expected = hand.eval()(x)
        torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)
        if not against_layer:
            return
        # and the placement matters: the blur right after the layer gives another network
        after_layer = convert(model, mode="blurpool", resample_at="layer", example_input=x).eval()(x)
        assert not torch.allclose(after_layer, expected, rtol=1e-3, atol=1e-3)


def test_resnet18_equals_antialiased_cnns_placement():
    torch.manual_seed(0)
    model = _randomize_statistics(torchvision.models.resnet18(num_classes=10))
    _check_equal(model, _hand_resnet18(model), torch.randn(2, 3, 64, 64))


def test_mobilenet_v2_equals_antialiased_cnns_placement():
    torch.manual_seed(0)
    model = _randomize_statistics(torchvision.models.mobilenet_v2(num_classes=10))
    _check_equal(model, _hand_mobilenet_v2(model), torch.randn(2, 3, 64, 64))


def test_pretrained_efficientnet_lite0_equals_antialiased_cnns_placement():
    from ccnn_convert.models import resolve_model

    model = resolve_model("efficientnet_lite0").model.eval()
    torch.manual_seed(0)
    _check_equal(model, _hand_lite0(model), torch.randn(1, 3, 64, 64), against_layer=False)  # (time)


class _Tail(nn.Module):
    """A strided conv whose tail is cut by a second user, and a functional tail."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        y = F.silu(self.bn(self.conv1(x)))
        z = self.conv2(y)
        return torch.relu(z) + z.mean()  # z has two users: the tail of conv2 is empty


def test_the_tail_stops_at_a_value_with_two_users():
    torch.manual_seed(0)
    model = _randomize_statistics(_Tail())
    x = torch.randn(2, 3, 16, 16)
    converted = convert(model, mode="spectral", resample_at="activation", example_input=x)

    def down(y, size):
        return spectral_pool(y, (size, size))

    with torch.no_grad():
        y = down(F.silu(model.bn(F.conv2d(x, model.conv1.weight, model.conv1.bias, 1, 1))), 8)
        z = down(F.conv2d(y, model.conv2.weight, model.conv2.bias, 1, 1), 4)
        torch.testing.assert_close(converted(x), torch.relu(z) + z.mean())


@pytest.mark.parametrize("mode", ["spectral", "blurpool"])
def test_a_dilated_strided_layer_keeps_its_output_size(mode):
    """original_size inverts the stride-1 size with the dilation (kernel 3, dilation 2 spans 5)."""
    assert original_size(((3, 2, 2, 2, False), (3, 2, 2, 2, False)), (16, 16)) == (8, 8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=2, dilation=2), nn.ReLU())
    x = torch.randn(1, 3, 16, 16)
    assert model(x).shape[-2:] == (8, 8)
    for where in ("layer", "activation"):
        converted = convert(model, mode=mode, resample_at=where, example_input=x)
        assert converted(x).shape[-2:] == (8, 8)


def test_the_option_is_refused_where_nothing_resamples():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2))
    for mode in ("checkered", "dilated", "traditional"):
        with pytest.raises(ParameterError) as info:
            convert(model, mode=mode, resample_at="activation")
        assert info.value.parameter == "resample_at"
    with pytest.raises(ParameterError, match="choose one of layer, activation"):
        convert(model, mode="blurpool", resample_at="norm")


def test_the_spec_carries_the_placement_and_checkered_is_unchanged():
    spec = ConversionSpec.build("blurpool", resample_at="activation")
    assert ConversionSpec.from_dict(spec.to_dict()) == spec and "resample_at=activation" in spec.describe()
    # a spec saved before the option existed meant the downsampler right after the layer
    old = {k: v for k, v in ConversionSpec.build("blurpool").to_dict().items() if k != "resample_at"}
    assert ConversionSpec.from_dict(old).resample_at == "layer"
    # the default (after the activation) is written into the spec: a saved one keeps it, whatever the default becomes
    assert ConversionSpec.build("blurpool").to_dict()["resample_at"] == "activation"
    assert ConversionSpec.from_dict(ConversionSpec.build("blurpool").to_dict()).resample_at == "activation"
    # another mode does not inherit it, and checkered converts as it always did
    checkered = ConversionSpec.build("checkered", base=spec)
    assert checkered.resample_at is None
    model = _randomize_statistics(nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                                nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1)))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(checkered.apply(model, 16)(x), convert(model, mode="checkered", example_input=x)(x))
        torch.testing.assert_close(ConversionSpec.build("traditional", base=spec).apply(model, 16)(x), model(x))
    assert conversion_report(convert(model, mode="blurpool", resample_at="activation")).resample_at == "activation"


@pytest.mark.parametrize("size", [16, 15])
def test_diffstride_at_the_activation_keeps_the_step_sizes_meeting(size):
    """A ResNet step: the 3x3 path resampled after its norm and ReLU, the 1x1 shortcut before it."""
    from torchvision.models.resnet import BasicBlock

    torch.manual_seed(0)
    shortcut = nn.Sequential(nn.Conv2d(3, 8, 1, stride=2, bias=False), nn.BatchNorm2d(8))
    model = _randomize_statistics(BasicBlock(3, 8, stride=2, downsample=shortcut), size)
    x = torch.randn(1, 3, size, size)
    at_layer = convert(model, mode="diffstride", resample_at="layer", example_input=x).eval()
    converted = convert(model, mode="diffstride", resample_at="activation", example_input=x).eval()
    code = converted.code
    # the 3x3 path: after its ReLU; the shortcut: on the block's input, before its 1x1 conv
    assert code.index("self.relu(bn1)") < code.index("self.ccnn_diffstride_step1(relu)")
    assert "self.ccnn_diffstride_step1(x)" in code
    with torch.no_grad():  # DiffStride's size follows its strides and ramp: it is the same at both places
        assert converted(x).shape == at_layer(x).shape
