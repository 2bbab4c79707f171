"""Does distillation from the original win back what conversion costs? Cross-validated on the
shared ImageNet sample, efficientnet_lite0, checkered (lattice) at keep_first 0 and 3 (or
another ``--mode``).

The 250 images (one per class) are split by image, with a seed, into two folds. For each fold,
the other fold's images serve as *unlabelled* training data (a flat folder of symlinks: the class
folders are not seen), and the fold itself is evaluated; then the folds swap, so every image is
evaluated once by a model that never saw it. For each keep_first it compares:

* ``original``: the pretrained model, unconverted;
* ``converted``: checkered, no training;
* ``recalibrated``: BatchNorm statistics re-estimated on the training fold (``recalibrate_model``,
  one pass, no gradient), of every BatchNorm (``all``) or only of those after the first converted
  step (``converted``);
* ``distilled norm+head`` and ``distilled all``: ``train_model(..., distill=DistillConfig())``,
  the unconverted model as the teacher, no held-back part (the other fold is the test); with
  ``--variants ...,norm+head-frozen,all-frozen`` also with ``freeze_norm_stats`` (every
  BatchNorm trains its affine against the pretrained running statistics, which stay);
* ``fm`` and ``fm-tta`` (issue 23): function matching, ``--distill``'s per-mode recipe
  (``distill_recipe(mode)``: strong crops + mixup on the tensor teacher and student share,
  norm+head, statistics frozen or not as the recipe says) for ``--fm-epochs``, with
  ``--fm-val-fraction`` of the training fold held back, as a user's run does: the row scores
  ``best.pt`` (the untrained conversion when no epoch beats it) and records the held-back
  agreement of every epoch (``agreement_by_epoch``: where it stops rising). ``fm-tta``'s
  teacher is the original averaged over flips and shifts (``teacher_tta=("flip", "shift")``).

* ``recipe``: ``--distill``'s recipe for the mode (and ``--phc``: ``distill_recipe(mode, phc)``,
  which trains the PHC layers' A and F besides norm+head), its recalibration rule first, for
  ``--epochs`` epochs on the whole training fold (no held-back part), scoring ``last.pt``.

``--phc N`` (issue 25) makes every row's convolutions PHC layers of N Kronecker products, fitted
to the pretrained weights: ``converted`` is the fit alone, ``recalibrated`` re-estimates the
statistics the fit moved (``auto``: measured against the dense original), the distilled rows
train from the fit, and the dense original stays the teacher and the reference. Its default
variants are ``converted,recalibrated,recipe``; ``--mode traditional`` is PHC alone (no step
converted, so ``--keep-first 0`` only)::

    python benchmarks/distill_lite0.py ../shared/data/imagenet-sample/val --threads 2 --phc 2 \
        --mode traditional --keep-first 0 --epochs 3 --json distill_phc2.json

Issue 23 added: ``--mode`` (any conversion mode), ``--device cuda``, the converted rows of a
resampling mode at each ``--resample-at`` placement (trained variants use the first), the
recalibrated rows by ``--recalibrate`` rule, ``*-recal`` distilled variants (``--recalibrate
auto`` before training; the others ``none``), ``fm-live``/``fm-frozen`` (function matching with
live or frozen statistics), ``--fm-augment``, and every row's shift-consistency (two seeded
random 224-px crops of the 256-px square per test image, as ``ccnn-eval --consistency``). The
JSON is rewritten after each fold.

Every variant is an artifact (``last.pt`` / the recalibrated ``.pt``), reloaded and evaluated here
on the test fold: top-1 against the folder labels, top-1 agreement with the original, and for the
trained ones the seconds and peak memory (process RSS high-water mark) of an epoch. Top-1 and
agreement are pooled over the two test folds (250 images). Run from the repository root::

    python benchmarks/distill_lite0.py ../shared/data/imagenet-sample/val --threads 2 \
        --keep-first 0,3 --epochs 0:1,3:3 --json distill_lite0.json
    python benchmarks/distill_lite0.py ../shared/data/imagenet-sample/val --threads 2 \
        --keep-first 3 --variants converted,fm,fm-tta --fm-epochs 20 --json distill_fm.json
    python benchmarks/distill_lite0.py ../shared/data/imagenet-sample/val --threads 2 --mode blurpool \
        --keep-first 0 --variants converted,recalibrated,fm,fm-tta --fm-epochs 20 --json distill_fm_blurpool.json

``--limit N`` uses N images only (a smoke test; say so when quoting numbers); a ``--batch-size``
above the images a fold trains on shrinks to them.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from ccnn_convert import use_huge_pages
from ccnn_convert.core.modes import RESAMPLING_MODES
from ccnn_convert.data import decode_rgb, wnid_to_index
from ccnn_convert.metrics import crops_at, shift_offsets
from ccnn_convert.outputs import atomic_path
from ccnn_convert.models import load_artifact, resolve_model
from ccnn_convert.spec import ConversionSpec
from ccnn_convert.train import TrainConfig, train_model
from ccnn_convert.train.calibrate import recalibrate_model
from ccnn_convert.train.distill import FUNCTION_MATCHING_EPOCHS, DistillConfig, distill_recipe
from ccnn_convert.train.unlabelled import find_images, held_back_split

MODEL = "efficientnet_lite0"
# distilled variants: --variants name -> (train_params, freeze_norm_stats)
DISTILLED = {"norm+head": ("norm+head", False), "all": ("all", False), "norm+head-frozen": ("norm+head", True),
             "all-frozen": ("all", True)}
# the same after --recalibrate auto (the statistics the conversion changed re-estimated first)
DISTILLED |= {f"{name}-recal": value for name, value in DISTILLED.items()}
RECIPE = "recipe"  # --distill's recipe of the mode and --phc, for --epochs epochs
# function matching: --variants name -> the teacher's test-time views
# (fm-live: the same with live BatchNorm statistics instead of the recipe's choice)
FUNCTION_MATCHING = {"fm": ((), None), "fm-tta": (("flip", "shift"), None), "fm-live": ((), False),
                     "fm-frozen": ((), True)}
VARIANTS = ("converted", "recalibrated", *DISTILLED, RECIPE, *FUNCTION_MATCHING)
DEFAULT_VARIANTS = "converted,recalibrated,norm+head,all"
PHC_VARIANTS = "converted,recalibrated,recipe"  # the default with --phc


def folds(root: Path, limit: int | None, seed: int) -> tuple[list[str], list[str]]:
    paths = find_images(root)
    order = torch.randperm(len(paths), generator=torch.Generator().manual_seed(seed)).tolist()
    if limit is not None:
        order = order[:limit]
    half = len(order) // 2
    return sorted(paths[i] for i in order[:half]), sorted(paths[i] for i in order[half:])


def flat_folder(paths: list[str], folder: Path) -> Path:
    """The training fold as an unlabelled flat folder (symlinks named so that no label shows)."""
    folder.mkdir(parents=True)
    for i, path in enumerate(paths):
        os.symlink(Path(path).resolve(), folder / f"{i:04d}{Path(path).suffix}")
    return folder


def test_batch(paths: list[str], preprocessing) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The test fold: centre crops, labels, and the uncropped squares the shift-consistency crops
    come from (as ``ccnn-eval --consistency``: resize, the resize x resize centre, two random crops)."""
    labels = wnid_to_index()
    decoded = [decode_rgb(p) for p in paths]
    images = torch.stack([preprocessing.transform()(image) for image in decoded])
    square = preprocessing.with_overrides(crop=preprocessing.resize).transform()
    uncropped = torch.stack([square(image) for image in decoded])
    return images, torch.tensor([labels[Path(p).parent.name] for p in paths]), uncropped


