"""ccnn-export: ONNX parity with PyTorch, metadata, dynamic batch, opsets, fp16, external data,
and one-line CLI errors that leave nothing behind.

Every parity check here is computed independently of the export module's own verification:
a fresh onnxruntime session against a model converted in the test, at batch sizes the export
never saw.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from ccnn_convert import convert
from ccnn_convert import export as ex
from ccnn_convert.cli.export import app
from ccnn_convert.export import exporter
from ccnn_convert.models import resolve_model
from ccnn_convert.spec import ConversionSpec

SIZE = 64
runner = CliRunner()

TINY_FACTORY = """
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 10)).eval()
"""


def rel_diff(ort_out, torch_out) -> float:
    """The issue's metric: max|ort - torch| / max|torch|."""
    ort_t = torch.as_tensor(np.asarray(ort_out, dtype=np.float32))
    return float((ort_t - torch_out).abs().max() / torch_out.abs().max())


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess, x: torch.Tensor) -> np.ndarray:
    inp = sess.get_inputs()[0]
    dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    return sess.run(None, {inp.name: x.numpy().astype(dtype)})[0]


def small_densenet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16,
                                       bn_size=2, num_classes=10).eval()


def tiny() -> nn.Module:
    namespace: dict = {}
    exec(TINY_FACTORY, namespace)
    return namespace["make"]()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {
        "resnet18": resolve_model("resnet18", weights="none").model,
        "densenet": small_densenet(),
        "efficientnet_lite0": resolve_model("efficientnet_lite0").model,  # pretrained, bundled
    }


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    """Export each (architecture, mode) once per module, through the public export()."""
    folder = tmp_path_factory.mktemp("exports")
    cache: dict = {}

    def get(arch: str, mode: str):
        if (arch, mode) not in cache:
            path = folder / f"{arch}_{mode}.onnx"
            result = ex.export(models[arch], path, mode=mode, input_size=SIZE, provider="cpu")
            cache[arch, mode] = result
        return cache[arch, mode]

    return get


def reference(model: nn.Module, mode: str) -> nn.Module:
    if mode == "original":
        return model
    return convert(model, mode=mode, example_input=torch.zeros(1, 3, SIZE, SIZE)).eval()


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("mode", ["original", "checkered", "dilated"])
@pytest.mark.parametrize("arch", ["resnet18", "densenet", "efficientnet_lite0"])
def test_onnx_matches_pytorch(arch, mode, models, exports):
    result = exports(arch, mode)
    assert result.path.is_file() and result.info.opset == 17
    onnx.checker.check_model(str(result.path), full_check=True)
    assert result.verification is not None and result.verification.passed
    model = reference(models[arch], mode)
    sess = session(result.path)
    generator = torch.Generator().manual_seed(123)
    for batch in (2, 5):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=generator)
        with torch.no_grad():
            expected = model(x)
        out = run(sess, x)
        assert out.shape == tuple(expected.shape)
        assert rel_diff(out, expected) <= 1e-4
        assert (out.argmax(1) == expected.argmax(1).numpy()).all()


def test_converted_graph_has_no_per_submap_unrolling(exports):
    """Checkered resnet18 ends with 32 submaps; the graph has one gather per strided layer, not
    one per submap: its node count is a small constant over the original's."""
    original, checkered = exports("resnet18", "original").info, exports("resnet18", "checkered").info
    assert checkered.nodes < original.nodes + 8 * 10  # 8 strided layers/steps, a few ops each
    assert checkered.op_counts["Conv"] == original.op_counts["Conv"]


# ------------------------------------------------------------------------------ metadata


def test_metadata_round_trip(exports):
    result = exports("resnet18", "checkered")
    props = {p.key: p.value for p in onnx.load(str(result.path), load_external_data=False).metadata_props}
    for key in ("source_model", "mode", "sampler", "keep_first", "density", "seed", "input_size",
                "preprocessing", "ccnn_convert_version", "opset", "dtype"):
        assert key in props, key
    meta = ex.read_metadata(result.path)
    assert meta["mode"] == "checkered" and meta["sampler"] == "lattice"
    assert meta["keep_first"] == 0 and meta["density"] is None and meta["seed"] is None
    assert meta["input_size"] == [3, SIZE, SIZE] and meta["opset"] == 17 and meta["dtype"] == "float32"
    assert meta["ccnn_convert_version"] == __import__("ccnn_convert").__version__
    prep = meta["preprocessing"]
    assert prep["crop"] == SIZE and prep["interpolation"] == "bilinear"
    assert prep["mean"] == pytest.approx([0.485, 0.456, 0.406]) and prep["std"] == pytest.approx([0.229, 0.224, 0.225])

    fn, preprocessing, name = ex.load_onnx_classifier(result.path, provider="cpu")
    assert preprocessing.to_dict() == prep
    assert "ResNet" in name or "resnet" in name
    x = torch.randn(3, 3, SIZE, SIZE)
    from_torch, from_numpy = fn(x), fn(x.numpy())
    assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.float32
    assert from_torch.shape == (3, 1000) and torch.equal(from_torch, from_numpy)


