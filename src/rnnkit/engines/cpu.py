"""CPU pointwise kernels: ``cpu_kernels.c`` built on first use with the system C compiler and
called through ctypes; the same functions and contract as ``pointwise.py``.

The library is built once per machine into ``$RNNKIT_CACHE`` (default ``~/.cache/rnnkit``),
named by a hash of the source, the flags and the CPU's features (``-march=native`` code must not
be loaded on another CPU sharing the cache), and renamed into place so that concurrent processes
never load a half-written file. Whatever goes wrong (no compiler, no source, a failed build or
load), :func:`available` is False after one warning and the fused engine uses the torch-op
kernels instead (correct, slower).

The C code trusts its pointers, so every call checks here that each matrix is a CPU tensor of
the kernel's dtype with unit column stride and at least the rows and columns the kernel touches.
"""

import ctypes
from pathlib import Path

import torch
from torch import Tensor

from rnnkit.engines import native_build

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
# No -ffast-math: it lets the compiler assume there is no NaN or inf, and torch.nn propagates
# them. The two -fno flags only drop errno and trap semantics, which keeps NaN exact and lets
# the loops vectorise.
_FLAGS = [
    "-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd",
    "-fPIC", "-shared",
]  # fmt: skip
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
# Every function of cpu_kernels.c, each in an _f32 and an _f64 version.
_KERNELS = [
    f"{op}_{step}" for op in ("lstm", "gru", "rnn", "ln_lstm") for step in ("forward", "backward")
] + ["lstm_forward_zoneout", "lstm_backward_zoneout", "gru_forward_zoneout", "gru_backward_zoneout"]


def library_path(compiler: str, cache: Path) -> Path:
    """Where the library built from this source, compiler, flags and CPU lives in ``cache``."""
    return native_build.library_path(_SOURCE, compiler, _FLAGS, cache)


def _build() -> ctypes.CDLL:
    """Build (or find in the cache) and load the library; raises on any failure."""
    lib = native_build.build(_SOURCE, [_FLAGS])
    for name in _KERNELS:
        for suffix in _SUFFIX.values():
            getattr(lib, f"{name}_{suffix}").restype = None
    return lib


_LIBRARY = native_build.OnFirstUse(
    _build,
    "the CPU kernels are unavailable ({}); the fused engine runs the same steps with torch ops "
    "(correct, slower)",
)


# Building touches the file system, which torch.compile cannot trace: under compile this
# runs once at trace time and its answer is a constant of the graph.
@native_build.constant_under_compile
def available(dtype: torch.dtype) -> bool:
    """True when the kernels are built (building them on the first call) and support ``dtype``."""
    return dtype in _SUFFIX and _LIBRARY.get() is not None


def _args(*tensors: Tensor | None) -> list:
    out = []
    for t in tensors:
        if t is None:
            out += [None, 0]
        else:
            out += [ctypes.c_void_p(t.data_ptr()), ctypes.c_int64(t.stride(0))]
    return out


def _guard(name: str, rows: int, dtype: torch.dtype, *shapes: tuple[Tensor | None, int]) -> None:
    """Refuse, before C sees them, matrices the kernel would read or write out of bounds."""
    for t, cols in shapes:
        if t is None:
            continue
        if (
            t.device.type != "cpu"
            or t.dtype != dtype
            or t.dim() != 2
            or t.shape[0] < rows
            or t.shape[1] < cols
            or (cols > 1 and t.stride(1) != 1)
            or (rows > 1 and t.stride(0) < 1)
        ):
            raise RuntimeError(
                f"rnnkit CPU kernel {name}: needs {dtype} CPU matrices of at least ({rows}, "
                f"{cols}) with unit column stride; got {t.dtype} {tuple(t.shape)} on {t.device} "
                f"with strides {t.stride()} (an rnnkit bug: please report it)"
            )


def _guard_vectors(name: str, dtype: torch.dtype, *vectors: tuple[Tensor, int]) -> None:
    for t, size in vectors:
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous() or t.numel() < size:
            raise RuntimeError(
                f"rnnkit CPU kernel {name}: needs contiguous {dtype} CPU vectors of {size} "
                f"elements; got {t.dtype} {tuple(t.shape)} on {t.device} (an rnnkit bug: please "
                "report it)"
            )


def _fn(name: str, ref: Tensor):
    return getattr(_LIBRARY.lib, f"{name}_{_SUFFIX[ref.dtype]}")


def _call(name: str, ref: Tensor, H: int, *tensors: Tensor | None, widths: tuple, extra=()) -> None:
    """``name(bs, H, (pointer, row stride) per matrix, *extra)`` after the bounds guard."""
    _guard(name, ref.shape[0], ref.dtype, *zip(tensors, widths, strict=True))
    _fn(name, ref)(ctypes.c_int64(ref.shape[0]), ctypes.c_int64(H), *_args(*tensors), *extra)


def lstm_forward(
    g: Tensor, gh: Tensor, c: Tensor, c_save: Tensor, h: Tensor | None, out: Tensor
) -> None:
    H = c.shape[1]
    _call("lstm_forward", c, H, g, gh, c, c_save, h, out, widths=(4 * H, 4 * H, H, H, H, H))


def lstm_backward(g: Tensor, c: Tensor, c_prev: Tensor, dh: Tensor, dc: Tensor, dg: Tensor) -> None:
    H = c.shape[1]
    _call("lstm_backward", c, H, g, c, c_prev, dh, dc, dg, widths=(4 * H, H, H, H, H, 4 * H))


def gru_forward(g: Tensor, gh: Tensor, h: Tensor, out: Tensor) -> None:
    H = h.shape[1]
    _call("gru_forward", h, H, g, gh, h, out, widths=(3 * H, 3 * H, H, H))


