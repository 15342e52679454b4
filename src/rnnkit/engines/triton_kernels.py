"""Triton pointwise kernels of the fused engine.

The Triton twins of :mod:`rnnkit.engines.pointwise`, which is their spec: same functions, same
signatures, same in-place contract. Every kernel works on a ``(BLOCK_B, BLOCK_H)`` tile of one
step's rows; each program loads everything it needs before it stores, so an output may alias an
input of the same shape (as ``h`` does in the GRU and RNN forwards). Math runs in float32 for
float32, bfloat16 and float16 storage and in float64 for float64; results are stored in the storage
dtype. Strides are passed explicitly (Triton specializes the unit ones) and offsets are int64.

Triton is imported here only, and guarded: without it this module still imports and
:func:`available` says False. ``TRITON_INTERPRET=1`` must be set before this module is first
imported for the kernels to run on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# What triton.jit saw when it decorated the kernels below; setting the variable later changes
# nothing.
_INTERPRET = triton is not None and _interpreting()


@_jit
def _tanh(x):
    # tl has no tanh; this form never overflows and keeps its sign exact.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@_jit
def _tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's rows (BLOCK_B, 1) and columns (1, BLOCK_H), int64, and their mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    rows, cols = rows[:, None], cols[None, :]
    return rows, cols, (rows < B) & (cols < H)


@_jit
def lstm_fwd_kernel(
    g_ptr, gh_ptr, c_ptr, cs_ptr, h_ptr, out_ptr,
    B, H,
    sg0, sg1, sgh0, sgh1, sc0, sc1, scs0, scs1, sh0, sh1, so0, so1,
    HAS_H: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, cols, mask = _tile(B, H, BLOCK_B, BLOCK_H)
    g = g_ptr + rows * sg0 + cols * sg1
    gh = gh_ptr + rows * sgh0 + cols * sgh1
    c = c_ptr + rows * sc0 + cols * sc1
    i = tl.load(g, mask=mask).to(ACC) + tl.load(gh, mask=mask).to(ACC)
    f = tl.load(g + H * sg1, mask=mask).to(ACC) + tl.load(gh + H * sgh1, mask=mask).to(ACC)
    gg = tl.load(g + 2 * H * sg1, mask=mask).to(ACC) + tl.load(gh + 2 * H * sgh1, mask=mask).to(ACC)
    o = tl.load(g + 3 * H * sg1, mask=mask).to(ACC) + tl.load(gh + 3 * H * sgh1, mask=mask).to(ACC)
    i, f, gg, o = tl.sigmoid(i), tl.sigmoid(f), _tanh(gg), tl.sigmoid(o)
    c_t = f * tl.load(c, mask=mask).to(ACC) + i * gg
    h_t = o * _tanh(c_t)
    dtype = g_ptr.dtype.element_ty
    tl.store(g, i.to(dtype), mask=mask)
    tl.store(g + H * sg1, f.to(dtype), mask=mask)
    tl.store(g + 2 * H * sg1, gg.to(dtype), mask=mask)
    tl.store(g + 3 * H * sg1, o.to(dtype), mask=mask)
    tl.store(c, c_t.to(dtype), mask=mask)
    tl.store(cs_ptr + rows * scs0 + cols * scs1, c_t.to(dtype), mask=mask)
    tl.store(out_ptr + rows * so0 + cols * so1, h_t.to(dtype), mask=mask)
    if HAS_H:
        tl.store(h_ptr + rows * sh0 + cols * sh1, h_t.to(dtype), mask=mask)


@_jit
def lstm_bwd_kernel(
    g_ptr, c_ptr, cp_ptr, dh_ptr, dc_ptr, dg_ptr,
    B, H,
    sg0, sg1, sc0, sc1, scp0, scp1, sdh0, sdh1, sdc0, sdc1, sdg0, sdg1,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, cols, mask = _tile(B, H, BLOCK_B, BLOCK_H)
    g = g_ptr + rows * sg0 + cols * sg1
    dc = dc_ptr + rows * sdc0 + cols * sdc1
    dg = dg_ptr + rows * sdg0 + cols * sdg1
    i = tl.load(g, mask=mask).to(ACC)
    f = tl.load(g + H * sg1, mask=mask).to(ACC)
    gg = tl.load(g + 2 * H * sg1, mask=mask).to(ACC)
    o = tl.load(g + 3 * H * sg1, mask=mask).to(ACC)
    tc = _tanh(tl.load(c_ptr + rows * sc0 + cols * sc1, mask=mask).to(ACC))
    c_prev = tl.load(cp_ptr + rows * scp0 + cols * scp1, mask=mask).to(ACC)
    dh = tl.load(dh_ptr + rows * sdh0 + cols * sdh1, mask=mask).to(ACC)
    dct = tl.load(dc, mask=mask).to(ACC) + dh * o * (1.0 - tc * tc)
    dtype = dg_ptr.dtype.element_ty
    tl.store(dg, (dct * gg * i * (1.0 - i)).to(dtype), mask=mask)
    tl.store(dg + H * sdg1, (dct * c_prev * f * (1.0 - f)).to(dtype), mask=mask)
    tl.store(dg + 2 * H * sdg1, (dct * i * (1.0 - gg * gg)).to(dtype), mask=mask)
    tl.store(dg + 3 * H * sdg1, (dh * tc * o * (1.0 - o)).to(dtype), mask=mask)
    tl.store(dc, (dct * f).to(dc_ptr.dtype.element_ty), mask=mask)


@_jit
def gru_fwd_kernel(
    g_ptr, gh_ptr, h_ptr, out_ptr,
    B, H,
    sg0, sg1, sgh0, sgh1, sh0, sh1, so0, so1,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, cols, mask = _tile(B, H, BLOCK_B, BLOCK_H)
    g = g_ptr + rows * sg0 + cols * sg1
    gh = gh_ptr + rows * sgh0 + cols * sgh1
    h = h_ptr + rows * sh0 + cols * sh1
    r = tl.sigmoid(tl.load(g, mask=mask).to(ACC) + tl.load(gh, mask=mask).to(ACC))
    z_pre = tl.load(g + H * sg1, mask=mask).to(ACC) + tl.load(gh + H * sgh1, mask=mask).to(ACC)
    z = tl.sigmoid(z_pre)
    n_pre = tl.load(g + 2 * H * sg1, mask=mask).to(ACC)
    n = _tanh(n_pre + r * tl.load(gh + 2 * H * sgh1, mask=mask).to(ACC))
    h_prev = tl.load(h, mask=mask).to(ACC)
    # h_t = (1 - z) * n + z * h_{t-1} = n + z * (h_{t-1} - n)
    h_t = n + z * (h_prev - n)
    dtype = g_ptr.dtype.element_ty
    tl.store(g, r.to(dtype), mask=mask)
    tl.store(g + H * sg1, z.to(dtype), mask=mask)
    tl.store(g + 2 * H * sg1, n.to(dtype), mask=mask)
    tl.store(out_ptr + rows * so0 + cols * so1, h_t.to(dtype), mask=mask)
    tl.store(h, h_t.to(dtype), mask=mask)


@_jit
def gru_bwd_kernel(
    g_ptr, gh_ptr, hp_ptr, dh_ptr, dg_ptr, dgh_ptr, dhp_ptr,
    B, H,
    sg0, sg1, sgh0, sgh1, shp0, shp1, sdh0, sdh1, sdg0, sdg1, sdgh0, sdgh1, sdhp0, sdhp1,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, cols, mask = _tile(B, H, BLOCK_B, BLOCK_H)
    g = g_ptr + rows * sg0 + cols * sg1
    dg = dg_ptr + rows * sdg0 + cols * sdg1
    dgh = dgh_ptr + rows * sdgh0 + cols * sdgh1
    r = tl.load(g, mask=mask).to(ACC)
    z = tl.load(g + H * sg1, mask=mask).to(ACC)
    n = tl.load(g + 2 * H * sg1, mask=mask).to(ACC)
    gh_n = tl.load(gh_ptr + rows * sgh0 + (cols + 2 * H) * sgh1, mask=mask).to(ACC)
    h_prev = tl.load(hp_ptr + rows * shp0 + cols * shp1, mask=mask).to(ACC)
    dh = tl.load(dh_ptr + rows * sdh0 + cols * sdh1, mask=mask).to(ACC)
    dn = dh * (1.0 - z) * (1.0 - n * n)
    dz = dh * (h_prev - n) * z * (1.0 - z)
    dr = dn * gh_n * r * (1.0 - r)
    dtype = dg_ptr.dtype.element_ty
    tl.store(dg, dr.to(dtype), mask=mask)
    tl.store(dg + H * sdg1, dz.to(dtype), mask=mask)
    tl.store(dg + 2 * H * sdg1, dn.to(dtype), mask=mask)
    tl.store(dgh, dr.to(dtype), mask=mask)
    tl.store(dgh + H * sdgh1, dz.to(dtype), mask=mask)
    tl.store(dgh + 2 * H * sdgh1, (dn * r).to(dtype), mask=mask)
    tl.store(dhp_ptr + rows * sdhp0 + cols * sdhp1, (dh * z).to(dtype), mask=mask)


@_jit
def rnn_fwd_kernel(
    g_ptr, gh_ptr, h_ptr, out_ptr,
    B, H,
    sg0, sg1, sgh0, sgh1, sh0, sh1, so0, so1,
    RELU: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, cols, mask = _tile(B, H, BLOCK_B, BLOCK_H)
    x = tl.load(g_ptr + rows * sg0 + cols * sg1, mask=mask).to(ACC)
    x += tl.load(gh_ptr + rows * sgh0 + cols * sgh1, mask=mask).to(ACC)
    if RELU:
        # Not tl.maximum, which may return 0 for NaN: torch.nn's relu propagates it.
        y = tl.where(x < 0.0, 0.0, x)
    else:
        y = _tanh(x)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + rows * so0 + cols * so1, y.to(dtype), mask=mask)
    tl.store(h_ptr + rows * sh0 + cols * sh1, y.to(dtype), mask=mask)


@_jit
def rnn_bwd_kernel(
    h_ptr, dh_ptr, dg_ptr,
    B, H,
    sh0, sh1, sdh0, sdh1, sdg0, sdg1,
    RELU: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, cols, mask = _tile(B, H, BLOCK_B, BLOCK_H)
    h = tl.load(h_ptr + rows * sh0 + cols * sh1, mask=mask).to(ACC)
    dh = tl.load(dh_ptr + rows * sdh0 + cols * sdh1, mask=mask).to(ACC)
    if RELU:
        dg = tl.where(h > 0, dh, 0.0)
    else:
        dg = dh * (1.0 - h * h)
    tl.store(dg_ptr + rows * sdg0 + cols * sdg1, dg.to(dg_ptr.dtype.element_ty), mask=mask)


@_jit
def lstm_persistent_fwd_kernel(
    g_ptr, w_ptr, h0_ptr, c0_ptr, out_ptr, hn_ptr, cn_ptr, bs_ptr, off_ptr,
    T, B, H,
    sg0, sg1, sw0, sw1, sh00, sh01, sc00, sc01, so0, so1, shn0, shn1, scn0, scn1,
    REVERSE: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """All T steps of one LSTM layer and direction for one block of sequences, with W_hh loaded
    once and kept on chip; g holds x W_ih^T + b_ih + b_hh in packed layout."""
    rows, cols, mask = _tile(B, H, BLOCK_B, BLOCK_H)
    # The four gates' blocks of W_hh^T, (BLOCK_H, BLOCK_H) each: w_x[k, j] = W_hh[x * H + j, k].
    k = tl.arange(0, BLOCK_H).to(tl.int64)[:, None]
    w_mask = (k < H) & (cols < H)
    w = w_ptr + cols * sw0 + k * sw1
    w_i = tl.load(w, mask=w_mask, other=0.0)
    w_f = tl.load(w + H * sw0, mask=w_mask, other=0.0)
    w_g = tl.load(w + 2 * H * sw0, mask=w_mask, other=0.0)
    w_o = tl.load(w + 3 * H * sw0, mask=w_mask, other=0.0)
    # Padded rows and columns of the state start at zero and stay there.
    h = tl.load(h0_ptr + rows * sh00 + cols * sh01, mask=mask, other=0.0).to(ACC)
    c = tl.load(c0_ptr + rows * sc00 + cols * sc01, mask=mask, other=0.0).to(ACC)
    for step in range(T):
        t = T - 1 - step if REVERSE else step
        active = rows < tl.load(bs_ptr + t)  # (BLOCK_B, 1): sequences still running at step t
        packed = tl.load(off_ptr + t) + rows
        m = active & (cols < H)
        g = g_ptr + packed * sg0 + cols * sg1
        hw = h.to(w_i.dtype)
        i = tl.load(g, mask=m, other=0.0).to(ACC)
        i = tl.sigmoid(tl.dot(hw, w_i, acc=i, input_precision="ieee"))
        f = tl.load(g + H * sg1, mask=m, other=0.0).to(ACC)
        f = tl.sigmoid(tl.dot(hw, w_f, acc=f, input_precision="ieee"))
        gg = tl.load(g + 2 * H * sg1, mask=m, other=0.0).to(ACC)
        gg = _tanh(tl.dot(hw, w_g, acc=gg, input_precision="ieee"))
        o = tl.load(g + 3 * H * sg1, mask=m, other=0.0).to(ACC)
        o = tl.sigmoid(tl.dot(hw, w_o, acc=o, input_precision="ieee"))
        c_t = f * c + i * gg
        h_t = o * _tanh(c_t)
        tl.store(out_ptr + packed * so0 + cols * so1, h_t.to(out_ptr.dtype.element_ty), mask=m)
        # A finished sequence keeps its state, which is its h_n and c_n.
        c = tl.where(active, c_t, c)
        h = tl.where(active, h_t, h)
    tl.store(hn_ptr + rows * shn0 + cols * shn1, h.to(hn_ptr.dtype.element_ty), mask=mask)
    tl.store(cn_ptr + rows * scn0 + cols * scn1, c.to(cn_ptr.dtype.element_ty), mask=mask)


_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def unavailable_reason(dtype: torch.dtype, device: torch.device | None = None) -> str | None:
    """Why these kernels cannot run for ``dtype`` on ``device`` (any CUDA device when None), or
    None when they can."""
    if triton is None:
        return "Triton is not installed (pip install triton)"
    if dtype not in _DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in _DTYPES)
        return f"the Triton kernels support {names}; got {str(dtype).removeprefix('torch.')}"
    if _INTERPRET:
        return None
    if device is not None and device.type != "cuda":
        return (
            f"the Triton kernels run on CUDA tensors, or on any device with TRITON_INTERPRET=1 "
            f"set before rnnkit.engines.triton_kernels is imported; got a {device.type} tensor"
        )
    if not torch.cuda.is_available():
        return "no CUDA device, and TRITON_INTERPRET=1 was not set when the kernels were built"
    return None


def available(dtype: torch.dtype, device: torch.device | None = None) -> bool:
    """True when the kernels run for ``dtype`` on ``device``: Triton imports, the dtype is one of
    float32, float64, bfloat16, float16, and the device is CUDA (any CUDA device when None) or
    the kernels were built under ``TRITON_INTERPRET=1``."""
    return unavailable_reason(dtype, device) is None


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _launch(kernel, tensors: list[Tensor | None], B: int, H: int, *constexprs) -> None:
    """Launch ``kernel`` over a (B, H) step; each tensor passes its pointer, then all strides."""
    if B == 0 or H == 0:
        return
    BLOCK_H = min(triton.next_power_of_2(H), 256)
    BLOCK_B = min(triton.next_power_of_2(B), max(1, 2048 // BLOCK_H))
    grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(H, BLOCK_H))
    # A missing optional tensor (LSTM h) is never touched; any real tensor stands in for it.
    present = next(t for t in tensors if t is not None)
    tensors = [present if t is None else t for t in tensors]
    strides = [s for t in tensors for s in t.stride()]
    acc = _acc(present.dtype)
    kernel[grid](*tensors, B, H, *strides, *constexprs, acc, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H)


def lstm_forward(
    g: Tensor, gh: Tensor, c: Tensor, c_save: Tensor, h: Tensor | None, out: Tensor
) -> None:
    """See :func:`rnnkit.engines.pointwise.lstm_forward`."""
    B, H = c.shape
    _launch(lstm_fwd_kernel, [g, gh, c, c_save, h, out], B, H, h is not None)


def lstm_backward(g: Tensor, c: Tensor, c_prev: Tensor, dh: Tensor, dc: Tensor, dg: Tensor) -> None:
    """See :func:`rnnkit.engines.pointwise.lstm_backward`."""
    B, H = c.shape
    _launch(lstm_bwd_kernel, [g, c, c_prev, dh, dc, dg], B, H)


def gru_forward(g: Tensor, gh: Tensor, h: Tensor, out: Tensor) -> None:
    """See :func:`rnnkit.engines.pointwise.gru_forward`."""
    B, H = h.shape
    _launch(gru_fwd_kernel, [g, gh, h, out], B, H)


def gru_backward(
    g: Tensor, gh: Tensor, h_prev: Tensor, dh: Tensor, dg: Tensor, dgh: Tensor, dh_prev: Tensor
) -> None:
    """See :func:`rnnkit.engines.pointwise.gru_backward`."""
    B, H = h_prev.shape
    _launch(gru_bwd_kernel, [g, gh, h_prev, dh, dg, dgh, dh_prev], B, H)


def rnn_forward(g: Tensor, gh: Tensor, h: Tensor, out: Tensor, relu: bool) -> None:
    """See :func:`rnnkit.engines.pointwise.rnn_forward`."""
    B, H = g.shape
    _launch(rnn_fwd_kernel, [g, gh, h, out], B, H, relu)


def rnn_backward(h: Tensor, dh: Tensor, dg: Tensor, relu: bool) -> None:
    """See :func:`rnnkit.engines.pointwise.rnn_backward`."""
    B, H = h.shape
    _launch(rnn_bwd_kernel, [h, dh, dg], B, H, relu)


PERSISTENT_MAX_H = 64


def lstm_persistent_forward(
    G: Tensor,
    w_hh: Tensor,
    h0: Tensor,
    c0: Tensor,
    batch_sizes: tuple[int, ...],
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Inference forward of one LSTM layer and direction in a single launch (no projection).

    ``G`` (N, 4H) is ``x @ w_ih.T + b_ih + b_hh`` in packed layout for ``batch_sizes`` (padded
    data is ``(B,) * T``); ``w_hh`` (4H, H); ``h0``, ``c0`` (B, H). Returns ``out`` (N, H),
    ``h_n`` and ``c_n`` (B, H), as :class:`rnnkit.engines.fused.FusedLayer` does, without saving
    anything for backward. One program per block of 16 sequences walks all steps with ``W_hh``
    held on chip, so ``H`` is at most ``PERSISTENT_MAX_H``; float32 (IEEE products, no TF32),
    float64, bfloat16 and float16, accumulating in float32 (float64 for float64).
    """
    N, H = G.shape[0], w_hh.shape[1]
    if H > PERSISTENT_MAX_H:
        raise ValueError(
            f"lstm_persistent_forward: hidden size must be at most {PERSISTENT_MAX_H}; got {H}"
        )
    if w_hh.shape != (4 * H, H) or G.shape[1] != 4 * H:
        raise ValueError(
            f"lstm_persistent_forward: expected w_hh (4H, H) and G (N, 4H) with H={H}; "
            f"got w_hh {tuple(w_hh.shape)} and G {tuple(G.shape)}"
        )
    if sum(batch_sizes) != N:
        raise ValueError(
            f"lstm_persistent_forward: batch_sizes sum to {sum(batch_sizes)}, but G has {N} rows"
        )
    B, T = h0.shape[0], len(batch_sizes)
    out = G.new_empty(N, H)
    h_n, c_n = torch.empty_like(h0), torch.empty_like(c0)
    bs = torch.tensor(batch_sizes, dtype=torch.int64, device=G.device)
    offsets = torch.cumsum(bs, 0) - bs  # (T,): first packed row of each step
    BLOCK_B, BLOCK_H = 16, max(16, triton.next_power_of_2(H))  # tl.dot needs 16 or more
    tensors = [G, w_hh, h0, c0, out, h_n, c_n]
    strides = [s for t in tensors for s in t.stride()]
    grid = (triton.cdiv(B, BLOCK_B),)
    lstm_persistent_fwd_kernel[grid](
        *tensors, bs, offsets, T, B, H, *strides, reverse, _acc(G.dtype),
        BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, num_warps=8,
    )  # fmt: skip
    return out, h_n, c_n
