"""convert() on small CNNs against a slow reference that runs the network over a list of
submaps by hand, and on torchvision models against independent expectations."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import reference
from ccnn_convert import conversion_report, convert, count_flops
from ccnn_convert.core import sequences
from ccnn_convert.errors import ConversionError, ParameterError


class SmallNet(nn.Module):
    """Stem, max pool, a residual block with a strided shortcut, squeeze-excitation, an average
    pool, a functional strided conv with an explicit pad, a global pool and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.conv_a = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.conv_b = nn.Conv2d(16, 16, 3, padding=1, groups=2)
        self.short = nn.Conv2d(8, 16, 1, stride=2)
        self.se = nn.Conv2d(16, 16, 1)
        self.avg = nn.AvgPool2d(2, 2)
        self.extra = nn.Parameter(torch.randn(16, 16, 3, 3) / 12)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = self.pool(x)
        y = F.relu(self.conv_b(F.relu(self.conv_a(x))) + self.short(x))
        y = y * torch.sigmoid(self.se(F.adaptive_avg_pool2d(y, 1)))
        y = self.avg(y)
        y = F.conv2d(F.pad(y, (0, 1, 0, 1)), self.extra, stride=2)
        return self.fc(torch.flatten(y.mean((2, 3)), 1))


def _conv_kw(conv: nn.Conv2d):
    return dict(kernel=conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                groups=conv.groups, weight=conv.weight, bias=conv.bias)


def _strided(op, maps, sequence, **kw):
    """Sample every submap by hand: sample j of submap i becomes submap j*S + i."""
    if sequence is None:
        return [reference.sample(op, m, 0, 0, **kw) for m in maps]
    out = {}
    for i, (m, sampler) in enumerate(zip(maps, sequence)):
        for j, (dy, dx) in enumerate(sampler):
            out[j * len(maps) + i] = reference.sample(op, m, dy, dx, **kw)
    return [out[k] for k in sorted(out)]


def small_net_reference(net: SmallNet, x, seqs, training=False):
    """SmallNet's forward, submap by submap. ``seqs[t]`` is step t's sequence or None (kept)."""
    maps = [x]
    maps = _strided("conv", maps, seqs[0], **_conv_kw(net.stem))
    if training:  # batch statistics over batch, submaps and positions
        maps = list(net.bn(torch.cat(maps)).split(x.shape[0]))
    else:
        maps = [net.bn(m) for m in maps]
    maps = [F.relu(m) for m in maps]
    maps = _strided("max", maps, seqs[1], kernel=3, stride=2, padding=1, dilation=1, ceil_mode=False)
    a = _strided("conv", maps, seqs[2], **_conv_kw(net.conv_a))
    s = _strided("conv", maps, seqs[2], **_conv_kw(net.short))
    maps = [F.relu(net.conv_b(F.relu(ai)) + si) for ai, si in zip(a, s)]
    pooled = torch.stack([m.mean((2, 3), keepdim=True) for m in maps]).mean(0)  # over all submaps
    scale = torch.sigmoid(net.se(pooled))
    maps = [m * scale for m in maps]
    maps = _strided("avg", maps, seqs[3], kernel=2, stride=2, padding=0, ceil_mode=False, count_include_pad=True)
    maps = [F.pad(m, (0, 1, 0, 1)) for m in maps]
    maps = _strided("conv", maps, seqs[4], kernel=3, stride=2, padding=0, dilation=1, groups=1,
                    weight=net.extra, bias=None)
    features = torch.stack([m.mean((2, 3)) for m in maps]).mean(0)
    return net.fc(features)


