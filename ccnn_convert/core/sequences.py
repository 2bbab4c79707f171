"""Samplers and sampler sequences: which window positions each submap keeps.

A strided layer with stride ``k`` splits its input into ``k x k`` windows. A *sampler* is the
ordered list of window offsets ``(dy, dx)`` that one submap keeps; sample ``j`` of submap ``i``
becomes output submap ``j * S + i`` (``S`` = input submap count).

Sampler families, for ``n`` samples per ``k x k`` window:

* ``n <= k`` (checkered; ``n = k`` by default): sampler ``j`` takes rows
  ``r_m = m * k // n`` and columns ``(r_m + j) mod k``. No two samples share a row or a column
  (the *n-rooks* property). For ``k = 2`` sampler 0 is ``(0,0),(1,1)`` and sampler 1 is
  ``(0,1),(1,0)``, as in Sadigh & Sen (2018). For ``n = k`` the ``k`` samplers partition the
  window (a Latin square), so every position is sampled by exactly one of them.
* ``k < n < k*k`` (denser multisampling, e.g. the reference's "3/4"): sampler ``j`` takes the
  first ``n`` positions of the diagonals ``j, j+1, ...`` in that order.
* ``n = k*k`` (dilation): every position, row-major.

A *sequence* assigns one sampler to each submap:

* ``naive``: sampler 0 everywhere.
* ``lattice``: for ``k = 2`` and ``S <= 512`` the reference implementation's sequence (shipped as
  ``resources/lattice_sequences.json``). Beyond it we use the rank-1 lattice rule the reference itself
  follows for 8 <= S <= 256: submap ``i`` takes sampler ``floor(13 * i / S) mod k``. It splits the
  submaps into 13 near-equal runs alternating over the samplers, so every sampler is used
  equally often (up to one run) and neighbouring submaps mostly share a sampler, spreading the
  sampled positions evenly over the image.
* ``random``: an independent random n-rooks sampler for every submap (random row and column
  permutations of the family above).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Literal

import torch

from ..errors import ConversionError

__all__ = [
    "LATTICE_GENERATOR", "SEQUENCES", "Offset", "SequenceKind", "deterministic_sampler", "lattice_indices",
    "offset_table", "random_sampler", "sampler_sequence",
]

Offset = tuple[int, int]
SequenceKind = Literal["naive", "lattice", "random"]
SEQUENCES: tuple[str, ...] = ("naive", "lattice", "random")

# The rank-1 lattice generator the reference uses for 8 <= S <= 256 (checked in the tests).
LATTICE_GENERATOR = 13


def deterministic_sampler(index: int, k: int, n: int) -> list[Offset]:
    """Sampler ``index`` of the family with ``n`` samples per ``k x k`` window."""
    _check_density(k, n)
    if n == k * k:
        return [(r, c) for r in range(k) for c in range(k)]
    j = index % k
    if n <= k:
        rows = [m * k // n for m in range(n)]
        return [(r, (r + j) % k) for r in rows]
    diagonals = [(r, (r + d) % k) for d in range(j, j + k) for r in range(k)]
    return diagonals[:n]


def random_sampler(k: int, n: int, generator: torch.Generator | None) -> list[Offset]:
    """A random sampler: the family's sampler 0 under random row and column permutations."""
    rows = torch.randperm(k, generator=generator).tolist()
    cols = torch.randperm(k, generator=generator).tolist()
    base = deterministic_sampler(0, k, n)
    picked = [(rows[r], cols[c]) for r, c in base]
    return sorted(picked) if n <= k else picked


@functools.lru_cache(maxsize=None)
def _reference_lattice() -> dict[int, tuple[int, ...]]:
    text = resources.files("ccnn_convert").joinpath("resources/lattice_sequences.json").read_text()
    return {int(s): tuple(seq) for s, seq in json.loads(text)["sequences"].items()}


def lattice_indices(submaps: int, k: int = 2) -> list[int]:
    """Sampler index per submap for the lattice sequence (see the module docstring)."""
    reference = _reference_lattice()
    if k == 2 and submaps in reference:
        return list(reference[submaps])
    return [(LATTICE_GENERATOR * i // submaps) % k for i in range(submaps)]


def sampler_sequence(
    kind: str, submaps: int, k: int, n: int, generator: torch.Generator | None = None
) -> list[list[Offset]]:
    """One sampler (list of ``n`` offsets) for each of ``submaps`` input submaps."""
    if kind == "naive":
        return [deterministic_sampler(0, k, n) for _ in range(submaps)]
    if kind == "lattice":
        return [deterministic_sampler(j, k, n) for j in lattice_indices(submaps, k)]
    if kind == "random":
        return [random_sampler(k, n, generator) for _ in range(submaps)]
    raise ConversionError(f"unknown sampler {kind!r}; choose one of {', '.join(SEQUENCES)}")


def offset_table(sequence: list[list[Offset]]) -> torch.Tensor:
    """Index table ``(n, S, 3)`` of ``[submap, dy, dx]``: entry ``[j, i]`` builds output submap ``j*S+i``."""
    submaps, samples = len(sequence), len(sequence[0])
    table = torch.empty(samples, submaps, 3, dtype=torch.long)
    for i, sampler in enumerate(sequence):
        for j, (dy, dx) in enumerate(sampler):
            table[j, i] = torch.tensor([i, dy, dx])
    return table


def _check_density(k: int, n: int) -> None:
    if not 1 <= n <= k * k:
        raise ConversionError(f"density must be between 1 and {k * k} for stride {k}, got {n}")
