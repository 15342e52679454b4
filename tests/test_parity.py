"""rnnkit's layers equal torch.nn's: outputs, final states and every gradient."""

import itertools

import pytest
import torch
from helpers import MODES, assert_twins_agree, packed_input, twins

T, B, I, H = 6, 3, 5, 7

GRID = [
    pytest.param(
        mode,
        layers,
        bidir,
        bias,
        id=f"{mode}-L{layers}-{'bi' if bidir else 'uni'}-{'bias' if bias else 'nobias'}",
    )
    for mode, layers, bidir, bias in itertools.product(
        MODES, (1, 2, 3), (False, True), (True, False)
    )
]

INPUTS = [
    "padded",
    "padded_hx",
    "batch_first_hx",
    "unbatched",
    "unbatched_hx",
    "packed_sorted",
    "packed_unsorted_hx",
]


def _case(mode, layers, bidir, bias, kind, dtype, proj_size=0):
    cls, extra = MODES[mode]
    kwargs = dict(
        input_size=I, hidden_size=H, num_layers=layers, bias=bias, bidirectional=bidir, **extra
    )
    if proj_size:
        kwargs["proj_size"] = proj_size
    batch_first = kind.startswith("batch_first")
    ref, ours = twins(cls, dtype, batch_first=batch_first, **kwargs)
    g = torch.Generator().manual_seed(0)
    rows = layers * (2 if bidir else 1)
    unbatched = kind.startswith("unbatched")
    x = torch.randn(
        (T, I) if unbatched else ((B, T, I) if batch_first else (T, B, I)), generator=g, dtype=dtype
    )
    x.requires_grad_()
    state_batch = () if unbatched else (B,)
    leaves = [x]
    hx = None
    if kind.endswith("_hx"):
        h0 = torch.randn(
            rows, *state_batch, proj_size or H, generator=g, dtype=dtype, requires_grad=True
        )
        leaves.append(h0)
        hx = h0
        if cls == "LSTM":
            c0 = torch.randn(rows, *state_batch, H, generator=g, dtype=dtype, requires_grad=True)
            leaves.append(c0)
            hx = (h0, c0)
    if kind.startswith("packed"):
        lengths = [6, 4, 2] if kind == "packed_sorted" else [3, 6, 5]

        def make_args():
            return (packed_input(x, lengths, enforce_sorted=kind == "packed_sorted"), hx)
    else:

        def make_args():
            return (x, hx)

    assert_twins_agree(ref, ours, make_args, leaves, dtype)


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("mode, layers, bidir, bias", GRID)
def test_layer_matches_torch_float64(mode, layers, bidir, bias, kind):
    _case(mode, layers, bidir, bias, kind, torch.float64)


@pytest.mark.parametrize("kind", ["padded_hx", "batch_first_hx", "packed_unsorted_hx"])
@pytest.mark.parametrize("mode, layers, bidir, bias", [p for p in GRID if p.values[3]])
def test_layer_matches_torch_float32(mode, layers, bidir, bias, kind):
    _case(mode, layers, bidir, bias, kind, torch.float32)


@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("layers, bidir", [(1, False), (2, True), (3, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_lstm_with_projection_matches_torch(layers, bidir, kind, dtype):
    _case("lstm", layers, bidir, True, kind, dtype, proj_size=4)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_dropout_matches_torch_at_zero_and_one(mode, p):
    cls, extra = MODES[mode]
    ref, ours = twins(
        cls, input_size=I, hidden_size=H, num_layers=3, dropout=p, bidirectional=True, **extra
    )
    ref.train()
    ours.train()
    x = torch.randn(T, B, I, dtype=torch.float64, requires_grad=True)
    assert_twins_agree(ref, ours, lambda: (x, None), [x], torch.float64)


@pytest.mark.parametrize("mode", MODES)
def test_eval_mode_has_no_dropout(mode):
    cls, extra = MODES[mode]
    ref, ours = twins(cls, input_size=I, hidden_size=H, num_layers=2, dropout=0.5, **extra)
    ours.eval()
    x = torch.randn(T, B, I, dtype=torch.float64)
    first, second = ours(x)[0], ours(x)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    ref.eval()
    torch.testing.assert_close(first, ref(x)[0], rtol=1e-10, atol=1e-10)


def test_dropout_in_training_changes_outputs_between_layers_only():
    torch.manual_seed(0)
    layer = __import__("rnnkit").LSTM(I, H, 2, dropout=0.5, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    layer.train()
    a, b = layer(x)[0], layer(x)[0]
    assert not torch.allclose(a, b)
    layer.eval()
    torch.testing.assert_close(layer(x)[0], layer(x)[0])
