"""rnnkit: readable, fast, torch.nn-compatible recurrent networks."""

from rnnkit.deploy import from_torch, to_torch
from rnnkit.layers import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from rnnkit.params import ParamCount, count_parameters, param_count
from rnnkit.recurrent import Recurrent
from rnnkit.validation import RNNInputError

__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "GRUCell",
    "LSTMCell",
    "ParamCount",
    "RNNCell",
    "RNNInputError",
    "Recurrent",
    "count_parameters",
    "from_torch",
    "param_count",
    "to_torch",
]
__version__ = "0.1.0"
