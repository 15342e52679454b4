"""rnnkit.Recurrent runs any cell like the built-in layers: a hand-written LSTM cell equals
rnnkit.LSTM and a GRU-like cell equals rnnkit.GRU (outputs, final states, every gradient)."""

import itertools
import re

import pytest
import torch
from helpers import assert_twins_agree, packed_input
from torch import nn

import rnnkit
from rnnkit import RNNInputError

T, B, I, H = 5, 3, 4, 6
F64 = torch.float64


class LSTMCell(nn.Module):
    """rnnkit.LSTM's step (gates i, f, g, o) with its parameter names, state (h, c)."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.weight_ih = nn.Parameter(torch.randn(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.randn(4 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.randn(4 * hidden_size))
        self.bias_hh = nn.Parameter(torch.randn(4 * hidden_size))

    def initial_state(self, batch_size, device, dtype):
        zero = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        return zero, zero

    def forward(self, x, state):
        h, c = state
        gates = x @ self.weight_ih.T + self.bias_ih + h @ self.weight_hh.T + self.bias_hh
        i, f, g, o = gates.chunk(4, dim=1)
        c = f.sigmoid() * c + i.sigmoid() * g.tanh()
        h = o.sigmoid() * c.tanh()
        return h, (h, c)


class GRUCell(nn.Module):
    """rnnkit.GRU's step (gates r, z, n) with its parameter names, a tensor state and no
    initial_state."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight_ih = nn.Parameter(torch.randn(3 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.randn(3 * hidden_size, hidden_size))
        self.bias_ih = nn.Parameter(torch.randn(3 * hidden_size))
        self.bias_hh = nn.Parameter(torch.randn(3 * hidden_size))

    def forward(self, x, h):
        xr, xz, xn = (x @ self.weight_ih.T + self.bias_ih).chunk(3, dim=1)
        hr, hz, hn = (h @ self.weight_hh.T + self.bias_hh).chunk(3, dim=1)
        r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
        h = (1 - z) * (xn + r * hn).tanh() + z * h
        return h, h


CELLS = {"LSTM": LSTMCell, "GRU": GRUCell}


def twins(kind: str, **kwargs) -> tuple[nn.Module, rnnkit.Recurrent]:
    """rnnkit.<kind> (reference engine) and a Recurrent of the matching cell, same weights."""
    ref = getattr(rnnkit, kind)(I, H, **kwargs, dtype=F64, backend="reference")
    ours = rnnkit.Recurrent(CELLS[kind], I, H, **kwargs).to(F64)
    D = 2 if ref.bidirectional else 1
    with torch.no_grad():
        for name, p in ref.named_parameters():
            # weight_ih_l1_reverse -> cells[1 * D + 1].weight_ih
            match = re.fullmatch(r"(\w+_[ih]h)_l(\d+)(_reverse)?", name)
            base, layer, reverse = match.groups()
            getattr(ours.cells[int(layer) * D + bool(reverse)], base).copy_(p)
    # Same parameter order, so the helpers pair their gradients by position.
    assert [p.shape for p in ours.parameters()] == [p.shape for p in ref.parameters()]
    return ref, ours


def make_case(kind: str, layers: int, bidir: bool, inputs: str, with_hx: bool):
    """(ref, ours, make_args, leaves) for one input layout."""
    batch_first = inputs == "batch_first"
    ref, ours = twins(kind, num_layers=layers, bidirectional=bidir, batch_first=batch_first)
    g = torch.Generator().manual_seed(0)
    unbatched = inputs == "unbatched"
    shape = (T, I) if unbatched else ((B, T, I) if batch_first else (T, B, I))
    x = torch.randn(shape, generator=g, dtype=F64, requires_grad=True)
    state_shape = (layers * (2 if bidir else 1), *(() if unbatched else (B,)), H)
    leaves = [x]
    hx = None
    if with_hx:
        n = 2 if kind == "LSTM" else 1
        leaves += [
            torch.randn(state_shape, generator=g, dtype=F64, requires_grad=True) for _ in range(n)
        ]
        hx = tuple(leaves[1:]) if kind == "LSTM" else leaves[1]
    if inputs.startswith("packed"):
        lengths = [5, 3, 1] if inputs == "packed_sorted" else [2, 5, 4]

        def make_args():
            return packed_input(x, lengths, enforce_sorted=inputs == "packed_sorted"), hx
    else:

        def make_args():
            return x, hx

    return ref, ours, make_args, leaves