@torch.no_grad()
def predictions(model: torch.nn.Module, images: torch.Tensor, batch: int, device: str = "cpu") -> torch.Tensor:
    model.eval().to(device)
    return torch.cat([model(images[i:i + batch].to(device)).argmax(1).cpu() for i in range(0, len(images), batch)])


def shift_consistent(model: torch.nn.Module, uncropped: torch.Tensor, crop: int, batch: int, device: str) -> int:
    """How many test images get the same class from two random crops (seeded per image)."""
    offsets = shift_offsets(range(len(uncropped)), 0, uncropped.shape[-1] - crop)
    first = predictions(model, crops_at(uncropped, offsets[:, 0], crop), batch, device)
    second = predictions(model, crops_at(uncropped, offsets[:, 1], crop), batch, device)
    return int(first.eq(second).sum())


def artifact_model(path: Path) -> torch.nn.Module:
    resolved = load_artifact(path)
    return resolved.converted(resolved.conversion, resolved.preprocessing.crop)  # learned strides too


def run_fold(keep_first: int, epochs: int, fm_epochs: int, train_paths: list[str], test: tuple, reference: torch.Tensor,
             work: Path, args) -> dict[str, dict]:
    """Every variant of one keep_first trained on ``train_paths`` and scored on ``test``."""
    images, labels, uncropped = test
    data = flat_folder(train_paths, work / "train")
    resampling = args.mode in RESAMPLING_MODES
    placement = {"resample_at": args.resample_at[0]} if resampling else {}  # trained variants: the first
    phc = {"phc": args.phc} if args.phc is not None else {}  # every row: PHC layers fitted to the weights
    fitted = f", PHC n={args.phc} fitted" if args.phc is not None else ""
    batch_size = min(args.batch_size, len(train_paths))  # a --limit smoke test trains on fewer images
    fm_batch_size = min(args.batch_size, len(held_back_split(train_paths, args.fm_val_fraction, args.seed)[0]))
    rows: dict[str, dict] = {}

    def score(name: str, model: torch.nn.Module, **extra) -> None:
        predicted = predictions(model, images, args.eval_batch, args.device)
        consistent = shift_consistent(model, uncropped, images.shape[-1], args.eval_batch, args.device)
        model.cpu()
        rows[name] = {"correct": int(predicted.eq(labels).sum()), "agree": int(predicted.eq(reference).sum()),
                      "consistent": consistent, "images": len(labels), **extra}
        print(f"  keep_first {keep_first}, {name}: top-1 {rows[name]['correct']}/{len(labels)}, "
              f"agreement {rows[name]['agree']}/{len(labels)}, shift-consistent {consistent}", flush=True)

    for at in (args.resample_at if resampling else [None]) if "converted" in args.variants else ():
        spec = ConversionSpec.build(args.mode, keep_first=keep_first, **({"resample_at": at} if at else {}), **phc)
        score(f"converted{f' ({at})' if at else ''}{fitted}", spec.apply(resolve_model(MODEL).model))
    for rule in args.recalibrate if "recalibrated" in args.variants else ():
        start = time.perf_counter()
        summary = recalibrate_model(MODEL, data, work / f"recalibrated_{rule}.pt", images=len(train_paths),
                                    mode=args.mode, keep_first=keep_first, batch_size=args.bn_batch, recalibrate=rule,
                                    workers=args.workers, device=args.device, **placement, **phc)
        score(f"recalibrated ({summary['layers']}){fitted}", artifact_model(work / f"recalibrated_{rule}.pt"),
              seconds=time.perf_counter() - start)
    for variant in [v for v in args.variants if v in DISTILLED]:
        train_params, frozen = DISTILLED[variant]
        rule = "auto" if variant.endswith("-recal") else "none"
        config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=args.lr, train_params=train_params,
                             freeze_norm_stats=frozen, seed=args.seed, checkpointing=args.checkpointing)
        result = train_model(MODEL, data, work / variant, config=config, mode=args.mode, keep_first=keep_first,
                             workers=args.workers, device=args.device, recalibrate=rule, **placement, **phc,
                             distill=DistillConfig(temperature=args.temperature, val_fraction=0.0))
        records = result.history
        score(f"distilled {train_params}" + (", frozen statistics" if frozen else "")
              + (", recalibrated (auto) first" if rule == "auto" else "") + fitted,
              artifact_model(work / variant / "last.pt"),
              seconds_per_epoch=sum(r.seconds for r in records) / len(records),
              peak_memory_bytes=max(r.peak_memory_bytes or 0 for r in records), epochs=epochs)
    if RECIPE in args.variants:
        recipe = {**distill_recipe(args.mode, args.phc), "epochs": epochs, "batch_size": batch_size}
        rule = recipe.pop("recalibrate")
        config = TrainConfig(lr=args.lr, seed=args.seed, checkpointing=args.checkpointing, **recipe)
        result = train_model(MODEL, data, work / RECIPE, config=config, mode=args.mode, keep_first=keep_first,
                             workers=args.workers, device=args.device, recalibrate=rule, **placement, **phc,
                             distill=DistillConfig(temperature=args.temperature, val_fraction=0.0))
        records = result.history
        statistics = "frozen" if recipe["freeze_norm_stats"] else "live"
        score(f"distilled, the recipe: {recipe['train_params']}, {statistics} statistics, {recipe['augment']}"
              + (f", recalibrated ({rule}) first" if rule != "none" else "") + fitted,
              artifact_model(work / RECIPE / "last.pt"),
              seconds_per_epoch=sum(r.seconds for r in records) / len(records),
              peak_memory_bytes=max(r.peak_memory_bytes or 0 for r in records), epochs=epochs)
    for variant in [v for v in args.variants if v in FUNCTION_MATCHING]:
        views, frozen = FUNCTION_MATCHING[variant]
        recipe = {**distill_recipe(args.mode, args.phc), "epochs": fm_epochs, "batch_size": fm_batch_size}
        rule = recipe.pop("recalibrate")
        if frozen is not None:
            recipe["freeze_norm_stats"] = frozen
        if args.fm_augment is not None:
            recipe["augment"] = args.fm_augment
        config = TrainConfig(lr=args.lr, seed=args.seed, checkpointing=args.checkpointing, **recipe)
        distill = DistillConfig(temperature=args.temperature, val_fraction=args.fm_val_fraction, teacher_tta=views)
        result = train_model(MODEL, data, work / variant, config=config, mode=args.mode, keep_first=keep_first,
                             workers=args.workers, device=args.device, distill=distill, recalibrate=rule,
                             **placement, **phc)
        records = result.history
        untrained = result.info.get("untrained") or {}
        statistics = "frozen" if recipe["freeze_norm_stats"] else "live"
        score(f"function matching{', TTA teacher' if distill.teacher_tta else ''}, {statistics} statistics (best.pt)"
              + fitted,
              artifact_model(work / variant / "best.pt"),
              seconds_per_epoch=sum(r.seconds for r in records) / len(records),
              peak_memory_bytes=max(r.peak_memory_bytes or 0 for r in records), epochs=fm_epochs,
              agreement_by_epoch=[r.val_agreement for r in records], untrained_agreement=untrained.get("val_agreement"),
              kept_untrained=untrained.get("kept_as_best"))
    return rows


