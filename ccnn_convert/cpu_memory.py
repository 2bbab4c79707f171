"""Back large CPU tensors with transparent huge pages (Linux).

Why: a converted model's activations are several times larger than the original's (a checkered
ResNet-50 at batch 4 carries 16-32 submaps per image in its later stages). glibc serves every
allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and PyTorch's CPU
allocator keeps no cache, so each such tensor is page-faulted in, 4 KiB at a time, on every
forward: about 1.1 million faults for checkered ResNet-50 at batch 4, a third of its time.
PyTorch can align large allocations to 2 MiB and ``madvise(MADV_HUGEPAGE)`` them (its
``THP_MEM_ALLOC_ENABLE`` switch): 512 times fewer faults and fewer TLB misses, with no memory
kept back. (Keeping freed memory in the heap instead, with ``mallopt``, was faster still on
ResNet-50 but let DenseNet's growing concatenations fragment the heap: a dilated DenseNet-169
went past 24 GiB and was killed.)

PyTorch reads the switch once, at the process's first CPU allocation, so
:func:`use_huge_pages` must run before any tensor is made: the ``ccnn-eval``, ``ccnn-export``
and ``ccnn-bench`` commands call it first thing; scripts can set ``THP_MEM_ALLOC_ENABLE=1`` in
the environment. It changes no result, only speed, and does nothing where the kernel's
transparent huge pages are off (``/sys/kernel/mm/transparent_hugepage/enabled`` = never).
"""

from __future__ import annotations

import os

SWITCH = "THP_MEM_ALLOC_ENABLE"


def use_huge_pages() -> bool:
    """Ask PyTorch to back large CPU tensors with huge pages, unless the environment says otherwise.

    Returns whether the switch is now on. It takes effect only if no CPU tensor has been
    allocated yet in this process.
    """
    os.environ.setdefault(SWITCH, "1")
    return os.environ[SWITCH] == "1"
