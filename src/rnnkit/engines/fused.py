"""The fused engine: one ``autograd.Function`` per layer and direction with a hand-written BPTT.

Forward: the input projections of all steps in one GEMM; per step one recurrent GEMM and one
pointwise kernel that saves only what backward needs. Backward walks time in reverse with one
recurrent GEMM and one pointwise kernel per step; the weight gradients and the input gradient are
each one GEMM over all steps. Variable lengths run as per-step batch sizes: sequences are sorted
by decreasing length (as in ``PackedSequence``), so step t touches rows ``[:batch_sizes[t]]`` of
the state and a finished sequence keeps its state, which is its ``h_n``. Derivations:
``engines/README.md``. What runs (kernels, native loop, persistent kernel) is decided by
``engines.plan``; :func:`pointwise_kernels`, :func:`native_applies` and
:func:`persistent_applies` answer its questions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from rnnkit.engines import pointwise, reference
from rnnkit.engines.spec import LN_EPS, LayerSpec, StepVariants, Weights
from rnnkit.scan import Carry, scan


def pointwise_kernels(device: torch.device, dtype: torch.dtype) -> ModuleType:
    """Compiled kernels for this device and dtype where they exist, else the torch-op twins."""
    if device.type == "cpu":
        from rnnkit.engines import cpu

        if cpu.available(dtype):
            return cpu
    elif device.type == "cuda":
        from rnnkit.engines import triton_kernels

        if triton_kernels.available(dtype, device):
            return triton_kernels
    return pointwise


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


def _offsets(batch_sizes: Sequence[int]) -> list[int]:
    offsets = [0]
    for bs in batch_sizes:
        offsets.append(offsets[-1] + bs)
    return offsets


def _prev_rows(
    batch_sizes: Sequence[int], reverse: bool, device: torch.device
) -> tuple[Tensor, Tensor]:
    """For every row of the packed data, the row of ``cat(out, h0)`` that held its h_{t-1},
    and the sequence (batch row) it belongs to."""
    # Sizes from the host list, not from the tensor: no device sync, and a static shape for
    # torch.compile.
    bs = torch.tensor(batch_sizes, device=device)
    T, N = len(batch_sizes), sum(batch_sizes)
    off = torch.cumsum(bs, 0) - bs  # (T,)
    t = torch.repeat_interleave(torch.arange(T, device=device), bs, output_size=N)  # (N,)
    b = torch.arange(N, device=device) - off[t]
    step = 1 if reverse else -1
    src = t + step
    inside = (src >= 0) & (src < T)
    src = src.clamp(0, T - 1)
    valid = inside & (b < bs[src])
    return torch.where(valid, off[src] + b, N + b), b


def _layer_norm_param_grads(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor):
    """Gain and bias gradients of a layer norm over all rows at once."""
    mask = [False, True, True]
    _, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy, x, (x.shape[1],), mean, rstd, weight, weight, mask
    )
    return dw, db


def _zone(keep: Tensor | float, rows: slice) -> Tensor | float:
    return keep if isinstance(keep, float) else keep[rows]


def _zoneout_in_kernel(kernels: ModuleType, mode: str, ln: bool, projected: bool) -> bool:
    """Whether the kernels apply zoneout themselves (else the host does, with torch ops)."""
    if mode == "LSTM":
        return hasattr(kernels, "lstm_forward_zoneout") and not ln and not projected
    return mode == "GRU" and hasattr(kernels, "gru_forward_zoneout")


@dataclass(frozen=True)
class _Plan:
    """How one layer's steps run; decided once in forward, reused by backward."""

    lstm: bool
    gru: bool
    relu: bool
    ln: bool
    ln_kernels: ModuleType  # the layer-norm LSTM kernels (the torch-op twins when absent)
    zoneout: bool
    zoneout_in_kernel: bool  # else the host applies zoneout with torch ops

    @staticmethod
    def make(mode, kernels, ln: bool, zoneout: bool, projected: bool) -> _Plan:
        in_kernel = zoneout and _zoneout_in_kernel(kernels, mode, ln, projected)
        ln_kernels = kernels if hasattr(kernels, "ln_lstm_forward") else pointwise
        lstm, gru, relu = mode == "LSTM", mode == "GRU", mode == "RNN_RELU"
        return _Plan(lstm, gru, relu, ln, ln_kernels, zoneout, in_kernel)

    @property
    def host_zoneout(self) -> bool:
        return self.zoneout and not self.zoneout_in_kernel


