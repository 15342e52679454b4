"""The native time loop of one layer and direction: ``loop.c``, built on first use and called
through ctypes.

Per step the loop runs the recurrent product and the cell (with the variants and LSTM's
projection), and saves what backward reads; :func:`backward` walks the steps in reverse. The
derivation is in ``engines/README.md``; the operator and the gradients over all steps at once
are ``op.py``'s.

The recurrent products of steps with at least ``GEMM_MIN_ROWS`` rows run on panels: each
thread packs its share of ``W_hh`` (and ``W_hr``) once per call for the C file's
register-blocked kernel, and the panels stay in its core's cache across the steps; fewer rows
(a GEMV over ``W_hh`` at B=1), or ``gemm=False``, run its register-blocked dot products: same
numbers up to rounding. The hidden units are split over ``threads`` OpenMP
threads (default: torch's).

Built into ``$RNNKIT_CACHE`` for this CPU (``-march=native``) or, with
``RNNKIT_NATIVE_ARCH=baseline``, for the baseline x86-64 level that every supported CPU runs
(AVX2 and FMA, no AVX-512); :func:`use_arch` switches in-process (the tests run the parity
checks on both). A failed build makes :func:`available` False after one warning. The C code
checks sizes and batch sizes itself, but trusts its pointers, so every tensor is checked here
first.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from rnnkit.engines.native import build as native_build
from rnnkit.engines.shared import GATES as _GATES
from rnnkit.engines.spec import LN_EPS, LayerSpec, StepVariants

_SOURCE = Path(__file__).with_name("loop.c")
# No -ffast-math (NaN and inf must propagate). -fopenmp for the threads; where the compiler lacks
# it, the second set builds the single-threaded loop.
_COMMON_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
# What -march each build targets: this CPU, or the x86-64 level every supported CPU has (AVX2,
# FMA; no AVX-512), whose vector width, and so whose summation order, AMD and older Intel
# users get; or plain x86-64 (SSE2), where the int8 kernels are plain C, the path of every
# other CPU (the tests run it; nothing picks it by default).
ARCHES = {"native": "native", "baseline": "x86-64-v3", "portable": "x86-64"}
ARCH = os.environ.get("RNNKIT_NATIVE_ARCH", "native")
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_MODES = {"LSTM": 0, "GRU": 1, "RNN_TANH": 2, "RNN_RELU": 3}
# loop.c's NL_SPLIT_*: how the threads of a forward or backward share its work.
_SPLITS = {"auto": 0, "units": 1, "rows": 2}
_ERRORS = {
    -1: "unknown mode",
    -2: "bad sizes",
    -3: "batch sizes not positive, non-increasing, at most B and summing to the rows",
    -4: "a required tensor is missing",
    -5: "the variants' tensors are incomplete or do not apply to this mode",
    -6: "out of memory",
}
# Steps with at least this many rows run on panels (in calls of at least 4 steps, which repay
# packing them); below, the own dot products. The panels won from one row on: BENCHMARKS.md,
# "Panels from one row" (bench_native_loop.py with and without --own-loops).
GEMM_MIN_ROWS = 1


def none_if_empty(t: Tensor | None) -> Tensor | None:
    """None for an empty 1-D tensor: the operator's inputs and outputs are tensors only, and an
    absent one travels as an empty tensor."""
    return None if t is None or (t.dim() == 1 and t.numel() == 0) else t


class NativeVariants(NamedTuple):
    """The per-step variants of one layer and direction as the loop runs them, each None when
    off: built once from the layer's :class:`~rnnkit.engines.spec.StepVariants` (:meth:`of`);
    its tensor fields are, by name and in order, the first fields of the C ``nl_variants``.

    ``ln_hw``, ``ln_hb`` (G*H,): gain and bias of the layer norm of ``h_{t-1} W_hh^T`` (LSTM,
    GRU); ``ln_cw``, ``ln_cb`` (H,): of the LSTM cell before its tanh (with ``ln_hw``);
    ``rmask`` (B, H): the scaled recurrent-dropout mask on ``h_{t-1}`` where it enters W_hh.
    Zoneout (LSTM, GRU): training's masks ``zh`` and (LSTM) ``zc`` (N, H), laid out like the
    rows (1 keeps the previous value); else ``zoneout_p``, its probability, the keep of every
    unit in eval.
    """

    ln_hw: Tensor | None = None
    ln_hb: Tensor | None = None
    ln_cw: Tensor | None = None
    ln_cb: Tensor | None = None
    rmask: Tensor | None = None
    zh: Tensor | None = None
    zc: Tensor | None = None
    zoneout_p: float | None = None

    # The tensor fields, in the order of the operator's list and of the C structure.
    TENSORS = ("ln_hw", "ln_hb", "ln_cw", "ln_cb", "rmask", "zh", "zc")

    @classmethod
    def of(cls, mode: str, v: StepVariants | None, rows: int) -> NativeVariants:
        """The loop's variants from the layer's: the norms of the recurrent side and of the
        cell (the input side's is the caller's, inside G), the mask, and zoneout's masks laid
        out like the ``rows`` rows of the packed input; contiguous."""
        if v is None:
            return cls()
        ln = v.layer_norm
        lstm = mode == "LSTM"
        zh, zc = v.zoneout_h_mask, v.zoneout_c_mask if lstm else None
        tensors = (
            *(ln[2:4] if ln is not None else (None, None)),
            *(ln[4:6] if ln is not None and lstm else (None, None)),
            v.recurrent_mask,
            # Padded masks (T, B, R) -> (T*B, R).
            None if zh is None else zh.reshape(rows, -1),
            None if zc is None else zc.reshape(rows, -1),
        )
        return cls(*(None if t is None else t.contiguous() for t in tensors), v.zoneout_p)

    @classmethod
    def from_tensors(cls, tensors: list[Tensor | None], zoneout_p: float | None):
        """From :meth:`tensors`' list, where an empty 1-D tensor also stands for None (the
        operator's lists hold tensors only)."""
        return cls(*(none_if_empty(t) for t in tensors), zoneout_p)

    def tensors(self) -> list[Tensor | None]:
        return [getattr(self, name) for name in self.TENSORS]

    @property
    def layer_norm(self) -> bool:
        return self.ln_hw is not None

    @property
    def zoneout(self) -> bool:
        return self.zoneout_p is not None or self.zh is not None


