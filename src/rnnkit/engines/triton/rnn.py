"""The Elman RNN step of the triton engine, forward and backward; ``loop.py`` runs it.

    h_t = act(A_t + W_hh h_{t-1})     act: tanh (RNN_TANH) or ReLU (RNN_RELU); A: input side

The variants (layer norm, zoneout) are LSTM and GRU options; recurrent dropout is the loop's.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from rnnkit.engines.triton.layer import (
    Backward,
    CellGrads,
    Forward,
    LayerSettings,
    LayerTensors,
    LoopSaved,
)

GATES = 1


class Saved(NamedTuple):
    """Nothing beyond the loop's: backward reads h_t from the outputs."""


def input_bias(w: LayerTensors) -> Tensor:
    return w.b_ih + w.b_hh


def forward(s: LayerSettings, w: LayerTensors, out: Tensor, h: Tensor) -> Forward:
    rnn_forward, relu = s.kernels.rnn_forward, s.mode == "RNN_RELU"

    def step(rows: slice, bs: int, g: Tensor, hs: Tensor, gh: Tensor) -> None:
        rnn_forward(g, gh, hs, out[rows], relu)

    return Forward(step, None, Saved())


def backward(
    s: LayerSettings,
    w: LayerTensors,
    loop: LoopSaved,
    saved: Saved,
    H_prev: Tensor,
    prev: Tensor,
    dh: Tensor,
    d_cn: Tensor | None,
) -> Backward:
    rnn_backward, relu, out = s.kernels.rnn_backward, s.mode == "RNN_RELU", loop.out

    def step(rows: slice, bs: int, dht: Tensor, dg: Tensor) -> Tensor:
        rnn_backward(out[rows], dht, dg, relu)
        return dg

    def finish(dG: Tensor, needs: LayerTensors) -> CellGrads:
        return CellGrads(dG, None, {})

    return Backward(step, False, finish)
