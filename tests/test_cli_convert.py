"""ccnn-convert end to end: table, artifact, and one-line errors with no output left behind."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import torch
import torchvision
from typer.testing import CliRunner

from ccnn_convert import convert
from ccnn_convert.cli._common import setup_logging
from ccnn_convert.cli.convert import app
from ccnn_convert.models import load_artifact

runner = CliRunner()


def _run(*args):
    return runner.invoke(app, list(args))


def test_convert_prints_layers_and_saves_a_reloadable_artifact(tmp_path):
    out = tmp_path / "r18.pt"
    result = _run("resnet18", "--weights", "none", "--input-size", "64", "--keep-first", "1", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert "layer2.0.downsample.0" in result.output
    assert "final submaps: 16" in result.output  # 4 converted steps of 2 samples
    assert "unchanged" in result.output
    assert out.exists() and not [p for p in tmp_path.iterdir() if p.name != "r18.pt"]
    # weights_only loading: no pickled code is executed.
    raw = torch.load(out, weights_only=True)
    assert raw["conversion"]["keep_first"] == 1
    resolved = load_artifact(out)
    rebuilt = convert(resolved.model, example_input=torch.zeros(1, 3, 64, 64), **resolved.conversion.convert_kwargs())
    reference = torchvision.models.resnet18()
    reference.load_state_dict(raw["state_dict"])
    expected = convert(reference.eval(), mode="checkered", keep_first=1, example_input=torch.zeros(1, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), expected(x))


def _assert_one_line_error(result, text):
    assert result.exit_code != 0
    output = result.output
    assert text in output, output
    assert "Traceback" not in output
    assert len([line for line in output.strip().splitlines() if line.strip()]) <= 2, output


def test_unknown_model_suggests_names(tmp_path):
    result = _run("resnt18", "-o", str(tmp_path / "x.pt"))
    _assert_one_line_error(result, "did you mean")
    assert not list(tmp_path.iterdir())


def test_bad_mode_sampler_density():
    _assert_one_line_error(_run("resnet18", "--weights", "none", "--mode", "sparse"), "unknown --mode 'sparse'")
    _assert_one_line_error(_run("resnet18", "--weights", "none", "--sampler", "sobol"), "unknown --sampler 'sobol'")
    _assert_one_line_error(_run("resnet18", "--weights", "none", "--density", "9"), "density 9")


def test_too_small_input_names_the_layer(tmp_path):
    result = _run("alexnet", "--weights", "none", "--input-size", "32", "-o", str(tmp_path / "a.pt"))
    _assert_one_line_error(result, "too small")
    assert "features.12" in result.output
    assert not list(tmp_path.iterdir())


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "x.pt"
    out.write_bytes(b"keep me")
    _assert_one_line_error(_run("resnet18", "--weights", "none", "--input-size", "32", "-o", str(out)), "--force")
    assert out.read_bytes() == b"keep me"


def test_missing_output_directory(tmp_path):
    result = _run("resnet18", "--weights", "none", "--input-size", "32", "-o", str(tmp_path / "no" / "x.pt"))
    _assert_one_line_error(result, "does not exist")


def test_untraceable_factory_suggests_a_leaf(tmp_path):
    source = tmp_path / "net.py"
    source.write_text(
        "import torch\n"
        "class Gate(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x if x.sum() > 0 else -x\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.gate = Gate()\n"
        "        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)\n"
        "    def forward(self, x):\n"
        "        return self.conv(self.gate(x)).mean((2, 3))\n"
        "def build():\n"
        "    return Net()\n")
    result = _run(f"{source}:build", "--input-size", "16")
    _assert_one_line_error(result, "--leaf Gate")
    out = tmp_path / "gated.pt"
    fixed = _run(f"{source}:build", "--input-size", "16", "--leaf", "Gate", "-o", str(out))
    assert fixed.exit_code == 0, fixed.output
    assert "converted" in fixed.output
    # The artifact keeps the leaf list, so reloading and converting again needs no --leaf.
    assert torch.load(out, weights_only=True)["conversion"]["leaf_modules"] == ["Gate"]
    loaded = load_artifact(out, trust_factory=True)
    assert loaded.conversion.leaf_modules == ("Gate",)
    again = _run(str(out), "--trust-factory", "--input-size", "16")
    assert again.exit_code == 0, again.output
    assert "converted" in again.output


def test_options_that_would_do_nothing_are_refused(tmp_path):
    out = tmp_path / "x.pt"
    density = _run("resnet18", "--weights", "none", "--mode", "traditional", "--density", "2", "-o", str(out))
    _assert_one_line_error(density, "--density")
    assert "traditional" in density.output
    seed = _run("resnet18", "--weights", "none", "--sampler", "lattice", "--seed", "3", "-o", str(out))
    _assert_one_line_error(seed, "--seed only seeds the random sampler")
    sampler = _run("resnet18", "--weights", "none", "--mode", "dilated", "--sampler", "naive")
    _assert_one_line_error(sampler, "--sampler")
    assert not out.exists()


def test_output_naming_a_directory_says_so(tmp_path):
    result = _run("resnet18", "--weights", "none", "--input-size", "32", "-o", str(tmp_path))
    _assert_one_line_error(result, "is a directory")
    assert "--force" not in result.output
    forced = _run("resnet18", "--weights", "none", "--input-size", "32", "-o", str(tmp_path), "--force")
    _assert_one_line_error(forced, "is a directory")


def test_options_that_do_nothing_here_warn_once(monkeypatch):
    logger = logging.getLogger("ccnn_convert")
    for name in ("handlers", "propagate", "level"):  # restored afterwards for the other tests
        monkeypatch.setattr(logger, name, getattr(logger, name))
    monkeypatch.setattr(logger, "handlers", list(logger.handlers))
    setup_logging()  # what run_app installs: the engine's warnings become `warning:` lines
    result = _run("resnet18", "--weights", "none", "--input-size", "32", "--keep-first", "9", "--leaf", "Nope")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, result.output
    assert "warning: leaf module 'Nope' matches nothing in the model" in warnings
    keep = [line for line in warnings if "keep_first" in line.lower() or "keep-first" in line.lower()]
    assert len(keep) == 1 and "9" in keep[0], warnings


def test_keep_first_without_a_conversion_and_edges_with_dilated_are_refused(tmp_path):
    """Dilated mode is always exact at the edges, and traditional mode has no steps to keep."""
    out = tmp_path / "x.pt"
    for args, flag in ((["--mode", "traditional", "--keep-first", "2"], "--keep-first"),
                       (["--mode", "dilated", "--edges", "exact"], "--edges")):
        result = _run("resnet18", "--weights", "none", "--input-size", "32", *args, "-o", str(out))
        _assert_one_line_error(result, f"{flag} ")
        assert result.exit_code == 2 and ("does nothing" in result.output or "only shapes" in result.output)
        assert not out.exists()


def test_an_unwritable_output_folder_is_refused_before_converting(tmp_path, monkeypatch):
    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc (a folder no one can create files in, root included)")

    def refuse(*args, **kwargs):
        raise AssertionError("the model was resolved before the output was checked")

    monkeypatch.setattr("ccnn_convert.cli.convert.resolve_model", refuse)
    result = _run("resnet18", "--weights", "none", "--input-size", "32", "-o", "/proc/x.pt")
    _assert_one_line_error(result, "cannot write /proc/x.pt: directory /proc is not writable")
    assert result.exit_code == 2


def test_a_dangling_symlink_output_needs_force(tmp_path):
    link = tmp_path / "out.pt"
    link.symlink_to(tmp_path / "missing.pt")
    result = _run("resnet18", "--weights", "none", "--input-size", "32", "-o", str(link))
    _assert_one_line_error(result, "is a link to a missing file (set --force to replace the link)")
    assert link.is_symlink() and not (tmp_path / "missing.pt").exists()
    forced = _run("resnet18", "--weights", "none", "--input-size", "32", "-o", str(link), "--force")
    assert forced.exit_code == 0, forced.output
    assert not link.is_symlink() and link.is_file()
