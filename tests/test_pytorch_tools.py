"""PyTorch's tools on the default path and with a variant: torch.compile(fullgraph=True),
torch.export and torch.func give eager's numbers (issue 9). On the CPU the default GRU and RNN
run the native loop as the ``rnnkit::native_layer`` operator, which compile keeps in its graph."""

import copy

import pytest
import torch
from helpers import assert_float32_as_accurate
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
    torch.manual_seed(0)
    layer = LAYERS[name]()
    params = dict(layer.named_parameters())
    x = _inputs().detach()

    def loss(p, x):
        return torch.func.functional_call(layer, p, (x,))[0].pow(2).sum()

    grads = torch.func.grad(loss)(params, x)
    expected = torch.autograd.grad(layer(x)[0].pow(2).sum(), list(params.values()))
    # torch.func runs the reference steps, autograd the default engine (the native loop, or
    # torch's kernels): two float32 orders of the same sums, each held to the reference's own
    # float32 error against float64 (tests/helpers.py).
    exact = copy.deepcopy(layer).double()
    exact_grads = torch.autograd.grad(exact(x.double())[0].pow(2).sum(), list(exact.parameters()))
    assert_float32_as_accurate(expected, list(grads.values()), exact_grads, list(grads))


def test_packed_input_under_compile():
    torch._dynamo.reset()
    layer = rnnkit.GRU(3, 5)
    x = torch.randn(2, 6, 3)
    packed = pack_padded_sequence(x, torch.tensor([6, 4]), batch_first=True)
    out = torch.compile(layer)(packed)[0]
    torch.testing.assert_close(out.data, layer(packed)[0].data)


@pytest.mark.parametrize("name", ["lstm", "lstm-layer-norm"])
def test_compile_with_dynamic_lengths_traces_once(name):
    """Padded input of another length reuses the compiled graph (the native operator takes no
    per-step list of sizes that would tie the graph to one length; three lengths once compiled
    one graph each), and each length gives eager's output and gradients."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    layer = LAYERS[name]()
    compiled = torch.compile(layer, backend="aot_eager", dynamic=True, fullgraph=True)
    for T in (4, 7, 11):
        x = torch.randn(T, 2, 3, requires_grad=True)
        got, want = [], []
        for fn, into in ((compiled, got), (layer, want)):
            layer.zero_grad()
            x.grad = None
            out, _ = fn(x)
            out.square().sum().backward()
            into += [out.detach(), x.grad.clone(), layer.weight_hh_l0.grad.clone()]
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def _native_variant_layer(mode: str, zoneout_masks: bool):
    """A layer with layer norm, recurrent dropout and zoneout (training's masks over the 12
    rows, or eval's p) as the native operator runs it, with its leaves."""
    from rnnkit.engines.spec import StepVariants

    g = torch.Generator().manual_seed(1)
    H, GW = 5, {"LSTM": 4, "GRU": 3}[mode] * 5

    def rand(*shape):
        return (torch.rand(*shape, generator=g) * 2 - 1).requires_grad_()

    weights = [rand(GW, 3), rand(GW, H), rand(GW), rand(GW)]
    ln = [rand(GW), rand(GW), rand(GW), rand(GW)] + ([rand(H), rand(H)] if mode == "LSTM" else [])
    mask = torch.bernoulli(torch.full((2, H), 0.8), generator=g) / 0.8
    zh, zc = (torch.bernoulli(torch.full((12, H), 0.25), generator=g) for _ in range(2))
    zones = (zh, zc if mode == "LSTM" else None) if zoneout_masks else (None, None)
    return weights, ln, lambda ln_: StepVariants(tuple(ln_), mask, 0.25, *zones)


@pytest.mark.parametrize("zoneout", ["masks", "eval"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_compile_fullgraph_keeps_the_native_operator_with_variants(mode, zoneout):
    """The variant operator's schema and fake tensors trace: compile's forward and every
    gradient (layer-norm gains and biases too) equal eager's."""
    from rnnkit.engines.native import op as ops

    torch._dynamo.reset()
    weights, ln, variants = _native_variant_layer(mode, zoneout == "masks")
    h0 = torch.zeros(2, 5)
    c0 = torch.zeros(2, 5) if mode == "LSTM" else None

    def f(x, weights, ln):
        rows = x.reshape(12, 3)
        return ops.run_layer(mode, True, (2,) * 6, rows, h0, c0, *weights, None, variants(ln))[0]

    x = _inputs()
    leaves = [x, *weights, *ln]
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x, weights, ln)
    expected = f(x, weights, ln)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.pow(2).sum(), leaves)
    expected_grads = torch.autograd.grad(expected.pow(2).sum(), leaves)
    for a, b in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_keeps_the_native_operator_with_a_projection():
    """A projected LSTM (P=3 < H=5) with every variant through the operator under compile."""
    from rnnkit.engines.native import op as ops
    from rnnkit.engines.spec import StepVariants

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)

    def rand(*shape):
        return (torch.rand(*shape, generator=g) * 2 - 1).requires_grad_()

    w_ih, w_hh, b_ih, b_hh, w_hr = rand(20, 3), rand(20, 3), rand(20), rand(20), rand(3, 5)
    ln = [rand(20), rand(20), rand(20), rand(20), rand(5), rand(5)]
    mask = torch.bernoulli(torch.full((2, 3), 0.8), generator=g) / 0.8
    zh, zc = torch.bernoulli(torch.full((12, 3), 0.25)), torch.bernoulli(torch.full((12, 5), 0.25))
    h0, c0 = torch.zeros(2, 3), torch.zeros(2, 5)

    def f(x, w_hr, ln):
        v = StepVariants(tuple(ln), mask, 0.25, zh, zc)
        rows = x.reshape(12, 3)
        return ops.run_layer("LSTM", False, (2,) * 6, rows, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                             v)[0]  # fmt: skip

    x = _inputs()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out, expected = compiled(x, w_hr, ln), f(x, w_hr, ln)
    torch.testing.assert_close(out, expected)
    leaves = [x, w_hh, w_hr, *ln]
    grads = torch.autograd.grad(out.pow(2).sum(), leaves)
    for a, b in zip(grads, torch.autograd.grad(expected.pow(2).sum(), leaves), strict=True):
        torch.testing.assert_close(a, b)
