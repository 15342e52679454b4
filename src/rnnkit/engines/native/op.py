"""The native time loop as PyTorch operators (``torch.library``), so that the default CPU path
is one opaque node for ``torch.compile`` (``fullgraph=True`` too) and ``torch.export``.

- ``rnnkit::native_layer`` runs one layer and direction forward (``native_loop.forward``) on the
  input projection ``G = x W_ih^T + biases`` (under a layer norm, ``LN(x W_ih^T) + biases``),
  which the caller computes with torch ops (so autograd owns ``dX``, ``dW_ih``, the input-side
  norm and the biases folded into ``G``), with LSTM's projection, the layer norms of the
  recurrent side, the recurrent-dropout mask and zoneout's probability and masks as optional
  arguments.
- ``rnnkit::native_layer_backward`` is its backward walk (``native_loop.backward``).

Both have fake implementations (shapes only) for tracing; the forward's autograd formula is
registered with :func:`torch.library.register_autograd`. Double backward and batched gradients
(vmap) differentiate :func:`reference_layer`, the same steps in torch ops, instead.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.engines import shared, steps
from rnnkit.engines.native import loop as native_loop
from rnnkit.engines.spec import LN_EPS, StepVariants

_GATES = shared.GATES


def _none_if_empty(t: Tensor) -> Tensor | None:
    # Custom operators return tensors only: an absent one travels as an empty tensor.
    return None if t.numel() == 0 and t.dim() == 1 else t


def _saved_shapes(
    mode: str, G: Tensor, ln: bool, zoneout: bool, proj: bool, save: bool
) -> dict[str, tuple]:
    """Shapes of what forward saves (``(0,)``: absent)."""
    N, H = G.shape[0], G.shape[1] // _GATES[mode]
    lstm, absent = mode == "LSTM", (0,)
    return dict(
        A=tuple(G.shape) if mode in ("LSTM", "GRU") and save else absent,
        C=(N, H) if lstm and save else absent,
        GH=tuple(G.shape) if mode == "GRU" and save else absent,
        Zr=tuple(G.shape) if ln and save else absent,
        stats=(4 if lstm else 2, N) if ln and save else absent,
        CZ=(N, H) if lstm and zoneout and save else absent,
        Rs=(N, H) if proj and save else absent,
    )


def _native_layer(
    mode: str,
    reverse: bool,
    batch_sizes: list[int],
    G: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    ln_hw: Tensor | None,
    ln_hb: Tensor | None,
    ln_cw: Tensor | None,
    ln_cb: Tensor | None,
    rmask: Tensor | None,
    zoneout_p: float | None,
    zh: Tensor | None,
    zc: Tensor | None,
    save: bool,
    threads: int,
    blas: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out (N, R), h_n, c_n or empty, activations A, C, GH, Zr, stats, CZ, Rs)`` (the saved
    tensors of ``native_loop.ForwardResult``, empty where absent: all without ``save``, ``A``
    for RNN); ``threads=0``: torch's; ``blas=-1``: automatic, 0: the own loops only."""
    v = native_loop.NativeVariants(ln_hw, ln_hb, ln_cw, ln_cb, rmask, zoneout_p, zh, zc)
    r = native_loop.forward(
        mode, reverse, batch_sizes, G, h0, c0, w_hh, b_hh, save, w_hr=w_hr, variants=v,
        threads=threads or None, blas=None if blas < 0 else bool(blas),
    )  # fmt: skip
    c_n, A, C, GH, Zr, stats, CZ, Rs = (
        t if t is not None else G.new_empty(0)
        for t in (r.c_n, r.A, r.C, r.GH, r.Zr, r.stats, r.CZ, r.Rs)
    )
    return r.out, r.h_n, c_n, A, C, GH, Zr, stats, CZ, Rs


native_layer = torch.library.custom_op("rnnkit::native_layer", mutates_args=())(_native_layer)


@native_layer.register_fake
def _native_layer_fake(mode, reverse, batch_sizes, G, h0, c0, w_hh, b_hh, w_hr, ln_hw, ln_hb,
                       ln_cw, ln_cb, rmask, zoneout_p, zh, zc, save, threads, blas):  # fmt: skip
    zoneout = zoneout_p is not None or zh is not None
    saved = _saved_shapes(mode, G, ln_hw is not None, zoneout, w_hr is not None, save)
    c_n = torch.empty_like(c0) if mode == "LSTM" else G.new_empty(0)
    out = G.new_empty(G.shape[0], h0.shape[1])
    return (
        out, torch.empty_like(h0), c_n,
        *(G.new_empty(saved[k]) for k in ("A", "C", "GH", "Zr", "stats", "CZ", "Rs")),
    )  # fmt: skip