def small_net_exact_reference(net: SmallNet, x, seqs):
    """SmallNet's forward, submap by submap, under exact edges (tests/reference.py's rule);
    F.pad's zeros count as real, as in the dense network."""
    maps, reals = reference.multisample_exact("conv", [x], [tuple(x.shape[2:])], seqs[0], **_conv_kw(net.stem))
    maps = [F.relu(net.bn(m)) for m in maps]
    maps, reals = reference.multisample_exact("max", maps, reals, seqs[1], kernel=3, stride=2, padding=1,
                                              dilation=1, ceil_mode=False)
    a, reals_a = reference.multisample_exact("conv", maps, reals, seqs[2], **_conv_kw(net.conv_a))
    s, reals_s = reference.multisample_exact("conv", maps, reals, seqs[2], **_conv_kw(net.short))
    assert reals_a == reals_s
    b, reals = reference.multisample_exact("conv", [F.relu(m) for m in a], reals_a, None, **_conv_kw(net.conv_b))
    maps = [F.relu(bi + si) for bi, si in zip(b, s)]
    scale = torch.sigmoid(net.se(reference.global_mean_exact(maps, reals)[:, :, None, None]))
    maps = [m * scale for m in maps]
    maps, reals = reference.multisample_exact("avg", maps, reals, seqs[3], kernel=2, stride=2, padding=0,
                                              ceil_mode=False, count_include_pad=True)
    maps = [F.pad(m[:, :, :r, :c], (0, 1 + m.shape[3] - c, 0, 1 + m.shape[2] - r)) for m, (r, c) in zip(maps, reals)]
    reals = [(r + 1, c + 1) for r, c in reals]
    maps, reals = reference.multisample_exact("conv", maps, reals, seqs[4], kernel=3, stride=2, padding=0,
                                              dilation=1, groups=1, weight=net.extra, bias=None)
    return net.fc(reference.global_mean_exact(maps, reals))


def _sequences_of(model, steps=5):
    """The sampler sequence each step of a converted model uses (None where kept)."""
    seqs = []
    for t in range(1, steps + 1):
        sampler = getattr(model, f"ccnn_sampler_step{t}", None)
        if sampler is None:
            seqs.append(None)
            continue
        table = sampler()
        n, submaps, _ = table.shape
        seqs.append([[tuple(table[j, i, 1:].tolist()) for j in range(n)] for i in range(submaps)])
    return seqs


def _expected_submaps(seqs):
    counts, s = [], 1
    for seq in seqs:
        s *= 1 if seq is None else len(seq[0])
        counts.append(s)
    return counts


def _small_net():
    torch.manual_seed(0)
    net = SmallNet().eval()
    net.bn.running_mean.uniform_(-0.3, 0.3)
    net.bn.running_var.uniform_(0.5, 1.5)
    return net


@pytest.mark.parametrize("sampler", ["naive", "lattice", "random"])
@pytest.mark.parametrize("keep_first", [0, 2])
def test_checkered_small_net_matches_slow_reference(sampler, keep_first):
    net = _small_net()
    x = torch.randn(2, 3, 29, 32)
    seed = 3 if sampler == "random" else None  # a seed only seeds the random sampler
    model = convert(net, mode="checkered", sampler=sampler, keep_first=keep_first, seed=seed, example_input=x)
    seqs = _sequences_of(model)
    assert [s is None for s in seqs] == [t < keep_first for t in range(5)]
    with torch.no_grad():
        torch.testing.assert_close(model(x), small_net_reference(net, x, seqs), rtol=1e-4, atol=1e-5)
    # The sequences are the ones documented, independently of the model's tables.
    if sampler != "random":
        counts = [1] + _expected_submaps(seqs)[:-1]
        for t, seq in enumerate(seqs):
            if seq is not None:
                assert seq == sequences.sampler_sequence(sampler, counts[t], 2, 2)


