"""An artifact is data: loading one never runs code the user did not name in this run.

Crafted artifacts (written with torch.save, as an attacker would) go through every command
that takes MODEL. Each must end with exit code 2 and exactly one error line, and the payload's
sentinel file (written when the payload is imported) must never appear. The expectations are
independent of the loader: the sentinel is written by the payload itself.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import sys
import textwrap

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from ccnn_convert.cli import convert as convert_cli
from ccnn_convert.errors import CCNNError, ModelResolutionError, ParameterError
from ccnn_convert.models import ResolvedModel, load_artifact, resolve_model, save_artifact
from ccnn_convert.spec import ConversionSpec

runner = CliRunner()

CONVERSION_V1 = {"mode": "checkered", "sampler": "lattice", "keep_first": 0, "density": None, "seed": None}
PREPROCESSING = {"resize": 72, "crop": 64, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                 "interpolation": "bilinear"}

PAYLOAD = textwrap.dedent("""
    import pathlib
    pathlib.Path({sentinel!r}).write_text("payload ran")
    import torch

    def make():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(4, 3))
""")


@pytest.fixture(autouse=True)
def quiet_logger(monkeypatch):
    """Progress notes (INFO) are not errors: keep another test's console handler out of the count."""
    logger = logging.getLogger("ccnn_convert")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", True)


def craft(path, spec, conversion=None, version=1, state=None):
    """An artifact as an attacker writes it: plain data that loads with weights_only=True."""
    torch.save({"format": "ccnn-convert-artifact", "version": version, "spec": spec, "name": "x",
                "weights": "none", "conversion": dict(conversion or CONVERSION_V1),
                "preprocessing": PREPROCESSING, "num_classes": 1000 if "classifier.1.weight" in (state or {}) else 3,
                "state_dict": state or {}}, path)
    return path


def _squeezenet_state():
    return torchvision.models.squeezenet1_1(weights=None).state_dict()


# name -> (spec, conversion, what the one error line must say)
CASES = {
    "relative_py": ({"source": "factory", "factory": "helper.py:make"}, None,
                    "names factory file 'helper.py' by a relative path; only an absolute path is loaded"),
    "module_attr": ({"source": "factory", "factory": "ccnn_payload_mod:make"}, None,
                    "was built by factory 'ccnn_payload_mod:make'"),
    "os_getcwd": ({"source": "factory", "factory": "os:getcwd"}, None, "was built by factory 'os:getcwd'"),
    "builtins_exit": ({"source": "factory", "factory": "builtins:exit"}, None,
                      "was built by factory 'builtins:exit'"),
    "unknown_torchvision": ({"source": "torchvision", "name": "resnet9000", "weights_enum": None}, None,
                            "torchvision has no classification model 'resnet9000'"),
    "tampered_conversion": ({"source": "torchvision", "name": "squeezenet1_1", "weights_enum": None},
                            {**CONVERSION_V1, "example_input": "x"}, "invalid conversion in artifact"),
}


def _app(command):
    # Imported here so that one command's import problem fails its own cases only.
    return importlib.import_module(f"ccnn_convert.cli.{command}").app


def _command_args(command, artifact, tmp_path):
    if command == "convert":
        return convert_cli.app, [str(artifact), "--input-size", "64"]
    if command == "eval":
        data = tmp_path / "data" / "n01440764"
        data.mkdir(parents=True, exist_ok=True)
        from PIL import Image
        Image.new("RGB", (80, 80), (120, 30, 200)).save(data / "img.png")
        return _app("eval"), [str(artifact), "--data", str(tmp_path / "data"), "--workers", "0", "--device", "cpu"]
    if command == "export":
        return _app("export"), [str(artifact), "-o", str(tmp_path / "out.onnx")]
    return _app("bench"), [str(artifact), "--device", "cpu", "--repeats", "1", "--no-memory"]


