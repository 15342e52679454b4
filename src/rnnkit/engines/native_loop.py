"""The whole time loop of one layer and direction in one native call: ``native_loop.c``.

Where the fused engine returns to Python every step (a slice, a GEMM call, a kernel call), this
runs all T steps in C: per step the recurrent product and the pointwise step of ``cpu_kernels.c``
(same formulas), saving what :class:`rnnkit.engines.fused.FusedLayer` saves, so that its
one-GEMM weight and input gradients and the derivation in ``engines/README.md`` apply unchanged.

The recurrent product goes to the BLAS that torch ships (MKL's Fortran ``sgemm_``/``dgemm_``,
looked up in ``libtorch_cpu`` at run time) for steps of at least ``BLAS_MIN_ROWS`` rows, else to
the C file's own register-blocked loops (a GEMV over ``W_hh`` at B=1). Without that BLAS (or
with ``RNNKIT_NATIVE_BLAS=0`` set before the first call, which acts as if it were absent), or
with ``blas=False``, the own loops run every step: same numbers up to rounding. The hidden
units are split over ``threads`` OpenMP threads (default: torch's).

Built like ``cpu.py`` builds its kernels: on first use into ``$RNNKIT_CACHE``, named by a hash
of the source, the flags and the CPU; any failure makes :func:`available` False after one
warning. The C code trusts its pointers, so every tensor is checked here first.
"""

import ctypes
import itertools
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from rnnkit.engines import native_build

_SOURCE = Path(__file__).with_name("native_loop.c")
# As cpu.py: no -ffast-math (NaN and inf must propagate). -fopenmp for the threads; where the
# compiler lacks it, the second set builds the single-threaded loop.
_FLAG_SETS = [
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC",
     "-shared"],
    ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd", "-fPIC",
     "-shared"],
]  # fmt: skip
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_MODES = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
_ERRORS = {
    -1: "unknown mode",
    -2: "bad sizes",
    -3: "batch sizes not positive, non-increasing, at most B and summing to the rows",
    -4: "a required tensor is missing",
}
# Steps with at least this many rows use the BLAS; below, the own loops (measured on 2 cores,
# I=H=256: the own GEMV wins at B=1, MKL from a few rows on).
BLAS_MIN_ROWS = 4

_lib: ctypes.CDLL | None = None
_failed = False
_blas: tuple[int, int, int | None] | None = None


class ForwardResult(NamedTuple):
    """``out`` (N, H), ``h_n``, ``c_n`` (B, H; ``c_n`` None but for LSTM); saved for backward:
    ``C`` (N, H) the c_t of LSTM, ``GH`` (N, 3H) the Z_t + b_hh of GRU (None when not saved).
    The caller's ``G`` now holds the gate activations."""

    out: Tensor
    h_n: Tensor
    c_n: Tensor | None
    C: Tensor | None
    GH: Tensor | None


class BackwardResult(NamedTuple):
    """``dG`` (N, G*H) the input-side pre-activation gradients, ``dGH`` (N, 3H) the hidden-side
    ones of GRU (None otherwise: they are ``dG``), ``dh0`` and ``dc0`` (B, H)."""

    dG: Tensor
    dGH: Tensor | None
    dh0: Tensor
    dc0: Tensor | None


def _build() -> ctypes.CDLL:
    lib = native_build.build(_SOURCE, _FLAG_SETS)
    for suffix in _SUFFIX.values():
        for name in ("nl_forward", "nl_backward"):
            getattr(lib, f"{name}_{suffix}").restype = ctypes.c_int64
    lib.nl_has_openmp.restype = ctypes.c_int64
    lib.nl_set_blas.restype = None
    return lib


def _find_blas() -> tuple[int, int, int | None] | None:
    """Addresses of torch's MKL ``sgemm_`` and ``dgemm_`` (LP64 Fortran interface) and of
    ``MKL_Set_Num_Threads_Local`` (None where absent), or None."""
    path = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    if not torch.backends.mkl.is_available() or not path.exists():
        return None
    try:
        torch_cpu = ctypes.CDLL(str(path))
        gemms = [ctypes.cast(getattr(torch_cpu, n), ctypes.c_void_p).value
                 for n in ("sgemm_", "dgemm_")]  # fmt: skip
    except (OSError, AttributeError):
        return None
    # The C API (takes an int); the lower-case name is the Fortran one (takes an int *).
    local = getattr(torch_cpu, "MKL_Set_Num_Threads_Local", None)
    return (*gemms, None if local is None else ctypes.cast(local, ctypes.c_void_p).value)


