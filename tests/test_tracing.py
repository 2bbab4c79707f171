"""Leaf modules: code fx cannot trace converts once it is a leaf, named by the caller or
registered once by a library (``register_notrace_module`` / ``register_notrace_function``).

The converted model is checked against the slow reference: the gate runs as it is, then the
strided conv runs submap by submap (tests/reference.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ccnn_convert import conversion_report, convert
from ccnn_convert.core import register_notrace_function, register_notrace_module
from ccnn_convert.errors import ConversionError, ParameterError
from test_convert import _conv_kw, _sequences_of, _strided


def _gated_net(gate_class: type[nn.Module]) -> nn.Module:
    class GatedNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = gate_class()
            self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

        def forward(self, x):
            return self.conv(self.gate(x)).mean((2, 3))

    torch.manual_seed(0)
    return GatedNet().eval()


def _branching_gate_class() -> type[nn.Module]:
    class Gate(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # control flow on a tensor value: fx cannot trace this
                return x
            return -x

    return Gate


def _assert_matches_reference(net: nn.Module, model: nn.Module) -> None:
    for x in (torch.rand(2, 3, 10, 10), -torch.rand(2, 3, 10, 10)):  # both branches of the gate
        seq = _sequences_of(model, steps=1)[0]
        maps = _strided("conv", [net.gate(x)], seq, **_conv_kw(net.conv))
        expected = torch.stack([m.mean((2, 3)) for m in maps]).mean(0)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_untraceable_module_names_the_leaf_parameter():
    net = _gated_net(_branching_gate_class())
    with pytest.raises(ConversionError, match=r"cannot trace .* in gate \(Gate\)") as caught:
        convert(net, example_input=torch.zeros(1, 3, 10, 10))
    assert isinstance(caught.value, ParameterError) and caught.value.parameter == "leaf_modules"
    assert "(--leaf Gate)" in caught.value.render("--leaf")  # the CLI shows its own flag


@pytest.mark.parametrize("leaf", ["Gate", "gate", "class"])
def test_leaf_modules_by_class_name_qualified_name_or_class(leaf):
    gate = _branching_gate_class()
    net = _gated_net(gate)
    model = convert(net, leaf_modules=[gate if leaf == "class" else leaf], example_input=torch.zeros(1, 3, 10, 10))
    assert conversion_report(model).converted_layers == 1 and conversion_report(model).warnings == []
    _assert_matches_reference(net, model)


def test_registered_module_class_is_a_leaf_everywhere():
    gate = _branching_gate_class()
    net = _gated_net(gate)
    with pytest.raises(ConversionError, match="cannot trace"):
        convert(net, example_input=torch.zeros(1, 3, 10, 10))
    assert register_notrace_module(gate) is gate  # usable as a class decorator
    model = convert(net, mode="checkered", example_input=torch.zeros(1, 3, 10, 10))
    assert conversion_report(model).converted_layers == 1
    _assert_matches_reference(net, model)


def gate_fn(x):
    """Branches on its input: fx cannot trace it, only wrap it as one call."""
    return x if x.sum() > 0 else -x


class FunctionGated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(gate_fn(x)).mean((2, 3))  # a global name: what fx's autowrap needs


def test_registered_function_is_one_call_in_the_graph():
    torch.manual_seed(0)
    net = FunctionGated().eval()
    with pytest.raises(ConversionError, match="cannot trace"):
        convert(net, example_input=torch.zeros(1, 3, 10, 10))
    assert register_notrace_function(gate_fn) is gate_fn
    model = convert(net, example_input=torch.zeros(1, 3, 10, 10))
    assert any(node.target is gate_fn for node in model.graph.nodes)
    net.gate = gate_fn  # the reference calls the gate the same way
    _assert_matches_reference(net, model)


@pytest.mark.parametrize("register,bad", [(register_notrace_module, nn.Conv2d(1, 1, 1)),
                                          (register_notrace_module, int),
                                          (register_notrace_function, nn.Conv2d)])
def test_registering_something_else_is_a_parameter_error(register, bad):
    with pytest.raises(ParameterError):
        register(bad)
