"""The ONNX part of ``benchmarks/gpu_check.py``: export each mode, run it on ONNX Runtime's GPU providers.

On a CUDA device the providers are CUDA and TensorRT (``onnxruntime-gpu``); on the CPU (the
``--tiny`` smoke test) the CPU provider stands in, in fp32 only. A provider that does not start
is one entry of ``providers`` with the reason, and no rows. For each available provider, each
mode and precision:

* parity: ONNX Runtime against eager PyTorch on the same device in the same precision (fp32
  without TF32 on both sides), max|diff| / max|eager| against 1e-4 (fp32) or 1e-3 (fp16);
* latency: :func:`ccnn_convert.export.verification.benchmark` (eager and ORT interleaved,
  medians; ORT's time includes copying the batch in and the logits out, as ``ccnn-export
  --benchmark`` measures it).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

from gpu_check import TOLERANCES, build_model, convert_mode, error_text, release

__all__ = ["providers_for", "run_onnx_rows"]


def providers_for(device) -> list[dict]:
    """Each provider to try on ``device``: available, or the reason it is not (one line)."""
    from ccnn_convert.export.sessions import select_provider

    names = ("cuda", "tensorrt") if device.type == "cuda" else ("cpu",)
    entries = []
    for name in names:
        try:
            select_provider(name)
            entries.append({"provider": name, "available": True, "reason": None})
        except Exception as exc:  # ExportError with ORT's reason; ImportError-like when ORT is absent
            entries.append({"provider": name, "available": False, "reason": error_text(exc)})
    return entries


def run_onnx_rows(plan, device, part: dict, deadline: float, providers: list[dict], report, say) -> None:
    if not providers:
        return
    from ccnn_convert.export.sessions import select_provider

    original = build_model(plan.onnx_model).eval()
    choices = {entry["provider"]: select_provider(entry["provider"]) for entry in providers}
    with tempfile.TemporaryDirectory(prefix="gpu_check_onnx_") as folder:
        for precision in plan.onnx_precisions:
            for mode in plan.onnx_modes:
                exported = None
                for provider, choice in choices.items():
                    row = {"model": plan.onnx_model, "mode": mode, "precision": precision, "provider": provider,
                           "batch": plan.onnx_batch, "tolerance": TOLERANCES[precision]}
                    part["rows"].append(row)
                    if precision == "fp16" and not choice.on_gpu:
                        row["skipped"] = "fp16 ONNX is measured on GPU providers only"
                    elif time.monotonic() > deadline:
                        row["skipped"] = "no time left in the part's time box"
                    else:
                        try:
                            exported = exported or _export(original, mode, precision, plan.size, Path(folder), row)
                            _measure(row, exported, choice, plan, device)
                        except Exception as exc:
                            row["error"] = error_text(exc)
                            release(device)
                    say(f"onnx {provider} {precision} {mode}: {_line(row)}")
                    report.write()


def _export(original, mode: str, precision: str, size: int, folder: Path, row: dict) -> tuple:
    """(fp32 converted model, ONNX path); the export's seconds and node count go into ``row``."""
    import torch

    from ccnn_convert.export.exporter import export_onnx

    model = convert_mode(original, mode, size)
    onnx_model = copy.deepcopy(model).half() if precision == "fp16" else model
    path = folder / f"{mode}_{precision}.onnx"
    began = time.perf_counter()
    info = export_onnx(onnx_model, path, size, dtype=torch.float16 if precision == "fp16" else torch.float32)
    row.update(export_s=time.perf_counter() - began, nodes=info.nodes)
    return model, path


def _measure(row: dict, exported: tuple, choice, plan, device) -> None:
    from ccnn_convert.export.sessions import create_session, run_session
    from ccnn_convert.export.verification import benchmark, compare

    model, path = exported
    session = create_session(path, choice)
    fp16 = row["precision"] == "fp16"
    x = _images(plan)
    check = compare(run_session(session, x), _eager_logits(model, x, fp16, device), "random", row["tolerance"])
    row.update(max_abs=check.max_abs, max_rel=check.max_rel, parity_ok=check.within_tolerance,
               top1_agreement=check.top1_agreement)
    timing = benchmark(path, model, plan.size, batch=plan.onnx_batch, repeats=plan.onnx_repeats, warmup=2,
                       provider=choice, fp16=fp16, session=session)
    row.update(eager_device=timing.torch_device, eager_ms=timing.torch_ms, ort_ms=timing.ort_ms,
               ort_over_eager=timing.ort_ms / timing.torch_ms)


def _images(plan):
    import torch

    return torch.randn(plan.onnx_batch, 3, plan.size, plan.size, generator=torch.Generator().manual_seed(2))


def _eager_logits(model, x, fp16: bool, device):
    """Eager PyTorch in the exported precision, on the provider's side of the machine, no TF32."""
    import torch

    from ccnn_convert.export.verification import exact_cuda_math

    dtype = torch.float16 if fp16 else torch.float32
    where = device if device.type == "cuda" else torch.device("cpu")
    reference = copy.deepcopy(model).to(device=where, dtype=dtype).eval()
    with torch.no_grad(), exact_cuda_math():
        return reference(x.to(where, dtype)).float().cpu()



def _line(row: dict) -> str:
    if row.get("error") or row.get("skipped"):
        return row.get("error") or f"skipped ({row['skipped']})"
    return (f"eager {row['eager_ms']:.3g} ms, ORT {row['ort_ms']:.3g} ms, max rel {row['max_rel']:.2e} "
            f"({'ok' if row['parity_ok'] else 'over'} {row['tolerance']:g})")
