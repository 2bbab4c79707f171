"""Rewrite the subsampling layers of a traced model into multisampling ones: the fx pass.

The pass, in data-flow order:

1. **Trace** the model twice (train and eval mode, as torchvision's feature extraction does),
   with user and registered leaf modules (:mod:`.tracing`).
2. **Propagate shapes** on meta tensors (no compute) to know which values are per-image feature
   maps and to catch inputs that are too small (:mod:`.tracing`).
3. **Find strided layers** (:mod:`.ops`) and **group them into steps**: strided layers whose
   outputs meet (residual add, concatenation) are one step, so parallel branches sample
   identically.
4. **Rewrite**: each converted step gets one :class:`~.layers.SubmapSampler` node feeding all its
   layers; the submap count of every value is tracked; global pools reduce over submaps (mean or
   max, as the pool does); submaps are averaged right before the first op that leaves the spatial
   feature map (flatten, view, linear on 2-D, ...), so the unchanged classifier sees one map per
   image.

Nothing is ignored in silence: a step left traditional, a ``keep_first`` beyond the last step and
a leaf that matches no module are logged as warnings and kept in :attr:`ConversionReport.warnings`.
"""

from __future__ import annotations

import inspect
import logging
from typing import Sequence

import torch
from torch import fx, nn

from . import layers
from ..errors import ConversionError, ParameterError
from .dilation import NativeDilationError, convert_native
from .edge_pass import apply_exact_edges
from .report import ConversionReport, LayerRecord, conversion_report
from .modes import MODES
from .options import CONVERSION_MODES, DILATIONS, EDGES, check_options, default_edges
from .phc import convert_phc
from .ops import ARG_NAMES, Strided, call_args, folded_batch_submaps, global_pool_kind, is_feature_map, step_converts, \
    strided_steps, tensor_meta, tensor_metas
from .tracing import trace_copy

__all__ = [
    "CONVERSION_MODES", "DILATIONS", "EDGES", "ConversionReport", "LayerRecord", "check_options",
    "conversion_report", "convert", "convert_multisample", "default_edges",
]

logger = logging.getLogger(__name__)



# --------------------------------------------------------------------------- API


