"""The module contract of torch.nn: parameters, init, state dicts, repr, cells, and the
PyTorch machinery around modules (to, deepcopy, save/load, functional_call, compile)."""

import copy
import io

import pytest
import torch
from helpers import MODES, OURS, TORCH, assert_twins_agree, twins
from torch import nn

import rnnkit

CONFIGS = [
    pytest.param(
        "RNN", dict(num_layers=2, nonlinearity="relu", bias=False), id="rnn-relu-L2-nobias"
    ),
    pytest.param("LSTM", dict(num_layers=3, bidirectional=True, proj_size=3), id="lstm-L3-bi-proj"),
    pytest.param(
        "GRU", dict(num_layers=2, bidirectional=True, batch_first=True), id="gru-L2-bi-bf"
    ),
    pytest.param("LSTM", dict(), id="lstm-default"),
]


def test_init_code_that_tests_for_the_base_classes_reaches_both_libraries():
    """An initialisation function for ``model.apply`` that tests for torch.nn's base classes and
    rnnkit's (exported as rnnkit.RNNBase, rnnkit.RNNCellBase) sets the same weights in a model
    of either library."""

    def init(m):
        if isinstance(m, (nn.RNNBase, rnnkit.RNNBase, nn.RNNCellBase, rnnkit.RNNCellBase)):
            for name, p in m.named_parameters():
                torch.nn.init.constant_(p, 0.5 if "weight_hh" in name else 0.25)

    for lib in (nn, rnnkit):
        model = nn.ModuleList([lib.RNN(2, 3), lib.LSTM(2, 3), lib.GRU(2, 3), lib.GRUCell(2, 3),
                               lib.LSTMCell(2, 3), lib.RNNCell(2, 3)])  # fmt: skip
        model.apply(init)
        for name, p in model.named_parameters():
            assert torch.all(p == (0.5 if "weight_hh" in name else 0.25)), (lib.__name__, name)
    assert not isinstance(rnnkit.LSTM(2, 3), nn.RNNBase)  # why the tuple is needed


@pytest.mark.parametrize("kind, kwargs", CONFIGS)
def test_seeded_layer_holds_bit_identical_weights_to_torch(kind, kwargs):
    torch.manual_seed(7)
    ref = TORCH[kind](5, 8, **kwargs)
    torch.manual_seed(7)
    ours = OURS[kind](5, 8, **kwargs)
    ref_params, our_params = list(ref.named_parameters()), list(ours.named_parameters())
    assert [n for n, _ in our_params] == [n for n, _ in ref_params]
    for (name, a), (_, b) in zip(our_params, ref_params, strict=False):
        assert a.shape == b.shape, name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind, kwargs", CONFIGS)
def test_state_dict_loads_both_ways_strict(kind, kwargs):
    ref = TORCH[kind](5, 8, **kwargs)
    ours = OURS[kind](5, 8, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    back = TORCH[kind](5, 8, **kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)
    for (n, a), (_, b) in zip(back.state_dict().items(), ref.state_dict().items(), strict=False):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("kind, kwargs", CONFIGS)
def test_repr_reads_like_torch(kind, kwargs):
    expected = repr(TORCH[kind](5, 8, **kwargs))
    if kwargs.get("nonlinearity", "tanh") != "tanh":
        expected = expected[:-1] + f", nonlinearity={kwargs['nonlinearity']!r})"
    assert repr(OURS[kind](5, 8, **kwargs)) == expected


def test_repr_names_a_non_default_backend():
    assert "backend='reference'" in repr(rnnkit.GRU(3, 4, backend="reference"))


def test_all_weights_and_flatten_parameters_like_torch():
    ref = nn.LSTM(3, 4, 2, bidirectional=True)
    ours = rnnkit.LSTM(3, 4, 2, bidirectional=True)
    ours.flatten_parameters()
    assert [[p.shape for p in ws] for ws in ours.all_weights] == [
        [p.shape for p in ws] for ws in ref.all_weights
    ]
    assert ours._flat_weights_names == ref._flat_weights_names


@pytest.mark.parametrize("kind, kwargs", CONFIGS)
def test_to_float64_then_matches_torch(kind, kwargs):
    ref = TORCH[kind](5, 8, **kwargs).double()
    ours = OURS[kind](5, 8, **kwargs).to(torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=1e-10, atol=1e-10)


def test_deepcopy_and_save_load_keep_results():
    layer = rnnkit.LSTM(5, 8, 2, bidirectional=True, proj_size=3)
    x = torch.randn(4, 2, 5)
    expected = layer(x)[0]
    torch.testing.assert_close(copy.deepcopy(layer)(x)[0], expected, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, rnnkit.LSTM)
    torch.testing.assert_close(loaded(x)[0], expected, rtol=0, atol=0)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    fresh = rnnkit.LSTM(5, 8, 2, bidirectional=True, proj_size=3)
    fresh.load_state_dict(torch.load(buf))
    torch.testing.assert_close(fresh(x)[0], expected, rtol=0, atol=0)


def test_functional_call_uses_the_given_parameters():
    _ref, ours = twins("GRU", torch.float64, input_size=5, hidden_size=8, num_layers=2)
    other = nn.GRU(5, 8, 2, dtype=torch.float64)
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    out, hn = torch.func.functional_call(ours, dict(other.named_parameters()), (x,))
    ref_out, ref_hn = other(x)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hn, ref_hn, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "fused", "torch"])
