"""PHC layers (issue 25, part 1): the weight is a sum of Kronecker products, the nearest such sum
fitted to a pretrained weight, gradients, every mode, ONNX and the commands. The expectations are
written independently in NumPy (np.kron per kernel tap, an SVD of blocks cut out by slicing)."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ccnn_convert import ParameterError, convert, conversion_report
from ccnn_convert.core import phc
from ccnn_convert.core.phc import PHConv2d, convert_phc, dense_copy, nearest_kronecker_sum
from test_train import _cli  # the CLI runner of the command tests

N_SHAPES = [(2, 4, 6, (3, 3)), (3, 6, 9, (3, 1)), (4, 8, 12, (1, 3)), (2, 6, 4, (2, 3))]  # n, in, out, kernel


def numpy_kronecker_sum(A: np.ndarray, Fs: np.ndarray) -> np.ndarray:
    """The definition, one kernel tap at a time: W[:, :, h, w] = sum_i kron(A_i, F_i[:, :, h, w])."""
    n, o, c, kh, kw = Fs.shape
    weight = np.zeros((n * o, n * c, kh, kw))
    for h in range(kh):
        for w in range(kw):
            weight[:, :, h, w] = sum(np.kron(A[i], Fs[i, :, :, h, w]) for i in range(n))
    return weight


def numpy_blocks(weight: np.ndarray, n: int) -> np.ndarray:
    """Van Loan and Pitsianis: block (p, q), cut out by slicing, flattened into row p*n + q."""
    o, c = weight.shape[0] // n, weight.shape[1] // n
    return np.stack([weight[p * o:(p + 1) * o, q * c:(q + 1) * c].ravel() for p in range(n) for q in range(n)])


# --------------------------------------------------------------------------------------------
# the layer


@pytest.mark.parametrize("n,cin,cout,kernel", N_SHAPES)
def test_weight_and_output_equal_the_numpy_kronecker_sum(n, cin, cout, kernel):
    torch.manual_seed(n)
    layer = PHConv2d(n, cin, cout, kernel, stride=2, padding=1).double()
    expected = numpy_kronecker_sum(layer.A.detach().numpy(), layer.F.detach().numpy())
    np.testing.assert_allclose(layer.weight.detach().numpy(), expected, rtol=0, atol=1e-12)
    x = torch.randn(2, cin, 7, 8, dtype=torch.float64)
    reference = F.conv2d(x, torch.from_numpy(expected), layer.bias, stride=2, padding=1)
    torch.testing.assert_close(layer(x), reference, rtol=0, atol=1e-10)


def test_parameters_follow_the_formula():
    layer = PHConv2d(4, 16, 32, 3)
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"A": (4, 4, 4), "F": (4, 8, 4, 3, 3), "bias": (32,)}
    # n^3 + out*in*k*k/n + out = 64 + 32*16*9/4 + 32
    assert sum(p.numel() for p in layer.parameters()) == 64 + 1152 + 32 == 1248
    assert sum(p.numel() for p in PHConv2d(2, 8, 6, (1, 3), bias=False).parameters()) == 8 + 6 * 8 * 3 // 2


def test_init_is_xavier_uniform_of_the_published_shapes():
    torch.manual_seed(0)
    layer = PHConv2d(2, 64, 64, 3)
    for tensor, fan_in, fan_out in ((layer.A, 2 * 2, 2 * 2), (layer.F, 32 * 32 * 9, 2 * 32 * 9)):
        bound = (6 / (fan_in + fan_out)) ** 0.5  # torch's fans: size(1) and size(0) times the rest
        largest = float(tensor.detach().abs().max())
        assert 0.9 * bound < largest <= bound  # uniform over the whole range  # uniform over the whole range


def test_channels_not_divisible_is_one_error_naming_the_layer():
    with pytest.raises(ParameterError, match=r"layer features\.0: in_channels / groups = 3 is not divisible"):
        PHConv2d(2, 3, 8, 3, name="features.0")
    with pytest.raises(ParameterError, match="out_channels = 6 is not divisible"):
        PHConv2d(4, 8, 6, 3)
    with pytest.raises(ParameterError, match="at least 2"):
        PHConv2d(1, 8, 8, 3)


def test_gradients_reach_A_F_and_bias_and_match_finite_differences():
    torch.manual_seed(0)
    layer = PHConv2d(2, 4, 4, (3, 2), stride=2, padding=1).double()
    x = torch.randn(1, 4, 4, 3, dtype=torch.float64, requires_grad=True)

    def run(x, A, Fs, bias):
        return torch.func.functional_call(layer, {"A": A, "F": Fs, "bias": bias}, (x,))

    params = [p.detach().clone().requires_grad_() for p in (layer.A, layer.F, layer.bias)]
    assert torch.autograd.gradcheck(run, (x, *params))
    layer(x).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.A, layer.F, layer.bias))


def test_eval_computes_the_weight_once_until_the_parameters_change():
    layer = PHConv2d(2, 4, 4, 3).eval()
    with torch.no_grad():
        first = layer.weight
        assert layer.weight is first  # cached
        layer.A.add_(1.0)  # an in-place change (an optimizer step, load_state_dict) bumps the version
        changed = layer.weight
    assert changed is not first
    np.testing.assert_allclose(changed.numpy(), numpy_kronecker_sum(layer.A.detach().numpy(),
                                                                    layer.F.detach().numpy()), atol=1e-6)
    layer.train()
    assert layer.weight is not layer.weight  # training: built at every forward, with its graph
    assert layer.weight.requires_grad


# --------------------------------------------------------------------------------------------
# the nearest Kronecker sum


@pytest.mark.parametrize("n,cin,cout,kernel", N_SHAPES)
def test_an_exact_kronecker_sum_is_recovered(n, cin, cout, kernel):
    rng = np.random.default_rng(n)
    A = rng.standard_normal((n, n, n))
    Fs = rng.standard_normal((n, cout // n, cin // n, *kernel))
    weight = torch.from_numpy(numpy_kronecker_sum(A, Fs))
    fitted_A, fitted_F, error = nearest_kronecker_sum(weight, n)
    assert error < 1e-7
    np.testing.assert_allclose(numpy_kronecker_sum(fitted_A.numpy(), fitted_F.numpy()), weight.numpy(),
                               rtol=0, atol=1e-6 * np.abs(weight.numpy()).max())


@pytest.mark.parametrize("n,cin,cout,kernel", N_SHAPES)
def test_a_random_weight_is_fitted_with_the_tail_singular_values_as_error(n, cin, cout, kernel):
    weight = np.random.default_rng(10 + n).standard_normal((cout, cin, *kernel))
    A, Fs, error = nearest_kronecker_sum(torch.from_numpy(weight), n)
    u, s, vh = np.linalg.svd(numpy_blocks(weight, n), full_matrices=False)
    assert error == pytest.approx(np.sqrt((s[n:] ** 2).sum() / (s ** 2).sum()), rel=1e-9)
    # Eckart-Young: the fitted weight, rearranged, is the rank-n truncation
    best = (u[:, :n] * s[:n]) @ vh[:n]
    np.testing.assert_allclose(numpy_blocks(numpy_kronecker_sum(A.numpy(), Fs.numpy()), n), best, atol=1e-10)
    fitted = numpy_kronecker_sum(A.numpy(), Fs.numpy())
    assert np.linalg.norm(fitted - weight) / np.linalg.norm(weight) == pytest.approx(error, rel=1e-9)


# --------------------------------------------------------------------------------------------
# the pass, every mode


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 16, 1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.MaxPool2d(2, 2), nn.Conv2d(16, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).eval()


def test_the_pass_fits_every_eligible_conv_and_reports_the_rest():
    model = _net()
    phc, report = convert_phc(model, 2)
    assert [(layer.name, layer.converted) for layer in report.layers] == [
        ("0", False), ("3", False), ("4", True), ("6", True), ("10", True)]
    assert "depthwise" in report.layers[1].kept and "in/groups=3" in report.layers[0].kept
    dense = dict(model.named_modules())
    for layer in report.converted:
        weight = dense[layer.name].weight.detach().double().numpy()
        s = np.linalg.svd(numpy_blocks(weight, 2), compute_uv=False)
        assert layer.error == pytest.approx(np.sqrt((s[2:] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
        assert layer.params_after == sum(p.numel() for p in phc.get_submodule(layer.name).parameters())
    assert report.params_after == sum(p.numel() for p in phc.parameters()) - 8 * 3 - 3 - 2 * (8 + 16)  # no BN, Linear
    assert isinstance(model[4], nn.Conv2d) and not isinstance(model[4], PHConv2d)  # the model is untouched
    assert phc[4].bias is model[4].bias  # the bias is the pretrained one


@pytest.mark.parametrize("mode,options", [
    ("traditional", {}), ("checkered", {}), ("checkered", {"edges": "exact"}), ("dilated", {}),
    ("dilated", {"dilation": "multisample"}), ("spectral", {}), ("diffstride", {}), ("blurpool", {})])
def test_every_mode_converts_the_phc_layers_as_the_convs_they_are(mode, options):
    """PHC then the mode == the mode on a dense model holding the fitted weights (NumPy-built)."""
    model, x = _net(), torch.randn(2, 3, 29, 31, generator=torch.Generator().manual_seed(3))
    converted = convert(model, mode=mode, phc=2, example_input=x, **options).eval()
    assert conversion_report(converted).phc.n == 2
    reference = _net()
    with torch.no_grad():
        for name, layer in convert_phc(model, 2)[0].named_modules():
            if isinstance(layer, PHConv2d):
                weight = numpy_kronecker_sum(layer.A.double().numpy(), layer.F.double().numpy())
                reference.get_submodule(name).weight.copy_(torch.from_numpy(weight))
        expected = convert(reference, mode=mode, example_input=x, **options).eval()(x)
        torch.testing.assert_close(converted(x), expected, rtol=1e-4, atol=1e-5)
    converted.train()
    converted(x).square().sum().backward()
    phc_layers = [m for m in converted.modules() if hasattr(m, "A")]
    assert len(phc_layers) == 3 and all(m.A.grad is not None and m.F.grad is not None for m in phc_layers)


class SamePadConv(nn.Conv2d):
    """A conv class with its own forward reading self.weight (as EfficientNet-Lite's static "same" padding)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_a_conv_traced_through_builds_its_weight_once_in_eval_until_the_parameters_change(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(SamePadConv(4, 8, 3), nn.ReLU(), SamePadConv(8, 8, 3, stride=2)).eval()
    converted = convert(model, mode="traditional", phc=2, example_input=torch.zeros(1, 4, 9, 9)).eval()
    builds = []
    real = phc.kronecker_sum
    monkeypatch.setattr(phc, "kronecker_sum", lambda A, F: builds.append(A) or real(A, F))
    x = torch.randn(2, 4, 9, 9)
    with torch.no_grad():
        first = converted(x)
        assert len(builds) == 2  # one weight per PHC layer
        torch.testing.assert_close(converted(x), first, rtol=0, atol=0)
        assert len(builds) == 2  # kept: the second forward builds nothing
        layer = next(m for m in converted.modules() if hasattr(m, "A"))
        layer.A.mul_(-1.0)  # an in-place change (an optimizer step) bumps the version
        changed = converted(x)
    assert len(builds) == 3 and not torch.allclose(changed, first)
    dense = copy.deepcopy(model)  # the expectation: plain convs holding the NumPy-built weights
    with torch.no_grad():
        for name, module in converted.named_modules():
            if hasattr(module, "A"):
                dense.get_submodule(name).weight.copy_(torch.from_numpy(numpy_kronecker_sum(
                    module.A.double().numpy(), module.F.double().numpy())))
        torch.testing.assert_close(changed, dense(x), rtol=1e-4, atol=1e-5)
    converted(x).sum().backward()  # with a graph to build, every forward builds it (and its gradient)
    assert len(builds) == 5 and layer.A.grad is not None


@pytest.mark.parametrize("mode", ["checkered", "dilated"])
def test_a_conv_class_with_its_own_forward_gets_the_kronecker_weight(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), SamePadConv(8, 8, 3), nn.ReLU(), SamePadConv(8, 16, 3, stride=2),
                          nn.AdaptiveAvgPool2d(1)).eval()
    x = torch.randn(2, 3, 15, 16)
    converted = convert(model, mode=mode, phc=2, example_input=x).eval()
    report = conversion_report(converted).phc
    assert [layer.name for layer in report.converted] == ["1", "3"]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in ("1", "3"):
            A, Fs, _ = nearest_kronecker_sum(model.get_submodule(name).weight, 2)
            reference.get_submodule(name).weight.copy_(torch.from_numpy(
                numpy_kronecker_sum(A.double().numpy(), Fs.double().numpy())))
        expected = convert(reference, mode=mode, example_input=x).eval()(x)
        torch.testing.assert_close(converted(x), expected, rtol=1e-4, atol=1e-5)
        dense = dense_copy(converted)  # what ONNX exports: the weight as a constant, not A and F
        reads = {node.target.rpartition(".")[2] for node in dense.graph.nodes if node.op == "get_attr"}
        assert "kronecker_sum" not in dense.code and not reads & {"A", "F"}
        torch.testing.assert_close(dense(x), converted(x), rtol=0, atol=1e-6)