@pytest.fixture
def attacker_dir(tmp_path, monkeypatch):
    """A working directory holding payloads by the names the crafted artifacts use."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    sentinel = tmp_path / "SENTINEL"
    for name in ("helper.py", "ccnn_payload_mod.py"):
        (workdir / name).write_text(PAYLOAD.format(sentinel=str(sentinel)))
    monkeypatch.chdir(workdir)
    monkeypatch.delitem(sys.modules, "ccnn_payload_mod", raising=False)
    return workdir, sentinel


def _assert_one_error_line(result, expected):
    output = result.output
    assert result.exit_code == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error:") and expected in " ".join(output.split()), output


@pytest.mark.parametrize("command", ["convert", "eval", "export", "bench"])
@pytest.mark.parametrize("case", list(CASES))
def test_crafted_artifact_is_refused_in_one_line_and_runs_nothing(command, case, attacker_dir, tmp_path):
    workdir, sentinel = attacker_dir
    spec, conversion, expected = CASES[case]
    artifact = craft(tmp_path / f"{case}.pt", spec, conversion)
    app, args = _command_args(command, artifact, tmp_path)
    result = runner.invoke(app, args)
    _assert_one_error_line(result, expected)
    assert not sentinel.exists()
    assert not (tmp_path / "out.onnx").exists()


def test_consent_never_loads_a_relative_factory_path(attacker_dir, tmp_path):
    workdir, sentinel = attacker_dir
    artifact = craft(tmp_path / "rel.pt", CASES["relative_py"][0])
    result = runner.invoke(convert_cli.app, [str(artifact), "--trust-factory", "--input-size", "64"])
    _assert_one_error_line(result, "names factory file 'helper.py' by a relative path")
    assert not sentinel.exists()


def test_trusted_absolute_factory_artifact_reloads(tmp_path, monkeypatch):
    sentinel = tmp_path / "imported"
    source = tmp_path / "src" / "mynet.py"
    source.parent.mkdir()
    source.write_text(PAYLOAD.format(sentinel=str(sentinel)))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "a.pt"
    made = runner.invoke(convert_cli.app, [f"{source}:make", "--input-size", "32", "-o", str(out)])
    assert made.exit_code == 0, made.output
    assert torch.load(out, weights_only=True)["spec"]["factory"] == f"{source.resolve()}:make"
    sentinel.unlink()
    refused = runner.invoke(convert_cli.app, [str(out), "--input-size", "32"])
    _assert_one_error_line(refused, f"was built by factory '{source.resolve()}:make'")
    assert not sentinel.exists()
    again = runner.invoke(convert_cli.app, [str(out), "--input-size", "32", "--trust-factory"])
    assert again.exit_code == 0, again.output
    assert "already a ccnn-convert artifact" in again.output
    # The same consent through the API; the reloaded weights are the saved ones.
    loaded = load_artifact(out, trust_factory=True)
    saved = torch.load(out, weights_only=True)["state_dict"]
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    with pytest.raises(ParameterError) as info:
        load_artifact(out)
    assert str(info.value).endswith("pass trust_factory if you trust it")


def test_module_factory_named_by_the_user_does_not_come_from_the_working_directory(tmp_path, monkeypatch):
    """`pkg.mod:make` imports like Python does; the working directory is not put on sys.path."""
    (tmp_path / "ccnn_cwd_only_mod.py").write_text(PAYLOAD.format(sentinel=str(tmp_path / "S")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "ccnn_cwd_only_mod", raising=False)
    before = list(sys.path)
    with pytest.raises(ModelResolutionError, match="cannot import module 'ccnn_cwd_only_mod'"):
        resolve_model("ccnn_cwd_only_mod:make")
    assert sys.path == before and not (tmp_path / "S").exists()
    # A file factory the user names is imported by its path, and leaves sys.path alone too.
    resolved = resolve_model("ccnn_cwd_only_mod.py:make")
    assert sys.path == before and (tmp_path / "S").exists()
    assert resolved.num_classes == 3


def test_unreadable_file_does_not_pass_on_unsafe_advice(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02not really a pickle")
    for path in (garbage,):
        result = runner.invoke(convert_cli.app, [str(path), "--arch", "resnet18"])
        _assert_one_error_line(result, f"cannot read {path} as a PyTorch checkpoint")
        assert "weights_only" not in result.output
        with pytest.raises(ModelResolutionError) as info:
            load_artifact(path)
        assert "weights_only" not in str(info.value) and "cannot read" in str(info.value)


def test_version_1_artifact_drops_options_that_did_nothing(tmp_path):
    """Version 1 stored seed=0 with the lattice sampler and density with other modes; both were no-ops."""
    path = craft(tmp_path / "v1.pt", {"source": "torchvision", "name": "squeezenet1_1", "weights_enum": None},
                 {"mode": "dilated", "sampler": "lattice", "keep_first": 2, "density": 4, "seed": 0},
                 state=_squeezenet_state())
    loaded = load_artifact(path)
    assert loaded.conversion == ConversionSpec(mode="dilated", keep_first=2)
    random = craft(tmp_path / "v1r.pt", {"source": "torchvision", "name": "squeezenet1_1", "weights_enum": None},
                   {"mode": "checkered", "sampler": "random", "keep_first": 0, "density": 2, "seed": 5},
                   state=_squeezenet_state())
    assert load_artifact(random).conversion == ConversionSpec(mode="checkered", sampler="random", density=2, seed=5)
    # The same values in a version-2 artifact are a tampered file, not an old one.
    tampered = craft(tmp_path / "v2.pt", {"source": "torchvision", "name": "squeezenet1_1", "weights_enum": None},
                     {"mode": "dilated", "sampler": "lattice", "keep_first": 2, "density": 4, "seed": None,
                      "leaf_modules": []}, version=2, state=_squeezenet_state())
    with pytest.raises(ModelResolutionError, match=r"v2\.pt: invalid conversion in artifact: density"):
        load_artifact(tampered)


def test_in_memory_module_resolves_but_cannot_be_saved(tmp_path):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.Flatten(), torch.nn.Linear(8, 11))
    resolved = ResolvedModel.from_module(module)
    assert resolved.num_classes == 11 and resolved.weights == "(in memory)" and resolved.conversion is None
    p = resolved.preprocessing
    assert (p.resize, p.crop, p.interpolation, p.mean) == (256, 224, "bilinear", (0.485, 0.456, 0.406))
    with pytest.raises(CCNNError, match="cannot be rebuilt"):
        save_artifact(tmp_path / "m.pt", resolved, ConversionSpec("checkered"))
    assert not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- module factories and python -m

SMALL_NET = textwrap.dedent("""
    import torch

    def make():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(4, 3))
