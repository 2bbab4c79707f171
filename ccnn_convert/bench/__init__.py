"""Cost of converted models relative to the original: time, memory, FLOPs, parameters, top-1.

The stage in four parts: :mod:`.measure` (timing, peak memory, FLOPs, ratios), :mod:`.report`
(tables, settings, JSON and markdown), :mod:`.plots` (PNG pictures), :mod:`.machine` (where it
ran), and :mod:`.run` (resolve MODELs, measure them, write the files).
"""

from .machine import MEMORY_CPU, MEMORY_CUDA, cpu_name, load_average, machine_settings
from .measure import (DEFAULT_MODES, Measurement, TimingOptions, Top1Fn, Variant, add_ratios, bench_model,
                      build_variants, count_parameters, forward_peak_bytes, measured_modes, tensor_bytes,
                      time_interleaved, time_once, variant_label)
from .plots import PLOT_SIZE_PX, plot_sweep, plot_time_ratios
from .report import (OPTIONAL_COLUMNS, TABLE_COLUMNS, BenchReport, describe_settings, fmt_count, fmt_ratio,
                     fmt_seconds, markdown_table, table_row, table_rows)
from .run import (OUTPUT_NAMES, BenchOptions, Top1Options, conversion_specs, output_names, run_bench,
                  top1_evaluator, write_outputs)

__all__ = [
    "DEFAULT_MODES", "MEMORY_CPU", "MEMORY_CUDA", "OPTIONAL_COLUMNS", "OUTPUT_NAMES", "PLOT_SIZE_PX",
    "TABLE_COLUMNS", "BenchOptions", "BenchReport", "Measurement", "TimingOptions", "Top1Fn", "Top1Options",
    "Variant", "add_ratios", "bench_model", "build_variants", "conversion_specs", "count_parameters", "cpu_name",
    "describe_settings", "fmt_count", "fmt_ratio", "fmt_seconds", "forward_peak_bytes", "load_average",
    "machine_settings", "markdown_table", "measured_modes", "output_names", "plot_sweep", "plot_time_ratios",
    "run_bench", "table_row", "table_rows", "tensor_bytes", "time_interleaved", "time_once", "top1_evaluator",
    "variant_label", "write_outputs",
]
