"""What every engine receives: the static description of a layer stack and its weights."""

from dataclasses import dataclass, replace

import torch
from torch import Tensor

# (w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction; absent tensors are None.
Weights = tuple[Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]

MODES = ("RNN_TANH", "RNN_RELU", "LSTM", "GRU")

# The epsilon of every layer norm in rnnkit (torch.nn.LayerNorm's default).
LN_EPS = 1e-5


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


@dataclass(frozen=True)
class StepVariants:
    """The per-step variants of one layer and direction (see ``rnnkit.variants``).

    Masks are drawn by the layer before it picks an engine, so that every engine sees the same.
    """

    # Layer-norm gains and biases: (g_ih, b_ih, g_hh, b_hh) and, for LSTM, (g_c, b_c).
    layer_norm: tuple[Tensor, ...] | None = None
    # (B, R): the already scaled dropout mask on h where it enters W_hh.
    recurrent_mask: Tensor | None = None
    # Zoneout's probability p; None when zoneout is off. Eval uses p itself, the expectation:
    # h_t = p h_{t-1} + (1 - p) h~_t, and c alike.
    zoneout_p: float | None = None
    # Training draws zoneout's masks instead (1 keeps the previous value), laid out like the
    # input rows ((T, B, *) padded or (N, *) packed): h's, and for LSTM c's.
    zoneout_h_mask: Tensor | None = None
    zoneout_c_mask: Tensor | None = None

    def to(self, dtype: torch.dtype) -> "StepVariants":
        """The same variants with every tensor in ``dtype`` (differentiably)."""

        def cast(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dtype)

        ln = None if self.layer_norm is None else tuple(t.to(dtype) for t in self.layer_norm)
        masks = (self.recurrent_mask, self.zoneout_h_mask, self.zoneout_c_mask)
        rmask, zh, zc = (cast(m) for m in masks)
        return replace(
            self, layer_norm=ln, recurrent_mask=rmask, zoneout_h_mask=zh, zoneout_c_mask=zc
        )
