"""Each cell's step in torch ops, the variants as flags: the one statement of the math in Python.

The functional cells (``rnnkit.functional``, ``rnnkit.variants``) and so the reference engine,
the second-derivative path of the native and triton engines (:func:`layer`) and the torch-op
twins of the Triton kernels (``triton/twins.py``) all call these functions; the C loop and the
Triton kernels are tested against them. Differentiable any number of times, and under vmap.

A step starts from its input side ``gi`` ((bs, G*H): ``x W_ih^T`` after its layer norm where
there is one, plus ``b_ih``). The recurrent side is :func:`recurrent`. LSTM and RNN may fold
``b_hh`` into ``gi`` and pass ``b_hh=None``; GRU may not (``b_hn`` sits inside the reset gate).
``v`` holds the variants (``rnnkit.variants``): layer-norm gains and biases, the recurrent-dropout
mask; zoneout's keep ``kh`` (and LSTM's ``kc``) is a mask or eval's probability, None when off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.engines.spec import LN_EPS, StepVariants
from rnnkit.scan import scan


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, LN_EPS)


def zone(keep: Tensor | float | None, prev: Tensor, new: Tensor) -> Tensor:
    """Zoneout: ``keep * prev + (1 - keep) * new`` (``keep`` a mask where 1 keeps the previous
    value, or the probability p in eval); ``new`` itself when ``keep`` is None."""
    return new if keep is None else keep * prev + (1 - keep) * new


def recurrent(h: Tensor, w_hh: Tensor, b_hh: Tensor | None, v: StepVariants | None) -> Tensor:
    """``LN(W_hh (h * m)) + b_hh`` (bs, G*H): the recurrent side, with the recurrent-dropout
    mask ``m`` and the layer norm where ``v`` has them."""
    if v is not None and v.recurrent_mask is not None:
        # Packed input runs the first bs sequences at a step; the mask has a row per sequence.
        h = h * v.recurrent_mask[: h.shape[0]]
    if v is None or v.layer_norm is None:
        # One operator for the product and its bias (a cell's step is a dozen small operators,
        # each a few microseconds of dispatch).
        return F.linear(h, w_hh, b_hh)  # (bs, G*H)
    z = layer_norm(F.linear(h, w_hh), *v.layer_norm[2:4])
    return z if b_hh is None else z + b_hh


def lstm_gates(a: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The LSTM's gates from their pre-activations ``a`` (bs, 4H): ``i, f, g, o``."""
    i, f, g, o = a.chunk(4, dim=1)
    return torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)


def lstm_cell_state(i: Tensor, f: Tensor, g: Tensor, c: Tensor) -> Tensor:
    """``c~ = f c_{t-1} + i g``."""
    return f * c + i * g


def lstm_output(o: Tensor, cell: Tensor) -> Tensor:
    """``h~ = o tanh(cell)``, ``cell`` being ``c~`` or its layer norm."""
    return o * torch.tanh(cell)


def lstm(
    gi: Tensor,
    h: Tensor,
    c: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None = None,
    v: StepVariants | None = None,
    kh: Tensor | float | None = None,
    kc: Tensor | float | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step: ``(h_t (bs, P or H), c_t (bs, H))``.

    i, f, g, o = s(a_i), s(a_f), tanh(a_g), s(a_o)   a = gi + LN(W_hh (h * m)) + b_hh
    c~ = f c + i g,  h~ = o tanh(LN(c~)),  h~ = h~ W_hr^T (projection)
    c_t = kc c + (1 - kc) c~,  h_t = kh h + (1 - kh) h~   (zoneout)
    """
    i, f, g, o = lstm_gates(gi + recurrent(h, w_hh, b_hh, v))
    c_new = lstm_cell_state(i, f, g, c)
    ln = v is not None and v.layer_norm is not None
    h_new = lstm_output(o, layer_norm(c_new, *v.layer_norm[4:6]) if ln else c_new)
    if w_hr is not None:
        h_new = h_new @ w_hr.t()  # (bs, P)
    return zone(kh, h, h_new), zone(kc, c, c_new)


def gru(
    gi: Tensor,
    h: Tensor,
    w_hh: Tensor,
    b_hh: Tensor | None,
    v: StepVariants | None = None,
    kh: Tensor | float | None = None,
) -> Tensor:
    """One GRU step: ``h_t`` (bs, H).

    r = s(gi_r + y_r),  z = s(gi_z + y_z),  n = tanh(gi_n + r y_n)   y = LN(W_hh (h * m)) + b_hh
    h~ = (1 - z) n + z h,  h_t = kh h + (1 - kh) h~   (zoneout)
    """
    _, z, n = gru_gates(gi, recurrent(h, w_hh, b_hh, v))
    return zone(kh, h, gru_output(z, n, h))


def gru_gates(gi: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The GRU's ``r, z, n`` from the input side ``gi`` and the recurrent side ``y`` (bs, 3H)."""
    H = y.shape[1] // 3
    (g_rz, g_n), (y_rz, y_n) = gi.split((2 * H, H), dim=1), y.split((2 * H, H), dim=1)
    r, z = torch.sigmoid(g_rz + y_rz).chunk(2, dim=1)  # both gates in one pass
    return r, z, torch.tanh(torch.addcmul(g_n, r, y_n))


def gru_output(z: Tensor, n: Tensor, h: Tensor) -> Tensor:
    """``h~ = (1 - z) n + z h``, computed as ``n + z (h - n)`` (as torch.nn, the C loop and the
    Triton kernel do)."""
    return torch.addcmul(n, z, h - n)


def rnn(gi: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None, relu: bool) -> Tensor:
    """One Elman step: ``h_t = act(gi + W_hh h + b_hh)``, act tanh or ReLU."""
    return rnn_activation(gi + recurrent(h, w_hh, b_hh, None), relu)


def rnn_activation(a: Tensor, relu: bool) -> Tensor:
    return torch.relu(a) if relu else torch.tanh(a)


def layer(
    mode: str,
    reverse: bool,
    batch_sizes: Sequence[int],
    G: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None = None,
    v: StepVariants | None = None,
) -> tuple[Tensor, ...]:
    """One layer and direction from its input side ``G`` (N, G*H) on, stepped by ``scan`` over
    the packed layout: ``(out, h_n)`` or, for LSTM, ``(out, h_n, c_n)``. Training's zoneout
    masks in ``v`` are laid out like ``G``'s rows; eval's probability is every step's."""
    masks = v is not None and v.zoneout_h_mask is not None
    p = None if v is None or masks else v.zoneout_p
    lstm_mode = mode == "LSTM"

    def lstm_step(inputs, carry):
        g, kh, kc = inputs if masks else (inputs, p, p)
        h, c = lstm(g, *carry, w_hh, b_hh, w_hr, v, kh, kc)
        return h, (h, c)

    def gru_step(inputs, carry):
        g, kh = inputs if masks else (inputs, p)
        h = gru(g, carry[0], w_hh, b_hh, v, kh)
        return h, (h,)

    def rnn_step(g, carry):
        h = rnn(g, carry[0], w_hh, b_hh, mode == "RNN_RELU")
        return h, (h,)

    step = {"LSTM": lstm_step, "GRU": gru_step}.get(mode, rnn_step)
    xs = G
    if masks:
        xs = (G, v.zoneout_h_mask, v.zoneout_c_mask) if lstm_mode else (G, v.zoneout_h_mask)
    out, last = scan(step, xs, (h0, c0) if lstm_mode else (h0,), reverse, tuple(batch_sizes))
    return (out, *last)
