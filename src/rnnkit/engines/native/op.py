"""The native time loop as PyTorch operators (``torch.library``), so that the default CPU path
is one opaque node for ``torch.compile`` (``fullgraph=True`` too) and ``torch.export``.

- ``rnnkit::native_layer`` runs one layer and direction forward (``native_loop.forward``) on the
  input projection ``G = x W_ih^T + biases`` (under a layer norm, ``LN(x W_ih^T) + biases``),
  which the caller computes with torch ops (so autograd owns ``dX``, ``dW_ih``, the input-side
  norm and the biases folded into ``G``), with LSTM's projection ``w_hr`` and the variants as
  one list of optional tensors in the order of ``NativeVariants.TENSORS`` (the layer norms of
  the recurrent side, the recurrent-dropout mask, zoneout's masks) plus zoneout's probability.
- ``rnnkit::native_layer_backward`` is its backward walk (``native_loop.backward``).

Both have fake implementations (shapes only) for tracing; the forward's autograd formula is
registered with :func:`torch.library.register_autograd`. Double backward and batched gradients
(vmap) differentiate :func:`reference_layer`, the same steps in torch ops, instead. Gradients
are matched to the inputs by name (``_GRAD_INPUTS``, ``NativeVariants.TENSORS``).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.engines import shared, steps
from rnnkit.engines.native import loop as native_loop
from rnnkit.engines.native import onednn
from rnnkit.engines.native.loop import NativeVariants, none_if_empty
from rnnkit.engines.spec import LN_EPS, StepVariants

_GATES = shared.GATES


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
    variants: list[Tensor],
    zoneout_p: float | None,
    save: bool,
    threads: int,
    gemm: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out (N, R), h_n, c_n or empty, activations A, C, GH, Zr, stats, CZ, Rs)`` (the saved
    tensors of ``native_loop.ForwardResult``, empty where absent: all without ``save``, ``A``
    for RNN); ``variants``: ``NativeVariants``' tensors in order, an empty tensor where one is
    absent (a list holding None would be opaque to the operator's autograd); ``threads=0``: torch's;
    ``gemm=-1``: automatic, 0: the own loops only."""
    v = NativeVariants.from_tensors(variants, zoneout_p)
    batch_sizes = shared.step_sizes(batch_sizes, G.shape[0], h0.shape[0])
    r = native_loop.forward(
        mode, reverse, batch_sizes, G, h0, c0, w_hh, b_hh, save, w_hr=w_hr, variants=v,
        threads=threads or None, gemm=None if gemm < 0 else bool(gemm),
    )  # fmt: skip
    c_n, A, C, GH, Zr, stats, CZ, Rs = (
        t if t is not None else G.new_empty(0)
        for t in (r.c_n, r.A, r.C, r.GH, r.Zr, r.stats, r.CZ, r.Rs)
    )
    return r.out, r.h_n, c_n, A, C, GH, Zr, stats, CZ, Rs


native_layer = torch.library.custom_op("rnnkit::native_layer", mutates_args=())(_native_layer)


@native_layer.register_fake
def _native_layer_fake(mode, reverse, batch_sizes, G, h0, c0, w_hh, b_hh, w_hr, variants,
                       zoneout_p, save, threads, gemm):  # fmt: skip
    v = NativeVariants.from_tensors(variants, zoneout_p)
    saved = _saved_shapes(mode, G, v.layer_norm, v.zoneout, w_hr is not None, save)
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
    variants: list[Tensor],
    zoneout_p: float | None,
    d_out: Tensor | None,
    d_hn: Tensor | None,
    d_cn: Tensor | None,
    threads: int,
    gemm: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dG, dGH, dh0, dc0, dZ, dHt, d ln_hw, d ln_hb, d ln_cw, d ln_cb)``, empty where absent:
    the gradients of :func:`native_layer`'s ``G`` (pre-activations), of its hidden side (GRU),
    of ``h0``, ``c0``, of the recurrent product before its norm, of the projected h_t before
    zoneout, and of the layer norms' gains and biases."""
    v = NativeVariants.from_tensors(variants, zoneout_p)
    batch_sizes = shared.step_sizes(batch_sizes, out.shape[0], h0.shape[0])
    r = native_loop.backward(
        mode, reverse, batch_sizes, A, out, C, GH, h0, c0, w_hh, d_out, d_hn, d_cn,
        variants=v, Zr=Zr, stats=stats, CZ=CZ, w_hr=w_hr, threads=threads or None,
        gemm=None if gemm < 0 else bool(gemm),
    )  # fmt: skip
    optional = (r.dGH, r.dc0, r.dZ, r.dHt, r.ln_hw, r.ln_hb, r.ln_cw, r.ln_cb)
    dGH, dc0, dZ, dHt, *d_ln = (t if t is not None else A.new_empty(0) for t in optional)
    return r.dG, dGH, r.dh0, dc0, dZ, dHt, *d_ln


