"""benchmarks/gpu_check.py (issue 26) on the CPU: every part runs on tiny models, and the tables say
what the JSON says.

The GPU figures come from a GPU; what the suite guards is that the script cannot rot: ``--device
cpu --tiny`` runs all four parts, writes a JSON whose ratios are the ratios of its own figures,
and :mod:`gpu_table`'s Markdown parses back to the same numbers.
"""

from __future__ import annotations

import importlib
import json
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

gpu_check = importlib.import_module("gpu_check")
gpu_table = importlib.import_module("gpu_table")

INFERENCE_KEYS = {"model", "mode", "batch", "precision", "flops", "time_s", "times_s", "peak_bytes", "time_ratio",
                  "memory_ratio", "flop_ratio"}
ONNX_KEYS = {"model", "mode", "precision", "provider", "batch", "tolerance", "export_s", "nodes", "max_abs", "max_rel",
             "parity_ok", "eager_ms", "ort_ms", "ort_over_eager"}
TRAINING_KEYS = {"model", "mode", "checkpointing", "amp", "batch", "steps", "step_s", "peak_bytes", "time_ratio",
                 "memory_ratio"}
COMPILE_KEYS = {"model", "mode", "batch", "backend", "eager_s", "compiled_s", "compile_s", "speedup", "max_rel"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    code = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)])
    return code, out, json.loads(out.read_text())


def test_tiny_run_measures_every_part_and_writes_every_key(run):
    code, out, data = run
    assert code == 0
    assert {"schema", "plan", "command", "started", "finished", "settings", "machine", "parts"} <= set(data)
    assert data["plan"] == "tiny" and data["finished"]
    assert set(data["parts"]) == set(gpu_check.PARTS)
    for name, part in data["parts"].items():
        assert part["status"] == "done", (name, part)
        assert part["rows"], name
    inference = data["parts"]["inference"]["rows"]
    assert {(r["model"], r["mode"], r["precision"]) for r in inference} == {
        (m, mode, p) for m in ("tiny_a", "tiny_b") for mode in gpu_check.MODES for p in ("fp32", "autocast-bf16")}
    for row in inference:
        assert INFERENCE_KEYS <= set(row) and not row.get("error"), row
    onnx = data["parts"]["onnx"]
    assert onnx["providers"] == [{"provider": "cpu", "available": True, "reason": None}]
    measured = [r for r in onnx["rows"] if r["precision"] == "fp32"]
    assert measured and all(ONNX_KEYS <= set(r) and r["parity_ok"] and r["max_rel"] <= 1e-4 for r in measured)
    assert all(r["skipped"] for r in onnx["rows"] if r["precision"] == "fp16")  # no fp16 on the CPU provider
    for row in data["parts"]["training"]["rows"]:
        assert TRAINING_KEYS <= set(row) and row["step_s"] > 0 and row["peak_bytes"] > 0, row
    assert {(r["mode"], r["checkpointing"], r["amp"]) for r in data["parts"]["training"]["rows"]} == set(
        gpu_check.QUICK.train_configs)
    (compiled,) = data["parts"]["compile"]["rows"]
    assert COMPILE_KEYS <= set(compiled) and compiled["max_rel"] < 1e-5
    assert out.with_suffix(".md").read_text().strip() == gpu_table.render_table(data).strip()


def test_ratios_are_the_ratios_of_the_measured_figures(run):
    _, _, data = run
    rows = data["parts"]["inference"]["rows"]
    for row in rows:
        base = next(r for r in rows if r["mode"] == "original" and
                    (r["model"], r["batch"], r["precision"]) == (row["model"], row["batch"], row["precision"]))
        assert row["time_s"] == statistics.median(row["times_s"])
        assert row["time_ratio"] == pytest.approx(row["time_s"] / base["time_s"])
        assert row["memory_ratio"] == pytest.approx(row["peak_bytes"] / base["peak_bytes"])
        assert row["flop_ratio"] == pytest.approx(row["flops"] / base["flops"])
    # A checkered model computes more than its original; spectral and blurpool run layers at stride 1.
    for row in rows:
        if row["mode"] != "original":
            assert row["flop_ratio"] > 1, row
    training = data["parts"]["training"]["rows"]
    assert training[0]["mode"] == "original" and training[0]["time_ratio"] == 1
    for row in training:
        assert row["time_ratio"] == pytest.approx(row["step_s"] / training[0]["step_s"])
    compiled = data["parts"]["compile"]["rows"][0]
    assert compiled["speedup"] == pytest.approx(compiled["eager_s"] / compiled["compiled_s"])


