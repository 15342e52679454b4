"""What every engine receives: the static description of a layer stack and its weights."""

from dataclasses import dataclass

from torch import Tensor

# (w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction; absent tensors are None.
Weights = tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]

MODES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")


@dataclass(frozen=True)
class LayerSpec:
    mode: str
    input_size: int
    hidden_size: int
    num_layers: int
    num_directions: int
    bias: bool
    dropout: float
    proj_size: int

    @property
    def gates(self) -> int:
        return {"LSTM": 4, "GRU": 3}.get(self.mode, 1)

    @property
    def out_size(self) -> int:
        """Features of the hidden state h of one direction."""
        return self.proj_size or self.hidden_size