native_layer_backward = torch.library.custom_op("rnnkit::native_layer_backward", mutates_args=())(
    _native_layer_backward
)


@native_layer_backward.register_fake
def _native_layer_backward_fake(mode, reverse, batch_sizes, A, out, C, GH, Zr, stats, CZ, h0,
                                c0, w_hh, w_hr, variants, zoneout_p, d_out, d_hn, d_cn, threads,
                                gemm):  # fmt: skip
    v = NativeVariants.from_tensors(variants, zoneout_p)
    lstm, ln = mode == "LSTM", v.layer_norm
    GW = A.shape[1]
    H = GW // _GATES[mode]
    dGH = torch.empty_like(A) if mode == "GRU" else A.new_empty(0)
    dc0 = torch.empty_like(c0) if lstm else A.new_empty(0)
    dZ = torch.empty_like(A) if ln else A.new_empty(0)
    dHt = A.new_empty(out.shape) if w_hr is not None else A.new_empty(0)
    ln_sizes = (GW, GW, *((H, H) if lstm else (0, 0))) if ln else (0, 0, 0, 0)
    d_ln = [A.new_empty(n) for n in ln_sizes]
    return torch.empty_like(A), dGH, torch.empty_like(h0), dc0, dZ, dHt, *d_ln


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
    v: NativeVariants | None = None,
) -> tuple[Tensor, ...]:
    """What :func:`native_layer` computes, from ``G`` on: the steps of ``engines.steps``
    (``steps.layer``): ``(out, h_n)`` or, for LSTM, ``(out, h_n, c_n)``. Differentiable any
    number of times, and under vmap."""
    v = v or NativeVariants()
    ln = None if v.ln_hw is None else (None, None, v.ln_hw, v.ln_hb, v.ln_cw, v.ln_cb)
    step_variants = StepVariants(ln, v.rmask, v.zoneout_p, v.zh, v.zc)
    batch_sizes = shared.step_sizes(batch_sizes, G.shape[0], h0.shape[0])
    return steps.layer(mode, reverse, batch_sizes, G, h0, c0, w_hh, b_hh, w_hr, step_variants)


# The inputs of native_layer that may need a gradient besides the variants' tensors, by name.
_GRAD_INPUTS = ("G", "h0", "c0", "w_hh", "b_hh", "w_hr")
# The variants' tensors that are learned (the masks are drawn, not learned).
_LEARNED = ("ln_hw", "ln_hb", "ln_cw", "ln_cb")


class _Inputs(NamedTuple):
    """native_layer's arguments by name."""

    mode: str
    reverse: bool
    batch_sizes: list[int]
    G: Tensor
    h0: Tensor
    c0: Tensor | None
    w_hh: Tensor
    b_hh: Tensor | None
    w_hr: Tensor | None
    variants: list[Tensor | None]
    zoneout_p: float | None
    save: bool
    threads: int
    gemm: int


def _setup_context(ctx, inputs, output) -> None:
    a = _Inputs(*inputs)
    out, _, _, A, C, GH, Zr, stats, CZ, Rs = output
    ctx.where = (a.mode, a.reverse, tuple(a.batch_sizes), a.threads, a.gemm, a.zoneout_p)
    ctx.needs = {
        name: t is not None and t.requires_grad
        for name, t in (
            *((k, getattr(a, k)) for k in _GRAD_INPUTS),
            *zip(NativeVariants.TENSORS, a.variants, strict=True),
        )
    }
    ctx.eager = False
    # The saved outputs never receive a gradient; materialised, each would be a zero-filled
    # (N, G*H) tensor per backward. None reads as zero below.
    ctx.set_materialize_grads(False)
    tensors = [getattr(a, k) for k in _GRAD_INPUTS]
    ctx.save_for_backward(*tensors, *a.variants, out, A, C, GH, Zr, stats, CZ, Rs)


