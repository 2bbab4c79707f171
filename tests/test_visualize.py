"""ccnn_convert.visualize and ccnn-visualize: sample positions against hand-drawn grids and
against what a converted model really computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from ccnn_convert import convert
from ccnn_convert.cli.visualize import app
from ccnn_convert.errors import ParameterError
from ccnn_convert.spec import ConversionSpec
from ccnn_convert.visualize import (compose_offsets, feature_submaps, input_position, plot_positions, sampling_map,
                                    step_table, submap_offsets)

runner = CliRunner()
_ = -1  # "no submap samples this position" in the hand-drawn grids


def grid(text: str) -> np.ndarray:
    return np.array([[_ if c == "." else int(c) for c in row.split()] for row in text.strip().splitlines()])


def test_compose_offsets_by_hand():
    assert compose_offsets([], []) == (0, 0)
    assert compose_offsets([(1, 1)], [2]) == (1, 1)
    assert compose_offsets([(1, 1), (0, 1)], [2, 2]) == (1, 1 + 2 * 1)
    assert compose_offsets([(1, 0), (2, 1)], [2, 3]) == (1 + 2 * 2, 0 + 2 * 1)
    assert compose_offsets([(0, 1), (1, 0), (1, 1)], [2, 2, 2]) == (0 + 2 + 4, 1 + 0 + 4)
    # output position (1, 2) of that submap: origin + 8 * (1, 2)
    assert input_position((1, 2), [(0, 1), (1, 0), (1, 1)], [2, 2, 2]) == (6 + 8, 5 + 16)


def test_offsets_follow_the_submap_numbering_of_the_conversion():
    # After a step on S submaps, sample j of submap i becomes submap j*S + i.
    # naive, 2 steps: sampler (0,0),(1,1) everywhere.
    assert submap_offsets("naive", 2) == [[(0, 0), (0, 0)], [(1, 1), (0, 0)], [(0, 0), (1, 1)], [(1, 1), (1, 1)]]
    assert submap_offsets("traditional", 3) == [[(0, 0)] * 3]
    assert len(submap_offsets("dilated", 2)) == 16
    assert submap_offsets("naive", 0) == [[]]


def test_one_checkered_step_by_hand():
    assert (sampling_map("naive", 4, 1) == grid("""
        0 . 0 .
        . 1 . 1
        0 . 0 .
        . 1 . 1
    """)).all()


def test_two_naive_steps_by_hand():
    # origins: submap 0 (0,0), 1 (1,1), 2 (0,0)+2*(1,1) = (2,2), 3 (3,3); period 4.
    expected = grid("""
        0 . . . 0 . . .
        . 1 . . . 1 . .
        . . 2 . . . 2 .
        . . . 3 . . . 3
        0 . . . 0 . . .
        . 1 . . . 1 . .
        . . 2 . . . 2 .
        . . . 3 . . . 3
    """)
    assert (sampling_map("naive", 8, 2) == expected).all()


def test_three_lattice_steps_by_hand():
    # Steps 1-2 as naive (the reference lattice for S=1 and S=2 is all sampler 0). Step 3 on S=4
    # uses samplers [0, 1, 0, 1]; sampler 1 is (0,1),(1,0), scaled by 4:
    #   submap 1 = (1,1) + (0,4) = (1,5),  submap 5 = (1,1) + (4,0) = (5,1)
    #   submap 3 = (3,3) + (0,4) = (3,7),  submap 7 = (3,3) + (4,0) = (7,3)
    #   submaps 0,4 = (0,0),(4,4); submaps 2,6 = (2,2),(6,6)
    expected = grid("""
        0 . . . . . . .
        . . . . . 1 . .
        . . 2 . . . . .
        . . . . . . . 3
        . . . . 4 . . .
        . 5 . . . . . .
        . . . . . . 6 .
        . . . 7 . . . .
    """)
    assert (sampling_map("lattice", 8, 3) == expected).all()


def test_traditional_and_dilated_by_hand():
    expected = np.full((8, 8), _)
    expected[::4, ::4] = 0
    assert (sampling_map("traditional", 8, 2) == expected).all()
    dilated = sampling_map("dilated", 4, 1)  # submap = row-major offset index within the 2x2 window
    assert (dilated == grid("""
        0 1 0 1
        2 3 2 3
        0 1 0 1
        2 3 2 3
    """)).all()


def test_positions_outside_the_image_are_not_drawn():
    # 5x5, one step: submap size ceil(5/2) = 3; submap 1's third sample (row/col 5) is off the image.
    assert (sampling_map("naive", 5, 1) == grid("""
        0 . 0 . 0
        . 1 . 1 .
        0 . 0 . 0
        . 1 . 1 .
        0 . 0 . 0
    """)).all()


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["naive", "lattice", "random"]), steps=st.integers(1, 4), seed=st.integers(0, 1000),
       cells=st.integers(1, 2))
def test_checkered_sequences_are_n_rooks_in_every_cell(kind, steps, seed, cells):
    period = 2 ** steps
    mapping = sampling_map(kind, period * cells, steps, seed=seed)
    for cy in range(cells):
        for cx in range(cells):
            cell = mapping[cy * period:(cy + 1) * period, cx * period:(cx + 1) * period]
            sampled = cell != _
            assert (sampled.sum(axis=0) == 1).all() and (sampled.sum(axis=1) == 1).all()  # n-rooks
            assert sorted(cell[sampled].tolist()) == list(range(period))  # every submap once
    # every submap samples exactly its own lattice: origin + period * (y, x)
    for submap, offsets in enumerate(submap_offsets(kind, steps, seed=seed)):
        oy, ox = compose_offsets(offsets, [2] * steps)
        ys, xs = np.nonzero(mapping == submap)
        assert sorted(zip(ys.tolist(), xs.tolist())) == [(oy + period * y, ox + period * x)
                                                         for y in range(cells) for x in range(cells)]


class PickEvery2(nn.Module):
    """Three stride-2 'pick' layers (1x1 max pools): the output is exactly the sampled input."""

    def __init__(self):
        super().__init__()
        self.p1, self.p2, self.p3 = nn.MaxPool2d(1, 2), nn.MaxPool2d(1, 2), nn.MaxPool2d(1, 2)

    def forward(self, x):
        return self.p3(self.p2(self.p1(x)))


@pytest.mark.parametrize("kind,seed", [("naive", None), ("lattice", None), ("random", 3), ("random", 11)])
def test_positions_are_what_the_converted_model_samples(kind, seed):
    size, steps = 16, 3
    index = torch.arange(size * size, dtype=torch.float32).reshape(1, 1, size, size)
    converted = convert(PickEvery2(), mode="checkered", sampler=kind, seed=seed, example_input=index).eval()
    captured = {}
    converted.get_submodule("p3").register_forward_hook(lambda m, i, out: captured.setdefault("out", out))
    with torch.no_grad():
        converted(index)
    out = captured["out"]  # (submaps * batch, 1, 2, 2), submap-major
    mapping = sampling_map(kind, size, steps, seed=seed)
    assert out.shape[0] == 8
    for submap in range(8):
        seen = sorted(int(v) for v in out[submap].flatten())
        ys, xs = np.nonzero(mapping == submap)
        assert seen == sorted((ys * size + xs).tolist())


def test_step_table():
    rows = step_table(224, 5)
    assert [r.resolution for r in rows] == [(224, 224), (112, 112), (56, 56), (28, 28), (14, 14), (7, 7)]
    assert [r.submaps for r in rows] == [1, 2, 4, 8, 16, 32]
    assert rows[5].positions == 32 * 49 and rows[5].ratio == 32
    assert [r.submaps for r in step_table(7, 2, kind="dilated")] == [1, 4, 16]
    assert [r.resolution for r in step_table(7, 2)] == [(7, 7), (4, 4), (2, 2)]
    assert [r.submaps for r in step_table(8, 2, kind="traditional")] == [1, 1, 1]


class MeanThenPick(nn.Module):
    """Step 1: channel mean + pick (1x1 conv, stride 2, weights 1/3). Step 2: another pick."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 1, 1, stride=2, bias=False)
        self.c2 = nn.Conv2d(1, 1, 1, stride=2, bias=False)
        nn.init.constant_(self.c1.weight, 1 / 3)
        nn.init.constant_(self.c2.weight, 1.0)

    def forward(self, x):
        return self.c2(self.c1(x))


