"""The input side's GEMM of the native engine, ``x W_ih^T + b``, and its input gradient
``dG W_ih``, through oneDNN: the library torch.nn's own CPU LSTM, GRU and RNN run on.

torch's ``addmm``/``mm`` go to MKL, whose float32 kernels on AMD CPUs are its AVX2 ones; oneDNN
picks its kernels by the CPU's instructions on every vendor. On the development machine (AMD
EPYC, AVX-512, 2 cores) its GEMMs of these shapes took 0.8-0.9x MKL's time
(``benchmarks/bench_native_loop.py --gemms`` prints both). The weight gradient ``dG^T x`` stays
on MKL: oneDNN is slower at it from transposed views, and a transposed copy costs more than it
saves.

Used for products large enough for its fixed cost (:func:`worth`), in eager mode only, for
float32 CPU tensors, where ``torch.ops.mkldnn._linear_pointwise`` (the operator torch's own
compiler emits for oneDNN linears) exists and agrees with ``addmm`` on a probe the first time;
graphs (compile, export, ONNX), torch.func transforms and every other case use ``addmm``, so
traced programs never carry a oneDNN operator. A backward that must itself be differentiable
(``create_graph=True``) or that runs under vmap uses differentiable torch ops.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.engines import shared

_usable: bool | None = None

# oneDNN's linear costs a fixed 10-15 us a call more than addmm (its primitive and the weight's
# reorder; 2-core Zen 4, with and without AVX-512), so a small GEMM goes to addmm: one with
# fewer than 2^18 weights (I=H=128 for an LSTM) took 1.1-3.8x addmm's time on oneDNN until
# about 2^23 multiply-adds (the rows of a T=64, B=1 call), both with AVX-512 and as on an AVX2
# CPU; from 2^18 weights oneDNN was level or faster from one row on (0.6-1.05x).
# ``benchmarks/bench_native_loop.py --gemms`` prints both.
MIN_WEIGHTS = 1 << 18
MIN_MACS = 1 << 23


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _probe() -> bool:
    """Whether oneDNN's linear runs here and gives addmm's numbers (to float32 rounding)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        g = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*s, generator=g) for s in ((7, 19), (13, 19), (13,)))
        # As input_side calls it, and as the input gradient does: a transposed view of w.
        d = torch.randn(7, 13, generator=g)
        pairs = ((_linear(x, w, b), torch.addmm(b, x, w.t())), (_linear(d, w.t(), None), d @ w))
        return all(got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-5,
                                                                   atol=1e-5))
                   for got, want in pairs)  # fmt: skip
    except (RuntimeError, AttributeError, TypeError):
        return False


def worth(rows: int, out_features: int, in_features: int) -> bool:
    """Whether a (rows, in) x (in, out) product is large enough for oneDNN (:data:`MIN_WEIGHTS`,
    :data:`MIN_MACS`)."""
    weights = out_features * in_features
    return rows > 0 and (weights >= MIN_WEIGHTS or rows * weights >= MIN_MACS)


def usable(*tensors: Tensor | None) -> bool:
    """Whether :func:`input_side` runs through oneDNN for these tensors."""
    global _usable
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if shared.functorch_active() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or t.dtype != torch.float32):
            return False
    if _usable is None:
        _usable = _probe()
    return _usable


class _InputSide(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _linear(x, w, b)

    @staticmethod
    def backward(ctx, dG: Tensor):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        # Differentiable ops where the backward is itself differentiated or vmapped.
        fast = not shared.needs_reference_backward(dG)
        dx = dw = db = None
        if need_x:
            # oneDNN reads the transposed view as it is: 0.9x the time of a transposed copy
            # (N=1600, G=1024, K=256), and the copy itself is gone.
            fast = fast and worth(dG.shape[0], w.shape[1], w.shape[0])
            dx = _linear(dG.contiguous(), w.t(), None) if fast else dG @ w
        if need_w:
            dw = dG.t() @ x  # (G*H, I)
        if need_b and ctx.has_bias:
            db = dG.sum(0)
        return dx, dw, db


def input_side(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``x w^T + b``: x (N, I), w (G*H, I), b (G*H,) or None; through oneDNN where
    :func:`usable` and :func:`worth`, else ``addmm``."""
    # usable first: under torch.compile it is False, and a test of the sizes would be a guard.
    if usable(x, w, b) and worth(x.shape[0], w.shape[0], w.shape[1]):
        x, w = x.contiguous(), w.contiguous()
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, w, b)):
            return _InputSide.apply(x, w, b)
        return _linear(x, w, b)
    return x @ w.t() if b is None else torch.addmm(b, x, w.t())