def _reference_grads(ctx, t: dict, v, cotangents) -> dict[str, Tensor]:
    """Gradients through :func:`reference_layer` (double backward, vmap), by name."""
    mode, reverse, batch_sizes = ctx.where[:3]
    wanted = [k for k, need in ctx.needs.items() if need and k in (*_GRAD_INPUTS, *_LEARNED)]

    def f(*diff: Tensor) -> tuple[Tensor, ...]:
        named = {**t, **v._asdict(), **dict(zip(wanted, diff, strict=True))}
        layer_v = NativeVariants(**{k: named[k] for k in v._fields})
        core = (named[k] for k in ("G", "h0", "c0", "w_hh", "b_hh", "w_hr"))
        return reference_layer(mode, reverse, batch_sizes, *core, layer_v)

    source = {**t, **v._asdict()}
    outputs, vjp = torch.func.vjp(f, *(source[k] for k in wanted))
    cots = tuple(
        torch.zeros_like(o) if g is None else g for o, g in zip(outputs, cotangents, strict=False)
    )
    return dict(zip(wanted, vjp(cots), strict=True))


def _native_grads(ctx, t: dict, v, saved: tuple, d_out, d_hn, d_cn) -> dict[str, Tensor | None]:
    """Gradients through the native backward walk and the one-GEMM sums over all steps."""
    mode, reverse, batch_sizes, threads, gemm, zoneout_p = ctx.where
    out, A, C, GH, Zr, stats, CZ, Rs = saved
    G, h0, c0, w_hh, b_hh = (t[k] for k in ("G", "h0", "c0", "w_hh", "b_hh"))
    lstm, gru, ln = mode == "LSTM", mode == "GRU", v.layer_norm
    # The eager path (_EagerLayer) calls the function itself; a traced graph, the operator.
    backward_op = _native_layer_backward if ctx.eager else native_layer_backward
    dG, dGH, dh0, dc0, dZ, dHt, *d_ln = backward_op(
        # RNN saves no activations: its backward reads none, G stands in for the shape.
        mode, reverse, list(batch_sizes), A if A.numel() else G, out, none_if_empty(C),
        none_if_empty(GH), none_if_empty(Zr), none_if_empty(stats), none_if_empty(CZ), h0,
        c0 if lstm else None, w_hh, t["w_hr"], [G.new_empty(0) if u is None else u for u in
        v.tensors()], zoneout_p, d_out, d_hn, d_cn,
        threads, gemm,
    )  # fmt: skip
    grads = {"G": dG, "h0": dh0, "c0": dc0 if lstm else None}
    dY = dGH if gru else dG  # the gradient at the recurrent side, after its norm
    if ctx.needs["w_hh"]:
        grads["w_hh"] = _w_hh_grad(dZ if ln else dY, out, h0, v.rmask, batch_sizes, reverse)
    if gru and b_hh is not None and ctx.needs["b_hh"]:
        grads["b_hh"] = dGH.sum(0)
    if t["w_hr"] is not None and ctx.needs["w_hr"]:
        grads["w_hr"] = dHt.t() @ Rs  # (P, H)
    # The norms' gain and bias gradients come summed from the loop.
    grads.update(zip(_LEARNED, d_ln, strict=True))
    return grads


def _w_hh_grad(
    dY: Tensor, out: Tensor, h0: Tensor, rmask: Tensor | None, batch_sizes, reverse: bool
) -> Tensor:
    """``dW_hh = dY^T H_prev`` (G*H, R), ``H_prev`` the rows' h_{t-1} (times the recurrent-dropout
    mask). Where every step has all B rows, ``H_prev`` is ``out`` shifted by one step with h0
    in front: two GEMMs on views, no gathered (N, R) copy."""
    B, N = h0.shape[0], out.shape[0]
    padded = tuple(batch_sizes) == shared.PADDED or all(b == B for b in batch_sizes)
    if rmask is None and padded:
        # Forward order: row r's h_{t-1} is out[r - B] (reverse: out[r + B]), h0 for the first step.
        first, rest = (slice(N - B, N), slice(0, N - B)) if reverse else (slice(0, B), slice(B, N))
        shifted = out[B:] if reverse else out[: N - B]
        # The first step's share added in place: addmm onto it would first copy it.
        return (dY[rest].t() @ shifted).addmm_(dY[first].t(), h0)  # (G*H, R)
    batch_sizes = shared.step_sizes(batch_sizes, N, B)
    prev, batch_row = shared.prev_rows(batch_sizes, reverse, out.device)
    h_prev = torch.cat((out, h0)).index_select(0, prev)  # (N, R)
    if rmask is not None:
        h_prev = h_prev * rmask.index_select(0, batch_row)
    return dY.t() @ h_prev  # (G*H, R)