def parse_epochs(text: str, keep_firsts: list[int]) -> dict[int, int]:
    if ":" not in text:
        return {k: int(text) for k in keep_firsts}
    given = {int(k): int(v) for k, v in (pair.split(":") for pair in text.split(","))}
    return {k: given[k] for k in keep_firsts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images_root", type=Path, help="ImageNet-style <wnid>/<image> folder (the shared sample)")
    parser.add_argument("--keep-first", default="0,3", help="comma-separated keep_first values")
    parser.add_argument("--epochs", default="0:1,3:3", help="epochs for every keep_first (N), or per keep_first (K:N,...)")
    parser.add_argument("--mode", default="checkered", help="the conversion mode (checkered, blurpool, spectral, ...)")
    parser.add_argument("--fm-epochs", default=str(FUNCTION_MATCHING_EPOCHS),
                        help="epochs of the fm variants, for every keep_first (N) or per keep_first (K:N,...)")
    parser.add_argument("--fm-val-fraction", type=float, default=0.1,
                        help="the share of the training fold the fm variants hold back (best.pt, agreement by epoch)")
    parser.add_argument("--fm-augment", default=None, help="the fm variants' --augment instead of the recipe's")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--bn-batch", type=int, default=32, help="batch of the BatchNorm recalibration")
    parser.add_argument("--eval-batch", type=int, default=16)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--limit", type=int, default=None, help="use this many images only (smoke test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where to train and evaluate (cpu, cuda)")
    parser.add_argument("--resample-at", default="activation,layer",
                        help="placements of the converted rows of a resampling mode; trained variants use the first")
    parser.add_argument("--recalibrate", default="auto,all", help="the rules of the recalibrated rows")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--phc", type=int, default=None, metavar="N",
                        help="PHC layers of N Kronecker products in every row, fitted to the weights (issue 25)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, from {', '.join(VARIANTS)} (-frozen: --freeze-norm-stats) "
                             f"[default: {DEFAULT_VARIANTS}; with --phc: {PHC_VARIANTS}]")
    args = parser.parse_args()
    args.variants = (args.variants or (PHC_VARIANTS if args.phc is not None else DEFAULT_VARIANTS)).split(",")
    args.resample_at = args.resample_at.split(",")
    args.recalibrate = args.recalibrate.split(",")
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    use_huge_pages()
    torch.set_num_threads(args.threads)
    keep_firsts = [int(k) for k in args.keep_first.split(",")]
    if args.phc is not None and args.phc < 2:
        parser.error(f"--phc must be at least 2 (the number of Kronecker products), got {args.phc}")
    if args.mode == "traditional" and keep_firsts != [0]:
        parser.error("--mode traditional converts no subsampling step: give --keep-first 0")
    epochs = parse_epochs(args.epochs, keep_firsts)
    fm_epochs = parse_epochs(args.fm_epochs, keep_firsts)
    fold_a, fold_b = folds(args.images_root, args.limit, args.seed)
    original = resolve_model(MODEL)

    began = time.perf_counter()
    print(f"{len(fold_a) + len(fold_b)} images in two folds of {len(fold_a)} and {len(fold_b)}; torch "
          f"{torch.__version__}, {args.threads} threads; mode {args.mode}"
          + (f", PHC n={args.phc} (fitted; the teacher and the reference stay dense)" if args.phc else "")
          + f"; epochs {epochs}", flush=True)
    results: dict[int, list[dict]] = {k: [] for k in keep_firsts}
    originals = []
    with tempfile.TemporaryDirectory() as tmp:
        for fold, (train_paths, test_paths) in enumerate(((fold_a, fold_b), (fold_b, fold_a))):
            test = test_batch(test_paths, original.preprocessing)
            reference = predictions(original.model, test[0], args.eval_batch, args.device)
            consistent = shift_consistent(original.model, test[2], test[0].shape[-1], args.eval_batch, args.device)
            original.model.cpu()
            originals.append({"correct": int(reference.eq(test[1]).sum()), "agree": len(reference),
                              "consistent": consistent, "images": len(reference)})
            for keep_first in keep_firsts:
                work = Path(tmp) / f"fold{fold}_kf{keep_first}"
                results[keep_first].append(run_fold(keep_first, epochs[keep_first], fm_epochs[keep_first], train_paths,
                                                    test, reference, work, args))
                write_json(args, originals, results, epochs, fm_epochs, began)  # a run cut short keeps its folds
    print_table(originals, results, epochs)
    print(f"\n{time.perf_counter() - began:.0f} s in all")
    write_json(args, originals, results, epochs, fm_epochs, began)


def write_json(args, originals, results, epochs, fm_epochs, began: float) -> None:
    if args.json is None:
        return
    settings = vars(args) | {"images_root": str(args.images_root), "json": str(args.json), "torch": torch.__version__}
    document = {"original": originals, "results": {str(k): v for k, v in results.items()}, "epochs": epochs,
                "fm_epochs": fm_epochs, "seconds": time.perf_counter() - began, "settings": settings}
    with atomic_path(args.json, force=True) as temporary:  # rewritten after each fold
        temporary.write_text(json.dumps(document, indent=2) + "\n")


def pooled(rows: list[dict]) -> tuple[float, float, int]:
    images = sum(r["images"] for r in rows)
    return 100 * sum(r["correct"] for r in rows) / images, 100 * sum(r["agree"] for r in rows) / images, images


def pooled_consistency(rows: list[dict]) -> float:
    return 100 * sum(r["consistent"] for r in rows) / sum(r["images"] for r in rows)


def print_table(originals: list[dict], results: dict[int, list[dict]], epochs: dict[int, int]) -> None:
    base, _, images = pooled(originals)
    print(f"\n| keep_first | variant | top-1 % ({images} held-out images) | vs original | agreement % | "
          "shift-consistency % | epochs | s / epoch | peak memory GiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| | original | {base:.1f} | | 100.0 | {pooled_consistency(originals):.1f} | | | |")
    for keep_first, folds_rows in results.items():
        for index, name in enumerate(folds_rows[0]):  # by position: a name may hold a per-fold count
            rows = [list(fold.values())[index] for fold in folds_rows]
            top1, agreement, _ = pooled(rows)
            timed = [r["seconds_per_epoch"] for r in rows if "seconds_per_epoch" in r]
            memory = [r["peak_memory_bytes"] for r in rows if "peak_memory_bytes" in r]
            cost = (f"{rows[0].get('epochs', epochs[keep_first])} | {sum(timed) / len(timed):.0f} | "
                    f"{max(memory) / 2**30:.2f}" if timed else " | | ")
            print(f"| {keep_first} | {name} | {top1:.1f} | {top1 - base:+.1f} | {agreement:.1f} | "
                  f"{pooled_consistency(rows):.1f} | {cost} |")
    for keep_first, folds_rows in results.items():  # function matching: held-back agreement by epoch, per fold
        for index, name in enumerate(folds_rows[0]):
            for fold, row in enumerate(list(fold.values())[index] for fold in folds_rows):
                if "agreement_by_epoch" in row:
                    curve = ", ".join("-" if a is None else f"{a:.0f}" for a in row["agreement_by_epoch"])
                    print(f"keep_first {keep_first}, {name}, fold {fold}: held-back agreement % by epoch {curve} "
                          f"(untrained {row['untrained_agreement']}, best.pt untrained: {row['kept_untrained']})")


if __name__ == "__main__":
    main()