def test_metadata_of_a_named_model_and_its_artifact(tmp_path):
    """MODEL strings go through resolve_model; an artifact's conversion is used unless overridden."""
    from ccnn_convert.models import save_artifact

    (tmp_path / "tiny.py").write_text(TINY_FACTORY)
    resolved = resolve_model(f"{tmp_path / 'tiny.py'}:make", preprocessing={"resize": 40, "crop": 32})
    save_artifact(tmp_path / "tiny.pt", resolved,
                  ConversionSpec(mode="checkered", sampler="random", keep_first=1, seed=7))
    out = tmp_path / "tiny.onnx"
    # The artifact names a factory: it is rebuilt only with the user's consent.
    refused = runner.invoke(app, [str(tmp_path / "tiny.pt"), "-o", str(out), "--provider", "cpu"])
    _assert_one_line_error(refused, "--trust-factory")
    assert not out.exists()
    result = runner.invoke(app, [str(tmp_path / "tiny.pt"), "-o", str(out), "--provider", "cpu", "--trust-factory"])
    assert result.exit_code == 0, result.output
    meta = ex.read_metadata(out)
    assert (meta["mode"], meta["sampler"], meta["keep_first"], meta["seed"]) == ("checkered", "random", 1, 7)
    assert meta["input_size"] == [3, 32, 32] and meta["preprocessing"]["resize"] == 40
    assert ConversionSpec.from_dict(meta["conversion"]) == ConversionSpec("checkered", "random", 1, None, 7)
    # The artifact's numbers are the model's: compare with the same conversion done here.
    model = convert(resolved.model, mode="checkered", sampler="random", keep_first=1, seed=7,
                    example_input=torch.zeros(1, 3, 32, 32)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert rel_diff(run(session(out), x), model(x)) <= 1e-4


def test_conversion_options_override_the_artifact():
    artifact = ConversionSpec(mode="checkered", sampler="random", keep_first=2, density=3, seed=1,
                              leaf_modules=("Gate",))
    assert ex.conversion_spec(None, artifact) == artifact
    assert ex.conversion_spec(None, artifact, keep_first=0, sampler=None) == ConversionSpec(
        "checkered", "random", 0, 3, 1, ("Gate",))
    assert ex.conversion_spec(None, None) == ConversionSpec("checkered")
    # Another mode does not inherit the artifact's checkered-only settings; the leaf modules
    # (a property of the model) and keep_first (a property of the conversion depth) carry over.
    assert ex.conversion_spec("dilated", artifact) == ConversionSpec("dilated", keep_first=2, leaf_modules=("Gate",))
    assert ex.conversion_spec("original", artifact) is None
    # An option that would do nothing names itself, as a parameter (the CLI shows its flag).
    for option in ("sampler", "keep_first", "density", "seed", "leaf_modules"):
        value = {"sampler": "naive", "keep_first": 1, "density": 2, "seed": 3, "leaf_modules": ["Gate"]}[option]
        with pytest.raises(ex.ParameterError, match=f"^{option} does nothing with mode original") as caught:
            ex.conversion_spec("original", None, **{option: value})
        assert caught.value.parameter == option
    with pytest.raises(ex.ParameterError, match="^seed") as caught:
        ex.conversion_spec("dilated", artifact, seed=4)
    assert caught.value.parameter == "seed"
    with pytest.raises(ex.ParameterError, match="unknown mode 'sideways'"):
        ex.conversion_spec("sideways", None)


# ------------------------------------------------------------------------------ dynamic batch


def test_dynamic_batch(tmp_path, models, exports):
    """The graph does not depend on the example batch, and runs at any batch size."""
    model = reference(models["densenet"], "checkered")
    at_2 = exports("densenet", "checkered").info
    at_3 = ex.export_onnx(model, tmp_path / "b3.onnx", SIZE, example_batch=3)
    assert at_3.nodes == at_2.nodes and at_3.op_counts == at_2.op_counts
    proto = onnx.load(str(at_2.path))
    for value in (proto.graph.input[0], proto.graph.output[0]):
        batch_dim = value.type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    sess = session(at_2.path)
    for batch in (1, 3, 7):
        x = torch.randn(batch, 3, SIZE, SIZE)
        with torch.no_grad():
            assert rel_diff(run(sess, x), model(x)) <= 1e-4


# ------------------------------------------------------------------------------ opsets


def test_native_opset_18(tmp_path):
    model = convert(tiny(), mode="checkered", example_input=torch.zeros(1, 3, 32, 32)).eval()
    info = ex.export_onnx(model, tmp_path / "t18.onnx", 32, opset=18)
    proto = onnx.load(str(info.path))
    assert info.opset == 18 and [o.version for o in proto.opset_import if o.domain == ""] == [18]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert rel_diff(run(session(info.path), x), model(x)) <= 1e-4


def _opset18_model() -> onnx.ModelProto:
    """Pad, ReduceMean, Split and Resize in their opset-18 forms (those changed since 17)."""
    h = onnx.helper
    nodes = [
        h.make_node("Pad", ["x", "pads", "zero"], ["padded"], mode="constant"),
        h.make_node("ReduceMean", ["padded", "axes"], ["mean"], keepdims=1),
        h.make_node("Split", ["padded"], ["a", "b"], axis=1, num_outputs=2),
        h.make_node("Add", ["a", "b"], ["ab"]),
        h.make_node("Resize", ["ab", "", "scales"], ["up"], mode="nearest"),
        h.make_node("ReduceMax", ["up", "axes"], ["peak"], keepdims=1),
        h.make_node("Add", ["mean", "peak"], ["y"]),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
        onnx.numpy_helper.from_array(np.array(0.5, np.float32), "zero"),
        onnx.numpy_helper.from_array(np.array([1, 2, 3], np.int64), "axes"),
        onnx.numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
    ]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4, 5, 5])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 1, 1, 1])], inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 18)], ir_version=8)


