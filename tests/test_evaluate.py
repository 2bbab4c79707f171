"""The evaluate stage's Python API: metrics, label mapping, data layouts, the loop, torchrun totals.

Expectations are computed by hand (or by an independent plain loop), never by the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn

from ccnn_convert.data import (DecodedImages, find_samples, imagenet_classes, map_wnid_folders,
                                       read_labels_file, shard_indices, stratified_indices)
from ccnn_convert.errors import DataError, ParameterError
from ccnn_convert.evaluate import (DEFAULT_MODES, crops_at, evaluate, evaluate_model, shift_offsets,
                                   top1_agreement, topk_correct)
from ccnn_convert.models import Preprocessing, ResolvedModel
from ccnn_convert.spec import check_modes
from shared_data import BUNDLED_VAL, SAMPLE_VAL

SAMPLE_CLASSES = SAMPLE_VAL.parent / "classes.tsv"
needs_shared_sample = pytest.mark.skipif(
    not SAMPLE_CLASSES.is_file(), reason=f"optional: the shared ImageNet sample is not at {SAMPLE_VAL.parent}")

# The bundled images (tests/data/imagenet-mini): folder wnid -> standard index, copied by hand
# from the published ImageNet-1k class list.
BUNDLED_TARGETS = {"n01440764": 0, "n01985128": 124, "n02109961": 248, "n02489166": 376,
                   "n03042490": 500, "n03661043": 624, "n04026417": 748, "n13052670": 996}

# Standard indices of a few classes, copied from the published ImageNet-1k class list.
WNID = {0: "n01440764", 1: "n01443537", 2: "n01484850", 3: "n01491361", 4: "n01494475",
        5: "n01496331", 6: "n01498041", 207: "n02099601", 999: "n15075141"}

TRANSFORM = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor()])  # no normalisation: pixels in [0, 1]


# ------------------------------------------------------------------------------ helpers


class RedLevelClassifier(nn.Module):
    """Class j scores -(mean red - j/10)^2: an image of red level k/10 is predicted as class k,
    and its top-5 are the 5 classes with the nearest levels. ``shift`` moves every prediction up."""

    def __init__(self, classes: int = 1000, levels: int = 11, shift: int = 0):
        super().__init__()
        self.classes, self.levels, self.shift = classes, levels, shift

    def forward(self, x):
        red = x[:, 0].mean(dim=(1, 2))
        centres = torch.arange(self.levels, dtype=x.dtype) / 10
        scores = -((red[:, None] - centres[None]) ** 2)
        logits = torch.full((x.shape[0], self.classes), -1e9)
        logits[:, self.shift:self.shift + self.levels] = scores[:, : self.classes - self.shift]
        return logits


def save_red(path: Path, level: int, size=(20, 18)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (round(level * 25.5), 40, 90)).save(path)
    return path


def save_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not a JPEG at all")
    return path


def red_folder(root: Path, images: list[tuple[int, int]], corrupt_in: int | None = None) -> Path:
    """ImageFolder layout; ``images`` = (label index, red level) pairs."""
    for n, (label, level) in enumerate(images):
        save_red(root / WNID[label] / f"img{n:03d}.png", level)
    if corrupt_in is not None:
        save_corrupt(root / WNID[corrupt_in] / "broken.JPEG")
    return root


# ------------------------------------------------------------------------------ metrics


def test_topk_correct_on_hand_made_logits():
    logits = torch.tensor([
        [0.10, 0.50, 0.20, 0.90, 0.00, 0.30, 0.05],  # order: 3,1,5,2,0,6,4
        [0.70, 0.10, 0.20, 0.30, 0.40, 0.50, 0.60],  # order: 0,6,5,4,3,2,1
        [0.00, 0.60, 1.00, 0.10, 0.20, 0.30, 0.40],  # order: 2,1,6,5,4,3,0
        [0.90, 0.80, 0.70, 0.60, 0.50, 0.40, 0.30],  # order: 0,1,...,6
    ])
    targets = torch.tensor([3, 3, 1, 6])
    # row 0: target first -> top-1 and top-5; row 1: fifth -> top-5 only;
    # row 2: second -> top-2 and top-5; row 3: last -> neither.
    assert topk_correct(logits, targets, ks=(1, 5)) == {1: 1, 5: 3}
    assert topk_correct(logits, targets, ks=(1, 2, 4)) == {1: 1, 2: 2, 4: 2}


def test_topk_with_fewer_classes_than_k_counts_everything_in_top5():
    logits = torch.tensor([[0.2, 0.8, 0.1], [0.9, 0.05, 0.05]])
    assert topk_correct(logits, torch.tensor([0, 0])) == {1: 1, 5: 2}


def test_topk_on_empty_batch_is_zero():
    assert topk_correct(torch.empty(0, 10), torch.empty(0, dtype=torch.long)) == {1: 0, 5: 0}


def test_top1_agreement_counts_equal_argmax():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0]])
    b = torch.tensor([[5.0, 1.0], [3.0, 1.0], [0.0, 9.0]])
    assert top1_agreement(a, b) == 1


def test_modes_are_validated_and_deduplicated():
    assert check_modes(["original", " dilated", "original"]) == ["original", "dilated"]
    assert DEFAULT_MODES == ("original", "checkered")
    with pytest.raises(ParameterError, match="unknown mode 'dense'"):
        check_modes(["original", "dense"])


# ------------------------------------------------------------------------------ labels


def test_class_table_is_standard_order():
    table = imagenet_classes()
    assert len(table) == 1000
    assert [c.index for c in table] == list(range(1000))
    assert [c.wnid for c in table] == sorted(c.wnid for c in table)
    for index, wnid in WNID.items():
        assert table[index].wnid == wnid
    assert (table[0].name, table[207].name, table[999].name) == ("tench", "golden retriever", "toilet tissue")


def test_class_table_names_match_torchvision_in_order():
    # torchvision ships the ImageNet class names (no download); it renamed two duplicate names.
    import torchvision

    names = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
    renamed = {134: ("crane", "crane bird"), 639: ("maillot", "maillot tank suit")}
    ours = [c.name for c in imagenet_classes()]
    assert {i: (a, b) for i, (a, b) in enumerate(zip(ours, names)) if a != b} == renamed


@needs_shared_sample
def test_class_table_matches_the_shared_copy():
    table = imagenet_classes()
    shared = [line.split("\t")[:2] for line in SAMPLE_CLASSES.read_text().splitlines() if line.strip()]
    assert [(int(i), w) for i, w in shared] == [(c.index, c.wnid) for c in table]


def test_partial_class_folders_map_to_standard_indices(tmp_path):
    # torchvision's default would call these classes 0, 1, 2 (their rank among the folders).
    red_folder(tmp_path, [(207, 1), (5, 2), (999, 3)])
    samples = find_samples(tmp_path)
    by_folder = {Path(p).parent.name: t for p, t in samples.items}
    assert by_folder == {WNID[207]: 207, WNID[5]: 5, WNID[999]: 999}
    assert map_wnid_folders([WNID[1], WNID[0]]) == {WNID[1]: 1, WNID[0]: 0}


def test_bundled_sample_targets_are_the_folder_wnids_standard_index():
    samples = find_samples(BUNDLED_VAL)
    assert samples.layout == "imagefolder" and len(samples.items) == len(BUNDLED_TARGETS) == 8
    assert {Path(p).parent.name: t for p, t in samples.items} == BUNDLED_TARGETS
    dataset = DecodedImages(samples.items, TRANSFORM)
    decoded = [dataset[i] for i in range(len(dataset))]
    assert all(item.image.shape == (3, 16, 16) for item in decoded)  # every bundled JPEG decodes
    assert [item.target for item in decoded] == sorted(BUNDLED_TARGETS.values())


@needs_shared_sample
def test_shared_sample_targets_are_the_folder_wnids_standard_index():
    samples = find_samples(SAMPLE_VAL)
    standard = {w: int(i) for i, w, *_ in (l.split("\t") for l in SAMPLE_CLASSES.read_text().splitlines())}
    assert len(samples.items) == 250
    assert all(t == standard[Path(p).parent.name] for p, t in samples.items)
    assert sorted(set(samples.targets)) == list(range(0, 1000, 4))  # every fourth class


# ------------------------------------------------------------------------------ flat folder + labels file


def test_flat_folder_with_kaggle_solution_csv(tmp_path):
    data = tmp_path / "val"
    for n, level in [(1, 2), (2, 5), (3, 7)]:
        save_red(data / f"ILSVRC2012_val_{n:08d}.JPEG", level)
    (tmp_path / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n"
        f"ILSVRC2012_val_00000001,{WNID[207]} 1 2 30 40 {WNID[207]} 5 5 9 9\n"
        f"ILSVRC2012_val_00000002,{WNID[0]} 0 0 10 10\n"
        f"ILSVRC2012_val_00000003,{WNID[999]} 1 1 2 2\n"
        f"ILSVRC2012_val_00000004,{WNID[3]} 1 1 2 2\n"  # listed but not present: fine
    )
    samples = find_samples(data, tmp_path / "LOC_val_solution.csv")
    assert samples.layout == "flat+kaggle"
    assert [(Path(p).name, t) for p, t in samples.items] == [
        ("ILSVRC2012_val_00000001.JPEG", 207), ("ILSVRC2012_val_00000002.JPEG", 0),
        ("ILSVRC2012_val_00000003.JPEG", 999)]


def test_flat_folder_with_plain_csv_index_or_wnid_and_optional_header(tmp_path):
    for name in ["a.png", "b.png", "c.png"]:
        save_red(tmp_path / "imgs" / name, 1)
    (tmp_path / "with_header.csv").write_text(f"filename,label\na.png,207\nb.png,{WNID[5]}\nc,3\n")
    (tmp_path / "no_header.csv").write_text(f"a.png,{WNID[999]}\nb.png,0\nc.png,6\n")
    got = find_samples(tmp_path / "imgs", tmp_path / "with_header.csv")
    assert got.layout == "flat+csv"
    assert [(Path(p).name, t) for p, t in got.items] == [("a.png", 207), ("b.png", 5), ("c.png", 3)]
    got = find_samples(tmp_path / "imgs", tmp_path / "no_header.csv")
    assert [t for _, t in got.items] == [999, 0, 6]


def test_labels_file_inside_the_flat_folder_is_not_an_image(tmp_path):
    save_red(tmp_path / "x.png", 1)
    (tmp_path / "labels.csv").write_text("x.png,4\n")
    assert [t for _, t in find_samples(tmp_path, tmp_path / "labels.csv").items] == [4]


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "data folder not found"),
    (lambda d: d.mkdir(), "data folder is empty"),
    (lambda d: save_red(d / "a.png", 1), "flat folder of files: pass labels"),
    (lambda d: save_red(d / "not_a_wnid" / "a.png", 1), "class folders that are not ImageNet wnids: not_a_wnid"),
    (lambda d: (d / WNID[0]).mkdir(parents=True), "no files in the class folders"),
])
def test_layout_errors_are_one_line_data_errors(tmp_path, setup, message):
    data = tmp_path / "val"
    setup(data)
    with pytest.raises(DataError, match=message) as info:
        find_samples(data)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("labels, message", [
    ("a.png,1\n", "1 image\\(s\\) in .* have no label \\(first: b.png\\)"),
    ("z.png,1\ny.png,2\n", "no file in .* is listed in it"),
    ("a.png,1\nb.png,not_a_class\n", "line 2: label 'not_a_class' is neither a class index nor a wnid"),
    ("a.png,1,extra\n", "line 1: expected 2 columns"),
    ("ImageId,PredictionString\na,n99999999 1 2 3 4\n", "line 2: unknown wnid 'n99999999'"),
    ("", "labels file is empty"),
])
def test_labels_file_not_matching_images_is_a_data_error(tmp_path, labels, message):
    save_red(tmp_path / "imgs" / "a.png", 1)
    save_red(tmp_path / "imgs" / "b.png", 1)
    (tmp_path / "labels.csv").write_text(labels)
    with pytest.raises(DataError, match=message):
        find_samples(tmp_path / "imgs", tmp_path / "labels.csv")


def test_read_labels_file_rejects_binary(tmp_path):
    (tmp_path / "l.csv").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(DataError, match="not a text CSV"):
        read_labels_file(tmp_path / "l.csv")


# ------------------------------------------------------------------------------ subsets


def test_stratified_limit_is_round_robin_over_classes():
    targets = [0, 0, 0, 1, 1, 2]  # class 0: images 0-2, class 1: 3-4, class 2: 5
    assert stratified_indices(targets, 3) == [0, 3, 5]  # one of each class
    assert stratified_indices(targets, 5) == [0, 1, 3, 4, 5]  # then a second of each that has one
    assert stratified_indices(targets, 99) == list(range(6))
    assert stratified_indices(targets, None) == list(range(6))


def test_stratified_limit_spreads_a_partial_round_over_the_classes():
    targets = [0, 0, 0, 1, 1, 2]
    assert stratified_indices(targets, 2) == [0, 5]  # classes 0 and 2, not 0 and 1
    assert stratified_indices(targets, 4) == [0, 3, 4, 5]  # round 2 has classes 0 and 1: takes 1
    # 10 classes of one image, 5 wanted: the centre of each pair of classes (1, 3, 5, 7, 9).
    assert stratified_indices(list(range(10)), 5) == [1, 3, 5, 7, 9]


def test_shards_do_not_pad_or_repeat():
    shards = [shard_indices(list(range(7)), r, 2) for r in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    assert shard_indices([4], 1, 2) == []


def test_shift_offsets_are_seeded_per_image_and_in_range():
    a = shift_offsets([0, 1, 2, 3], seed=7, room=32)
    assert a.shape == (4, 2, 2) and int(a.min()) >= 0 and int(a.max()) <= 32
    assert torch.equal(shift_offsets([2, 3], seed=7, room=32), a[2:])  # independent of batching
    assert not torch.equal(shift_offsets([0, 1, 2, 3], seed=8, room=32), a)
    images = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4)
    crops = crops_at(images, torch.tensor([[0, 1], [2, 2]]), 2)
    assert crops[0, 0].tolist() == [[1.0, 2.0], [5.0, 6.0]]
    assert crops[1, 0].tolist() == [[26.0, 27.0], [30.0, 31.0]]


# ------------------------------------------------------------------------------ the loop


def test_evaluate_counts_match_hand_computed_answers(tmp_path):
    # (label, red level): predictions are the level; top-5 = 5 nearest levels.
    images = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4),  # 5 correct
              (0, 3),  # wrong top-1; levels nearest 3 are 3,2,4,1,5 -> 0 not in top-5
              (5, 4),  # wrong top-1; nearest 4: 4,3,5,... -> in top-5
              (6, 6)]  # correct
    red_folder(tmp_path, images)
    samples = find_samples(tmp_path)
    dataset = DecodedImages(samples.items, TRANSFORM)
    models = {"shifted": RedLevelClassifier(shift=1), "original": RedLevelClassifier()}
    report = evaluate(models, dataset, batch_size=3, device="cpu", flops={"original": 123})
    original, shifted = report.result("original"), report.result("shifted")
    assert [r.mode for r in report.results] == ["original", "shifted"]  # reference first
    assert report.images == 8 and not report.skipped
    assert (original.top1_correct, original.top5_correct) == (6, 7)
    assert original.top1 == pytest.approx(75.0) and original.top5 == pytest.approx(87.5)
    # shifted predicts level + 1: correct for the (5, 4) image only; top-5 = levels+1 nearest.
    assert shifted.top1_correct == 1
    assert shifted.agree_with_original == 0 and original.agreement == 100.0
    assert report.top1_change(shifted) == pytest.approx(100 * (1 - 6) / 8)
    assert original.batches == 3 and original.flops == 123
    assert original.peak_memory_bytes > 0 and report.memory_kind == "process_rss_high_water"


def test_evaluate_with_indices_only_reads_those(tmp_path):
    red_folder(tmp_path, [(0, 0), (1, 1), (2, 0), (3, 3)])
    dataset = DecodedImages(find_samples(tmp_path).items, TRANSFORM)
    report = evaluate({"original": RedLevelClassifier()}, dataset, [1, 3], batch_size=8, device="cpu")
    assert report.images == 2 and report.result("original").top1_correct == 2


def test_corrupt_and_non_image_files_are_skipped_and_counted(tmp_path):
    red_folder(tmp_path, [(0, 0), (1, 1), (2, 2)], corrupt_in=1)
    (tmp_path / WNID[2] / "notes.txt").write_text("hello")
    good = tmp_path / WNID[0] / "img000.png"
    (tmp_path / WNID[0] / "truncated.png").write_bytes(good.read_bytes()[:40])
    dataset = DecodedImages(find_samples(tmp_path).items, TRANSFORM)
    seen = []
    report = evaluate({"original": RedLevelClassifier()}, dataset, batch_size=2, device="cpu", on_skip=seen.append)
    assert report.images == 3 and report.result("original").top1_correct == 3
    assert sorted(Path(s.path).name for s in report.skipped) == ["broken.JPEG", "notes.txt", "truncated.png"]
    assert seen == report.skipped
    assert report.to_dict()["data"]["skipped"] == 3


def test_consistency_of_a_shift_invariant_model_is_total(tmp_path):
    red_folder(tmp_path, [(0, 0), (1, 1), (2, 2)])
    square = T.Compose([T.Resize(20), T.CenterCrop(20), T.ToTensor()])
    dataset = DecodedImages(find_samples(tmp_path).items, TRANSFORM, square)
    report = evaluate({"original": RedLevelClassifier()}, dataset, batch_size=2, device="cpu",
                      consistency_crop=16, seed=3)
    assert report.result("original").consistency == 100.0


def test_consistency_detects_a_position_dependent_model(tmp_path):
    # Left half level 2, right half level 8: a model reading one pixel column sees a different
    # level depending on the crop offset, so some pairs of crops disagree.
    for n in range(12):
        path = tmp_path / WNID[0] / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (24, 24), (51, 0, 0))
        image.paste((204, 0, 0), (12 + (n % 4) - 2, 0, 24, 24))
        image.save(path)

    class Column(nn.Module):
        def forward(self, x):
            return RedLevelClassifier()(x[:, :, :, 8:9])

    square = T.Compose([T.Resize(24), T.CenterCrop(24), T.ToTensor()])
    dataset = DecodedImages(find_samples(tmp_path).items, T.Compose([T.CenterCrop(16), T.ToTensor()]), square)
    report = evaluate({"original": Column()}, dataset, batch_size=4, device="cpu", consistency_crop=16, seed=0)
    assert 0 < report.result("original").consistency < 100


# ------------------------------------------------------------------------------ torchrun totals


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    report = _evaluate_red(root)
    Path(out, f"rank{rank}.json").write_text(json.dumps(report.to_dict()))


def _evaluate_red(root: str):
    dataset = DecodedImages(find_samples(root).items, TRANSFORM)
    models = {"original": RedLevelClassifier(), "shifted": RedLevelClassifier(shift=1)}
    return evaluate(models, dataset, batch_size=2, device="cpu")


def _totals(report_dict: dict) -> list:
    keys = ("mode", "images", "top1_correct", "top5_correct", "agreement")
    return [[r[k] for k in keys] for r in report_dict["results"]] + [
        report_dict["data"]["images"], sorted(s["path"] for s in report_dict["data"]["skipped_files"])]


def test_distributed_totals_equal_single_process_totals(tmp_path):
    # 9 readable images + 1 corrupt = 10 files -> shards of 5; 9 does not split evenly, so a
    # padding sampler would count an image twice.
    images = [(0, 0), (1, 1), (2, 2), (0, 3), (5, 4), (3, 3), (4, 5), (6, 6), (1, 2)]
    root = red_folder(tmp_path / "data", images, corrupt_in=2)
    single = _evaluate_red(str(root)).to_dict()
    assert single["data"]["images"] == 9 and single["world_size"] == 1
    out = tmp_path / "out"
    out.mkdir()
    torch.multiprocessing.spawn(_distributed_worker, args=(2, _free_port(), str(root), str(out)), nprocs=2, join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for report in ranks:
        assert report["world_size"] == 2
        assert _totals(report) == _totals(single)


class BatchRecorder(RedLevelClassifier):
    """RedLevelClassifier that remembers the batch size of every forward pass."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        return super().forward(x)