class FusedLayer(torch.autograd.Function):
    """One layer and direction over packed-layout data ``x`` (N, I) with ``batch_sizes``.

    ``ln`` holds the layer-norm gains and biases (input side, hidden side, and for LSTM the cell),
    ``rmask`` the recurrent-dropout mask (B, R), ``zh``/``zc`` the zoneout masks (N, *) or, in
    eval, the zoneout probability (given through ``zoneout_p``). All optional; see
    ``rnnkit.variants`` for the equations and ``engines/README.md`` for the backward pass.
    """

    @staticmethod
    def forward(
        ctx,
        mode: str,
        reverse: bool,
        batch_sizes: tuple[int, ...],
        kernels: ModuleType,
        zoneout_p: float | None,
        x: Tensor,
        h0: Tensor,
        c0: Tensor | None,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Tensor | None,
        b_hh: Tensor | None,
        w_hr: Tensor | None,
        ln_ih_w: Tensor | None = None,
        ln_ih_b: Tensor | None = None,
        ln_hh_w: Tensor | None = None,
        ln_hh_b: Tensor | None = None,
        ln_c_w: Tensor | None = None,
        ln_c_b: Tensor | None = None,
        rmask: Tensor | None = None,
        zh: Tensor | None = None,
        zc: Tensor | None = None,
    ):
        N, H = x.shape[0], w_hh.shape[0] // {"LSTM": 4, "GRU": 3}.get(mode, 1)
        keep_h = zh if zh is not None else zoneout_p
        keep_c = zc if zc is not None else zoneout_p
        plan = _Plan.make(mode, kernels, ln_ih_w is not None, keep_h is not None, w_hr is not None)
        lstm, gru, relu, ln = plan.lstm, plan.gru, plan.relu, plan.ln
        zoneout, zk, host_zoneout = plan.zoneout, plan.zoneout_in_kernel, plan.host_zoneout
        offsets = _offsets(batch_sizes)
        steps = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
        G = x @ w_ih.t()  # (N, G*H)
        P = mu_i = rs_i = None
        if ln:
            P = G
            G, mu_i, rs_i = pointwise.layer_norm(P, ln_ih_w, ln_ih_b)
        if b_ih is not None:
            G += b_ih if gru else b_ih + b_hh
        out = x.new_empty(N, h0.shape[1])
        # Own, contiguous copies: the kernels write the state in place, row by row.
        h = h0.clone(memory_format=torch.contiguous_format)
        c = c0.clone(memory_format=torch.contiguous_format) if lstm else None
        C = x.new_empty(N, H) if lstm else None
        CZ = x.new_empty(N, H) if lstm and zoneout else None
        GH = x.new_empty(N, 3 * H) if gru else None
        R = x.new_empty(N, H) if w_hr is not None else None
        GHraw = x.new_empty(N, G.shape[1]) if ln else None
        mu_h, rs_h = (x.new_empty(N, 1), x.new_empty(N, 1)) if ln else (None, None)
        CN = x.new_empty(N, H) if ln and lstm else None
        mu_c, rs_c = (x.new_empty(N, 1), x.new_empty(N, 1)) if ln and lstm else (None, None)
        recurrent = _matmul_by(w_hh, h0.shape[0])  # h -> h @ W_hh^T
        for t in steps:
            bs, rows = batch_sizes[t], slice(offsets[t], offsets[t + 1])
            g, hs = G[rows], h[:bs]
            # The LSTM kernel leaves hs alone under zoneout; the others overwrite it.
            h_prev = (hs if lstm else hs.clone()) if host_zoneout else None
            c_prev = c[:bs].clone() if host_zoneout and lstm else None
            gh = recurrent(hs if rmask is None else hs * rmask[:bs])  # (bs, G*H)
            if ln:
                GHraw[rows] = gh
                if not lstm:
                    layer_norm = getattr(kernels, "layer_norm", pointwise.layer_norm)
                    gh, mu_h[rows], rs_h[rows] = layer_norm(gh, ln_hh_w, ln_hh_b)
            if lstm:
                target = out[rows] if w_hr is None else R[rows]
                if ln:
                    plan.ln_kernels.ln_lstm_forward(
                        g, GHraw[rows], ln_hh_w, ln_hh_b, mu_h[rows], rs_h[rows], c[:bs],
                        C[rows], CN[rows], mu_c[rows], rs_c[rows], ln_c_w, ln_c_b, target,
                        LN_EPS,
                    )  # fmt: skip
                elif zk:
                    kh, kc = _zone(keep_h, rows), _zone(keep_c, rows)
                    kernels.lstm_forward_zoneout(
                        g, gh, c[:bs], C[rows], CZ[rows], hs, target, kh, kc
                    )
                else:
                    direct = hs if w_hr is None and not zoneout else None
                    kernels.lstm_forward(g, gh, c[:bs], C[rows], direct, target)
                if w_hr is not None:
                    torch.mm(R[rows], w_hr.t(), out=out[rows])
                if host_zoneout:
                    c[:bs].lerp_(c_prev, _zone(keep_c, rows))  # keep * c_prev + (1 - keep) * c~
                    CZ[rows] = c[:bs]
            elif gru:
                if b_hh is not None:
                    gh = gh + b_hh
                GH[rows] = gh
                if zk:
                    kernels.gru_forward_zoneout(g, gh, hs, out[rows], _zone(keep_h, rows))
                else:
                    kernels.gru_forward(g, gh, hs, out[rows])
            else:
                kernels.rnn_forward(g, gh, hs, out[rows], relu)
            if host_zoneout:
                out[rows].lerp_(h_prev, _zone(keep_h, rows))
            if host_zoneout or (lstm and (ln or w_hr is not None)):
                hs.copy_(out[rows])
        ctx.mode, ctx.reverse, ctx.batch_sizes, ctx.kernels = mode, reverse, batch_sizes, kernels
        ctx.has_bias, ctx.zoneout_p, ctx.plan = b_ih is not None, zoneout_p, plan
        ctx.save_for_backward(
            x, h0, c0, w_ih, w_hh, w_hr, G, out, C, GH, CZ, P, mu_i, rs_i, GHraw, mu_h, rs_h,
            CN, mu_c, rs_c, ln_ih_w, ln_hh_w, ln_c_w, rmask, zh, zc,
            b_ih, b_hh, ln_ih_b, ln_hh_b, ln_c_b,
        )  # fmt: skip
        ctx.mark_non_differentiable()
        return out, h, c

    @staticmethod
    def backward(ctx, d_out: Tensor | None, d_hn: Tensor | None, d_cn: Tensor | None):
        (
            x, h0, c0, w_ih, w_hh, w_hr, G, out, C, GH, CZ, P, mu_i, rs_i, GHraw, mu_h, rs_h,
            CN, mu_c, rs_c, ln_ih_w, ln_hh_w, ln_c_w, rmask, zh, zc,
            b_ih, b_hh, ln_ih_b, ln_hh_b, ln_c_b,
        ) = ctx.saved_tensors  # fmt: skip
        if needs_reference_backward(d_out, d_hn, d_cn):
            # The kernels' backward is not itself differentiable, nor batchable under vmap:
            # double backward (create_graph=True) and batched gradients (jacobian(vectorize=
            # True)) differentiate the reference steps of this layer instead; same numbers.
            layer = (
                x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b,
            )  # fmt: skip
            where = (ctx.mode, ctx.reverse, ctx.batch_sizes, ctx.zoneout_p)
            needs = ctx.needs_input_grad[5 : 5 + len(layer)]
            grads = vjp_by_reference(where, needs, layer, rmask, zh, zc, (d_out, d_hn, d_cn))
            return (None,) * 5 + grads + (None,) * 3
        mode, reverse, batch_sizes, kernels = ctx.mode, ctx.reverse, ctx.batch_sizes, ctx.kernels
        plan = ctx.plan
        lstm, gru, relu, ln = plan.lstm, plan.gru, plan.relu, plan.ln
        zoneout, zk, host_zoneout = plan.zoneout, plan.zoneout_in_kernel, plan.host_zoneout
        keep_h = zh if zh is not None else ctx.zoneout_p
        keep_c = zc if zc is not None else ctx.zoneout_p
        H = G.shape[1] // {"LSTM": 4, "GRU": 3}.get(mode, 1)
        offsets = _offsets(batch_sizes)
        steps = range(len(batch_sizes)) if reverse else range(len(batch_sizes) - 1, -1, -1)
        d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
        dh = torch.zeros_like(h0) if d_hn is None else d_hn.clone(memory_format=_CONTIGUOUS)
        dc = None
        prev, batch_row = _prev_rows(batch_sizes, reverse, x.device)
        H_prev = torch.cat((out, h0)).index_select(0, prev)  # (N, R)
        dG = torch.empty_like(G)
        dGH = torch.empty_like(GH) if gru else None
        # Gradient of the recurrent product before its layer norm, when there is one.
        dZ = torch.empty_like(GHraw) if ln else None
        dCN = torch.empty_like(CN) if CN is not None else None
        if lstm:
            dc = torch.zeros_like(c0) if d_cn is None else d_cn.clone(memory_format=_CONTIGUOUS)
            C_prev = torch.cat((CZ if zoneout else C, c0)).index_select(0, prev)  # (N, H)
            if w_hr is not None:
                # o * tanh(c) (or of the normalised c), before the projection.
                R = G[:, 3 * H :] * torch.tanh(CN if ln else C)  # (N, H)
                dH = torch.empty_like(out)  # (N, P)
        recurrent = _matmul_by(w_hh.t().contiguous(), dh.shape[0])  # dg -> dg @ W_hh
        for t in steps:
            bs, rows = batch_sizes[t], slice(offsets[t], offsets[t + 1])
            dht = dh[:bs] + d_out[rows]
            carry_h = None
            if host_zoneout:
                carry_h = dht * _zone(keep_h, rows)
                dht = dht - carry_h
            if lstm:
                carry_c = None
                if host_zoneout:
                    carry_c = dc[:bs] * _zone(keep_c, rows)
                    dc[:bs] -= carry_c
                if w_hr is not None:
                    dH[rows] = dht
                    dht = dht @ w_hr  # (bs, H)
                if ln:
                    plan.ln_kernels.ln_lstm_backward(
                        G[rows], C[rows], C_prev[rows], CN[rows], mu_c[rows], rs_c[rows],
                        ln_c_w, GHraw[rows], mu_h[rows], rs_h[rows], ln_hh_w, dht, dc[:bs],
                        dG[rows], dCN[rows], dZ[rows],
                    )  # fmt: skip
                elif zk:
                    # Writes zoneout's carried share of dL/dh_{t-1} into dh; the GEMM adds on.
                    kernels.lstm_backward_zoneout(
                        G[rows], C[rows], C_prev[rows], dht, dc[:bs], dG[rows], dh[:bs],
                        _zone(keep_h, rows), _zone(keep_c, rows),
                    )  # fmt: skip
                else:
                    kernels.lstm_backward(G[rows], C[rows], C_prev[rows], dht, dc[:bs], dG[rows])
                if carry_c is not None:
                    dc[:bs] += carry_c
                d_rec = dG[rows]
            elif gru:
                if zk:
                    kernels.gru_backward_zoneout(
                        G[rows], GH[rows], H_prev[rows], dht, dG[rows], dGH[rows], dh[:bs],
                        _zone(keep_h, rows),
                    )  # fmt: skip
                else:
                    kernels.gru_backward(
                        G[rows], GH[rows], H_prev[rows], dht, dG[rows], dGH[rows], dh[:bs]
                    )
                d_rec = dGH[rows]
            else:
                kernels.rnn_backward(out[rows], dht, dG[rows], relu)
                d_rec = dG[rows]
            if ln:
                if lstm:
                    d_rec = dZ[rows]
                else:
                    input_grad = getattr(
                        kernels, "layer_norm_input_grad", pointwise.layer_norm_input_grad
                    )
                    d_rec = input_grad(d_rec, GHraw[rows], mu_h[rows], rs_h[rows], ln_hh_w)
                    dZ[rows] = d_rec
            dh_rec = recurrent(d_rec)
            if rmask is not None:
                dh_rec *= rmask[:bs]
            if gru or zk:
                dh[:bs] += dh_rec
            else:
                dh[:bs] = dh_rec
            if carry_h is not None:
                dh[:bs] += carry_h
        needs = ctx.needs_input_grad
        d_rec_all = dZ if ln else (dGH if gru else dG)
        rec_in = H_prev if rmask is None else H_prev * rmask.index_select(0, batch_row)
        dw_hh = d_rec_all.t() @ rec_in if needs[9] else None
        d_ln = [None] * 6
        dP = dG
        if ln:
            dP, d_ln[0], d_ln[1] = torch.ops.aten.native_layer_norm_backward(
                dG, P, (P.shape[1],), mu_i, rs_i, ln_ih_w, ln_ih_w, [True, True, True]
            )
            d_ln[2], d_ln[3] = _layer_norm_param_grads(
                dGH if gru else dG, GHraw, mu_h, rs_h, ln_hh_w
            )
            if lstm:
                d_ln[4], d_ln[5] = _layer_norm_param_grads(dCN, C, mu_c, rs_c, ln_c_w)
        dx = dP @ w_ih if needs[5] else None
        dw_ih = dP.t() @ x if needs[8] else None
        db_ih = db_hh = None
        if ctx.has_bias:
            db_ih = dG.sum(0)
            db_hh = dGH.sum(0) if gru else db_ih
        dw_hr = dH.t() @ R if w_hr is not None and needs[12] else None
        return (
            None,
            None,
            None,
            None,
            None,
            dx,
            dh,
            dc,
            dw_ih,
            dw_hh,
            db_ih,
            db_hh,
            dw_hr,
            *d_ln,
            None,
            None,
            None,
        )


