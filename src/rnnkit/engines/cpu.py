"""CPU pointwise kernels: ``cpu_kernels.c`` built on first use with the system C compiler and
called through ctypes; the same functions and contract as ``pointwise.py``.

The library is built once per machine into ``$RNNKIT_CACHE`` (default ``~/.cache/rnnkit``),
named by a hash of the source and flags, and renamed into place so that concurrent processes
never load a half-written file. Without a compiler, :func:`available` is False and the fused
engine uses the torch-op kernels instead (correct, slower).
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "-fPIC", "-shared"]
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
# Every function of cpu_kernels.c, each in an _f32 and an _f64 version.
_KERNELS = [
    f"{op}_{step}" for op in ("lstm", "gru", "rnn", "ln_lstm") for step in ("forward", "backward")
] + ["lstm_forward_zoneout", "lstm_backward_zoneout", "gru_forward_zoneout", "gru_backward_zoneout"]
_lib: ctypes.CDLL | None = None
_failed = False


def _build() -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([compiler, *_FLAGS]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("RNNKIT_CACHE", Path.home() / ".cache" / "rnnkit"))
    target = cache / f"cpu_kernels-{key}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so")
        os.close(fd)
        try:
            subprocess.run(
                [compiler, *_FLAGS, "-o", tmp, str(_SOURCE), "-lm"],
                check=True,
                capture_output=True,
                text=True,
            )
            os.replace(tmp, target)
        except (OSError, subprocess.CalledProcessError) as e:
            Path(tmp).unlink(missing_ok=True)
            detail = getattr(e, "stderr", "") or str(e)
            warnings.warn(
                f"rnnkit: could not build the CPU kernels ({detail.strip()[:200]}); "
                "the fused engine falls back to torch ops",
                stacklevel=3,
            )
            return None
    lib = ctypes.CDLL(str(target))
    for name in _KERNELS:
        for suffix in _SUFFIX.values():
            getattr(lib, f"{name}_{suffix}").restype = None
    return lib


def available(dtype: torch.dtype) -> bool:
    """True when the kernels are built (building them on the first call) and support ``dtype``."""
    global _lib, _failed
    if dtype not in _SUFFIX or _failed or os.environ.get("RNNKIT_NO_CPU_KERNELS") == "1":
        return False
    if _lib is None:
        _lib = _build()
        _failed = _lib is None
    return _lib is not None


def _args(*tensors: Tensor | None) -> list:
    out = []
    for t in tensors:
        if t is None:
            out += [None, 0]
        else:
            if t.stride(1) != 1:
                raise ValueError("rnnkit CPU kernels need rows with unit column stride")
            out += [ctypes.c_void_p(t.data_ptr()), ctypes.c_int64(t.stride(0))]
    return out


def _call(name: str, ref: Tensor, H: int, *tensors: Tensor | None, extra: tuple = ()) -> None:
    fn = getattr(_lib, f"{name}_{_SUFFIX[ref.dtype]}")
    fn(ctypes.c_int64(ref.shape[0]), ctypes.c_int64(H), *_args(*tensors), *extra)


def lstm_forward(
    g: Tensor, gh: Tensor, c: Tensor, c_save: Tensor, h: Tensor | None, out: Tensor
) -> None:
    _call("lstm_forward", c, c.shape[1], g, gh, c, c_save, h, out)


def lstm_backward(g: Tensor, c: Tensor, c_prev: Tensor, dh: Tensor, dc: Tensor, dg: Tensor) -> None:
    _call("lstm_backward", c, c.shape[1], g, c, c_prev, dh, dc, dg)


def gru_forward(g: Tensor, gh: Tensor, h: Tensor, out: Tensor) -> None:
    _call("gru_forward", h, h.shape[1], g, gh, h, out)


def gru_backward(
    g: Tensor, gh: Tensor, h_prev: Tensor, dh: Tensor, dg: Tensor, dgh: Tensor, dh_prev: Tensor
) -> None:
    _call("gru_backward", h_prev, h_prev.shape[1], g, gh, h_prev, dh, dg, dgh, dh_prev)


def rnn_forward(g: Tensor, gh: Tensor, h: Tensor, out: Tensor, relu: bool) -> None:
    _call("rnn_forward", h, h.shape[1], g, gh, h, out, extra=(ctypes.c_int64(int(relu)),))


def rnn_backward(h: Tensor, dh: Tensor, dg: Tensor, relu: bool) -> None:
    _call("rnn_backward", h, h.shape[1], h, dh, dg, extra=(ctypes.c_int64(int(relu)),))


def _vec(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def ln_lstm_forward(
    g, z, ln_hw, ln_hb, mu_h, rs_h, c, c_save, cn_save, mu_c, rs_c, ln_cw, ln_cb, out, eps
) -> None:
    fn = getattr(_lib, f"ln_lstm_forward_{_SUFFIX[c.dtype]}")
    scalar = ctypes.c_float if c.dtype == torch.float32 else ctypes.c_double
    fn(
        ctypes.c_int64(c.shape[0]), ctypes.c_int64(c.shape[1]), scalar(eps),
        *_args(g, z), _vec(ln_hw), _vec(ln_hb), *_args(mu_h, rs_h, c, c_save, cn_save, mu_c, rs_c),
        _vec(ln_cw), _vec(ln_cb), *_args(out),
    )  # fmt: skip


def ln_lstm_backward(
    g, c, c_prev, cn, mu_c, rs_c, ln_cw, z, mu_h, rs_h, ln_hw, dh, dc, dg, dcn, dz
) -> None:
    fn = getattr(_lib, f"ln_lstm_backward_{_SUFFIX[c.dtype]}")
    fn(
        ctypes.c_int64(c.shape[0]), ctypes.c_int64(c.shape[1]),
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


def lstm_forward_zoneout(g, gh, c, c_save, cz_save, h, out, zh, zc) -> None:
    fn = getattr(_lib, f"lstm_forward_zoneout_{_SUFFIX[c.dtype]}")
    fn(
        ctypes.c_int64(c.shape[0]), ctypes.c_int64(c.shape[1]),
        *_args(g, gh, c, c_save, cz_save, h, out), *_zone_args(c, zh, zc),
    )  # fmt: skip


def lstm_backward_zoneout(g, c, c_prev, dh, dc, dg, dh_carry, zh, zc) -> None:
    fn = getattr(_lib, f"lstm_backward_zoneout_{_SUFFIX[c.dtype]}")
    fn(
        ctypes.c_int64(c.shape[0]), ctypes.c_int64(c.shape[1]),
        *_args(g, c, c_prev, dh, dc, dg, dh_carry), *_zone_args(c, zh, zc),
    )  # fmt: skip


def gru_forward_zoneout(g, gh, h, out, zh) -> None:
    fn = getattr(_lib, f"gru_forward_zoneout_{_SUFFIX[h.dtype]}")
    fn(
        ctypes.c_int64(h.shape[0]), ctypes.c_int64(h.shape[1]),
        *_args(g, gh, h, out), *_zone_args(h, zh),
    )  # fmt: skip


def gru_backward_zoneout(g, gh, h_prev, dh, dg, dgh, dh_prev, zh) -> None:
    fn = getattr(_lib, f"gru_backward_zoneout_{_SUFFIX[h_prev.dtype]}")
    fn(
        ctypes.c_int64(h_prev.shape[0]), ctypes.c_int64(h_prev.shape[1]),
        *_args(g, gh, h_prev, dh, dg, dgh, dh_prev), *_zone_args(h_prev, zh),
    )  # fmt: skip
