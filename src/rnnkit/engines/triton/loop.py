"""The triton engine's one time loop, forward and backward, over any step definition (``lstm.py``,
``gru.py``, ``rnn.py``), and :class:`FusedLayer`, its ``autograd.Function``.

The loop owns what every cell shares: the input projections of all steps in one GEMM (and their
layer norm), the per-step recurrent GEMM (with the recurrent-dropout mask), the walk over packed
rows, and the gradients over all steps at once (``dX``, ``dW_ih``, ``dW_hh``, the biases). The
cell owns its pointwise step. Derivations: ``engines/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from torch import Tensor

from rnnkit.engines import reference, shared
from rnnkit.engines.spec import StepVariants
from rnnkit.engines.triton import gru, lstm, rnn, twins
from rnnkit.engines.triton.layer import LayerSettings, LayerTensors, LoopSaved
from rnnkit.scan import scan

CELLS: dict[str, ModuleType] = {"LSTM": lstm, "GRU": gru, "RNN_TANH": rnn, "RNN_RELU": rnn}


def _matmul_by(w: Tensor, batch: int) -> Callable[[Tensor], Tensor]:
    """``x -> x @ w.t()`` for the per-step recurrent products. On the CPU in float32 it uses
    MKL's packed GEMM, which packs ``w`` once per call instead of once per step."""
    if w.device.type == "cpu" and w.dtype == torch.float32 and _MKL_PACKED:
        w = w.contiguous()
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, batch)
        return lambda x: torch.ops.mkl._mkl_linear(x, packed, w, None, batch)
    wt = w.t()
    return lambda x: x @ wt


_MKL_PACKED = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def forward(s: LayerSettings, w: LayerTensors) -> tuple[Tensor, Tensor, Tensor | None, tuple]:
    """``(out (N, R), h_n (B, R), c_n (B, H) or None, (LoopSaved, the cell's Saved))``."""
    cell = CELLS[s.mode]
    x, h0 = w.x, w.h0
    G = x @ w.w_ih.t()  # (N, G*H)
    P = mu_i = rs_i = None
    if s.layer_norm:
        # The input side's layer norm, over all steps at once.
        P = G
        G, mu_i, rs_i = twins.layer_norm(P, w.ln_ih_weight, w.ln_ih_bias)
    if w.b_ih is not None:
        G += cell.input_bias(w)
    out = x.new_empty(x.shape[0], h0.shape[1])  # (N, R)
    # Own, contiguous copy: the kernels write the state in place, row by row.
    h = h0.clone(memory_format=torch.contiguous_format)
    step, c, saved = cell.forward(s, w, out, h)
    recurrent = _matmul_by(w.w_hh, h0.shape[0])  # h -> h @ W_hh^T
    rmask, batch_sizes, offsets = w.recurrent_mask, s.batch_sizes, shared.offsets(s.batch_sizes)
    for t in s.steps():
        bs, rows = batch_sizes[t], slice(offsets[t], offsets[t + 1])
        hs = h[:bs]
        gh = recurrent(hs if rmask is None else hs * rmask[:bs])  # (bs, G*H)
        step(rows, bs, G[rows], hs, gh)
    return out, h, c, (LoopSaved(out, G, P, mu_i, rs_i), saved)


def backward(
    s: LayerSettings,
    w: LayerTensors,
    loop: LoopSaved,
    saved: tuple,
    needs: LayerTensors,
    d_out: Tensor | None,
    d_hn: Tensor | None,
    d_cn: Tensor | None,
) -> LayerTensors:
    """The gradients of ``w``'s tensors (None where ``needs`` says none is wanted or the
    tensor is a mask) from those of ``(out, h_n, c_n)``."""
    cell = CELLS[s.mode]
    x, h0, out, G = w.x, w.h0, loop.out, loop.G
    d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
    dh = torch.zeros_like(h0) if d_hn is None else d_hn.clone(memory_format=torch.contiguous_format)
    prev, batch_row = shared.prev_rows(s.batch_sizes, s.reverse, x.device)
    H_prev = torch.cat((out, h0)).index_select(0, prev)  # (N, R)
    dG = torch.empty_like(G)
    step, accumulates, finish = cell.backward(s, w, loop, saved, H_prev, prev, dh, d_cn)
    recurrent = _matmul_by(w.w_hh.t().contiguous(), dh.shape[0])  # dg -> dg @ W_hh
    rmask, batch_sizes, offsets = w.recurrent_mask, s.batch_sizes, shared.offsets(s.batch_sizes)
    for t in s.steps(backward=True):
        bs, rows = batch_sizes[t], slice(offsets[t], offsets[t + 1])
        # The output and the next step both read h_t.
        dht = dh[:bs] + d_out[rows]
        dh_rec = recurrent(step(rows, bs, dht, dG[rows]))  # (bs, R)
        if rmask is not None:
            dh_rec *= rmask[:bs]
        if accumulates:
            dh[:bs] += dh_rec
        else:
            dh[:bs] = dh_rec
    grads = finish(dG, needs)
    dw_hh = None
    if needs.w_hh:
        rec_in = H_prev if rmask is None else H_prev * rmask.index_select(0, batch_row)
        dw_hh = grads.d_rec.t() @ rec_in  # (G*H, R)
    dP, d_ln_ih = dG, (None, None)
    if s.layer_norm:
        dP, *d_ln_ih = torch.ops.aten.native_layer_norm_backward(
            dG, loop.P, (loop.P.shape[1],), loop.mu_i, loop.rs_i, w.ln_ih_weight,
            w.ln_ih_weight, [True, True, True],
        )  # fmt: skip
    db_ih = db_hh = None
    if w.b_ih is not None:
        db_ih = dG.sum(0)
        db_hh = db_ih if grads.d_hidden is None else grads.d_hidden.sum(0)
    return LayerTensors(
        x=dP @ w.w_ih if needs.x else None,
        h0=dh,
        w_ih=dP.t() @ x if needs.w_ih else None,
        w_hh=dw_hh,
        b_ih=db_ih,
        b_hh=db_hh,
        ln_ih_weight=d_ln_ih[0],
        ln_ih_bias=d_ln_ih[1],
        **grads.named,
    )


