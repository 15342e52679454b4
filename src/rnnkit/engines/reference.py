"""The reference engine: the functional cells run by ``scan.stack`` under autograd.

Readable, slow, and the standard every other engine is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from rnnkit import functional as F
from rnnkit import variants as V
from rnnkit.engines.spec import LayerSpec, StepVariants, Weights
from rnnkit.scan import Carry, Step, stack


def cell_step(mode: str, w: Weights, v: StepVariants | None = None) -> Step:
    """The step ``(x_t, carry) -> (y_t, carry)`` of one layer and direction. With per-step
    zoneout masks the step's input is ``(x_t, zh_t[, zc_t])``."""
    if v is not None:
        return _variant_step(mode, w, v)
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


def _variant_step(mode: str, w: Weights, v: StepVariants) -> Step:
    # Training's zoneout masks arrive per step beside x; eval's p is the same at every step.
    masks = v.zoneout_h_mask is not None
    zh = zc = v.zoneout_p
    if mode == "LSTM":

        def lstm_step(inputs, carry: Carry) -> tuple[Tensor, Carry]:
            x, kh, kc = inputs if masks else (inputs, zh, zc)
            h, c = V.lstm_cell(x, carry[0], carry[1], *w, v, kh, kc)
            return h, (h, c)

        return lstm_step
    w_ih, w_hh, b_ih, b_hh, _ = w

    def gru_step(inputs, carry: Carry) -> tuple[Tensor, Carry]:
        x, kh = inputs if masks else (inputs, zh)
        h = V.gru_cell(x, carry[0], w_ih, w_hh, b_ih, b_hh, v, kh)
        return h, (h,)

    return gru_step


def run(
    spec: LayerSpec,
    x: Tensor,
    hx: Carry,
    weights: Sequence[Weights],
    batch_sizes: Sequence[int] | None,
    training: bool,
    variants: Sequence[StepVariants] | None = None,
) -> tuple[Tensor, Carry]:
    """Run a whole layer stack; see ``rnnkit.engines`` for the contract."""
    D = spec.num_directions

    def step_for(layer: int, direction: int) -> Step:
        k = layer * D + direction
        return cell_step(spec.mode, weights[k], None if variants is None else variants[k])

    extras_for = None
    if variants is not None and variants[0].zoneout_h_mask is not None:

        def extras_for(layer: int, direction: int) -> tuple[Tensor, ...]:
            v = variants[layer * D + direction]
            return tuple(m for m in (v.zoneout_h_mask, v.zoneout_c_mask) if m is not None)

    return stack(
        step_for,
        x,
        hx,
        spec.num_layers,
        D,
        dropout=spec.dropout,
        training=training,
        batch_sizes=batch_sizes,
        extras_for=extras_for,
    )
