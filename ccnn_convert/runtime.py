"""Where models run: the device, the torchrun job, timing fences and peak memory.

Shared by evaluation, benchmarking and export so that each picks a device, joins a torchrun
job and measures time and memory the same way:

* :func:`resolve_device` turns ``"auto" | "cpu" | "cuda" | "cuda:N"`` into a ``torch.device``;
* :func:`distributed_from_env` joins the job that torchrun describes in the environment;
* :func:`synchronize` is the fence before reading a clock (CUDA runs asynchronously);
* :func:`process_peak_rss_bytes` is the CPU-side memory high-water mark, and
  :func:`reset_peak_rss` / :func:`peak_rss_since_reset` measure one phase of a process (Linux);
* :func:`default_forward_batch` is how many images one forward pass takes on a device.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from .errors import CCNNError, ParameterError

__all__ = [
    "CPU_FORWARD_BATCH",
    "DistributedContext",
    "default_forward_batch",
    "distributed_from_env",
    "peak_rss_since_reset",
    "process_peak_rss_bytes",
    "reset_peak_rss",
    "resolve_device",
    "synchronize",
]

CPU_FORWARD_BATCH = 4  # images per forward pass on CPU (see default_forward_batch)


def resolve_device(choice: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' | 'auto' -> torch.device; CUDA asked for but absent is an error.

    Plain ``'cuda'`` means this process's GPU under torchrun (``cuda:<local_rank>``).
    """
    if isinstance(choice, torch.device):
        choice = str(choice)
    choice = (choice or "auto").strip().lower()
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda" or choice.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ParameterError("device", f"{{param}} {choice} was requested but CUDA is not available "
                                           "on this machine")
        try:
            return torch.device(choice if ":" in choice else f"cuda:{local_rank}")
        except RuntimeError:
            raise ParameterError("device", f"unknown {{param}} {choice!r} (choose cpu, cuda, cuda:N or auto)") from None
    raise ParameterError("device", f"unknown {{param}} {choice!r} (choose cpu, cuda or auto)")


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (a no-op on CPU): call before reading a timer."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> bool:
    """Start a new high-water mark (Linux: ``/proc/self/clear_refs``); False where unsupported.

    ``getrusage``'s ``ru_maxrss`` never goes down, and a process started with ``subprocess``
    (vfork + exec) even inherits its parent's, so it cannot measure one phase of a run.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset() -> int:
    """Resident high-water mark since :func:`reset_peak_rss` (``VmHWM``), else :func:`process_peak_rss_bytes`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return process_peak_rss_bytes()


def available_memory_bytes() -> int | None:
    """Memory the system can still give this process (Linux ``MemAvailable``), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_fits_in_memory(nbytes: int, what: str, parameter: str) -> None:
    """Refuse, naming ``parameter``, a tensor that could not be allocated: one line, not a traceback."""
    available = available_memory_bytes()
    if available is not None and nbytes > available:
        raise ParameterError(parameter, f"{what} would need {nbytes / 2**30:.1f} GiB, more than the "
                                        f"{available / 2**30:.1f} GiB of memory available; lower {{param}}")


def default_forward_batch(device: torch.device) -> int | None:
    """Images per forward pass: small on CPU, the whole batch (None) on a GPU.

    A converted model's activations are many times the original's (32 submaps per image after
    five checkered steps); on CPU a pass over 25 images makes tensors of hundreds of MB, each
    page-faulted in afresh and evicted from the caches, and costs 2.5x more per image than passes
    over 4 (checkered efficientnet_lite0, one thread). Eval-mode results do not depend on it.
    """
    return CPU_FORWARD_BATCH if device.type == "cpu" else None


@dataclass
class DistributedContext:
    """This process's place in a torchrun job (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise CCNNError(f"environment variable {name} is not an integer: {os.environ[name]!r}") from None


@contextlib.contextmanager
def distributed_from_env(device_choice: str | torch.device = "auto") -> Iterator[DistributedContext]:
    """Join the torchrun job described by WORLD_SIZE/RANK/LOCAL_RANK (gloo on CPU, nccl on CUDA).

    A process group that already exists is reused and left alone; one made here is destroyed
    on exit. Without torchrun (WORLD_SIZE unset or 1) this yields a single-process context.
    """
    if dist.is_available() and dist.is_initialized():
        yield DistributedContext(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
        return
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        yield DistributedContext()
        return
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_choice, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    finished = False
    try:
        yield DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank)
        finished = True
    finally:
        if finished:  # no process tears its connections down while another still uses them
            dist.barrier()
        dist.destroy_process_group()
