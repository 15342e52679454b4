"""What the native and triton engines share: the layer stack over the packed layout (autocast and
the compute dtype included), the layout's bookkeeping, when a backward must differentiate the
reference steps instead of the kernels, and the layer norm's parameter gradients."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rnnkit.engines.spec import LayerSpec, StepVariants, Weights
from rnnkit.scan import Carry, stack_layers

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def offsets(batch_sizes: Sequence[int]) -> list[int]:
    """The first row of every step in the packed layout, and the row count at the end."""
    out = [0]
    for bs in batch_sizes:
        out.append(out[-1] + bs)
    return out


def prev_rows(
    batch_sizes: Sequence[int], reverse: bool, device: torch.device
) -> tuple[Tensor, Tensor]:
    """For every row of the packed data, the row of ``cat(out, h0)`` that held its h_{t-1},
    and the sequence (batch row) it belongs to."""
    # Sizes from the host list, not from the tensor: no device sync, and a static shape for
    # torch.compile.
    bs = torch.tensor(batch_sizes, device=device)
    T, N = len(batch_sizes), sum(batch_sizes)
    off = torch.cumsum(bs, 0) - bs  # (T,)
    t = torch.repeat_interleave(torch.arange(T, device=device), bs, output_size=N)  # (N,)
    b = torch.arange(N, device=device) - off[t]
    step = 1 if reverse else -1
    src = t + step
    inside = (src >= 0) & (src < T)
    src = src.clamp(0, T - 1)
    valid = inside & (b < bs[src])
    return torch.where(valid, off[src] + b, N + b), b


def functorch_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap) is running around this call."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _batched(*grads: Tensor | None) -> bool:
    """Whether backward runs under torch.autograd's own vmap (``is_grads_batched``, used by
    ``jacobian(vectorize=True)``): its tensors have no storage for the kernels."""
    return any(g is not None and torch._C._functorch.is_legacy_batchedtensor(g) for g in grads)


def needs_reference_backward(*grads: Tensor | None) -> bool:
    """Whether a backward must differentiate the reference steps instead of running the
    kernels: double backward (``create_graph=True``) or batched gradients (vmap). The kernels'
    backward is not itself differentiable, and a vmapped backward hands it tensors without
    storage."""
    return torch.is_grad_enabled() or functorch_active() or _batched(*grads)


def layer_norm_param_grads(
    dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor]:
    """Gain and bias gradients of a layer norm over all rows at once."""
    _, dw, db = torch.ops.aten.native_layer_norm_backward(
        dy, x, (x.shape[1],), mean, rstd, weight, weight, [False, True, True]
    )
    return dw, db


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs in on this device type, or None where it is off."""
    if not torch.amp.is_autocast_available(device_type):
        return None
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cpu_autocast_dtypes(
    mode: str, projected: bool, device_type: str, hx: Carry
) -> tuple[torch.dtype, tuple[torch.dtype, ...]] | None:
    """The dtypes torch.nn's CPU layer returns under autocast, ``(output's, (h_n's[, c_n's]))``
    for the initial state ``hx``, or None outside CPU autocast. torch.nn's CPU kernels give them
    by type promotion, not by a rule of their own: oneDNN's LSTM runs whole in the autocast
    dtype; RNN's step ends in the tanh or relu of two autocast products; GRU's new state
    ``n + z (h - n)`` and LSTM's cell ``f c + i g`` (its ATen loop, with a projection) also read
    the previous state, so they come out in the wider of the autocast dtype and the state's."""
    if device_type != "cpu":
        return None
    low = autocast_dtype(device_type)
    if low is None:
        return None
    if mode == "GRU":
        wide = torch.promote_types(low, hx[0].dtype)
        return wide, (wide,)
    if mode == "LSTM" and projected:
        return low, (low, torch.promote_types(low, hx[1].dtype))
    return low, tuple(low for _ in hx)


def _cast(
    dtype: torch.dtype, x: Tensor, hx: Carry, weights: Sequence[Weights]
) -> tuple[Tensor, Carry, list[Weights]]:
    """The input, the initial states and the weights in ``dtype`` (differentiably)."""

    def to(t: Tensor | None) -> Tensor | None:
        return t if t is None or t.dtype == dtype else t.to(dtype)

    return to(x), tuple(to(s) for s in hx), [tuple(to(w) for w in ws) for ws in weights]


