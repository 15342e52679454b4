"""The LSTM step of the triton engine, forward and backward, with layer norm, zoneout and a
projection as flags; ``loop.py`` runs it. Derivations: ``engines/README.md``.

    i, f, g, o = s(a_i), s(a_f), tanh(a_g), s(a_o)   a = A_t + LN(W_hh h_{t-1})  (A: input side)
    c~ = f c_{t-1} + i g                              h~ = o tanh(LN(c~))  (LN with layer norm)
    h_t = h~ W_hr^T  (projection),   then zoneout:   c_t = k_c c_{t-1} + (1 - k_c) c~,
                                                      h_t = k_h h_{t-1} + (1 - k_h) h_t
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rnnkit.engines.shared import layer_norm_param_grads
from rnnkit.engines.spec import LN_EPS
from rnnkit.engines.triton.layer import (
    Backward,
    CellGrads,
    Forward,
    LayerSettings,
    LayerTensors,
    LoopSaved,
)

GATES = 4


class Saved(NamedTuple):
    C: Tensor  # (N, H): c~, the cell's own new value (before zoneout)
    CZ: Tensor | None  # (N, H): c_t after zoneout, the next step's c_{t-1}
    Z: Tensor | None  # (N, 4H): W_hh h_{t-1} before its layer norm
    mu_h: Tensor | None  # (N, 1): that norm's statistics
    rs_h: Tensor | None
    CN: Tensor | None  # (N, H): LN(c~)
    mu_c: Tensor | None  # (N, 1)
    rs_c: Tensor | None


def input_bias(w: LayerTensors) -> Tensor:
    return w.b_ih + w.b_hh


def _zoneout_in_kernel(s: LayerSettings) -> bool:
    # The zoneout kernels cover the plain step; around the layer-norm step or a projection the
    # host applies zoneout with torch ops.
    return s.zoneout and not (s.layer_norm or s.projected)


def forward(s: LayerSettings, w: LayerTensors, out: Tensor, h: Tensor) -> Forward:
    N, H = out.shape[0], w.w_hh.shape[0] // GATES
    new = out.new_empty
    kernels = s.kernels
    # Own, contiguous copy: the kernels write the state in place, row by row.
    c = w.c0.clone(memory_format=torch.contiguous_format)
    C = new(N, H)
    CZ = new(N, H) if s.zoneout else None
    R = new(N, H) if s.projected else None  # o * tanh(c) before the projection
    ln = s.layer_norm
    Z = mu_h = rs_h = CN = mu_c = rs_c = None
    if ln:
        Z, CN = new(N, GATES * H), new(N, H)
        mu_h, rs_h, mu_c, rs_c = new(N, 1), new(N, 1), new(N, 1), new(N, 1)
    in_kernel = _zoneout_in_kernel(s)
    on_host = s.zoneout and not in_kernel
    # The plain kernels write h themselves; otherwise h is copied from out after the step.
    copies_h = on_host or ln or s.projected
    w_hr_t = None if w.w_hr is None else w.w_hr.t()
    p, zh, zc = s.zoneout_p, w.zoneout_h_mask, w.zoneout_c_mask
    ln_hw, ln_hb, ln_cw, ln_cb = w.ln_hh_weight, w.ln_hh_bias, w.ln_c_weight, w.ln_c_bias

    def step(rows: slice, bs: int, g: Tensor, hs: Tensor, gh: Tensor) -> None:
        cs = c[:bs]
        c_prev = cs.clone() if on_host else None
        target = out[rows] if R is None else R[rows]
        if ln:
            z = Z[rows]
            z.copy_(gh)
            kernels.ln_lstm_forward(
                g, z, ln_hw, ln_hb, mu_h[rows], rs_h[rows], cs, C[rows], CN[rows], mu_c[rows],
                rs_c[rows], ln_cw, ln_cb, target, LN_EPS,
            )  # fmt: skip
        elif in_kernel:
            kh, kc = (p, p) if zh is None else (zh[rows], zc[rows])
            kernels.lstm_forward_zoneout(g, gh, cs, C[rows], CZ[rows], hs, target, kh, kc)
        else:
            kernels.lstm_forward(g, gh, cs, C[rows], None if copies_h else hs, target)
        if R is not None:
            torch.mm(target, w_hr_t, out=out[rows])
        if on_host:
            # keep * previous + (1 - keep) * new; the kernels above left hs, h_{t-1}, alone.
            cs.lerp_(c_prev, p if zc is None else zc[rows])
            CZ[rows] = cs
            out[rows].lerp_(hs, p if zh is None else zh[rows])
        if copies_h:
            hs.copy_(out[rows])

    return Forward(step, c, Saved(C, CZ, Z, mu_h, rs_h, CN, mu_c, rs_c))


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
    G, H = loop.G, saved.C.shape[1]
    C, Z, CN = saved.C, saved.Z, saved.CN
    mu_h, rs_h, mu_c, rs_c = saved.mu_h, saved.rs_h, saved.mu_c, saved.rs_c
    kernels = s.kernels
    ln = s.layer_norm
    contiguous = torch.contiguous_format
    dc = torch.zeros_like(w.c0) if d_cn is None else d_cn.clone(memory_format=contiguous)
    # c_{t-1} of every row: the zoned c where zoneout ran, else c~ itself.
    C_prev = torch.cat((saved.CZ if s.zoneout else C, w.c0)).index_select(0, prev)  # (N, H)
    R = dH = None
    if s.projected:
        R = G[:, 3 * H :] * torch.tanh(CN if ln else C)  # (N, H), recomputed
        dH = torch.empty_like(loop.out)  # (N, P)
    dZ = torch.empty_like(Z) if ln else None
    dCN = torch.empty_like(CN) if ln else None
    in_kernel = _zoneout_in_kernel(s)
    on_host = s.zoneout and not in_kernel
    p, zh, zc = s.zoneout_p, w.zoneout_h_mask, w.zoneout_c_mask
    w_hr, ln_hw, ln_cw = w.w_hr, w.ln_hh_weight, w.ln_c_weight

    def step(rows: slice, bs: int, dht: Tensor, dg: Tensor) -> Tensor:
        dcs = dc[:bs]
        carry_c = None
        if on_host:
            # Zoneout's carried share of dL/dh_{t-1} goes straight to dh; the loop adds on.
            carry_h = torch.mul(dht, p if zh is None else zh[rows], out=dh[:bs])
            dht = dht - carry_h
            carry_c = dcs * (p if zc is None else zc[rows])
            dcs -= carry_c
        if dH is not None:
            dH[rows] = dht
            dht = dht @ w_hr  # (bs, H)
        if ln:
            d_rec = dZ[rows]
            kernels.ln_lstm_backward(
                G[rows], C[rows], C_prev[rows], CN[rows], mu_c[rows], rs_c[rows], ln_cw, Z[rows],
                mu_h[rows], rs_h[rows], ln_hw, dht, dcs, dg, dCN[rows], d_rec,
            )  # fmt: skip
        elif in_kernel:
            kh, kc = (p, p) if zh is None else (zh[rows], zc[rows])
            # Writes zoneout's carried share of dL/dh_{t-1} into dh; the loop adds on.
            kernels.lstm_backward_zoneout(
                G[rows], C[rows], C_prev[rows], dht, dcs, dg, dh[:bs], kh, kc
            )
            d_rec = dg
        else:
            kernels.lstm_backward(G[rows], C[rows], C_prev[rows], dht, dcs, dg)
            d_rec = dg
        if carry_c is not None:
            dcs += carry_c
        return d_rec

    def finish(dG: Tensor, needs: LayerTensors) -> CellGrads:
        named = {"c0": dc}
        if R is not None and needs.w_hr:
            named["w_hr"] = dH.t() @ R  # (P, H)
        if ln:
            # The gates read LN(Z) + the rest: dG is also the gradient of LN(Z)'s output.
            dw, db = layer_norm_param_grads(dG, Z, mu_h, rs_h, ln_hw)
            named["ln_hh_weight"], named["ln_hh_bias"] = dw, db
            dw, db = layer_norm_param_grads(dCN, C, mu_c, rs_c, ln_cw)
            named["ln_c_weight"], named["ln_c_bias"] = dw, db
        return CellGrads(dZ if ln else dG, None, named)

    return Backward(step, s.zoneout, finish)