def test_forward_batch_splits_passes_and_changes_no_count(tmp_path):
    red_folder(tmp_path, [(i % 7, i % 7) for i in range(10)])  # level = label: all correct
    dataset = DecodedImages(find_samples(tmp_path).items, TRANSFORM)
    whole, chunked, default = BatchRecorder(), BatchRecorder(), BatchRecorder()
    a = evaluate({"original": whole}, dataset, batch_size=10, device="cpu", forward_batch=10)
    b = evaluate({"original": chunked}, dataset, batch_size=10, device="cpu", forward_batch=3)
    evaluate({"original": default}, dataset, batch_size=10, device="cpu")
    assert whole.sizes == [10] and chunked.sizes == [3, 3, 3, 1] and default.sizes == [4, 4, 2]  # CPU: 4
    ra, rb = a.result("original"), b.result("original")
    counts = [(r.images, r.top1_correct, r.top5_correct) for r in (ra, rb)]
    assert counts == [(10, 10, 10), (10, 10, 10)]


# ------------------------------------------------------------------------------ the Python API


def _resolved_red() -> ResolvedModel:
    pre = Preprocessing(resize=16, crop=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return ResolvedModel(model=RedLevelClassifier(), name="red", preprocessing=pre, spec={},
                         weights="DEFAULT", conversion=None, num_classes=1000)


def test_evaluate_model_takes_a_resolved_model_and_typed_options(tmp_path):
    red_folder(tmp_path, [(0, 0), (1, 1), (2, 2), (3, 4)])  # the last one is predicted as class 4
    report = evaluate_model(_resolved_red(), tmp_path, modes=["original"], device="cpu", workers=0,
                            batch_size=3, limit=3)
    result = report.result("original")
    # limit 3 over 4 classes of one image: the centres of 3 slices of the class list: classes 0, 2, 3.
    assert (report.images, result.top1_correct, result.top5_correct) == (3, 2, 3)
    assert report.data["selection"] == "3 of 4 files, stratified round-robin over classes " \
                                       "(3 classes, spread over the class list)"
    assert report.settings["modes"] == ["original"] and report.model == "red"


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "batch_size must be positive, got 0"),
    ({"limit": -1}, "limit must be a positive number of images"),
    ({"modes": ["original", "dense"]}, "unknown mode 'dense' in modes"),
    ({"modes": ["original"], "leaf_modules": ["Gate"]}, "leaf_modules only shapes conversions"),
    ({"seed": 1}, "seed would do nothing"),
    ({"amp": True}, "amp needs a CUDA device"),
    ({"preprocessing": {"size": 3}}, "unknown key(s) in preprocessing: size"),
])
def test_evaluate_model_errors_name_python_parameters(tmp_path, options, message):
    red_folder(tmp_path, [(0, 0)])
    with pytest.raises(ParameterError) as info:
        evaluate_model(_resolved_red(), tmp_path, device="cpu", workers=0, **options)
    assert str(info.value).startswith(message.split(" ")[0]) and message in str(info.value)
    assert "--" not in str(info.value)


