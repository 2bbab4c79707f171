"""A benchmark's results as text: the cost table, the settings that explain it, JSON and markdown.

One table layout (:func:`table_rows`) serves the markdown file and the command's rich table, so
the two always agree. Columns that no row fills (CPU time on CUDA, top-1 without data) are left
out rather than shown empty.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch

from .._helpers import format_bytes, format_flops
from ..flops import FFT_FLOPS_NOTE
from .machine import MEMORY_CPU, MEMORY_CUDA

if TYPE_CHECKING:  # measure.py uses this module's cell formats
    from .measure import Measurement

__all__ = ["OPTIONAL_COLUMNS", "TABLE_COLUMNS", "BenchReport", "describe_settings", "fmt_count", "fmt_ratio",
           "fmt_seconds", "markdown_table", "table_row", "table_rows"]


@dataclass
class BenchReport:
    """Every measurement of one run, with the settings needed to reproduce and judge it."""

    measurements: list[Measurement]
    settings: dict = field(default_factory=dict)

    def for_model(self, model: str) -> list[Measurement]:
        return [m for m in self.measurements if m.model == model]

    @property
    def models(self) -> list[str]:
        return list(dict.fromkeys(m.model for m in self.measurements))

    @property
    def has_sweep(self) -> bool:
        return any(m.keep_first > 0 for m in self.measurements)

    def to_dict(self) -> dict:
        return {"settings": self.settings, "measurements": [m.to_dict() for m in self.measurements]}

    def to_json(self) -> str:
        """The report as JSON text (NaN as null, anything else unusual as its string)."""
        return json.dumps(self.to_dict(), indent=2, default=_jsonable) + "\n"

    def to_markdown(self) -> str:
        lines = [markdown_table(self.measurements), ""]
        lines += [f"- {key}: {value}" for key, value in describe_settings(self.settings).items()]
        return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


# --------------------------------------------------------------------------- cells


def fmt_seconds(value: float | None) -> str:
    """``0.0123`` -> ``12.3 ms``; ``2.5`` -> ``2.50 s``; None -> ``-``."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f} s"
    if value >= 1:
        return f"{value:.2f} s"
    return f"{1000 * value:.1f} ms"


def fmt_ratio(value: float | None) -> str:
    """``2.0`` -> ``2x``; three significant digits below 100."""
    if value is None:
        return "-"
    return f"{value:.3g}x" if value < 100 else f"{value:.0f}x"


def fmt_count(value: int | None) -> str:
    """A parameter count in millions."""
    return "-" if value is None else f"{value / 1e6:.2f} M"


def _fmt_bytes(value: int | None) -> str:
    return "-" if value is None else format_bytes(value)


TABLE_COLUMNS = ("model", "variant", "submaps", "time/batch", "time x", "CPU time x", "ORT time/batch", "ORT time x",
                 "FLOPs/batch", "FLOPs x", "peak memory", "memory x", "params", "top-1")
OPTIONAL_COLUMNS = ("CPU time x", "ORT time/batch", "ORT time x", "top-1")  # dropped when no row has a value


def table_row(m: Measurement) -> list[str]:
    """One row of the cost table, one cell per TABLE_COLUMNS entry."""
    time = fmt_seconds(m.median_s) if m.skipped is None else f"not run ({m.skipped})"
    onnx_time = fmt_seconds(m.median_onnx_s) if m.onnx_skipped is None else m.onnx_skipped
    return [m.model, m.label, str(m.submaps), time, fmt_ratio(m.time_ratio), fmt_ratio(m.cpu_time_ratio),
            onnx_time, fmt_ratio(m.onnx_time_ratio), format_flops(m.flops), fmt_ratio(m.flop_ratio),
            _fmt_bytes(m.peak_memory_bytes), fmt_ratio(m.memory_ratio), fmt_count(m.params),
            "-" if m.top1 is None else f"{m.top1:.2f}"]


def table_rows(measurements: Sequence[Measurement]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the cost table (shared by the markdown file and the rich table)."""
    rows = [table_row(m) for m in measurements]
    keep = [i for i, name in enumerate(TABLE_COLUMNS)
            if name not in OPTIONAL_COLUMNS or any(row[i] != "-" for row in rows)]
    return [TABLE_COLUMNS[i] for i in keep], [[row[i] for i in keep] for row in rows]


def markdown_table(measurements: Sequence[Measurement]) -> str:
    headers, rows = table_rows(measurements)
    lines = [headers, ["---"] * 2 + ["---:"] * (len(headers) - 2)] + rows
    return "\n".join("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in lines)


# --------------------------------------------------------------------------- settings


def describe_settings(settings: Mapping[str, Any]) -> dict[str, str]:
    """Human-readable lines for the settings that matter when reading the numbers."""
    out = {}
    if "device" in settings:
        threads = (f", {settings['threads']} thread(s)" if str(settings["device"]).startswith("cpu")
                   and settings.get("threads") else "")
        out["device"] = f"{settings['device']} ({settings.get('device_name', '?')}{threads})"
    if "batch_size" in settings:
        size = settings.get("image_size")
        size = f"{size}x{size} px" if isinstance(size, int) else "each model's crop size"
        out["input"] = f"batch {settings['batch_size']}, {size}, random values"
    if "repeats" in settings:
        out["timing"] = (f"median of {settings['repeats']} passes after {settings.get('warmup', 0)} untimed "
                         "pass(es), variants interleaved; time x = wall clock, CPU time x = process CPU time")
    if settings.get("memory_kind") == MEMORY_CPU:
        out["peak memory"] = ("model tensors + input + peak allocated during the forward "
                              "(torch.profiler memory events, CPU allocator)")
    elif settings.get("memory_kind") == MEMORY_CUDA:
        out["peak memory"] = "model tensors + input + peak CUDA allocation during the forward"
    if settings.get("onnx"):
        out["ORT time"] = ("each variant exported as ccnn-export exports it (fixed spectral pooling and DiffStride "
                           "as matrix products), ONNX Runtime CPU provider with the same threads, timed like "
                           "time/batch; ORT time x = against the original's ORT time")
    out["FLOPs"] = f"per batch, torch.utils.flop_counter on meta tensors (multiply-add = 2); {FFT_FLOPS_NOTE}"
    if settings.get("load_average"):
        before, after = settings["load_average"]
        out["load average (1 min)"] = f"{before:.2f} before, {after:.2f} after"
    if settings.get("data"):
        out["top-1"] = f"{settings['data']} ({settings.get('images', '?')} images)"
    if settings.get("command"):
        out["command"] = f"`{settings['command']}`"
    out["torch"] = settings.get("torch", torch.__version__)
    return out
