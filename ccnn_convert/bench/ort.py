"""ONNX Runtime latency of every variant: what the deployed model costs.

FLOPs count an FFT by its arithmetic, and PyTorch eager runs the FFTs with its own kernels; a
deployed model runs in ONNX Runtime, whose cost can differ a lot (its ``DFT`` kernel is 28-500x
slower than products with fixed bases). So each variant is exported as ``ccnn-export`` exports
it (:func:`~ccnn_convert.export.pipeline.with_matrix_products`, then
:func:`~ccnn_convert.export.exporter.export_onnx`: default opset, dynamic batch) to a temporary
folder, opened on ONNX Runtime's CPU provider with PyTorch's thread count, and the sessions are
timed on the same batch, interleaved like the eager passes. A variant that cannot be exported
keeps the reason (``onnx_skipped``), shown in the table and logged: never a silent gap.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from .._helpers import first_line
from ..errors import CCNNError

if TYPE_CHECKING:
    from .measure import Measurement, Variant

__all__ = ["onnx_latency"]

logger = logging.getLogger(__name__)


def onnx_latency(variants: Sequence["Variant"], measurements: Sequence["Measurement"], x: Tensor,
                 repeats: int, warmup: int) -> None:
    """Fill ``onnx_times_s`` (wall seconds per batch ``x``) of each measurement, or its
    ``onnx_skipped`` reason; variants not run eagerly (``skipped``) are not run here either."""
    from .measure import time_interleaved

    batch = x.detach().cpu().numpy()
    with tempfile.TemporaryDirectory(prefix="ccnn-bench-onnx-") as folder:
        runs, owners = {}, {}
        for index, (variant, m) in enumerate(zip(variants, measurements)):
            if m.skipped is not None:
                m.onnx_skipped = "not run (see time/batch)"
                continue
            try:
                session = _session(variant.model, Path(folder) / f"variant{index}.onnx", tuple(x.shape[-2:]))
            except CCNNError as exc:
                m.onnx_skipped = f"cannot export: {first_line(exc)}"
                logger.warning("%s %s: no ONNX Runtime latency, %s", m.model, m.label, m.onnx_skipped)
                continue
            runs[variant.label] = _runner(session, batch)
            owners[variant.label] = m
        for run in runs.values():
            for _ in range(warmup):
                run()
        logger.info("ONNX Runtime: timing %d session(s) x %d passes, interleaved", len(runs), repeats)
        times = time_interleaved(runs, repeats, torch.device("cpu"))
    for label, m in owners.items():
        m.onnx_times_s = [wall for wall, _ in times[label]]


def _session(model: torch.nn.Module, path: Path, size: tuple[int, int]):
    """An ONNX Runtime CPU session on ``model`` exported to ``path`` (ExportError if it cannot be)."""
    from ..export.exporter import export_onnx
    from ..export.pipeline import with_matrix_products
    from ..export.sessions import create_session, select_provider

    if size[0] != size[1]:
        raise CCNNError(f"ONNX export takes a square input, not {size[0]}x{size[1]}")
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.device.type != "cpu":
        model = copy.deepcopy(model).cpu()  # the exporter traces on CPU
    logger.info("exporting to ONNX at %dx%d...", *size)
    export_onnx(with_matrix_products(model, size[0]), path, size[0])
    return create_session(path, select_provider("cpu"), torch.get_num_threads())


def _runner(session, batch):
    from ..export.sessions import run_session

    return lambda: run_session(session, batch)
