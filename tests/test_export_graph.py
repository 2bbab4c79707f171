"""Exported graphs are clean, the export package is layered, and ccnn-export says things once.

* Issue 9 item 7: ONNX Runtime warned ``Removing initializer 'val_570'. It is not used by any
  node`` on every load of a converted export (the opset-17 rewrite leaves the Reduce axes
  behind). The graph must hold no initializer or node that no output needs, checked with onnx
  directly, and ORT must log no warning at all when it loads the file.
* Issue 9 item 6: the ``provider:`` line appears once in ccnn-export's output.
* Issue 10: ``ccnn-eval model.onnx`` imports ``export.sessions`` only, never the exporter; the
  library names parameters, and the CLI turns them into flags.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from ccnn_convert import export as ex
from ccnn_convert._helpers import captured_fds
from ccnn_convert.cli import _common
from ccnn_convert.cli.export import app

SIZE = 32
PACKAGE = Path(ex.__file__).parent
runner = CliRunner()

FACTORY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10)).eval()
"""


def small_cnn() -> nn.Module:
    namespace: dict = {}
    exec(FACTORY, namespace)
    return namespace["make"]()


def dead_initializers(proto: onnx.ModelProto) -> list[str]:
    """Initializers that no node (in any subgraph) reads and that are not graph outputs."""
    used = {name for node in proto.graph.node for name in node.input}
    for node in proto.graph.node:
        for attr in node.attribute:
            for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                used |= {name for inner in graph.node for name in inner.input}
    used |= {value.name for value in proto.graph.output}
    return [t.name for t in proto.graph.initializer if t.name not in used]


def dead_nodes(proto: onnx.ModelProto) -> list[str]:
    """Nodes none of whose outputs is read by another node or is a graph output."""
    wanted = {name for node in proto.graph.node for name in node.input} | {v.name for v in proto.graph.output}
    return [f"{n.op_type} {n.name}" for n in proto.graph.node if not any(o in wanted for o in n.output)]


def ort_load_log(path: Path) -> str:
    """What ONNX Runtime writes while it loads ``path`` at warning verbosity."""
    options = ort.SessionOptions()
    options.log_severity_level = 2  # warnings and worse (the default)
    with captured_fds() as out:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())


@pytest.mark.parametrize("opset", [17, 18])
@pytest.mark.parametrize("mode", ["checkered", "dilated"])
def test_exported_graph_has_no_dead_initializers_and_loads_without_warnings(tmp_path, mode, opset):
    out = tmp_path / f"{mode}.onnx"
    result = ex.export(small_cnn(), out, mode=mode, input_size=SIZE, opset=opset, provider="cpu")
    assert result.verification.passed
    proto = onnx.load(str(out))
    assert proto.graph.initializer, "the model has weights"
    assert dead_initializers(proto) == []
    assert dead_nodes(proto) == []
    log = ort_load_log(out)
    assert "Removing initializer" not in log and "not used by any node" not in log, log
    assert "[W:" not in log and "[E:" not in log, log


def test_ort_log_capture_sees_the_warning_on_a_graph_with_a_dead_initializer(tmp_path):
    """The check above can fail: the same capture reports an unused initializer when there is one."""
    out = tmp_path / "m.onnx"
    ex.export(small_cnn(), out, mode="checkered", input_size=SIZE, provider="cpu")
    proto = onnx.load(str(out))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(torch.zeros(3).numpy(), "orphan"))
    onnx.save(proto, str(tmp_path / "dirty.onnx"))
    assert dead_initializers(proto) == ["orphan"]
    assert "Removing initializer 'orphan'" in ort_load_log(tmp_path / "dirty.onnx")
    ex.remove_unused(proto)  # the ONNX ecosystem's own dead-code pass, as export_onnx uses it
    assert dead_initializers(proto) == []


@pytest.fixture
def cli_logging():
    """ccnn-export's log handler, as run_app installs it (CliRunner does not call run_app)."""
    logger = logging.getLogger("ccnn_convert")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    _common.setup_logging()
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def test_cli_prints_the_provider_once(tmp_path, cli_logging):
    (tmp_path / "small.py").write_text(FACTORY)
    out = tmp_path / "small.onnx"
    result = runner.invoke(app, [f"{tmp_path / 'small.py'}:make", "-o", str(out), "--input-size", str(SIZE),
                                 "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    assert "exporting to ONNX opset 17" in result.stderr  # the log handler is live
    both = result.stdout + result.stderr
    assert both.count("provider:") == 1, both
    assert "provider: CPUExecutionProvider (requested)" in result.stdout


def test_sessions_do_not_import_the_exporter():
    code = ("import sys, ccnn_convert.export.sessions as s; "
            "from ccnn_convert.export import load_onnx_classifier; "
            "print(sorted(m for m in sys.modules if m.startswith('ccnn_convert.export')))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(loaded) == ["ccnn_convert.export", "ccnn_convert.export.metadata", "ccnn_convert.export.sessions"]


def test_public_names_resolve_lazily_to_their_modules():
    from ccnn_convert.export import opset, pipeline, sessions, verification

    assert ex.export is pipeline.export and ex.verify is verification.verify
    assert ex.select_provider is sessions.select_provider and ex.convert_opset is opset.convert_opset
    assert set(ex.__all__) <= set(dir(ex))
    for name in ex.__all__:
        assert getattr(ex, name) is not None
    with pytest.raises(AttributeError):
        ex.conversion_for  # noqa: B018  (replaced by conversion_spec / ConversionSpec.build)


def test_library_names_parameters_not_flags(tmp_path):
    with pytest.raises(ex.ParameterError, match=r"^threads must be a positive integer") as caught:
        ex.export(small_cnn(), tmp_path / "x.onnx", threads=0)
    assert caught.value.parameter == "threads"
    with pytest.raises(ex.ParameterError, match=r"^batch must be a positive integer"):
        ex.BenchmarkOptions(batch=0)
    with pytest.raises(ex.ParameterError, match=r"^provider: unknown provider 'npu'"):
        ex.select_provider("npu")
    assert not list(tmp_path.iterdir())
    flag = re.compile(r"""["'][^"'\n]*--[a-z][a-z-]+""")  # a --flag inside a string literal
    for source in sorted(PACKAGE.glob("*.py")):
        assert not flag.search(source.read_text()), f"{source.name} names a command-line flag"