class ForwardResult(NamedTuple):
    """``out`` (N, H), ``h_n``, ``c_n`` (B, H; ``c_n`` None but for LSTM); saved for backward:
    ``C`` (N, H) the c_t of LSTM (the cell's own c~ under zoneout, and ``CZ`` (N, H) the zoned
    c_t), ``GH`` (N, 3H) the Z_t + b_hh of GRU (after its norm, if any), and with a layer norm
    ``Zr`` (N, G*H) the recurrent product before it and ``stats`` (2 or 4, N) the means and
    reciprocal deviations of that norm and (LSTM) of the cell's, ``A`` (N, G*H) the gate
    activations of LSTM and GRU, and with a projection ``Rs`` (N, H) the r_t it projects
    (each None when not saved)."""

    out: Tensor
    h_n: Tensor
    c_n: Tensor | None
    C: Tensor | None
    GH: Tensor | None
    Zr: Tensor | None = None
    stats: Tensor | None = None
    CZ: Tensor | None = None
    A: Tensor | None = None
    Rs: Tensor | None = None


class BackwardResult(NamedTuple):
    """``dG`` (N, G*H) the input-side pre-activation gradients, ``dGH`` (N, 3H) the hidden-side
    ones of GRU (None otherwise: they are ``dG``), ``dh0`` and ``dc0`` (B, H); with a layer norm
    ``dZ`` (N, G*H) the gradient of the recurrent product before it and the gradients of the
    norms' gains and biases, named as in :class:`NativeVariants` (``ln_cw``, ``ln_cb``: LSTM),
    summed over all rows inside the loop; with a projection ``dHt`` (N, P) the gradient of the
    projected h_t before zoneout."""

    dG: Tensor
    dGH: Tensor | None
    dh0: Tensor
    dc0: Tensor | None
    dZ: Tensor | None = None
    dHt: Tensor | None = None
    ln_hw: Tensor | None = None
    ln_hb: Tensor | None = None
    ln_cw: Tensor | None = None
    ln_cb: Tensor | None = None


# What the C structure carries besides the variants' tensors: the projection, what forward saves
# and backward reads or writes, and scratch buffers.
_C_BUFFERS = ("w_hr", "Zr", "stats", "dZ", "dCN", "CZ", "Rs", "dHt", "scratch", "ln_scratch",
              "zo_scratch", "r_scratch")  # fmt: skip


