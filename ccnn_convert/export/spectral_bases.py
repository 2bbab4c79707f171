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

import torch
from torch import Tensor, nn

from ..core.spectral import spectral_pool

__all__ = ["MatrixSpectralPool", "axis_basis", "matrix_form"]

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
        raise AssertionError(f"matrix spectral pooling {size} -> {out} differs from spectral_pool by {error:.3g}")
    return MatrixSpectralPool(size, out, dtype)
