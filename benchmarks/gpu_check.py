"""GPU check (issue 26): everything the CPU cannot measure, in one short command.

Four parts, each time-boxed, the JSON (and its Markdown table, ``<out>.md``) rewritten after each:

1. **inference**: ResNet-50 and ResNet-152 (random weights), batch 4 and 32, fp32 and autocast
   (float16 on CUDA, bfloat16 on CPU), modes original / checkered / dilated (native) / spectral /
   blurpool. Median of timed passes (CUDA events) after warm-up, peak memory (model + input +
   what one forward allocates: ``torch.cuda.max_memory_allocated``), ratios to the original
   beside the FLOP ratio (``ccnn_convert.flops``, on meta tensors).
2. **onnx**: each mode exported (``ccnn_convert.export.exporter``, fp32 and fp16) and run with
   ONNX Runtime's CUDA and TensorRT providers: latency against eager PyTorch on the same device,
   parity to 1e-4 (fp32) and 1e-3 (fp16) against eager in the same precision. A provider that
   is missing is one row, not a failure.
3. **training**: seconds per step and peak memory of checkered ResNet-50 at batch 32, with and
   without block checkpointing and AMP, against the original (``ccnn_convert.train.Trainer``).
4. **compile**: checkered ResNet-50, eager against ``torch.compile``, and the compile time.

A measurement that fails is recorded as an error string in its row and the script goes on.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_check.py            # full, < 8 min
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/gpu_check.py --quick    # subset, < 3 min
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/g.json       # the CPU smoke test
    python benchmarks/gpu_table.py     # docs/results.md's GPU section from docs/data/gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import platform
import re
import signal
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

DEFAULT_OUT = ROOT / "docs" / "data" / "gpu_check.json"
MODES = ("original", "checkered", "dilated", "spectral", "blurpool")
PARTS = ("inference", "onnx", "training", "compile")
TOLERANCES = {"fp32": 1e-4, "fp16": 1e-3}


@dataclass(frozen=True)
class Plan:
    """What one run measures, and the seconds it may take (shared among parts by ``shares``)."""

    models: tuple[str, ...] = ("resnet50", "resnet152")
    batches: tuple[int, ...] = (4, 32)
    precisions: tuple[str, ...] = ("fp32", "amp")
    modes: tuple[str, ...] = MODES
    size: int = 224
    repeats: int = 5
    row_seconds: float = 6.0  # timed passes of one inference row stop after about this long
    onnx_model: str = "resnet50"
    onnx_batch: int = 4
    onnx_modes: tuple[str, ...] = MODES
    onnx_precisions: tuple[str, ...] = ("fp32", "fp16")
    onnx_repeats: int = 10
    train_model: str = "resnet50"
    train_batch: int = 32
    train_configs: tuple[tuple[str, bool, bool], ...] = (  # (mode, checkpointing, amp)
        ("original", False, False), ("original", False, True), ("checkered", False, False),
        ("checkered", True, False), ("checkered", False, True), ("checkered", True, True))
    train_steps: int = 3  # timed, after one untimed step
    compile_model: str = "resnet50"
    compile_batch: int = 32
    compile_backend: str = "inductor"
    seconds: float = 440.0
    shares: tuple[float, ...] = (0.45, 0.2, 0.17, 0.18)  # of the time left, per part in PARTS order


FULL = Plan()
QUICK = replace(FULL, models=("resnet50",), repeats=3, row_seconds=3.0, onnx_modes=("original", "checkered"),
                onnx_precisions=("fp32",), onnx_repeats=5, train_steps=2,
                train_configs=(("original", False, False), ("checkered", False, False), ("checkered", True, True)),
                compile_batch=4, seconds=135.0, shares=(0.4, 0.1, 0.2, 0.3))
# Every part, on models small enough for the test suite (generous time: the boxes only catch hangs).
TINY = replace(FULL, models=("tiny_a", "tiny_b"), batches=(2,), size=32, repeats=2, row_seconds=0.5,
               onnx_model="tiny_a", onnx_batch=2, onnx_modes=("checkered",), onnx_repeats=2, train_model="tiny_a",
               train_batch=4, train_steps=1, train_configs=QUICK.train_configs, compile_model="tiny_a",
               compile_batch=2, compile_backend="eager", seconds=240.0)


class TimeBoxReached(BaseException):
    """Raised by the alarm when a part runs past its time box (not an Exception: rows let it through)."""


@contextlib.contextmanager
def time_box(seconds: float):
    """Interrupt the block after ``seconds`` (SIGALRM; main thread, between Python bytecodes)."""
    def on_alarm(signum, frame):
        raise TimeBoxReached(f"stopped after its time box of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def error_text(exc: BaseException) -> str:
    """One line: the exception's type and first line (a row's error field)."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