def _native_layer_backward(
    mode: str,
    reverse: bool,
    batch_sizes: list[int],
    A: Tensor,
    out: Tensor,
    C: Tensor | None,
    GH: Tensor | None,
    Zr: Tensor | None,
    stats: Tensor | None,
    CZ: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    w_hr: Tensor | None,
    ln_hw: Tensor | None,
    ln_hb: Tensor | None,
    ln_cw: Tensor | None,
    ln_cb: Tensor | None,
    rmask: Tensor | None,
    zoneout_p: float | None,
    zh: Tensor | None,
    zc: Tensor | None,
    d_out: Tensor | None,
    d_hn: Tensor | None,
    d_cn: Tensor | None,
    threads: int,
    blas: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dG, dGH, dh0, dc0, dZ, dCN, dHt)``, empty where absent: the gradients of
    :func:`native_layer`'s ``G`` (pre-activations), of its hidden side (GRU), of ``h0``, ``c0``,
    of the recurrent product before its norm, of the cell norm's output (LSTM) and of the
    projected h_t before zoneout."""
    v = native_loop.NativeVariants(ln_hw, ln_hb, ln_cw, ln_cb, rmask, zoneout_p, zh, zc)
    r = native_loop.backward(
        mode, reverse, batch_sizes, A, out, C, GH, h0, c0, w_hh, d_out, d_hn, d_cn,
        variants=v, Zr=Zr, stats=stats, CZ=CZ, w_hr=w_hr, threads=threads or None,
        blas=None if blas < 0 else bool(blas),
    )  # fmt: skip
    dGH, dc0, dZ, dCN, dHt = (
        t if t is not None else A.new_empty(0) for t in (r.dGH, r.dc0, r.dZ, r.dCN, r.dHt)
    )
    return r.dG, dGH, r.dh0, dc0, dZ, dCN, dHt


native_layer_backward = torch.library.custom_op("rnnkit::native_layer_backward", mutates_args=())(
    _native_layer_backward
)


@native_layer_backward.register_fake
def _native_layer_backward_fake(mode, reverse, batch_sizes, A, out, C, GH, Zr, stats, CZ, h0,
                                c0, w_hh, w_hr, ln_hw, ln_hb, ln_cw, ln_cb, rmask, zoneout_p, zh,
                                zc, d_out, d_hn, d_cn, threads, blas):  # fmt: skip
    lstm, ln = mode == "LSTM", ln_hw is not None
    N, H = A.shape[0], A.shape[1] // _GATES[mode]
    dGH = torch.empty_like(A) if mode == "GRU" else A.new_empty(0)
    dc0 = torch.empty_like(c0) if lstm else A.new_empty(0)
    dZ = torch.empty_like(A) if ln else A.new_empty(0)
    dCN = A.new_empty(N, H) if ln and lstm else A.new_empty(0)
    dHt = A.new_empty(out.shape) if w_hr is not None else A.new_empty(0)
    return torch.empty_like(A), dGH, torch.empty_like(h0), dc0, dZ, dCN, dHt


def reference_layer(
    mode: str,
    reverse: bool,
    batch_sizes,
    G: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None = None,
    ln_hw: Tensor | None = None,
    ln_hb: Tensor | None = None,
    ln_cw: Tensor | None = None,
    ln_cb: Tensor | None = None,
    rmask: Tensor | None = None,
    zoneout_p: float | None = None,
    zh: Tensor | None = None,
    zc: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """What :func:`native_layer` computes, from ``G`` on: the steps of ``engines.steps``
    (``steps.layer``): ``(out, h_n)`` or, for LSTM, ``(out, h_n, c_n)``. Differentiable any
    number of times, and under vmap."""
    ln = None if ln_hw is None else (None, None, ln_hw, ln_hb, ln_cw, ln_cb)
    v = StepVariants(ln, rmask, zoneout_p, zh, zc)
    return steps.layer(mode, reverse, batch_sizes, G, h0, c0, w_hh, b_hh, w_hr, v)


# Positions of the differentiable inputs of native_layer, in its argument order.
_DIFF = ("G", "h0", "c0", "w_hh", "b_hh", "w_hr", "ln_hw", "ln_hb", "ln_cw", "ln_cb")


def _setup_context(ctx, inputs, output) -> None:
    mode, reverse, batch_sizes, *tensors, rmask, zoneout_p, zh, zc, _save, threads, blas = inputs
    out, _, _, A, C, GH, Zr, stats, CZ, Rs = output
    ctx.where = (mode, reverse, tuple(batch_sizes), threads, blas, zoneout_p)
    ctx.eager = False
    # The saved outputs never receive a gradient; materialised, each would be a zero-filled
    # (N, G*H) tensor per backward. None reads as zero below.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*tensors, rmask, zh, zc, out, A, C, GH, Zr, stats, CZ, Rs)


def _backward(ctx, d_out, d_hn, d_cn, *_saved_outputs):
    mode, reverse, batch_sizes, threads, blas, zoneout_p = ctx.where
    *tensors, rmask, zh, zc, out, A, C, GH, Zr, stats, CZ, Rs = ctx.saved_tensors
    zoneout = (rmask, zoneout_p, zh, zc)
    t = dict(zip(_DIFF, tensors, strict=True))
    G, h0, c0, w_hh, b_hh = (t[k] for k in ("G", "h0", "c0", "w_hh", "b_hh"))
    lstm, gru, ln = mode == "LSTM", mode == "GRU", t["ln_hw"] is not None
    needs = dict(zip(_DIFF, ctx.needs_input_grad[3 : 3 + len(_DIFF)], strict=True))
    d_cn = d_cn if lstm else None
    grads: dict[str, Tensor | None] = dict.fromkeys(_DIFF)
    if shared.needs_reference_backward(d_out, d_hn, d_cn):
        wanted = [k for k in _DIFF if needs[k] and t[k] is not None]

        def f(*diff: Tensor) -> tuple[Tensor, ...]:
            args = {**t, **dict(zip(wanted, diff, strict=True))}
            return reference_layer(mode, reverse, batch_sizes, *args.values(), *zoneout)

        outputs, vjp = torch.func.vjp(f, *(t[k] for k in wanted))
        cots = tuple(
            torch.zeros_like(o) if g is None else g
            for o, g in zip(outputs, (d_out, d_hn, d_cn), strict=False)
        )
        grads.update(zip(wanted, vjp(cots), strict=True))
    else:
        # The eager path (_EagerLayer) calls the function itself; a traced graph, the operator.
        backward_op = _native_layer_backward if ctx.eager else native_layer_backward
        dG, dGH, dh0, dc0, dZ, dCN, dHt = backward_op(
            # RNN saves no activations: its backward reads none, G stands in for the shape.
            mode, reverse, list(batch_sizes), A if A.numel() else G, out, _none_if_empty(C),
            _none_if_empty(GH), _none_if_empty(Zr), _none_if_empty(stats), _none_if_empty(CZ), h0,
            c0 if lstm else None, w_hh, t["w_hr"], t["ln_hw"], t["ln_hb"], t["ln_cw"],
            t["ln_cb"], *zoneout,
            d_out, d_hn, d_cn, threads, blas,
        )  # fmt: skip
        grads.update(G=dG, h0=dh0, c0=dc0 if lstm else None)
        dY = dGH if gru else dG  # the gradient at the recurrent side, after its norm
        if needs["w_hh"]:
            prev, batch_row = shared.prev_rows(batch_sizes, reverse, G.device)
            h_prev = torch.cat((out, h0)).index_select(0, prev)  # (N, H)
            if rmask is not None:
                h_prev = h_prev * rmask.index_select(0, batch_row)
            grads["w_hh"] = (dZ if ln else dY).t() @ h_prev  # (G*H, H)
        if gru and b_hh is not None and needs["b_hh"]:
            grads["b_hh"] = dGH.sum(0)
        if t["w_hr"] is not None and needs["w_hr"]:
            grads["w_hr"] = dHt.t() @ Rs  # (P, H)
        if ln:
            N = G.shape[0]
            mean, rstd = stats.view(-1, N, 1).unbind(0)[:2]
            grads["ln_hw"], grads["ln_hb"] = shared.layer_norm_param_grads(dY, Zr, mean, rstd, t["ln_hw"])
            if lstm:
                mean_c, rstd_c = stats.view(-1, N, 1).unbind(0)[2:]
                grads["ln_cw"], grads["ln_cb"] = shared.layer_norm_param_grads(
                    dCN, C, mean_c, rstd_c, t["ln_cw"]
                )
    diff = tuple(grads[k] if needs[k] else None for k in _DIFF)
    return None, None, None, *diff, *([None] * 7)


torch.library.register_autograd("rnnkit::native_layer", _backward, setup_context=_setup_context)


class _EagerLayer(torch.autograd.Function):
    """:func:`native_layer` with its registered autograd, for eager training without the
    operator's dispatch (about 0.2 ms a call, and a second to import dynamo on first use): the
    same forward, context and backward functions run. Graphs (compile, export) and torch.func
    transforms use the operator."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _native_layer(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.eager = True
        return output

    @staticmethod
    def backward(ctx, *grads):
        return _backward(ctx, *grads)