def gru_backward(
    g: Tensor, gh: Tensor, h_prev: Tensor, dh: Tensor, dg: Tensor, dgh: Tensor, dh_prev: Tensor
) -> None:
    H = h_prev.shape[1]
    widths = (3 * H, 3 * H, H, H, 3 * H, 3 * H, H)
    _call("gru_backward", h_prev, H, g, gh, h_prev, dh, dg, dgh, dh_prev, widths=widths)


def rnn_forward(g: Tensor, gh: Tensor, h: Tensor, out: Tensor, relu: bool) -> None:
    H = h.shape[1]
    relu_arg = (ctypes.c_int64(int(relu)),)
    _call("rnn_forward", h, H, g, gh, h, out, widths=(H,) * 4, extra=relu_arg)


def rnn_backward(h: Tensor, dh: Tensor, dg: Tensor, relu: bool) -> None:
    H = h.shape[1]
    relu_arg = (ctypes.c_int64(int(relu)),)
    _call("rnn_backward", h, H, h, dh, dg, widths=(H,) * 3, extra=relu_arg)


def _vec(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def ln_lstm_forward(
    g, z, ln_hw, ln_hb, mu_h, rs_h, c, c_save, cn_save, mu_c, rs_c, ln_cw, ln_cb, out, eps
) -> None:
    bs, H = c.shape
    name = "ln_lstm_forward"
    _guard(name, bs, c.dtype, (g, 4 * H), (z, 4 * H), (mu_h, 1), (rs_h, 1), (c, H), (c_save, H),
           (cn_save, H), (mu_c, 1), (rs_c, 1), (out, H))  # fmt: skip
    _guard_vectors(name, c.dtype, (ln_hw, 4 * H), (ln_hb, 4 * H), (ln_cw, H), (ln_cb, H))
    scalar = ctypes.c_float if c.dtype == torch.float32 else ctypes.c_double
    _fn(name, c)(
        ctypes.c_int64(bs), ctypes.c_int64(H), scalar(eps),
        *_args(g, z), _vec(ln_hw), _vec(ln_hb), *_args(mu_h, rs_h, c, c_save, cn_save, mu_c, rs_c),
        _vec(ln_cw), _vec(ln_cb), *_args(out),
    )  # fmt: skip


def ln_lstm_backward(
    g, c, c_prev, cn, mu_c, rs_c, ln_cw, z, mu_h, rs_h, ln_hw, dh, dc, dg, dcn, dz
) -> None:
    bs, H = c.shape
    name = "ln_lstm_backward"
    _guard(name, bs, c.dtype, (g, 4 * H), (c, H), (c_prev, H), (cn, H), (mu_c, 1), (rs_c, 1),
           (z, 4 * H), (mu_h, 1), (rs_h, 1), (dh, H), (dc, H), (dg, 4 * H), (dcn, H),
           (dz, 4 * H))  # fmt: skip
    _guard_vectors(name, c.dtype, (ln_cw, H), (ln_hw, 4 * H))
    _fn(name, c)(
        ctypes.c_int64(bs), ctypes.c_int64(H),
        *_args(g, c, c_prev, cn, mu_c, rs_c), _vec(ln_cw), *_args(z, mu_h, rs_h), _vec(ln_hw),
        *_args(dh, dc, dg, dcn, dz),
    )  # fmt: skip


def _zone_args(ref: Tensor, *masks: Tensor | float) -> list:
    """Mask pointers (NULL in eval) and the probability used where they are NULL."""
    out, p = [], 0.0
    for keep in masks:
        if isinstance(keep, Tensor):
            out += _args(keep)
        else:
            out += [None, 0]
            p = keep
    scalar = ctypes.c_float if ref.dtype == torch.float32 else ctypes.c_double
    return [*out, scalar(p)]


def _zoneout_call(name: str, ref: Tensor, tensors: tuple, widths: tuple, masks: tuple) -> None:
    H = ref.shape[1]
    mask_shapes = [(m, H) for m in masks if isinstance(m, Tensor)]
    _guard(name, ref.shape[0], ref.dtype, *zip(tensors, widths, strict=True), *mask_shapes)
    _fn(name, ref)(
        ctypes.c_int64(ref.shape[0]), ctypes.c_int64(H), *_args(*tensors), *_zone_args(ref, *masks)
    )


def lstm_forward_zoneout(g, gh, c, c_save, cz_save, h, out, zh, zc) -> None:
    H = c.shape[1]
    widths = (4 * H, 4 * H, H, H, H, H, H)
    _zoneout_call("lstm_forward_zoneout", c, (g, gh, c, c_save, cz_save, h, out), widths, (zh, zc))


def lstm_backward_zoneout(g, c, c_prev, dh, dc, dg, dh_carry, zh, zc) -> None:
    H = c.shape[1]
    tensors, widths = (g, c, c_prev, dh, dc, dg, dh_carry), (4 * H, H, H, H, H, 4 * H, H)
    _zoneout_call("lstm_backward_zoneout", c, tensors, widths, (zh, zc))


def gru_forward_zoneout(g, gh, h, out, zh) -> None:
    H = h.shape[1]
    _zoneout_call("gru_forward_zoneout", h, (g, gh, h, out), (3 * H, 3 * H, H, H), (zh,))


def gru_backward_zoneout(g, gh, h_prev, dh, dg, dgh, dh_prev, zh) -> None:
    H = h_prev.shape[1]
    tensors, widths = (g, gh, h_prev, dh, dg, dgh, dh_prev), (3 * H, 3 * H, H, H, 3 * H, 3 * H, H)
    _zoneout_call("gru_backward_zoneout", h_prev, tensors, widths, (zh,))