class _CVariants(ctypes.Structure):
    """``nl_variants`` of loop.c: :class:`NativeVariants`' tensors, then the buffers."""

    _fields_ = [
        *((name, ctypes.c_void_p) for name in (*NativeVariants.TENSORS, *_C_BUFFERS)),
        ("eps", ctypes.c_double),
        ("zoneout_p", ctypes.c_double),
        ("zoneout", ctypes.c_int64),
        ("proj", ctypes.c_int64),
        ("ln_grads", ctypes.c_void_p),
    ]  # fmt: skip


class CInt8Matrix(ctypes.Structure):
    """``nl_q8_matrix`` of int8.h: one packed int8 matrix (engines/native/int8.py)."""

    _fields_ = [
        ("w", ctypes.c_void_p),
        ("wsum", ctypes.c_void_p),
        ("scale", ctypes.c_void_p),
        ("gates", ctypes.c_int64),
        ("H", ctypes.c_int64),
        ("K", ctypes.c_int64),
    ]


class CInt8(ctypes.Structure):
    """``nl_q8``: the int8 W_hh and (LSTM's projection) W_hr of one loop, ``hr.w`` NULL for
    none; with ``x`` set, the input rows whose ``x W_ih^T + bias`` (``ih``, ``bias``) the loop
    writes into G itself, before the walk."""

    _fields_ = [
        ("hh", CInt8Matrix),
        ("hr", CInt8Matrix),
        ("ih", CInt8Matrix),
        ("x", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
    ]


def covers(spec: LayerSpec) -> bool:
    """Whether the native loop runs layers of ``spec``: every mode, LSTM's projection, and LSTM
    and GRU with layer norm, recurrent dropout and zoneout, alone or together (weight drop,
    learned initial states and the forget bias change only the tensors it receives)."""
    return spec.mode in _MODES


def _flag_sets(arch: str) -> list[list[str]]:
    if arch not in ARCHES:
        raise OSError(f"RNNKIT_NATIVE_ARCH must be one of {sorted(ARCHES)}; got {arch!r}")
    march = f"-march={ARCHES[arch]}"
    return [[march, openmp, *_COMMON_FLAGS] for openmp in ("-fopenmp", "-fopenmp-simd")]


def _build(arch: str) -> ctypes.CDLL:
    lib = native_build.build(_SOURCE, _flag_sets(arch))
    for suffix in _SUFFIX.values():
        for name in ("nl_forward", "nl_backward"):
            getattr(lib, f"{name}_{suffix}").restype = ctypes.c_int64
    lib.nl_has_openmp.restype = ctypes.c_int64
    for name in ("nl_q8_isa", "nl_q8_packed_size", "nl_q8_pack", "nl_q8_linear"):
        getattr(lib, name).restype = ctypes.c_int64
    lib.nl_advise_huge_pages.restype = ctypes.c_int64
    return lib


_LIBRARIES = {
    arch: native_build.OnFirstUse(
        lambda arch=arch: _build(arch),
        "the native time loop is unavailable ({}); the reference engine runs instead "
        "(correct, slower)",
    )
    for arch in ARCHES
}


def _library() -> native_build.OnFirstUse:
    if ARCH not in _LIBRARIES:
        raise ValueError(f"RNNKIT_NATIVE_ARCH must be one of {sorted(ARCHES)}; got {ARCH!r}")
    return _LIBRARIES[ARCH]


@contextlib.contextmanager
def use_arch(arch: str) -> Iterator[None]:
    """Run the loop built for ``arch`` (a key of ``ARCHES``) inside the block."""
    global ARCH
    if arch not in ARCHES:
        raise ValueError(f"use_arch: arch must be one of {sorted(ARCHES)}; got {arch!r}")
    previous, ARCH = ARCH, arch
    try:
        yield
    finally:
        ARCH = previous


# Building touches the file system, which torch.compile cannot trace: under compile this
# runs once at trace time and its answer is a constant of the graph.
@native_build.constant_under_compile
def available(dtype: torch.dtype = torch.float32) -> bool:
    """True when the library is built (building it on the first call) and supports ``dtype``
    (float32 or float64)."""
    return dtype in _SUFFIX and _library().get() is not None


def library() -> ctypes.CDLL:
    """The loaded library for the current arch (building it on first use)."""
    lib = _library().get()
    if lib is None:
        raise RuntimeError(f"native_loop: the native library is unavailable ({build_error()})")
    return lib


def build_error() -> str | None:
    """Why the library could not be built or loaded (after :func:`available`), or None."""
    return _library().error


# Multiply-adds of one step's recurrent product below which the loop stays on one thread: the
# threads meet at a barrier every step. On an idle 2-core machine two threads take 0.68x the time
# of one at H=256 (B=1 to 64), but a small step gains nothing, and when other processes hold the
# cores a barrier can cost a time slice (measured: a 20-step H=16 GRU took 120 ms on two threads
# of a busy machine against 0.5 ms on one). 2^17 keeps H=256 LSTM and GRU parallel from B=1.
PARALLEL_MIN_MACS = 1 << 17


def _default_threads(B: int, H: int, GW: int) -> int:
    return torch.get_num_threads() if B * H * GW >= PARALLEL_MIN_MACS else 1


# The most threads a call takes (loop.c's NL_MAX_THREADS).
MAX_THREADS = 1024


def threads_arg(threads: int | None, default: int) -> ctypes.c_int64:
    """A call's thread count for the C loop: ``threads``, an int in [1, MAX_THREADS], or None
    for ``default``."""
    if threads is None:
        return ctypes.c_int64(default)
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"native_loop: threads must be an int from 1 to {MAX_THREADS} or None; "
                         f"got {threads!r}")  # fmt: skip
    return ctypes.c_int64(threads)


