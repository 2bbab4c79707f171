"""Samplers and sampler sequences against hand-written expectations and the reference vectors."""

from __future__ import annotations

import json

import pytest
import torch

from ccnn_convert.core import sequences
from ccnn_convert.errors import ConversionError


def test_checkered_samplers_match_the_paper():
    assert sequences.deterministic_sampler(0, 2, 2) == [(0, 0), (1, 1)]
    assert sequences.deterministic_sampler(1, 2, 2) == [(0, 1), (1, 0)]


def test_dilation_takes_every_position_row_major():
    assert sequences.deterministic_sampler(0, 2, 4) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert sequences.deterministic_sampler(1, 3, 9) == [(r, c) for r in range(3) for c in range(3)]


def test_three_of_four_multisampling_by_hand():
    # Diagonal 0, then the first position of diagonal 1.
    assert sequences.deterministic_sampler(0, 2, 3) == [(0, 0), (1, 1), (0, 1)]
    assert sequences.deterministic_sampler(1, 2, 3) == [(0, 1), (1, 0), (0, 0)]


@pytest.mark.parametrize("k", [2, 3, 4, 16])
def test_samplers_have_the_n_rooks_property_and_partition_the_window(k):
    covered = []
    for j in range(k):
        sampler = sequences.deterministic_sampler(j, k, k)
        assert len({r for r, _ in sampler}) == k and len({c for _, c in sampler}) == k
        covered += sampler
    assert sorted(covered) == [(r, c) for r in range(k) for c in range(k)]


@pytest.mark.parametrize("k,n", [(2, 2), (3, 3), (4, 4), (4, 2), (3, 1)])
def test_random_samplers_are_n_rooks_and_seeded(k, n):
    gen = torch.Generator().manual_seed(7)
    draws = [sequences.random_sampler(k, n, gen) for _ in range(50)]
    for sampler in draws:
        assert len(sampler) == n
        assert len({r for r, _ in sampler}) == n and len({c for _, c in sampler}) == n
        assert all(0 <= r < k and 0 <= c < k for r, c in sampler)
    again = [sequences.random_sampler(k, n, torch.Generator().manual_seed(7)) for _ in range(1)]
    assert again[0] == draws[0]
    if n > 1:
        assert len({tuple(s) for s in draws}) > 1


def test_random_checkered_draws_both_samplers():
    gen = torch.Generator().manual_seed(0)
    seen = {tuple(sequences.random_sampler(2, 2, gen)) for _ in range(40)}
    assert seen == {((0, 0), (1, 1)), ((0, 1), (1, 0))}


def test_lattice_matches_the_reference_vectors(shared_dir):
    data = json.loads((shared_dir / "reference" / "lattice_sequences.json").read_text())
    for submaps, expected in data["sequences"].items():
        assert sequences.lattice_indices(int(submaps)) == expected, submaps


def test_lattice_extension_is_the_reference_rule(shared_dir):
    """Beyond 512 we extend with floor(13 i / S) mod 2; the reference follows it for 8..256."""
    data = json.loads((shared_dir / "reference" / "lattice_sequences.json").read_text())
    for submaps in (8, 16, 32, 64, 128, 256):
        rule = [(13 * i // submaps) % 2 for i in range(submaps)]
        assert rule == data["sequences"][str(submaps)]
    big = sequences.lattice_indices(1024)
    assert big == [(13 * i // 1024) % 2 for i in range(1024)]
    assert abs(sum(big) - 512) <= 1024 // 13 + 1  # balanced up to one run


def test_sequence_shapes_and_naive():
    seq = sequences.sampler_sequence("naive", 5, 2, 2)
    assert seq == [[(0, 0), (1, 1)]] * 5
    table = sequences.offset_table(sequences.sampler_sequence("lattice", 4, 2, 2))
    assert table.shape == (2, 4, 3)
    assert table[:, :, 0].tolist() == [[0, 1, 2, 3]] * 2
    assert table[1, 1, 1:].tolist() == [1, 0]  # submap 1 uses sampler 1: second sample (1, 0)


def test_bad_sampler_and_density():
    with pytest.raises(ConversionError, match="unknown sampler"):
        sequences.sampler_sequence("fancy", 2, 2, 2)
    with pytest.raises(ConversionError, match="density"):
        sequences.deterministic_sampler(0, 2, 5)


def test_lattice_rule_beyond_the_bundled_table_by_hand():
    """1024 submaps is past the bundled table, so the rule floor(13 i / S) mod 2 applies. Written
    as runs instead: value m mod 2 from i = ceil(m S / 13) up to the next boundary."""
    submaps = 1024
    boundaries = [-(-m * submaps // 13) for m in range(14)]
    expected = [0] * submaps
    for m in range(13):
        for i in range(boundaries[m], min(boundaries[m + 1], submaps)):
            expected[i] = m % 2
    got = sequences.lattice_indices(submaps)
    assert got == expected
    assert got[78:80] == [0, 1] and got[157:159] == [1, 0]  # 13*79 = 1027 >= 1024; 13*158 = 2054 >= 2048
