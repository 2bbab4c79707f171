"""A PyConv-ResNet (Duta et al. 2020, "Pyramidal Convolution"), written for the tests.

Pyramidal convolution: parallel grouped convolutions with growing kernels (3/5/7/9, groups
1/4/8/16) on the same input, concatenated. In a block that subsamples, every branch has stride 2
and the shortcut is a stride-2 max pool followed by a 1x1 convolution, so five strided layers
meet (a concatenation, then a residual add): one subsampling step for ccnn-convert.

``pyconv_resnet50()`` is the paper's layout ([3, 4, 6, 3] bottlenecks; PyConv4, 3, 2 and a plain
conv in the four stages); ``tiny_pyconv_resnet()`` is the same code at test size. Usable as a
factory: ``ccnn-convert tests/pyconv_resnet.py:pyconv_resnet50 --weights none``.
"""

from __future__ import annotations

import torch
from torch import nn

# Per stage: (kernels, groups, quarters of the output channels) of the pyramid in each bottleneck.
PYRAMIDS = (((3, 5, 7, 9), (1, 4, 8, 16), (1, 1, 1, 1)), ((3, 5, 7), (1, 4, 8), (1, 1, 2)),
            ((3, 5), (1, 4), (2, 2)), ((3,), (1,), (4,)))


class PyConv(nn.Module):
    """Parallel grouped convolutions with kernels ``kernels``, outputs concatenated."""

    def __init__(self, in_channels: int, out_channels: int, kernels, groups, quarters, stride: int = 1):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels * q // 4, k, stride=stride, padding=k // 2, groups=g, bias=False)
            for k, g, q in zip(kernels, groups, quarters))

    def forward(self, x):
        return torch.cat([branch(x) for branch in self.branches], dim=1)


class PyConvBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, pyramid, stride: int = 1):
        super().__init__()
        out_channels = planes * self.expansion
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU())
        self.pyconv = nn.Sequential(PyConv(planes, planes, *pyramid, stride=stride), nn.BatchNorm2d(planes), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(planes, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            pool = [nn.MaxPool2d(3, stride, padding=1)] if stride != 1 else []
            self.shortcut = nn.Sequential(*pool, nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return torch.relu(self.expand(self.pyconv(self.reduce(x))) + self.shortcut(x))


class PyConvResNet(nn.Module):
    def __init__(self, layers=(3, 4, 6, 3), width: int = 64, num_classes: int = 1000, stem_stride: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 7, stride=stem_stride, padding=3, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU())
        blocks, channels = [], width
        for stage, (count, pyramid) in enumerate(zip(layers, PYRAMIDS)):
            planes = width * 2**stage
            for index in range(count):
                blocks.append(PyConvBottleneck(channels, planes, pyramid, stride=2 if index == 0 else 1))
                channels = planes * PyConvBottleneck.expansion
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def pyconv_resnet50() -> PyConvResNet:
    return PyConvResNet()


def tiny_pyconv_resnet() -> PyConvResNet:
    """Two subsampling PyConv blocks (PyConv4, then PyConv3) after a stride-1 stem, 10 classes."""
    return PyConvResNet(layers=(1, 1), width=64, num_classes=10, stem_stride=1)
