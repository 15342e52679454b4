"""The variants beyond torch.nn: fused equals reference (outputs and every gradient, the same
seeded masks), eval-mode semantics, and nothing changes when a variant is off."""

import copy

import pytest
import torch
from helpers import assert_float32_as_accurate, packed_input, tolerance
from torch import nn

import rnnkit
from rnnkit import functional as F

LSTM_CASES = {
    "layer_norm": dict(layer_norm=True),
    "recurrent_dropout": dict(recurrent_dropout=0.4),
    "zoneout": dict(zoneout=0.3),
    "weight_drop": dict(weight_drop=0.5),
    "learn_init": dict(learn_init=True),
    "forget_bias": dict(forget_bias=1.0),
    "all_with_projection": dict(
        layer_norm=True, recurrent_dropout=0.2, zoneout=0.2, weight_drop=0.2, proj_size=3
    ),
}
GRU_CASES = {k: v for k, v in LSTM_CASES.items() if k not in ("forget_bias", "all_with_projection")}
GRU_CASES["all"] = dict(layer_norm=True, recurrent_dropout=0.2, zoneout=0.2, weight_drop=0.2)
CASES = [
    pytest.param(cls, kw, id=f"{cls.__name__.lower()}-{name}")
    for cls, cases in ((rnnkit.LSTM, LSTM_CASES), (rnnkit.GRU, GRU_CASES))
    for name, kw in cases.items()
]
T, B, I, H = 5, 3, 4, 6


def twin_layers(cls, backend, dtype=torch.float64, **kw):
    ref = cls(I, H, 2, bidirectional=True, dtype=dtype, backend="reference", **kw)
    fast = cls(I, H, 2, bidirectional=True, dtype=dtype, backend=backend, **kw)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def outputs_and_grads(layer, make_input, seed):
    x = make_input()
    torch.manual_seed(seed)
    out, state = layer(x)
    outs = [out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out]
    outs += list(state) if isinstance(state, tuple) else [state]
    gen = torch.Generator().manual_seed(7)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    leaves = [leaf, *list(layer.parameters())]
    return [o.detach() for o in outs], torch.autograd.grad(loss, leaves)


# Seeded: the same draw in every session (an unseeded one depended on what ran before).
leaf = torch.randn(
    T, B, I, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
).requires_grad_()
INPUTS = {
    "padded": lambda: leaf,
    "packed": lambda: packed_input(leaf, [3, 5, 2], enforce_sorted=False),
    "unbatched": lambda: leaf[:, 0],
}


