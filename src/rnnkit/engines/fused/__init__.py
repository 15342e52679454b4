"""The fused engine: one ``autograd.Function`` per layer and direction with a hand-written BPTT.

Forward: the input projections of all steps in one GEMM; per step one recurrent GEMM and one
pointwise kernel that saves only what backward needs. Backward walks time in reverse with one
recurrent GEMM and one pointwise kernel per step; the weight gradients and the input gradient are
each one GEMM over all steps. Variable lengths run as per-step batch sizes: sequences are sorted
by decreasing length (as in ``PackedSequence``), so step t touches rows ``[:batch_sizes[t]]`` of
the state and a finished sequence keeps its state, which is its ``h_n``.

- ``layer.py``: the named structures: ``LayerTensors`` (a layer's tensors, and by the same names
  their gradients), ``LayerSettings`` (the rest, decided once), ``StepKernels`` (the kernels,
  resolved once from a module).
- ``loop.py``: the one time loop, forward and backward, and ``FusedLayer``.
- ``lstm.py``, ``gru.py``, ``rnn.py``: each cell's step, forward and backward.

Derivations: ``engines/README.md``. What runs (kernels, native loop, persistent kernel) is
decided by ``engines.plan``; :func:`pointwise_kernels`, :func:`native_applies` and
:func:`persistent_applies` answer its questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

import torch
from torch import Tensor

from rnnkit.engines import pointwise
from rnnkit.engines.fused.layer import LayerSettings, LayerTensors
from rnnkit.engines.fused.loop import (
    FusedLayer,
    needs_reference_backward,
    prev_rows,
)
from rnnkit.engines.spec import LayerSpec, StepVariants, Weights
from rnnkit.scan import Carry, stack_layers

__all__ = [
    "FusedLayer",
    "LayerSettings",
    "LayerTensors",
    "native_applies",
    "needs_reference_backward",
    "persistent_applies",
    "pointwise_kernels",
    "prev_rows",
    "run",
    "run_layer",
]


def pointwise_kernels(device: torch.device, dtype: torch.dtype) -> ModuleType:
    """Compiled kernels for this device and dtype where they exist, else the torch-op twins."""
    if device.type == "cpu":
        from rnnkit.engines import cpu

        if cpu.available(dtype):
            return cpu
    elif device.type == "cuda":
        from rnnkit.engines import triton_kernels

        if triton_kernels.available(dtype, device):
            return triton_kernels
    return pointwise


def native_applies(kernels: ModuleType, dtype: torch.dtype) -> bool:
    """Whether a plain layer with these kernels runs all its steps in one native call
    (``ops.native_layer``): the CPU kernels, and the native loop builds for ``dtype``."""
    from rnnkit.engines import cpu

    if kernels is not cpu:
        return False
    from rnnkit.engines import native_loop

    return native_loop.available(dtype)


def persistent_applies(kernels: ModuleType, spec: LayerSpec, needs_grad: bool) -> bool:
    """Whether a plain layer runs as one persistent launch: inference only (nothing needs a
    gradient), LSTM, H within the kernel's limit, kernels that have one (Triton)."""
    return (
        hasattr(kernels, "lstm_persistent_forward")
        and spec.mode == "LSTM"
        and spec.hidden_size <= kernels.PERSISTENT_MAX_H
        and not needs_grad
    )


def run_layer(
    mode: str,
    reverse: bool,
    batch_sizes: tuple[int, ...],
    kernels: ModuleType,
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
    native: bool = False,
    persistent: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction: ``(out (N, R), h_n (B, R), c_n (B, H) or None)``.

    As the plan says (``engines.plan``): ``persistent``, plain LSTM inference as the kernels'
    persistent forward (Triton: one launch for all steps, ``W_hh`` kept on chip); ``native``,
    the layer's steps (projection and variants included) in one native call; else
    :class:`FusedLayer`.
    """
    if persistent:
        G = x @ w_ih.t()  # (N, 4H)
        if b_ih is not None:
            G += b_ih + b_hh
        return kernels.lstm_persistent_forward(G, w_hh, h0, c0, batch_sizes, reverse)
    if native:
        from rnnkit.engines import ops

        return ops.run_layer(
            mode, reverse, batch_sizes, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, variants
        )
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
    s = LayerSettings.make(mode, reverse, batch_sizes, kernels, w, v.zoneout_p)
    return FusedLayer.apply(s, *w)


def run(
    spec: LayerSpec,
    x: Tensor,
    hx: Carry,
    weights: Sequence[Weights],
    batch_sizes: Sequence[int] | None,
    training: bool,
    variants: Sequence[StepVariants] | None = None,
    *,
    kernels: ModuleType,
    native: bool = False,
    persistent: bool = False,
) -> tuple[Tensor, Carry]:
    """Run a whole layer stack; see ``rnnkit.engines`` for the contract. ``kernels``,
    ``native`` and ``persistent`` come from ``engines.plan``."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # As torch.nn does under autocast: run in the autocast dtype (the kernels still do their
        # pointwise math in float32), then keep autocast away from the engine's own GEMMs.
        dtype = torch.get_autocast_dtype(device_type)
        x, hx = x.to(dtype), tuple(s.to(dtype) for s in hx)
        weights = [tuple(w if w is None else w.to(dtype) for w in ws) for ws in weights]
    padded = batch_sizes is None
    if padded:
        T, B = x.shape[0], x.shape[1]
        batch_sizes = (B,) * T
        x = x.reshape(T * B, x.shape[2])  # (T*B, I)
    batch_sizes = tuple(batch_sizes)
    D, lstm = spec.num_directions, spec.mode == "LSTM"

    def run_direction(layer: int, direction: int, x: Tensor) -> tuple[Tensor, Carry]:
        k = layer * D + direction
        out, h, c = run_layer(
            spec.mode, direction == 1, batch_sizes, kernels, x.contiguous(), hx[0][k],
            hx[1][k] if lstm else None, *weights[k],
            variants=None if variants is None else variants[k],
            native=native, persistent=persistent,
        )  # fmt: skip
        return out, ((h, c) if lstm else (h,))

    with torch.autocast(device_type, enabled=False):
        x, states = stack_layers(run_direction, x, spec.num_layers, D, spec.dropout, training)
    if padded:
        x = x.view(T, B, x.shape[1])  # (T, B, D*R)
    return x, states
