"""The Markdown tables of ``benchmarks/gpu_check.py``'s JSON, and docs/results.md's GPU section.

    python benchmarks/gpu_table.py                        # docs/data/gpu_check.json -> docs/results.md
    python benchmarks/gpu_table.py --json out/gpu_check.json --print

The section lies between the two markers below; without a JSON it says "not yet measured".
Every figure is formatted from the JSON by :func:`render_table` (tests/test_gpu_check.py parses
the numbers back), never typed by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
DEFAULT_JSON = ROOT / "docs" / "data" / "gpu_check.json"
DEFAULT_RESULTS = ROOT / "docs" / "results.md"
NOT_MEASURED = ("*Not yet measured*: no GPU has run `benchmarks/gpu_check.py` yet. When one does, "
                "its JSON goes to `docs/data/gpu_check.json` and `python benchmarks/gpu_table.py` "
                "fills this section from it.")


# --------------------------------------------------------------------------- cells


def _number(value, render) -> str:
    """``render(value)`` for a measured number, "-" for a cell the part did not fill."""
    return render(value) if isinstance(value, (int, float)) else "-"


def ms(seconds) -> str:
    return _number(seconds, lambda v: millis(v * 1000))


def millis(value) -> str:
    return _number(value, lambda v: f"{v:.4g} ms")


def mib(value) -> str:
    return _number(value, lambda v: f"{v / 2**20:.1f} MiB")


def times(ratio) -> str:
    return _number(ratio, lambda v: f"{v:.3g}x")


def sci(value) -> str:
    return _number(value, lambda v: f"{v:.2e}")


def seconds(value) -> str:
    return _number(value, lambda v: f"{v:.3g} s")


def yes(flag) -> str:
    return "yes" if flag else "no"


def outcome(row: dict, cell: str) -> str:
    """The row's first figure, or why there is none."""
    if row.get("error"):
        return "error: " + str(row["error"]).replace("|", "/")
    if row.get("skipped"):
        return "skipped: " + str(row["skipped"]).replace("|", "/")
    return cell


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    numeric = (" x", "time", "memory", "/step", "speedup", "ORT", "eager", "compiled", "diff", "tolerance")
    aligns = ["---:" if name.endswith(numeric) else "---" for name in header]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(aligns) + " |",
            *("| " + " | ".join(r) + " |" for r in rows)]


# --------------------------------------------------------------------------- sections


def inference_lines(part: dict) -> list[str]:
    rows = [[r["model"], str(r["batch"]), r["precision"], r["mode"], outcome(r, ms(r.get("time_s"))),
             times(r.get("time_ratio")), times(r.get("flop_ratio")), mib(r.get("peak_bytes")),
             times(r.get("memory_ratio"))] for r in part.get("rows", [])]
    return table(["model", "batch", "precision", "mode", "time", "time x", "FLOPs x", "peak memory", "memory x"], rows)


def onnx_lines(part: dict) -> list[str]:
    lines = [f"- provider `{p['provider']}`: " + ("available" if p["available"] else f"missing ({p['reason']})")
             for p in part.get("providers", [])]
    rows = [[r["model"], r["mode"], r["precision"], r["provider"], str(r["batch"]),
             outcome(r, millis(r.get("eager_ms"))), millis(r.get("ort_ms")), times(r.get("ort_over_eager")),
             sci(r.get("max_rel")), f"{r['tolerance']:g}", "-" if "parity_ok" not in r else yes(r["parity_ok"])]
            for r in part.get("rows", [])]
    if rows:
        lines += [""] + table(["model", "mode", "precision", "provider", "batch", "eager", "ORT", "ORT / eager x",
                               "max rel diff", "tolerance", "parity"], rows)
    return lines


def training_lines(part: dict) -> list[str]:
    rows = [[r["model"], r["mode"], yes(r["checkpointing"]), yes(r["amp"]), str(r["batch"]),
             outcome(r, ms(r.get("step_s"))), times(r.get("time_ratio")), mib(r.get("peak_bytes")),
             times(r.get("memory_ratio"))] for r in part.get("rows", [])]
    return table(["model", "mode", "checkpointing", "AMP", "batch", "time/step", "time x", "peak memory", "memory x"],
                 rows)


def compile_lines(part: dict) -> list[str]:
    rows = [[r["model"], r["mode"], str(r["batch"]), r["backend"], outcome(r, ms(r.get("eager_s"))),
             ms(r.get("compiled_s")), times(r.get("speedup")), seconds(r.get("compile_s")), sci(r.get("max_rel"))]
            for r in part.get("rows", [])]
    return table(["model", "mode", "batch", "backend", "eager", "compiled", "speedup", "compile time",
                  "max rel diff"], rows)


SECTIONS = (("inference", "Inference", inference_lines), ("onnx", "ONNX Runtime", onnx_lines),
            ("training", "Training step", training_lines), ("compile", "torch.compile", compile_lines))


def render_table(data: dict) -> str:
    """Every part of a gpu_check JSON as Markdown: a header line, then one table per part."""
    m = data.get("machine", {})
    lines = [f"Measured on {m.get('device_name', '?')} ({m.get('device', '?')}), torch {m.get('torch', '?')}, "
             f"CUDA {m.get('cuda') or '-'}, onnxruntime {m.get('onnxruntime', '-')}; plan `{data.get('plan')}`, "
             f"started {data.get('started')}, finished {data.get('finished') or '(cut short)'}. "
             f"Autocast: {m.get('autocast_dtype', '-')}; cuDNN TF32 {m.get('cudnn_allow_tf32')}. "
             f"`{data.get('command', '')}`"]
    for key, title, render in SECTIONS:
        part = data.get("parts", {}).get(key, {})
        status = part.get("status", "not run")
        took = f", {part['seconds']} s" if part.get("seconds") is not None else ""
        lines += ["", f"**{title}** ({status}{took}{'; ' + part['error'] if part.get('error') else ''})", ""]
        lines += render(part)
    return "\n".join(lines)


def section(data: dict | None) -> str:
    return render_table(data) if data is not None else NOT_MEASURED


def replace_section(text: str, body: str) -> str:
    """``text`` with what lies between the markers replaced by ``body``."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"expected one {BEGIN} ... {END} pair")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{body}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--print", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args(argv)
    data = None
    if args.json.exists():
        try:
            data = json.loads(args.json.read_text())
        except (OSError, ValueError) as exc:
            print(f"gpu_table: cannot read {args.json}: {exc}", file=sys.stderr)
            return 2
        if data.get("plan") == "tiny" and not args.print:
            print(f"gpu_table: {args.json} is a --tiny smoke run, not GPU figures; not written into {args.results}",
                  file=sys.stderr)
            return 2
    body = section(data)
    if args.print:
        print(body)
        return 0
    from ccnn_convert.outputs import atomic_path

    try:
        text = replace_section(args.results.read_text(), body)
    except (OSError, ValueError) as exc:
        print(f"gpu_table: {args.results}: {exc}", file=sys.stderr)
        return 2
    with atomic_path(args.results, force=True) as tmp:
        tmp.write_text(text)
    print(f"gpu_table: wrote the GPU section of {args.results} from {args.json if data else '(no JSON yet)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
