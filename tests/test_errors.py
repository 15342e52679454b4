"""Every bad input gets an RNNInputError (or torch.nn's exception type for constructor arguments)
whose message names the argument, what was expected and what came."""

import re
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from rnnkit import RNNInputError


def lstm(**kw):
    return rnnkit.LSTM(10, 20, **kw)


def raises(match: str):
    return pytest.raises(RNNInputError, match=re.escape(match))


def test_input_error_is_both_value_and_runtime_error():
    assert issubclass(RNNInputError, ValueError) and issubclass(RNNInputError, RuntimeError)


def test_wrong_feature_size_names_input_size():
    with raises("LSTM: input has 7 features per step but input_size=10"):
        lstm()(torch.randn(5, 3, 7))


def test_wrong_feature_size_of_packed_input():
    # torch.nn skips this check for packed LSTM input and fails inside a matmul.
    packed = pack_padded_sequence(torch.randn(5, 3, 7), torch.tensor([5, 4, 2]))
    with raises("LSTM: input has 7 features per step but input_size=10"):
        lstm()(packed)


@pytest.mark.parametrize("shape", [(10,), (2, 3, 4, 10)], ids=["1d", "4d"])
def test_wrong_rank_of_input(shape):
    with raises(
        "LSTM: input must be 3-D (seq_len, batch, input_size) for a batch or "
        "2-D (seq_len, input_size) for one sequence; "
        f"got a {len(shape)}-D tensor"
    ):
        lstm()(torch.randn(shape))


def test_wrong_rank_names_batch_first_layout():
    with raises("3-D (batch, seq_len, input_size)"):
        lstm(batch_first=True)(torch.randn(10))


def test_h0_with_wrong_batch():
    with raises(
        "LSTM: h0 has shape (1, 2, 20); "
        "expected (num_layers * num_directions, batch, hidden_size) = (1, 3, 20)"
    ):
        lstm()(torch.randn(5, 3, 10), (torch.zeros(1, 2, 20), torch.zeros(1, 3, 20)))


def test_c0_with_wrong_hidden_size():
    with raises(
        "LSTM: c0 has shape (2, 3, 19); "
        "expected (num_layers * num_directions, batch, hidden_size) = (2, 3, 20)"
    ):
        lstm(bidirectional=True)(
            torch.randn(5, 3, 10), (torch.zeros(2, 3, 20), torch.zeros(2, 3, 19))
        )


def test_h0_with_wrong_layers_under_projection_names_proj_size():
    with raises(
        "h0 has shape (1, 3, 5); "
        "expected (num_layers * num_directions, batch, proj_size) = (2, 3, 5)"
    ):
        lstm(num_layers=2, proj_size=5)(
            torch.randn(5, 3, 10), (torch.zeros(1, 3, 5), torch.zeros(2, 3, 20))
        )


def test_packed_input_hx_batch_is_checked():
    packed = pack_padded_sequence(torch.randn(5, 3, 10), torch.tensor([5, 4, 2]))
    with raises(
        "h0 has shape (1, 4, 20); "
        "expected (num_layers * num_directions, batch, hidden_size) = (1, 3, 20)"
    ):
        rnnkit.GRU(10, 20)(packed, torch.zeros(1, 4, 20))


def test_batched_input_with_unbatched_state():
    with raises(
        "LSTM: batched 3-D input needs a 3-D h0 (num_layers * num_directions, batch, hidden_size); "
        "got a 2-D h0 of shape (1, 20)"
    ):
        lstm()(torch.randn(5, 3, 10), (torch.zeros(1, 20), torch.zeros(1, 20)))


def test_unbatched_input_with_batched_state():
    with raises(
        "GRU: unbatched 2-D input needs a 2-D h0 (num_layers * num_directions, hidden_size); "
        "got a 3-D h0 of shape (1, 1, 20)"
    ):
        rnnkit.GRU(10, 20)(torch.randn(5, 10), torch.zeros(1, 1, 20))


def test_lstm_hx_must_be_a_pair():
    with raises("LSTM: hx must be a tuple (h0, c0); got a Tensor"):
        lstm()(torch.randn(5, 3, 10), torch.zeros(1, 3, 20))


def test_gru_hx_must_be_a_tensor():
    with raises("GRU: hx must be a Tensor h0; got tuple"):
        rnnkit.GRU(10, 20)(torch.randn(5, 3, 10), (torch.zeros(1, 3, 20),))


def test_input_dtype_differs_from_parameters():
    with raises("LSTM: input has dtype torch.float64 but the parameters have dtype torch.float32"):
        lstm()(torch.randn(5, 3, 10, dtype=torch.float64))


def test_hx_dtype_differs_from_input():
    with raises("RNN: h0 has dtype torch.float64 but input has dtype torch.float32"):
        rnnkit.RNN(10, 20)(torch.randn(5, 3, 10), torch.zeros(1, 3, 20, dtype=torch.float64))


def test_input_on_other_device_than_parameters():
    with raises("LSTM: input is on meta but the parameters are on cpu"):
        lstm()(torch.randn(5, 3, 10, device="meta"))


