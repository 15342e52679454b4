"""The torch-op twins of the triton engine's pointwise kernels (``kernels.py``).

Same signatures, same in-place contract: the tests hold the kernels to them, and a kernel that
cannot compile or launch runs its twin instead. The forwards compute with the step functions of
``engines.steps`` (the math written once); the backwards are the derivation of
``engines/README.md`` in torch ops, which the tests hold to autograd through those step
functions. Every argument is a 2-D ``(bs, *)`` view; nothing here builds an autograd graph.

Forward functions receive the pre-activations of one step and write the new state, the output and
what backward needs. Backward functions receive ``dh``, the total gradient reaching h at this step,
and write the gradients of the pre-activations. The derivations are in ``engines/README.md``.
"""

import torch
from torch import Tensor

from rnnkit.engines import steps
from rnnkit.engines.spec import LN_EPS


def lstm_forward(
    g: Tensor, gh: Tensor, c: Tensor, c_save: Tensor, h: Tensor | None, out: Tensor
) -> None:
    """g (bs, 4H): W_ih x + b in (gates i, f, g, o), activations out; gh (bs, 4H): W_hh h,
    added to g. c (bs, H): c_{t-1} in, c_t out; c_save receives c_t. out, and h unless None,
    receive o * tanh(c_t)."""
    i, f, gg, o = steps.lstm_gates(g + gh)
    g.copy_(torch.cat((i, f, gg, o), dim=1))
    c.copy_(steps.lstm_cell_state(i, f, gg, c))
    c_save.copy_(c)
    out.copy_(steps.lstm_output(o, c))
    if h is not None:
        h.copy_(out)


def lstm_backward(g: Tensor, c: Tensor, c_prev: Tensor, dh: Tensor, dc: Tensor, dg: Tensor) -> None:
    """g (bs, 4H): saved activations; c, c_prev: c_t and c_{t-1}; dh: dL/dh_t. dc (bs, H):
    dL/dc_t from later steps in, dL/dc_{t-1} out. dg (bs, 4H) receives dL/d(pre-activations)."""
    H = c.shape[1]
    i, f, gg, o = g.split(H, dim=1)
    tc = torch.tanh(c)
    dct = dc + dh * o * (1 - tc * tc)
    dg[:, :H] = dct * gg * i * (1 - i)
    dg[:, H : 2 * H] = dct * c_prev * f * (1 - f)
    dg[:, 2 * H : 3 * H] = dct * i * (1 - gg * gg)
    dg[:, 3 * H :] = dh * tc * o * (1 - o)
    torch.mul(dct, f, out=dc)


def gru_forward(g: Tensor, gh: Tensor, h: Tensor, out: Tensor) -> None:
    """g (bs, 3H): W_ih x + b_ih in (r, z, n), activations r, z, n out. gh (bs, 3H): W_hh h +
    b_hh, left as is (backward needs its n part). h: h_{t-1} in, h_t out; out receives h_t."""
    r, z, n = steps.gru_gates(g, gh)
    g.copy_(torch.cat((r, z, n), dim=1))
    out.copy_(steps.gru_output(z, n, h))
    h.copy_(out)


def gru_backward(
    g: Tensor, gh: Tensor, h_prev: Tensor, dh: Tensor, dg: Tensor, dgh: Tensor, dh_prev: Tensor
) -> None:
    """g: saved r, z, n; gh: saved W_hh h + b_hh; dh: dL/dh_t. dg receives dL/d(W_ih x + b_ih),
    dgh dL/d(W_hh h + b_hh), dh_prev the direct part z * dh of dL/dh_{t-1}."""
    H = h_prev.shape[1]
    r, z, n = g.split(H, dim=1)
    dn = dh * (1 - z) * (1 - n * n)
    dz = dh * (h_prev - n) * z * (1 - z)
    dr = dn * gh[:, 2 * H :] * r * (1 - r)
    dg[:, :H] = dr
    dg[:, H : 2 * H] = dz
    dg[:, 2 * H :] = dn
    dgh[:, : 2 * H] = dg[:, : 2 * H]
    torch.mul(dn, r, out=dgh[:, 2 * H :])
    torch.mul(dh, z, out=dh_prev)


def rnn_forward(g: Tensor, gh: Tensor, h: Tensor, out: Tensor, relu: bool) -> None:
    """g (bs, H): W_ih x + b; gh (bs, H): W_hh h. h and out receive act(g + gh)."""
    out.copy_(steps.rnn_activation(g + gh, relu))
    h.copy_(out)


def rnn_backward(h: Tensor, dh: Tensor, dg: Tensor, relu: bool) -> None:
    """h: saved h_t; dh: dL/dh_t; dg receives dL/d(pre-activation)."""
    if relu:
        torch.where(h > 0, dh, dh.new_zeros(()), out=dg)
    else:
        torch.mul(dh, 1 - h * h, out=dg)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = LN_EPS):
    """Layer norm of each row: ``(y, mean (bs, 1), rstd (bs, 1))``."""
    return torch.native_layer_norm(x, (x.shape[1],), weight, bias, eps)


def layer_norm_input_grad(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor
) -> Tensor:
    mask = [True, False, False]
    return torch.ops.aten.native_layer_norm_backward(
        dy, x, (x.shape[1],), mean, rstd, weight, None, mask
    )[0]