def test_feature_submaps_show_each_submaps_samples():
    image = torch.arange(64, dtype=torch.float32).reshape(1, 8, 8).repeat(3, 1, 1)  # value = y*8 + x
    maps = feature_submaps(MeanThenPick(), image, step=1, conversion=ConversionSpec("checkered", sampler="naive"))
    assert maps.shape == (2, 4, 4)
    mapping = sampling_map("naive", 8, 1)
    for submap in range(2):
        ys, xs = np.nonzero(mapping == submap)
        assert sorted(maps[submap].flatten().round().long().tolist()) == sorted((ys * 8 + xs).tolist())
    with pytest.raises(ParameterError, match="step must be between 1 and 1"):
        feature_submaps(MeanThenPick(), image, step=2)


def test_plot_positions_writes_a_png_of_the_expected_size(tmp_path):
    path = plot_positions(tmp_path / "p.png", size=8, steps=2, kinds=("traditional", "lattice"), dpi=100)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        # 1.6 in per panel: 2 columns + 0.9 in, 2 rows + 0.3 in, at 100 dpi
        assert image.format == "PNG" and image.size == (410, 350)
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]


# ------------------------------------------------------------------------------ the CLI


def _one_error_line(result, needle: str) -> None:
    assert result.exit_code != 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error:") and needle in errors[0]


