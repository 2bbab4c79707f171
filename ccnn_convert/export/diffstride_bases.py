"""DiffStride with frozen strides as matrix products, for ONNX export at a static size.

In eval mode a :class:`~ccnn_convert.core.diffstride.DiffStride2d` layer's strides are fixed, so
for a given input size ``H x W`` the layer (FFT, mask, crop, inverse FFT) is a fixed linear map
from ``H x W`` to ``h x w`` maps. Like spectral pooling (:mod:`.spectral_bases`) it is a short sum
of separable terms, ``y = sum_r A_r x B_r^T`` (``A_r``: ``h x H``, ``B_r``: ``w x W``), which
exports as ``MatMul`` nodes with constant bases instead of ONNX ``DFT`` nodes.

The bases are *measured from the layer's own forward* (float64), never re-derived from its
definition, so a change of the layer's convention (Nyquist handling, odd sizes, ramp) is followed
automatically:

1. the row space: the layer applied to ``e_i g^T`` (one-hot rows ``i``, random columns ``g``)
   gives ``sum_r A_r[:, i] (B_r g)^T``; an SVD of those outputs spans every ``A_r``. The same
   with the axes swapped spans every ``B_s``;
2. the coupling: ``L(x) = sum_{r,s} C_rs A_r x B_s^T`` is solved for ``C`` by least squares on
   random inputs, then folded into ``B`` (one term per row basis vector);
3. the check: the matrix form against the layer on fresh random inputs; a layer that is not such
   a sum (or not linear) is an :class:`~ccnn_convert.errors.ExportError`, never a silent change.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..core.diffstride import DiffStride2d, diffstride_layers
from ..errors import ExportError

__all__ = ["MatrixDiffStride", "SeparableMap", "separable_terms", "with_matrix_diffstride"]

_RANK_TOLERANCE = 1e-10  # singular values below this fraction of the largest are rounding
_CHECK_TOLERANCE = 1e-9  # float64: relative to the largest output value
_PROBES = 2  # random vectors per axis: the spans need only one generic one; two for margin


def _apply(layer: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return layer(x)


def _span(layer: nn.Module, size: tuple[int, int], axis: int, generator: torch.Generator) -> Tensor:
    """An orthonormal basis (columns, ``out x size[axis]`` flattened) of every term's matrix on
    ``axis`` (0: the ``A_r``, 1: the ``B_s``), from the layer's outputs on one-hot probes."""
    length, other = size[axis], size[1 - axis]
    blocks = []
    for _ in range(_PROBES):
        g = torch.randn(other, dtype=torch.float64, generator=generator)
        probes = torch.eye(length, dtype=torch.float64)[:, :, None] * g[None, None, :]  # e_i g^T
        if axis == 1:
            probes = probes.transpose(1, 2)  # g e_j^T
        out = _apply(layer, probes[:, None])[:, 0]  # (length, h, w): column i holds A_r[:, i] (...)
        out = out.permute(1, 0, 2) if axis == 0 else out.permute(2, 0, 1)  # (out_axis, length, out_other)
        blocks.append(out.reshape(-1, out.shape[-1]))
    u, s, _ = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    rank = int((s > _RANK_TOLERANCE * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    return u[:, :rank]


def separable_terms(layer: nn.Module, size: tuple[int, int], seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """``[(A_r, B_r)]`` (float64) with ``layer(x) == sum_r A_r @ x @ B_r.T`` for every ``x`` of
    ``size``, measured from ``layer``'s forward (eval mode, float64) and checked; ExportError if
    the layer is not such a map."""
    layer = copy.deepcopy(layer).double().eval()
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    h, w = _apply(layer, torch.zeros(1, 1, height, width, dtype=torch.float64)).shape[-2:]
    rows = _span(layer, size, 0, generator).T.reshape(-1, h, height)  # (R, h, H)
    columns = _span(layer, size, 1, generator).T.reshape(-1, w, width)  # (S, w, W)
    coupling = _coupling(layer, rows, columns, size, generator)  # (R, S)
    terms = [(rows[r], torch.einsum("s,swW->wW", coupling[r], columns)) for r in range(rows.shape[0])]
    _check(layer, terms, size, generator)
    return terms


def _coupling(layer: nn.Module, rows: Tensor, columns: Tensor, size: tuple[int, int],
              generator: torch.Generator) -> Tensor:
    """``C`` with ``L(x) = sum_rs C_rs A_r x B_s^T``, by least squares on random inputs."""
    unknowns = rows.shape[0] * columns.shape[0]
    count = max(2, unknowns // (rows.shape[1] * columns.shape[1]) + 2)
    x = torch.randn(count, *size, dtype=torch.float64, generator=generator)
    target = _apply(layer, x[:, None])[:, 0]  # (n, h, w)
    design = torch.einsum("rhH,nHW,swW->nhwrs", rows, x, columns).reshape(-1, unknowns)
    solution = torch.linalg.lstsq(design, target.reshape(-1, 1)).solution
    return solution.reshape(rows.shape[0], columns.shape[0])


def _check(layer: nn.Module, terms: list[tuple[Tensor, Tensor]], size: tuple[int, int],
           generator: torch.Generator) -> None:
    x = torch.randn(3, 2, *size, dtype=torch.float64, generator=generator)
    expected = _apply(layer, x)
    got = sum(a @ x @ b.T for a, b in terms) if terms else torch.zeros_like(expected)
    scale = float(expected.abs().max()) or 1.0
    error = float((got - expected).abs().max()) / scale
    if not error <= _CHECK_TOLERANCE:
        raise ExportError(f"{type(layer).__name__} ({layer.extra_repr()}) at {size[0]}x{size[1]} is not a sum of "
                          f"separable matrix products (relative difference {error:.3g}); cannot export it as MatMul")


class SeparableMap(nn.Module):
    """``sum_r A_r x B_r^T`` for ``x`` of shape ``(..., H, W)``, with constant bases."""

    def __init__(self, terms: list[tuple[Tensor, Tensor]], dtype: torch.dtype = torch.float32):
        super().__init__()
        self.count = len(terms)
        for index, (rows, columns) in enumerate(terms):
            self.register_buffer(f"rows_{index}", rows.to(dtype).contiguous())
            self.register_buffer(f"columns_t_{index}", columns.T.to(dtype).contiguous())

    def forward(self, x: Tensor) -> Tensor:
        y = None
        for index in range(self.count):
            term = torch.matmul(getattr(self, f"rows_{index}"), torch.matmul(x, getattr(self, f"columns_t_{index}")))
            y = term if y is None else y + term
        return y

    def extra_repr(self) -> str:
        return f"{self.count} term(s)"


class MatrixDiffStride(nn.Module):
    """A frozen DiffStride layer as :class:`SeparableMap`s, one per input size it was seen at
    (a layer shared by a step's branches meets one size; the dispatch on the static size is
    resolved while tracing, so the exported graph holds the products only)."""

    def __init__(self, layer: DiffStride2d, sizes: list[tuple[int, int]]):
        super().__init__()
        self.description = layer.extra_repr()
        self.maps = nn.ModuleDict({f"{h}x{w}": SeparableMap(separable_terms(layer, (h, w))) for h, w in sizes})

    def forward(self, x: Tensor) -> Tensor:
        key = f"{x.shape[-2]}x{x.shape[-1]}"
        if key not in self.maps:
            raise ExportError(f"matrix DiffStride ({self.description}) was built for {', '.join(self.maps)}, "
                              f"not a {key} map")
        return self.maps[key](x)

    def extra_repr(self) -> str:
        return f"{self.description}; sizes {', '.join(self.maps)}"


def _input_sizes(model: nn.Module, names: list[str], input_size: tuple[int, int]) -> dict[str, list]:
    """Every input size each named DiffStride layer sees on one ``input_size`` image."""
    modules = dict(model.named_modules())
    sizes: dict[str, list] = {name: [] for name in names}

    def recorder(name):
        def hook(_module, args):
            size = tuple(int(s) for s in args[0].shape[-2:])
            if size not in sizes[name]:
                sizes[name].append(size)
        return hook

    handles = [modules[name].register_forward_pre_hook(recorder(name)) for name in names]
    parameter = next(model.parameters(), None)
    example = torch.zeros(1, 3, *input_size, device=parameter.device if parameter is not None else "cpu")
    try:
        _apply(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def with_matrix_diffstride(model: nn.Module, input_size: tuple[int, int]) -> tuple[nn.Module, int]:
    """``(copy, n)``: a copy of ``model`` (eval mode) whose ``n`` DiffStride layers are
    :class:`MatrixDiffStride` modules for the static ``input_size``; ``model`` itself when it has
    none. The copy computes the same function at that size (each map is checked against its
    layer) and exports to ``MatMul`` nodes instead of ``DFT``."""
    names = [name for name, _ in diffstride_layers(model)]
    if not names:
        return model, 0
    result = copy.deepcopy(model).eval()
    sizes = _input_sizes(result, names, input_size)
    replaced = 0
    for name in names:
        if not sizes[name]:
            continue  # not on the path of this input: nothing to export
        layer = result.get_submodule(name)
        parameter = next(layer.parameters())
        result.set_submodule(name, MatrixDiffStride(layer, sizes[name]).to(parameter.device))
        replaced += 1
    if hasattr(result, "recompile"):
        result.recompile()
    return result, replaced