def test_hx_on_other_device_than_input():
    with raises("GRU: h0 is on meta but input is on cpu"):
        rnnkit.GRU(10, 20)(torch.randn(5, 3, 10), torch.zeros(1, 3, 20, device="meta"))


def test_non_floating_input():
    with raises("LSTM: input must be a floating-point tensor; got dtype torch.int64"):
        lstm()(torch.ones(5, 3, 10, dtype=torch.long))


def test_input_that_is_not_a_tensor():
    with raises("LSTM: input must be a Tensor; got list"):
        lstm()([[0.0] * 10])


def test_empty_sequence():
    with raises("LSTM: input has 0 time steps (seq_len=0)"):
        lstm()(torch.randn(0, 3, 10))


def test_cell_wrong_features_and_state_shape():
    with raises("LSTMCell: input has 3 features but input_size=10"):
        rnnkit.LSTMCell(10, 20)(torch.randn(4, 3))
    with raises("LSTMCell: c has shape (4, 21); expected (batch, hidden_size) = (4, 20)"):
        rnnkit.LSTMCell(10, 20)(torch.randn(4, 10), (torch.zeros(4, 20), torch.zeros(4, 21)))
    with raises("GRUCell: h has shape (1, 20); expected (hidden_size,) = (20,)"):
        rnnkit.GRUCell(10, 20)(torch.randn(10), torch.zeros(1, 20))
    with raises(
        "RNNCell: input must be 2-D (batch, input_size) or 1-D (input_size,); got a 3-D tensor"
    ):
        rnnkit.RNNCell(10, 20)(torch.randn(1, 4, 10))
    with raises(
        "RNNCell: input has dtype torch.float64 but the parameters have dtype torch.float32"
    ):
        rnnkit.RNNCell(10, 20)(torch.randn(4, 10, dtype=torch.float64))


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_state_errors_quote_what_torch_nn_says(cls):
    """For every wrong state shape, the message's ``[torch.nn: ...]`` part is torch.nn's own
    message for that call (which reads an unbatched input's state after unsqueezing it), and an
    LSTM cell's hx of three states says how many came."""
    ref, ours = getattr(torch.nn, cls)(3, 4), getattr(rnnkit, cls)(3, 4)
    for xs in [(3,), (1, 3), (2, 3), (4, 3)]:
        for hs in [(4,), (5,), (1, 4), (2, 4), (3, 4), (2, 5), (1, 5), (1, 1, 4)]:
            x, h = torch.randn(*xs), torch.randn(*hs)
            hx = (h, h) if cls == "LSTMCell" else h
            try:
                ref(x, hx)
                continue  # a shape torch.nn takes: not an error case
            except Exception as e:  # torch raises ValueError, RuntimeError or IndexError here
                said = str(e)
            with pytest.raises(RNNInputError) as err:
                ours(x, hx)
            assert f"[torch.nn: {said}]" in str(err.value), (xs, hs, str(err.value), said)
    if cls == "LSTMCell":
        h = torch.zeros(2, 4)
        with raises("LSTMCell: hx must be a tuple (h, c); got a tuple of length 3"):
            ours(torch.randn(2, 3), (h, h, h))


@pytest.mark.parametrize(
    "build, exc, match",
    [
        (lambda: rnnkit.LSTM(10, 20.0), TypeError, "hidden_size should be of type int, got: float"),
        (lambda: rnnkit.LSTM(10, 0), ValueError, "hidden_size must be greater than zero"),
        (
            lambda: rnnkit.GRU(10, 20, num_layers=0),
            ValueError,
            "num_layers must be greater than zero",
        ),
        (
            lambda: rnnkit.RNN(10, 20, dropout=1.5),
            ValueError,
            "dropout should be a number in range [0, 1]",
        ),
        (
            lambda: rnnkit.LSTM(10, 20, proj_size=20),
            ValueError,
            "proj_size has to be smaller than hidden_size",
        ),
        (
            lambda: rnnkit.LSTM(10, 20, proj_size=-1),
            ValueError,
            "proj_size should be a positive integer or zero",
        ),
        (
            lambda: rnnkit.RNN(10, 20, nonlinearity="gelu"),
            ValueError,
            "Unknown nonlinearity 'gelu'",
        ),
        (lambda: rnnkit.GRU(10, 20, backend="cudnn"), ValueError, "backend must be one of"),
        (lambda: rnnkit.LSTMCell(-1, 20), ValueError, "input_size must be zero or greater"),
    ],
    ids=[
        "hidden-float",
        "hidden-zero",
        "layers-zero",
        "dropout-range",
        "proj-too-big",
        "proj-negative",
        "nonlinearity",
        "backend",
        "cell-input",
    ],
)
def test_constructor_arguments_checked_like_torch(build, exc, match):
    with pytest.raises(exc, match=re.escape(match)):
        build()


def test_dropout_on_a_single_layer_warns_like_torch():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rnnkit.LSTM(10, 20, dropout=0.5)
    assert any("num_layers greater than 1" in str(w.message) for w in caught)