@pytest.mark.parametrize("target", [17, 16, 13])
def test_opset_down_conversion_is_exact_or_refused(target):
    model = _opset18_model()
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 5)).astype(np.float32)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    try:
        ex.convert_opset(lowered, target)
    except ex.ExportError as exc:  # refusing is allowed, but it must say which opset and what to do
        assert isinstance(exc, ex.ParameterError) and exc.parameter == "opset"
        assert f"opset {target}" in str(exc) and "--opset 18" in exc.render("--opset")
        assert target < 17, "opset 17 must always work for these ops"
        return
    assert [o.version for o in lowered.opset_import if o.domain == ""] == [target]
    onnx.checker.check_model(lowered, full_check=True)
    got = ort.InferenceSession(lowered.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_opset_17_refuses_what_it_cannot_express():
    model = _opset18_model()
    pad = model.graph.node[0]
    pad.input.append("pad_axes")
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.array([2, 3], np.int64), "pad_axes"))
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.array([1, 1, 1, 1], np.int64), "pads"))
    with pytest.raises(ex.ExportError, match=r"Pad node .*\(opset 18 only\).*try opset 18") as caught:
        ex.convert_opset(model, 17)
    assert "try --opset 18" in caught.value.render("--opset")


# ------------------------------------------------------------------------------ fp16, external data


def test_fp16_export(tmp_path):
    model = tiny()
    result = ex.export(model, tmp_path / "half.onnx", mode="checkered", input_size=32, fp16=True, provider="cpu")
    sess = session(result.path)
    assert sess.get_inputs()[0].type == "tensor(float16)" and result.metadata["dtype"] == "float16"
    assert result.verification.tolerance == ex.FP16_TOLERANCE and result.verification.passed
    fn, _, _ = ex.load_onnx_classifier(result.path, provider="cpu")
    x = torch.randn(6, 3, 32, 32)
    reference_model = convert(model, mode="checkered", example_input=torch.zeros(1, 3, 32, 32)).eval()
    with torch.no_grad():
        expected = reference_model(x)
    out = fn(x)
    assert out.dtype == torch.float32 and rel_diff(out, expected) <= 1e-2
    assert model.training is False and next(model.parameters()).dtype == torch.float32  # untouched


