"""What torch.nn lacks: the variants of ``rnnkit.LSTM`` and ``rnnkit.GRU``, as reference math.

All are keyword arguments of the layers, off by default (the defaults are exactly torch.nn):

- ``layer_norm=True``: layer normalisation (Ba, Kiros and Hinton 2016, "Layer Normalization", in
  the form haste uses) of the input projection ``W_ih x``, of the recurrent projection ``W_hh h``
  and, for LSTM, of the cell state before its tanh; each with a learnable gain (init 1) and bias
  (init 0). torch.nn's biases stay and are added after the norms.
- ``recurrent_dropout=p``: variational dropout (Gal and Ghahramani 2016, "A Theoretically Grounded
  Application of Dropout in Recurrent Neural Networks"): one mask per sequence and layer, scaled
  by 1/(1-p), on the h that enters ``W_hh``; training only.
- ``zoneout=p``: zoneout (Krueger et al. 2016, "Zoneout: Regularizing RNNs by Randomly Preserving
  Hidden Activations"): in training each unit of h (and c) keeps its previous value with
  probability p at each step; in eval h_t = p h_{t-1} + (1 - p) h~_t, the expectation.
- ``weight_drop=p``: DropConnect on ``W_hh`` (Merity, Keskar and Socher 2017, "Regularizing and
  Optimizing LSTM Language Models", AWD-LSTM): one mask per forward call, training only.
- ``learn_init=True``: learnable initial states ``init_h`` (and ``init_c``), used when no hx is
  given.
- ``forget_bias=x`` (LSTM): the forget-gate bias starts at x, split evenly over both biases.

The per-step equations (LSTM; GRU alike with its own gates):

    g_i = LN(W_ih x_t)            if layer_norm else W_ih x_t
    g_h = LN(W_hh (h_{t-1} * m))  m the recurrent-dropout mask (1 when off)
    i, f, g, o from g_i + b_ih + g_h + b_hh
    c~ = f * c_{t-1} + i * g
    h~ = o * tanh(LN(c~))         (LN only with layer_norm)
    c_t = k_c * c_{t-1} + (1 - k_c) * c~,   h_t = k_h * h_{t-1} + (1 - k_h) * h~   (zoneout)

The steps themselves are written once, in ``rnnkit.engines.steps``; the native and triton engines
implement them with a hand-written backward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rnnkit.engines import steps
from rnnkit.engines.spec import StepVariants


@dataclass(frozen=True)
class Variants:
    """The variant options of one layer (all off by default)."""

    layer_norm: bool = False
    recurrent_dropout: float = 0.0
    zoneout: float = 0.0
    weight_drop: float = 0.0
    learn_init: bool = False
    forget_bias: float | None = None

    @property
    def per_step(self) -> bool:
        """Whether the step itself changes (so that torch's own kernels cannot run it)."""
        return self.layer_norm or self.recurrent_dropout > 0 or self.zoneout > 0

    def check(self, name: str, mode: str, bias: bool) -> None:
        if mode not in ("LSTM", "GRU") and self != Variants():
            raise ValueError(
                f"{name}: the variants (layer_norm, zoneout, ...) are for LSTM and GRU"
            )
        for arg in ("recurrent_dropout", "zoneout", "weight_drop"):
            p = getattr(self, arg)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
                raise ValueError(f"{name}: {arg} must be a probability in [0, 1), got {p!r}")
        if self.forget_bias is not None:
            if mode != "LSTM":
                raise ValueError(f"{name}: forget_bias is an LSTM option, not {mode}")
            if not bias:
                raise ValueError(f"{name}: forget_bias needs bias=True")
            fb = self.forget_bias
            if isinstance(fb, bool) or not isinstance(fb, (int, float)) or not math.isfinite(fb):
                raise ValueError(f"{name}: forget_bias must be a finite number, got {fb!r}")
        for arg in ("layer_norm", "learn_init"):
            if not isinstance(getattr(self, arg), bool):
                got = type(getattr(self, arg)).__name__
                raise TypeError(f"{name}: {arg} should be of type bool, got: {got}")


def _input_side(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, v: StepVariants) -> Tensor:
    gi = x @ w_ih.t()
    if v.layer_norm is not None:
        gi = steps.layer_norm(gi, *v.layer_norm[:2])
    return gi if b_ih is None else gi + b_ih


def lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr, v: StepVariants, zh=None, zc=None):
    """One LSTM step with the variants of ``v`` (zoneout keeps ``zh``/``zc``); see the module."""
    return steps.lstm(_input_side(x, w_ih, b_ih, v), h, c, w_hh, b_hh, w_hr, v, zh, zc)


def gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, v: StepVariants, zh=None):
    """One GRU step with the variants of ``v``; the interpolation uses the true h_{t-1}."""
    return steps.gru(_input_side(x, w_ih, b_ih, v), h, w_hh, b_hh, v, zh)


def zoneout_mask(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """A 0/1 mask with P(1) = p (to 1/65536), drawn from torch's generator four 16-bit numbers
    per 64-bit draw: zoneout needs one per unit and step, and ``torch.rand`` is the slowest part
    of a CPU step otherwise."""
    n = 1
    for d in shape:
        n *= d
    bits = torch.randint(
        -(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=like.device
    )
    keep = bits.view(torch.int16)[:n] < round(p * 65536) - 32768
    return keep.to(like.dtype).view(shape)


def draw_step_variants(
    v: Variants,
    ln_params: list[tuple[Tensor, ...]] | None,
    rows_like: Tensor,
    batch: int,
    num_states: int,
    h_size: int,
    hidden_size: int,
    lstm: bool,
    training: bool,
) -> list[StepVariants] | None:
    """The per-step variants of every layer and direction, masks drawn once here so that every
    engine sees the same ones. ``rows_like`` is the input in the engines' layout ((T, B, *) or
    (N, *)); ``num_states`` is L * D."""
    if not v.per_step:
        return None
    out = []
    shape = rows_like.shape[:-1]
    like = {"device": rows_like.device, "dtype": rows_like.dtype}
    for k in range(num_states):
        rmask = None
        if v.recurrent_dropout > 0 and training:
            keep = 1 - v.recurrent_dropout
            rmask = torch.bernoulli(torch.full((batch, h_size), keep, **like)) / keep
        zh = zc = None
        if v.zoneout > 0 and training:
            zh = zoneout_mask((*shape, h_size), v.zoneout, rows_like)
            if lstm:
                zc = zoneout_mask((*shape, hidden_size), v.zoneout, rows_like)
        p = float(v.zoneout) if v.zoneout > 0 else None
        ln = ln_params[k] if ln_params is not None else None
        out.append(StepVariants(ln, rmask, p, zh, zc))
    return out