def convert(
    model: nn.Module,
    mode: str = "checkered",
    sampler: str = "lattice",
    keep_first: int = 0,
    density: int | None = None,
    seed: int | None = None,
    example_input: torch.Tensor | None = None,
    leaf_modules: Sequence[type | str] = (),
    edges: str | None = None,
    dilation: str | None = None,
    smoothness: float | None = None,
    blur_size: int | None = None,
    resample_at: str | None = None,
    spectral_convention: str | None = None,
    phc: int | None = None,
    phc_init: str = "fit",
) -> fx.GraphModule:
    """Return a converted copy of ``model``; ``model`` itself is left untouched.

    Args:
        model: any torch.fx-traceable CNN taking ``(B, C, H, W)`` images.
        mode: one of :data:`~.modes.MODES`: ``"checkered"`` (k samples per k x k window,
            n-rooks), ``"dilated"`` (every sample: equal to removing the stride and dilating
            every later layer), ``"traditional"`` (nothing changes), ``"spectral"`` (stride 1,
            then fixed spectral pooling to the original size), ``"diffstride"`` (stride 1, then
            DiffStride's learnable spectral pooling) or ``"blurpool"`` (stride 1, then a
            binomial blur with the stride).
        sampler: sequence of samplers over submaps: ``"naive"``, ``"lattice"`` or ``"random"``.
        keep_first: the first N subsampling steps (in data-flow order) stay traditional.
        density: samples per window of checkered mode (1 = traditional, k*k = dilated).
        seed: makes the ``random`` sampler reproducible.
        example_input: an input for shape analysis (default ``(2, 3, 224, 224)``); the converted
            model still accepts any input size the original accepts.
        leaf_modules: module classes, class names or qualified names not to trace into (besides
            those registered with :func:`~ccnn_convert.core.register_notrace_module`).
        edges: ``"exact"``: samples outside the image are padding for every later layer
            (:mod:`.edges`); ``"reference"``: they are computed like the others, as the reference
            implementation does. Default: ``"reference"`` for checkered, ``"exact"`` for dilated
            (which is always exact).
        dilation: how ``mode="dilated"`` is computed: ``"multisample"`` (submaps) or ``"native"``
            (strides removed, later layers dilated: :func:`~ccnn_convert.core.dilation.convert_native`).
            Default: native, which is faster (``docs/results.md``), falling back to multisample
            (with a log line) where a dilation cannot express the model (a pool to a fixed size,
            tokens folded from the map).
        smoothness: DiffStride's mask ramp width R in frequency positions (default 4).
        blur_size: blurpool's binomial filter size, 1 to 7 (default 3).
        resample_at: where spectral, diffstride and blurpool put the downsampler: ``"layer"``
            (right after the strided layer run at stride 1) or ``"activation"`` (after its
            pointwise tail: norm, activation, dropout; :mod:`.placement`). Default
            :data:`~.placement.DEFAULT_RESAMPLE_AT`.
        spectral_convention: the Nyquist row of spectral and diffstride pooling at an even output
            size (:data:`~.spectral.CONVENTIONS`): ``"published"`` (input row ``-h/2``, as the
            published layers) or ``"symmetric"`` (the mean of rows ``+h/2`` and ``-h/2``).
            Default :data:`~.spectral.MODE_CONVENTION`, read now: the converted graph holds it.
        phc: every eligible convolution becomes a PHC layer with this many Kronecker products
            (:mod:`.phc`), before the mode's conversion, which converts PHC layers as the
            convolutions they are. ``None``: the convolutions stay dense.
        phc_init: how PHC layers start: ``"fit"`` (the nearest Kronecker sum of the pretrained
            weight) or ``"xavier"`` (the published random initialisation, to train from scratch).

    Returns:
        A ``torch.fx.GraphModule`` with the same parameters as ``model``: same names, and the
        very same tensors (shared, like torchvision's ``create_feature_extractor``; deep-copy
        ``model`` first if you fine-tune the result and want the original kept apart).
        Its :func:`conversion_report` says what was rewritten.
    """
    check_options(mode, sampler, keep_first, density, seed, edges, dilation, smoothness, blur_size, resample_at,
                  spectral_convention)
    if phc is not None:
        model, phc_report = convert_phc(model, phc, phc_init)
    elif phc_init != "fit":
        raise ParameterError("phc_init", "{param} initialises PHC layers; it does nothing without phc")
    options = dict(sampler=sampler, density=density, seed=seed, edges=edges, dilation=dilation,
                   smoothness=smoothness, blur_size=blur_size, resample_at=resample_at,
                   spectral_convention=spectral_convention)
    converter = MODES[mode].converter
    # check_options refused every option that does nothing for this mode; the converter takes the rest
    taken = {name: value for name, value in options.items() if name in inspect.signature(converter).parameters}
    converted = converter(model, mode=mode, keep_first=keep_first, example_input=example_input,
                          leaf_modules=leaf_modules, **taken)
    if phc is not None:
        conversion_report(converted).phc = phc_report
    return converted


def convert_multisample(model: nn.Module, mode: str, keep_first: int = 0, sampler: str = "lattice",
                        density: int | None = None, seed: int | None = None,
                        example_input: torch.Tensor | None = None, leaf_modules: Sequence[type | str] = (),
                        edges: str | None = None, dilation: str | None = None) -> fx.GraphModule:
    """:func:`convert` for checkered, dilated and traditional mode (options already checked)."""
    if mode == "dilated" and dilation != "multisample":
        try:
            return convert_native(model, keep_first=keep_first, example_input=example_input,
                                  leaf_modules=leaf_modules)
        except NativeDilationError as error:
            if dilation == "native":
                raise
            logger.info("%s: dilated mode uses multisample submaps instead", error.reason)
    report = ConversionReport(mode, sampler, keep_first, density, edges=default_edges(mode, edges),
                              dilation="multisample" if mode == "dilated" else None)
    traced = trace_copy(model, leaf_modules, example_input, report.warn)
    rewriter = _Rewriter(traced.root, dict(traced.root.named_modules()), report, seed)
    traced.rewrite_each(rewriter.rewrite)
    if mode != "traditional":  # traditional converts nothing by design
        report.warn_if_nothing_converted()
    return traced.graph_module(f"Checkered{type(model).__name__}", model.training, {"ccnn_report": report})