def test_torch_compile_runs_and_gives_equal_results(backend):
    torch._dynamo.reset()
    layer = rnnkit.LSTM(4, 6, 2, bidirectional=True, batch_first=True, backend=backend)
    x = torch.randn(2, 3, 4)
    expected, (h, c) = layer(x)
    compiled = torch.compile(layer, backend="aot_eager")
    got, (h2, c2) = compiled(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(h2, h)
    torch.testing.assert_close(c2, c)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
@pytest.mark.parametrize(
    "ours_cls, ref_cls, extra",
    [
        (rnnkit.RNNCell, nn.RNNCell, {}),
        (rnnkit.RNNCell, nn.RNNCell, {"nonlinearity": "relu"}),
        (rnnkit.LSTMCell, nn.LSTMCell, {}),
        (rnnkit.GRUCell, nn.GRUCell, {}),
    ],
    ids=["rnn_tanh", "rnn_relu", "lstm", "gru"],
)
def test_cell_matches_torch(ours_cls, ref_cls, extra, unbatched, bias, dtype):
    torch.manual_seed(3)
    ref = ref_cls(5, 7, bias=bias, dtype=dtype, **extra)
    torch.manual_seed(3)
    ours = ours_cls(5, 7, bias=bias, dtype=dtype, **extra)
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=False):
        assert torch.equal(a, b), n
    assert repr(ours) == repr(ref)
    shape = () if unbatched else (3,)
    x = torch.randn(*shape, 5, dtype=dtype, requires_grad=True)
    h = torch.randn(*shape, 7, dtype=dtype, requires_grad=True)
    c = torch.randn(*shape, 7, dtype=dtype, requires_grad=True)
    is_lstm = ours_cls is rnnkit.LSTMCell
    hx = (h, c) if is_lstm else h
    assert_twins_agree(ref, ours, lambda: (x, hx), [x, h, c] if is_lstm else [x, h], dtype)
    # Without hx the state starts at zero.
    assert_twins_agree(ref, ours, lambda: (x,), [x], dtype)


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_layer_float64(mode):
    cls, extra = MODES[mode]
    layer = OURS[cls](3, 4, num_layers=2, bidirectional=True, dtype=torch.float64, **extra)
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 2, 4, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())
    names = [n for n, _ in layer.named_parameters()]

    def f(x, h0, c0, *weights):
        out = torch.func.functional_call(
            layer, dict(zip(names, weights, strict=False)), (x, (h0, c0) if cls == "LSTM" else h0)
        )
        return tuple(t for t in (out[0], *(out[1] if cls == "LSTM" else (out[1],))))

    assert torch.autograd.gradcheck(f, (x, h0, c0, *[p.detach().requires_grad_() for p in params]))


def test_gradcheck_packed_bidirectional_lstm_float64():
    layer = rnnkit.LSTM(3, 4, bidirectional=True, proj_size=2, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(x, *weights):
        packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([2, 5, 4]), enforce_sorted=False)
        out, (h, c) = torch.func.functional_call(
            layer, dict(zip(names, weights, strict=False)), (packed,)
        )
        return out.data, h, c

    assert torch.autograd.gradcheck(
        f, (x, *[p.detach().requires_grad_() for p in layer.parameters()])
    )


@pytest.mark.parametrize("cell", ["rnn_tanh_cell", "rnn_relu_cell", "lstm_cell", "gru_cell"])
def test_gradcheck_functional_cells_float64(cell):
    from rnnkit import functional as F

    g = 4 if cell == "lstm_cell" else 3 if cell == "gru_cell" else 1
    t = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, h, c = t(2, 3), t(2, 4), t(2, 4)
    w_ih, w_hh, b_ih, b_hh = t(g * 4, 3), t(g * 4, 4), t(g * 4), t(g * 4)
    if cell == "lstm_cell":
        args = (x, h, c, w_ih, w_hh, b_ih, b_hh)
    else:
        args = (x, h, w_ih, w_hh, b_ih, b_hh)
    assert torch.autograd.gradcheck(getattr(F, cell), args)


def test_lstm_hn_of_packed_input_is_each_sequences_last_step():
    layer = rnnkit.LSTM(3, 4, bidirectional=True)
    x = torch.randn(5, 3, 3)
    lengths = [2, 5, 4]
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    _, (hn, _) = layer(packed)
    for b, n in enumerate(lengths):
        out_b, (hn_b, _) = layer(x[:n, b])
        torch.testing.assert_close(hn[:, b], hn_b)
        # Forward direction ends at the last real step; reverse ends at step 0.
        torch.testing.assert_close(hn[0, b], out_b[n - 1, :4])
        torch.testing.assert_close(hn[1, b], out_b[0, 4:])
