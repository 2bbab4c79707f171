"""Exact edges: samples outside the image are padding for every later layer.

Oracles: torchvision's dilated ResNet-50 (``replace_stride_with_dilation``) for dilated mode at
sizes that do not divide evenly, and the slow per-position reference with the exact rule
(tests/reference.py) for checkered mode with ceil_mode pools and count_include_pad=False pools.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import reference
from ccnn_convert.core import check_options, conversion_report, convert, edges, layers, sequences
from ccnn_convert.errors import ParameterError


class ExactNet(nn.Module):
    """Five stride-2 steps with every kind of edge: padded conv, ceil_mode max pool without padding,
    a stride-1 count_include_pad=False pool, a ceil_mode count_include_pad=False strided pool,
    a 'valid' conv, a functional ceil_mode max pool, global mean and max."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.smooth = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.avg = nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)
        self.down = nn.Conv2d(6, 8, 3, stride=2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.pool(x)
        x = self.smooth(torch.tanh(self.conv(x)))
        x = F.relu(self.down(self.avg(x)))
        y = F.max_pool2d(x, 2, 2, ceil_mode=True)
        return self.fc(torch.cat([y.mean((2, 3)), y.amax((2, 3))], 1))


def _conv_kw(conv: nn.Conv2d):
    return dict(kernel=conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                groups=conv.groups, weight=conv.weight, bias=conv.bias)


def exact_net_reference(net: ExactNet, x, seqs):
    """ExactNet submap by submap under the exact rule. ``seqs[t]``: step t's sequence or None."""
    maps, reals = [x], [tuple(x.shape[2:])]
    maps, reals = reference.multisample_exact("conv", maps, reals, seqs[0], **_conv_kw(net.stem))
    maps = [F.relu(m) for m in maps]
    maps, reals = reference.multisample_exact("max", maps, reals, seqs[1], kernel=3, stride=2, padding=0,
                                              dilation=1, ceil_mode=True)
    maps, reals = reference.multisample_exact("conv", maps, reals, None, **_conv_kw(net.conv))
    maps = [torch.tanh(m) for m in maps]
    avg = dict(kernel=3, padding=1, ceil_mode=False, count_include_pad=False)
    maps, reals = reference.multisample_exact("avg", maps, reals, None, stride=1, **avg)
    maps, reals = reference.multisample_exact("avg", maps, reals, seqs[2], stride=2, **{**avg, "ceil_mode": True})
    maps, reals = reference.multisample_exact("conv", maps, reals, seqs[3], **_conv_kw(net.down))
    maps = [F.relu(m) for m in maps]
    maps, reals = reference.multisample_exact("max", maps, reals, seqs[4], kernel=2, stride=2, padding=0,
                                              dilation=1, ceil_mode=True)
    features = torch.cat([reference.global_mean_exact(maps, reals), reference.global_max_exact(maps, reals)], 1)
    return net.fc(features)


def exact_net_old_reference(net: ExactNet, x, seqs):
    """ExactNet under the reference rule (far-edge samples computed like the others)."""
    def strided(op, maps, seq, **kw):
        return reference.multisample(op, torch.cat(maps), seq, **kw).split(x.shape[0]) if seq else \
            [reference.sample(op, m, 0, 0, **kw) for m in maps]
    maps = [F.relu(m) for m in strided("conv", [x], seqs[0], **_conv_kw(net.stem))]
    maps = strided("max", maps, seqs[1], kernel=3, stride=2, padding=0, dilation=1, ceil_mode=True)
    maps = [net.smooth(torch.tanh(net.conv(m))) for m in maps]
    maps = strided("avg", maps, seqs[2], kernel=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
    maps = [F.relu(m) for m in strided("conv", maps, seqs[3], **_conv_kw(net.down))]
    maps = strided("max", maps, seqs[4], kernel=2, stride=2, padding=0, dilation=1, ceil_mode=True)
    stacked = torch.stack(maps)
    features = torch.cat([stacked.mean((3, 4)).mean(0), stacked.amax((3, 4)).amax(0)], 1)
    return net.fc(features)


def _sequences_of(model, steps=5):
    seqs = []
    for t in range(1, steps + 1):
        sampler = getattr(model, f"ccnn_sampler_step{t}", None)
        if sampler is None:
            seqs.append(None)
            continue
        n, submaps, _ = sampler.table.shape
        seqs.append([[tuple(sampler.table[j, i, 1:].tolist()) for j in range(n)] for i in range(submaps)])
    return seqs


def _exact_net():
    torch.manual_seed(0)
    return ExactNet().eval()


@pytest.mark.parametrize("size", [(75, 91), (83, 70)])
@pytest.mark.parametrize("keep_first", [0, 2])
def test_checkered_exact_matches_the_exact_reference(size, keep_first):
    net = _exact_net()
    x = torch.randn(1, 3, *size)
    model = convert(net, mode="checkered", keep_first=keep_first, edges="exact", example_input=x)
    seqs = _sequences_of(model)
    assert [s is None for s in seqs] == [t < keep_first for t in range(5)]
    with torch.no_grad():
        expected = exact_net_reference(net, x, seqs)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)
        # The rule matters at these sizes: the reference rule gives other logits (here even NaN:
        # a ceil_mode max pool window that lies wholly in the -inf fill).
        old = convert(net, mode="checkered", keep_first=keep_first, edges="reference", example_input=x)
        assert not torch.allclose(old(x), expected, rtol=1e-3, atol=1e-3)
    assert conversion_report(model).edges == "exact"


def test_checkered_reference_edges_still_match_the_old_reference():
    net = _exact_net()
    x = torch.randn(1, 3, 66, 70)  # odd sizes on the way, no window wholly in the fill
    model = convert(net, mode="checkered", edges="reference", example_input=x)
    seqs = _sequences_of(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), exact_net_old_reference(net, x, seqs), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(model(x), exact_net_reference(net, x, seqs), rtol=1e-3, atol=1e-3)


def test_dilated_exact_matches_the_exact_reference_with_sixteen_samples_per_step():
    net = _exact_net()
    x = torch.randn(1, 3, 45, 51)
    model = convert(net, mode="dilated", dilation="multisample", keep_first=3, example_input=x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), exact_net_reference(net, x, _sequences_of(model)),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seed", range(12))
def test_counts_and_masked_layers_match_the_exact_reference(seed):
    """One layer at a time, with partial real counts on the input submaps."""
    g = torch.Generator().manual_seed(seed)
    op = ["conv", "max", "avg"][seed % 3]
    stride, kernel = 2, int(torch.randint(1, 4, (), generator=g))
    padding, ceil = int(torch.randint(0, kernel // 2 + 1, (), generator=g)), bool(seed % 2) and op != "conv"
    h, w, submaps = 9, 8, 2
    x = torch.randn(submaps, 2, h, w, dtype=torch.float64, generator=g)
    reals = [(9, 8), (int(torch.randint(3, 9, (), generator=g)), int(torch.randint(3, 8, (), generator=g)))]
    sequence = sequences.sampler_sequence("lattice", submaps, stride, 2)
    table = sequences.offset_table(sequence)
    counts = edges.EdgeCounts(tuple(r for r, _ in reals), tuple(c for _, c in reals), h, w)
    kw = dict(kernel=kernel, stride=stride, padding=padding, dilation=1, ceil_mode=ceil, count_include_pad=False)
    fill = float("-inf") if op == "max" else 0.0
    masked = edges.mask_edges(x, counts, fill)
    if op == "conv":
        kw.update(weight=torch.randn(3, 2, kernel, kernel, dtype=torch.float64, generator=g), bias=None, groups=1)
        actual = layers.multisample_conv2d(masked, table, kw["weight"], None, stride, padding, 1, 1)
    elif op == "max":
        actual = layers.multisample_max_pool2d(masked, table, kernel, stride, padding, 1, ceil)
    else:
        actual = layers.multisample_avg_pool2d(masked, table, kernel, stride, padding, ceil, False, None, counts)
    maps, out_reals = reference.multisample_exact(op, list(x.split(1)), reals, sequence, **kw)
    after = edges.edges_after(counts, edges.geometry(kernel, stride, padding, 1, ceil), table[..., 1:].tolist())
    assert list(zip(after.rows, after.cols)) == out_reals
    for s, (m, (r, c)) in enumerate(zip(maps, out_reals)):
        torch.testing.assert_close(actual[s:s + 1, :, :r, :c], m[:, :, :r, :c], rtol=1e-10, atol=1e-10)


def test_random_sampler_in_training_follows_each_draw():
    """The random sampler redraws on every training forward; the counts follow the new table."""
    net = _exact_net().train()
    x = torch.randn(1, 3, 75, 91)
    model = convert(net, mode="checkered", sampler="random", seed=1, edges="exact", example_input=x)
    model.train()
    samplers = [getattr(model, f"ccnn_sampler_step{t}") for t in range(1, 6)]
    for draw in range(3):
        torch.manual_seed(draw)
        with torch.no_grad():
            out = model(x)
        torch.manual_seed(draw)  # the same draws, in the same order (steps 1 to 5)
        tables = [sampler() for sampler in samplers]
        seqs = [[[tuple(t[j, i, 1:].tolist()) for j in range(t.shape[0])] for i in range(t.shape[1])]
                for t in tables]
        torch.testing.assert_close(out, exact_net_reference(net, x, seqs), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- torchvision's dilated ResNet


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return reference.randomize_batchnorm(torchvision.models.resnet50()).eval()


# keep_first counts steps: stem conv 1, max pool 2, layer2/3/4 3-5 (torchvision's three flags).
_FLAGS = {2: [True, True, True], 3: [False, True, True], 4: [False, False, True]}


def relative_error(resnet, size, keep_first):
    dilated = torchvision.models.resnet50(replace_stride_with_dilation=_FLAGS[keep_first]).eval()
    dilated.load_state_dict(resnet.state_dict())
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    converted = convert(resnet, mode="dilated", dilation="multisample", keep_first=keep_first, example_input=x)
    with torch.no_grad():
        actual, expected = converted(x), dilated(x)
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("size, keep_first", [
    ((193, 193), 2), ((225, 225), 3), ((299, 299), 4), ((240, 320), 3), ((193, 193), 4), ((225, 225), 2),
])
def test_dilated_equals_torchvision_dilated_resnet50_at_uneven_sizes(resnet50, size, keep_first):
    assert relative_error(resnet50, size, keep_first) <= 1e-5


# --------------------------------------------------------------------------- cost nothing at 224


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] = self.ops.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def _ops_and_masks(model, x, monkeypatch):
    built = []
    real_mask = edges._real_mask
    monkeypatch.setattr(edges, "_real_mask", lambda *a, **k: built.append(1) or real_mask(*a, **k))
    with torch.no_grad(), _OpCounter() as counter:
        model(x)
    return counter.ops, len(built)


def test_exact_edges_add_no_tensor_op_where_sizes_divide(resnet50, monkeypatch):
    x = torch.randn(1, 3, 224, 224)
    exact = convert(resnet50, mode="checkered", edges="exact", example_input=x)
    plain = convert(resnet50, mode="checkered", edges="reference", example_input=x)
    exact_ops, masks = _ops_and_masks(exact, x, monkeypatch)
    plain_ops, _ = _ops_and_masks(plain, x, monkeypatch)
    assert masks == 0 and exact_ops == plain_ops
    # The counter sees masks where a size does not divide.
    small = torch.randn(1, 3, 97, 97)
    _, masks = _ops_and_masks(exact, small, monkeypatch)
    assert masks > 0
    with torch.no_grad():
        assert not torch.equal(exact(small), plain(small))


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("kwargs, parameter", [
    ({"mode": "dilated", "edges": "reference"}, "edges"),
    ({"mode": "traditional", "edges": "exact"}, "edges"),
    ({"mode": "checkered", "edges": "fuzzy"}, "edges"),
    ({"mode": "checkered", "dilation": "native"}, "dilation"),
    ({"mode": "checkered", "dilation": "multisample"}, "dilation"),  # checkered is not a dilation
    ({"mode": "dilated", "dilation": "atrous"}, "dilation"),
])
def test_edge_and_dilation_options_are_checked(kwargs, parameter):
    with pytest.raises(ParameterError) as caught:
        check_options(**kwargs)
    assert caught.value.parameter == parameter
    with pytest.raises(ParameterError):
        convert(_exact_net(), **kwargs)


def test_defaults_are_reference_for_checkered_and_exact_for_dilated():
    net, x = _exact_net(), torch.randn(1, 3, 37, 45)
    assert conversion_report(convert(net, mode="checkered", example_input=x)).edges == "reference"
    assert conversion_report(convert(net, mode="dilated", keep_first=3, example_input=x)).edges == "exact"


class FlattenNet(nn.Module):
    """A strided conv whose 13x13 map is flattened into a linear layer (no global pool): the
    submap average before the classifier must count, at each position, only the submaps whose
    sample there lies inside the image."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4 * 13 * 13, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.tanh(self.conv(x)), 1))


def test_flattened_dilated_map_averages_only_the_real_samples_of_each_position():
    torch.manual_seed(0)
    net = FlattenNet().eval()
    x = torch.randn(2, 3, 25, 25)  # 25 -> 13: the samples at odd offsets have 12 real rows/columns
    model = convert(net, mode="dilated", dilation="multisample", example_input=x)
    seqs = _sequences_of(model, steps=1)
    maps, reals = reference.multisample_exact("conv", [x], [(25, 25)], seqs[0], **_conv_kw(net.conv))
    assert sorted(set(reals)) == [(12, 12), (12, 13), (13, 12), (13, 13)]
    total = torch.zeros(2, 4, 13, 13)
    count = torch.zeros(13, 13)
    for m, (r, c) in zip(maps, reals):
        total[:, :, :r, :c] += torch.tanh(m[:, :, :r, :c])
        count[:r, :c] += 1
    expected = net.fc(torch.flatten(total / count, 1))
    plain_mean = net.fc(torch.flatten(torch.stack([torch.tanh(m) for m in maps]).mean(0), 1))
    assert (expected - plain_mean).abs().max() > 1e-3  # the far-edge samples matter here
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
