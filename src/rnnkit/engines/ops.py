"""The native time loop as PyTorch operators (``torch.library``), so that the default CPU path
is one opaque node for ``torch.compile`` (``fullgraph=True`` too) and ``torch.export``.

- ``rnnkit::native_layer`` runs one plain layer and direction forward (``native_loop.forward``)
  on the input projection ``G = x W_ih^T + biases``, which the caller computes with torch ops
  (so autograd owns ``dX``, ``dW_ih`` and the biases folded into ``G``).
- ``rnnkit::native_layer_backward`` is its backward walk (``native_loop.backward``).

Both have fake implementations (shapes only) for tracing; the forward's autograd formula is
registered with :func:`torch.library.register_autograd`. Double backward and batched gradients
(vmap) differentiate the reference steps instead, as ``FusedLayer`` does.
"""

import torch
from torch import Tensor

from rnnkit.engines import fused, native_loop

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _none_if_empty(t: Tensor) -> Tensor | None:
    # Custom operators return tensors only: an absent one travels as an empty tensor.
    return None if t.numel() == 0 and t.dim() == 1 else t


def _saved_shapes(mode: str, G: Tensor, h0: Tensor, save: bool) -> tuple[tuple, tuple]:
    N, H = G.shape[0], h0.shape[1]
    C = (N, H) if mode == "LSTM" and save else (0,)
    GH = tuple(G.shape) if mode == "GRU" and save else (0,)
    return C, GH