# ------------------------------------------------------------------------------ labels a model does not have

WNID_10, WNID_11 = "n01530575", "n01531178"  # ImageNet classes 10 and 11 (the published class list)


def test_wnid_folders_outside_a_small_models_classes_are_refused(tmp_path):
    for wnid in (WNID_10, WNID_11):
        save_red(tmp_path / wnid / "a.png", 3)
    # The folders keep their ImageNet index for a non-ImageNet model too (not the ranks 0 and 1).
    assert sorted(find_samples(tmp_path, imagenet_labels=False).targets) == [10, 11]
    ten = dataclasses.replace(_resolved_red(), model=RedLevelClassifier(classes=10, levels=10), num_classes=10)
    with pytest.raises(DataError, match="label 11 is out of range for a 10-class model"):
        evaluate_model(ten, tmp_path, modes=["original"], device="cpu", workers=0)
    # Folders that are not wnids still get their sorted rank.
    other = tmp_path / "own"
    for name in ("zebra", "ant"):
        save_red(other / name / "a.png", 1)
    assert {Path(p).parent.name: t for p, t in find_samples(other, imagenet_labels=False).items} == \
        {"ant": 0, "zebra": 1}


def test_conflicting_label_rows_are_refused_and_repeated_ones_kept(tmp_path):
    plain = tmp_path / "labels.csv"
    plain.write_text("a.png,3\nb.png,4\na.png,3\n")
    assert read_labels_file(plain) == ("flat+csv", {"a.png": 3, "b.png": 4})
    plain.write_text("a.png,3\nb.png,4\na.png,5\n")
    with pytest.raises(DataError, match=r"labels.csv line 3: 'a.png' is labelled 5 here and 3 on an earlier line"):
        read_labels_file(plain)
    kaggle = tmp_path / "LOC_val_solution.csv"
    kaggle.write_text(f"ImageId,PredictionString\nimg1,{WNID[0]} 1 2 3 4\nimg1,{WNID[2]} 1 2 3 4\n")
    with pytest.raises(DataError, match="line 3: 'img1' is labelled 2 here and 0"):
        read_labels_file(kaggle)
