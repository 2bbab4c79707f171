"""Fixed spectral pooling as matrix products, for ONNX export at a static size.

Spectral pooling from ``H x W`` to ``h x w`` (:func:`ccnn_convert.core.spectral.spectral_pool`) is
a fixed linear map in either convention (:data:`~ccnn_convert.core.spectral.CONVENTIONS`): the
rfft2, the crop to the lowest frequencies (the Nyquist row as the convention says) and the
inverse. Like frozen DiffStride it is a short sum of separable terms ``sum_r A_r x B_r^T``
(``A_r``: ``h x H``, ``B_r``: ``w x W``): one term when the crop needs no Nyquist row or column,
two otherwise. The bases are measured from ``spectral_pool`` itself, in the convention the
converted graph holds, by :func:`~.diffstride_bases.separable_terms` (the derivation the DiffStride
export uses), so each convention's crop and output size are followed as ``spectral_pool`` computes
them.

:class:`MatrixSpectralPool` computes that with ``matmul`` only, so the exported ONNX graph holds
``MatMul`` nodes with constant bases instead of ``DFT`` nodes. :func:`matrix_form` builds it for a
given size and convention and checks it against ``spectral_pool`` (float64, random input) before use.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..core.spectral import Convention, check_convention, spectral_pool
from ..errors import ExportError
from .diffstride_bases import SeparableMap, separable_terms

__all__ = ["MatrixSpectralPool", "SpectralPoolMap", "matrix_form", "with_matrix_spectral_pooling"]

_CHECK_TOLERANCE = 1e-9  # float64: the bases are exact to rounding


class SpectralPoolMap(nn.Module):
    """``spectral_pool(x, out, convention)`` as a module: the map whose bases are measured."""

    def __init__(self, out: tuple[int, int], convention: Convention):
        super().__init__()
        check_convention("SpectralPoolMap", convention)
        self.out, self.convention = tuple(out), convention

    def forward(self, x: Tensor) -> Tensor:
        return spectral_pool(x, self.out, self.convention)

    def extra_repr(self) -> str:
        return f"out={self.out[0]}x{self.out[1]}, convention={self.convention}"


class MatrixSpectralPool(SeparableMap):
    """``spectral_pool(x, out, convention)`` for ``x`` of a fixed ``size``, as ``sum_r A_r x B_r^T``
    (``terms``: the measured bases, measured here when not given)."""

    def __init__(self, size: tuple[int, int], out: tuple[int, int], convention: Convention,
                 dtype: torch.dtype = torch.float32, terms: list[tuple[Tensor, Tensor]] | None = None):
        check_convention("MatrixSpectralPool", convention)
        if terms is None:
            terms = separable_terms(SpectralPoolMap(out, convention), size)
        super().__init__(terms, dtype)
        self.size, self.out, self.convention = tuple(size), tuple(out), convention

    def extra_repr(self) -> str:
        return (f"{self.size[0]}x{self.size[1]} -> {self.out[0]}x{self.out[1]}, {self.convention}, "
                f"{self.count} term(s)")


def matrix_form(size: tuple[int, int], out: tuple[int, int], convention: Convention,
                dtype: torch.dtype = torch.float32) -> MatrixSpectralPool:
    """:class:`MatrixSpectralPool` for these sizes and convention, checked against ``spectral_pool`` first."""
    terms = separable_terms(SpectralPoolMap(out, convention), size)
    exact = MatrixSpectralPool(size, out, convention, torch.float64, terms)
    x = torch.randn(2, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = spectral_pool(x, out, convention)
    got = exact(x)
    error = float((got - expected).abs().max()) if got.shape == expected.shape else float("inf")
    if not error <= _CHECK_TOLERANCE:
        raise ExportError(f"matrix spectral pooling {size} -> {out} ({convention}) differs from spectral_pool "
                          f"by {error:.3g}")
    return MatrixSpectralPool(size, out, convention, dtype, terms)


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


def _convention(node: fx.Node) -> Convention:
    """The convention the graph's ``spectral_downsample`` call holds (bound when it was converted)."""
    return node.args[2] if len(node.args) > 2 else node.kwargs["convention"]


def with_matrix_spectral_pooling(model: nn.Module, input_size: tuple[int, int]) -> tuple[nn.Module, int]:
    """``(copy, n)``: a copy of the converted ``model`` (eval mode) whose ``n`` spectral pooling
    calls are :class:`MatrixSpectralPool` modules for the static ``input_size``, each in the
    convention its call holds; ``model`` itself when it has none. The copy computes the same
    function at that size (each basis is checked by :func:`matrix_form`) and exports to ``MatMul``
    nodes instead of ``DFT``."""
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
    replaced, forms = 0, {}
    for node in list(result.graph.nodes):
        if node.op != "call_function" or node.target not in targets:
            continue
        size, out = recorder.sizes[node.name]
        key = (size, out, _convention(node))
        if key not in forms:  # layers of the same sizes share one measurement
            forms[key] = matrix_form(*key)
        name = f"ccnn_matrix_spectral_{replaced}"
        result.add_submodule(name, copy.deepcopy(forms[key]).to(example.device))
        with result.graph.inserting_before(node):
            new = result.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        result.graph.erase_node(node)
        replaced += 1
    result.recompile()
    return result, replaced
