"""The reference engine: the functional cells run by ``scan.stack`` under autograd.

Readable, slow, and the standard every other engine is tested against.
"""

from collections.abc import Sequence

from torch import Tensor

from rnnkit import functional as F
from rnnkit.engines.spec import LayerSpec, Weights
from rnnkit.scan import Carry, Step, stack


def cell_step(mode: str, w: Weights) -> Step:
    """The step ``(x_t, carry) -> (y_t, carry)`` of one layer and direction."""
    w_ih, w_hh, b_ih, b_hh, w_hr = w
    if mode == "LSTM":

        def lstm_step(x: Tensor, carry: Carry) -> tuple[Tensor, Carry]:
            h, c = F.lstm_cell(x, carry[0], carry[1], w_ih, w_hh, b_ih, b_hh, w_hr)
            return h, (h, c)

        return lstm_step
    cell = {"GRU": F.gru_cell, "RNN_TANH": F.rnn_tanh_cell, "RNN_RELU": F.rnn_relu_cell}[mode]

    def step(x: Tensor, carry: Carry) -> tuple[Tensor, Carry]:
        h = cell(x, carry[0], w_ih, w_hh, b_ih, b_hh)
        return h, (h,)

    return step


def run(
    spec: LayerSpec,
    x: Tensor,
    hx: Carry,
    weights: Sequence[Weights],
    batch_sizes: Sequence[int] | None,
    training: bool,
) -> tuple[Tensor, Carry]:
    """Run a whole layer stack; see ``rnnkit.engines`` for the contract."""
    return stack(
        lambda layer, direction: cell_step(
            spec.mode, weights[layer * spec.num_directions + direction]
        ),
        x,
        hx,
        spec.num_layers,
        spec.num_directions,
        dropout=spec.dropout,
        training=training,
        batch_sizes=batch_sizes,
    )