""")


@pytest.mark.parametrize("entry", ["", "cwd"])
def test_python_m_does_not_let_the_working_directory_supply_a_module_factory(attacker_dir, tmp_path, monkeypatch,
                                                                             entry):
    """`python -m` and `torchrun -m` put the working directory (or '') first on sys.path."""
    workdir, sentinel = attacker_dir
    monkeypatch.setattr(sys, "path", [entry if entry == "" else str(workdir), *sys.path])
    artifact = craft(tmp_path / "m.pt", {"source": "factory", "factory": "ccnn_payload_mod:make"})
    with pytest.raises(ModelResolutionError, match="cannot import module 'ccnn_payload_mod'"):
        load_artifact(artifact, trust_factory=True)
    with pytest.raises(ModelResolutionError, match="cannot import module 'ccnn_payload_mod'"):
        resolve_model("ccnn_payload_mod:make")
    assert not sentinel.exists() and "ccnn_payload_mod" not in sys.modules


def test_the_file_a_module_factory_runs_is_named_by_its_real_path(tmp_path, monkeypatch, caplog):
    real = tmp_path / "real" / "impl.py"
    real.parent.mkdir()
    real.write_text(SMALL_NET)
    installed = tmp_path / "site"
    installed.mkdir()
    (installed / "ccnn_linked_mod.py").symlink_to(real)
    monkeypatch.syspath_prepend(str(installed))
    monkeypatch.delitem(sys.modules, "ccnn_linked_mod", raising=False)
    namespace: dict = {}
    exec(SMALL_NET, namespace)
    artifact = craft(tmp_path / "l.pt", {"source": "factory", "factory": "ccnn_linked_mod:make"},
                     state=namespace["make"]().state_dict())
    with pytest.raises(ParameterError) as info:
        load_artifact(artifact)
    assert f"which runs {real}" in str(info.value)  # the link's target, not the stored name
    with caplog.at_level(logging.INFO, logger="ccnn_convert"):
        assert load_artifact(artifact, trust_factory=True).num_classes == 3
    assert f"running factory make from {real}" in caplog.text
    monkeypatch.delitem(sys.modules, "ccnn_linked_mod", raising=False)


def test_a_factory_file_changed_since_saving_is_refused_even_with_consent(tmp_path):
    source = tmp_path / "net.py"
    source.write_text(SMALL_NET)
    out = tmp_path / "a.pt"
    made = runner.invoke(convert_cli.app, [f"{source}:make", "--input-size", "32", "-o", str(out)])
    assert made.exit_code == 0, made.output
    # Independent expectation: hashlib over the file's bytes.
    assert torch.load(out, weights_only=True)["spec"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    source.write_text(SMALL_NET + "\nimport os  # changed\n")
    refused = runner.invoke(convert_cli.app, [str(out), "--input-size", "32", "--trust-factory"])
    _assert_one_error_line(refused, f"the factory '{source}:make' is {source}, which changed since the artifact "
                                    "was saved (its SHA-256 differs); refusing to run it, even with consent")
    source.write_text(SMALL_NET)
    assert load_artifact(out, trust_factory=True).num_classes == 3


def test_a_factory_file_imports_its_neighbours_and_only_those(tmp_path, monkeypatch):
    folder = tmp_path / "nets"
    folder.mkdir()
    (folder / "ccnn_neighbour_widths.py").write_text("WIDTH = 6\n")
    (folder / "net.py").write_text(textwrap.dedent("""
        import sys, torch
        from ccnn_neighbour_widths import WIDTH
        SEEN = list(sys.path)

        def make():
            model = torch.nn.Sequential(torch.nn.Conv2d(3, WIDTH, 3), torch.nn.Flatten())
            model.seen = SEEN
            return model
    """))
    workdir = tmp_path / "work"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(sys, "path", ["", str(workdir), *sys.path])
    monkeypatch.delitem(sys.modules, "ccnn_neighbour_widths", raising=False)
    before = list(sys.path)
    resolved = resolve_model(f"{folder}/net.py:make")
    assert resolved.model[0].out_channels == 6
    assert sys.path == before  # restored
    seen = resolved.model.seen
    assert seen[0] == str(folder) and "" not in seen and str(workdir) not in seen
    monkeypatch.delitem(sys.modules, "ccnn_neighbour_widths", raising=False)
