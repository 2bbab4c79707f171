"""Fixed spectral pooling as matrix products, for ONNX export at a static size.

Spectral pooling from ``H x W`` to ``h x w`` (:func:`ccnn_convert.core.spectral.spectral_pool`) is
a fixed linear map. Per axis it is the DFT, the crop to the ``h`` lowest frequencies and the
inverse DFT at ``h``: a complex ``h x H`` matrix ``A`` (built here by applying exactly those FFTs
to the identity), and the layer is ``Re(A x B^T)`` for ``B`` the same along the width. In real
arithmetic that is ``Ar x Br^T - Ai x Bi^T``: one separable term when a size is odd (the crop is
symmetric and ``A`` real), two when both output sizes are even (the Nyquist row and column).

:class:`MatrixSpectralPool` computes that with ``matmul`` only, so the exported ONNX graph holds
``MatMul`` nodes with constant bases instead of ``DFT`` nodes. :func:`matrix_form` builds it for a
given size and checks it against ``spectral_pool`` (float64, random input) before use.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..core.spectral import spectral_pool
from ..errors import ExportError

__all__ = ["MatrixSpectralPool", "axis_basis", "matrix_form", "with_matrix_spectral_pooling"]

_CHECK_TOLERANCE = 1e-9  # float64: the bases are exact to rounding


def axis_basis(size: int, out: int) -> Tensor:
    """The complex ``out x size`` matrix of one axis: FFT, keep the ``out`` lowest frequencies
    (``0 .. ceil(out/2)-1`` and the last ``floor(out/2)``), inverse FFT at ``out``; the
    ``norm="forward"`` pair, which keeps a constant constant. Built by transforming the identity."""
    identity = torch.eye(size, dtype=torch.complex128)
    if out >= size:
        return identity
    spectrum = torch.fft.fft(identity, dim=0, norm="forward")
    kept = [*range((out + 1) // 2), *range(size - out // 2, size)]
    return torch.fft.ifft(spectrum[kept], dim=0, norm="forward")


class MatrixSpectralPool(nn.Module):
    """``spectral_pool(x, (h, w))`` for ``x`` of a fixed ``(H, W)``, as ``Ar x Br^T - Ai x Bi^T``."""

    def __init__(self, size: tuple[int, int], out: tuple[int, int], dtype: torch.dtype = torch.float32):
        super().__init__()
        rows, columns = axis_basis(size[0], out[0]), axis_basis(size[1], out[1])
        self.size, self.out = tuple(size), tuple(out)
        self.register_buffer("rows_real", rows.real.to(dtype))
        self.register_buffer("columns_real_t", columns.real.T.contiguous().to(dtype))
        self.two_terms = bool(rows.imag.abs().max() > 0 and columns.imag.abs().max() > 0)
        if self.two_terms:
            self.register_buffer("rows_imag", rows.imag.to(dtype))
            self.register_buffer("columns_imag_t", (-columns.imag.T).contiguous().to(dtype))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.matmul(self.rows_real, torch.matmul(x, self.columns_real_t))
        if self.two_terms:
            y = y + torch.matmul(self.rows_imag, torch.matmul(x, self.columns_imag_t))
        return y

    def extra_repr(self) -> str:
        return f"{self.size[0]}x{self.size[1]} -> {self.out[0]}x{self.out[1]}, {2 if self.two_terms else 1} term(s)"


def matrix_form(size: tuple[int, int], out: tuple[int, int], dtype: torch.dtype = torch.float32) -> MatrixSpectralPool:
    """:class:`MatrixSpectralPool` for these sizes, checked against ``spectral_pool`` first."""
    exact = MatrixSpectralPool(size, out, torch.float64)
    x = torch.randn(2, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    error = float((exact(x) - spectral_pool(x, out)).abs().max())
    if not error <= _CHECK_TOLERANCE:
        raise ExportError(f"matrix spectral pooling {size} -> {out} differs from spectral_pool by {error:.3g}")
    return MatrixSpectralPool(size, out, dtype)


def _spectral_targets() -> tuple:
    from ..core.downsample import spectral_downsample

    return (spectral_downsample,)


class _SizeRecorder(fx.Interpreter):
    """Runs the graph once, noting the input and output size of every spectral pooling call."""

    def __init__(self, module: fx.GraphModule, targets: tuple):
        super().__init__(module)
        self.targets, self.sizes = targets, {}

    def call_function(self, target, args, kwargs) -> Any:
        out = super().call_function(target, args, kwargs)
        if target in self.targets:
            self.sizes[self.current_node_name] = (tuple(args[0].shape[-2:]), tuple(out.shape[-2:]))
        return out

    def run_node(self, node: fx.Node) -> Any:
        self.current_node_name = node.name
        return super().run_node(node)


def with_matrix_spectral_pooling(model: nn.Module, input_size: tuple[int, int]) -> tuple[nn.Module, int]:
    """``(copy, n)``: a copy of the converted ``model`` (eval mode) whose ``n`` spectral pooling
    calls are :class:`MatrixSpectralPool` modules for the static ``input_size``; ``model``
    itself when it has none. The copy computes the same function at that size (each basis is
    checked by :func:`matrix_form`) and exports to ``MatMul`` nodes instead of ``DFT``."""
    targets = _spectral_targets()
    if not isinstance(model, fx.GraphModule) or not any(
            node.op == "call_function" and node.target in targets for node in model.graph.nodes):
        return model, 0
    result = copy.deepcopy(model).eval()
    parameter = next(result.parameters(), None)
    example = torch.zeros(1, 3, *input_size, dtype=torch.float32,
                          device=parameter.device if parameter is not None else "cpu")
    recorder = _SizeRecorder(result, targets)
    with torch.no_grad():
        recorder.run(example)
    replaced = 0
    for node in list(result.graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        size, out = recorder.sizes[node.name]
        name = f"ccnn_matrix_spectral_{replaced}"
        result.add_submodule(name, matrix_form(size, out).to(example.device))
        with result.graph.inserting_before(node):
            new = result.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        result.graph.erase_node(node)
        replaced += 1
    result.recompile()
    return result, replaced
