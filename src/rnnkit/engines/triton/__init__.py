"""The triton engine (CUDA; the CPU under ``TRITON_INTERPRET=1``): one ``autograd.Function`` per
layer and direction with a hand-written BPTT, stepped in Python over Triton kernels.

Forward: the input projections of all steps in one GEMM; per step one recurrent GEMM and one
pointwise kernel that saves only what backward needs. Backward walks time in reverse with one
recurrent GEMM and one pointwise kernel per step; the weight gradients and the input gradient are
each one GEMM over all steps. Variable lengths run as per-step batch sizes: sequences are sorted
by decreasing length (as in ``PackedSequence``), so step t touches rows ``[:batch_sizes[t]]`` of
the state and a finished sequence keeps its state, which is its ``h_n``. Plain LSTM inference
with a small H runs as one persistent launch instead.

- ``kernels.py``: the Triton kernels and their launchers; Triton is imported there only.
- ``twins.py``: each kernel's torch-op twin (its spec, and what runs where a kernel cannot).
- ``layer.py``: the named structures: ``LayerTensors`` (a layer's tensors, and by the same names
  their gradients), ``LayerSettings`` (the rest, decided once), ``StepKernels`` (the kernels,
  resolved once from a module).
- ``loop.py``: the one time loop, forward and backward, and ``FusedLayer``.
- ``lstm.py``, ``gru.py``, ``rnn.py``: each cell's step, forward and backward.

Derivations: ``engines/README.md``.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from rnnkit.engines import shared
from rnnkit.engines.spec import StepVariants
from rnnkit.engines.triton.layer import LayerSettings, LayerTensors
from rnnkit.engines.triton.loop import FusedLayer

__all__ = ["FusedLayer", "LayerSettings", "LayerTensors", "run", "run_layer"]


def kernel_module() -> ModuleType:
    """The Triton kernels (imported on first use: Triton takes a while to import). Not named
    ``kernels``: importing the submodule of that name sets the package's attribute to it,
    and ``from ... import kernels`` would find this function instead of the module."""
    from rnnkit.engines.triton import kernels

    return kernels


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the triton engine cannot run a layer of ``dtype`` on ``device``, or None."""
    return kernel_module().unavailable_reason(dtype, device)


def _persistent(module: ModuleType, mode: str, w_hh: Tensor, tensors: tuple) -> bool:
    """Whether a plain layer runs as one persistent launch: inference only (nothing needs a
    gradient), LSTM, H within the kernel's limit, kernels that have one (Triton's)."""
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors
    )
    return (
        hasattr(module, "lstm_persistent_forward")
        and mode == "LSTM"
        and w_hh.shape[1] <= module.PERSISTENT_MAX_H
        and not needs_grad
    )


def run_layer(
    mode: str,
    reverse: bool,
    batch_sizes: tuple[int, ...],
    x: Tensor,
    h0: Tensor,
    c0: Tensor | None,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
    variants: StepVariants | None = None,
    *,
    module: ModuleType | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction: ``(out (N, R), h_n (B, R), c_n (B, H) or None)``, on the
    kernels of ``module`` (default: Triton's; the tests also pass ``twins``). Plain LSTM
    inference at a small H runs the persistent kernel; everything else :class:`FusedLayer`."""
    module = module or kernel_module()
    batch_sizes = shared.step_sizes(batch_sizes, x.shape[0], h0.shape[0])
    plain = variants is None and w_hr is None
    if plain and _persistent(module, mode, w_hh, (x, h0, c0, w_ih, w_hh, b_ih, b_hh)):
        G = x @ w_ih.t()  # (N, 4H)
        if b_ih is not None:
            G += b_ih + b_hh
        return module.lstm_persistent_forward(G, w_hh, h0, c0, batch_sizes, reverse)
    v = variants or StepVariants()
    ln = tuple(t.contiguous() for t in v.layer_norm or ())
    zh, zc = v.zoneout_h_mask, v.zoneout_c_mask
    if zh is not None:
        zh = zh.reshape(x.shape[0], -1).contiguous()  # padded (T, B, R) -> (T*B, R)
        zc = None if zc is None else zc.reshape(x.shape[0], -1).contiguous()
    ln_fields = dict(zip(LayerTensors.LAYER_NORM, ln, strict=False))
    w = LayerTensors(
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, **ln_fields,
        recurrent_mask=v.recurrent_mask, zoneout_h_mask=zh, zoneout_c_mask=zc,
    )  # fmt: skip
    s = LayerSettings.make(mode, reverse, batch_sizes, module, w, v.zoneout_p)
    return FusedLayer.apply(s, *w)


def run(spec, x, hx, weights, batch_sizes, training, variants=None):
    """Run a whole layer stack; see ``rnnkit.engines`` for the contract. The Triton kernels run
    their pointwise math in float32 for bfloat16 and float16 storage."""
    return shared.run_stack(spec, x, hx, weights, batch_sizes, training, variants, run_layer)
