"""ONNX Runtime on CPU: spectral pooling and DiffStride through the DFT operator or as matrix products.

Fixed spectral pooling and frozen DiffStride at a static size can be exported two ways:
``torch.fft.rfft2/irfft2`` become ONNX ``DFT`` nodes, or the layer is replaced by products with
fixed bases (:class:`ccnn_convert.export.spectral_bases.MatrixSpectralPool`,
:class:`ccnn_convert.export.diffstride_bases.MatrixDiffStride`: ``MatMul`` nodes). This script
times both in ONNX Runtime (and PyTorch eager), per spectral pooling layer at the sizes of
efficientnet_lite0's subsampling steps or, with ``--model``, for the whole model converted in
``--mode``, and checks each against eager (max abs difference relative to the largest logit).

    python benchmarks/onnx_spectral.py --threads 1
    python benchmarks/onnx_spectral.py --threads 1 --model efficientnet_lite0 --mode diffstride --batch 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ccnn_convert.core.spectral import MODE_CONVENTION, spectral_pool
from ccnn_convert.export.diffstride_bases import with_matrix_diffstride
from ccnn_convert.export.spectral_bases import matrix_form, with_matrix_spectral_pooling

# (channels, input side, output side): the stride-1 map entering each of efficientnet_lite0's
# five spectral pooling layers at 224 px, and where it must go.
LITE0_LAYERS = ((32, 223, 112), (96, 112, 56), (144, 56, 28), (240, 28, 14), (672, 14, 7))


class FFTPool(nn.Module):
    def __init__(self, out: int):
        super().__init__()
        self.out = out

    def forward(self, x):
        return spectral_pool(x, (self.out, self.out), MODE_CONVENTION)


def ort_session(module: nn.Module, example: torch.Tensor, threads: int):
    import onnxruntime as ort

    path = Path(tempfile.mkdtemp()) / "layer.onnx"
    info = _export_layer(module, example, path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]), info


def _export_layer(module: nn.Module, example: torch.Tensor, path: Path):
    program = torch.onnx.export(module, (example,), None, dynamo=True, opset_version=18, optimize=True,
                                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), verify=False,
                                report=False)
    program.save(str(path))
    return sorted({node.op_type for node in program.model_proto.graph.node})


def median_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def layer_rows(batch: int, threads: int, repeats: int) -> list[str]:
    rows = ["| channels | in -> out | eager FFT ms | ORT DFT ms | ORT MatMul ms | DFT / MatMul | max abs diff (DFT, MatMul) |",
            "|---:|---|---:|---:|---:|---:|---|"]
    for channels, side, out in LITE0_LAYERS:
        x = torch.randn(batch, channels, side, side, generator=torch.Generator().manual_seed(0))
        fft, matrix = FFTPool(out).eval(), matrix_form((side, side), (out, out), MODE_CONVENTION).eval()
        with torch.no_grad():
            reference = fft(x).numpy()
            eager = median_ms(lambda: fft(x), repeats)
        results = []
        for module in (fft, matrix):
            session, _ = ort_session(module, x, threads)
            feed = {session.get_inputs()[0].name: x.numpy()}
            results.append((median_ms(lambda: session.run(None, feed), repeats),
                            float(np.abs(session.run(None, feed)[0] - reference).max())))
        (dft_ms, dft_err), (mm_ms, mm_err) = results
        rows.append(f"| {channels} | {side} -> {out} | {eager:.2f} | {dft_ms:.2f} | {mm_ms:.2f} | "
                    f"{dft_ms / mm_ms:.2f} | {dft_err:.1e}, {mm_err:.1e} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def model_rows(name: str, mode: str, batch: int, threads: int, repeats: int) -> list[str]:
    """The whole model in ``mode``, exported with FFTs (DFT nodes) and with matrix products."""
    from ccnn_convert.export.exporter import export_onnx
    from ccnn_convert.export.sessions import create_session, run_session
    from ccnn_convert.models import resolve_model
    from ccnn_convert.spec import ConversionSpec

    resolved = resolve_model(name)
    size = resolved.preprocessing.crop
    model = resolved.converted(ConversionSpec(mode=mode), size).eval()
    began = time.perf_counter()
    matrix, _ = with_matrix_spectral_pooling(model, (size, size))
    matrix, replaced = with_matrix_diffstride(matrix, (size, size))
    bases_s = time.perf_counter() - began
    print(f"{name} {mode}: {replaced} DiffStride layer(s) swapped, bases built in {bases_s:.1f} s",
          file=sys.stderr, flush=True)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x).numpy()
    runs, facts = {"eager": lambda: model(x)}, {}
    for form, module in (("DFT", model), ("MatMul", matrix)):
        path = Path(tempfile.mkdtemp()) / f"{form}.onnx"
        began = time.perf_counter()
        info = export_onnx(module, path, size)
        session = create_session(path, threads=threads)
        error = float(np.abs(run_session(session, x) - reference).max() / np.abs(reference).max())
        facts[form] = (info.op_counts.get("DFT", 0), info.op_counts.get("MatMul", 0), time.perf_counter() - began,
                       error)
        runs[form] = lambda session=session: run_session(session, x)
        print(f"{form}: exported with {facts[form][0]} DFT, {facts[form][1]} MatMul nodes in "
              f"{facts[form][2]:.0f} s; max rel diff from eager {error:.1e}", file=sys.stderr, flush=True)
    times = _interleaved(runs, repeats)
    rows = [f"{name} {mode}, {size}x{size}:", "",
            "| form | DFT nodes | MatMul nodes | export s | median ms | x eager | max rel diff from eager |",
            "|---|---:|---:|---:|---:|---:|---|",
            f"| PyTorch eager (FFTs) | - | - | - | {times['eager']:.0f} | 1 | - |"]
    for form, (dft, matmul, seconds, error) in facts.items():
        rows.append(f"| ONNX Runtime, {form} | {dft} | {matmul} | {seconds:.0f} | {times[form]:.0f} | "
                    f"{times[form] / times['eager']:.2f} | {error:.1e} |")
    return rows


def _interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Median ms of each run; every round runs each once, so machine drift hits all alike."""
    for run in runs.values():
        run()  # warm-up
    times = {label: [] for label in runs}
    with torch.no_grad():
        for _ in range(repeats):
            for label, run in runs.items():
                start = time.perf_counter()
                run()
                times[label].append(1000 * (time.perf_counter() - start))
    return {label: statistics.median(values) for label, values in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--model", help="time this whole model instead of the single layers")
    parser.add_argument("--mode", default="diffstride", choices=("spectral", "diffstride"),
                        help="the conversion of --model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"batch {args.batch}, {args.threads} thread(s), median of {args.repeats}; torch {torch.__version__}", ""]
    if args.model:
        lines += model_rows(args.model, args.mode, args.batch, args.threads, args.repeats)
    else:
        lines += layer_rows(args.batch, args.threads, args.repeats)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