INPUTS = ["padded", "batch_first", "unbatched", "packed_sorted", "packed_unsorted"]


@pytest.mark.parametrize("with_hx", [False, True], ids=["zeros", "hx"])
@pytest.mark.parametrize("inputs", INPUTS)
@pytest.mark.parametrize(
    "layers, bidir",
    list(itertools.product((1, 2), (False, True))),
    ids=lambda v: ("bi" if v else "uni") if isinstance(v, bool) else f"L{v}",
)
def test_lstm_cell_matches_rnnkit_lstm(layers, bidir, inputs, with_hx):
    ref, ours, make_args, leaves = make_case("LSTM", layers, bidir, inputs, with_hx)
    assert_twins_agree(ref, ours, make_args, leaves, F64)


@pytest.mark.parametrize(
    "layers, bidir, inputs, with_hx",
    [
        (1, False, "padded", False),
        (2, True, "batch_first", True),
        (2, True, "unbatched", True),
        (2, True, "packed_unsorted", True),
        (1, True, "packed_sorted", False),
    ],
    ids=[
        "L1-uni-padded",
        "L2-bi-batch_first-hx",
        "L2-bi-unbatched-hx",
        "L2-bi-packed-hx",
        "L1-bi-packed",
    ],
)
def test_tensor_state_gru_cell_matches_rnnkit_gru(layers, bidir, inputs, with_hx):
    ref, ours, make_args, leaves = make_case("GRU", layers, bidir, inputs, with_hx)
    assert_twins_agree(ref, ours, make_args, leaves, F64)


def test_hx_and_h_n_have_the_cells_state_form():
    _, lstm, make_args, _ = make_case("LSTM", 2, True, "padded", False)
    out, (h_n, c_n) = lstm(*make_args())
    assert out.shape == (T, B, 2 * H) and h_n.shape == c_n.shape == (4, B, H)
    _, gru, make_args, _ = make_case("GRU", 2, True, "unbatched", False)
    out, h_n = gru(*make_args())
    assert isinstance(h_n, torch.Tensor) and out.shape == (T, 2 * H) and h_n.shape == (4, H)


def test_cell_without_initial_state_starts_from_zeros():
    seen = []

    class Recording(GRUCell):
        def forward(self, x, h):
            seen.append(h.detach().clone())
            return super().forward(x, h)

    layer = rnnkit.Recurrent(Recording, I, H, num_layers=2, bidirectional=True)
    layer(torch.randn(T, B, I))
    first_steps = [seen[k * T] for k in range(4)]  # each cell's first step
    for h in first_steps:
        assert h.shape == (B, H)
        assert torch.equal(h, torch.zeros(B, H))


def test_dropout_one_between_layers_matches_rnnkit_lstm():
    ref, ours = twins("LSTM", num_layers=3, bidirectional=True, dropout=1.0)
    ref.train()
    ours.train()
    x = torch.randn(T, B, I, dtype=F64, requires_grad=True)
    assert_twins_agree(ref, ours, lambda: (x, None), [x], F64)


def test_factory_is_called_per_layer_and_direction_in_torch_order():
    calls = []

    def factory(input_size, hidden_size):
        cell = LSTMCell(input_size, hidden_size)
        calls.append((input_size, hidden_size, cell))
        return cell

    layer = rnnkit.Recurrent(factory, I, H, num_layers=3, bidirectional=True)
    assert [(i, h) for i, h, _ in calls] == [(I, H)] * 2 + [(2 * H, H)] * 4
    assert [id(c) for *_, c in calls] == [id(c) for c in layer.cells]
    uni = []
    rnnkit.Recurrent(lambda i, h: uni.append(i) or LSTMCell(i, h), I, H, num_layers=2)
    assert uni == [I, H]