def _split(split: str) -> ctypes.c_int64:
    """The C loop's code for ``split`` ("auto", "units" or "rows")."""
    if split not in _SPLITS:
        raise ValueError(f"native_loop: split must be one of {sorted(_SPLITS)}; got {split!r}")
    return ctypes.c_int64(_SPLITS[split])


def _gemm_min_rows(gemm: bool | None) -> ctypes.c_int64:
    """The C loop's threshold for the panels; ``gemm=False`` forces the own dot products."""
    return ctypes.c_int64(2**62 if gemm is False else GEMM_MIN_ROWS)


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
    # The same sizes come back every call (padded input: B rows every step), and checking 100 of
    # them in Python took about 20 us, a fifth of a short int8 call: checked once per tuple. The
    # C loop only reads the tensor.
    key = batch_sizes if type(batch_sizes) is tuple else tuple(int(b) for b in batch_sizes)
    return _checked_sizes(key, rows, B)


@functools.lru_cache(maxsize=32)
def _checked_sizes(batch_sizes: tuple[int, ...], rows: int, B: int) -> torch.Tensor:
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


# The loop's large outputs (the saved activations, dG) are a few tens of MiB each per call:
# fresh from the allocator they take one page fault per 4 KiB inside the loop, where a fault on
# one thread holds the other at the next barrier (measured: 15-30 ms of a 150 ms B=64 LSTM
# training step). So buffers from POOL_MIN_BYTES up come from a pool that keeps them when their
# last tensor dies (the pool's reference is then the only one) and hands them out again, up to
# POOL_MAX_BYTES of idle ones (RNNKIT_NATIVE_POOL_MIB, 0: no pool) and POOL_MAX_BUFFERS in all
# (past it, say while a caller keeps every output, new buffers are plain ones); each new one is
# offered transparent huge pages before its first write (RNNKIT_NATIVE_HUGE_PAGES=0: not).
POOL_MIN_BYTES = 1 << 20
POOL_MAX_BYTES = int(os.environ.get("RNNKIT_NATIVE_POOL_MIB", "512")) << 20
POOL_MAX_BUFFERS = 64
HUGE_PAGES = os.environ.get("RNNKIT_NATIVE_HUGE_PAGES", "1") != "0"
_pool: list[torch.UntypedStorage] = []
_pool_lock = threading.Lock()


# The pool needs torch's storage use counts (a private function; without it, no pool).
_COUNTS = hasattr(torch._C, "_storage_Use_Count")


def _idle(storage: torch.UntypedStorage) -> bool:
    """Whether no tensor holds ``storage`` any more (the pool's own reference is the one)."""
    return torch._C._storage_Use_Count(storage._cdata) == 1