class FusedLayer(torch.autograd.Function):
    """One layer and direction over packed-layout data: ``apply(settings, *tensors)`` with a
    :class:`LayerSettings` and the fields of a :class:`LayerTensors` in order; returns
    ``(out (N, R), h_n (B, R), c_n (B, H) or None)``. Its backward returns the gradients of
    those fields, matched by name. See ``rnnkit.variants`` for the variants' equations and
    ``engines/README.md`` for the backward pass."""

    @staticmethod
    def forward(ctx, s: LayerSettings, *tensors: Tensor | None):
        w = LayerTensors(*tensors)
        out, h, c, saved = forward(s, w)
        ctx.settings = s
        ctx.save_for_backward(*w, *(t for part in saved for t in part))
        return out, h, c

    @staticmethod
    def backward(ctx, d_out: Tensor | None, d_hn: Tensor | None, d_cn: Tensor | None):
        s = ctx.settings
        types = (LayerTensors, LoopSaved, CELLS[s.mode].Saved)
        w, loop, saved = _unflatten(ctx.saved_tensors, *types)
        # The first input is the settings; the rest are w's fields.
        needs = LayerTensors(*ctx.needs_input_grad[1:])
        if shared.needs_reference_backward(d_out, d_hn, d_cn):
            # The kernels' backward is not itself differentiable, nor batchable under vmap:
            # double backward (create_graph=True) and batched gradients (jacobian(vectorize=
            # True)) differentiate the reference steps of this layer instead; same numbers.
            grads = reference_vjp(s, w, needs, (d_out, d_hn, d_cn))
        else:
            grads = backward(s, w, loop, saved, needs, d_out, d_hn, d_cn)
        return (None, *grads)


def _unflatten(flat: Sequence, *types: type) -> list:
    """Consecutive slices of ``flat`` as the NamedTuple ``types``, by their field counts."""
    parts, start = [], 0
    for kind in types:
        end = start + len(kind._fields)
        parts.append(kind._make(flat[start:end]))
        start = end
    return parts


def reference_layer(s: LayerSettings, w: LayerTensors) -> tuple[Tensor, ...]:
    """The same layer and direction as :class:`FusedLayer`, stepped by the reference cells:
    ``(out, h_n)`` or, for LSTM, ``(out, h_n, c_n)``."""
    ln = tuple(getattr(w, name) for name in LayerTensors.LAYER_NORM)
    ln = tuple(t for t in ln if t is not None) or None
    v = None
    if ln or w.recurrent_mask is not None or s.zoneout:
        masks = (w.zoneout_h_mask, w.zoneout_c_mask)
        v = StepVariants(ln, w.recurrent_mask, s.zoneout_p, *masks)
    step = reference.cell_step(s.mode, (w.w_ih, w.w_hh, w.b_ih, w.b_hh, w.w_hr), v)
    # Training's zoneout masks are sliced per step beside x.
    masks = tuple(m for m in (w.zoneout_h_mask, w.zoneout_c_mask) if m is not None)
    xs = (w.x, *masks) if masks else w.x
    carry = (w.h0, w.c0) if s.mode == "LSTM" else (w.h0,)
    out, last = scan(step, xs, carry, s.reverse, s.batch_sizes)
    return (out, *last)


def reference_vjp(
    s: LayerSettings, w: LayerTensors, needs: LayerTensors, cotangents: tuple
) -> LayerTensors:
    """Gradients of ``w``'s tensors (None where ``needs`` is False, and for the masks)
    through :func:`reference_layer`, differentiable themselves when the caller asked for
    ``create_graph``."""
    wanted = [
        name
        for name, need, t in zip(LayerTensors._fields, needs, w, strict=True)
        if need and t is not None and name not in LayerTensors.MASKS
    ]

    def f(*diff: Tensor) -> tuple[Tensor, ...]:
        return reference_layer(s, w._replace(**dict(zip(wanted, diff, strict=True))))

    outputs, vjp = torch.func.vjp(f, *(getattr(w, name) for name in wanted))
    cots = tuple(
        torch.zeros_like(o) if g is None else g for o, g in zip(outputs, cotangents, strict=False)
    )
    return LayerTensors(**dict(zip(wanted, vjp(cots), strict=True)))
