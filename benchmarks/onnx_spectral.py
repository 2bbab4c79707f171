"""ONNX Runtime on CPU: spectral pooling through the DFT operator or as matrix products.

Fixed spectral pooling at a static size can be exported two ways: ``torch.fft.rfft2/irfft2``
become ONNX ``DFT`` nodes, or the layer is replaced by products with fixed DFT bases
(:class:`ccnn_convert.export.spectral_bases.MatrixSpectralPool`, ``MatMul`` nodes). This
script times both in ONNX Runtime (and PyTorch eager), per layer at the sizes of
efficientnet_lite0's subsampling steps and, with ``--model``, for the whole converted model,
and checks each against eager (max abs difference).

    python benchmarks/onnx_spectral.py --threads 1
    python benchmarks/onnx_spectral.py --threads 1 --model efficientnet_lite0 --batch 4
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

from ccnn_convert.core.spectral import spectral_pool
from ccnn_convert.export.spectral_bases import matrix_form

# (channels, input side, output side): the stride-1 map entering each of efficientnet_lite0's
# five spectral pooling layers at 224 px, and where it must go.
LITE0_LAYERS = ((32, 223, 112), (96, 112, 56), (144, 56, 28), (240, 28, 14), (672, 14, 7))


class FFTPool(nn.Module):
    def __init__(self, out: int):
        super().__init__()
        self.out = out

    def forward(self, x):
        return spectral_pool(x, (self.out, self.out))


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
        fft, matrix = FFTPool(out).eval(), matrix_form((side, side), (out, out)).eval()
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [f"batch {args.batch}, {args.threads} thread(s), median of {args.repeats}; torch {torch.__version__}", ""]
    lines += layer_rows(args.batch, args.threads, args.repeats)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