_CONTIGUOUS = torch.contiguous_format


def _functorch_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap) is running around this call."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _batched(*grads: Tensor | None) -> bool:
    """Whether backward runs under torch.autograd's own vmap (``is_grads_batched``, used by
    ``jacobian(vectorize=True)``): its tensors have no storage for the kernels."""
    return any(g is not None and torch._C._functorch.is_legacy_batchedtensor(g) for g in grads)


def _reference_layer(
    mode: str,
    reverse: bool,
    batch_sizes: tuple[int, ...],
    zoneout_p: float | None,
    layer: tuple[Tensor | None, ...],
    rmask: Tensor | None,
    zh: Tensor | None,
    zc: Tensor | None,
) -> tuple[Tensor, ...]:
    """The same layer and direction as :class:`FusedLayer`, stepped by the reference cells.

    ``layer`` is ``(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *six layer-norm tensors)``.
    Returns ``(out, h_n)`` or, for LSTM, ``(out, h_n, c_n)``.
    """
    x, h0, c0, *weights = layer
    ln = tuple(t for t in weights[5:] if t is not None)
    lstm = mode == "LSTM"
    if ln or rmask is not None or zh is not None or zoneout_p is not None:
        keep_c = zc if zc is not None else zoneout_p
        v = StepVariants(ln or None, rmask, zh if zh is not None else zoneout_p, keep_c)
    else:
        v = None
    step = reference.cell_step(mode, tuple(weights[:5]), v)
    xs = x if zh is None else ((x, zh, zc) if lstm else (x, zh))
    out, last = scan(step, xs, (h0, c0) if lstm else (h0,), reverse, batch_sizes)
    return (out, *last)


