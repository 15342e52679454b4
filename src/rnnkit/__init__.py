"""rnnkit: readable, fast, torch.nn-compatible recurrent networks."""

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
    "param_count",
]
__version__ = "0.1.0"
