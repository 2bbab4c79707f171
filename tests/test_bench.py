"""ccnn_convert.bench and ccnn-bench against hand-computed figures.

FLOPs, parameters, submaps and peak memory of tiny models are worked out by hand below; the
ratios of hand-made measurements too. Plots are checked to be real PNGs of the promised size.
"""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from ccnn_convert import bench
from ccnn_convert.bench import BenchReport, Measurement, TimingOptions
from ccnn_convert.cli.bench import app
from ccnn_convert.errors import CCNNError, ParameterError
from ccnn_convert.flops import count_flops

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


class Tiny(nn.Module):
    """conv 2x2 stride 2 (3 -> 2 channels, no bias), global average pool, linear 2 -> 3 (no bias)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=2, stride=2, bias=False)
        self.fc = nn.Linear(2, 3, bias=False)

    def forward(self, x):
        x = self.conv(x).mean(dim=(2, 3))
        return self.fc(x)


# By hand, one 3x8x8 image: the conv has 2 x 4 x 4 = 32 outputs of 3*2*2 = 12 multiply-adds
# (384 MACs = 768 FLOPs); the linear layer 2*3 = 6 MACs = 12 FLOPs.
CONV_FLOPS, FC_FLOPS = 768, 12
# Checkered keeps 2 samples per 2x2 window: 2 submaps of 4x4, so the conv runs twice; the pool
# averages over positions and submaps, so the classifier runs once. Dilated (native, the default)
# is the conv without its stride: 2 x 7 x 7 outputs of 12 multiply-adds (2352 FLOPs).
FLOPS_PER_IMAGE = {"original": CONV_FLOPS + FC_FLOPS, "checkered": 2 * CONV_FLOPS + FC_FLOPS,
                   "dilated": 2 * 7 * 7 * 12 * 2 + FC_FLOPS}
PARAMS = 3 * 2 * 2 * 2 + 2 * 3  # conv weight + linear weight


def test_flops_params_submaps_and_ratios_of_a_tiny_model():
    rows = bench.bench_model("tiny", Tiny(), ["checkered", "dilated"], image_size=8,
                             timing=TimingOptions(batch_size=3, repeats=2, warmup=0, memory=False))
    by_mode = {m.mode: m for m in rows}
    assert list(by_mode) == ["original", "checkered", "dilated"]
    for mode, flops in FLOPS_PER_IMAGE.items():
        m = by_mode[mode]
        assert m.flops == 3 * flops
        assert m.flop_ratio == pytest.approx(flops / FLOPS_PER_IMAGE["original"])
        assert m.params == PARAMS and m.param_ratio == 1.0  # converted models share the weights
        assert len(m.times_s) == 2 and len(m.cpu_times_s) == 2 and m.median_s > 0
        assert m.time_ratio == pytest.approx(m.median_s / by_mode["original"].median_s)
    assert [by_mode[m].submaps for m in ("original", "checkered", "dilated")] == [1, 2, 1]  # native: one map
    assert by_mode["checkered"].steps == 1
    assert by_mode["original"].time_ratio == 1.0


class TinyEven(nn.Module):
    """A 1x1 conv 3 -> 4 (3 is odd: PHC n=2 keeps it dense), then a 4 -> 4 stride-2 conv (PHC applies)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1, bias=False)
        self.conv = nn.Conv2d(4, 4, 2, stride=2, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.conv(self.stem(x))).flatten(1)


def test_phc_variants_of_one_mode_are_rows_of_their_own_with_the_phc_parameter_count():
    from ccnn_convert.spec import ConversionSpec

    specs = [ConversionSpec.build("checkered"), ConversionSpec.build("checkered", phc=2)]
    rows = bench.bench_model("tiny", TinyEven(), specs, image_size=8,
                             timing=TimingOptions(batch_size=1, repeats=1, warmup=0, memory=False))
    assert [m.label for m in rows] == ["original", "checkered", "checkered, phc=2"]
    # by hand: the stem holds 3*4 = 12 weights and stays dense; the strided conv holds 4*4*2*2 = 64,
    # as PHC n=2: A (2*2*2 = 8) and F (2*2*2*2*2 = 32)
    assert [m.params for m in rows] == [76, 76, 52]


def test_count_flops_on_meta_matches_a_real_pass():
    model = Tiny().eval()
    x = torch.randn(2, 3, 8, 8)
    assert count_flops(model, x) == 2 * FLOPS_PER_IMAGE["original"]
    assert all(p.device.type == "cpu" for p in model.parameters())  # parameters put back


class TwoTemporaries(nn.Module):
    """y = x * a; z = y + b: while z is computed y is alive, so two input-sized tensors coexist."""

    def __init__(self):
        super().__init__()
        self.register_buffer("a", torch.tensor([2.0]))
        self.register_buffer("b", torch.tensor([1.0]))

    def forward(self, x):
        y = x * self.a
        return y + self.b


