"""The triton engine's kernels: per-step pointwise kernels and the persistent LSTM kernel.

The Triton twins of :mod:`rnnkit.engines.triton.twins`, which is their spec: same functions, same
signatures, same in-place contract. Every kernel works on a ``(BLOCK_B, BLOCK_H)`` tile of one
step's rows; each program loads everything it needs before it stores, so an output may alias an
input of the same shape (as ``h`` does in the GRU and RNN forwards). Math runs in float32 for
float32, bfloat16 and float16 storage and in float64 for float64; results are stored in the storage
dtype. Strides are passed explicitly (Triton specializes the unit ones) and offsets are int64.
The plain steps, zoneout's (LSTM, GRU), the layer-norm LSTM step and the row layer norm of the
layer-norm GRU (whose programs own whole rows, for the norms' statistics) all have a forward and
a backward kernel; plain LSTM inference at small H also has a persistent kernel that runs all
steps in one launch.

Tiles depend on H only and the batch size is not specialised, so that the shrinking batches of a
packed sequence reuse one compiled kernel. A kernel that fails to compile or launch (an old GPU,
an unknown Triton, a compiler error) makes its launcher warn once and run its torch-op twin from
then on. A compiler *abort* cannot be caught in the process: ``tools/triton_aot.py``
compiles every kernel ahead of time for sm_80, sm_90 and sm_100 in CI to rule it out.

Triton is imported here only, and guarded: without it this module still imports and
:func:`available` says False. ``TRITON_INTERPRET=1`` must be set before this module is first
imported for the kernels to run on the CPU through Triton's interpreter.
"""

from __future__ import annotations

import functools
import os
import struct
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from rnnkit.engines.shared import offsets as _offsets
from rnnkit.engines.spec import LN_EPS
from rnnkit.engines.triton import twins

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def _jit(fn=None, **options):
    """``triton.jit`` when Triton imports (the function itself otherwise, never called)."""
    if fn is None:
        return lambda f: _jit(f, **options)
    return fn if triton is None else triton.jit(fn, **options)