def needs_reference_backward(*grads: Tensor | None) -> bool:
    """Whether a backward must differentiate the reference steps instead of running the
    kernels: double backward (``create_graph=True``) or batched gradients (vmap)."""
    return torch.is_grad_enabled() or _functorch_active() or _batched(*grads)


def vjp_by_reference(
    where: tuple, needs: Sequence[bool], layer, rmask, zh, zc, cotangents
) -> tuple[Tensor | None, ...]:
    """Gradients of ``layer``'s tensors (None where ``needs`` is False) through
    :func:`_reference_layer` at ``where = (mode, reverse, batch_sizes, zoneout_p)``,
    differentiable themselves when the caller asked for ``create_graph``."""
    mode, reverse, batch_sizes, zoneout_p = where
    wanted = [i for i, n in enumerate(needs) if n and layer[i] is not None]

    def f(*diff: Tensor) -> tuple[Tensor, ...]:
        tensors = list(layer)
        for i, t in zip(wanted, diff, strict=True):
            tensors[i] = t
        args = (batch_sizes, zoneout_p, tuple(tensors), rmask, zh, zc)
        return _reference_layer(mode, reverse, *args)

    outputs, vjp = torch.func.vjp(f, *(layer[i] for i in wanted))
    cots = tuple(
        torch.zeros_like(o) if g is None else g for o, g in zip(outputs, cotangents, strict=False)
    )
    grads = [None] * len(layer)
    for i, g in zip(wanted, vjp(cots), strict=True):
        grads[i] = g
    return tuple(grads)