def test_xavier_init_ignores_the_weights():
    torch.manual_seed(0)
    phc, report = convert_phc(_net(), 4, init="xavier")
    assert report.error is None and all(layer.error is None for layer in report.layers)
    assert float(phc[6].A.detach().abs().max()) <= (6 / 32) ** 0.5  # xavier bound of (4, 4, 4)


# --------------------------------------------------------------------------------------------
# ONNX


def test_onnx_holds_the_materialised_weight_and_matches_eager(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from ccnn_convert.export import export

    model = _net()
    result = export(model, tmp_path / "phc.onnx", mode="checkered", phc=2, input_size=32, verify=None)
    shapes = {tuple(t.dims) for t in onnx.load(str(result.path)).graph.initializer}
    assert (8, 16, 3, 3) in shapes and (2, 2, 2) not in shapes  # the weight, not A and F
    converted = convert(model, mode="checkered", phc=2, example_input=torch.zeros(1, 3, 32, 32)).eval()
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = converted(x).numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert isinstance(dense_copy(converted).get_submodule("10"), nn.Conv2d)


# --------------------------------------------------------------------------------------------
# the commands

KRONECKER_NET = '''
import numpy as np
import torch
from torch import nn

def make():
    """A net whose 8->16 and 16->16 convs are exactly sums of 2 Kronecker products."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 3))
    rng = np.random.default_rng(0)
    for conv in (net[3], net[6]):
        o, c, kh, kw = conv.weight.shape
        A, F = rng.standard_normal((2, 2, 2)), 0.3 * rng.standard_normal((2, o // 2, c // 2, kh, kw))
        weight = sum(np.einsum("pq,abhw->paqbhw", A[i], F[i]) for i in range(2)).reshape(o, c, kh, kw)
        conv.weight.data = torch.from_numpy(weight).float()
    return net.eval()
'''


def _images(folder, count: int = 6) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for label, wnid in enumerate(("n01440764", "n01443537", "n01484850")):
        (folder / wnid).mkdir(parents=True)
        for i in range(count // 3):
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / wnid / f"{i}.png")


def test_convert_then_eval_with_phc_2(tmp_path, monkeypatch, caplog):
    from ccnn_convert.cli.convert import app as convert_app
    from ccnn_convert.cli.eval import app as eval_app
    from ccnn_convert.models import load_artifact

    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(KRONECKER_NET)
    code, out = _cli(convert_app, ["net.py:make", "--mode", "traditional", "--phc", "2", "--input-size", "32",
                                   "-o", "phc.pt"])
    assert code == 0, out
    assert "PHC n=2: 2 convolutions, 1 kept dense" in " ".join(out.split())
    artifact = load_artifact(tmp_path / "phc.pt", trust_factory=True)
    assert artifact.conversion.phc == 2
    assert sorted(artifact.conversion_state) == ["3.A", "3.F", "6.A", "6.F"]  # the bias stays the original's
    weight = numpy_kronecker_sum(artifact.conversion_state["3.A"].double().numpy(),
                                 artifact.conversion_state["3.F"].double().numpy())
    np.testing.assert_allclose(weight, artifact.model[3].weight.detach().double().numpy(), atol=1e-5)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="ccnn_convert.models.record"):
        rebuilt = artifact.converted(artifact.conversion, 32)
    with torch.no_grad():  # what ccnn-eval builds from the artifact == the original (the fit is exact)
        torch.testing.assert_close(rebuilt(x), artifact.model(x), rtol=1e-4, atol=1e-5)
    # the load is logged by count, not value by value: A 2x2x2 twice, F 2x8x4x3x3 and 2x8x8x1x1
    loaded = [r.getMessage() for r in caplog.records if "conversion parameters loaded" in r.getMessage()]
    assert len(loaded) == 1 and "4 larger tensors, 720 values" in loaded[0] and "3.F=" not in loaded[0], loaded

    _images(tmp_path / "val")
    code, out = _cli(eval_app, ["phc.pt", "--trust-factory", "--data", "val", "--modes", "original,traditional",
                                "--resize", "32", "--crop", "32", "--workers", "0", "--device", "cpu",
                                "--json", "eval.json"])
    assert code == 0, out
    results = {r["mode"]: r for r in json.loads((tmp_path / "eval.json").read_text())["results"]}
    # the fit of exact Kronecker sums is exact: the PHC network answers as the original does
    assert results["traditional"]["top1"] == results["original"]["top1"]
    agreement = [v for k, v in results["traditional"].items() if "agree" in k]
    assert agreement and all(value == pytest.approx(100.0) for value in agreement), results["traditional"]  # percent


@pytest.mark.parametrize("command", ["convert", "eval", "bench", "export", "train"])
def test_every_command_takes_phc_and_refuses_it_where_it_does_nothing(command, tmp_path, monkeypatch):
    import importlib

    app = importlib.import_module(f"ccnn_convert.cli.{command}").app
    code, out = _cli(app, ["--help"])
    assert code == 0 and "--phc" in out
    monkeypatch.chdir(tmp_path)
    args = {"convert": ["efficientnet_lite0"], "eval": ["efficientnet_lite0", "--data", "."],
            "bench": ["efficientnet_lite0"], "export": ["efficientnet_lite0"],
            "train": ["efficientnet_lite0", "--data", ".", "--out", "o"]}[command]
    code, out = _cli(app, [*args, "--phc", "1"])
    assert code == 2 and "--phc" in out and "Traceback" not in out and len(out.strip().splitlines()) == 1, out


def test_phc_with_only_the_original_model_is_refused():
    from ccnn_convert.cli.eval import app as eval_app

    code, out = _cli(eval_app, ["efficientnet_lite0", "--data", ".", "--modes", "original", "--phc", "2"])
    assert code == 2 and "--phc" in out and len(out.strip().splitlines()) == 1, out
