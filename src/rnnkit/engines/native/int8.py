"""int8 inference on the native engine: the C side is ``int8.h`` (kernels, layout, why nothing
saturates), run by ``loop.c``'s forward; this is its Python side.

A weight matrix is stored as int8 with one float32 scale per output row (symmetric, in
[-127, 127]: :func:`quantize_rows`); at run time every row of activations (the layer's input
once for all steps, then ``h_{t-1}`` and LSTM's ``r_t`` per step) is quantized the same way, the
products are exact int32 sums, and everything after them (biases, layer norms, gates, zoneout's
blend, the state) is float32. The integer sums are the same on every CPU, whichever kernel
(AVX-512 VNNI, AVX2, plain C) computes them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.engines import shared
from rnnkit.engines.native import loop as native_loop
from rnnkit.engines.native.loop import CInt8, CInt8Matrix, NativeVariants
from rnnkit.engines.spec import LN_EPS, LayerSpec, StepVariants
from rnnkit.scan import Carry

# Columns above which the kernels' int32 sums could overflow (int8.h's Q8_MAX_K).
MAX_COLUMNS = 65536
# What nl_q8_isa reports: the kernel this build runs.
KERNELS = {0: "plain C", 1: "AVX2", 2: "AVX-512 VNNI"}


def unavailable_reason(device: torch.device | None = None) -> str | None:
    """Why int8 layers cannot run (on ``device``), or None."""
    if device is not None and device.type != "cpu":
        return f"int8 layers run on the CPU; got a {device.type} tensor"
    if not native_loop.available():
        return f"they need the native engine, whose C library could not be built " \
               f"({native_loop.build_error()})"  # fmt: skip
    return None


def kernel() -> str:
    """Which integer kernel this CPU's build runs: "AVX-512 VNNI", "AVX2" or "plain C"."""
    return KERNELS[native_loop.library().nl_q8_isa()]