def native_applies(kernels: ModuleType, dtype: torch.dtype) -> bool:
    """Whether a plain layer with these kernels runs all its steps in one native call
    (``ops.native_layer``): the CPU kernels, and the native loop builds for ``dtype``."""
    from rnnkit.engines import cpu

    if kernels is not cpu:
        return False
    from rnnkit.engines import native_loop

    return native_loop.available(dtype)


def persistent_applies(kernels: ModuleType, spec: LayerSpec, needs_grad: bool) -> bool:
    """Whether a plain layer runs as one persistent launch: inference only (nothing needs a
    gradient), LSTM, H within the kernel's limit, kernels that have one (Triton)."""
    return (
        hasattr(kernels, "lstm_persistent_forward")
        and spec.mode == "LSTM"
        and spec.hidden_size <= kernels.PERSISTENT_MAX_H
        and not needs_grad
    )


def run_layer(
    mode: str,
    reverse: bool,
    batch_sizes: tuple[int, ...],
    kernels: ModuleType,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    variants: StepVariants | None = None,
    *,
    native: bool = False,
    persistent: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction: ``(out (N, R), h_n (B, R), c_n (B, H) or None)``.

    As the plan says (``engines.plan``): ``persistent``, plain LSTM inference as the kernels'
    persistent forward (Triton: one launch for all steps, ``W_hh`` kept on chip); ``native``,
    a plain layer's steps in one native call; else :class:`FusedLayer`.
    """
    if persistent:
        G = x @ w_ih.t()  # (N, 4H)
        if b_ih is not None:
            G += b_ih + b_hh
        return kernels.lstm_persistent_forward(G, w_hh, h0, c0, batch_sizes, reverse)
    if native:
        from rnnkit.engines import ops

        return ops.run_layer(mode, reverse, batch_sizes, x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    v = variants or StepVariants()
    ln = tuple(t.contiguous() for t in v.layer_norm or ())
    zoneout_p = v.zoneout_h if isinstance(v.zoneout_h, float) else None
    zh = v.zoneout_h if isinstance(v.zoneout_h, Tensor) else None
    zc = v.zoneout_c if isinstance(v.zoneout_c, Tensor) else None
    if zh is not None:
        zh = zh.reshape(x.shape[0], -1).contiguous()  # padded (T, B, R) -> (T*B, R)
        zc = None if zc is None else zc.reshape(x.shape[0], -1).contiguous()
    layer = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *ln, *([None] * (6 - len(ln))))
    return FusedLayer.apply(
        mode, reverse, batch_sizes, kernels, zoneout_p, *layer, v.recurrent_mask, zh, zc
    )


def run(
    spec: LayerSpec,
    x: Tensor,
    hx: Carry,
    weights: Sequence[Weights],
    batch_sizes: Sequence[int] | None,
    training: bool,
    variants: Sequence[StepVariants] | None = None,
    *,
    kernels: ModuleType,
    native: bool = False,
    persistent: bool = False,
) -> tuple[Tensor, Carry]:
    """Run a whole layer stack; see ``rnnkit.engines`` for the contract. ``kernels``,
    ``native`` and ``persistent`` come from ``engines.plan``."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # As torch.nn does under autocast: run in the autocast dtype (the kernels still do their
        # pointwise math in float32), then keep autocast away from the engine's own GEMMs.
        dtype = torch.get_autocast_dtype(device_type)
        x, hx = x.to(dtype), tuple(s.to(dtype) for s in hx)
        weights = [tuple(w if w is None else w.to(dtype) for w in ws) for ws in weights]
    padded = batch_sizes is None
    if padded:
        T, B = x.shape[0], x.shape[1]
        batch_sizes = (B,) * T
        x = x.reshape(T * B, x.shape[2])  # (T*B, I)
    batch_sizes = tuple(batch_sizes)
    D = spec.num_directions
    h_n, c_n = [], []
    with torch.autocast(device_type, enabled=False):
        for layer in range(spec.num_layers):
            outs = []
            for direction in range(D):
                k = layer * D + direction
                out, h, c = run_layer(
                    spec.mode,
                    direction == 1,
                    batch_sizes,
                    kernels,
                    x.contiguous(),
                    hx[0][k],
                    hx[1][k] if spec.mode == "LSTM" else None,
                    *weights[k],
                    variants=None if variants is None else variants[k],
                    native=native,
                    persistent=persistent,
                )
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outs[0] if D == 1 else torch.cat(outs, dim=1)  # (N, D*R)
            if spec.dropout > 0 and training and layer < spec.num_layers - 1:
                x = torch.nn.functional.dropout(x, p=spec.dropout, training=True)
    if padded:
        x = x.view(T, B, x.shape[1])  # (T, B, D*R)
    states = (torch.stack(h_n),) + ((torch.stack(c_n),) if spec.mode == "LSTM" else ())
    return x, states