# Building touches the file system, which torch.compile cannot trace: under compile this
# runs once at trace time and its answer is a constant of the graph.
@torch.compiler.assume_constant_result
def available(dtype: torch.dtype) -> bool:
    """True when the library is built (building it on the first call) and supports ``dtype``."""
    global _lib, _failed, _blas
    if dtype not in _SUFFIX or _failed or os.environ.get("RNNKIT_NO_CPU_KERNELS") == "1":
        return False
    if _lib is None:
        try:
            _lib = _build()
        except (OSError, AttributeError) as e:
            _failed = True
            warnings.warn(
                f"rnnkit: the native time loop is unavailable ({e}); the fused engine steps in "
                "Python instead (correct, slower)",
                stacklevel=2,
            )
            return False
        # RNNKIT_NATIVE_BLAS=0: behave as where torch ships no BLAS (the own loops only).
        _blas = None if os.environ.get("RNNKIT_NATIVE_BLAS") == "0" else _find_blas()
        blas = (ctypes.c_void_p(a) for a in _blas) if _blas else (None, None, None)
        _lib.nl_set_blas(*blas)
    return True


def blas_available() -> bool:
    """Whether torch's BLAS was found (after :func:`available`)."""
    return _blas is not None


# Multiply-adds of one step's recurrent product below which the loop stays on one thread: the
# threads meet at a barrier every step. On an idle 2-core machine two threads take 0.68x the time
# of one at H=256 (B=1 to 64), but a small step gains nothing, and when other processes hold the
# cores a barrier can cost a time slice (measured: a 20-step H=16 GRU took 120 ms on two threads
# of a busy machine against 0.5 ms on one). 2^17 keeps H=256 LSTM and GRU parallel from B=1.
PARALLEL_MIN_MACS = 1 << 17


def _default_threads(B: int, H: int, GW: int) -> int:
    return torch.get_num_threads() if B * H * GW >= PARALLEL_MIN_MACS else 1


def _blas_min_rows(blas: bool | None) -> ctypes.c_int64:
    """The C loop's threshold for the BLAS; ``blas=False`` forces the own loops."""
    return ctypes.c_int64(2**62 if blas is False else BLAS_MIN_ROWS)