# --------------------------------------------------------------------------- models and devices


def build_model(name: str):
    """Random-weight model by name: torchvision's ResNets, or a tiny ResNet for the CPU test."""
    import torch
    import torchvision

    torch.manual_seed(0)
    if name.startswith("tiny_"):
        return tiny_resnet(blocks=1 if name == "tiny_a" else 2)
    return getattr(torchvision.models, name)(weights=None)


def tiny_resnet(blocks: int):
    """A ResNet laid out as torchvision's (stem, max pool, Sequential stages of BasicBlocks), 8-32 channels."""
    from torch import nn
    from torchvision.models.resnet import BasicBlock

    def stage(cin: int, cout: int, stride: int):
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        return nn.Sequential(BasicBlock(cin, cout, stride, down), *(BasicBlock(cout, cout) for _ in range(blocks - 1)))

    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.MaxPool2d(3, 2, 1), stage(8, 16, 2), stage(16, 32, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def convert_mode(model, mode: str, size: int):
    """``model`` itself for the original, else its conversion (dilated: native dilation)."""
    from ccnn_convert.spec import ConversionSpec

    if mode == "original":
        return model.eval()
    spec = ConversionSpec(mode=mode, dilation="native") if mode == "dilated" else ConversionSpec(mode=mode)
    return spec.apply(model, size)


def autocast_dtype(device):
    import torch

    return torch.float16 if device.type == "cuda" else torch.bfloat16  # as ccnn-train's --amp


def precision_label(precision: str, device) -> str:
    """"fp32", or "autocast-fp16" / "autocast-bf16": what "amp" means on this device."""
    return precision if precision != "amp" else "autocast-" + {"float16": "fp16", "bfloat16": "bf16"}[
        str(autocast_dtype(device)).replace("torch.", "")]


def precision_context(precision: str, device):
    import torch

    if precision.startswith("autocast"):
        return torch.autocast(device.type, dtype=autocast_dtype(device))
    return contextlib.nullcontext()


def release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def machine(device) -> dict:
    import torch
    import torchvision

    from ccnn_convert.bench.machine import machine_settings

    info = {**machine_settings(device), "torchvision": torchvision.__version__,
            "cuda": torch.version.cuda, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "platform": platform.platform(),
            "autocast_dtype": str(autocast_dtype(device)).replace("torch.", "")}
    for package in ("onnx", "onnxruntime", "onnxscript"):
        try:
            info[package] = __import__(package).__version__
        except Exception as exc:  # absent or broken: say so, the ONNX part reports it too
            info[package] = f"unavailable ({error_text(exc)})"
    if device.type == "cuda":
        info["device_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


# --------------------------------------------------------------------------- the report on disk


@dataclass
class Report:
    path: Path
    data: dict = field(default_factory=dict)

    def part(self, name: str) -> dict:
        return self.data["parts"][name]

    def write(self) -> None:
        """The JSON and its Markdown table, each replaced atomically."""
        from ccnn_convert.outputs import atomic_path
        from gpu_table import render_table

        self.data["updated"] = now()
        with atomic_path(self.path, force=True) as tmp:
            tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        with atomic_path(self.path.with_suffix(".md"), force=True) as tmp:
            tmp.write_text(render_table(self.data) + "\n")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_part() -> dict:
    return {"status": "not run", "seconds": None, "error": None, "rows": []}


# --------------------------------------------------------------------------- part 1: inference


def inference_part(plan: Plan, device, part: dict, deadline: float, report: Report) -> None:
    """Batch by batch (the paper's batch 4 first, for both models), then model, precision, mode."""
    import torch

    from ccnn_convert.flops import count_flops

    conversions = {name: _conversions(name, plan, device) for name in plan.models}
    _wake(device)
    for batch in plan.batches:
        x = torch.randn(batch, 3, plan.size, plan.size, generator=torch.Generator().manual_seed(0)).to(device)
        for name, models in conversions.items():
            flops = {m: _flops(count_flops, v, x) for m, v in models.items()}
            for precision in plan.precisions:
                base: dict = {}
                for mode in plan.modes:
                    row = {"model": name, "mode": mode, "batch": batch,
                           "precision": precision_label(precision, device),
                           "flops": flops[mode] if isinstance(flops[mode], int) else None}
                    if isinstance(flops[mode], str):
                        row["flops_error"] = flops[mode]
                    part["rows"].append(row)
                    _inference_row(row, models[mode], x, device, plan, deadline, base)
                    say(f"inference {name} b{batch} {row['precision']} {mode}: {_summary(row)}")
                report.write()


def _wake(device) -> None:
    """Load cuDNN and cuBLAS before the first timed row (their start-up is not the original's cost)."""
    import torch

    with torch.no_grad():
        torch.nn.functional.conv2d(torch.ones(1, 1, 8, 8, device=device), torch.ones(1, 1, 3, 3, device=device))
        torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)


def _conversions(name: str, plan: Plan, device) -> dict:
    """{mode: converted model on ``device``, or the exception its conversion raised}; all share
    the original's parameters."""
    original = build_model(name).eval()
    models = {}
    for mode in plan.modes:
        try:
            models[mode] = convert_mode(original, mode, plan.size).to(device)
        except Exception as exc:
            models[mode] = exc
    return models


def _flops(count_flops, model, x):
    if isinstance(model, Exception):
        return None
    try:
        return count_flops(model, x)
    except Exception as exc:
        return error_text(exc)


def _inference_row(row: dict, model, x, device, plan: Plan, deadline: float, base: dict) -> None:
    from ccnn_convert.bench.measure import forward_peak_bytes, tensor_bytes, time_once

    if isinstance(model, Exception):
        row["error"] = f"conversion failed: {error_text(model)}"
        return
    # FLOPs predict a pass's time on a GPU, not on a tiny CPU run (overhead-bound)
    estimate = _estimate(row, base) if device.type == "cuda" else None
    left = deadline - time.monotonic()
    if estimate is not None and estimate * 3 > left:
        row["skipped"] = f"estimated {estimate:.1f} s per pass (original x FLOP ratio), {left:.0f} s left"
        return
    try:
        with precision_context(row["precision"], device):
            began = time.perf_counter()
            activations = forward_peak_bytes(model, x, device)  # also the first warm-up pass
            first = time.perf_counter() - began
            row["peak_bytes"] = tensor_bytes(model) + x.numel() * x.element_size() + activations
            if first < 1.0:
                time_once(lambda: model(x), device)  # the second warm-up pass (kernels chosen, caches filled)
            times = []
            while len(times) < plan.repeats and (len(times) < 2 or sum(times) < plan.row_seconds):
                if time.monotonic() + (times[-1] if times else first) > deadline:
                    break
                times.append(time_once(lambda: model(x), device)[0])
        row["times_s"] = times
        row["time_s"] = statistics.median(times) if times else None
    except Exception as exc:
        row["error"] = error_text(exc)
        release(device)
        return
    if row["mode"] == "original":
        base.update(time_s=row["time_s"], peak_bytes=row["peak_bytes"], flops=row["flops"])
    _ratios(row, base)


def _estimate(row: dict, base: dict) -> float | None:
    if row["mode"] == "original" or not base.get("time_s") or not base.get("flops") or not row["flops"]:
        return None
    return base["time_s"] * row["flops"] / base["flops"]


def _ratios(row: dict, base: dict) -> None:
    for key, ratio in (("time_s", "time_ratio"), ("peak_bytes", "memory_ratio"), ("flops", "flop_ratio")):
        value, reference = row.get(key), base.get(key)
        row[ratio] = value / reference if value is not None and reference else None


def _summary(row: dict) -> str:
    if row.get("error") or row.get("skipped"):
        return row.get("error") or f"skipped ({row['skipped']})"
    shown = [f"{k}={row[k]:.4g}" for k in ("time_s", "time_ratio", "memory_ratio", "flop_ratio", "step_s",
                                            "speedup", "compile_s", "eager_ms", "ort_ms", "max_rel")
             if isinstance(row.get(k), (int, float))]
    return " ".join(shown) or "done"


# --------------------------------------------------------------------------- part 2: ONNX


def onnx_part(plan: Plan, device, part: dict, deadline: float, report: Report) -> None:
    from gpu_onnx import providers_for, run_onnx_rows

    providers = providers_for(device)
    part["providers"] = providers
    for entry in providers:
        say(f"onnx provider {entry['provider']}: {'available' if entry['available'] else entry['reason']}")
    report.write()
    run_onnx_rows(plan, device, part, deadline, [e for e in providers if e["available"]], report, say)


# --------------------------------------------------------------------------- part 3: training


def training_part(plan: Plan, device, part: dict, deadline: float, report: Report) -> None:
    base: dict = {}
    for mode, checkpointing, amp in plan.train_configs:
        row = {"model": plan.train_model, "mode": mode, "checkpointing": checkpointing, "amp": amp,
               "batch": plan.train_batch}
        part["rows"].append(row)
        if time.monotonic() > deadline:
            row["skipped"] = "no time left in the part's time box"
            continue
        try:
            row.update(_train_steps(plan, mode, checkpointing, amp, device))
        except Exception as exc:
            row["error"] = error_text(exc)
        release(device)
        if (mode, checkpointing, amp) == ("original", False, False):
            base.update(time_s=row.get("step_s"), peak_bytes=row.get("peak_bytes"))
        row["time_ratio"] = row["step_s"] / base["time_s"] if row.get("step_s") and base.get("time_s") else None
        row["memory_ratio"] = (row["peak_bytes"] / base["peak_bytes"]
                               if row.get("peak_bytes") and base.get("peak_bytes") else None)
        say(f"training {mode} checkpointing={checkpointing} amp={amp}: {_summary(row)}")
        report.write()


def _train_steps(plan: Plan, mode: str, checkpointing: bool, amp: bool, device) -> dict:
    """One untimed and ``train_steps`` timed steps of the project's Trainer on random images."""
    import torch
    from torch.utils.data import TensorDataset

    from ccnn_convert.runtime import peak_rss_since_reset, reset_peak_rss, synchronize
    from ccnn_convert.train import TrainConfig, Trainer

    steps = 1 + plan.train_steps
    net = build_model(plan.train_model)
    model = convert_mode(net, mode, plan.size) if mode != "original" else net
    classes = 1000 if not plan.train_model.startswith("tiny_") else 10
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(steps * plan.train_batch, 3, plan.size, plan.size, generator=generator),
                         torch.randint(0, classes, (steps * plan.train_batch,), generator=generator))
    config = TrainConfig(epochs=1, batch_size=plan.train_batch, amp=amp, checkpointing=checkpointing, augment="none")
    marks: list[float] = []
    trainer = Trainer(model, data, None, config, device=device, on_step=lambda info: marks.append(time.perf_counter()))
    try:
        synchronize(device)
        if device.type == "cuda":
            before = torch.cuda.memory_allocated(device)  # the model's parameters and buffers
            torch.cuda.reset_peak_memory_stats(device)
        else:
            before = reset_peak_rss() and peak_rss_since_reset()
        trainer.train_epoch()
        # CUDA: all that PyTorch held at the peak (model, gradients, momentum, activations); CPU: resident memory.
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_since_reset()
    finally:
        trainer.close()
    times = [b - a for a, b in zip(marks, marks[1:])]  # the first step (warm-up) is left out
    return {"steps": len(times), "step_times_s": times, "step_s": statistics.median(times) if times else None,
            "peak_bytes": int(peak), "before_bytes": int(before)}


