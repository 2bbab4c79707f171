"""What every command prints: strings read from files are escaped, help texts keep their defaults,
every command module runs under ``python -m``."""

from __future__ import annotations

import ast
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from ccnn_convert.cli import _common
from ccnn_convert.cli.convert import app as convert_app

runner = CliRunner()


# Retitles the terminal (OSC), clears the screen (CSI), and rich markup that must stay literal.
HOSTILE = "\x1b]0;TITLE\x07[bold red]boom[/]\x1b[2J\u202eevil"


def _artifact(path, name=HOSTILE):
    """A squeezenet artifact (library source: loading runs no user code) with a chosen name."""
    torch.save({"format": "ccnn-convert-artifact", "version": 3, "name": name, "weights": "none",
                "spec": {"source": "torchvision", "name": "squeezenet1_1", "weights_enum": None},
                "conversion": {"mode": "checkered"}, "num_classes": 1000,
                "preprocessing": {"resize": 36, "crop": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
                                  "interpolation": "bilinear"},
                "state_dict": torchvision.models.squeezenet1_1().state_dict()}, path)
    return path


def _assert_no_controls(text: str) -> None:
    bad = sorted({hex(ord(c)) for c in text if ord(c) < 0x20 and c not in "\n" or 0x7f <= ord(c) < 0xa0
                  or c == "\u202e"})
    assert not bad, (bad, text)


def test_printable_escapes_every_control_character():
    # Independent expectation: Python's own escapes of the same characters.
    assert _common.printable("a\x1b]0;T\x07b\x9bc\u202ed\te") == "a\\x1b]0;T\\x07b\\x9bc\\u202ed\\x09e"
    assert _common.printable("[bold]ü 名前[/]") == "[bold]ü 名前[/]"  # printable text is untouched


def test_an_artifact_name_reaches_the_terminal_escaped_and_not_as_markup(tmp_path):
    artifact = _artifact(tmp_path / "evil.pt")
    result = runner.invoke(convert_app, [str(artifact), "--input-size", "32"])
    assert result.exit_code == 0, result.output
    _assert_no_controls(result.output)
    # The title shows the name as written, escapes visible, markup literal.
    assert "\\x1b]0;TITLE\\x07[bold red]boom[/]\\x1b[2J\\u202eevil" in result.output, result.output


def test_error_and_log_lines_escape_what_they_quote(capsys):
    with pytest.raises(Exception):
        raise _common.fail("bad name \x1b]0;X\x07 in [red]file[/]")
    logger = logging.getLogger("ccnn_convert.test")
    _common.setup_logging()
    logger.warning("class folder \x1b[31mred\x1b[0m")
    logger.info("note \x9b2J")
    err = capsys.readouterr().err
    _assert_no_controls(err)
    assert "bad name \\x1b]0;X\\x07 in [red]file[/]" in err
    assert "class folder \\x1b[31mred\\x1b[0m" in err and "note \\x9b2J" in err


# --------------------------------------------------------------------------- a factory's exit


