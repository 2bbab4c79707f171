"""A conversion that needed --leaf reloads everywhere (issue 9, item 2).

The model's ``Gate`` branches on its input's size, which torch.fx's symbolic tracing cannot
follow (torch.export, which specializes sizes, can): the conversion needs
``--leaf Gate``. The artifact must remember that, so ``ccnn-eval`` and ``ccnn-export`` reload
it without being told again; and a registry lets a library mark such modules once.
"""

import json
import textwrap

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ccnn_convert import convert
from ccnn_convert.cli.convert import app as convert_app
from ccnn_convert.cli.eval import app as eval_app
from ccnn_convert.cli.export import app as export_app
from ccnn_convert.errors import ConversionError
from ccnn_convert.models import load_artifact

GATED = textwrap.dedent("""
    import torch
    from torch import nn

    class Gate(nn.Module):
        def forward(self, x):
            if x.shape[-1] > 4:  # control flow on the input: fx cannot trace it
                return x
            return -x

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), Gate(), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(8, 1000))
""")


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "gated.py").write_text(GATED)
    for wnid in ("n01440764", "n01443537"):
        (tmp_path / "images" / wnid).mkdir(parents=True)
        for shade in (40, 200):
            Image.new("RGB", (48, 40), (shade, 90, 255 - shade)).save(tmp_path / "images" / wnid / f"{shade}.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(app, args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_convert_eval_export_round_trip_keeps_the_leaf(project):
    failed = CliRunner().invoke(convert_app, ["gated.py:make", "--input-size", "32"])
    assert failed.exit_code == 2 and "--leaf Gate" in failed.output

    _run(convert_app, ["gated.py:make", "--leaf", "Gate", "--input-size", "32", "-o", "gated.pt"])
    resolved = load_artifact(project / "gated.pt", trust_factory=True)
    assert resolved.conversion.leaf_modules == ("Gate",)

    _run(eval_app, ["gated.pt", "--trust-factory", "--data", "images", "--workers", "0", "--resize", "36",
                    "--crop", "32", "--json", "eval.json"])
    report = json.loads((project / "eval.json").read_text())
    modes = [row["mode"] for row in report["results"]]
    assert modes == ["original", "checkered"]

    _run(export_app, ["gated.pt", "--trust-factory", "-o", "gated.onnx", "--input-size", "32"])
    assert (project / "gated.onnx").is_file()


def test_a_registered_module_is_a_leaf_without_being_named(project):
    import importlib.util
    import sys

    from ccnn_convert.core import register_notrace_module

    spec = importlib.util.spec_from_file_location("gated_for_registry", project / "gated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.make().eval()
    with pytest.raises(ConversionError):
        convert(model, example_input=torch.zeros(1, 3, 32, 32))
    register_notrace_module(module.Gate)
    try:
        converted = convert(model, mode="dilated", dilation="multisample",
                            example_input=torch.zeros(1, 3, 32, 32)).eval()
    finally:
        sys.modules.pop("gated_for_registry", None)
    x = torch.rand(2, 3, 32, 32)  # Gate sees 16 columns per submap, as in the dense network
    torch.testing.assert_close(converted(x), _dense_dilated(model, x), rtol=1e-4, atol=1e-5)


def _dense_dilated(model, x):
    """The hand-made dilated network: strides removed, the later 3x3 conv dilated by 2."""
    import torch.nn.functional as F

    conv1, gate, relu, conv2, pool, flatten, linear = model
    y = relu(gate(F.conv2d(x, conv1.weight, conv1.bias, stride=1, padding=1)))
    y = F.conv2d(y, conv2.weight, conv2.bias, stride=1, padding=2, dilation=2)
    return linear(flatten(pool(y)))
