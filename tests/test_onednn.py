"""The native engine's input-side GEMM through oneDNN (engines/native/onednn.py): its result and
every gradient against float64 (within the float32 bound of ``helpers``, addmm as the base),
double backward through it, and the cases that must stay on addmm (float64, graphs, GEMMs too
small for oneDNN's fixed cost). The tests' shapes are small: oneDNN is forced for them
(``always_onednn``) except where the size rule itself is tested."""

import pytest
import torch
from helpers import assert_float32_as_accurate

import rnnkit
from rnnkit.engines.native import onednn

pytestmark = pytest.mark.skipif(
    not onednn.usable(torch.empty(1)), reason="torch's oneDNN linear is not available here"
)


@pytest.fixture(autouse=True)
def always_onednn(monkeypatch):
    monkeypatch.setattr(onednn, "MIN_WEIGHTS", 0)
    monkeypatch.setattr(onednn, "MIN_MACS", 0)


def _grads(fn, x, w, b, cot):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(*leaves, *([None] if b is None else []))
    y.backward(cot.to(y.dtype))
    return [y.detach(), *(t.grad for t in leaves)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("rows", [1, 37, 300])
def test_input_side_and_its_gradients_as_accurate_as_addmm(bias, rows):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 19, generator=g), torch.randn(52, 19, generator=g)
    b = torch.randn(52, generator=g) if bias else None
    cot = torch.randn(rows, 52, generator=g)

    def addmm(x, w, b):
        return x @ w.t() if b is None else torch.addmm(b, x, w.t())

    ours = _grads(onednn.input_side, x, w, b, cot)
    base = _grads(addmm, x, w, b, cot)
    exact = _grads(addmm, x.double(), w.double(), None if b is None else b.double(), cot)
    assert_float32_as_accurate(ours, base, exact, ["y", "dx", "dw", "db"][: len(ours)])


def test_input_side_reads_strided_inputs():
    """A transposed x and w (views) give the contiguous inputs' result."""
    g = torch.Generator().manual_seed(1)
    xt, wt = torch.randn(19, 40, generator=g), torch.randn(19, 52, generator=g)
    contiguous = onednn.input_side(xt.t().contiguous(), wt.t().contiguous())
    assert torch.equal(onednn.input_side(xt.t(), wt.t()), contiguous)


def test_layer_double_backward_through_the_onednn_input_side():
    """create_graph=True through an eager float32 layer: the backward of the oneDNN input side
    runs differentiable ops, so the gradient penalty's gradient equals the reference engine's
    (which never uses oneDNN) within float32's bound."""
    torch.manual_seed(0)
    layers = {e: rnnkit.LSTM(6, 8, backend=e) for e in ("fused", "reference")}
    layers["reference"].load_state_dict(layers["fused"].state_dict())
    x = torch.randn(5, 3, 6)
    results = {}
    for engine, layer in layers.items():
        xi = x.clone().requires_grad_()
        out, _ = layer(xi)
        (gx,) = torch.autograd.grad(out.square().sum(), xi, create_graph=True)
        gx.square().sum().backward()
        results[engine] = [gx.detach(), layer.weight_ih_l0.grad.clone()]
    exact_layer = rnnkit.LSTM(6, 8, backend="reference").double()
    exact_layer.load_state_dict(layers["fused"].state_dict())
    xi = x.double().requires_grad_()
    out, _ = exact_layer(xi)
    (gx,) = torch.autograd.grad(out.square().sum(), xi, create_graph=True)
    gx.square().sum().backward()
    exact = [gx.detach(), exact_layer.weight_ih_l0.grad]
    assert_float32_as_accurate(results["fused"], results["reference"], exact, ["gx", "d2 w_ih"])


def test_input_side_stays_on_addmm_for_float64_and_graphs():
    x64, w64 = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    assert not onednn.usable(x64, w64)
    assert torch.equal(onednn.input_side(x64, w64), x64 @ w64.t())

    class Side(torch.nn.Module):
        def forward(self, x, w):
            return onednn.input_side(x, w)

    program = torch.export.export(Side(), (torch.randn(4, 3), torch.randn(5, 3)))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in t for t in targets), targets


@pytest.mark.parametrize("rows", [1, 3])
def test_small_products_stay_on_addmm(monkeypatch, rows):
    """Below both sizes, input_side and its input gradient never call oneDNN (its fixed cost is
    more than such a product); from either size on, both do."""
    monkeypatch.setattr(onednn, "MIN_WEIGHTS", 1 << 18)
    monkeypatch.setattr(onednn, "MIN_MACS", 1 << 23)
    calls = []
    real = onednn._linear

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(onednn, "_linear", counted)
    g = torch.Generator().manual_seed(rows)
    for (G, K), oned in [((256, 64), False), ((1024, 256), True), ((2048, 128), True)]:
        x = torch.randn(rows, K, generator=g, requires_grad=True)
        w = torch.randn(G, K, generator=g, requires_grad=True)
        calls.clear()
        y = onednn.input_side(x, w, None)
        y.sum().backward()
        assert torch.allclose(y, x @ w.t(), rtol=1e-5, atol=1e-4)
        assert len(calls) == (2 if oned else 0), (G, K, calls)
    assert onednn.worth(128, 512, 128) and not onednn.worth(127, 512, 128)
    assert not onednn.worth(0, 1024, 256)