def test_dilated_and_dense_small_net_match_slow_reference():
    net = _small_net()
    x = torch.randn(1, 3, 27, 32)
    for kwargs in ({"mode": "dilated", "keep_first": 3}, {"density": 3, "keep_first": 2}):
        model = convert(net, example_input=x, **kwargs)
        seqs = _sequences_of(model)
        # dilated is exact at the edges; checkered (density) keeps the reference rule by default
        expected = (small_net_exact_reference if kwargs.get("mode") == "dilated" else small_net_reference)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected(net, x, seqs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode, keep_first", [("checkered", 0), ("checkered", 2), ("dilated", 2)])
def test_exact_edges_small_net_matches_the_exact_reference(mode, keep_first):
    """Residual add, squeeze-excitation's global pool and a zero F.pad under exact edges."""
    net = _small_net()
    x = torch.randn(1, 3, 27, 37)
    options = {"dilation": "multisample"} if mode == "dilated" else {}  # the reference reads the submaps
    model = convert(net, mode=mode, keep_first=keep_first, edges="exact", example_input=x, **options)
    seqs = _sequences_of(model)
    with torch.no_grad():
        expected = small_net_exact_reference(net, x, seqs)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(small_net_reference(net, x, seqs), expected, rtol=1e-3, atol=1e-3)
        if mode == "dilated":  # native dilation computes the same dense network
            native = convert(net, mode=mode, keep_first=keep_first, dilation="native", example_input=x)
            torch.testing.assert_close(native(x), expected, rtol=1e-4, atol=1e-5)


def test_training_mode_batchnorm_and_gradients():
    net = _small_net().train()
    x = torch.randn(2, 3, 32, 32)
    model = convert(net, mode="checkered", sampler="lattice", example_input=x)
    model.train()
    seqs = _sequences_of(model)
    before = net.bn.running_mean.clone()
    out = model(x)
    expected = small_net_reference(_small_net().train(), x, seqs, training=True)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert not torch.equal(net.bn.running_mean, before)  # shared buffers were updated
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_random_sampler_redraws_in_training_and_is_fixed_in_eval():
    net = _small_net()
    x = torch.randn(1, 3, 32, 32)
    model = convert(net, mode="checkered", sampler="random", seed=11, example_input=x)
    fixed = [s() for s in (model.ccnn_sampler_step3,) * 3]
    assert all(torch.equal(fixed[0], t) for t in fixed)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # deterministic in eval mode
    again = convert(net, mode="checkered", sampler="random", seed=11, example_input=x)
    assert torch.equal(again.ccnn_sampler_step3.table, model.ccnn_sampler_step3.table)
    model.train()
    draws = {tuple(model.ccnn_sampler_step5().flatten().tolist()) for _ in range(20)}
    assert len(draws) > 1


def test_traditional_is_bit_for_bit_and_weights_are_unchanged():
    net = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(convert(net, mode="traditional")(x), net(x))
    model = convert(net, mode="checkered")
    original = net.state_dict()
    converted = model.state_dict()
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[k], original[k]) for k in original)
    assert type(net.conv1) is nn.Conv2d  # the original is not modified
    with torch.no_grad():
        assert model(x).shape == net(x).shape == (2, 1000)


@pytest.mark.parametrize("builder", [torchvision.models.resnet50, torchvision.models.resnext50_32x4d])
def test_dilated_equals_torchvision_replace_stride_with_dilation(builder):
    torch.manual_seed(0)
    model = reference.randomize_batchnorm(builder()).eval()
    dilated = builder(replace_stride_with_dilation=[True, True, True]).eval()
    dilated.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    for dilation in ("multisample", "native"):
        converted = convert(model, mode="dilated", keep_first=2, dilation=dilation, example_input=x)
        with torch.no_grad():
            actual, expected = converted(x), dilated(x)
        assert ((actual - expected).abs().max() / expected.abs().max()).item() <= 1e-5, dilation


def test_steps_group_parallel_branches_and_keep_first_counts_steps():
    model = convert(torchvision.models.resnet18(), mode="checkered", keep_first=3)
    report = conversion_report(model)
    steps = {r.name: r.step for r in report.layers}
    assert steps["layer2.0.conv1"] == steps["layer2.0.downsample.0"] == 3
    assert report.steps == 5
    kept = {r.name for r in report.layers if not r.converted}
    assert kept == {"conv1", "maxpool", "layer2.0.conv1", "layer2.0.downsample.0"}
    assert report.final_submaps == 4


