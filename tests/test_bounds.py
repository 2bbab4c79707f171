"""Sizes, seeds and class counts that could not be allocated: one line and exit 2, before anything is."""

from __future__ import annotations

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from ccnn_convert.errors import CCNNError, ModelResolutionError
from ccnn_convert.models import load_artifact
from ccnn_convert.models.preprocessing import MAX_IMAGE_SIDE, Preprocessing

runner = CliRunner()
PREPROCESSING = {"resize": 36, "crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear"}


def _app(command):
    import importlib

    return importlib.import_module(f"ccnn_convert.cli.{command}").app


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fails the test if a command gets as far as resolving a model or running a benchmark."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was resolved before the bad option was refused")

    for target in ("ccnn_convert.cli.convert.resolve_model", "ccnn_convert.export.pipeline.resolve_model",
                   "ccnn_convert.cli.bench.run_bench", "ccnn_convert.evaluate.resolve_model"):
        monkeypatch.setattr(target, refuse)


def _one_line(result, *texts):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for text in texts:
        assert text in lines[0], result.output


@pytest.mark.parametrize("command, args, flag", [
    ("convert", ["resnet18", "--sampler", "random", "--seed", str(2**80)], "--seed"),
    ("convert", ["resnet18", "--sampler", "random", "--seed", str(2**64 - 1)], "--seed"),
    ("export", ["resnet18", "--sampler", "random", "--seed", str(2**64 - 1)], "--seed"),
    ("bench", ["resnet18", "--sampler", "random", "--seed", str(2**64 - 1)], "--seed"),
    ("convert", ["resnet18", "--input-size", "-5"], "--input-size"),
    ("convert", ["resnet18", "--input-size", "100000"], "--input-size"),
    ("export", ["resnet18", "--input-size", "100000"], "--input-size"),
    ("bench", ["resnet18", "--size", "100000"], "--size"),
    ("bench", ["resnet18", "--size", str(MAX_IMAGE_SIDE), "--batch-size", str(10**6)], "--batch-size"),
])
def test_sizes_and_seeds_out_of_range_are_refused_before_any_model(command, args, flag, nothing_loaded, tmp_path):
    _one_line(runner.invoke(_app(command), [*args, "--weights", "none"]), flag)


def test_an_eval_seed_out_of_range_is_refused_before_any_model(nothing_loaded, tmp_path):
    (tmp_path / "n01440764").mkdir()
    result = runner.invoke(_app("eval"), ["resnet18", "--data", str(tmp_path), "--sampler", "random",
                                          "--seed", str(2**64 - 1), "--weights", "none", "--workers", "0"])
    _one_line(result, "--seed must be an integer from 0 to 2**63 - 1")


def test_a_positions_picture_too_large_to_read_is_refused(tmp_path):
    out = tmp_path / "p.png"
    _one_line(runner.invoke(_app("visualize"), ["positions", "--size", "100000", "--out", str(out)]), "--size")
    assert not out.exists()


def test_the_largest_image_side_is_one_bound_for_preprocessing():
    assert Preprocessing(MAX_IMAGE_SIDE, MAX_IMAGE_SIDE, (0.5,) * 3, (0.5,) * 3).resize == MAX_IMAGE_SIDE
    for field in ("resize", "crop"):
        with pytest.raises(ModelResolutionError, match=f"{field} {MAX_IMAGE_SIDE + 1} is above"):
            Preprocessing.from_dict({**PREPROCESSING, field: MAX_IMAGE_SIDE + 1})


def _artifact(path, model, **changes):
    torch.save({"format": "ccnn-convert-artifact", "version": 3, "name": "m", "weights": "none",
                "spec": {"source": "torchvision", "name": model, "weights_enum": None},
                "conversion": {"mode": "checkered"}, "num_classes": 1000, "preprocessing": PREPROCESSING,
                "state_dict": getattr(torchvision.models, model)().state_dict(), **changes}, path)
    return path


@pytest.mark.parametrize("changes, message", [
    ({"num_classes": 10**12, "head": {"module": "classifier.3", "num_classes": 10**12}},
     "head 'classifier.3' of 1000000000000 classes, but its stored weight is of shape (1000, 1024)"),
    ({"num_classes": 10**12}, "no stored tensor has 1000000000000 rows"),
    ({"preprocessing": {**PREPROCESSING, "resize": 10**6}}, "resize 1000000 is above the largest image side"),
    ({"conversion": {"mode": "checkered", "sampler": "random", "seed": 2**64 - 1}},
     "seed must be an integer from 0 to 2**63 - 1"),
])
def test_an_artifact_with_sizes_that_could_not_be_allocated_is_refused(tmp_path, changes, message):
    path = _artifact(tmp_path / "a.pt", "mobilenet_v3_small", **changes)
    with pytest.raises(CCNNError) as info:
        load_artifact(path)
    assert message in str(info.value)
