"""reuse_freed_memory: a freed large tensor's pages are reused, not faulted in again."""

import resource
import sys

import pytest
import torch

from ccnn_convert.cpu_memory import reuse_freed_memory

SIZE = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB)
PAGES = SIZE // resource.getpagesize()


def _faults_of_a_fresh_large_tensor() -> int:
    """Minor page faults taken while a new 64 MiB tensor is written, after one was freed."""
    warm = torch.ones(SIZE // 4)
    del warm
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(SIZE // 4)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt only")
def test_large_tensors_reuse_freed_pages_only_when_enabled():
    try:
        assert reuse_freed_memory(enable=False)
        default = _faults_of_a_fresh_large_tensor()
        assert reuse_freed_memory(enable=True)
        reused = _faults_of_a_fresh_large_tensor()
    finally:
        reuse_freed_memory(enable=False)
    assert default >= PAGES // 2  # glibc's default: a fresh mmap, every page faulted in again
    assert reused <= PAGES // 20  # reused heap: (almost) no page touched for the first time