# --------------------------------------------------------------------------- the rewrite


class _Rewriter:
    """Rewrites the train and eval graphs of one model, sharing replaced modules and samplers."""

    def __init__(self, root: nn.Module, originals: dict[str, nn.Module], report: ConversionReport,
                 seed: int | None):
        self.root, self.originals, self.report, self.seed = root, originals, report, seed

    def rewrite(self, graph: fx.Graph, record: bool) -> None:
        batch, strided, steps = strided_steps(graph, self.originals)
        plan = self._plan(steps)
        submaps = self._propagate(graph, batch, strided, plan, record)
        if plan and self.report.edges == "exact":
            apply_exact_edges(graph, self.root, self.report.warn)
        if record:
            self.report.steps = len(steps)
            self.report.final_submaps = max(submaps.values(), default=1)
            for index, members in enumerate(steps, start=1):
                for member in members:
                    self._record(member, index, plan, submaps)

    # -- which steps convert, with how many samples

    def _plan(self, steps: list[list[Strided]]) -> dict[fx.Node, tuple[int, int, int]]:
        """Map each converted strided node to (step index, stride k, samples n)."""
        plan = {}
        for index, members in enumerate(steps, start=1):
            samples = self._samples(members, index)
            if samples is None:
                continue
            for member in members:
                plan[member.node] = (index, member.stride[0], samples)
        return plan

    def _samples(self, members: list[Strided], index: int) -> int | None:
        if self.report.mode == "traditional" or not step_converts(members, index, self.report.keep_first,
                                                                  self.report.warn):
            return None
        k = members[0].stride[0]
        n = self.report.density or (k * k if self.report.mode == "dilated" else k)
        if n > k * k:
            raise ConversionError(f"density {n} is more than the {k * k} positions of a stride-{k} window")
        return None if n == 1 else n

    # -- submap bookkeeping over the graph

    def _propagate(self, graph: fx.Graph, batch: set[fx.Node], strided: dict[fx.Node, Strided],
                   plan: dict[fx.Node, tuple[int, int, int]], record: bool) -> dict[fx.Node, int]:
        submaps: dict[fx.Node, int] = {}
        samplers: dict[int, fx.Node] = {}
        reduced: dict[fx.Node, fx.Node] = {}
        first = next(n for n in graph.nodes if n.op != "placeholder")
        for node in list(graph.nodes):
            if node.op == "placeholder":
                submaps[node] = 1
                continue
            if node not in batch:
                continue
            inputs = [arg for arg in node.all_input_nodes if arg in submaps]
            if node.op == "output":
                for arg in inputs:
                    if submaps[arg] > 1:
                        node.replace_input_with(arg, self._reduce(graph, arg, submaps, reduced, "mean", record))
                continue
            if node in plan:
                index, k, n = plan[node]
                source = inputs[0]
                if index not in samplers:
                    samplers[index] = self._sampler_node(graph, first, index, submaps[source], k, n)
                self._replace_strided(node, strided[node], samplers[index])
                submaps[node] = submaps[source] * n
                continue
            if tensor_metas(node) is None:
                # size(), shape, dim(): metadata reads of a submapped tensor stay as they are. A
                # read of its batch size counts every submap (S*B): a tensor made from it (a drop
                # path's random mask) already has S submaps, one draw per submap.
                folded = folded_batch_submaps(node, submaps)
                if folded > 1:
                    submaps[node] = folded
                continue
            pool = global_pool_kind(node, self.originals)
            count = max((submaps[arg] for arg in inputs), default=1)
            if pool and count > 1:
                submaps[node] = count
                users = list(node.users)
                reduction = self._reduce(graph, node, submaps, reduced, pool, record)
                for user in users:
                    user.replace_input_with(node, reduction)
                continue
            if count > 1 and not is_feature_map(node):
                # The value leaves the spatial feature map: average the submaps first.
                for arg in inputs:
                    if submaps[arg] > 1 and tensor_metas(arg):
                        node.replace_input_with(arg, self._reduce(graph, arg, submaps, reduced, "mean", record))
                submaps[node] = 1
                continue
            self._align(graph, node, inputs, submaps, count)
            submaps[node] = count
        return submaps

    def _align(self, graph: fx.Graph, node: fx.Node, inputs: list[fx.Node], submaps: dict[fx.Node, int],
               count: int) -> None:
        """Give one-map-per-image inputs (after a global pool) to every submap of the others."""
        counts = {submaps[arg] for arg in inputs if tensor_metas(arg)}
        if len(counts - {1}) > 1:
            raise ConversionError(
                f"submap layouts do not match at {node.name} ({sorted(counts)} submaps); "
                "this architecture joins feature maps from different subsampling steps")
        for arg in inputs:
            if submaps[arg] == 1 and count > 1 and tensor_metas(arg):
                with graph.inserting_before(node):
                    repeated = graph.call_function(layers.submap_repeat, (arg, count))
                repeated.meta = dict(arg.meta)
                submaps[repeated] = count
                node.replace_input_with(arg, repeated)

    def _reduce(self, graph: fx.Graph, node: fx.Node, submaps: dict[fx.Node, int],
                reduced: dict[fx.Node, fx.Node], kind: str, record: bool) -> fx.Node:
        if node not in reduced:
            function = layers.submap_mean if kind == "mean" else layers.submap_amax
            with graph.inserting_after(node):
                reduced[node] = graph.call_function(function, (node, submaps[node]))
            reduced[node].meta = dict(node.meta)
            submaps[reduced[node]] = 1
            if record:
                self.report.averaged_at.append(f"{node.name} ({kind} of {submaps[node]} submaps)")
        return reduced[node]

    def _sampler_node(self, graph: fx.Graph, first: fx.Node, index: int, submaps: int, k: int, n: int) -> fx.Node:
        name = f"ccnn_sampler_step{index}"
        kind = "naive" if n == k * k else self.report.sampler
        seed = None if self.seed is None else self.seed + index
        existing = getattr(self.root, name, None)
        if existing is None:
            self.root.add_module(name, layers.SubmapSampler(kind, submaps, k, n, seed))
        elif (existing.submaps, existing.stride, existing.samples) != (submaps, k, n):
            raise ConversionError(f"train and eval graphs disagree at subsampling step {index}")
        with graph.inserting_before(first):
            return graph.create_node("call_module", name)  # the module lives on the root, not the graph's owner

    def _replace_strided(self, node: fx.Node, strided: Strided, sampler: fx.Node) -> None:
        x = node.args[0] if node.args else node.kwargs["input"]
        if node.op == "call_module":
            replacements = layers.MULTISAMPLE_MODULES
            current = self.root.get_submodule(node.target)
            if not isinstance(current, tuple(replacements.values())):
                # a layer that builds its weight (PHC) makes its own multisample form
                replaced = (current.multisample() if hasattr(current, "multisample")
                            else replacements[strided.op](current))
                self.root.set_submodule(node.target, replaced)
            node.args, node.kwargs = (x, sampler), {}
            return
        args = call_args(node, strided.op)
        names = [name for name in ARG_NAMES[strided.op][1:] if name != "return_indices"]
        node.target = layers.MULTISAMPLE_FUNCTIONS[strided.op]
        node.args = (x, sampler, *(args[name] for name in names))
        node.kwargs = {}

    def _record(self, member: Strided, step: int, plan: dict, submaps: dict[fx.Node, int]) -> None:
        node = member.node
        source = node.args[0] if node.args else None
        submaps_in = submaps.get(source, 1) if isinstance(source, fx.Node) else 1
        out = tensor_meta(node)
        note = member.unsupported or ("(keep_first)" if step <= self.report.keep_first
                                      and self.report.mode != "traditional" else "")
        self.report.layers.append(LayerRecord(
            name=member.name, op=member.op, kernel=member.kernel, stride=member.stride, step=step,
            converted=node in plan, submaps_in=submaps_in, submaps_out=submaps.get(node, submaps_in),
            output_size=tuple(out.shape[2:]) if out is not None else (), note=note))