# --------------------------------------------------------------------------- part 4: torch.compile


def compile_part(plan: Plan, device, part: dict, deadline: float, report: Report) -> None:
    import torch

    from ccnn_convert.bench.measure import time_once

    row = {"model": plan.compile_model, "mode": "checkered", "batch": plan.compile_batch, "precision": "fp32",
           "backend": plan.compile_backend}
    part["rows"].append(row)
    try:
        model = convert_mode(build_model(plan.compile_model), "checkered", plan.size).to(device)
        x = torch.randn(plan.compile_batch, 3, plan.size, plan.size, generator=torch.Generator().manual_seed(0))
        x = x.to(device)
        eager = _median_time(lambda: model(x), device, plan.repeats, time_once)
        row["eager_s"] = eager
        report.write()
        compiled = torch.compile(model, backend=plan.compile_backend)
        began = time.perf_counter()
        with torch.no_grad():
            compiled(x)
        from ccnn_convert.runtime import synchronize

        synchronize(device)
        row["compile_s"] = time.perf_counter() - began  # the first call: tracing, code generation, one run
        row["compiled_s"] = _median_time(lambda: compiled(x), device, plan.repeats, time_once)
        with torch.no_grad():
            row["max_rel"] = _max_rel(compiled(x), model(x))
        row["speedup"] = eager / row["compiled_s"] if row["compiled_s"] else None
    except Exception as exc:
        row["error"] = error_text(exc)
    say(f"compile checkered {plan.compile_model} b{plan.compile_batch} ({plan.compile_backend}): {_summary(row)}")


