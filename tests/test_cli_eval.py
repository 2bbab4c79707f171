"""ccnn-eval end to end: output, --json, one-line errors, and (when the engine and the model
registry are present) a real pretrained model on the shared ImageNet sample."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from ccnn_convert import evaluate as ev
from ccnn_convert.cli.eval import app
from ccnn_convert.models import Preprocessing, ResolvedModel
from ccnn_convert.spec import ConversionSpec
from shared_data import SAMPLE_VAL

WNID = {0: "n01440764", 1: "n01443537", 2: "n01484850", 3: "n01491361", 4: "n01494475", 5: "n01496331"}
runner = CliRunner()


# ------------------------------------------------------------------------------ fakes


def small_preprocessing() -> Preprocessing:
    """20 px shorter side, 16 px crop, no normalisation: pixel values stay in [0, 1]."""
    return Preprocessing(resize=20, crop=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class RedLevelClassifier(nn.Module):
    """Predicts class k for an image of red level k/10 (class k + shift with ``shift``)."""

    def __init__(self, shift: int = 0):
        super().__init__()
        self.shift = shift
        self.conv = nn.Conv2d(3, 3, 1)  # gives the FLOP counter something to count

    def forward(self, x):
        red = x[:, 0].mean(dim=(1, 2))
        scores = -((red[:, None] - torch.arange(11, dtype=x.dtype)[None] / 10) ** 2)
        logits = torch.full((x.shape[0], 1000), -1e9) + 0 * self.conv(x).sum()
        logits[:, self.shift:self.shift + 11] = scores
        return logits


@pytest.fixture
def fake_model(monkeypatch):
    """Replace model resolution and the conversion step: MODEL 'red' resolves to a
    RedLevelClassifier; every converted mode predicts one class higher. Records each
    ConversionSpec applied, with the input size, and each resolve_model call."""
    calls = {"convert": [], "conversion": None, "resolve": []}

    def resolve(model, weights="DEFAULT", arch=None, preprocessing=None, *, trust_factory=False):
        calls["resolve"].append({"model": model, "trust_factory": trust_factory})
        pre = small_preprocessing().with_overrides(**(preprocessing or {}))
        return ResolvedModel(model=RedLevelClassifier(), name="red", preprocessing=pre, spec={},
                             weights=weights, conversion=calls["conversion"], num_classes=1000)

    def apply(spec, model, input_size=224):
        calls["convert"].append((spec, input_size))
        return RedLevelClassifier(shift=1)

    monkeypatch.setattr(ev, "resolve_model", resolve)
    monkeypatch.setattr(ConversionSpec, "apply", apply)
    return calls


def make_folder(root: Path, images: list[tuple[int, int]]) -> Path:
    """ImageFolder layout; images = (label, red level) pairs."""
    for n, (label, level) in enumerate(images):
        path = root / WNID[label] / f"{n}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 20), (round(level * 25.5), 10, 10)).save(path)
    return root


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr  # progress or warnings may come before it
    assert message in errors[0], errors[0]
    assert result.stderr.rstrip().endswith(errors[0])


# ------------------------------------------------------------------------------ output


def test_table_and_json_for_two_modes(tmp_path, fake_model):
    data = make_folder(tmp_path / "val", [(0, 0), (1, 1), (2, 2), (3, 3), (0, 4)])
    out = tmp_path / "results.json"
    result = invoke("red", "--data", data, "--workers", "0", "--batch-size", "2", "--json", out)
    assert result.exit_code == 0, result.output
    assert "original" in result.stdout and "checkered" in result.stdout
    assert "80.00" in result.stdout  # original: 4 of 5 right
    assert "process RSS high-water mark (per process" in result.stdout
    assert "loader wait:" in result.stdout
    report = json.loads(out.read_text())
    rows = {r["mode"]: r for r in report["results"]}
    assert rows["original"]["top1"] == pytest.approx(80.0) and rows["original"]["images"] == 5
    # converted predicts level + 1: right only for the (label 0, level 4)? no: 4+1 != 0 -> 0 right
    assert rows["checkered"]["top1"] == pytest.approx(0.0)
    assert rows["checkered"]["top1_change"] == pytest.approx(-80.0)
    assert rows["checkered"]["agreement"] == pytest.approx(0.0)
    for key in ("top5", "images_per_s", "peak_memory_bytes", "flops", "seconds_per_batch"):
        assert rows["checkered"][key] is not None
    assert report["model"] == "red"
    assert report["settings"]["modes"] == ["original", "checkered"]
    assert report["data"]["layout"] == "imagefolder"
    assert fake_model["convert"] == [(ConversionSpec("checkered", sampler="lattice", keep_first=0), 16)]
    assert rows["checkered"]["conversion"] == ConversionSpec("checkered").to_dict()
    assert list(tmp_path.glob(".results.json*")) == []  # no temporary left behind


def test_flags_reach_the_conversion_and_preprocessing(tmp_path, fake_model):
    data = make_folder(tmp_path / "val", [(0, 0), (1, 1)])
    out = tmp_path / "r.json"
    result = invoke("red", "--data", data, "--workers", "0", "--modes", "dilated,checkered",
                    "--sampler", "random", "--keep-first", "2", "--density", "3", "--seed", "5",
                    "--leaf", "Gate", "--leaf", "body.block", "--trust-factory",
                    "--resize", "22", "--crop", "18", "--mean", "0.1,0.2,0.3", "--json", out)
    assert result.exit_code == 0, result.output
    by_mode = {spec.mode: (spec, size) for spec, size in fake_model["convert"]}
    leaves = ("Gate", "body.block")
    assert by_mode["checkered"] == (ConversionSpec("checkered", sampler="random", keep_first=2, density=3,
                                                   seed=5, leaf_modules=leaves), 18)
    assert by_mode["dilated"] == (ConversionSpec("dilated", keep_first=2, leaf_modules=leaves), 18)
    assert fake_model["resolve"] == [{"model": "red", "trust_factory": True}]
    report = json.loads(out.read_text())
    settings = report["settings"]
    assert settings["preprocessing"]["resize"] == 22 and settings["preprocessing"]["mean"] == [0.1, 0.2, 0.3]
    assert settings["leaf_modules"] == list(leaves)
    assert [r["mode"] for r in report["results"]] == ["dilated", "checkered"]  # the order asked for


def test_artifact_leaf_modules_carry_over_and_add_to_the_flags(tmp_path, fake_model):
    fake_model["conversion"] = ConversionSpec("checkered", leaf_modules=("Gate",))
    data = make_folder(tmp_path / "val", [(0, 0)])
    result = invoke("red", "--data", data, "--workers", "0", "--leaf", "Other")
    assert result.exit_code == 0, result.output
    assert [spec.leaf_modules for spec, _ in fake_model["convert"]] == [("Gate", "Other")]


def test_artifact_defaults_to_original_and_its_own_conversion(tmp_path, fake_model):
    fake_model["conversion"] = ConversionSpec("dilated", sampler="naive", keep_first=3)
    data = make_folder(tmp_path / "val", [(0, 0)])
    result = invoke("red", "--data", data, "--workers", "0")
    assert result.exit_code == 0, result.output
    assert fake_model["convert"][0][0] == ConversionSpec("dilated", keep_first=3)
    result = invoke("red", "--data", data, "--workers", "0", "--keep-first", "1")
    assert fake_model["convert"][1][0].keep_first == 1  # an explicit flag wins


def test_limit_is_stratified_and_stated(tmp_path, fake_model):
    data = make_folder(tmp_path / "val", [(0, 0), (0, 0), (0, 0), (1, 1), (2, 2)])
    out = tmp_path / "r.json"
    result = invoke("red", "--data", data, "--workers", "0", "--modes", "original", "--limit", "3", "--json", out)
    assert result.exit_code == 0, result.output
    assert "--limit 3: 3 of 5 files, stratified round-robin over classes (3 classes" in result.stdout
    assert json.loads(out.read_text())["results"][0]["top1_correct"] == 3


def test_consistency_column(tmp_path, fake_model):
    data = make_folder(tmp_path / "val", [(0, 0), (1, 1)])
    result = invoke("red", "--data", data, "--workers", "0", "--modes", "original", "--consistency")
    assert result.exit_code == 0, result.output
    assert "shift consistency" in result.stdout and "100.00" in result.stdout


def test_corrupt_file_is_warned_about_and_counted(tmp_path, fake_model):
    data = make_folder(tmp_path / "val", [(0, 0), (1, 1)])
    (data / WNID[1] / "bad.JPEG").write_bytes(b"\x00garbage")
    out = tmp_path / "r.json"
    result = invoke("red", "--data", data, "--workers", "0", "--modes", "original", "--json", out)
    assert result.exit_code == 0, result.output
    assert "warning:" in result.stderr and "bad.JPEG" in result.stderr
    assert "skipped 1 unreadable file(s)" in result.stdout
    report = json.loads(out.read_text())
    assert report["data"]["skipped"] == 1 and report["results"][0]["images"] == 2


def test_flat_folder_with_labels_through_the_cli(tmp_path, fake_model):
    for name, level in [("a.png", 2), ("b.png", 3)]:
        (tmp_path / "flat").mkdir(exist_ok=True)
        Image.new("RGB", (20, 20), (round(level * 25.5), 0, 0)).save(tmp_path / "flat" / name)
    (tmp_path / "labels.csv").write_text(f"filename,label\na.png,2\nb.png,{WNID[1]}\n")
    out = tmp_path / "r.json"
    result = invoke("red", "--data", tmp_path / "flat", "--labels", tmp_path / "labels.csv",
                    "--workers", "0", "--modes", "original", "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["results"][0]["top1_correct"] == 1


# ------------------------------------------------------------------------------ one-line errors


def _layout(kind: str, root: Path) -> list[str]:
    if kind == "missing":
        return ["--data", str(root / "nope")]
    if kind == "empty":
        (root / "empty").mkdir()
        return ["--data", str(root / "empty")]
    if kind == "flat_without_labels":
        make_folder(root / "v", [(0, 1)])
        flat = root / "v" / WNID[0]
        return ["--data", str(flat)]
    if kind == "unknown_wnid":
        make_folder(root / "v", [(0, 1)])
        (root / "v" / "cats").mkdir()
        return ["--data", str(root / "v")]
    if kind == "labels_mismatch":
        make_folder(root / "v", [(0, 1), (0, 2)])
        (root / "l.csv").write_text("0.png,1\n")
        return ["--data", str(root / "v" / WNID[0]), "--labels", str(root / "l.csv")]
    if kind == "all_corrupt":
        (root / "v" / WNID[0]).mkdir(parents=True)
        (root / "v" / WNID[0] / "x.JPEG").write_bytes(b"nope")
        return ["--data", str(root / "v")]
    raise AssertionError(kind)


@pytest.mark.parametrize("kind, message", [
    ("missing", "data folder not found"),
    ("empty", "data folder is empty"),
    ("flat_without_labels", "is a flat folder of files: pass --labels"),
    ("unknown_wnid", "class folders that are not ImageNet wnids: cats"),
    ("labels_mismatch", "does not match the images: 1 image(s)"),
    ("all_corrupt", "no image could be decoded: all 1 selected files were skipped"),
])
def test_data_errors_are_one_line(tmp_path, fake_model, kind, message):
    result = invoke("red", *_layout(kind, tmp_path), "--workers", "0", "--modes", "original")
    assert_one_line_error(result, message)


@pytest.mark.parametrize("args, message", [
    (["--modes", "original,dense"], "unknown mode 'dense'"),
    (["--sampler", "zigzag"], "unknown --sampler 'zigzag'"),
    (["--mean", "0.5,0.5"], "--mean must be 3 comma-separated numbers"),
    (["--limit", "0"], "--limit must be a positive"),
    (["--device", "cpu", "--amp"], "--amp needs a CUDA device"),
    (["--device", "tpu"], "unknown --device 'tpu'"),
    (["--json", "/nonexistent-dir/r.json"], "directory /nonexistent-dir does not exist"),
])
def test_option_errors_are_one_line(tmp_path, fake_model, args, message):
    data = make_folder(tmp_path / "val", [(0, 0)])
    assert_one_line_error(invoke("red", "--data", data, "--workers", "0", *args), message)


@pytest.mark.parametrize("args, message", [
    # options that would change nothing are refused, naming the flag
    (["--seed", "3"], "--seed would do nothing"),  # lattice sampler, no --consistency
    (["--modes", "original,dilated", "--density", "3"], "--density only shapes checkered submaps"),
    (["--modes", "original,dilated", "--sampler", "random"], "--sampler only shapes checkered submaps"),
    (["--modes", "original", "--seed", "3"], "--seed only shapes checkered submaps"),
    (["--modes", "original", "--keep-first", "1"], "--keep-first only shapes conversions"),
    (["--modes", "original", "--leaf", "Gate"], "--leaf only shapes conversions"),
])
def test_options_that_would_do_nothing_are_one_line_errors(tmp_path, fake_model, args, message):
    data = make_folder(tmp_path / "val", [(0, 0)])
    assert_one_line_error(invoke("red", "--data", data, "--workers", "0", *args), message)
    assert fake_model["convert"] == []


def test_seed_with_consistency_only_places_the_crops(tmp_path, fake_model):
    data = make_folder(tmp_path / "val", [(0, 0), (1, 1)])
    out = tmp_path / "r.json"
    result = invoke("red", "--data", data, "--workers", "0", "--seed", "7", "--consistency", "--json", out)
    assert result.exit_code == 0, result.output
    assert [spec for spec, _ in fake_model["convert"]] == [ConversionSpec("checkered")]  # no seed: lattice
    assert json.loads(out.read_text())["settings"]["consistency_protocol"]["seed"] == 7


def test_json_is_not_overwritten_without_force(tmp_path, fake_model):
    data = make_folder(tmp_path / "val", [(0, 0)])
    out = tmp_path / "r.json"
    out.write_text("keep me")
    result = invoke("red", "--data", data, "--workers", "0", "--json", out)
    assert_one_line_error(result, "already exists (set --force to overwrite it)")
    assert out.read_text() == "keep me" and fake_model["resolve"] == []  # refused before the run
    result = invoke("red", "--data", data, "--workers", "0", "--json", out, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["model"] == "red"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "val"]  # no temporary left


def test_json_naming_a_directory_says_so(tmp_path, fake_model):
    data = make_folder(tmp_path / "val", [(0, 0)])
    (tmp_path / "out").mkdir()
    for extra in ([], ["--force"]):
        result = invoke("red", "--data", data, "--workers", "0", "--json", tmp_path / "out", *extra)
        assert_one_line_error(result, f"cannot write {tmp_path / 'out'}: it is a directory")
    assert fake_model["resolve"] == []


def test_notes_are_logged_one_line_each(tmp_path, fake_model):
    from ccnn_convert.cli._common import setup_logging

    setup_logging()  # what run_app does; CliRunner does not go through run_app
    data = make_folder(tmp_path / "val", [(0, 0)])
    result = invoke("red", "--data", data, "--workers", "0", "--keep-first", "2", "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert "converting to checkered (sampler=lattice, keep_first=2)" in result.stderr
    assert "red: modes original, checkered on cpu; all 1 file" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_but_absent(tmp_path, fake_model):
    data = make_folder(tmp_path / "val", [(0, 0)])
    result = invoke("red", "--data", data, "--device", "cuda")
    assert_one_line_error(result, "--device cuda was requested but CUDA is not available")


def test_onnx_without_the_export_module(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ccnn_convert.export.sessions", None)  # as if it could not be imported
    data = make_folder(tmp_path / "val", [(0, 0)])
    result = invoke(tmp_path / "model.onnx", "--data", data, "--device", "cpu")
    assert_one_line_error(result, "ONNX evaluation needs ONNX Runtime")


def test_onnx_goes_through_the_export_hook(tmp_path, monkeypatch):
    class FakeExport:
        @staticmethod
        def load_onnx_classifier(path):
            model = RedLevelClassifier()
            return (lambda batch: model(batch).numpy()), small_preprocessing(), f"onnx:{Path(path).name}"

    monkeypatch.setitem(sys.modules, "ccnn_convert.export.sessions", FakeExport)
    data = make_folder(tmp_path / "val", [(0, 0), (1, 1)])
    out = tmp_path / "r.json"
    result = invoke(tmp_path / "m.onnx", "--data", data, "--device", "cpu", "--workers", "0", "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["model"] == "onnx:m.onnx" and report["results"][0]["top1"] == 100.0
    assert report["results"][0]["flops"] is None
    assert report["results"][0]["mode"] == "onnx"  # what ran, not a PyTorch "original"
    assert report["results"][0]["top1_change"] is None  # nothing to compare it with
    result = invoke(tmp_path / "m.onnx", "--data", data, "--modes", "original,checkered", "--workers", "0")
    assert_one_line_error(result, "an ONNX model can only be evaluated as it is")


# ------------------------------------------------------------------------------ a real model


def _plain_top1(model: nn.Module, pre, paths_and_targets) -> int:
    """An independent loop: PIL -> torchvision transforms -> model, in one batch."""
    transform = T.Compose([
        T.Resize(pre.resize, interpolation=T.InterpolationMode(pre.interpolation)),
        T.CenterCrop(pre.crop), T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    images = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in paths_and_targets])
    targets = torch.tensor([target for _, target in paths_and_targets])
    with torch.no_grad():
        return int((model(images).argmax(1) == targets).sum())


@pytest.mark.slow
def test_efficientnet_lite0_on_the_imagenet_sample(tmp_path):
    models = pytest.importorskip("ccnn_convert.models")
    pytest.importorskip("ccnn_convert.core.rewrite")
    if not SAMPLE_VAL.is_dir():
        pytest.skip("shared ImageNet sample not present")
    # 16 classes spread over the sample, linked into a folder of their own (labels come from the
    # shared class list, not from the package).
    standard = {line.split("\t")[1]: int(line.split("\t")[0])
                for line in (SAMPLE_VAL.parent / "classes.tsv").read_text().splitlines() if line.strip()}
    chosen = []
    for folder in sorted(SAMPLE_VAL.iterdir())[::16]:
        image = next(folder.iterdir())
        (tmp_path / "val" / folder.name).mkdir(parents=True)
        (tmp_path / "val" / folder.name / image.name).symlink_to(image)
        chosen.append((image, standard[folder.name]))
    assert len(chosen) == 16

    out = tmp_path / "lite0.json"
    # keep_first=3 keeps the dilated model cheap (5.4 instead of 334 GFLOPs per image).
    result = invoke("efficientnet_lite0", "--data", tmp_path / "val", "--modes", "original,checkered,dilated",
                    "--keep-first", "3", "--batch-size", "16", "--workers", "0", "--device", "cpu",
                    "--json", out)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rows = {r["mode"]: r for r in report["results"]}
    assert set(rows) == {"original", "checkered", "dilated"}
    assert all(r["images"] == 16 and r["top1"] is not None for r in rows.values())
    assert rows["checkered"]["conversion"]["keep_first"] == 3

    resolved = models.resolve_model("efficientnet_lite0")
    assert rows["original"]["top1_correct"] == _plain_top1(resolved.model.eval(), resolved.preprocessing, chosen)
    assert rows["original"]["top1"] > 50  # a pretrained model on (training-split) ImageNet images
    assert rows["dilated"]["flops"] > rows["checkered"]["flops"] > rows["original"]["flops"]