def run_layer(
    mode: str,
    reverse: bool,
    batch_sizes,
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None = None,
    variants: StepVariants | None = None,
    *,
    threads: int | None = None,
    blas: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction: ``(out (N, R), h_n, c_n)``, with LSTM's
    projection ``w_hr`` and the variants of ``variants`` (layer norm, recurrent dropout,
    zoneout)."""
    v = variants or StepVariants()
    ln = tuple(t.contiguous() for t in v.layer_norm) if v.layer_norm is not None else ()
    bias = None if b_ih is None else (b_ih if mode == "GRU" else b_ih + b_hh)
    if ln:
        G = F.layer_norm(x @ w_ih.t(), (w_ih.shape[0],), ln[0], ln[1], LN_EPS)  # (N, G*H)
        G = G if bias is None else G + bias
    else:
        # The bias inside the GEMM: a separate add re-reads all of G (5 ms of 33 at B=64).
        G = x @ w_ih.t() if bias is None else torch.addmm(bias, x, w_ih.t())  # (N, G*H)
    # The loop reads plain row-major memory; users may pass any strides (a permuted h0).
    h0, w_hh = h0.contiguous(), w_hh.contiguous()
    w_hr = None if w_hr is None else w_hr.contiguous()
    c0 = None if c0 is None else c0.contiguous()
    gru_bias = b_hh.contiguous() if mode == "GRU" and b_hh is not None else None
    ln_h = ln[2:4] if ln else (None, None)
    ln_c = ln[4:6] if ln and mode == "LSTM" else (None, None)
    rmask = None if v.recurrent_mask is None else v.recurrent_mask.contiguous()
    # Zoneout's masks laid out like x's rows: padded (T, B, H) -> (T*B, H).
    masks = (v.zoneout_h_mask, v.zoneout_c_mask if mode == "LSTM" else None)
    zh, zc = (None if m is None else m.reshape(x.shape[0], -1).contiguous() for m in masks)
    tensors = (G, h0, c0, w_hh, gru_bias, w_hr, *ln_h, *ln_c)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not save and not torch.compiler.is_compiling() and not shared.functorch_active():
        # Eager inference: no graph to record and no gradient, so the operator's dispatch (about
        # 0.2 ms a call, a tenth of a B=1 layer) buys nothing; the same function runs directly.
        nv = native_loop.NativeVariants(*ln_h, *ln_c, rmask, v.zoneout_p, zh, zc)
        r = native_loop.forward(mode, reverse, batch_sizes, G, h0, c0, w_hh, gru_bias, False,
                                w_hr=w_hr, variants=nv, threads=threads, blas=blas)  # fmt: skip
        return r.out, r.h_n, r.c_n
    blas_arg = -1 if blas is None else int(blas)
    traced = torch.compiler.is_compiling() or torch.compiler.is_exporting() or shared.functorch_active()
    layer = native_layer if traced else _EagerLayer.apply
    out, h_n, c_n, *_ = layer(
        mode, reverse, list(batch_sizes), G, h0, c0, w_hh, gru_bias, w_hr, *ln_h, *ln_c, rmask,
        v.zoneout_p, zh, zc, save, threads or 0, blas_arg,
    )  # fmt: skip
    return out, h_n, (c_n if mode == "LSTM" else None)