def _buffer(like: Tensor, *shape: int) -> Tensor:
    """An uninitialised contiguous tensor of ``shape`` with ``like``'s dtype and device, for the
    loop to write in full: a large one from the pool."""
    nbytes = math.prod(shape) * like.element_size()
    if nbytes < POOL_MIN_BYTES or POOL_MAX_BYTES <= 0 or like.device.type != "cpu" or not _COUNTS:
        return like.new_empty(shape)
    with _pool_lock:
        for storage in _pool:
            if storage.nbytes() == nbytes and _idle(storage):
                return like.new_empty(0).set_(storage, 0, shape)
        t = like.new_empty(shape)
        if HUGE_PAGES:
            _library().lib.nl_advise_huge_pages(ctypes.c_void_p(t.data_ptr()),
                                                ctypes.c_int64(nbytes))  # fmt: skip
        # Past the caps, the idle buffers go, oldest first.
        idle = [s for s in _pool if _idle(s)]
        idle_bytes = sum(s.nbytes() for s in idle) + nbytes
        for storage in idle:
            if idle_bytes <= POOL_MAX_BYTES and len(_pool) < POOL_MAX_BUFFERS:
                break
            _pool.remove(storage)
            idle_bytes -= storage.nbytes()
        if len(_pool) < POOL_MAX_BUFFERS:
            _pool.append(t.untyped_storage())
        return t


def _run(fn, *args) -> None:
    rc = fn(*args)
    if rc != 0:
        raise RuntimeError(f"native_loop: the C loop refused its arguments: {_ERRORS.get(rc, rc)}")


class _Layout(NamedTuple):
    """Sizes: rows N, batch B, hidden H, gate columns GW = G*H, width R of h (P or H)."""

    N: int
    B: int
    H: int
    GW: int
    R: int


def _check_rows(G: Tensor) -> None:
    """G is checked first: the other tensors' dtypes are checked against its own, and a loop of
    no rows has no step to run (callers return empty results before they get here)."""
    if not isinstance(G, Tensor) or G.dtype not in _SUFFIX:
        got = f"{G.dtype} tensor" if isinstance(G, Tensor) else type(G).__name__
        raise ValueError(f"native_loop: G must be a float32 or float64 tensor; got a {got}")
    if G.dim() == 2 and G.shape[0] == 0:
        raise ValueError("native_loop: G has no rows: a walk needs at least one step of one row")


def _layout(
    mode: str, G: Tensor, h0: Tensor, w_hh: Tensor, w_hr: Tensor | None, wdtype: torch.dtype
) -> _Layout:
    if mode not in _MODES:
        raise ValueError(f"native_loop: mode must be one of {sorted(_MODES)}; got {mode!r}")
    if G.dim() != 2 or h0.dim() != 2:
        raise ValueError(f"native_loop: G and h0 must be matrices; got {G.dim()}-D, {h0.dim()}-D")
    (N, GW), (B, R), gates = G.shape, h0.shape, _GATES[mode]
    if R < 1 or B < 1:
        raise ValueError(f"native_loop: h0 must be non-empty; got {tuple(h0.shape)}")
    if w_hr is None and GW != gates * R:
        raise ValueError(f"native_loop: G has {GW} columns, but {mode} with H={R} needs "
                         f"{gates * R}")  # fmt: skip
    H = GW // gates
    if w_hr is not None:
        if mode != "LSTM":
            raise ValueError(f"native_loop: a projection (w_hr) is for LSTM, not {mode}")
        if GW % gates or H < 1:
            raise ValueError(f"native_loop: G has {GW} columns, not 4*H for some H >= 1")
        _check("w_hr", w_hr, (R, H), wdtype)
    _check("w_hh", w_hh, (GW, R), wdtype)
    return _Layout(N, B, H, GW, R)