def run_stack(
    spec: LayerSpec,
    x: Tensor,
    hx: Carry,
    weights: Sequence[Weights],
    batch_sizes: Sequence[int] | None,
    training: bool,
    variants: Sequence[StepVariants] | None,
    run_layer: Callable[..., tuple[Tensor, Tensor, Tensor | None]],
    compute: Callable[[torch.dtype], torch.dtype] = lambda dtype: dtype,
) -> tuple[Tensor, Carry]:
    """A layer stack over the packed layout, one ``run_layer(mode, reverse, batch_sizes, x, h0,
    c0, w_ih, w_hh, b_ih, b_hh, w_hr, variants) -> (out, h_n, c_n)`` per layer and direction:
    the engine contract of the native and triton engines.

    Under autocast the stack runs in the autocast dtype, as torch.nn's does. ``compute(dtype)``
    is the dtype the engine computes in for tensors stored in ``dtype``: the stack casts its
    tensors to it once (differentiably, so gradients come back in the parameters' dtype) and
    its outputs back."""
    device_type = x.device.type
    dtype = autocast_dtype(device_type)
    if dtype is not None:
        # The variants stay as they are: autocast runs layer norms in float32.
        x, hx, weights = _cast(dtype, x, hx, weights)
    stored, dtype = x.dtype, compute(x.dtype)
    if dtype != stored:
        x, hx, weights = _cast(dtype, x, hx, weights)
        variants = None if variants is None else [v.to(dtype) for v in variants]
    x, states = stack_rows(spec, x, hx, weights, batch_sizes, training, variants, run_layer)
    if dtype != stored:
        x, states = x.to(stored), tuple(s.to(stored) for s in states)
    return x, states


# The batch sizes that stand for padded input, every step all of the batch's rows, which
# stack_rows passes under torch.compile: a tuple of T sizes would tie the graph to that T, and
# every new sequence length would compile it again. One 0, never a real size, and not empty: an
# empty list is a container to torch's operators, and its gradient would have to be one too.
PADDED = (0,)


def step_sizes(batch_sizes: Sequence[int], rows: int, batch: int) -> tuple[int, ...]:
    """``batch_sizes`` as a tuple; where it is :data:`PADDED`, the ``rows // batch`` steps of
    ``batch`` rows that it stands for."""
    sizes = tuple(batch_sizes)
    if sizes != PADDED:
        return sizes
    return (batch,) * (rows // batch) if batch else ()


def stack_rows(
    spec: LayerSpec,
    x: Tensor,
    hx: Carry,
    weights: Sequence[tuple],
    batch_sizes: Sequence[int] | None,
    training: bool,
    variants: Sequence[StepVariants] | None,
    run_layer: Callable[..., tuple[Tensor, Tensor, Tensor | None]],
) -> tuple[Tensor, Carry]:
    """:func:`run_stack` after its casts: padded input (``batch_sizes`` None) as packed rows,
    ``run_layer`` per layer and direction (outside autocast), and the output back in the
    input's layout. The int8 layers call it directly (their matrices are not cast). Each
    ``run_layer`` reads :data:`PADDED` ``batch_sizes`` as padded input (:func:`step_sizes`)."""
    device_type = x.device.type
    padded = batch_sizes is None
    if padded:
        T, B = x.shape[0], x.shape[1]
        batch_sizes = PADDED if torch.compiler.is_compiling() else (B,) * T
        x = x.reshape(T * B, x.shape[2])  # (T*B, I)
    batch_sizes = tuple(batch_sizes)
    D, lstm = spec.num_directions, spec.mode == "LSTM"

    def run_direction(layer: int, direction: int, x: Tensor) -> tuple[Tensor, Carry]:
        k = layer * D + direction
        out, h, c = run_layer(
            spec.mode, direction == 1, batch_sizes, x.contiguous(), hx[0][k],
            hx[1][k] if lstm else None, *weights[k], None if variants is None else variants[k],
        )  # fmt: skip
        return out, ((h, c) if lstm else (h,))

    # Entering and leaving torch.autocast costs about 5 us a call: only where it is on.
    if autocast_dtype(device_type) is not None:
        with torch.autocast(device_type, enabled=False):
            x, states = stack_layers(run_direction, x, spec.num_layers, D, spec.dropout, training)
    else:
        x, states = stack_layers(run_direction, x, spec.num_layers, D, spec.dropout, training)
    if padded:
        x = x.view(T, B, x.shape[1])  # (T, B, D*R)
    return x, states