def test_cli_positions_prints_the_step_table_and_writes_the_picture(tmp_path):
    out = tmp_path / "pos.png"
    result = runner.invoke(app, ["positions", "--size", "8", "--steps", "2", "--kinds", "naive", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "submap size" in result.stdout and "4x4" in result.stdout and "2x2" in result.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,needle", [
    (["positions", "--kinds", "zigzag", "--out", "x.png"], "unknown sequence kind 'zigzag'"),
    (["positions", "--out", "picture.jpg"], ".png"),
    (["features", "no_such_model_xyz", "--image", "{image}", "--out", "{out}"], "no_such_model_xyz"),
    (["features", "resnet18", "--mode", "zigzag", "--image", "{image}", "--out", "{out}"], "unknown mode 'zigzag'"),
    (["features", "resnet18", "--weights", "none", "--image", "{bad}", "--out", "{out}"], "cannot read image"),
])
def test_cli_errors_are_one_line(tmp_path, args, needle):
    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32)).save(image)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    args = [a.format(image=image, bad=bad, out=tmp_path / "f.png") for a in args]
    _one_error_line(runner.invoke(app, args), needle)
    assert not (tmp_path / "f.png").exists()


# ------------------------------------------------------------------------------ issue 9: outputs, trust, leaves


def test_cli_out_refuses_to_overwrite_without_force(tmp_path):
    out = tmp_path / "pos.png"
    out.write_bytes(b"earlier picture")
    args = ["positions", "--size", "4", "--steps", "1", "--kinds", "naive", "-o", str(out)]
    result = runner.invoke(app, args)
    _one_error_line(result, "--force")
    assert result.exit_code == 2 and "already exists" in result.stderr
    assert out.read_bytes() == b"earlier picture"
    assert [p.name for p in tmp_path.iterdir()] == ["pos.png"]

    result = runner.invoke(app, [*args, "--force"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name", ["pictures", "pictures.png"])
def test_cli_out_naming_a_directory_says_so(tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    for extra in ([], ["--force"]):
        result = runner.invoke(app, ["positions", "--size", "4", "--steps", "1", "-o", str(folder), *extra])
        _one_error_line(result, "it is a directory")
        assert result.exit_code == 2 and "--force" not in result.stderr
    assert folder.is_dir() and list(folder.iterdir()) == []


GATED_FACTORY = """
import pathlib
from torch import nn


class Gate(nn.Module):
    def forward(self, x):
        if x.mean() > 0:  # branches on its input: fx cannot trace it, --leaf Gate is needed
            return x
        return -x


def make():
    pathlib.Path(__file__).with_name("SENTINEL").write_text("factory ran")
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), Gate(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                         nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10))
"""


def _factory_and_image(tmp_path, filename: str, source: str):
    """A factory file (MODEL ``path.py:make``) and a 40x40 image beside it."""
    (tmp_path / filename).write_text(source)
    image = tmp_path / "img.png"
    Image.new("RGB", (40, 40), (200, 30, 90)).save(image)
    return f"{tmp_path / filename}:make", image


def _gated(tmp_path):
    return _factory_and_image(tmp_path, "gated.py", GATED_FACTORY)


def test_cli_features_leaf_makes_an_untraceable_model_usable(tmp_path):
    model, image = _gated(tmp_path)
    out = tmp_path / "f.png"
    args = ["features", model, "--image", str(image), "--step", "1", "-o", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and not out.exists()
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    result = runner.invoke(app, [*args, "--leaf", "Gate"])
    assert result.exit_code == 0, result.output
    assert "2 submaps" in result.stdout and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = runner.invoke(app, [*args, "--leaf", "Gate"])  # the picture is there now
    _one_error_line(result, "--force")
    assert runner.invoke(app, [*args, "--leaf", "Gate", "--force"]).exit_code == 0


def test_cli_features_artifact_factory_runs_only_with_trust_and_keeps_its_leaves(tmp_path):
    from ccnn_convert.models import resolve_model, save_artifact

    model, image = _gated(tmp_path)
    artifact = tmp_path / "gated.pt"
    save_artifact(artifact, resolve_model(model, weights="none"), ConversionSpec("checkered", leaf_modules=("Gate",)))
    sentinel = tmp_path / "SENTINEL"
    sentinel.unlink()
    out = tmp_path / "f.png"
    args = ["features", str(artifact), "--image", str(image), "--step", "1", "-o", str(out)]
    result = runner.invoke(app, args)
    _one_error_line(result, "--trust-factory")
    assert result.exit_code == 2 and not sentinel.exists() and not out.exists()
    result = runner.invoke(app, [*args, "--trust-factory"])  # no --leaf: the artifact's list is used
    assert result.exit_code == 0, result.output
    assert sentinel.exists() and out.exists()


# --------------------------------------------------------------------------- dense maps


@pytest.mark.parametrize("mode, filled", [("checkered", 32), ("dilated", 64)])
def test_dense_feature_map_puts_each_sample_where_it_was_taken(mode, filled):
    from ccnn_convert.visualize import dense_feature_map

    image = torch.arange(64, dtype=torch.float32).reshape(1, 8, 8).repeat(3, 1, 1)  # value = y*8 + x
    dense = dense_feature_map(MeanThenPick(), image, step=1, conversion=ConversionSpec(mode, sampler="naive")
                              if mode == "checkered" else ConversionSpec(mode))
    assert dense.values.shape == (1, 1, 8, 8) and dense.stride == 1
    assert int(dense.mask.sum()) == filled
    if mode == "checkered":  # the naive sampler's positions, drawn by hand above
        assert torch.equal(dense.mask, torch.from_numpy(sampling_map("naive", 8, 1) != _))
    # Every filled position holds the image value sampled there; the rest is 0.
    expected = torch.arange(64, dtype=torch.float32).reshape(8, 8) * dense.mask
    torch.testing.assert_close(dense.values[0, 0], expected)


SMALL_FACTORY = """
from torch import nn

def make():
    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 10))
"""


def _small(tmp_path):
    return _factory_and_image(tmp_path, "small.py", SMALL_FACTORY)


def test_cli_features_dense_shows_checkered_beside_dilated(tmp_path):
    model, image = _small(tmp_path)
    out = tmp_path / "dense.png"
    args = ["features", model, "--image", str(image), "--step", "2", "--dense", "--weights", "none"]
    result = runner.invoke(app, [*args, "-o", str(out)])
    assert result.exit_code == 0, result.output
    # 224 crop: 224 -> 112 -> 56 entering step 3; 4 checkered submaps of 56x56 on the 224x224 grid.
    size, sub = 224, 56
    assert f"{size}x{size} dense map, stride 1, {4 * sub * sub} of {size * size} positions filled" in result.stdout
    assert f"{size * size} of {size * size} positions filled" in result.stdout
    with Image.open(out) as png:
        assert png.size == (780, 310)  # fixed pixel size: 3 panels of 2.6 x 3.1 inches at 100 dpi


def test_cli_features_dilation_applies_to_the_dilated_panel_only(tmp_path):
    model, image = _small(tmp_path)
    args = ["features", model, "--image", str(image), "--step", "2", "--weights", "none", "--dilation", "native"]
    result = runner.invoke(app, [*args, "--dense", "-o", str(tmp_path / "a.png")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*args, "-o", str(tmp_path / "b.png")])  # checkered alone: --dilation does nothing
    _one_error_line(result, "--dilation")