def _check_variants(
    mode: str, v: NativeVariants | None, size: _Layout, dtype: torch.dtype
) -> NativeVariants:
    v = v or NativeVariants()
    N, B, H, GW, R = size
    ln_parts = (v.ln_hw, v.ln_hb, v.ln_cw, v.ln_cb)
    if any(t is not None for t in ln_parts):
        if mode not in ("LSTM", "GRU"):
            raise ValueError(f"native_loop: layer norm is for LSTM and GRU, not {mode}")
        _check("ln_hw", v.ln_hw, (GW,), dtype)
        _check("ln_hb", v.ln_hb, (GW,), dtype)
        if mode == "LSTM":
            _check("ln_cw", v.ln_cw, (H,), dtype)
            _check("ln_cb", v.ln_cb, (H,), dtype)
        elif v.ln_cw is not None or v.ln_cb is not None:
            raise ValueError("native_loop: GRU has no cell to normalise; ln_cw, ln_cb must be None")
    if v.rmask is not None:
        _check("rmask", v.rmask, (B, R), dtype)
    if v.zoneout:
        if mode not in ("LSTM", "GRU"):
            raise ValueError(f"native_loop: zoneout is for LSTM and GRU, not {mode}")
        p = v.zoneout_p
        if p is not None and not 0 <= p <= 1:
            raise ValueError(f"native_loop: zoneout_p must be in [0, 1]; got {p}")
        if v.zh is None and p is None:
            raise ValueError("native_loop: zoneout needs its probability or its masks")
        if v.zh is not None:
            _check("zh", v.zh, (N, R), dtype)
        if mode == "LSTM" and (v.zh is None) != (v.zc is None):
            raise ValueError("native_loop: LSTM zoneout takes both masks, zh and zc, or neither")
        if v.zc is not None:
            if mode != "LSTM":
                raise ValueError("native_loop: GRU has no cell to zone out; zc must be None")
            _check("zc", v.zc, (N, H), dtype)
    return v