class InceptionLike(nn.Module):
    """Three strided branches from one input, concatenated (Inception's reduction block)."""

    def __init__(self):
        super().__init__()
        self.b1 = nn.Conv2d(3, 4, 3, stride=2)
        self.b2a = nn.Conv2d(3, 4, 1)
        self.b2b = nn.Conv2d(4, 4, 3, stride=2)
        self.pool = nn.MaxPool2d(3, 2)
        self.features = nn.AdaptiveAvgPool2d((2, 2))
        self.head = nn.Sequential(nn.Linear(11 * 4, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        y = torch.cat([self.b1(x), self.b2b(self.b2a(x)), self.pool(x)], dim=1)
        return self.head(torch.flatten(self.features(y), 1))


def test_concatenated_branches_form_one_step_and_average_before_flatten():
    torch.manual_seed(3)  # a seed where averaging after the classifier gives other numbers (checked below)
    net = InceptionLike().eval()
    x = torch.randn(2, 3, 15, 17)
    model = convert(net, mode="checkered", sampler="lattice", example_input=x)
    report = conversion_report(model)
    assert report.steps == 1 and {r.step for r in report.layers} == {1}
    seq = _sequences_of(model, steps=1)[0]
    b1 = _strided("conv", [x], seq, **_conv_kw(net.b1))
    b2 = _strided("conv", [net.b2a(x)], seq, **_conv_kw(net.b2b))
    pool = _strided("max", [x], seq, kernel=3, stride=2, padding=0, dilation=1, ceil_mode=False)
    maps = [net.features(torch.cat(parts, 1)) for parts in zip(b1, b2, pool)]
    expected = net.head(torch.flatten(torch.stack(maps).mean(0), 1))  # VGG-style: average, then flatten
    averaged_after = torch.stack([net.head(torch.flatten(m, 1)) for m in maps]).mean(0)
    assert (expected - averaged_after).abs().max() > 1e-3  # the head's ReLU tells the two apart here
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
    assert any("features" in where for where in report.averaged_at)


def test_flops_equal_the_analytic_count_of_the_samples():
    net = _small_net()
    batch, size = 2, 32
    x = torch.randn(batch, 3, size, size)
    model = convert(net, mode="checkered", example_input=x)
    # Submaps after steps 1..5: 2, 4, 8, 16, 32. Output sizes 16, 8, 4 (+ block), 2, 1.
    def conv(cout, cin, k, out, submaps, groups=1):
        return 2 * cout * (cin // groups) * k * k * out * out * batch * submaps
    expected = (conv(8, 3, 3, 16, 2) + conv(16, 8, 3, 4, 8) + conv(16, 16, 3, 4, 8, groups=2)
                + conv(16, 8, 1, 4, 8) + 2 * 16 * 16 * batch + conv(16, 16, 3, 1, 32) + 2 * 16 * 10 * batch)
    assert count_flops(model, x) == expected
    original = (conv(8, 3, 3, 16, 1) + conv(16, 8, 3, 4, 1) + conv(16, 16, 3, 4, 1, groups=2)
                + conv(16, 8, 1, 4, 1) + 2 * 16 * 16 * batch + conv(16, 16, 3, 1, 1) + 2 * 16 * 10 * batch)
    assert count_flops(net, x) == original


class TrainBranch(nn.Module):
    """Behaves differently in train and eval mode, like GoogLeNet's auxiliary outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        if self.training:
            return self.fc(y), y
        return self.fc(y)


def test_train_and_eval_graphs_are_both_kept():
    model = convert(TrainBranch().eval(), example_input=torch.randn(1, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    assert isinstance(model.eval()(x), torch.Tensor)
    out = model.train()(x)
    assert isinstance(out, tuple) and out[1].shape == (2, 4)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.conv = nn.Conv2d(3, 3, 3, stride=2)

    def forward(self, x):
        return self.conv(self.gate(x)).mean((2, 3))


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: fx cannot trace this
            return x
        return -x


def test_untraceable_model_names_the_module_and_leaf_modules_fix_it():
    with pytest.raises(ConversionError, match=r"cannot trace .*gate \(Gate\).*leaf"):
        convert(DataDependent())
    model = convert(DataDependent(), leaf_modules=[Gate], example_input=torch.randn(1, 3, 8, 8))
    assert conversion_report(model).converted_layers == 1
    model(torch.randn(2, 3, 9, 9))


def test_input_too_small_is_a_conversion_error():
    with pytest.raises(ConversionError, match="too small"):
        convert(torchvision.models.alexnet(), example_input=torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"mode": "sparse"}, ParameterError, "unknown mode"), ({"sampler": "sobol"}, ParameterError, "unknown sampler"),
    ({"density": 0}, ParameterError, "density"), ({"density": 5}, ConversionError, "density 5"),
    ({"keep_first": -1}, ParameterError, "keep_first"), ({"leaf_modules": [3]}, ParameterError, "leaf_modules"),
    ({"mode": "dilated", "density": 2}, ParameterError, "density .* does nothing with mode 'dilated'"),
    ({"mode": "traditional", "density": 2}, ParameterError, "density .* does nothing with mode 'traditional'"),
    ({"sampler": "lattice", "seed": 1}, ParameterError, "seed only seeds the random sampler"),
    ({"mode": "dilated", "sampler": "random", "seed": 1}, ParameterError, "seed only seeds the random sampler")])
def test_invalid_settings(kwargs, error, match):
    with pytest.raises(error, match=match) as caught:
        convert(SmallNet(), example_input=torch.randn(1, 3, 32, 32), **kwargs)
    if error is ParameterError:  # the parameter is named, so the CLI can show its own flag
        assert caught.value.parameter in kwargs


def test_keep_first_beyond_the_last_step_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="ccnn_convert"):
        model = convert(SmallNet(), keep_first=7, example_input=torch.randn(1, 3, 32, 32))
    report = conversion_report(model)
    expected = "keep_first=7 but the model has 5 subsampling steps: nothing is converted"
    assert report.warnings == [expected]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [expected]
    assert report.converted_layers == 0
    quiet = conversion_report(convert(SmallNet(), keep_first=5, example_input=torch.randn(1, 3, 32, 32)))
    assert quiet.warnings == [] and quiet.converted_layers == 0  # exactly every step kept: no surprise


def test_leaf_module_that_matches_nothing_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="ccnn_convert"):
        model = convert(DataDependent(), leaf_modules=[Gate, "Foo", "conv", nn.GRU],
                        example_input=torch.randn(1, 3, 8, 8))
    expected = ["leaf module 'Foo' matches nothing in the model", "leaf module 'GRU' matches nothing in the model"]
    assert conversion_report(model).warnings == expected
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == expected


class WithTransposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.vol = nn.Conv3d(1, 1, 1, stride=2)

    def forward(self, x):
        return self.up(self.down(x)).mean((2, 3))


def test_unsupported_strided_layers_are_left_unchanged_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="ccnn_convert"):
        model = convert(WithTransposed(), example_input=torch.randn(1, 3, 8, 8))
    report = conversion_report(model)
    assert any("ConvTranspose2d" in w for w in report.warnings)
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert logged == report.warnings  # each warning logged once, and kept in the report
    assert [r.name for r in report.layers if r.converted] == ["down"]
    assert isinstance(model.up, nn.ConvTranspose2d)
    model(torch.randn(1, 3, 8, 8))


def test_stride_four_patchify_stem_uses_four_rooks():
    model = convert(torchvision.models.convnext_tiny(), mode="checkered", example_input=torch.randn(1, 3, 64, 64))
    report = conversion_report(model)
    stem = report.layers[0]
    assert stem.stride == (4, 4) and stem.submaps_out == 4
    table = model.ccnn_sampler_step1()
    offsets = table[:, 0, 1:].tolist()
    assert sorted(r for r, _ in offsets) == [0, 1, 2, 3] and sorted(c for _, c in offsets) == [0, 1, 2, 3]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)