def ln_lstm_forward(
    g: Tensor,
    z: Tensor,
    ln_hw: Tensor,
    ln_hb: Tensor,
    mu_h: Tensor,
    rs_h: Tensor,
    c: Tensor,
    c_save: Tensor,
    cn_save: Tensor,
    mu_c: Tensor,
    rs_c: Tensor,
    ln_cw: Tensor,
    ln_cb: Tensor,
    out: Tensor,
    eps: float,
) -> None:
    """The layer-norm LSTM step (``rnnkit.variants``). g (bs, 4H): input side in, activations
    out; z (bs, 4H): W_hh h before its norm; mu_h, rs_h (bs, 1) receive that norm's statistics.
    c: c_{t-1} in, c_t out, also into c_save; cn_save receives LN(c_t) and mu_c, rs_c its
    statistics; out receives o * tanh(LN(c_t))."""
    zn, mu_h[:], rs_h[:] = layer_norm(z, ln_hw, ln_hb, eps)
    i, f, gg, o = steps.lstm_gates(g + zn)
    g.copy_(torch.cat((i, f, gg, o), dim=1))
    c.copy_(steps.lstm_cell_state(i, f, gg, c))
    c_save.copy_(c)
    cn, mu_c[:], rs_c[:] = layer_norm(c, ln_cw, ln_cb, eps)
    cn_save.copy_(cn)
    out.copy_(steps.lstm_output(o, cn))


def ln_lstm_backward(
    g: Tensor,
    c: Tensor,
    c_prev: Tensor,
    cn: Tensor,
    mu_c: Tensor,
    rs_c: Tensor,
    ln_cw: Tensor,
    z: Tensor,
    mu_h: Tensor,
    rs_h: Tensor,
    ln_hw: Tensor,
    dh: Tensor,
    dc: Tensor,
    dg: Tensor,
    dcn: Tensor,
    dz: Tensor,
) -> None:
    """Backward of :func:`ln_lstm_forward`: dc in/out as in :func:`lstm_backward`; dg receives
    the gradient of the gates' pre-activations, dcn that of LN(c_t), dz that of z."""
    H = c.shape[1]
    i, f, gg, o = g.split(H, dim=1)
    tc = torch.tanh(cn)
    dcn.copy_(dh * o * (1 - tc * tc))
    dct = dc + layer_norm_input_grad(dcn, c, mu_c, rs_c, ln_cw)
    dg[:, :H] = dct * gg * i * (1 - i)
    dg[:, H : 2 * H] = dct * c_prev * f * (1 - f)
    dg[:, 2 * H : 3 * H] = dct * i * (1 - gg * gg)
    dg[:, 3 * H :] = dh * tc * o * (1 - o)
    torch.mul(dct, f, out=dc)
    dz.copy_(layer_norm_input_grad(dg, z, mu_h, rs_h, ln_hw))


def lstm_forward_zoneout(
    g: Tensor,
    gh: Tensor,
    c: Tensor,
    c_save: Tensor,
    cz_save: Tensor,
    h: Tensor,
    out: Tensor,
    zh: Tensor | float,
    zc: Tensor | float,
) -> None:
    """:func:`lstm_forward` with zoneout: c_save receives c~ (the cell's own new value), c and
    cz_save the zoned c_t = zc * c_{t-1} + (1 - zc) * c~, h and out the zoned h_t (zh and zc:
    masks where 1 keeps the previous value, or the probability p in eval)."""
    c_prev, h_prev = c.clone(), h.clone()
    lstm_forward(g, gh, c, c_save, None, out)
    c.copy_(steps.zone(zc, c_prev, c))
    cz_save.copy_(c)
    out.copy_(steps.zone(zh, h_prev, out))
    h.copy_(out)


def lstm_backward_zoneout(
    g: Tensor,
    c: Tensor,
    c_prev: Tensor,
    dh: Tensor,
    dc: Tensor,
    dg: Tensor,
    dh_carry: Tensor,
    zh: Tensor | float,
    zc: Tensor | float,
) -> None:
    """Backward of :func:`lstm_forward_zoneout`: c is c~, c_prev the zoned c_{t-1}; dc in/out;
    dh_carry receives the part of dL/dh_{t-1} that zoneout carries past the cell (zh * dh)."""
    carry_c = dc * zc
    dc -= carry_c
    torch.mul(dh, zh, out=dh_carry)
    lstm_backward(g, c, c_prev, dh - dh_carry, dc, dg)
    dc += carry_c


def gru_forward_zoneout(g: Tensor, gh: Tensor, h: Tensor, out: Tensor, zh: Tensor | float) -> None:
    """:func:`gru_forward` with zoneout on h."""
    h_prev = h.clone()
    gru_forward(g, gh, h, out)
    out.copy_(steps.zone(zh, h_prev, out))
    h.copy_(out)


def gru_backward_zoneout(
    g: Tensor,
    gh: Tensor,
    h_prev: Tensor,
    dh: Tensor,
    dg: Tensor,
    dgh: Tensor,
    dh_prev: Tensor,
    zh: Tensor | float,
) -> None:
    """Backward of :func:`gru_forward_zoneout`; dh_prev receives the direct part of dL/dh_{t-1},
    through the interpolation and through zoneout."""
    carry = dh * zh
    gru_backward(g, gh, h_prev, dh - carry, dg, dgh, dh_prev)
    dh_prev += carry