def assert_engines_agree(ref, fast, make_input, dtype=torch.float64):
    out_r, g_r = outputs_and_grads(ref, make_input, seed=11)
    out_f, g_f = outputs_and_grads(fast, make_input, seed=11)
    for a, b in zip(out_f, out_r, strict=True):
        torch.testing.assert_close(a, b, **tolerance(dtype))
    names = ["input"] + [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, g_f, g_r, strict=True):
        torch.testing.assert_close(a, b, **tolerance(dtype), msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("cls, kw", CASES)
def test_fused_variant_matches_reference(cls, kw, kind, training):
    ref, fast = twin_layers(cls, "fused", **kw)
    ref.train(training)
    fast.train(training)
    assert_engines_agree(ref, fast, INPUTS[kind])


@pytest.mark.parametrize("cls", [rnnkit.LSTM, rnnkit.GRU], ids=["lstm", "gru"])
def test_fused_variants_float32_match_reference(cls):
    kw = dict(layer_norm=True, zoneout=0.2, recurrent_dropout=0.2)
    ref, fast = twin_layers(cls, "fused", dtype=torch.float32, **kw)
    x = torch.randn(T, B, I)
    results = []
    # The same seed draws the same masks in float32 and float64 (zoneout's from random bits;
    # the dropout mask compares a uniform draw with 0.8, whose float32 and float64 values differ
    # by 1e-8: one draw in 1e8 could fall between them).
    for layer, inputs in ((ref, x), (fast, x), (copy.deepcopy(ref).double(), x.double())):
        torch.manual_seed(3)
        results.append(layer(inputs)[0])
    assert_float32_as_accurate([results[1]], [results[0]], [results[2]], ["output"])


triton_kernels = pytest.importorskip("rnnkit.engines.triton.kernels")


@pytest.mark.skipif(
    not triton_kernels.available(torch.float64, torch.device("cpu")), reason="no Triton"
)
@pytest.mark.parametrize("cls", [rnnkit.LSTM, rnnkit.GRU], ids=["lstm", "gru"])
def test_triton_variants_match_reference(cls):
    ref, fast = twin_layers(cls, "triton", layer_norm=True, zoneout=0.3, recurrent_dropout=0.3)
    assert_engines_agree(ref, fast, INPUTS["packed"])


@pytest.mark.parametrize("cls", [rnnkit.LSTM, rnnkit.GRU], ids=["lstm", "gru"])
def test_variants_off_change_nothing(cls):
    torch.manual_seed(0)
    plain = cls(I, H, 2, bidirectional=True)
    torch.manual_seed(0)
    off = cls(
        I,
        H,
        2,
        bidirectional=True,
        layer_norm=False,
        recurrent_dropout=0.0,
        zoneout=0.0,
        weight_drop=0.0,
        learn_init=False,
    )
    torch.manual_seed(0)
    ref = getattr(nn, cls.__name__)(I, H, 2, bidirectional=True)
    assert list(off.state_dict()) == list(ref.state_dict())
    for a, b in zip(off.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
    assert repr(off) == repr(ref)
    x = torch.randn(T, B, I)
    torch.testing.assert_close(off.train()(x)[0], plain.train()(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "kw",
    [dict(recurrent_dropout=0.5), dict(weight_drop=0.5)],
    ids=["recurrent_dropout", "weight_drop"],
)
@pytest.mark.parametrize("cls", [rnnkit.LSTM, rnnkit.GRU], ids=["lstm", "gru"])
def test_dropout_variants_are_training_only(cls, kw):
    torch.manual_seed(0)
    layer = cls(I, H, dtype=torch.float64, **kw)
    plain = cls(I, H, dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(T, B, I, dtype=torch.float64)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], plain(x)[0], rtol=1e-12, atol=1e-12)
    layer.train()
    assert not torch.allclose(layer(x)[0], plain(x)[0])


def test_recurrent_dropout_mask_is_one_per_sequence_for_all_steps():
    # The layer draws one (batch, hidden) mask per layer and direction; replaying that draw
    # and applying it to h at every step by hand gives the layer's output.
    p = 0.5
    layer = rnnkit.GRU(I, H, recurrent_dropout=p, dtype=torch.float64, backend="fused").train()
    x = torch.randn(T, B, I, dtype=torch.float64)
    torch.manual_seed(5)
    out = layer(x)[0]
    torch.manual_seed(5)
    mask = torch.bernoulli(torch.full((B, H), 1 - p, dtype=torch.float64)) / (1 - p)
    w = (layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)
    h = torch.zeros(B, H, dtype=torch.float64)
    for t in range(T):
        gi = x[t] @ w[0].t() + w[2]
        gh = (h * mask) @ w[1].t() + w[3]
        r = torch.sigmoid(gi[:, :H] + gh[:, :H])
        z = torch.sigmoid(gi[:, H : 2 * H] + gh[:, H : 2 * H])
        n = torch.tanh(gi[:, 2 * H :] + r * gh[:, 2 * H :])
        h = (1 - z) * n + z * h
        torch.testing.assert_close(out[t], h, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [rnnkit.LSTM, rnnkit.GRU], ids=["lstm", "gru"])
def test_zoneout_in_eval_is_the_expectation(cls):
    p = 0.3
    torch.manual_seed(0)
    layer = cls(I, H, dtype=torch.float64, zoneout=p, backend="fused").eval()
    x = torch.randn(T, B, I, dtype=torch.float64)
    out, _state = layer(x)
    h = torch.zeros(B, H, dtype=torch.float64)
    c = torch.zeros(B, H, dtype=torch.float64)
    w = (layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)
    for t in range(T):
        if cls is rnnkit.LSTM:
            h_new, c_new = F.lstm_cell(x[t], h, c, *w)
            c = p * c + (1 - p) * c_new
        else:
            h_new = F.gru_cell(x[t], h, *w)
        h = p * h + (1 - p) * h_new
        torch.testing.assert_close(out[t], h, rtol=1e-12, atol=1e-12)
    # Training draws fresh masks on every call.
    layer.train()
    assert not torch.allclose(layer(x)[0], layer(x)[0])


def test_zoneout_in_training_keeps_whole_units():
    # With p close to 1 nearly every unit keeps its previous value at every step.
    layer = rnnkit.GRU(I, H, zoneout=0.999, dtype=torch.float64).train()
    h0 = torch.randn(1, B, H, dtype=torch.float64)
    torch.manual_seed(0)
    out, _hn = layer(torch.randn(T, B, I, dtype=torch.float64), h0)
    kept = (out == h0[0]).double().mean()
    assert kept > 0.95


def test_layer_norm_parameters_are_named_shaped_and_initialised():
    layer = rnnkit.LSTM(I, H, 2, bidirectional=True, layer_norm=True)
    params = dict(layer.named_parameters())
    assert params["ln_ih_weight_l1_reverse"].shape == (4 * H,)
    assert params["ln_hh_bias_l0"].shape == (4 * H,)
    assert params["ln_c_weight_l1"].shape == (H,)
    assert torch.equal(params["ln_c_weight_l1"], torch.ones(H))
    assert torch.equal(params["ln_ih_bias_l0"], torch.zeros(4 * H))
    gru = rnnkit.GRU(I, H, layer_norm=True)
    assert not any(n.startswith("ln_c") for n, _ in gru.named_parameters())
    assert rnnkit.count_parameters(gru) == rnnkit.param_count("gru", I, H).total + 4 * 3 * H


@pytest.mark.parametrize("layer_norm", [True, False])
def test_layer_norm_makes_the_layer_blind_to_the_scale_of_its_weights(layer_norm):
    # LN(W z) does not change when W is scaled (up to its epsilon); without LN it does.
    torch.manual_seed(0)
    layer = rnnkit.LSTM(I, H, layer_norm=layer_norm, bias=False, dtype=torch.float64)
    h0 = torch.randn(1, B, H, dtype=torch.float64)
    c0 = torch.randn(1, B, H, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    first = layer(x, (h0, c0))[0]
    with torch.no_grad():
        layer.weight_hh_l0.mul_(10)
        layer.weight_ih_l0.mul_(10)
    change = (layer(x, (h0, c0))[0] - first).abs().max()
    assert (change < 1e-2) if layer_norm else (change > 0.1)


def test_forget_bias_initialises_both_biases_and_nothing_else():
    torch.manual_seed(0)
    layer = rnnkit.LSTM(I, H, 2, forget_bias=1.0)
    torch.manual_seed(0)
    ref = nn.LSTM(I, H, 2)
    for (name, a), (_, b) in zip(layer.named_parameters(), ref.named_parameters(), strict=True):
        if name.startswith("bias"):
            assert torch.equal(a[H : 2 * H], torch.full((H,), 0.5)), name
            assert torch.equal(a[:H], b[:H]) and torch.equal(a[2 * H :], b[2 * H :])
        else:
            assert torch.equal(a, b), name


def test_learn_init_is_used_without_hx_and_learns():
    layer = rnnkit.LSTM(I, H, 2, learn_init=True, dtype=torch.float64)
    with torch.no_grad():
        layer.init_h.normal_()
        layer.init_c.normal_()
    x = torch.randn(T, B, I, dtype=torch.float64)
    hx = (layer.init_h.unsqueeze(1).expand(-1, B, -1), layer.init_c.unsqueeze(1).expand(-1, B, -1))
    torch.testing.assert_close(layer(x)[0], layer(x, hx)[0])
    layer(x)[0].sum().backward()
    assert layer.init_h.grad.abs().sum() > 0 and layer.init_c.grad.abs().sum() > 0
    # Unbatched input takes the same initial state.
    torch.testing.assert_close(layer(x[:, 0])[0], layer(x)[0][:, 0])


def test_weight_drop_uses_one_mask_per_call():
    # With x = 0 and no bias, two sequences with the same h0 see the same dropped W_hh.
    layer = rnnkit.GRU(I, H, weight_drop=0.5, bias=False, dtype=torch.float64).train()
    h0 = torch.randn(1, 1, H, dtype=torch.float64).expand(1, 2, H).contiguous()
    out, _ = layer(torch.zeros(T, 2, I, dtype=torch.float64), h0)
    torch.testing.assert_close(out[:, 0], out[:, 1], rtol=0, atol=0)


@pytest.mark.parametrize(
    "build, message",
    [
        (
            lambda: rnnkit.LSTM(I, H, zoneout=1.0),
            "zoneout must be a probability in [0, 1), got 1.0",
        ),
        (
            lambda: rnnkit.GRU(I, H, recurrent_dropout=-0.1),
            "recurrent_dropout must be a probability",
        ),
        (lambda: rnnkit.LSTM(I, H, forget_bias=1.0, bias=False), "forget_bias needs bias=True"),
        (
            lambda: rnnkit.LSTM(I, H, layer_norm=True, backend="torch")(torch.randn(2, 1, I)),
            "backend='torch' cannot run layer_norm",
        ),
    ],
    ids=["zoneout-range", "rdrop-range", "forget-bias-without-bias", "torch-backend"],
)
def test_variant_arguments_are_checked(build, message):
    with pytest.raises(
        ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
    ):
        build()


def test_repr_names_the_variants():
    assert repr(rnnkit.GRU(I, H, layer_norm=True, zoneout=0.1)) == (
        f"GRU({I}, {H}, layer_norm=True, zoneout=0.1)"
    )


@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize("cls", [rnnkit.LSTM, rnnkit.GRU], ids=["lstm", "gru"])
def test_layer_norm_cell_is_one_step_of_the_layer_norm_layer(cls, unbatched):
    cell_cls = rnnkit.LSTMCell if cls is rnnkit.LSTM else rnnkit.GRUCell
    layer = cls(I, H, layer_norm=True, dtype=torch.float64)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(-1, 1)
    cell = cell_cls(I, H, dtype=torch.float64, layer_norm=True)
    cell.load_state_dict({n.removesuffix("_l0"): p for n, p in layer.state_dict().items()})
    x = torch.randn(*(() if unbatched else (B,)), I, dtype=torch.float64)
    h0 = torch.randn(*(() if unbatched else (B,)), H, dtype=torch.float64)
    c0 = torch.randn_like(h0)
    state = (h0, c0) if cls is rnnkit.LSTM else h0
    got = cell(x, state)
    layer_state = (h0[None], c0[None]) if cls is rnnkit.LSTM else h0[None]
    _, want = layer(x[None], layer_state)
    if cls is rnnkit.LSTM:
        torch.testing.assert_close(got[0], want[0][0])
        torch.testing.assert_close(got[1], want[1][0])
    else:
        torch.testing.assert_close(got, want[0])
    assert "layer_norm=True" in repr(cell)


def test_lstm_cell_forget_bias_and_plain_cell_unchanged():
    torch.manual_seed(0)
    cell = rnnkit.LSTMCell(I, H, forget_bias=2.0)
    torch.manual_seed(0)
    ref = nn.LSTMCell(I, H)
    assert torch.equal(cell.bias_ih[H : 2 * H], torch.ones(H))
    assert torch.equal(cell.weight_ih, ref.weight_ih)
    assert list(rnnkit.GRUCell(I, H).state_dict()) == list(nn.GRUCell(I, H).state_dict())