@pytest.mark.parametrize("source, model", [
    (None, "builtins:exit"),
    ("import sys, torch\ndef make():\n    sys.exit(0)\n", "FILE:make"),
    ("import sys\nsys.exit(3)\ndef make():\n    pass\n", "FILE:make"),
])
def test_a_factory_that_exits_is_an_error(tmp_path, source, model):
    if source is not None:
        (tmp_path / "quits.py").write_text(source)
        model = model.replace("FILE", str(tmp_path / "quits.py"))
    out = tmp_path / "out.pt"
    result = runner.invoke(convert_app, [model, "--input-size", "32", "-o", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "exit(" in lines[0], result.output
    assert not out.exists()


# --------------------------------------------------------------------------- help under python -m

CLI_DIR = Path(_common.__file__).parent
HELP_RUNS = {  # module -> the --help invocations it serves
    "convert": [[]], "eval": [[]], "export": [[]], "bench": [[]], "train": [[]], "recalibrate": [[]],
    "visualize": [[], ["positions"], ["features"]],
}


def _help_strings(module: str) -> list[str]:
    """Every constant help="..." of a typer.Option/Argument in the module's source (read with ast,
    not through typer)."""
    tree = ast.parse((CLI_DIR / f"{module}.py").read_text())
    return [keyword.value.value for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("Option", "Argument")
            for keyword in node.keywords
            if keyword.arg == "help" and isinstance(keyword.value, ast.Constant)]


# Runs each command module as ``python -m`` does (runpy, as __main__) in one process, so that torch
# is imported once; prints {"module args": [exit code, output]} as JSON.
AS_MAIN = """
import contextlib, io, json, runpy, sys
results = {}
for module, args in json.loads(sys.argv[1]):
    sys.argv = [module, *args, "--help"]
    buffer, code = io.StringIO(), None
    with contextlib.redirect_stdout(buffer):
        try:
            runpy.run_module(f"ccnn_convert.cli.{module}", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
    results[" ".join([module, *args])] = [code, buffer.getvalue()]
print(json.dumps(results))
"""


def test_every_command_module_runs_under_python_m_and_its_help_keeps_every_text(tmp_path):
    assert sorted(HELP_RUNS) == sorted(p.stem for p in CLI_DIR.glob("*.py")
                                       if "def main()" in p.read_text() and p.stem != "entry")
    env = {**os.environ, "COLUMNS": "1000", "PYTHONPATH": str(CLI_DIR.parents[1]), "OMP_NUM_THREADS": "1"}
    invocations = [(module, args) for module, runs in HELP_RUNS.items() for args in runs]
    # One real `python -m` beside the runpy batch (the same mechanism: runpy._run_module_as_main).
    real = subprocess.Popen([sys.executable, "-m", "ccnn_convert.cli.convert", "--help"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    batch = subprocess.run([sys.executable, "-c", AS_MAIN, json.dumps(invocations)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert batch.returncode == 0, batch.stderr
    outputs = json.loads(batch.stdout)
    real_output = real.communicate(timeout=300)[0]
    assert real.returncode == 0 and real_output == outputs["convert"][1], real_output
    for key, (code, output) in outputs.items():
        assert code in (0, None) and "Usage:" in output, (key, code, output)
    for module in HELP_RUNS:
        shown = " ".join(" ".join(line.strip("│ ") for line in output.splitlines())
                         for key, (_, output) in outputs.items() if key.split()[0] == module)
        shown = " ".join(shown.split())
        for text in _help_strings(module):
            assert " ".join(text.split()) in shown, (module, text)
    assert "[default: 0.01 for sgd, 0.001 for adamw]" in outputs["train"][1]
    assert "Output .onnx path [default: <model>_<mode>.onnx]." in outputs["export"][1]


# --------------------------------------------------------------------------- messages that said something else


def test_a_string_version_is_not_reported_as_that_version(tmp_path):
    from ccnn_convert.errors import ModelResolutionError
    from ccnn_convert.models import load_artifact

    path = tmp_path / "v.pt"
    torch.save({"format": "ccnn-convert-artifact", "version": "3"}, path)
    with pytest.raises(ModelResolutionError) as info:
        load_artifact(path)
    assert "invalid artifact version '3'" in str(info.value) and "version-3" not in str(info.value)


def test_a_string_tensor_is_reported_as_a_string():
    from ccnn_convert.errors import ModelResolutionError
    from ccnn_convert.models.checkpoints import load_checked

    layer = torch.nn.Linear(2, 3)
    with pytest.raises(ModelResolutionError) as info:
        load_checked(layer, {"weight": torch.zeros(3, 2), "bias": "zeros"}, "checkpoint c.pt")
    assert "bias: a str, not a tensor in file, [3] in model" in str(info.value)


def test_the_convert_title_names_the_density(tmp_path):
    result = runner.invoke(convert_app, ["resnet18", "--weights", "none", "--input-size", "32", "--density", "3"])
    assert result.exit_code == 0, result.output
    assert "resnet18: checkered (lattice, density 3, reference edges), keep_first=0" in result.output


def test_a_dilated_export_names_no_sampler(tmp_path):
    import json

    import onnx

    from ccnn_convert.cli.export import app as export_app

    (tmp_path / "tiny.py").write_text("import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Conv2d("
                                      "3, 4, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())\n")
    out = tmp_path / "d.onnx"
    result = runner.invoke(export_app, [f"{tmp_path / 'tiny.py'}:make", "--mode", "dilated", "--no-verify",
                                        "--input-size", "16", "-o", str(out)])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert "(dilated, keep_first=0)" in first and "sampler" not in first, first
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["sampler"] == "" and json.loads(meta["conversion"])["mode"] == "dilated"