@torch.library.custom_op("rnnkit::native_layer", mutates_args=())
def native_layer(
    mode: str,
    reverse: bool,
    batch_sizes: list[int],
    G: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    save: bool,
    threads: int,
    blas: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(out (N, H), h_n, c_n or empty, gate activations A, C or empty, GH or empty)``;
    ``threads=0``: torch's; ``blas=-1``: automatic, 0: the own loops only."""
    A = G.clone()  # the loop overwrites its input with the activations; G stays the input
    r = native_loop.forward(
        mode, reverse, batch_sizes, A, h0, c0, w_hh, b_hh, save,
        threads=threads or None, blas=None if blas < 0 else bool(blas),
    )  # fmt: skip
    c_n, C, GH = (t if t is not None else G.new_empty(0) for t in (r.c_n, r.C, r.GH))
    return r.out, r.h_n, c_n, A, C, GH


@native_layer.register_fake
def _native_layer_fake(mode, reverse, batch_sizes, G, h0, c0, w_hh, b_hh, save, threads, blas):
    C, GH = _saved_shapes(mode, G, h0, save)
    c_n = torch.empty_like(c0) if mode == "LSTM" else G.new_empty(0)
    out = G.new_empty(G.shape[0], h0.shape[1])
    return out, torch.empty_like(h0), c_n, torch.empty_like(G), G.new_empty(C), G.new_empty(GH)


@torch.library.custom_op("rnnkit::native_layer_backward", mutates_args=())
def native_layer_backward(
    mode: str,
    reverse: bool,
    batch_sizes: list[int],
    A: Tensor,
    out: Tensor,
    C: Tensor | None,
    GH: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    d_out: Tensor | None,
    d_hn: Tensor | None,
    d_cn: Tensor | None,
    threads: int,
    blas: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dG, dGH or empty, dh0, dc0 or empty)``: the gradients of :func:`native_layer`'s
    ``G`` (pre-activations), of its hidden side (GRU) and of ``h0``, ``c0``."""
    r = native_loop.backward(
        mode, reverse, batch_sizes, A, out, C, GH, h0, c0, w_hh, d_out, d_hn, d_cn,
        threads=threads or None, blas=None if blas < 0 else bool(blas),
    )  # fmt: skip
    dGH, dc0 = (t if t is not None else A.new_empty(0) for t in (r.dGH, r.dc0))
    return r.dG, dGH, r.dh0, dc0


@native_layer_backward.register_fake
def _native_layer_backward_fake(
    mode, reverse, batch_sizes, A, out, C, GH, h0, c0, w_hh, d_out, d_hn, d_cn, threads, blas
):
    dGH = torch.empty_like(A) if mode == "GRU" else A.new_empty(0)
    dc0 = torch.empty_like(c0) if mode == "LSTM" else A.new_empty(0)
    return torch.empty_like(A), dGH, torch.empty_like(h0), dc0


def _setup_context(ctx, inputs, output) -> None:
    mode, reverse, batch_sizes, G, h0, c0, w_hh, b_hh, _save, threads, blas = inputs
    out, _, _, A, C, GH = output
    ctx.where = (mode, reverse, tuple(batch_sizes), threads, blas)
    ctx.save_for_backward(G, h0, c0, w_hh, b_hh, out, A, C, GH)


def _backward(ctx, d_out, d_hn, d_cn, *_saved_outputs):
    mode, reverse, batch_sizes, threads, blas = ctx.where
    G, h0, c0, w_hh, b_hh, out, A, C, GH = ctx.saved_tensors
    lstm, gru = mode == "LSTM", mode == "GRU"
    needs = ctx.needs_input_grad  # (mode, reverse, batch_sizes, G, h0, c0, w_hh, b_hh, ...)
    d_cn = d_cn if lstm else None
    if fused.needs_reference_backward(d_out, d_hn, d_cn):
        # The reference cell with x = G and W_ih = I computes the same step from G.
        eye = torch.eye(G.shape[1], dtype=G.dtype, device=G.device)
        layer = (G, h0, c0 if lstm else None, eye, w_hh, None, b_hh if gru else None, None)
        wanted = (needs[3], needs[4], needs[5], False, needs[6], False, needs[7], False)
        grads = fused.vjp_by_reference(
            (mode, reverse, batch_sizes, None),
            (*wanted, *([False] * 6)),
            (*layer, *([None] * 6)),
            None, None, None,
            (d_out, d_hn, d_cn),
        )  # fmt: skip
        dG, dh0, dc0, _, dw_hh, _, db_hh = grads[:7]
        return None, None, None, dG, dh0, dc0, dw_hh, db_hh, None, None, None
    dG, dGH, dh0, dc0 = native_layer_backward(
        mode, reverse, list(batch_sizes), A, out, _none_if_empty(C), _none_if_empty(GH), h0,
        c0 if lstm else None, w_hh, d_out, d_hn, d_cn, threads, blas,
    )  # fmt: skip
    dY = dGH if gru else dG  # the gradient at W_hh h's output
    dw_hh = None
    if needs[6]:
        prev, _ = fused._prev_rows(batch_sizes, reverse, G.device)
        dw_hh = dY.t() @ torch.cat((out, h0)).index_select(0, prev)  # (G*H, H)
    db_hh = dGH.sum(0) if gru and b_hh is not None and needs[7] else None
    return None, None, None, dG, dh0, dc0 if lstm else None, dw_hh, db_hh, None, None, None


torch.library.register_autograd("rnnkit::native_layer", _backward, setup_context=_setup_context)


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
    *,
    threads: int | None = None,
    blas: bool | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One plain layer and direction, as ``fused.run_layer``: ``(out (N, H), h_n, c_n)``."""
    G = x @ w_ih.t()  # (N, G*H)
    if b_ih is not None:
        G = G + (b_ih if mode == "GRU" else b_ih + b_hh)
    # The loop reads plain row-major memory; users may pass any strides (a permuted h0).
    h0, w_hh = h0.contiguous(), w_hh.contiguous()
    c0 = None if c0 is None else c0.contiguous()
    gru_bias = b_hh.contiguous() if mode == "GRU" and b_hh is not None else None
    tensors = (G, h0, c0, w_hh, gru_bias)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    blas_arg = -1 if blas is None else int(blas)
    out, h_n, c_n, *_ = native_layer(
        mode, reverse, list(batch_sizes), G, h0, c0, w_hh, gru_bias, save, threads or 0, blas_arg
    )
    return out, h_n, (c_n if mode == "LSTM" else None)
