"""Training a converted model: its gradients and its BatchNorm statistics, against independent
computations (the slow per-position reference of tests/reference.py, and a hand computation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reference
from ccnn_convert import convert
from ccnn_convert.core import layers, sequences
from ccnn_convert.train import checkpoint_blocks

torch.set_default_dtype(torch.float32)


def _layer_case(op: str, generator: torch.Generator) -> dict:
    kw = dict(kernel=3, stride=2, padding=1, dilation=1)
    if op == "conv":
        kw.update(weight=torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=generator).requires_grad_(),
                  bias=torch.randn(4, dtype=torch.float64, generator=generator).requires_grad_(), groups=1)
    elif op == "max":
        kw.update(ceil_mode=False)
    else:
        kw.update(ceil_mode=False, count_include_pad=False)
    return kw


def _ours(op, x, table, kw):
    if op == "conv":
        return layers.multisample_conv2d(x, table, kw["weight"], kw["bias"], 2, 1, 1, 1)
    if op == "max":
        return layers.multisample_max_pool2d(x, table, 3, 2, 1, 1, False)
    return layers.multisample_avg_pool2d(x, table, 3, 2, 1, False, False)


@pytest.mark.parametrize("op", ["conv", "max", "avg"])
@pytest.mark.parametrize("kind", ["checkered", "dilated"])
def test_layer_gradients_match_the_slow_reference(op, kind):
    generator = torch.Generator().manual_seed(3)
    submaps = 2
    if kind == "checkered":
        sequence = sequences.sampler_sequence("random", submaps, 2, 2, generator)
    else:  # every sample of every window
        sequence = sequences.sampler_sequence("naive", submaps, 2, 4)
    kw = _layer_case(op, generator)
    x = torch.randn(2 * submaps, 3, 7, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    out_grad = None
    grads = []
    for run in (lambda: _ours(op, x, sequences.offset_table(sequence), kw),
                lambda: reference.multisample(op, x, sequence, **kw)):
        out = run()
        if out_grad is None:
            out_grad = torch.randn(out.shape, dtype=torch.float64, generator=generator)
        leaves = [x] + ([kw["weight"], kw["bias"]] if op == "conv" else [])
        grads.append(torch.autograd.grad((out * out_grad).sum(), leaves))
    for ours, expected in zip(*grads):
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


class _Net(nn.Module):
    """Four subsampling steps: a strided conv, a max pool, a residual block whose strided conv
    and strided shortcut form one step, and an average pool."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.pool = nn.MaxPool2d(3, 2, padding=1)
        self.conv_a = nn.Conv2d(6, 6, 3, stride=2, padding=1)
        self.conv_b = nn.Conv2d(6, 6, 3, padding=1)
        self.shortcut = nn.Conv2d(6, 6, 1, stride=2)
        self.avg = nn.AvgPool2d(2, 2)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = F.relu(self.conv_b(F.relu(self.conv_a(x))) + self.shortcut(x))
        x = self.avg(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _sequence_of(table: torch.Tensor) -> list:
    """The sampler of each submap, from a converted step's table (n, S, [submap, dy, dx])."""
    return [[(int(table[j, i, 1]), int(table[j, i, 2])) for j in range(table.shape[0])]
            for i in range(table.shape[1])]


def _reference_forward(net: _Net, x: torch.Tensor, seqs: list) -> torch.Tensor:
    """The network written out with the slow reference: submaps stacked along the batch."""
    def conv(layer, h, seq):
        return reference.multisample("conv", h, seq, kernel=layer.kernel_size, stride=layer.stride,
                                     padding=layer.padding, dilation=1, groups=1, weight=layer.weight,
                                     bias=layer.bias)

    h = F.relu(conv(net.conv1, x, seqs[0]))
    h = reference.multisample("max", h, seqs[1], kernel=3, stride=2, padding=1, dilation=1, ceil_mode=False)
    block = F.conv2d(F.relu(conv(net.conv_a, h, seqs[2])), net.conv_b.weight, net.conv_b.bias, padding=1)
    h = F.relu(block + conv(net.shortcut, h, seqs[2]))
    h = reference.multisample("avg", h, seqs[3], kernel=2, stride=2, padding=0, ceil_mode=False,
                              count_include_pad=True)
    images = x.shape[0]
    pooled = h.reshape(-1, images, *h.shape[1:]).mean(dim=(0, 3, 4))  # over submaps and positions
    return net.fc(pooled)


def _reference_forward_exact(net: _Net, x: torch.Tensor) -> torch.Tensor:
    """Dilated mode from windows: every sample of every window, one tensor per submap, with exact
    edges (a sample whose window leaves the padded input is padding for every later layer, as
    in a network whose strides were removed and later layers dilated)."""
    every = [[(0, 0), (0, 1), (1, 0), (1, 1)]]

    def conv(layer, maps, reals, strided=True):
        return reference.multisample_exact("conv", maps, reals, every * len(maps) if strided else None,
                                           kernel=layer.kernel_size, stride=layer.stride, padding=layer.padding,
                                           dilation=1, groups=1, weight=layer.weight, bias=layer.bias)

    def relu(maps):
        return [F.relu(m) for m in maps]

    maps, reals = conv(net.conv1, [x], [tuple(x.shape[2:])])
    maps, reals = reference.multisample_exact("max", relu(maps), reals, every * len(maps), kernel=3, stride=2,
                                              padding=1, dilation=1, ceil_mode=False)
    a_maps, a_reals = conv(net.conv_a, maps, reals)
    b_maps, b_reals = conv(net.conv_b, relu(a_maps), a_reals, strided=False)
    s_maps, s_reals = conv(net.shortcut, maps, reals)
    assert b_reals == s_reals
    maps = relu([b + s for b, s in zip(b_maps, s_maps)])
    maps, reals = reference.multisample_exact("avg", maps, s_reals, every * len(maps), kernel=2, stride=2,
                                              padding=0, ceil_mode=False, count_include_pad=True)
    return net.fc(reference.global_mean_exact(maps, reals))


@pytest.mark.parametrize("mode,dilation", [("checkered", None), ("dilated", "multisample"), ("dilated", "native")])
def test_model_gradients_match_the_slow_reference(mode, dilation):
    torch.manual_seed(0)
    net = _Net().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    options = {"sampler": "lattice"} if mode == "checkered" else {"dilation": dilation}
    converted = convert(net, mode=mode, example_input=x, **options).train()
    if mode == "checkered":
        tables = [getattr(converted, f"ccnn_sampler_step{i}").table for i in range(1, 5)]
        seqs = [_sequence_of(t) for t in tables]
        assert [len(s) for s in seqs] == [1, 2, 4, 8]  # submaps double at each step
    weights = torch.randn(2, 5, dtype=torch.float64)
    params = list(net.parameters())
    ours = torch.autograd.grad((converted(x) * weights).sum(), params)
    slow = _reference_forward(net, x, seqs) if mode == "checkered" else _reference_forward_exact(net, x)
    expected = torch.autograd.grad((slow * weights).sum(), params)
    for name, a, b in zip([n for n, _ in net.named_parameters()], ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=f"gradient of {name}")


def test_batchnorm_in_training_takes_statistics_over_batch_submaps_and_positions():
    """A 1x1 stride-2 identity conv keeps, with the naive sampler, the pixels (0,0) and (1,1) of
    every 2x2 window as two submaps: BatchNorm's statistics must be those of exactly these
    pixels, over both images."""
    conv = nn.Conv2d(1, 1, 1, stride=2, bias=False)
    nn.init.ones_(conv.weight)
    norm = nn.BatchNorm2d(1, affine=False, momentum=1.0)  # running stats = this batch's
    net = nn.Sequential(conv, norm, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    x = torch.randn(2, 1, 6, 8, generator=torch.Generator().manual_seed(1)) * 3 + 1
    converted = convert(net, mode="checkered", sampler="naive", example_input=x).train()
    converted(x)

    rows, cols = torch.meshgrid(torch.arange(6), torch.arange(8), indexing="ij")
    kept = x[:, 0][:, (rows % 2 == cols % 2)]  # (0,0) and (1,1) of each window
    assert kept.numel() == 2 * 2 * 3 * 4  # images x submaps x positions
    mean = sum(v.item() for v in kept.flatten()) / kept.numel()
    unbiased = sum((v.item() - mean) ** 2 for v in kept.flatten()) / (kept.numel() - 1)
    assert norm.running_mean.item() == pytest.approx(mean, rel=1e-5)
    assert norm.running_var.item() == pytest.approx(unbiased, rel=1e-5)
    # A traditional layer would have taken the (0,0) pixels only: different statistics.
    assert norm.running_mean.item() != pytest.approx(x[:, 0, ::2, ::2].mean().item(), rel=1e-3)


def test_block_checkpointing_changes_neither_gradients_nor_batchnorm_statistics():
    """Recomputing blocks in backward must give the same gradients, the same random sampler
    draw, and must not update BatchNorm's running statistics a second time."""
    import torchvision

    def run(checkpointed: bool):
        torch.manual_seed(0)
        net = torchvision.models.resnet18(num_classes=4)
        converted = convert(net, mode="checkered", sampler="random", seed=1,
                            example_input=torch.zeros(1, 3, 32, 32)).train()
        model = checkpoint_blocks(converted) if checkpointed else converted
        torch.manual_seed(5)  # the random sampler redraws from here in training mode
        loss = model(torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))).square().sum()
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in net.named_parameters()}, net.state_dict()

    loss_a, grads_a, state_a = run(False)
    loss_b, grads_b, state_b = run(True)
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in state_a:  # running means, variances and batch counts included
        torch.testing.assert_close(state_a[name], state_b[name], rtol=0, atol=0, msg=name)


