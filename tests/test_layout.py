"""The layout's rules (issue 10), checked so that they stay true."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ccnn_convert"
LIBRARY = sorted(p for p in PACKAGE.rglob("*.py") if "cli" not in p.relative_to(PACKAGE).parts)
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")


def _strings(path: Path) -> list[str]:
    return [node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_modules_do_not_speak_in_flags(path):
    flags = sorted({flag for text in _strings(path) for flag in FLAG.findall(text)})
    assert flags == [], f"{path.name} mentions {flags}; raise ParameterError naming the parameter instead"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_are_small_enough_to_read_in_one_sitting(path):
    assert len(path.read_text().splitlines()) <= 500


def test_the_flag_pattern_finds_flags():  # the two tests above would pass vacuously otherwise
    assert FLAG.findall("use --force or --keep-first 2, not x--y or ---") == ["--force", "--keep-first"]


def test_evaluation_never_imports_the_exporter():
    code = ("import sys, ccnn_convert.evaluate, ccnn_convert.export.sessions\n"
            "print(sorted(m for m in sys.modules if m.startswith('ccnn_convert.export')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "ccnn_convert.export.sessions" in loaded
    assert "exporter" not in loaded and "pipeline" not in loaded and "opset" not in loaded


def test_importing_the_package_does_not_load_torch():
    code = "import sys, ccnn_convert, ccnn_convert.cli.entry; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
