"""Reuse freed CPU memory instead of handing it back to the OS after every large tensor.

Why: a converted model's activations are several times larger than the original's (a checkered
ResNet-50 at batch 4 carries 16-32 submaps per image in its later stages), and glibc serves every
allocation above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and unmaps it on free.
PyTorch's CPU allocator has no cache, so every such tensor pays one page fault per 4 KiB page on
first write: about 1.1 million faults and 40% of the forward time of checkered ResNet-50 at batch
4 (``benchmarks/bench_convert.py --default-allocator`` shows it). Serving large blocks from the
heap and never trimming it does what a caching allocator (or jemalloc/tcmalloc) would; the cost
is that the process keeps its peak heap.

The ``ccnn-eval``, ``ccnn-export`` and ``ccnn-bench`` commands call :func:`reuse_freed_memory`
at start; scripts using the Python API can call it themselves. It affects the whole process and
changes no result, only speed.
"""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt() parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_NEVER_TRIM = 2**31 - 1  # the largest int mallopt takes: keep up to 2 GiB of free heap top


def _mallopt():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).mallopt  # the libc this process already runs on
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None


def reuse_freed_memory(enable: bool = True) -> bool:
    """Serve large CPU allocations from a heap that is never trimmed (glibc only).

    ``enable=False`` restores glibc's defaults. Returns False where it cannot apply (not Linux,
    not glibc): then nothing changed.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    mmap_max, trim = (0, _NEVER_TRIM) if enable else (_DEFAULT_MMAP_MAX, _DEFAULT_TRIM_THRESHOLD)
    return bool(mallopt(_M_MMAP_MAX, mmap_max)) and bool(mallopt(_M_TRIM_THRESHOLD, trim))