class _DropPathNet(nn.Module):
    """A residual branch with EfficientNet-Lite's drop connect: a random mask made from the
    input's batch size (traced, not a leaf), as many pretrained models train with."""

    def __init__(self, drop: float):
        super().__init__()
        self.drop = drop
        self.stem = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.branch = nn.Conv2d(6, 6, 3, padding=1)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        branch = self.branch(x)
        if self.training:
            keep = 1 - self.drop
            mask = torch.floor(keep + torch.rand([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device))
            branch = branch / keep * mask
        x = F.relu(self.down(x + branch))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


@pytest.mark.parametrize("mode", ["checkered", "dilated"])
def test_a_drop_path_made_from_the_batch_size_trains(mode):
    """The mask's batch is read from a submapped tensor (S*B rows): it must not be repeated S
    times again. With nothing dropped, training mode computes what eval mode does."""
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(0)
    net = _DropPathNet(drop=0.0)
    converted = convert(net, mode=mode, example_input=x, **({"dilation": "multisample"} if mode == "dilated" else {}))
    expected = converted.eval()(x)
    torch.testing.assert_close(converted.train()(x), expected)
    net.drop = 0.5
    dropped = convert(net, mode=mode, example_input=x).train()
    out = dropped(x)
    out.sum().backward()
    assert out.shape == (2, 3) and torch.isfinite(out).all() and net.branch.weight.grad is not None