def _c_variants(
    v: NativeVariants, w_hr: Tensor | None, int8: bool = False, **saved: Tensor | None
) -> object:
    """The C structure of ``v``, the projection and the buffers that go with them (None for a
    plain layer: the C loop then runs its plain steps). ``int8``: ``w_hr`` gives the
    projection's size only (its int8 form is in the loop's ``nl_q8``)."""
    if not v.layer_norm and v.rmask is None and not v.zoneout and w_hr is None:
        return None
    proj = 0 if w_hr is None else w_hr.shape[0]
    cv = _CVariants(eps=LN_EPS, zoneout_p=v.zoneout_p or 0.0, zoneout=int(v.zoneout), proj=proj)
    cv.w_hr = None if w_hr is None or int8 else w_hr.data_ptr()
    tensors = dict(zip(NativeVariants.TENSORS, v.tensors(), strict=True))
    for name, t in [*tensors.items(), *saved.items()]:
        setattr(cv, name, None if t is None else t.data_ptr())
    return ctypes.byref(cv)


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
    w_hr: Tensor | None = None,
    variants: NativeVariants | None = None,
    threads: int | None = None,
    gemm: bool | None = None,
    int8: CInt8 | None = None,
    split: str = "auto",
) -> ForwardResult:
    """One layer and direction forward over packed-layout rows, all steps in one native call.

    ``mode``: "LSTM", "GRU", "RNN_TANH" or "RNN_RELU". ``G`` (N, G*H), contiguous: ``x W_ih^T``
    plus the biases as ``op.run_layer`` adds them (``b_ih + b_hh`` for LSTM and RNN,
    ``b_ih`` only for GRU); read only. ``h0`` (B, R), ``c0`` (B, H); ``w_hh`` (G*H, R);
    ``b_hh`` (G*H,) is used by GRU only (None: no bias); ``w_hr`` (P, H): LSTM's projection
    (then R = P, else R = H). Step t (of ``batch_sizes``, positive, non-increasing) touches rows
    ``[:batch_sizes[t]]`` of the state. ``save=False`` (inference) skips storing what backward
    reads (the activations ``A`` too: each step's stay in a scratch row). ``variants``: see
    :class:`NativeVariants`. ``int8``: int8 ``W_hh`` and ``W_hr`` (``engines/native/int8.py``,
    which checks them; float32 inference only), read instead of ``w_hh`` and ``w_hr``, which
    then only give their shapes (any float32 tensors of those shapes, such as empty views).
    ``split``: how threads share the work, "units" of every step, "rows" of the batch (each its
    own rows through every step: no waiting, but each reads all of ``w_hh``; not with recurrent
    dropout, which takes units) or "auto" (loop.c's ``rows_pay``, for int8 ``q8_rows_pay``).
    """
    if int8 is not None and (save or G.dtype != torch.float32):
        raise ValueError("native_loop: int8 weights are for float32 inference (save=False)")
    _check_rows(G)
    size = _layout(mode, G, h0, w_hh, w_hr, G.dtype if int8 is None else torch.int8)
    N, B, H, GW, R = size
    dtype, lstm, gru = G.dtype, mode == "LSTM", mode == "GRU"
    _check("G", G, (N, GW), dtype)
    _check("h0", h0, (B, R), dtype)
    if lstm:
        _check("c0", c0, (B, H), dtype)
    if gru and b_hh is not None:
        _check("b_hh", b_hh, (GW,), dtype)
    v = _check_variants(mode, variants, size, dtype)
    bs = _sizes(batch_sizes, N, B)
    if not available(dtype):
        raise RuntimeError(f"native_loop: the native library is unavailable for {dtype}")
    ln, proj = v.layer_norm, w_hr is not None
    Zr = _buffer(G, N, GW) if ln and save else None
    stats = G.new_empty(4 if lstm else 2, N) if ln and save else None
    # h_{t-1} * mask, double-buffered: the product of step t reads one, step t writes the other.
    scratch = G.new_empty(2, B, R) if v.rmask is not None else None
    # Without saving, the normed product needs a place of its own (the raw one is in Z).
    ln_scratch = G.new_empty(B, GW) if ln and not save else None
    CZ = G.new_empty(N, H) if v.zoneout and lstm and save else None
    zo_scratch = G.new_empty(B * R + 2 * B * H) if v.zoneout else None
    Rs = G.new_empty(N, H) if proj and save else None
    r_scratch = G.new_empty(B, H) if proj and not save else None
    cv = _c_variants(v, w_hr, int8 is not None, Zr=Zr, stats=stats, CZ=CZ, Rs=Rs, scratch=scratch,
                     ln_scratch=ln_scratch, zo_scratch=zo_scratch, r_scratch=r_scratch)  # fmt: skip
    out = _buffer(G, N, R)
    # The loop starts h and c from h0 and c0 itself.
    h = h0.new_empty(B, R)
    c = c0.new_empty(B, H) if lstm else None
    C = _buffer(G, N, H) if lstm and save else None
    GH = _buffer(G, N, GW) if gru and save else None
    A = _buffer(G, N, GW) if (lstm or gru) and save else None
    # The scratch (each step's product Z, the steps' row offsets) the C loop allocates itself,
    # and it copies h0 and c0 into h and c: a call's small torch operators cost more than their
    # work once other work has left the caches cold (ten of them, allocations, views and a copy:
    # 15 us in all warm, 200 right after a 1024x1024 matmul, on the 2-core Zen 4), several steps
    # of a B=1 layer.
    i64 = ctypes.c_int64
    _run(
        getattr(_library().lib, f"nl_forward_{_SUFFIX[dtype]}"),
        i64(_MODES[mode]), i64(int(reverse)), i64(len(bs)), _ptr(bs), i64(N), i64(B), i64(H),
        _ptr(G), _ptr(A), _ptr(w_hh if int8 is None else None), _ptr(b_hh if gru else None),
        _ptr(h0), _ptr(c0 if lstm else None), _ptr(out), _ptr(h), _ptr(c), _ptr(C), _ptr(GH),
        None, None,
        threads_arg(threads, _default_threads(B, R, GW)), _gemm_min_rows(gemm), _split(split), cv,
        None if int8 is None else ctypes.byref(int8),
    )  # fmt: skip
    return ForwardResult(out, h, c, C, GH, Zr, stats, CZ, A, Rs)


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
    variants: NativeVariants | None = None,
    Zr: Tensor | None = None,
    stats: Tensor | None = None,
    CZ: Tensor | None = None,
    w_hr: Tensor | None = None,
    threads: int | None = None,
    gemm: bool | None = None,
    split: str = "auto",
) -> BackwardResult:
    """The backward walk of :func:`forward` (``engines/README.md``), all steps in one call.

    ``G`` (N, G*H): the activations ``A`` that :func:`forward` saved (for RNN, which saves none,
    any matrix of that shape: unread); ``out``, ``C``, ``GH``: what it saved; ``d_out`` (N, R),
    ``d_hn`` (B, R), ``d_cn`` (B, H): incoming gradients, None for zero. ``variants``, ``Zr``,
    ``stats``, ``CZ``, ``w_hr``: as :func:`forward` had and saved (with a projection the
    caller adds ``dW_hr = dHt^T Rs``). The layer norms' gain and bias gradients come summed
    over all rows. The caller finishes as
    ``op.py`` does: ``dX = dG W_ih``, ``dW_ih = dG^T X``, ``dW_hh = dY^T H_prev``
    with ``dY`` = ``dZ`` under a layer norm, else ``dGH`` for GRU, else ``dG`` (and ``H_prev``
    times the recurrent-dropout mask). ``split``: as :func:`forward`'s.
    """
    _check_rows(G)
    size = _layout(mode, G, h0, w_hh, w_hr, G.dtype)
    N, B, H, GW, R = size
    dtype, lstm, gru = G.dtype, mode == "LSTM", mode == "GRU"
    for name, t, shape in [("G", G, (N, GW)), ("out", out, (N, R)), ("h0", h0, (B, R))]:
        _check(name, t, shape, dtype)
    if lstm:
        _check("C", C, (N, H), dtype)
        _check("c0", c0, (B, H), dtype)
    if gru:
        _check("GH", GH, (N, GW), dtype)
    if d_out is not None:
        d_out = d_out.contiguous()
        _check("d_out", d_out, (N, R), dtype)
    v = _check_variants(mode, variants, size, dtype)
    if v.layer_norm:
        _check("Zr", Zr, (N, GW), dtype)
        _check("stats", stats, (4 if lstm else 2, N), dtype)
    if v.zoneout and lstm:
        _check("CZ", CZ, (N, H), dtype)
    bs = _sizes(batch_sizes, N, B)
    if not available(dtype):
        raise RuntimeError(f"native_loop: the native library is unavailable for {dtype}")
    dh = h0.new_zeros(B, R) if d_hn is None else d_hn.to(dtype).clone(
        memory_format=torch.contiguous_format)  # fmt: skip
    _check("d_hn", dh, (B, R), dtype)
    dc = None
    if lstm:
        dc = h0.new_zeros(B, H) if d_cn is None else d_cn.to(dtype).clone(
            memory_format=torch.contiguous_format)  # fmt: skip
        _check("d_cn", dc, (B, H), dtype)
    dG = _buffer(G, N, GW)
    dGH = _buffer(G, N, GW) if gru else None
    dZ = _buffer(G, N, GW) if v.layer_norm else None
    # The cell norm's output gradient, one step's rows at a time.
    dCN = G.new_empty(B, H) if v.layer_norm and lstm else None
    # The norms' gain and bias gradients, [ln_hw, ln_hb, ln_cw, ln_cb], summed in float64.
    ln_sizes = (GW, GW, *((H, H) if lstm else ()))
    ln_grads = G.new_zeros(sum(ln_sizes), dtype=torch.float64) if v.layer_norm else None
    scratch = G.new_empty(B, R) if v.rmask is not None else None
    zo_scratch = G.new_empty(B * R + B * H) if v.zoneout else None
    proj = w_hr is not None
    dHt = _buffer(G, N, R) if proj else None
    r_scratch = G.new_empty(B, H) if proj else None
    cv = _c_variants(v, w_hr, Zr=Zr, stats=stats, dZ=dZ, dCN=dCN, CZ=CZ if v.zoneout else None,
                     dHt=dHt, scratch=scratch, zo_scratch=zo_scratch,
                     r_scratch=r_scratch, ln_grads=ln_grads)  # fmt: skip
    offsets = torch.empty(len(bs) + 1, dtype=torch.int64)
    i64 = ctypes.c_int64
    _run(
        getattr(_library().lib, f"nl_backward_{_SUFFIX[dtype]}"),
        i64(_MODES[mode]), i64(int(reverse)), i64(len(bs)), _ptr(bs), i64(N), i64(B), i64(H),
        _ptr(G), _ptr(GH if gru else None), _ptr(out), _ptr(C if lstm else None), _ptr(h0),
        _ptr(c0 if lstm else None), _ptr(w_hh), _ptr(d_out), _ptr(dh), _ptr(dc), _ptr(dG),
        _ptr(dGH), _ptr(offsets), threads_arg(threads, _default_threads(B, R, GW)),
        _gemm_min_rows(gemm), _split(split), cv,
    )  # fmt: skip
    ln = [] if ln_grads is None else [g.to(dtype, copy=True) for g in ln_grads.split(ln_sizes)]
    return BackwardResult(dG, dGH, dh, dc, dZ, dHt, *ln)