def _median_time(run, device, repeats: int, time_once) -> float:
    time_once(run, device)  # warm-up
    return statistics.median(time_once(run, device)[0] for _ in range(max(repeats, 1)))


def _max_rel(value, reference) -> float:
    return float((value.float() - reference.float()).abs().max() / reference.float().abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------- main


PART_FUNCTIONS = {"inference": inference_part, "onnx": onnx_part, "training": training_part, "compile": compile_part}


def run_parts(plan: Plan, device, report: Report, parts: tuple[str, ...]) -> None:
    end = time.monotonic() + plan.seconds
    shares = dict(zip(PARTS, plan.shares))
    for index, name in enumerate(parts):
        part = report.part(name)
        left = end - time.monotonic()
        allotted = left * shares[name] / sum(shares[p] for p in parts[index:])
        part.update(status="running", time_box_s=round(allotted, 1))
        say(f"part {name}: time box {allotted:.0f} s")
        began = time.monotonic()
        try:
            with time_box(allotted + 15):  # rows skip themselves at the deadline; the alarm is the backstop
                PART_FUNCTIONS[name](plan, device, part, began + allotted, report)
            part["status"] = "done"
        except TimeBoxReached as exc:
            part.update(status="stopped", error=str(exc))
        except Exception as exc:
            part.update(status="error", error=error_text(exc))
            traceback.print_exc()
        part["seconds"] = round(time.monotonic() - began, 1)
        release(device)
        report.write()
        say(f"part {name}: {part['status']} in {part['seconds']} s")


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (with --tiny)")
    parser.add_argument("--quick", action="store_true", help="a subset in under 3 minutes")
    parser.add_argument("--tiny", action="store_true", help="tiny models at 32x32: the CPU smoke test")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON (the table goes beside it, .md)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--seconds", type=float, help="time for all parts (default: 440 full, 135 quick, 240 tiny)")
    args = parser.parse_args(argv)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device must be cuda, cuda:N or cpu, not {args.device!r}")
    if args.quick and args.tiny:
        parser.error("--quick and --tiny are two different plans; choose one")
    if args.seconds is not None and args.seconds <= 0:
        parser.error("--seconds must be positive")
    return args, parts


def main(argv: list[str] | None = None) -> int:
    args, parts = parse_args(argv)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device (torch {torch.__version__} sees none); for the CPU smoke run use "
              "--device cpu --tiny", file=sys.stderr)
        return 2
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        print(f"gpu_check: --device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)",
              file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.tiny:
        print("gpu_check: --device cpu runs only with --tiny (the full plan would take hours on a CPU)",
              file=sys.stderr)
        return 2
    from ccnn_convert.errors import CCNNError
    from ccnn_convert.outputs import check_output

    try:
        check_output(args.out, force=True)
    except CCNNError as exc:
        print(f"gpu_check: --out: {exc}", file=sys.stderr)
        return 2
    plan = TINY if args.tiny else QUICK if args.quick else FULL
    if args.seconds:
        plan = replace(plan, seconds=args.seconds)
    report = Report(args.out, {
        "schema": 1, "issue": 26,
        "command": "python benchmarks/gpu_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "plan": "tiny" if args.tiny else "quick" if args.quick else "full", "started": now(), "finished": None,
        "settings": {k: v for k, v in plan.__dict__.items()}, "machine": machine(device),
        "parts": {name: new_part() for name in PARTS}})
    for name in PARTS:
        if name not in parts:
            report.part(name)["status"] = "not asked (--parts)"
    report.write()
    say(f"gpu_check ({report.data['plan']}) on {report.data['machine']['device_name']}, torch {torch.__version__}")
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny ops gain nothing from more threads, and lose on a busy machine
    try:
        run_parts(plan, device, report, parts)
    finally:
        torch.set_num_threads(threads)
    report.data["finished"] = now()
    report.write()
    say(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
