"""use_huge_pages: a fresh large tensor takes far fewer page faults (run in fresh processes,
because PyTorch reads the switch once, at a process's first allocation)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SIZE = 64 * 2**20  # above glibc's largest mmap threshold (32 MiB): always a fresh mapping
PAGES = SIZE // 4096
SCRIPT = f"""
import resource, sys
from ccnn_convert import use_huge_pages
print(use_huge_pages())
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
torch.ones({SIZE // 4})
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text.split("[", 1)[1].split("]", 1)[0]


def _faults(switch: str | None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if switch is not None:
        env["THP_MEM_ALLOC_ENABLE"] = switch
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    enabled, faults = out.stdout.split()
    return enabled == "True", int(faults)


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="transparent huge pages are off here")
def test_huge_pages_cut_the_page_faults_of_a_large_tensor():
    on, with_pages = _faults(None)  # the switch is set by use_huge_pages()
    off, without = _faults("0")  # the user's environment wins
    assert on and not off
    assert without >= PAGES // 2  # 4 KiB pages: one fault per page written
    assert with_pages <= PAGES // 20  # 2 MiB pages: a fault per 512 small pages