def test_external_data_when_the_weights_are_too_big(tmp_path, monkeypatch):
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_THRESHOLD", 0)  # a 2 GB model would take minutes
    out = tmp_path / "ext.onnx"
    result = ex.export(tiny(), out, mode="checkered", input_size=32, provider="cpu")
    assert result.info.external_data and (tmp_path / "ext.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data"]
    proto = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    onnx.checker.check_model(str(out), full_check=True)
    x = torch.randn(2, 3, 32, 32)
    reference_model = convert(tiny(), mode="checkered", example_input=torch.zeros(1, 3, 32, 32)).eval()
    with torch.no_grad():
        assert rel_diff(run(session(out), x), reference_model(x)) <= 1e-4


# ------------------------------------------------------------------------------ providers


def _cuda_works() -> bool:
    try:
        ex.select_provider("cuda")
        return True
    except ex.ExportError:
        return False


def test_auto_provider_says_what_it_chose_and_why():
    choice = ex.select_provider("auto")
    assert choice.reason.startswith("auto:")
    if _cuda_works():
        assert choice.name == "cuda"
    else:
        assert choice.name == "cpu" and "no usable GPU" in choice.reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_cuda_export_and_fp16(tmp_path):
    if not _cuda_works():
        pytest.skip("torch sees a GPU but onnxruntime's CUDA provider does not start")
    fp32 = ex.export(tiny(), tmp_path / "gpu.onnx", mode="checkered", input_size=32, provider="cuda",
                     benchmark=ex.BenchmarkOptions(batch=2, repeats=2))
    assert fp32.provider.name == "cuda" and fp32.verification.passed
    assert fp32.verification.provider == "CUDAExecutionProvider" and fp32.benchmark.torch_device.startswith("cuda")
    half = ex.export(tiny(), tmp_path / "gpu16.onnx", mode="checkered", input_size=32, provider="cuda", fp16=True)
    assert half.verification.passed


# ------------------------------------------------------------------------------ CLI


def _image_folder(root: Path, classes: int = 3, per_class: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(root / f"class{c}" / f"{i}.png")
    return root


def _assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.rstrip().endswith(errors[0])
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def tiny_factory(tmp_path) -> str:
    (tmp_path / "tiny.py").write_text(TINY_FACTORY)
    return f"{tmp_path / 'tiny.py'}:make"


def test_cli_export_verify_on_images_and_benchmark(tmp_path, tiny_factory):
    data = _image_folder(tmp_path / "images")
    out = tmp_path / "out" / "tiny.onnx"
    out.parent.mkdir()
    result = runner.invoke(app, [tiny_factory, "-o", str(out), "--mode", "checkered", "--input-size", "32",
                                 "--data", str(data), "--provider", "cpu", "--benchmark", "--bench-batch", "2",
                                 "--bench-repeats", "2"])
    assert result.exit_code == 0, result.output + result.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny.onnx"]  # no staging leftovers
    text = result.stdout
    assert "exported" in text and "opset 17" in text and "CPUExecutionProvider" in text
    assert "images" in text and "random" in text and "max rel" in text  # verification table
    assert "PyTorch eager" in text and "ONNX Runtime" in text and "ratio" in text  # benchmark table
    assert ex.read_metadata(out)["preprocessing"]["crop"] == 32


def test_cli_existing_file_needs_force(tmp_path, tiny_factory):
    out = tmp_path / "exists.onnx"
    out.write_bytes(b"precious")
    result = runner.invoke(app, [tiny_factory, "-o", str(out), "--input-size", "32"])
    _assert_one_line_error(result, "already exists", "--force")
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("where", ["missing_dir", "directory"])
def test_cli_unwritable_output(tmp_path, tiny_factory, where):
    out = tmp_path / "nope" / "x.onnx" if where == "missing_dir" else tmp_path
    result = runner.invoke(app, [tiny_factory, "-o", str(out), "--input-size", "32"])
    _assert_one_line_error(result, "cannot write")
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--opset", "12"], "--opset"),
    (["--provider", "npu"], "unknown provider"),
    (["--mode", "original", "--sampler", "naive"], "--sampler does nothing with mode original"),
    (["--mode", "dilated", "--seed", "3"], "--seed"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--bench-batch", "2"], "--bench-batch does nothing without --benchmark"),
    (["--benchmark", "--bench-batch", "0"], "--bench-batch must be a positive integer"),
    (["--no-verify", "--data", "."], "--data does nothing with --no-verify"),
    (["--data-limit", "0"], "--data-limit must be a positive integer"),
    (["--tolerance", "-1"], "--tolerance must be positive"),
    (["--mode", "sideways"], "unknown mode"),
    (["--data", "/nonexistent/images"], "not a directory"),
])
def test_cli_bad_options(tmp_path, tiny_factory, args, fragment):
    out = tmp_path / "x.onnx"
    result = runner.invoke(app, [tiny_factory, "-o", str(out), "--input-size", "32", *args])
    _assert_one_line_error(result, fragment)
    assert not out.exists()