def _backward(ctx, d_out, d_hn, d_cn, *_saved_outputs):
    mode, zoneout_p = ctx.where[0], ctx.where[5]
    saved = ctx.saved_tensors
    k, n = len(_GRAD_INPUTS), len(NativeVariants.TENSORS)
    t = dict(zip(_GRAD_INPUTS, saved[:k], strict=True))
    v = NativeVariants.from_tensors(list(saved[k : k + n]), zoneout_p)
    d_cn = d_cn if mode == "LSTM" else None
    if shared.needs_reference_backward(d_out, d_hn, d_cn):
        grads = _reference_grads(ctx, t, v, (d_out, d_hn, d_cn))
    else:
        grads = _native_grads(ctx, t, v, saved[k + n :], d_out, d_hn, d_cn)
    # By name: one gradient per input of native_layer (a list for the variants' list).
    named = {name: grads.get(name) if need else None for name, need in ctx.needs.items()}
    core = (named[name] for name in _GRAD_INPUTS)
    variants = [named[name] for name in NativeVariants.TENSORS]
    return None, None, None, *core, variants, None, None, None, None


torch.library.register_autograd("rnnkit::native_layer", _backward, setup_context=_setup_context)


class _EagerLayer(torch.autograd.Function):
    """:func:`native_layer` with its registered autograd, for eager training without the
    operator's dispatch (about 0.2 ms a call, and a second to import dynamo on first use): the
    same forward, context and backward functions run. Graphs (compile, export) and torch.func
    transforms use the operator. An autograd.Function tracks only tensors passed as arguments,
    so the variants' list travels flattened."""

    @staticmethod
    def forward(ctx, *flat):
        inputs = _unflatten(flat)
        output = _native_layer(*inputs)
        _setup_context(ctx, inputs, output)
        ctx.eager = True
        return output

    @staticmethod
    def backward(ctx, *grads):
        *head, variants, zoneout_p, save, threads, gemm = _backward(ctx, *grads)
        return (*head, *variants, zoneout_p, save, threads, gemm)


def _flatten(inputs: tuple) -> tuple:
    a = _Inputs(*inputs)
    return (*inputs[:9], *a.variants, *inputs[10:])


def _unflatten(flat: tuple) -> tuple:
    n = len(NativeVariants.TENSORS)
    return (*flat[:9], list(flat[9 : 9 + n]), *flat[9 + n :])


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
    gemm: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction: ``(out (N, R), h_n, c_n)``, with LSTM's projection ``w_hr`` and
    the variants of ``variants`` (layer norm, recurrent dropout, zoneout)."""
    ln = variants.layer_norm if variants is not None else None
    bias = None if b_ih is None else (b_ih if mode == "GRU" else b_ih + b_hh)
    if ln is not None:
        # The biases ride in the norm's own bias: one pass over (N, G*H), not a second add.
        ln_bias = bias if ln[1] is None else ln[1] if bias is None else ln[1] + bias
        G = F.layer_norm(onednn.input_side(x, w_ih), (w_ih.shape[0],), ln[0], ln_bias, LN_EPS)
    else:
        # The bias inside the GEMM: a separate add re-reads all of G (5 ms of 33 at B=64).
        G = onednn.input_side(x, w_ih, bias)  # (N, G*H)
    v = NativeVariants.of(mode, variants, x.shape[0])
    # The loop reads plain row-major memory; users may pass any strides (a permuted h0).
    h0, w_hh = h0.contiguous(), w_hh.contiguous()
    w_hr = None if w_hr is None else w_hr.contiguous()
    c0 = None if c0 is None else c0.contiguous()
    gru_bias = b_hh.contiguous() if mode == "GRU" and b_hh is not None else None
    tensors = (G, h0, c0, w_hh, gru_bias, w_hr, *v.tensors())
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    functorch = shared.functorch_active()
    if not save and not torch.compiler.is_compiling() and not functorch:
        # Eager inference: no graph to record and no gradient, so the operator's dispatch (about
        # 0.2 ms a call, a tenth of a B=1 layer) buys nothing; the same function runs directly.
        r = native_loop.forward(mode, reverse, batch_sizes, G, h0, c0, w_hh, gru_bias, False,
                                w_hr=w_hr, variants=v, threads=threads, gemm=gemm)  # fmt: skip
        return r.out, r.h_n, r.c_n
    inputs = (
        mode, reverse, list(batch_sizes), G, h0, c0, w_hh, gru_bias, w_hr,
        [G.new_empty(0) if t is None else t for t in v.tensors()],
        v.zoneout_p, save, threads or 0, -1 if gemm is None else int(gemm),
    )  # fmt: skip
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or functorch:
        out, h_n, c_n, *_ = native_layer(*inputs)
    else:
        out, h_n, c_n, *_ = _EagerLayer.apply(*_flatten(inputs))
    return out, h_n, (c_n if mode == "LSTM" else None)