def _check(name: str, t: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if t is None:
        raise ValueError(f"native_loop.{name}: missing; expected a tensor of shape {shape}")
    if t.device.type != "cpu" or t.dtype != dtype or tuple(t.shape) != shape:
        raise ValueError(
            f"native_loop: {name} must be a {dtype} CPU tensor of shape {shape}; got "
            f"{t.dtype} {tuple(t.shape)} on {t.device}"
        )
    if not t.is_contiguous():
        raise ValueError(f"native_loop: {name} must be contiguous; got strides {t.stride()}")


def _sizes(batch_sizes, rows: int, B: int) -> torch.Tensor:
    bs = [int(b) for b in batch_sizes]
    if any(b < 1 for b in bs) or any(a < b for a, b in itertools.pairwise(bs)):
        raise ValueError(f"native_loop: batch_sizes must be positive and non-increasing; got {bs}")
    if sum(bs) != rows:
        raise ValueError(f"native_loop: batch_sizes sum to {sum(bs)}, but the data has {rows} rows")
    if bs and bs[0] > B:
        raise ValueError(f"native_loop: batch_sizes[0]={bs[0]} exceeds the {B} rows of h0")
    return torch.tensor(bs, dtype=torch.int64)


def _ptr(t: Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _run(fn, *args) -> None:
    rc = fn(*args)
    if rc != 0:
        raise RuntimeError(f"native_loop: the C loop refused its arguments: {_ERRORS.get(rc, rc)}")


def _layout(mode: str, G: Tensor, h0: Tensor, w_hh: Tensor) -> tuple[int, int, int, int]:
    if mode not in _MODES:
        raise ValueError(f"native_loop: mode must be one of {sorted(_MODES)}; got {mode!r}")
    if G.dim() != 2 or h0.dim() != 2:
        raise ValueError(f"native_loop: G and h0 must be matrices; got {G.dim()}-D, {h0.dim()}-D")
    (N, GW), (B, H) = G.shape, h0.shape
    if GW != _GATES[mode] * H:
        raise ValueError(f"native_loop: G has {GW} columns, but {mode} with H={H} needs "
                         f"{_GATES[mode] * H}")  # fmt: skip
    if H < 1 or B < 1:
        raise ValueError(f"native_loop: h0 must be non-empty; got {tuple(h0.shape)}")
    _check("w_hh", w_hh, (GW, H), G.dtype)
    return N, B, H, GW


def forward(
    mode: str,
    reverse: bool,
    batch_sizes,
    G: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    save: bool = True,
    *,
    threads: int | None = None,
    blas: bool | None = None,
) -> ForwardResult:
    """One layer and direction forward over packed-layout rows, all steps in one native call.

    ``mode``: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU". ``G`` (N, G*H), contiguous: ``x W_ih^T``
    plus the biases as ``FusedLayer.forward`` adds them (``b_ih + b_hh`` for LSTM and RNN,
    ``b_ih`` only for GRU); overwritten with the gate activations. ``h0``, ``c0`` (B, H);
    ``w_hh`` (G*H, H); ``b_hh`` (G*H,) is used by GRU only (None: no bias). Step t (of
    ``batch_sizes``, positive, non-increasing) touches rows ``[:batch_sizes[t]]`` of the state.
    ``save=False`` (inference) skips storing ``C`` and ``GH``.
    """
    N, B, H, GW = _layout(mode, G, h0, w_hh)
    dtype, lstm, gru = G.dtype, mode == "LSTM", mode == "GRU"
    _check("G", G, (N, GW), dtype)
    _check("h0", h0, (B, H), dtype)
    if lstm:
        _check("c0", c0, (B, H), dtype)
    if gru and b_hh is not None:
        _check("b_hh", b_hh, (GW,), dtype)
    bs = _sizes(batch_sizes, N, B)
    if not available(dtype):
        raise RuntimeError(f"native_loop: the native library is unavailable for {dtype}")
    out = G.new_empty(N, H)
    h = h0.clone()
    c = c0.clone() if lstm else None
    C = G.new_empty(N, H) if lstm and save else None
    GH = G.new_empty(N, GW) if gru and save else None
    Z = G.new_empty(B, GW)
    offsets = torch.empty(len(bs) + 1, dtype=torch.int64)
    i64 = ctypes.c_int64
    _run(
        getattr(_lib, f"nl_forward_{_SUFFIX[dtype]}"),
        i64(_MODES[mode]), i64(int(reverse)), i64(len(bs)), _ptr(bs), i64(N), i64(B), i64(H),
        _ptr(G), _ptr(w_hh), _ptr(b_hh if gru else None), _ptr(h0), _ptr(out), _ptr(h),
        _ptr(c), _ptr(C), _ptr(GH), _ptr(Z), _ptr(offsets),
        i64(threads or _default_threads(B, H, GW)), _blas_min_rows(blas),
    )  # fmt: skip
    return ForwardResult(out, h, c, C, GH)


def backward(
    mode: str,
    reverse: bool,
    batch_sizes,
    G: Tensor,
    out: Tensor,
    C: Tensor | None,
    GH: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    w_hh: Tensor,
    d_out: Tensor | None,
    d_hn: Tensor | None,
    d_cn: Tensor | None,
    *,
    threads: int | None = None,
    blas: bool | None = None,
) -> BackwardResult:
    """The backward walk of :func:`forward` (``engines/README.md``), all steps in one call.

    ``G`` (the activations), ``out``, ``C``, ``GH``: what :func:`forward` left with
    ``save=True``; ``d_out`` (N, H), ``d_hn``, ``d_cn`` (B, H): incoming gradients, None for
    zero. The caller finishes as ``FusedLayer.backward`` does: ``dX = dG W_ih``,
    ``dW_ih = dG^T X``, ``dW_hh = dY^T H_prev`` with ``dY = dGH`` for GRU else ``dG``.
    """
    N, B, H, GW = _layout(mode, G, h0, w_hh)
    dtype, lstm, gru = G.dtype, mode == "LSTM", mode == "GRU"
    for name, t, shape in [("G", G, (N, GW)), ("out", out, (N, H)), ("h0", h0, (B, H))]:
        _check(name, t, shape, dtype)
    if lstm:
        _check("C", C, (N, H), dtype)
        _check("c0", c0, (B, H), dtype)
    if gru:
        _check("GH", GH, (N, GW), dtype)
    if d_out is not None:
        d_out = d_out.contiguous()
        _check("d_out", d_out, (N, H), dtype)
    bs = _sizes(batch_sizes, N, B)
    if not available(dtype):
        raise RuntimeError(f"native_loop: the native library is unavailable for {dtype}")
    dh = h0.new_zeros(B, H) if d_hn is None else d_hn.to(dtype).clone(
        memory_format=torch.contiguous_format)  # fmt: skip
    _check("d_hn", dh, (B, H), dtype)
    dc = None
    if lstm:
        dc = h0.new_zeros(B, H) if d_cn is None else d_cn.to(dtype).clone(
            memory_format=torch.contiguous_format)  # fmt: skip
        _check("d_cn", dc, (B, H), dtype)
    dG = torch.empty_like(G)
    dGH = torch.empty_like(G) if gru else None
    offsets = torch.empty(len(bs) + 1, dtype=torch.int64)
    i64 = ctypes.c_int64
    _run(
        getattr(_lib, f"nl_backward_{_SUFFIX[dtype]}"),
        i64(_MODES[mode]), i64(int(reverse)), i64(len(bs)), _ptr(bs), i64(N), i64(B), i64(H),
        _ptr(G), _ptr(GH if gru else None), _ptr(out), _ptr(C if lstm else None), _ptr(h0),
        _ptr(c0 if lstm else None), _ptr(w_hh), _ptr(d_out), _ptr(dh), _ptr(dc), _ptr(dG),
        _ptr(dGH), _ptr(offsets), i64(threads or _default_threads(B, H, GW)), _blas_min_rows(blas),
    )  # fmt: skip
    return BackwardResult(dG, dGH, dh, dc)
