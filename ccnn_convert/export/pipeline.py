"""The export pipeline: resolve, convert, export, verify, optionally benchmark, then write.

:func:`export` is what ``ccnn-export`` runs; every stage is also public on its own.

1. **Resolve** the model (:func:`ccnn_convert.models.resolve_model` for a MODEL string, or an
   in-memory module) and **convert** it with one :class:`~ccnn_convert.spec.ConversionSpec`
   (:func:`conversion_spec`: explicit options, else an artifact's own conversion, else defaults).
2. **Export** with torch's dynamo exporter at a symbolic batch size, in the requested opset,
   without dead initializers (:func:`~ccnn_convert.export.exporter.export_onnx`).
3. **Verify** against PyTorch (:mod:`.verification`), and **benchmark** when asked.

Everything is written inside :func:`ccnn_convert.outputs.staged_directory`: the files appear at
the output path only when every stage succeeded, and an interrupt (Ctrl-C, or SIGTERM in the
commands) or a failed verification leaves nothing behind.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import DataError, ParameterError
from ..models import Preprocessing, ResolvedModel, resolve_model
from ..core.options import check_seed
from ..models.preprocessing import check_image_side
from ..outputs import check_output, staged_directory
from ..spec import MODES, ORIGINAL, ConversionSpec, check_options_used
from .exporter import DEFAULT_OPSET, OnnxInfo, export_onnx
from .metadata import build_metadata, scale_to_crop
from .opset import check_opset
from .diffstride_bases import with_matrix_diffstride
from .spectral_bases import with_matrix_spectral_pooling
from ..core.phc import dense_copy
from .sessions import ProviderChoice, create_session, select_provider
from .verification import (BenchmarkOptions, BenchmarkResult, Verification, VerificationFailed, VerifyOptions,
                           benchmark as run_benchmark, verify as run_verification)

__all__ = ["ExportResult", "conversion_spec", "export", "load_images"]

logger = logging.getLogger(__name__)

_DEFAULT_MODE = "checkered"


@dataclass
class ExportResult:
    """What :func:`export` wrote and measured."""

    path: Path
    name: str
    mode: str
    info: OnnxInfo
    metadata: dict[str, str]
    provider: ProviderChoice | None
    verification: Verification | None
    benchmark: BenchmarkResult | None
    notes: list[str] = field(default_factory=list)


def conversion_spec(mode: str | None, base: ConversionSpec | None = None, *, sampler: str | None = None,
                    keep_first: int | None = None, density: int | None = None, seed: int | None = None,
                    leaf_modules: Sequence[str] | None = None, edges: str | None = None,
                    dilation: str | None = None, smoothness: float | None = None,
                    blur_size: int | None = None, resample_at: str | None = None,
                    spectral_convention: str | None = None, phc: int | None = None) -> ConversionSpec | None:
    """The conversion to export: ``None`` for the original model, else a ConversionSpec.

    ``mode`` defaults to ``base``'s (an artifact's) mode, then to checkered. Options given here
    win over ``base``'s (see :meth:`ConversionSpec.build`). An option that would do nothing (any
    with mode original, a checkered-only one with another mode) is a ParameterError naming it.
    """
    mode = str(mode).strip().lower() if mode is not None else (base.mode if base is not None else _DEFAULT_MODE)
    if mode not in MODES:
        raise ParameterError("mode", f"{{param}}: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    options = dict(sampler=sampler, keep_first=keep_first, density=density, seed=seed,
                   leaf_modules=leaf_modules or None, edges=edges, dilation=dilation, smoothness=smoothness,
                   blur_size=blur_size, resample_at=resample_at, spectral_convention=spectral_convention, phc=phc)
    if mode == ORIGINAL:
        given = [name for name, value in options.items() if value is not None]
        if given:
            raise ParameterError(given[0], "{param} does nothing with mode original (the unconverted model)")
        return None
    check_options_used([mode], sampler=sampler, density=density, seed=seed, edges=edges, dilation=dilation,
                       smoothness=smoothness, blur_size=blur_size, resample_at=resample_at,
                       spectral_convention=spectral_convention, keep_first=keep_first, phc=phc)
    return ConversionSpec.build(mode, base=base, **options)


def export(model: str | nn.Module | ResolvedModel, output: str | os.PathLike | None = None, *,
           mode: str | None = None, sampler: str | None = None, keep_first: int | None = None,
           density: int | None = None, seed: int | None = None, leaf_modules: Sequence[str] | None = None,
           edges: str | None = None, dilation: str | None = None, smoothness: float | None = None,
           blur_size: int | None = None, resample_at: str | None = None, spectral_convention: str | None = None,
           phc: int | None = None, weights: str | None = "DEFAULT", arch: str | None = None, trust_factory: bool = False,
           preprocessing: Mapping[str, Any] | None = None, input_size: int | None = None,
           opset: int = DEFAULT_OPSET, fp16: bool = False, provider: str = "auto", threads: int | None = None,
           verify: VerifyOptions | None = VerifyOptions(), benchmark: BenchmarkOptions | None = None,
           force: bool = False) -> ExportResult:
    """Resolve, convert, export, verify (and optionally benchmark) ``model``; see the module docstring.

    ``model`` is a MODEL string (resolved with ``weights``, ``arch``, ``preprocessing``
    overrides and ``trust_factory``), an nn.Module (ImageNet preprocessing unless overridden)
    or a ResolvedModel. The conversion comes from ``mode`` and the conversion options
    (:func:`conversion_spec`). ``output`` defaults to ``<name>_<mode>[_fp16].onnx``.
    ``verify=None`` skips verification; ``benchmark=None`` (the default) skips the benchmark.
    Raises CCNNError/ParameterError with a one-line message; on any failure nothing is left at
    ``output``.
    """
    opset = check_opset(opset)
    _check_run_options(threads, input_size, provider, verify, benchmark)
    if seed is not None:
        check_seed(seed)  # before the model is loaded
    if output is not None:
        check_output(output, force=force)  # fail before the slow part
    if verify is not None and verify.data is not None:
        _check_folder(verify.data)
    resolved = _resolve(model, weights, arch, preprocessing, trust_factory)
    spec = conversion_spec(mode, resolved.conversion, sampler=sampler, keep_first=keep_first, density=density,
                           seed=seed, leaf_modules=leaf_modules, edges=edges, dilation=dilation,
                           smoothness=smoothness, blur_size=blur_size, resample_at=resample_at,
                           spectral_convention=spectral_convention, phc=phc)
    mode = spec.mode if spec is not None else ORIGINAL
    path = check_output(output if output is not None else _default_output(resolved.name, mode, fp16), force=force)
    choice = select_provider(provider) if (verify is not None or benchmark is not None) else None
    prep, size, notes = _input_size(resolved.preprocessing, input_size)
    images = load_images(verify.data, prep, verify.data_limit) if verify is not None and verify.data else None
    torch_model = _build(resolved, spec, size)
    metadata = build_metadata(name=resolved.name, weights=resolved.weights, conversion=spec, input_size=size,
                              preprocessing=prep, num_classes=resolved.num_classes,
                              dtype="float16" if fp16 else "float32", opset=opset,
                              class_names=resolved.class_names)
    with staged_directory(path, force=force) as staged:
        info = _write(torch_model, staged, size, opset, metadata, fp16)
        verification, bench = _check(staged, torch_model, size, choice, images, fp16, threads, verify, benchmark)
    info.path = path
    return ExportResult(path, resolved.name, mode, info, metadata, choice, verification, bench, notes)


def _check_run_options(threads, input_size, provider, verify, benchmark) -> None:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ParameterError("threads", f"{{param}} must be a positive integer, got {threads!r}")
    if input_size is not None:
        check_image_side(input_size, "input_size")
    if verify is None and benchmark is None:
        if str(provider).lower() != "auto":
            logger.warning("provider %s is not used: no verification and no benchmark run", provider)
        if threads is not None:
            logger.warning("threads is not used: no verification and no benchmark run")


def _resolve(model, weights, arch, preprocessing, trust_factory: bool) -> ResolvedModel:
    if isinstance(model, (nn.Module, ResolvedModel)):
        if arch is not None or trust_factory:
            name = "arch" if arch is not None else "trust_factory"
            raise ParameterError(name, "{param} applies to MODEL strings only, not to an in-memory model")
        resolved = ResolvedModel.from_module(model) if isinstance(model, nn.Module) else model
        if preprocessing:
            resolved = dataclasses.replace(
                resolved, preprocessing=resolved.preprocessing.with_overrides(**dict(preprocessing)))
        return resolved
    logger.info("resolving %s...", model)
    return resolve_model(str(model), weights=weights, arch=arch, preprocessing=dict(preprocessing or {}) or None,
                         trust_factory=trust_factory)


def _input_size(preprocessing: Preprocessing, input_size: int | None) -> tuple[Preprocessing, int, list[str]]:
    """(preprocessing, size, notes): the exported input size; another size than the preset crop
    moves the crop (and the resize, proportionally) so the metadata stays consistent."""
    if input_size is None or input_size == preprocessing.crop:
        return preprocessing, preprocessing.crop, []
    scaled = scale_to_crop(preprocessing, input_size)
    note = (f"input size {input_size}: preprocessing crop {preprocessing.crop} -> {input_size}, "
            f"resize {preprocessing.resize} -> {scaled.resize}")
    return scaled, input_size, [note]


def _build(resolved: ResolvedModel, spec: ConversionSpec | None, size: int) -> nn.Module:
    if spec is None:
        return resolved.model.eval()
    logger.info("converting (%s, %s)...", spec.mode, spec.describe())
    return resolved.converted(spec, size)  # with an artifact's learned strides


def with_matrix_products(model: nn.Module, size: int) -> nn.Module:
    """``model`` for export at ``size``: fixed spectral pooling and frozen DiffStride as products
    with fixed bases (a copy; ``model`` itself when it has neither). ONNX Runtime runs those
    28-500x faster than its DFT operator on CPU (benchmarks/onnx_spectral.py). PHC layers become
    plain convolutions holding their materialised weight (the same numbers)."""
    exported, _ = with_matrix_spectral_pooling(model, (size, size))
    exported, _ = with_matrix_diffstride(exported, (size, size))
    return dense_copy(exported)


def _write(torch_model: nn.Module, staged: Path, size: int, opset: int, metadata: dict, fp16: bool) -> OnnxInfo:
    logger.info("exporting to ONNX opset %d (torch.export, dynamic batch)...", opset)
    start = time.perf_counter()
    # the verification below compares the file with torch_model itself, FFTs and all
    exported = with_matrix_products(torch_model, size)
    exported = copy.deepcopy(exported).half() if fp16 else exported  # the fp32 model stays the reference
    info = export_onnx(exported, staged, size, opset, metadata=metadata,
                       dtype=torch.float16 if fp16 else torch.float32)
    logger.info("exported %d nodes in %.1f s", info.nodes, time.perf_counter() - start)
    return info


def _check(staged: Path, torch_model: nn.Module, size: int, choice: ProviderChoice | None, images, fp16: bool,
           threads: int | None, verify: VerifyOptions | None, benchmark: BenchmarkOptions | None):
    """(verification, benchmark) of the staged file; VerificationFailed when they disagree."""
    if choice is None:
        return None, None
    verification = bench = None
    session = create_session(staged, choice, threads or torch.get_num_threads())
    if verify is not None:
        logger.info("verifying against PyTorch...")
        verification = run_verification(staged, torch_model, size, provider=choice, images=images, fp16=fp16,
                                        tolerance=verify.tolerance, session=session)
        if not verification.passed:
            raise VerificationFailed(verification)
    if benchmark is not None:
        logger.info("benchmarking at batch %d (%d interleaved repeats)...", benchmark.batch, benchmark.repeats)
        bench = run_benchmark(staged, torch_model, size, batch=benchmark.batch, repeats=benchmark.repeats,
                              warmup=benchmark.warmup, provider=choice, threads=threads, fp16=fp16, session=session)
    return verification, bench


def _default_output(name: str, mode: str, fp16: bool) -> Path:
    stem = re.sub(r"[^\w.-]+", "_", Path(name).stem if name.endswith((".pt", ".pth", ".py")) else name)
    return Path(f"{stem}_{mode}{'_fp16' if fp16 else ''}.onnx")


# -- real images for verification ---------------------------------------------------------------


def _check_folder(data: str | os.PathLike) -> Path:
    root = Path(data).expanduser()
    if not root.is_dir():
        raise ParameterError("data", f"{{param}} {root} is not a directory")
    return root


def load_images(data: str | os.PathLike, preprocessing: Preprocessing, limit: int = 32) -> torch.Tensor:
    """Up to ``limit`` images from an ImageFolder-style DIR (round-robin over class folders; a
    flat folder of images works too), prepared with ``preprocessing``. Unreadable files are
    skipped: verification uses the others."""
    from PIL import Image
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = _check_folder(data)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ParameterError("data_limit", f"{{param}} must be a positive integer, got {limit!r}")

    def images_in(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir()
                      if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMG_EXTENSIONS)

    groups = [images_in(d) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    groups = [g for g in groups if g] or [images_in(root)]
    order = [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]
    transform = preprocessing.transform()
    tensors = []
    for path in order:
        if len(tensors) == limit:
            break
        try:
            with Image.open(path) as image:
                tensors.append(transform(image.convert("RGB")))
        except Exception:  # PIL raises many types for a broken file; skipping it is the contract
            continue
    if not tensors:
        raise DataError(f"{root}: no readable images (ImageFolder layout DIR/<class>/<image>)")
    return torch.stack(tensors)