def _cells(markdown: str, first: list[str]) -> list[str]:
    """The cells of the table row whose first cells are ``first``."""
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:len(first)] == first:
            return cells
    raise AssertionError(f"no row {first}")


def _number(cell: str) -> float:
    return float(re.fullmatch(r"([-+0-9.e]+)(?: ?(?:ms|MiB|s|x))?", cell).group(1))


def test_the_table_says_what_the_json_says(run):
    _, _, data = run
    markdown = gpu_table.render_table(data)
    for r in data["parts"]["inference"]["rows"]:
        cells = _cells(markdown, [r["model"], str(r["batch"]), r["precision"], r["mode"]])
        assert _number(cells[4]) == pytest.approx(r["time_s"] * 1000, rel=1e-3)
        assert _number(cells[5]) == pytest.approx(r["time_ratio"], rel=1e-2)
        assert _number(cells[6]) == pytest.approx(r["flop_ratio"], rel=1e-2)
        assert _number(cells[7]) == pytest.approx(r["peak_bytes"] / 2**20, abs=0.051)
        assert _number(cells[8]) == pytest.approx(r["memory_ratio"], rel=1e-2)
    for r in data["parts"]["onnx"]["rows"]:
        cells = _cells(markdown, [r["model"], r["mode"], r["precision"], r["provider"]])
        if r.get("skipped"):
            assert cells[5] == f"skipped: {r['skipped']}"
            continue
        assert _number(cells[5]) == pytest.approx(r["eager_ms"], rel=1e-3)
        assert _number(cells[6]) == pytest.approx(r["ort_ms"], rel=1e-3)
        assert _number(cells[8]) == pytest.approx(r["max_rel"], rel=1e-2)
        assert cells[10] == ("yes" if r["parity_ok"] else "no")
    for r in data["parts"]["training"]["rows"]:
        yes = {True: "yes", False: "no"}
        cells = _cells(markdown, [r["model"], r["mode"], yes[r["checkpointing"]], yes[r["amp"]]])
        assert _number(cells[5]) == pytest.approx(r["step_s"] * 1000, rel=1e-3)
        assert _number(cells[6]) == pytest.approx(r["time_ratio"], rel=1e-2)
        assert _number(cells[8]) == pytest.approx(r["memory_ratio"], rel=1e-2)
    r = data["parts"]["compile"]["rows"][0]
    cells = _cells(markdown, [r["model"], r["mode"], str(r["batch"]), r["backend"]])
    assert _number(cells[4]) == pytest.approx(r["eager_s"] * 1000, rel=1e-3)
    assert _number(cells[5]) == pytest.approx(r["compiled_s"] * 1000, rel=1e-3)
    assert _number(cells[7]) == pytest.approx(r["compile_s"], rel=1e-2)


def test_results_md_holds_the_section_the_json_gives():
    results = (gpu_table.DEFAULT_RESULTS).read_text()
    body = results.split(gpu_table.BEGIN)[1].split(gpu_table.END)[0].strip()
    measured = gpu_table.DEFAULT_JSON
    expected = gpu_table.render_table(json.loads(measured.read_text())) if measured.exists() else gpu_table.NOT_MEASURED
    assert body == expected.strip()


def test_replace_section_keeps_the_rest_and_refuses_missing_markers():
    text = f"a\n{gpu_table.BEGIN}\nold\n{gpu_table.END}\nb\n"
    assert gpu_table.replace_section(text, "new") == f"a\n{gpu_table.BEGIN}\nnew\n{gpu_table.END}\nb\n"
    with pytest.raises(ValueError):
        gpu_table.replace_section("no markers", "new")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_exits_with_one_line(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "g.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpu_check: no CUDA device") and "\n" not in err
    assert not (tmp_path / "g.json").exists()
