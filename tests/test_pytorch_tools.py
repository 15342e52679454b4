"""PyTorch's tools on the default path and with a variant: torch.compile(fullgraph=True),
torch.export and torch.func give eager's numbers (issue 9). On the CPU the default GRU and RNN
run the native loop as the ``rnnkit::native_layer`` operator, which compile keeps in its graph."""

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit

LAYERS = {
    "rnn": lambda: rnnkit.RNN(3, 5, num_layers=2),
    "lstm": lambda: rnnkit.LSTM(3, 5, bidirectional=True),
    "gru": lambda: rnnkit.GRU(3, 5, bidirectional=True),
    "gru-fused": lambda: rnnkit.GRU(3, 5, backend="fused"),
    "lstm-layer-norm": lambda: rnnkit.LSTM(3, 5, layer_norm=True),
    "gru-zoneout-eval": lambda: rnnkit.GRU(3, 5, zoneout=0.2).eval(),
}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 2, 3, generator=g, requires_grad=True)


@pytest.mark.parametrize("name", LAYERS)
def test_compile_fullgraph_equals_eager_with_gradients(name):
    torch._dynamo.reset()
    layer = LAYERS[name]()
    x = _inputs()
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)[0]
    (gx,) = torch.autograd.grad(out.pow(2).sum(), x)
    expected = layer(x)[0]
    (ex,) = torch.autograd.grad(expected.pow(2).sum(), x)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(gx, ex)


def test_compiled_default_gru_keeps_the_native_operator():
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes)
        return gm

    torch.compile(rnnkit.GRU(3, 5), backend="aot_eager", fullgraph=True)(_inputs())
    layer = rnnkit.GRU(3, 5)
    torch.compile(layer, backend=backend, fullgraph=True)(_inputs())
    assert any("rnnkit" in s for s in seen) or any("native_layer" in s for s in seen), seen


@pytest.mark.parametrize("name", LAYERS)
def test_export_equals_eager(name):
    layer = LAYERS[name]()
    x = _inputs().detach()
    program = torch.export.export(layer, (x,))
    fresh = torch.randn(6, 2, 3)
    torch.testing.assert_close(program.module()(fresh)[0], layer(fresh)[0])


@pytest.mark.parametrize("name", LAYERS)
def test_func_grad_and_functional_call_equal_autograd(name):
    layer = LAYERS[name]()
    params = dict(layer.named_parameters())
    x = _inputs().detach()

    def loss(p, x):
        return torch.func.functional_call(layer, p, (x,))[0].pow(2).sum()

    grads = torch.func.grad(loss)(params, x)
    expected = torch.autograd.grad(layer(x)[0].pow(2).sum(), list(params.values()))
    for (name_, g), e in zip(grads.items(), expected, strict=True):
        torch.testing.assert_close(g, e, msg=name_)


def test_packed_input_under_compile():
    torch._dynamo.reset()
    layer = rnnkit.GRU(3, 5)
    x = torch.randn(2, 6, 3)
    packed = pack_padded_sequence(x, torch.tensor([6, 4]), batch_first=True)
    out = torch.compile(layer)(packed)[0]
    torch.testing.assert_close(out.data, layer(packed)[0].data)
