"""FFT FLOPs: torch.utils.flop_counter has no FFT formula; ccnn_convert.flops counts 5 N log2 N."""

from __future__ import annotations

import torch
from torch import nn

from ccnn_convert.flops import count_flops


class PoolBySlicing(nn.Module):
    """A 1x1 conv, then rfft2 of the 8x8 map, a 4x3 corner of it, irfft2 to 4x4."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 1, bias=False)

    def forward(self, x):
        spectrum = torch.fft.rfft2(self.conv(x))
        return torch.fft.irfft2(spectrum[..., :4, :3], s=(4, 4))


def test_fft_flops_equal_a_hand_count_on_meta_and_for_real():
    x = torch.zeros(1, 3, 8, 8)
    conv = 2 * 3 * 2 * 8 * 8          # multiply-adds of the 1x1 conv, 2 FLOPs each
    forward = 2 * (5 * 64 * 6)         # rfft2 of each of the 2 maps: N = 64, log2 N = 6
    inverse = 2 * (5 * 16 * 4)         # irfft2 to 4x4 of each map: N = 16, log2 N = 4
    assert count_flops(PoolBySlicing(), x) == conv + forward + inverse == 5248
    assert count_flops(PoolBySlicing(), x, on_meta=False) == 5248


def test_fft_flops_count_every_signal_of_a_batch_once():
    one = count_flops(PoolBySlicing(), torch.zeros(1, 3, 8, 8))
    assert count_flops(PoolBySlicing(), torch.zeros(5, 3, 8, 8)) == 5 * one


def test_a_spectral_pooling_layer_counts_its_two_transforms():
    from ccnn_convert.core.spectral import SpectralPool2d

    # 8x8 -> 4x4 on 2 maps: rfft2 of 64 points and irfft2 of 16 points per map, nothing else
    assert count_flops(SpectralPool2d(2.0), torch.zeros(1, 2, 8, 8)) == 2 * (5 * 64 * 6 + 5 * 16 * 4)


def test_a_spectral_conversion_counts_the_stride_one_conv_and_the_ffts():
    from ccnn_convert import convert

    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False), nn.Flatten())
    x = torch.zeros(1, 3, 8, 8)
    conv_at_stride_one = 2 * 3 * 4 * 9 * 8 * 8     # 8x8 outputs, 27 multiply-adds per output and channel
    pooling = 4 * (5 * 64 * 6 + 5 * 16 * 4)         # 4 maps: 8x8 -> 4x4
    assert count_flops(model, x) == 2 * 3 * 4 * 9 * 4 * 4
    assert count_flops(convert(model, mode="spectral", example_input=x), x) == conv_at_stride_one + pooling