def test_peak_memory_counts_model_input_and_the_forward_peak():
    x_bytes = 4 * 3 * 10 * 10 * 4  # float32 input (4, 3, 10, 10)
    assert bench.forward_peak_bytes(TwoTemporaries(), torch.zeros(4, 3, 10, 10), torch.device("cpu")) == 2 * x_bytes
    rows = bench.bench_model("two", TwoTemporaries(), ["original"], image_size=10,
                             timing=TimingOptions(batch_size=4, repeats=1, warmup=0))
    m = rows[0]
    assert m.activation_peak_bytes == 2 * x_bytes
    assert m.peak_memory_bytes == 2 * 4 + x_bytes + 2 * x_bytes  # two 1-float buffers + input + peak
    assert m.memory_ratio == 1.0


def test_parameters_and_tensor_bytes_count_shared_tensors_once():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight  # tied
    assert bench.count_parameters(model) == 16 + 4 + 4
    assert bench.tensor_bytes(model) == (16 + 4 + 4) * 4


def test_ratios_are_taken_against_the_same_models_original():
    rows = [
        Measurement("a", "original", "original", times_s=[0.5, 1.0, 1.5], flops=100, peak_memory_bytes=100, params=7),
        Measurement("a", "checkered", "checkered", times_s=[1.0, 3.0, 2.0], flops=1200, peak_memory_bytes=300, params=7),
        Measurement("b", "original", "original", times_s=[4.0], flops=10, peak_memory_bytes=50, params=1),
        Measurement("b", "checkered", "checkered", skipped="too slow", flops=50, params=1),
    ]
    bench.add_ratios(rows)
    assert rows[1].time_ratio == 2.0  # median 2.0 over median 1.0
    assert rows[1].flop_ratio == 12.0 and rows[1].memory_ratio == 3.0 and rows[1].param_ratio == 1.0
    assert rows[3].time_ratio is None and rows[3].flop_ratio == 5.0 and rows[3].memory_ratio is None