def test_hx_with_wrong_shape_names_state_index_expected_and_received():
    layer = rnnkit.Recurrent(LSTMCell, I, H, num_layers=2)
    x = torch.randn(T, B, I)
    h0, bad_c0 = torch.zeros(2, B, H), torch.zeros(2, B, H + 1)
    with pytest.raises(RNNInputError) as info:
        layer(x, (h0, bad_c0))
    message = str(info.value)
    assert "Recurrent: hx[1] has shape (2, 3, 7)" in message
    assert "expected (num_layers * num_directions, batch, *state) = (2, 3, 6)" in message
    unbatched = "hx[0] has shape (2, 3, 6); expected (num_layers * num_directions, *state) = (2, 6)"
    with pytest.raises(RNNInputError, match=re.escape(unbatched)):
        layer(torch.randn(T, I), (torch.zeros(2, B, H), torch.zeros(2, H)))


def test_hx_with_wrong_form_names_the_cells_state_form():
    lstm = rnnkit.Recurrent(LSTMCell, I, H)
    with pytest.raises(RNNInputError, match=re.escape("hx must be a tuple of 2 tensors")):
        lstm(torch.randn(T, B, I), torch.zeros(1, B, H))
    gru = rnnkit.Recurrent(GRUCell, I, H)
    with pytest.raises(RNNInputError, match=re.escape("hx must be a Tensor")):
        gru(torch.randn(T, B, I), (torch.zeros(1, B, H),))
    with pytest.raises(RNNInputError, match=re.escape("hx has shape (1, 2, 6)")):
        gru(torch.randn(T, B, I), torch.zeros(1, 2, H))


def test_cell_returning_another_width_gets_a_clear_error():
    class Wide(GRUCell):
        def forward(self, x, h):
            h, _ = super().forward(x, h)
            return torch.cat((h, h), dim=1), h

    layer = rnnkit.Recurrent(Wide, I, H, num_layers=2)
    expected = (
        "Recurrent: cells[0] (Wide) returned y as a tensor of shape (3, 12); "
        "expected (batch, hidden_size) = (3, 6)"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        layer(torch.randn(T, B, I))


def test_cell_returning_another_state_form_gets_a_clear_error():
    class Untupled(LSTMCell):
        def forward(self, x, state):
            h, (h, c) = super().forward(x, state)
            return h, [h, c, c]

    expected = (
        "Recurrent: cells[0] (Untupled) returned its state as a list of shapes ((3, 6), (3, 6), "
        "(3, 6)); expected a tuple of shapes ((3, 6), (3, 6))"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        rnnkit.Recurrent(Untupled, I, H)(torch.randn(T, B, I))


def test_input_checks_are_the_layers_own():
    layer = rnnkit.Recurrent(LSTMCell, I, H)
    with pytest.raises(
        RNNInputError, match="Recurrent: input has 7 features per step but input_size=4"
    ):
        layer(torch.randn(T, B, 7))
    with pytest.raises(
        RNNInputError, match=re.escape("input has dtype torch.float64 but the parameters")
    ):
        layer(torch.randn(T, B, I, dtype=F64))


def test_compile_gives_the_eager_outputs():
    torch.manual_seed(0)
    eager = rnnkit.Recurrent(LSTMCell, I, H, bidirectional=True)
    compiled = rnnkit.Recurrent(LSTMCell, I, H, bidirectional=True, compile=True)
    compiled.load_state_dict(eager.state_dict())
    x = torch.randn(T, B, I)
    out, (h_n, c_n) = compiled(x)
    assert not compiled._compile_failed, "torch.compile fell back to eager"
    ref_out, (ref_h, ref_c) = eager(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(h_n, ref_h)
    torch.testing.assert_close(c_n, ref_c)