def quantize_rows(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(q, scale)`` of a float matrix: ``q`` int8 in [-127, 127] and ``scale`` (rows,) float32
    with ``w[i] ~ scale[i] * q[i]``, ``scale[i] = max|w[i]| / 127`` (0 for a zero row)."""
    w64 = w.detach().to(torch.float64)
    if not torch.isfinite(w64).all():
        raise ValueError("a weight holds NaN or infinity; it cannot be quantized")
    top = w64.abs().amax(dim=1)
    scale = (top / 127).to(torch.float32)
    inv = torch.where(top > 0, 127 / top, torch.zeros_like(top))
    q = torch.round(w64 * inv[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8Matrix(NamedTuple):
    """One int8 weight matrix of ``gates`` blocks of ``H`` rows, packed for the kernels:
    ``q`` (gates*H, K) and ``scale`` as stored, ``packed`` and ``wsum`` their kernel layout,
    ``cstruct`` the C structure that points into them (made once: :func:`pack`)."""

    q: Tensor
    scale: Tensor
    packed: Tensor
    wsum: Tensor
    gates: int
    cstruct: CInt8Matrix

    @property
    def H(self) -> int:
        return self.q.shape[0] // self.gates

    @property
    def K(self) -> int:
        return self.q.shape[1]

    def c(self) -> CInt8Matrix:
        """The C structure (pointing into this matrix's tensors, which must outlive it)."""
        return self.cstruct


def pack(q: Tensor, scale: Tensor, gates: int, name: str = "weight") -> Int8Matrix:
    """Check an int8 matrix and its scales and lay them out for the kernels."""
    if q.dtype != torch.int8 or q.dim() != 2 or q.device.type != "cpu":
        raise ValueError(f"{name}: expected a 2-D int8 CPU tensor; got {q.dtype} "
                         f"{tuple(q.shape)} on {q.device}")  # fmt: skip
    rows, K = q.shape
    if rows % gates or rows == 0 or K == 0:
        raise ValueError(f"{name}: expected {gates} blocks of rows and some columns; got "
                         f"{tuple(q.shape)}")  # fmt: skip
    if K > MAX_COLUMNS:
        raise ValueError(f"{name}: int8 layers take at most {MAX_COLUMNS} input features per "
                         f"weight row; got {K}")  # fmt: skip
    if scale.dtype != torch.float32 or tuple(scale.shape) != (rows,):
        raise ValueError(f"{name}: expected a float32 scale of shape ({rows},); got "
                         f"{scale.dtype} {tuple(scale.shape)}")  # fmt: skip
    if not torch.isfinite(scale).all() or (scale < 0).any():
        raise ValueError(f"{name}: the scales must be finite and non-negative")
    if (q == -128).any():
        raise ValueError(f"{name}: int8 weights are in [-127, 127]; got -128")
    lib = native_loop.library()
    H, i64 = rows // gates, ctypes.c_int64
    size = lib.nl_q8_packed_size(i64(gates), i64(H), i64(K))
    q, scale = q.contiguous(), scale.contiguous()
    packed = torch.empty(size, dtype=torch.int8)
    wsum = torch.empty(size // ((K + 3) // 4 * 4), dtype=torch.int32)
    rc = lib.nl_q8_pack(
        i64(gates),
        i64(H),
        i64(K),
        ctypes.c_void_p(q.data_ptr()),
        ctypes.c_void_p(packed.data_ptr()),
        ctypes.c_void_p(wsum.data_ptr()),
    )
    if size < 0 or rc != 0:
        raise ValueError(f"{name}: the int8 kernels refused a ({rows}, {K}) matrix")
    ptrs = (t.data_ptr() for t in (packed, wsum, scale))
    return Int8Matrix(q, scale, packed, wsum, gates, CInt8Matrix(*ptrs, gates, H, K))


def _check_rows(owner: str, x: Tensor, w: Int8Matrix) -> None:
    """x must be the float32 rows (N, K) that w multiplies: the C code reads them as such."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != w.K:
        raise ValueError(f"{owner}: expected float32 rows of {w.K} features; got {x.dtype} "
                         f"{tuple(x.shape)}")  # fmt: skip


def linear(x: Tensor, w: Int8Matrix, bias: Tensor | None, threads: int | None = None) -> Tensor:
    """``x W^T + bias`` (N, gates*H) with x (N, K) float32 quantized per row."""
    x = x.contiguous()
    N, GW = x.shape[0], w.q.shape[0]
    _check_rows("int8 linear", x, w)
    if bias is not None:
        bias = bias.contiguous()
        if bias.dtype != torch.float32 or tuple(bias.shape) != (GW,):
            raise ValueError(f"int8 linear: bias must be float32 ({GW},); got {bias.dtype} "
                             f"{tuple(bias.shape)}")  # fmt: skip
    out = x.new_empty(N, GW)
    matrix = w.c()
    nthreads = native_loop.threads_arg(threads, native_loop._default_threads(N, w.K, GW))
    rc = native_loop.library().nl_q8_linear(
        ctypes.c_int64(N), ctypes.c_void_p(x.data_ptr()), ctypes.byref(matrix),
        None if bias is None else ctypes.c_void_p(bias.data_ptr()), ctypes.c_void_p(out.data_ptr()),
        nthreads,
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"int8 linear: the C kernel refused its arguments ({rc})")
    return out


# Multiply-adds of W_hh below which one sequence walks on one thread. With one row the threads
# split the units (and each computes its units' input side a few steps ahead) and meet at a
# barrier every step: at I=H=256 that halves the weights each core reads from its L2 cache a
# step, which bounds a one-core walk (LSTM 3.9 us a step on one thread, about 2.5 on two,
# measured on 2 cores); a small layer's step is shorter than the barrier.
PARALLEL_MIN_STEP_MACS = 1 << 16


def _threads(B: int, step_macs: int) -> int:
    return torch.get_num_threads() if B > 1 or step_macs >= PARALLEL_MIN_STEP_MACS else 1


# (w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction, the matrices int8; for LSTM and
# RNN, b_hh may be None with b_ih the sum of both biases.
Int8Weights = tuple[Int8Matrix, Int8Matrix, Tensor | None, Tensor | None, Int8Matrix | None]


def run_layer(
    mode: str,
    reverse: bool,
    batch_sizes: Sequence[int],
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Int8Matrix,
    w_hh: Int8Matrix,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Int8Matrix | None = None,
    variants: StepVariants | None = None,
    *,
    threads: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction, ``(out (N, R), h_n, c_n)``, as ``op.run_layer`` (the same
    arguments) but with int8 matrices, in eval: the variants' layer norms and zoneout's
    expectation."""
    ln = variants.layer_norm if variants is not None else None
    batch_sizes = shared.step_sizes(batch_sizes, x.shape[0], h0.shape[0])
    # LSTM and RNN add the biases; a b_ih with no b_hh is that sum already.
    bias = b_ih if mode == "GRU" or b_hh is None else b_ih + b_hh
    B, step_macs = h0.shape[0], w_hh.q.shape[0] * w_hh.K
    c_int8 = CInt8(w_hh.c(), CInt8Matrix() if w_hr is None else w_hr.c())
    x = x.contiguous()
    if ln is None:
        # The loop computes the input side itself (x quantized once, ahead of the steps).
        _check_rows("int8 layer", x, w_ih)
        bias = None if bias is None else bias.contiguous()
        G = x.new_empty(x.shape[0], w_ih.q.shape[0])  # (N, G*H), written by the loop
        c_int8.ih, c_int8.x = w_ih.c(), x.data_ptr()
        c_int8.bias = None if bias is None else bias.data_ptr()
    else:
        G = F.layer_norm(linear(x, w_ih, None, threads), (w_ih.q.shape[0],), ln[0], ln[1], LN_EPS)
        G = G if bias is None else G + bias  # (N, G*H)
    v = NativeVariants.of(mode, variants, x.shape[0])
    if v.rmask is not None or v.zh is not None:
        raise ValueError("int8 layers run in eval: no recurrent-dropout or zoneout masks")
    if threads is None:
        threads = _threads(B, step_macs)
    gru_bias = b_hh.contiguous() if mode == "GRU" and b_hh is not None else None
    r = native_loop.forward(
        mode, reverse, batch_sizes, G, h0.contiguous(), None if c0 is None else c0.contiguous(),
        w_hh.q, gru_bias, False, w_hr=None if w_hr is None else w_hr.q, variants=v,
        threads=threads, int8=c_int8,
    )  # fmt: skip
    return r.out, r.h_n, r.c_n


def run(
    spec: LayerSpec,
    x: Tensor,
    hx: Carry,
    weights: Sequence[Int8Weights],
    batch_sizes: Sequence[int] | None,
    variants: Sequence[StepVariants] | None = None,
) -> tuple[Tensor, Carry]:
    """A whole layer stack in float32 with int8 matrices (eval: no dropout between layers);
    ``x`` padded (T, B, I) when ``batch_sizes`` is None, else packed rows (N, I)."""
    return shared.stack_rows(spec, x, hx, weights, batch_sizes, False, variants, run_layer)