# Kernels over one step's rows take B, the number of rows, unspecialised: packed batches shrink
# step by step, and a B specialised as 1 or as a multiple of 16 would compile new code mid-run.
_step_kernel = _jit(do_not_specialize=["B"])


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
def _tanh_by_sigmoid(x):
    # _tanh's select on the sign, applied to a float32 tl.dot(input_precision="ieee") result,
    # aborts LLVM's SLP vectorizer in Triton 3.9 for sm_90 and sm_100 (the AOT test's find).
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@_jit
def _tile(B, H, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's rows (BLOCK_B, 1) and columns (1, BLOCK_H), int64, and their mask."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H).to(tl.int64)
    rows, cols = rows[:, None], cols[None, :]
    return rows, cols, (rows < B) & (cols < H)


@_step_kernel
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


@_step_kernel
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


@_step_kernel
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


@_step_kernel
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


@_step_kernel
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


@_step_kernel
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
def _keep(ptr, rows, cols, s0, s1, mask, p_hi, p_lo, MASKED: tl.constexpr, ACC: tl.constexpr):
    """Zoneout's weight of the previous value: the mask's entries, or the probability in eval
    (passed as two float32 halves, so that float64 layers get it to 48 bits)."""
    if MASKED:
        w = tl.load(ptr + rows * s0 + cols * s1, mask=mask, other=0.0).to(ACC)
    else:
        w = tl.cast(p_hi, ACC) + tl.cast(p_lo, ACC)
    return w


@_jit
def _lerp(start, end, w):
    # torch.lerp's two-sided form, exact at w = 0 and at w = 1 (zoneout's masks).
    return tl.where(w < 0.5, start + w * (end - start), end - (end - start) * (1.0 - w))


@_step_kernel
def lstm_fwd_zoneout_kernel(
    g_ptr, gh_ptr, c_ptr, cs_ptr, cz_ptr, h_ptr, out_ptr, zh_ptr, zc_ptr,
    B, H, ph_hi, ph_lo, pc_hi, pc_lo,
    sg0, sg1, sgh0, sgh1, sc0, sc1, scs0, scs1, scz0, scz1, sh0, sh1, so0, so1,
    szh0, szh1, szc0, szc1,
    ZH_MASK: tl.constexpr, ZC_MASK: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    rows, cols, mask = _tile(B, H, BLOCK_B, BLOCK_H)
    g = g_ptr + rows * sg0 + cols * sg1
    gh = gh_ptr + rows * sgh0 + cols * sgh1
    c = c_ptr + rows * sc0 + cols * sc1
    h = h_ptr + rows * sh0 + cols * sh1
    i = tl.sigmoid(tl.load(g, mask=mask).to(ACC) + tl.load(gh, mask=mask).to(ACC))
    f = tl.load(g + H * sg1, mask=mask).to(ACC) + tl.load(gh + H * sgh1, mask=mask).to(ACC)
    gg = tl.load(g + 2 * H * sg1, mask=mask).to(ACC) + tl.load(gh + 2 * H * sgh1, mask=mask).to(ACC)
    o = tl.load(g + 3 * H * sg1, mask=mask).to(ACC) + tl.load(gh + 3 * H * sgh1, mask=mask).to(ACC)
    f, gg, o = tl.sigmoid(f), _tanh(gg), tl.sigmoid(o)
    c_prev = tl.load(c, mask=mask).to(ACC)
    h_prev = tl.load(h, mask=mask).to(ACC)
    c_cell = f * c_prev + i * gg
    h_cell = o * _tanh(c_cell)
    kc = _keep(zc_ptr, rows, cols, szc0, szc1, mask, pc_hi, pc_lo, ZC_MASK, ACC)
    kh = _keep(zh_ptr, rows, cols, szh0, szh1, mask, ph_hi, ph_lo, ZH_MASK, ACC)
    c_t = _lerp(c_cell, c_prev, kc)
    h_t = _lerp(h_cell, h_prev, kh)
    dtype = g_ptr.dtype.element_ty
    tl.store(g, i.to(dtype), mask=mask)
    tl.store(g + H * sg1, f.to(dtype), mask=mask)
    tl.store(g + 2 * H * sg1, gg.to(dtype), mask=mask)
    tl.store(g + 3 * H * sg1, o.to(dtype), mask=mask)
    tl.store(cs_ptr + rows * scs0 + cols * scs1, c_cell.to(dtype), mask=mask)
    tl.store(c, c_t.to(dtype), mask=mask)
    tl.store(cz_ptr + rows * scz0 + cols * scz1, c_t.to(dtype), mask=mask)
    tl.store(out_ptr + rows * so0 + cols * so1, h_t.to(dtype), mask=mask)
    tl.store(h, h_t.to(dtype), mask=mask)


@_step_kernel
def lstm_bwd_zoneout_kernel(
    g_ptr, c_ptr, cp_ptr, dh_ptr, dc_ptr, dg_ptr, dhc_ptr, zh_ptr, zc_ptr,
    B, H, ph_hi, ph_lo, pc_hi, pc_lo,
    sg0, sg1, sc0, sc1, scp0, scp1, sdh0, sdh1, sdc0, sdc1, sdg0, sdg1, sdhc0, sdhc1,
    szh0, szh1, szc0, szc1,
    ZH_MASK: tl.constexpr, ZC_MASK: tl.constexpr, ACC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
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
    kc = _keep(zc_ptr, rows, cols, szc0, szc1, mask, pc_hi, pc_lo, ZC_MASK, ACC)
    kh = _keep(zh_ptr, rows, cols, szh0, szh1, mask, ph_hi, ph_lo, ZH_MASK, ACC)
    dh_all = tl.load(dh_ptr + rows * sdh0 + cols * sdh1, mask=mask).to(ACC)
    dc_all = tl.load(dc, mask=mask).to(ACC)
    # Zoneout carries kh * dh and kc * dc past the cell to h_{t-1} and c_{t-1}.
    carry_h = dh_all * kh
    carry_c = dc_all * kc
    dh = dh_all - carry_h
    dct = dc_all - carry_c + dh * o * (1.0 - tc * tc)
    dtype = dg_ptr.dtype.element_ty
    tl.store(dg, (dct * gg * i * (1.0 - i)).to(dtype), mask=mask)
    tl.store(dg + H * sdg1, (dct * c_prev * f * (1.0 - f)).to(dtype), mask=mask)
    tl.store(dg + 2 * H * sdg1, (dct * i * (1.0 - gg * gg)).to(dtype), mask=mask)
    tl.store(dg + 3 * H * sdg1, (dh * tc * o * (1.0 - o)).to(dtype), mask=mask)
    tl.store(dc, (dct * f + carry_c).to(dc_ptr.dtype.element_ty), mask=mask)
    tl.store(dhc_ptr + rows * sdhc0 + cols * sdhc1, carry_h.to(dtype), mask=mask)


@_step_kernel
def gru_fwd_zoneout_kernel(
    g_ptr, gh_ptr, h_ptr, out_ptr, zh_ptr,
    B, H, p_hi, p_lo,
    sg0, sg1, sgh0, sgh1, sh0, sh1, so0, so1, szh0, szh1,
    MASKED: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
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
    k = _keep(zh_ptr, rows, cols, szh0, szh1, mask, p_hi, p_lo, MASKED, ACC)
    h_t = _lerp(n + z * (h_prev - n), h_prev, k)
    dtype = g_ptr.dtype.element_ty
    tl.store(g, r.to(dtype), mask=mask)
    tl.store(g + H * sg1, z.to(dtype), mask=mask)
    tl.store(g + 2 * H * sg1, n.to(dtype), mask=mask)
    tl.store(out_ptr + rows * so0 + cols * so1, h_t.to(dtype), mask=mask)
    tl.store(h, h_t.to(dtype), mask=mask)


@_step_kernel
def gru_bwd_zoneout_kernel(
    g_ptr, gh_ptr, hp_ptr, dh_ptr, dg_ptr, dgh_ptr, dhp_ptr, zh_ptr,
    B, H, p_hi, p_lo,
    sg0, sg1, sgh0, sgh1, shp0, shp1, sdh0, sdh1, sdg0, sdg1, sdgh0, sdgh1, sdhp0, sdhp1,
    szh0, szh1,
    MASKED: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
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
    k = _keep(zh_ptr, rows, cols, szh0, szh1, mask, p_hi, p_lo, MASKED, ACC)
    dh_all = tl.load(dh_ptr + rows * sdh0 + cols * sdh1, mask=mask).to(ACC)
    carry = dh_all * k
    dh = dh_all - carry
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
    tl.store(dhp_ptr + rows * sdhp0 + cols * sdhp1, (dh * z + carry).to(dtype), mask=mask)


@_jit
def _row_stats(x_ptr, rows, s0, W, rmask, BLOCK_H: tl.constexpr, ACC: tl.constexpr):
    """Mean and variance (biased, two passes) of the first W entries of each row, (BLOCK_B, 1)."""
    total = tl.zeros(rmask.shape, ACC)
    for j in range(0, W, BLOCK_H):
        cols = j + tl.arange(0, BLOCK_H).to(tl.int64)[None, :]
        m = rmask & (cols < W)
        x = tl.load(x_ptr + rows * s0 + cols, mask=m, other=0.0).to(ACC)
        total += tl.sum(x, axis=1, keep_dims=True)
    mean = total / W
    total = tl.zeros(rmask.shape, ACC)
    for j in range(0, W, BLOCK_H):
        cols = j + tl.arange(0, BLOCK_H).to(tl.int64)[None, :]
        m = rmask & (cols < W)
        d = tl.where(m, tl.load(x_ptr + rows * s0 + cols, mask=m, other=0.0).to(ACC) - mean, 0.0)
        total += tl.sum(d * d, axis=1, keep_dims=True)
    return mean, total / W


@_jit
def _rsqrt(x, ACC: tl.constexpr):
    # Correctly rounded, as torch's layer norm: tl.sqrt is approximate in float32, and
    # tl.sqrt_rn takes float32 only.
    if ACC == tl.float32:
        y = tl.div_rn(1.0, tl.sqrt_rn(x))
    else:
        y = 1.0 / tl.sqrt(x)
    return y


@_jit
def _ln_gate(g_ptr, z_ptr, w_ptr, b_ptr, rows, cols, sg0, sz0, m, cm, mean, rstd,
             ACC: tl.constexpr):  # fmt: skip
    """One gate's pre-activation at columns ``cols`` of g and z (``cm``: the columns inside
    the gate): the input side plus the layer norm of the recurrent side."""
    z = tl.load(z_ptr + rows * sz0 + cols, mask=m, other=0.0).to(ACC)
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(ACC)
    b = tl.load(b_ptr + cols, mask=cm, other=0.0).to(ACC)
    return tl.load(g_ptr + rows * sg0 + cols, mask=m, other=0.0).to(ACC) + (z - mean) * rstd * w + b


@_step_kernel
def ln_lstm_fwd_kernel(
    g_ptr, z_ptr, hw_ptr, hb_ptr, muh_ptr, rsh_ptr, c_ptr, cs_ptr, cn_ptr, muc_ptr, rsc_ptr,
    cw_ptr, cb_ptr, out_ptr,
    B, H, eps_hi, eps_lo,
    sg0, sz0, smuh0, srsh0, sc0, scs0, scn0, smuc0, srsc0, so0,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """The layer-norm LSTM step over rows of unit column stride; a program owns BLOCK_B whole
    rows and walks them in chunks of BLOCK_H columns: the statistics of z (4H wide), the gates
    and c_t, the statistics of c_t, then LN(c_t) and h_t."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)[:, None]
    rmask = rows < B
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    mean_h, var_h = _row_stats(z_ptr, rows, sz0, 4 * H, rmask, BLOCK_H, ACC)
    rstd_h = _rsqrt(var_h + eps, ACC)
    dtype = g_ptr.dtype.element_ty
    tl.store(muh_ptr + rows * smuh0, mean_h.to(dtype), mask=rmask)
    tl.store(rsh_ptr + rows * srsh0, rstd_h.to(dtype), mask=rmask)
    for j in range(0, H, BLOCK_H):
        cols = j + tl.arange(0, BLOCK_H).to(tl.int64)[None, :]
        m = rmask & (cols < H)
        cm = cols < H
        i = _ln_gate(g_ptr, z_ptr, hw_ptr, hb_ptr, rows, cols, sg0, sz0, m, cm, mean_h, rstd_h,
                     ACC)  # fmt: skip
        f = _ln_gate(g_ptr + H, z_ptr + H, hw_ptr + H, hb_ptr + H, rows, cols, sg0, sz0, m, cm,
                     mean_h, rstd_h, ACC)  # fmt: skip
        gg = _ln_gate(g_ptr + 2 * H, z_ptr + 2 * H, hw_ptr + 2 * H, hb_ptr + 2 * H, rows, cols,
                      sg0, sz0, m, cm, mean_h, rstd_h, ACC)  # fmt: skip
        o = _ln_gate(g_ptr + 3 * H, z_ptr + 3 * H, hw_ptr + 3 * H, hb_ptr + 3 * H, rows, cols,
                     sg0, sz0, m, cm, mean_h, rstd_h, ACC)  # fmt: skip
        i, f, gg, o = tl.sigmoid(i), tl.sigmoid(f), _tanh(gg), tl.sigmoid(o)
        c = c_ptr + rows * sc0 + cols
        c_t = (f * tl.load(c, mask=m, other=0.0).to(ACC) + i * gg).to(dtype)
        g = g_ptr + rows * sg0 + cols
        tl.store(g, i.to(dtype), mask=m)
        tl.store(g + H, f.to(dtype), mask=m)
        tl.store(g + 2 * H, gg.to(dtype), mask=m)
        tl.store(g + 3 * H, o.to(dtype), mask=m)
        tl.store(c, c_t, mask=m)
        tl.store(cs_ptr + rows * scs0 + cols, c_t, mask=m)
    # The next passes read what other threads of this program stored.
    tl.debug_barrier()
    mean_c, var_c = _row_stats(cs_ptr, rows, scs0, H, rmask, BLOCK_H, ACC)
    rstd_c = _rsqrt(var_c + eps, ACC)
    tl.store(muc_ptr + rows * smuc0, mean_c.to(dtype), mask=rmask)
    tl.store(rsc_ptr + rows * srsc0, rstd_c.to(dtype), mask=rmask)
    for j in range(0, H, BLOCK_H):
        cols = j + tl.arange(0, BLOCK_H).to(tl.int64)[None, :]
        m = rmask & (cols < H)
        c_t = tl.load(cs_ptr + rows * scs0 + cols, mask=m, other=0.0).to(ACC)
        w = tl.load(cw_ptr + cols, mask=cols < H, other=0.0).to(ACC)
        b = tl.load(cb_ptr + cols, mask=cols < H, other=0.0).to(ACC)
        cn = ((c_t - mean_c) * rstd_c * w + b).to(dtype)
        o = tl.load(g_ptr + rows * sg0 + cols + 3 * H, mask=m, other=0.0).to(ACC)
        tl.store(cn_ptr + rows * scn0 + cols, cn, mask=m)
        tl.store(out_ptr + rows * so0 + cols, (o * _tanh(cn.to(ACC))).to(dtype), mask=m)


@_jit
def _ln_input_grad_sums(dy, w, x, mean, rstd):
    """Per row, the sums of dy * w and of dy * w * x^ that a layer norm's input gradient needs."""
    wdy = dy * w
    return tl.sum(wdy, axis=1, keep_dims=True), tl.sum(
        wdy * (x - mean) * rstd, axis=1, keep_dims=True
    )


@_jit
def _ln_gate_grad_sums(d, z_ptr, w_ptr, rows, cols, sz0, m, cm, mean, rstd, ACC: tl.constexpr):
    """:func:`_ln_input_grad_sums` of one gate's gradient ``d`` against its z and gains."""
    z = tl.load(z_ptr + rows * sz0 + cols, mask=m, other=0.0).to(ACC)
    w = tl.load(w_ptr + cols, mask=cm, other=0.0).to(ACC)
    return _ln_input_grad_sums(d.to(ACC), w, z, mean, rstd)


@_step_kernel
def ln_lstm_bwd_kernel(
    g_ptr, c_ptr, cp_ptr, cn_ptr, muc_ptr, rsc_ptr, cw_ptr, z_ptr, muh_ptr, rsh_ptr, hw_ptr,
    dh_ptr, dc_ptr, dg_ptr, dcn_ptr, dz_ptr,
    B, H,
    sg0, sc0, scp0, scn0, smuc0, srsc0, sz0, smuh0, srsh0, sdh0, sdc0, sdg0, sdcn0, sdz0,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Backward of :func:`ln_lstm_fwd_kernel`, in three passes over each row: dL/dLN(c_t) and
    its layer-norm sums, the gates' gradients and their layer-norm sums, then dL/dz."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)[:, None]
    rmask = rows < B
    dtype = dg_ptr.dtype.element_ty
    mean_c = tl.load(muc_ptr + rows * smuc0, mask=rmask, other=0.0).to(ACC)
    rstd_c = tl.load(rsc_ptr + rows * srsc0, mask=rmask, other=0.0).to(ACC)
    a_c = tl.zeros(rmask.shape, ACC)
    b_c = tl.zeros(rmask.shape, ACC)
    for j in range(0, H, BLOCK_H):
        cols = j + tl.arange(0, BLOCK_H).to(tl.int64)[None, :]
        m = rmask & (cols < H)
        o = tl.load(g_ptr + rows * sg0 + cols + 3 * H, mask=m, other=0.0).to(ACC)
        tc = _tanh(tl.load(cn_ptr + rows * scn0 + cols, mask=m, other=0.0).to(ACC))
        dh = tl.load(dh_ptr + rows * sdh0 + cols, mask=m, other=0.0).to(ACC)
        dcn = (dh * o * (1.0 - tc * tc)).to(dtype)
        tl.store(dcn_ptr + rows * sdcn0 + cols, dcn, mask=m)
        c_t = tl.load(c_ptr + rows * sc0 + cols, mask=m, other=0.0).to(ACC)
        w = tl.load(cw_ptr + cols, mask=cols < H, other=0.0).to(ACC)
        a, b = _ln_input_grad_sums(dcn.to(ACC), w, c_t, mean_c, rstd_c)
        a_c += a
        b_c += b
    a_c, b_c = a_c / H, b_c / H
    mean_h = tl.load(muh_ptr + rows * smuh0, mask=rmask, other=0.0).to(ACC)
    rstd_h = tl.load(rsh_ptr + rows * srsh0, mask=rmask, other=0.0).to(ACC)
    a_h = tl.zeros(rmask.shape, ACC)
    b_h = tl.zeros(rmask.shape, ACC)
    for j in range(0, H, BLOCK_H):
        cols = j + tl.arange(0, BLOCK_H).to(tl.int64)[None, :]
        m = rmask & (cols < H)
        g = g_ptr + rows * sg0 + cols
        i = tl.load(g, mask=m, other=0.0).to(ACC)
        f = tl.load(g + H, mask=m, other=0.0).to(ACC)
        gg = tl.load(g + 2 * H, mask=m, other=0.0).to(ACC)
        o = tl.load(g + 3 * H, mask=m, other=0.0).to(ACC)
        tc = _tanh(tl.load(cn_ptr + rows * scn0 + cols, mask=m, other=0.0).to(ACC))
        dh = tl.load(dh_ptr + rows * sdh0 + cols, mask=m, other=0.0).to(ACC)
        dcn = (dh * o * (1.0 - tc * tc)).to(dtype).to(ACC)
        c_hat = (tl.load(c_ptr + rows * sc0 + cols, mask=m, other=0.0).to(ACC) - mean_c) * rstd_c
        w_c = tl.load(cw_ptr + cols, mask=cols < H, other=0.0).to(ACC)
        dc = dc_ptr + rows * sdc0 + cols
        dct = tl.load(dc, mask=m, other=0.0).to(ACC) + rstd_c * (dcn * w_c - a_c - c_hat * b_c)
        c_prev = tl.load(cp_ptr + rows * scp0 + cols, mask=m, other=0.0).to(ACC)
        d_i = (dct * gg * i * (1.0 - i)).to(dtype)
        d_f = (dct * c_prev * f * (1.0 - f)).to(dtype)
        d_g = (dct * i * (1.0 - gg * gg)).to(dtype)
        d_o = (dh * tc * o * (1.0 - o)).to(dtype)
        dg = dg_ptr + rows * sdg0 + cols
        tl.store(dg, d_i, mask=m)
        tl.store(dg + H, d_f, mask=m)
        tl.store(dg + 2 * H, d_g, mask=m)
        tl.store(dg + 3 * H, d_o, mask=m)
        tl.store(dc, (dct * f).to(dc_ptr.dtype.element_ty), mask=m)
        cm = cols < H
        a, b = _ln_gate_grad_sums(d_i, z_ptr, hw_ptr, rows, cols, sz0, m, cm, mean_h, rstd_h, ACC)
        a_h, b_h = a_h + a, b_h + b
        a, b = _ln_gate_grad_sums(d_f, z_ptr + H, hw_ptr + H, rows, cols, sz0, m, cm, mean_h,
                                  rstd_h, ACC)  # fmt: skip
        a_h, b_h = a_h + a, b_h + b
        a, b = _ln_gate_grad_sums(d_g, z_ptr + 2 * H, hw_ptr + 2 * H, rows, cols, sz0, m, cm,
                                  mean_h, rstd_h, ACC)  # fmt: skip
        a_h, b_h = a_h + a, b_h + b
        a, b = _ln_gate_grad_sums(d_o, z_ptr + 3 * H, hw_ptr + 3 * H, rows, cols, sz0, m, cm,
                                  mean_h, rstd_h, ACC)  # fmt: skip
        a_h, b_h = a_h + a, b_h + b
    a_h, b_h = a_h / (4 * H), b_h / (4 * H)
    # The last pass reads the gates' gradients that other threads of this program stored.
    tl.debug_barrier()
    for j in range(0, 4 * H, BLOCK_H):
        cols = j + tl.arange(0, BLOCK_H).to(tl.int64)[None, :]
        m = rmask & (cols < 4 * H)
        d = tl.load(dg_ptr + rows * sdg0 + cols, mask=m, other=0.0).to(ACC)
        z_hat = (tl.load(z_ptr + rows * sz0 + cols, mask=m, other=0.0).to(ACC) - mean_h) * rstd_h
        w = tl.load(hw_ptr + cols, mask=cols < 4 * H, other=0.0).to(ACC)
        dz = rstd_h * (d * w - a_h - z_hat * b_h)
        tl.store(dz_ptr + rows * sdz0 + cols, dz.to(dz_ptr.dtype.element_ty), mask=m)


@_step_kernel
def layer_norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mu_ptr, rs_ptr,
    B, W, eps_hi, eps_lo,
    sx0, sy0, smu0, srs0,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Layer norm of B rows W wide (unit column stride); a program owns BLOCK_B whole rows and
    walks them in chunks of BLOCK_H columns: two passes for the statistics, one for y."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)[:, None]
    rmask = rows < B
    eps = tl.cast(eps_hi, ACC) + tl.cast(eps_lo, ACC)
    mean, var = _row_stats(x_ptr, rows, sx0, W, rmask, BLOCK_H, ACC)
    rstd = _rsqrt(var + eps, ACC)
    tl.store(mu_ptr + rows * smu0, mean.to(mu_ptr.dtype.element_ty), mask=rmask)
    tl.store(rs_ptr + rows * srs0, rstd.to(rs_ptr.dtype.element_ty), mask=rmask)
    for j in range(0, W, BLOCK_H):
        cols = j + tl.arange(0, BLOCK_H).to(tl.int64)[None, :]
        m = rmask & (cols < W)
        x = tl.load(x_ptr + rows * sx0 + cols, mask=m, other=0.0).to(ACC)
        w = tl.load(w_ptr + cols, mask=cols < W, other=0.0).to(ACC)
        b = tl.load(b_ptr + cols, mask=cols < W, other=0.0).to(ACC)
        y = (x - mean) * rstd * w + b
        tl.store(y_ptr + rows * sy0 + cols, y.to(y_ptr.dtype.element_ty), mask=m)


@_step_kernel
def layer_norm_bwd_kernel(
    dy_ptr, x_ptr, mu_ptr, rs_ptr, w_ptr, dx_ptr,
    B, W,
    sdy0, sx0, smu0, srs0, sdx0,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """Input gradient of :func:`layer_norm_fwd_kernel` from its saved statistics, in two passes
    over each row: the sums of dy * w and dy * w * x^, then dx."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)[:, None]
    rmask = rows < B
    mean = tl.load(mu_ptr + rows * smu0, mask=rmask, other=0.0).to(ACC)
    rstd = tl.load(rs_ptr + rows * srs0, mask=rmask, other=0.0).to(ACC)
    a_sum = tl.zeros(rmask.shape, ACC)
    b_sum = tl.zeros(rmask.shape, ACC)
    for j in range(0, W, BLOCK_H):
        cols = j + tl.arange(0, BLOCK_H).to(tl.int64)[None, :]
        m = rmask & (cols < W)
        dy = tl.load(dy_ptr + rows * sdy0 + cols, mask=m, other=0.0).to(ACC)
        x = tl.load(x_ptr + rows * sx0 + cols, mask=m, other=0.0).to(ACC)
        w = tl.load(w_ptr + cols, mask=cols < W, other=0.0).to(ACC)
        a, b = _ln_input_grad_sums(dy, w, x, mean, rstd)
        a_sum += a
        b_sum += b
    a_sum, b_sum = a_sum / W, b_sum / W
    for j in range(0, W, BLOCK_H):
        cols = j + tl.arange(0, BLOCK_H).to(tl.int64)[None, :]
        m = rmask & (cols < W)
        dy = tl.load(dy_ptr + rows * sdy0 + cols, mask=m, other=0.0).to(ACC)
        x_hat = (tl.load(x_ptr + rows * sx0 + cols, mask=m, other=0.0).to(ACC) - mean) * rstd
        w = tl.load(w_ptr + cols, mask=cols < W, other=0.0).to(ACC)
        dx = rstd * (dy * w - a_sum - x_hat * b_sum)
        tl.store(dx_ptr + rows * sdx0 + cols, dx.to(dx_ptr.dtype.element_ty), mask=m)


@_jit(do_not_specialize=["T", "B", "reverse", "packed"])
def lstm_persistent_fwd_kernel(
    g_ptr, w_ptr, h0_ptr, c0_ptr, out_ptr, hn_ptr, cn_ptr, bs_ptr, off_ptr,
    T, B, H, reverse, packed,
    sg0, sg1, sw0, sw1, sh00, sh01, sc00, sc01, so0, so1, shn0, shn1, scn0, scn1,
    ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):  # fmt: skip
    """All T steps of one LSTM layer and direction for one block of sequences; g holds
    x W_ih^T + b_ih + b_hh in packed layout (padded: T blocks of B rows unless ``packed``)."""
    rows, cols, mask = _tile(B, H, BLOCK_B, BLOCK_H)
    # The four gates' blocks of W_hh^T, (BLOCK_H, BLOCK_H) each: w_x[k, j] = W_hh[x * H + j, k].
    # Read again at every step, from L1/L2: held in registers they would take 4 * BLOCK_H^2
    # values across the program's threads and leave no room for a second program on the SM.
    k = tl.arange(0, BLOCK_H).to(tl.int64)[:, None]
    w_mask = (k < H) & (cols < H)
    w = w_ptr + cols * sw0 + k * sw1
    # Padded rows and columns of the state start at zero and stay there.
    h = tl.load(h0_ptr + rows * sh00 + cols * sh01, mask=mask, other=0.0).to(ACC)
    c = tl.load(c0_ptr + rows * sc00 + cols * sc01, mask=mask, other=0.0).to(ACC)
    for step in range(T):
        t = step + reverse * (T - 1 - 2 * step)
        n_t = B.to(tl.int64)
        first = n_t * t
        if packed:
            n_t = tl.load(bs_ptr + t)
            first = tl.load(off_ptr + t)
        active = rows < n_t  # (BLOCK_B, 1): the sequences still running at step t
        r = first + rows  # their rows in g and out
        m = active & (cols < H)
        g = g_ptr + r * sg0 + cols * sg1
        hw = h.to(g_ptr.dtype.element_ty)
        i = tl.dot(hw, tl.load(w, mask=w_mask, other=0.0), input_precision="ieee",
                   out_dtype=ACC)  # fmt: skip
        f = tl.dot(hw, tl.load(w + H * sw0, mask=w_mask, other=0.0), input_precision="ieee",
                   out_dtype=ACC)  # fmt: skip
        gg = tl.dot(hw, tl.load(w + 2 * H * sw0, mask=w_mask, other=0.0),
                    input_precision="ieee", out_dtype=ACC)  # fmt: skip
        o = tl.dot(hw, tl.load(w + 3 * H * sw0, mask=w_mask, other=0.0), input_precision="ieee",
                   out_dtype=ACC)  # fmt: skip
        i = tl.sigmoid(i + tl.load(g, mask=m, other=0.0).to(ACC))
        f = tl.sigmoid(f + tl.load(g + H * sg1, mask=m, other=0.0).to(ACC))
        gg = _tanh_by_sigmoid(gg + tl.load(g + 2 * H * sg1, mask=m, other=0.0).to(ACC))
        o = tl.sigmoid(o + tl.load(g + 3 * H * sg1, mask=m, other=0.0).to(ACC))
        c_t = f * c + i * gg
        h_t = o * _tanh_by_sigmoid(c_t)
        tl.store(out_ptr + r * so0 + cols * so1, h_t.to(out_ptr.dtype.element_ty), mask=m)
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
            f"set before rnnkit.engines.triton.kernels is imported; got a {device.type} tensor"
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


def _split(x: float) -> tuple[float, float]:
    """``x`` as two float32 values whose sum holds it to 48 bits: Triton passes a Python float
    to a kernel as float32, and a float64 layer needs its probability or epsilon exact."""
    hi = struct.unpack("f", struct.pack("f", x))[0]
    return hi, x - hi


# A step kernel's tile depends on H only, never on the batch, so that packed batches of every
# size share one compiled kernel: 256 entries, at most 64 columns wide (a small batch still
# spreads over H / 64 programs), 2 warps, 4 entries a thread, which keeps the registers low
# enough for many programs to share an SM.
_STEP_TILE, _STEP_MAX_H, _STEP_WARPS = 256, 64, 2
# Layer-norm kernels own whole rows and walk them in chunks up to 256 columns wide.
_LN_MAX_H = 256


def _step_blocks(H: int, max_h: int = _STEP_MAX_H) -> tuple[int, int]:
    BLOCK_H = min(triton.next_power_of_2(H), max_h)
    return max(1, _STEP_TILE // BLOCK_H), BLOCK_H


class KernelFailed(RuntimeError):
    """A Triton kernel could not be compiled or launched (raised before it touched memory)."""

    def __init__(self, kernel: str, reason: str):
        super().__init__(f"{kernel}: {reason}")
        self.kernel, self.reason = kernel, reason


def _run(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, its compile or launch failure as :class:`KernelFailed`."""
    try:
        kernel[grid](*args, **kwargs)
    except Exception as e:  # Triton's compile errors have no common base
        lines = str(e).strip().splitlines() or [""]
        name = getattr(kernel, "__name__", type(kernel).__name__)
        raise KernelFailed(name, f"{type(e).__name__}: {lines[0][:200]}") from e


# Launcher name -> why its kernel cannot run here; those launchers run their torch-op twin.
_FAILED: dict[str, str] = {}


def _twin_on_failure(twin: Callable) -> Callable:
    """Run the decorated launcher, or ``twin`` (same contract) once its kernel has failed to
    compile or launch, after one warning that names the reason."""

    def decorate(launcher: Callable) -> Callable:
        name = launcher.__name__

        @functools.wraps(launcher)
        def run(*args, **kwargs):
            if name not in _FAILED:
                try:
                    return launcher(*args, **kwargs)
                except KernelFailed as e:
                    _FAILED[name] = str(e)
                    warnings.warn(
                        f"rnnkit: the Triton kernel {e.kernel} cannot run on this machine "
                        f"({e.reason}); {name} runs on its torch-op twin from now on (same "
                        "numbers, slower)",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            return twin(*args, **kwargs)

        return run

    return decorate


def _launch(
    kernel, tensors: list[Tensor | None], B: int, H: int, scalars=(), constexprs=()
) -> None:
    """Launch ``kernel`` over a (B, H) step; each tensor passes its pointer, then all strides."""
    if B == 0 or H == 0:
        return
    BLOCK_B, BLOCK_H = _step_blocks(H)
    grid = (triton.cdiv(B, BLOCK_B), triton.cdiv(H, BLOCK_H))
    # A missing optional tensor (LSTM h) is never touched; any real tensor stands in for it.
    present = next(t for t in tensors if t is not None)
    tensors = [present if t is None else t for t in tensors]
    strides = [s for t in tensors for s in t.stride()]
    _run(
        kernel, grid, *tensors, B, H, *scalars, *strides, *constexprs, _acc(present.dtype),
        BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, num_warps=_STEP_WARPS,
    )  # fmt: skip


@_twin_on_failure(twins.lstm_forward)
def lstm_forward(
    g: Tensor, gh: Tensor, c: Tensor, c_save: Tensor, h: Tensor | None, out: Tensor
) -> None:
    """See :func:`rnnkit.engines.twins.lstm_forward`."""
    B, H = c.shape
    _launch(lstm_fwd_kernel, [g, gh, c, c_save, h, out], B, H, constexprs=(h is not None,))


@_twin_on_failure(twins.lstm_backward)
def lstm_backward(g: Tensor, c: Tensor, c_prev: Tensor, dh: Tensor, dc: Tensor, dg: Tensor) -> None:
    """See :func:`rnnkit.engines.twins.lstm_backward`."""
    B, H = c.shape
    _launch(lstm_bwd_kernel, [g, c, c_prev, dh, dc, dg], B, H)


@_twin_on_failure(twins.gru_forward)
def gru_forward(g: Tensor, gh: Tensor, h: Tensor, out: Tensor) -> None:
    """See :func:`rnnkit.engines.twins.gru_forward`."""
    B, H = h.shape
    _launch(gru_fwd_kernel, [g, gh, h, out], B, H)


@_twin_on_failure(twins.gru_backward)
def gru_backward(
    g: Tensor, gh: Tensor, h_prev: Tensor, dh: Tensor, dg: Tensor, dgh: Tensor, dh_prev: Tensor
) -> None:
    """See :func:`rnnkit.engines.twins.gru_backward`."""
    B, H = h_prev.shape
    _launch(gru_bwd_kernel, [g, gh, h_prev, dh, dg, dgh, dh_prev], B, H)


@_twin_on_failure(twins.rnn_forward)
def rnn_forward(g: Tensor, gh: Tensor, h: Tensor, out: Tensor, relu: bool) -> None:
    """See :func:`rnnkit.engines.twins.rnn_forward`."""
    B, H = g.shape
    _launch(rnn_fwd_kernel, [g, gh, h, out], B, H, constexprs=(relu,))


@_twin_on_failure(twins.rnn_backward)
def rnn_backward(h: Tensor, dh: Tensor, dg: Tensor, relu: bool) -> None:
    """See :func:`rnnkit.engines.twins.rnn_backward`."""
    B, H = h.shape
    _launch(rnn_bwd_kernel, [h, dh, dg], B, H, constexprs=(relu,))


def _zoneout_args(like: Tensor, *keeps: Tensor | float) -> tuple[list, list, list]:
    """Per zoneout weight: the mask (``like`` stands in for a probability), the probability as
    two float32 halves (zeros for a mask), and whether it is a mask."""
    tensors, scalars, masked = [], [], []
    for keep in keeps:
        is_mask = isinstance(keep, Tensor)
        tensors.append(keep if is_mask else like)
        scalars += (0.0, 0.0) if is_mask else _split(float(keep))
        masked.append(is_mask)
    return tensors, scalars, masked


@_twin_on_failure(twins.lstm_forward_zoneout)
def lstm_forward_zoneout(
    g: Tensor, gh: Tensor, c: Tensor, c_save: Tensor, cz_save: Tensor, h: Tensor, out: Tensor,
    zh: Tensor | float, zc: Tensor | float,
) -> None:  # fmt: skip
    """See :func:`rnnkit.engines.twins.lstm_forward_zoneout`."""
    B, H = c.shape
    masks, scalars, masked = _zoneout_args(c, zh, zc)
    tensors = [g, gh, c, c_save, cz_save, h, out, *masks]
    _launch(lstm_fwd_zoneout_kernel, tensors, B, H, scalars, masked)


@_twin_on_failure(twins.lstm_backward_zoneout)
def lstm_backward_zoneout(
    g: Tensor, c: Tensor, c_prev: Tensor, dh: Tensor, dc: Tensor, dg: Tensor, dh_carry: Tensor,
    zh: Tensor | float, zc: Tensor | float,
) -> None:  # fmt: skip
    """See :func:`rnnkit.engines.twins.lstm_backward_zoneout`."""
    B, H = c.shape
    masks, scalars, masked = _zoneout_args(c, zh, zc)
    tensors = [g, c, c_prev, dh, dc, dg, dh_carry, *masks]
    _launch(lstm_bwd_zoneout_kernel, tensors, B, H, scalars, masked)


@_twin_on_failure(twins.gru_forward_zoneout)
def gru_forward_zoneout(g: Tensor, gh: Tensor, h: Tensor, out: Tensor, zh: Tensor | float) -> None:
    """See :func:`rnnkit.engines.twins.gru_forward_zoneout`."""
    B, H = h.shape
    masks, scalars, masked = _zoneout_args(h, zh)
    _launch(gru_fwd_zoneout_kernel, [g, gh, h, out, *masks], B, H, scalars, masked)


@_twin_on_failure(twins.gru_backward_zoneout)
def gru_backward_zoneout(
    g: Tensor, gh: Tensor, h_prev: Tensor, dh: Tensor, dg: Tensor, dgh: Tensor, dh_prev: Tensor,
    zh: Tensor | float,
) -> None:  # fmt: skip
    """See :func:`rnnkit.engines.twins.gru_backward_zoneout`."""
    B, H = h_prev.shape
    masks, scalars, masked = _zoneout_args(h_prev, zh)
    tensors = [g, gh, h_prev, dh, dg, dgh, dh_prev, *masks]
    _launch(gru_bwd_zoneout_kernel, tensors, B, H, scalars, masked)


def _row_strides(name: str, *tensors: Tensor) -> list[int]:
    """The row strides of matrices whose columns must be adjacent (the layer-norm kernels
    index columns directly); vectors must be contiguous."""
    for t in tensors:
        if t.dim() == 2 and t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(
                f"{name}: needs matrices with adjacent columns; got strides {t.stride()} for "
                f"shape {tuple(t.shape)}"
            )
        if t.dim() == 1 and not t.is_contiguous():
            raise ValueError(f"{name}: needs contiguous vectors; got strides {t.stride()}")
    return [t.stride(0) for t in tensors if t.dim() == 2]


def _launch_rows(kernel, tensors: list[Tensor], B: int, H: int, scalars=()) -> None:
    """Launch a kernel that owns whole rows: BLOCK_B rows a program, chunks of BLOCK_H."""
    if B == 0 or H == 0:
        return
    BLOCK_B, BLOCK_H = _step_blocks(H, _LN_MAX_H)
    strides = _row_strides(kernel.__name__, *tensors)
    _run(
        kernel, (triton.cdiv(B, BLOCK_B),), *tensors, B, H, *scalars, *strides,
        _acc(tensors[0].dtype), BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, num_warps=_STEP_WARPS,
    )  # fmt: skip


@_twin_on_failure(twins.ln_lstm_forward)
def ln_lstm_forward(
    g: Tensor, z: Tensor, ln_hw: Tensor, ln_hb: Tensor, mu_h: Tensor, rs_h: Tensor, c: Tensor,
    c_save: Tensor, cn_save: Tensor, mu_c: Tensor, rs_c: Tensor, ln_cw: Tensor, ln_cb: Tensor,
    out: Tensor, eps: float,
) -> None:  # fmt: skip
    """See :func:`rnnkit.engines.twins.ln_lstm_forward`."""
    B, H = c.shape
    tensors = [g, z, ln_hw, ln_hb, mu_h, rs_h, c, c_save, cn_save, mu_c, rs_c, ln_cw, ln_cb, out]
    _launch_rows(ln_lstm_fwd_kernel, tensors, B, H, _split(float(eps)))


@_twin_on_failure(twins.ln_lstm_backward)
def ln_lstm_backward(
    g: Tensor, c: Tensor, c_prev: Tensor, cn: Tensor, mu_c: Tensor, rs_c: Tensor, ln_cw: Tensor,
    z: Tensor, mu_h: Tensor, rs_h: Tensor, ln_hw: Tensor, dh: Tensor, dc: Tensor, dg: Tensor,
    dcn: Tensor, dz: Tensor,
) -> None:  # fmt: skip
    """See :func:`rnnkit.engines.twins.ln_lstm_backward`."""
    B, H = c.shape
    tensors = [g, c, c_prev, cn, mu_c, rs_c, ln_cw, z, mu_h, rs_h, ln_hw, dh, dc, dg, dcn, dz]
    _launch_rows(ln_lstm_bwd_kernel, tensors, B, H)


def _adjacent_columns(t: Tensor) -> Tensor:
    """``t``, or a contiguous copy when its columns are not adjacent (the row kernels index
    columns directly)."""
    return t if t.dim() < 2 or t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def _stats_dtype(x: Tensor) -> torch.dtype:
    # As torch's layer norm: float32 statistics for 16-bit data on CUDA, the storage dtype on
    # other devices (the CPU, under the interpreter).
    half = x.dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if half and x.device.type == "cuda" else x.dtype


@_twin_on_failure(twins.layer_norm)
def layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float = LN_EPS
) -> tuple[Tensor, Tensor, Tensor]:
    """See :func:`rnnkit.engines.twins.layer_norm`."""
    x, weight, bias = _adjacent_columns(x), weight.contiguous(), bias.contiguous()
    B, W = x.shape
    y = x.new_empty(B, W)
    mean, rstd = x.new_empty(B, 1, dtype=_stats_dtype(x)), x.new_empty(B, 1, dtype=_stats_dtype(x))
    _launch_rows(layer_norm_fwd_kernel, [x, weight, bias, y, mean, rstd], B, W, _split(float(eps)))
    return y, mean, rstd


@_twin_on_failure(twins.layer_norm_input_grad)
def layer_norm_input_grad(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor
) -> Tensor:
    """See :func:`rnnkit.engines.twins.layer_norm_input_grad`."""
    dy, x, weight = _adjacent_columns(dy), _adjacent_columns(x), weight.contiguous()
    B, W = x.shape
    mean, rstd = mean.reshape(B, 1), rstd.reshape(B, 1)
    dx = x.new_empty(B, W)
    _launch_rows(layer_norm_bwd_kernel, [dy, x, mean, rstd, weight, dx], B, W)
    return dx


PERSISTENT_MAX_H = 64


def _lstm_persistent_twin(
    G: Tensor, w_hh: Tensor, h0: Tensor, c0: Tensor, batch_sizes: tuple[int, ...],
    reverse: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """:func:`lstm_persistent_forward` stepped with torch ops: the product and
    :func:`rnnkit.engines.twins.lstm_forward` per step."""
    N, H = G.shape[0], w_hh.shape[1]
    out = G.new_empty(N, H)
    h = h0.clone(memory_format=torch.contiguous_format)
    c = c0.clone(memory_format=torch.contiguous_format)
    offsets = _offsets(batch_sizes)
    steps = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
    for t in steps:
        bs, rows = batch_sizes[t], slice(offsets[t], offsets[t + 1])
        g = G[rows].clone()
        twins.lstm_forward(g, h[:bs] @ w_hh.t(), c[:bs], torch.empty_like(c[:bs]), h[:bs],
                               out[rows])  # fmt: skip
    return out, h, c


@_twin_on_failure(_lstm_persistent_twin)
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
    ``h_n`` and ``c_n`` (B, H), as :class:`rnnkit.engines.triton.FusedLayer` does, without saving
    anything for backward. One program per block of 16 sequences walks all steps, reading
    ``W_hh`` from the cache, so ``H`` is at most ``PERSISTENT_MAX_H``; float32 (IEEE products,
    no TF32), float64, bfloat16 and float16, accumulating in float32 (float64 for float64).
    Padded data needs no device copy of ``batch_sizes``; packed data one asynchronous copy.
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
    packed = any(bs != B for bs in batch_sizes)
    bs = off = torch.empty(2, dtype=torch.int64, device=G.device)  # never read unless packed
    if packed:
        # Per step: the sequences still running and their first row, built on the host from
        # the list and copied without waiting (no device sync).
        meta = torch.tensor([batch_sizes, _offsets(batch_sizes)[:-1]], dtype=torch.int64)
        if G.device.type == "cuda":
            meta = meta.pin_memory()
        bs, off = meta.to(G.device, non_blocking=True)
    BLOCK_B, BLOCK_H = 16, max(16, triton.next_power_of_2(H))  # tl.dot needs 16 or more
    tensors = [G, w_hh, h0, c0, out, h_n, c_n]
    strides = [s for t in tensors for s in t.stride()]
    _run(
        lstm_persistent_fwd_kernel, (triton.cdiv(B, BLOCK_B),),
        *tensors, bs, off, T, B, H, int(reverse), int(packed), *strides, _acc(G.dtype),
        BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, num_warps=4, num_stages=1,
    )  # fmt: skip
    return out, h_n, c_n
