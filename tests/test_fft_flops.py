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
