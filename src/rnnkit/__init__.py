"""rnnkit: readable, fast, torch.nn-compatible recurrent networks."""

from rnnkit.deploy import from_torch, to_torch
from rnnkit.layers import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNBase, RNNCell, RNNCellBase
from rnnkit.params import ParamCount, count_parameters, param_count
from rnnkit.quantized import quantize
from rnnkit.recurrent import Recurrent
from rnnkit.validation import RNNInputError

# Training as a library (rnnkit.train), imported on first use: the training stack is the
# rnnkit[train] extra, and layer-only users should not pay for importing it.
_TRAINING = ("fit", "load", "predict", "TrainConfig")


def __getattr__(name: str):
    if name in _TRAINING:
        import rnnkit.train

        return getattr(rnnkit.train, name)
    raise AttributeError(f"module 'rnnkit' has no attribute {name!r}")


__all__ = [
    "GRU",
    "LSTM",
    "RNN",
    "GRUCell",
    "LSTMCell",
    "ParamCount",
    "RNNBase",
    "RNNCell",
    "RNNCellBase",
    "RNNInputError",
    "Recurrent",
    "TrainConfig",
    "count_parameters",
    "fit",
    "from_torch",
    "load",
    "param_count",
    "predict",
    "quantize",
    "to_torch",
]
__version__ = "0.1.0"