def test_cli_unavailable_provider(tmp_path, tiny_factory):
    if _cuda_works():
        pytest.skip("CUDA provider works here")
    out = tmp_path / "x.onnx"
    result = runner.invoke(app, [tiny_factory, "-o", str(out), "--input-size", "32", "--provider", "cuda"])
    _assert_one_line_error(result, "provider cuda is unavailable")
    assert not out.exists()


def test_cli_export_failure_names_the_op(tmp_path):
    (tmp_path / "weird.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        @torch.library.custom_op("ccnn_export_test::wobble", mutates_args=())
        def wobble(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        @wobble.register_fake
        def _(x):
            return torch.empty_like(x)

        class Weird(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3, stride=2)
                self.fc = nn.Linear(4, 10)

            def forward(self, x):
                return self.fc(wobble(self.conv(x)).mean((2, 3)))

        def make():
            return Weird().eval()
    """))
    out = tmp_path / "weird.onnx"
    result = runner.invoke(app, [f"{tmp_path / 'weird.py'}:make", "-o", str(out), "--mode", "original",
                                 "--input-size", "32"])
    _assert_one_line_error(result, "ONNX export failed", "ccnn_export_test.wobble")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["weird.py"]


def test_cli_verification_failure_leaves_no_file(tmp_path):
    """A model whose trace differs from its eager runs: torch.export bakes in one random draw."""
    (tmp_path / "moody.py").write_text(textwrap.dedent("""
        import random
        import torch
        from torch import nn

        class Moody(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(3, 10)

            def forward(self, x):
                return self.fc(x.mean((2, 3))) * (1 + random.random())

        def make():
            return Moody().eval()
    """))
    out = tmp_path / "moody.onnx"
    result = runner.invoke(app, [f"{tmp_path / 'moody.py'}:make", "-o", str(out), "--mode", "original",
                                 "--input-size", "16", "--provider", "cpu"])
    _assert_one_line_error(result, "verification failed", "not written")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "__pycache__") == ["moody.py"]


def test_onnx_of_a_model_trained_on_its_own_classes_is_evaluated_on_them(tmp_path, tiny_factory):
    """The class names travel in the ONNX metadata; ccnn-eval reads them back (order matters:
    the names are not sorted, so ranking the folders alphabetically would label them wrongly)."""
    import dataclasses
    import json

    from ccnn_convert.cli.eval import app as eval_app
    from ccnn_convert.models import Preprocessing, save_artifact
    from ccnn_convert.models.head import replace_head

    names = ("red", "green", "blue")
    resolved = resolve_model(tiny_factory)
    torch.manual_seed(3)
    head = replace_head(resolved.model, len(names))
    pre = Preprocessing(36, 32, (0.5,) * 3, (0.25,) * 3)
    resolved = dataclasses.replace(resolved, head=head, num_classes=3, class_names=names, preprocessing=pre)
    save_artifact(tmp_path / "best.pt", resolved, ConversionSpec("checkered"))
    onnx_path = tmp_path / "m.onnx"
    made = runner.invoke(app, [str(tmp_path / "best.pt"), "--trust-factory", "--mode", "original", "--no-verify",
                               "-o", str(onnx_path)])
    assert made.exit_code == 0, made.output
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(meta["classes"]) == list(names)

    rng = np.random.default_rng(0)
    val, expected = tmp_path / "val", []
    sess = session(onnx_path)
    for index, name in enumerate(names):
        (val / name).mkdir(parents=True)
        for k in range(3):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(val / name / f"{k}.png")
            # By hand (torchvision's tensor ops, not the package's PIL pipeline): 40 -> 36, crop 32, normalize.
            x = torchvision.transforms.functional.resize(torch.as_tensor(pixels).permute(2, 0, 1), [36],
                                                         antialias=True)
            x = torchvision.transforms.functional.center_crop(x, [32]).float() / 255
            x = (x - 0.5) / 0.25
            expected.append(int(run(sess, x[None]).argmax()) == index)
    report = tmp_path / "r.json"
    result = runner.invoke(eval_app, [str(onnx_path), "--data", str(val), "--workers", "0", "--device", "cpu",
                                      "--json", str(report)])
    assert result.exit_code == 0, result.output
    row = json.loads(report.read_text())["results"][0]
    assert row["images"] == 9 and row["top1_correct"] == sum(expected) and 0 < sum(expected) < 9, expected
