"""The GRU step of the triton engine, forward and backward, with layer norm and zoneout as flags;
``loop.py`` runs it. Derivations: ``engines/README.md``.

    Y = LN(W_hh h_{t-1}) + b_hh                     (LN with layer norm; Y saved as GH)
    r, z = s(A_r + Y_r), s(A_z + Y_z),   n = tanh(A_n + r Y_n)              (A: input side)
    h_t = (1 - z) n + z h_{t-1},   then zoneout: h_t = k_h h_{t-1} + (1 - k_h) h_t
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from rnnkit.engines.shared import layer_norm_param_grads
from rnnkit.engines.triton.layer import (
    Backward,
    CellGrads,
    Forward,
    LayerSettings,
    LayerTensors,
    LoopSaved,
)

GATES = 3


class Saved(NamedTuple):
    GH: Tensor  # (N, 3H): the hidden side Y, whose n part the reset gate multiplies
    Z: Tensor | None  # (N, 3H): W_hh h_{t-1} before its layer norm
    mu_h: Tensor | None  # (N, 1): that norm's statistics
    rs_h: Tensor | None


def input_bias(w: LayerTensors) -> Tensor:
    # b_hh stays on the hidden side, inside the reset gate's product.
    return w.b_ih


def forward(s: LayerSettings, w: LayerTensors, out: Tensor, h: Tensor) -> Forward:
    N = out.shape[0]
    new = out.new_empty
    kernels = s.kernels
    GH = new(N, w.w_hh.shape[0])
    ln = s.layer_norm
    Z, mu_h, rs_h = (new(N, GH.shape[1]), new(N, 1), new(N, 1)) if ln else (None, None, None)
    b_hh, zoneout = w.b_hh, s.zoneout
    p, zh = s.zoneout_p, w.zoneout_h_mask
    ln_hw, ln_hb = w.ln_hh_weight, w.ln_hh_bias

    def step(rows: slice, bs: int, g: Tensor, hs: Tensor, gh: Tensor) -> None:
        if ln:
            Z[rows] = gh
            gh, mu_h[rows], rs_h[rows] = kernels.layer_norm(gh, ln_hw, ln_hb)
        if b_hh is not None:
            gh = gh + b_hh
        GH[rows] = gh
        if zoneout:
            kernels.gru_forward_zoneout(g, gh, hs, out[rows], p if zh is None else zh[rows])
        else:
            kernels.gru_forward(g, gh, hs, out[rows])

    return Forward(step, None, Saved(GH, Z, mu_h, rs_h))


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
    G, (GH, Z, mu_h, rs_h) = loop.G, saved
    kernels = s.kernels
    ln, zoneout = s.layer_norm, s.zoneout
    p, zh = s.zoneout_p, w.zoneout_h_mask
    ln_hw = w.ln_hh_weight
    dGH = torch.empty_like(GH)
    # The gradient of the recurrent product before its layer norm.
    dZ = torch.empty_like(Z) if ln else None

    def step(rows: slice, bs: int, dht: Tensor, dg: Tensor) -> Tensor:
        dgh = dGH[rows]
        # Both write the direct part of dL/dh_{t-1} (through z, and zoneout's) into dh.
        if zoneout:
            kernels.gru_backward_zoneout(
                G[rows], GH[rows], H_prev[rows], dht, dg, dgh, dh[:bs],
                p if zh is None else zh[rows],
            )  # fmt: skip
        else:
            kernels.gru_backward(G[rows], GH[rows], H_prev[rows], dht, dg, dgh, dh[:bs])
        if not ln:
            return dgh
        d_rec = kernels.layer_norm_input_grad(dgh, Z[rows], mu_h[rows], rs_h[rows], ln_hw)
        dZ[rows] = d_rec
        return d_rec

    def finish(dG: Tensor, needs: LayerTensors) -> CellGrads:
        named = {}
        if ln:
            dw, db = layer_norm_param_grads(dGH, Z, mu_h, rs_h, ln_hw)
            named["ln_hh_weight"], named["ln_hh_bias"] = dw, db
        return CellGrads(dZ if ln else dGH, dGH, named)

    return Backward(step, True, finish)