def test_variants_are_interleaved_and_rotated():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = bench.time_interleaved(runs, repeats=3, device=torch.device("cpu"))
    assert calls == list("abc" "bca" "cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_max_seconds_skips_variants_but_still_counts_their_flops():
    rows = bench.bench_model("tiny", Tiny(), ["dilated"], image_size=8,
                             timing=TimingOptions(batch_size=1, repeats=1, warmup=0, memory=False, max_seconds=0.0))
    dilated = rows[1]
    assert dilated.skipped and "max_seconds" in dilated.skipped
    assert dilated.times_s == [] and dilated.time_ratio is None
    assert dilated.flops == FLOPS_PER_IMAGE["dilated"]


def _is_png(path, size) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size


def _report() -> BenchReport:
    rows = []
    for model, base in (("m1", 1.0), ("m2", 2.0)):
        rows.append(Measurement(model, "original", "original", times_s=[base], flops=10, peak_memory_bytes=10, top1=70.0))
        for kf, (factor, top1) in enumerate([(8.0, 74.0), (4.0, 73.0), (1.5, 71.0)]):
            label = bench.variant_label("checkered", kf)
            rows.append(Measurement(model, label, "checkered", keep_first=kf, times_s=[base * factor],
                                    flops=10 * kf + 10, peak_memory_bytes=20, top1=top1))
        rows.append(Measurement(model, "dilated", "dilated", times_s=[base * 30], flops=900, peak_memory_bytes=90))
    bench.add_ratios(rows)
    return BenchReport(rows, {"device": "cpu", "batch_size": 4, "repeats": 1, "memory_kind": bench.MEMORY_CPU})


def test_outputs_are_written_json_markdown_and_valid_pngs(tmp_path):
    report = _report()
    paths = bench.write_outputs(report, tmp_path / "out")
    names = sorted(p.name for p in paths)
    assert names == ["bench.json", "bench.md", "sweep.png", "time_ratio.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names  # no temporary files left
    for name in ("time_ratio.png", "sweep.png"):
        _is_png(tmp_path / "out" / name, bench.PLOT_SIZE_PX)
    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    checkered = [m for m in data["measurements"] if m["label"] == "checkered" and m["model"] == "m2"][0]
    assert checkered["time_ratio"] == 8.0 and checkered["median_s"] == 16.0
    markdown = (tmp_path / "out" / "bench.md").read_text()
    assert "| m2 | checkered | 1 | 16.00 s | 8x |" in markdown
    assert "| top-1 |" in markdown.splitlines()[0]


def test_out_must_be_a_folder(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(CCNNError, match="is a file"):
        bench.write_outputs(_report(), target)


def test_measured_modes_puts_the_original_first_and_rejects_unknown_modes():
    assert bench.measured_modes(["dilated", " checkered", "dilated"]) == ["original", "dilated", "checkered"]
    assert bench.measured_modes(["original"]) == ["original"]
    with pytest.raises(ParameterError, match="unknown mode 'checkerd' in modes"):
        bench.measured_modes(["checkerd"])


def test_timing_options_name_the_parameter():
    with pytest.raises(ParameterError, match="^repeats must be at least 1$"):
        TimingOptions(repeats=0)
    with pytest.raises(ParameterError, match="^batch_size must be positive$"):
        TimingOptions(batch_size=0)


def test_bench_options_seed_only_for_the_random_sampler():
    specs = bench.conversion_specs(bench.BenchOptions(modes=("checkered", "dilated"), sampler="random"))
    assert [(s.mode, s.sampler, s.seed) for s in specs] == [("checkered", "random", 0), ("dilated", "lattice", None)]
    specs = bench.conversion_specs(bench.BenchOptions(modes=("checkered",), sampler="random", seed=7,
                                                      keep_first=1, leaf_modules=("Gate",)))
    assert (specs[0].seed, specs[0].keep_first, specs[0].leaf_modules) == (7, 1, ("Gate",))
    with pytest.raises(ParameterError, match="seed"):
        bench.conversion_specs(bench.BenchOptions(modes=("checkered",), seed=3))  # lattice takes no seed
    with pytest.raises(ParameterError, match="sampler"):
        bench.BenchOptions(modes=("dilated",), sampler="naive")  # no checkered mode: would do nothing


# ------------------------------------------------------------------------------ the CLI


def _one_error_line(result, needle: str) -> None:
    assert result.exit_code != 0, result.output
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("error:") and needle in errors[0]


def test_cli_unknown_model_is_one_line():
    _one_error_line(runner.invoke(app, ["no_such_model_xyz", "--weights", "none"]), "no_such_model_xyz")


def test_cli_bad_mode_is_one_line():
    _one_error_line(runner.invoke(app, ["resnet18", "--modes", "checkered,zigzag"]), "unknown mode 'zigzag'")


def test_cli_bad_device_is_one_line():
    _one_error_line(runner.invoke(app, ["resnet18", "--weights", "none", "--device", "tpu"]), "--device")


def test_cli_measures_a_factory_model_and_writes_files(tmp_path):
    factory = tmp_path / "tiny.py"
    factory.write_text(textwrap.dedent("""
        from torch import nn

        def make():
            return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    """))
    out = tmp_path / "bench"
    result = runner.invoke(app, [f"{factory}:make", "--size", "16", "--batch-size", "2", "--repeats", "2",
                                 "--modes", "checkered", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "checkered" in result.stdout and "FLOPs x" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "time_ratio.png"]
    _is_png(out / "time_ratio.png", bench.PLOT_SIZE_PX)
    data = json.loads((out / "bench.json").read_text())
    ratios = {m["label"]: m["flop_ratio"] for m in data["measurements"]}
    # conv: 4*8*8 outputs x 27 MACs; linear: 40 MACs. Checkered runs the conv on 2 submaps.
    conv, fc = 2 * 4 * 8 * 8 * 27, 2 * 40
    assert ratios["checkered"] == pytest.approx((2 * conv + fc) / (conv + fc))


# ------------------------------------------------------------------------------ issue 9: outputs, trust, leaves


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
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
"""

QUICK = ["--size", "16", "--batch-size", "1", "--repeats", "1", "--warmup", "0", "--no-memory",
         "--modes", "checkered", "--device", "cpu"]


def _tiny_factory(tmp_path) -> str:
    factory = tmp_path / "tiny.py"
    factory.write_text("from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, "
                       "padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))\n")
    return f"{factory}:make"


def test_cli_out_refuses_to_overwrite_before_measuring_and_force_allows_it(tmp_path):
    out = tmp_path / "bench"
    out.mkdir()
    (out / "bench.md").write_text("earlier results")
    result = runner.invoke(app, [_tiny_factory(tmp_path), *QUICK, "--out", str(out)])
    _one_error_line(result, "--force")
    assert result.exit_code == 2 and "bench.md" in result.stderr
    assert "cost per batch" not in result.stdout  # refused before measuring
    assert sorted(p.name for p in out.iterdir()) == ["bench.md"]  # nothing written
    assert (out / "bench.md").read_text() == "earlier results"

    result = runner.invoke(app, [_tiny_factory(tmp_path), *QUICK, "--out", str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "time_ratio.png"]
    assert "| checkered |" in (out / "bench.md").read_text()


def test_cli_out_naming_a_file_is_one_line(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("x")
    result = runner.invoke(app, [_tiny_factory(tmp_path), *QUICK, "--out", str(target)])
    _one_error_line(result, "is a file, not a folder")
    assert result.exit_code == 2 and target.read_text() == "x"


def test_write_outputs_refuses_to_overwrite_and_writes_nothing(tmp_path):
    (tmp_path / "sweep.png").write_bytes(b"old")
    with pytest.raises(ParameterError, match="sweep.png already exists") as caught:
        bench.write_outputs(_report(), tmp_path)
    assert caught.value.parameter == "force"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.png"]  # checked before any file is written
    assert (tmp_path / "sweep.png").read_bytes() == b"old"
    bench.write_outputs(_report(), tmp_path, force=True)
    _is_png(tmp_path / "sweep.png", bench.PLOT_SIZE_PX)


def test_cli_leaf_makes_an_untraceable_model_measurable(tmp_path):
    (tmp_path / "gated.py").write_text(GATED_FACTORY)
    model = f"{tmp_path / 'gated.py'}:make"
    result = runner.invoke(app, [model, *QUICK])
    assert result.exit_code == 2, result.output
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1, result.stderr
    result = runner.invoke(app, [model, *QUICK, "--leaf", "Gate"])
    assert result.exit_code == 0, result.output
    assert "checkered" in result.stdout


def test_cli_artifact_factory_runs_only_with_trust_and_keeps_its_leaves(tmp_path):
    from ccnn_convert.models import resolve_model, save_artifact
    from ccnn_convert.spec import ConversionSpec

    (tmp_path / "gated.py").write_text(GATED_FACTORY)
    resolved = resolve_model(f"{tmp_path / 'gated.py'}:make", weights="none")
    artifact = tmp_path / "gated.pt"
    save_artifact(artifact, resolved, ConversionSpec("checkered", leaf_modules=("Gate",)))
    sentinel = tmp_path / "SENTINEL"
    sentinel.unlink()

    result = runner.invoke(app, [str(artifact), *QUICK])
    _one_error_line(result, "--trust-factory")
    assert result.exit_code == 2 and not sentinel.exists()

    result = runner.invoke(app, [str(artifact), *QUICK, "--trust-factory"])  # no --leaf: the artifact's list
    assert result.exit_code == 0, result.output
    assert sentinel.exists() and "checkered" in result.stdout


# ------------------------------------------------------------------------------ issue 24: ONNX Runtime latency


def test_onnx_latency_of_every_mode_is_timed_and_its_ratio_taken_against_the_original():
    pytest.importorskip("onnxruntime")
    rows = bench.bench_model("tiny", Tiny(), ["diffstride"], image_size=8,
                             timing=TimingOptions(batch_size=2, repeats=3, warmup=1, memory=False, onnx=True))
    by_mode = {m.mode: m for m in rows}
    assert list(by_mode) == ["original", "diffstride"]
    for m in rows:
        assert m.onnx_skipped is None and len(m.onnx_times_s) == 3 and all(t > 0 for t in m.onnx_times_s)
        expected = sorted(m.onnx_times_s)[1] / sorted(by_mode["original"].onnx_times_s)[1]  # medians of 3
        assert m.onnx_time_ratio == pytest.approx(expected)
        assert m.to_dict()["median_onnx_s"] == sorted(m.onnx_times_s)[1]
    headers, cells = bench.table_rows(rows)
    column = headers.index("ORT time/batch")
    assert headers[column + 1] == "ORT time x"
    assert [row[column] for row in cells] == [bench.fmt_seconds(m.median_onnx_s) for m in rows]
    assert "ORT time/batch" not in bench.table_rows([Measurement("tiny", "original", "original")])[0]  # off: no column


def test_cli_onnx_names_the_mode_that_cannot_export(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    from ccnn_convert.bench import ort
    from ccnn_convert.errors import ExportError

    real = ort._session

    def failing_for_the_converted(model, path, size):
        if path.name != "variant0.onnx":  # the original exports; the checkered variant cannot
            raise ExportError("operator 'Zigzag' has no ONNX translation")
        return real(model, path, size)

    monkeypatch.setattr(ort, "_session", failing_for_the_converted)
    out = tmp_path / "bench"
    result = runner.invoke(app, [_tiny_factory(tmp_path), *QUICK, "--onnx", "--out", str(out)])
    assert result.exit_code == 0, result.output
    markdown = (out / "bench.md").read_text()
    assert "ORT time/batch" in markdown and "ORT time:" in markdown.replace("- ORT time:", "ORT time:")
    lines = {line.split("|")[2].strip(): line for line in markdown.splitlines() if line.startswith("| ")}
    assert "cannot export: operator 'Zigzag' has no ONNX translation" in lines["checkered"]
    measurements = {m["label"]: m for m in json.loads((out / "bench.json").read_text())["measurements"]}
    assert measurements["original"]["median_onnx_s"] > 0 and measurements["checkered"]["median_onnx_s"] is None
