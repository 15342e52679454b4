"""Engines: how a layer stack runs, and :func:`plan`, the one place that decides which.

An engine is a module with ``run(spec, x, hx, weights, batch_sizes, training) -> (output, h_n)``:
``x`` is time-major ``(T, B, I)`` or packed data ``(N, I)`` with ``batch_sizes``; ``hx`` is
``(h0,)`` or ``(h0, c0)``, each ``(L * D, B, *)`` and already validated; ``weights[layer * D +
direction]`` holds that layer's tensors. Layers validate and reshape; engines only compute.

- ``reference``: the functional cells stepped under autograd (``scan.py``); the spec.
- ``fused``: one autograd.Function per layer and direction with a hand-written backward; per-step
  pointwise kernels in C on the CPU and Triton on CUDA (``fused/``); plain layers on the CPU
  run all their steps in one native call (``native_loop``, as the operator ``ops.native_layer``).
- ``triton``: the fused engine with the Triton kernels forced (CUDA, or the CPU under
  ``TRITON_INTERPRET=1``, which is how CI tests them).
- ``torch``: torch's own kernels (cuDNN, oneDNN), behind rnnkit's validation.
- ``auto``: see :func:`plan`.
"""

from dataclasses import dataclass
from types import ModuleType

import torch

from rnnkit.engines import fused, native_loop, reference, torch_native
from rnnkit.engines.spec import LayerSpec

BACKENDS = ("auto", "reference", "fused", "triton", "torch")
# The largest batch at which auto trains a CPU LSTM on the fused engine (BENCHMARKS.md, engine v2).
LSTM_FUSED_MAX_BATCH = 8


@dataclass(frozen=True)
class Plan:
    """What runs one call of a layer stack, as :func:`plan` decided it."""

    engine: ModuleType  # reference, fused or torch_native
    why: str  # the rule that chose it, in words
    kernels: ModuleType | None = None  # fused: the pointwise kernels (cpu, triton_kernels, ...)
    native: bool = False  # fused: every plain layer's steps in one native call
    persistent: bool = False  # fused: plain LSTM inference as one persistent Triton launch

    def run(self, spec, x, hx, weights, batch_sizes, training, variants=None):
        extra = {} if variants is None else {"variants": variants}
        if self.engine is fused:
            extra.update(kernels=self.kernels, native=self.native, persistent=self.persistent)
        return self.engine.run(spec, x, hx, weights, batch_sizes, training, **extra)


def check_backend(owner: str, backend: str) -> str:
    if backend not in BACKENDS:
        choices = ", ".join(map(repr, BACKENDS))
        raise ValueError(f"{owner}: backend must be one of {choices}; got {backend!r}")
    return backend


def capturing_graph() -> str | None:
    """``"onnx"`` while ``torch.onnx.export`` runs (either exporter), ``"graph"`` under
    ``torch.jit.trace`` or ``torch.export``, else ``None``: a graph is being recorded that has
    to be made of torch's own operators."""
    if torch.onnx.is_in_onnx_export():
        return "onnx"
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        return "graph"
    return None


def transformed() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap) of the user's runs around this
    call; torch.compile's tracing also shows as one, and is not."""
    active = torch._C._functorch.peek_interpreter_stack() is not None
    return active and not torch.compiler.is_compiling()


def plan(
    owner: str,
    backend: str,
    spec: LayerSpec,
    device: torch.device,
    dtype: torch.dtype,
    *,
    batch: int,
    per_step: bool = False,
    needs_grad: bool = False,
) -> Plan:
    """Decide what runs one call of a layer stack. In order:

    1. An empty batch: the reference engine (nothing to compute; torch.nn's empty results).
    2. While a graph is recorded (:func:`capturing_graph`: ONNX export, ``jit.trace``,
       ``torch.export``), whatever the backend: plain layers on torch's kernels, which the
       exporters write as ONNX's own LSTM, GRU and RNN operators; layers with ``per_step``
       variants, and a projected LSTM under ONNX export (ONNX's LSTM has no projection), on
       the reference engine, an unrolled graph of plain torch ops.
    3. Under a torch.func transform (:func:`transformed`): the reference engine instead of the
       fused one (transforms cannot look inside kernels) and instead of ``auto``'s choice.
    4. ``per_step`` variants (layer norm, zoneout, recurrent dropout): ``auto`` means fused;
       ``torch`` cannot run them.
    5. ``"auto"`` follows the measured tables in BENCHMARKS.md:

       - CPU, GRU and RNN: the fused engine (its native loop), faster than torch.nn at every
         measured shape.
       - CPU, LSTM: the fused engine for training (a gradient is needed) with batches up to
         ``LSTM_FUSED_MAX_BATCH``, where its native loop is the faster (0.75x torch.nn's time
         at B=1, level at B=8, H=256) and under ``torch.compile``, which cannot trace torch's
         kernels (it breaks the graph there, as on torch.nn.LSTM) but keeps the native-loop
         operator in its graph (``fullgraph=True`` works); otherwise torch's kernels (oneDNN),
         level at B=1 and faster at larger batches in inference, faster in training from B=16.
       - CUDA: torch's cuDNN kernels; the Triton path has not been timed on a GPU yet.
    6. The fused engine's kernels: Triton for ``backend="triton"`` (an error where it cannot
       run), else C on the CPU and Triton on CUDA where they build, else their torch-op twins;
       on the CPU the layers that ``native_loop.covers`` (every layer: projection, layer
       norm, recurrent dropout and zoneout included) run the native loop; plain LSTM
       inference with Triton kernels and a small H runs the persistent kernel. Under
       ``torch.compile``, a layer the native operator cannot run takes the reference steps,
       which compile traces.
    """
    projected = spec.proj_size > 0
    if torch.is_autocast_enabled(device.type):
        # The fused engine runs in the autocast dtype (as torch.nn does): its kernels must too.
        dtype = torch.get_autocast_dtype(device.type)
    if batch == 0:
        return Plan(reference, "an empty batch")
    capture = capturing_graph()
    if capture is not None:
        unrolled = per_step or (projected and capture == "onnx")
        return Plan(reference if unrolled else torch_native, f"{capture} capture")
    if transformed() and backend in ("auto", "fused", "triton"):
        return Plan(reference, "a torch.func transform")
    if per_step:
        if backend == "torch":
            raise ValueError(
                f"{owner}: backend='torch' cannot run layer_norm, zoneout or recurrent_dropout; "
                "use backend='fused' or 'reference'"
            )
        backend = "fused" if backend == "auto" else backend
    why = f"backend={backend!r}"
    if backend == "auto":
        compiling = torch.compiler.is_compiling()
        small_training = needs_grad and batch <= LSTM_FUSED_MAX_BATCH
        on_fused = device.type == "cpu" and (spec.mode != "LSTM" or compiling or small_training)
        backend, why = ("fused" if on_fused else "torch"), "the auto rule"
    if backend == "reference":
        return Plan(reference, why)
    if backend == "torch":
        return Plan(torch_native, why)
    if backend == "triton":
        from rnnkit.engines import triton_kernels

        reason = triton_kernels.unavailable_reason(dtype, device)
        if reason:
            raise ValueError(f"{owner}: backend='triton' cannot run: {reason}")
        kernels = triton_kernels
    else:
        kernels = fused.pointwise_kernels(device, dtype)
    plain = not per_step and not projected
    native = native_loop.covers(spec) and fused.native_applies(kernels, dtype)
    if torch.compiler.is_compiling() and not native:
        # The per-step kernels are opaque to torch.compile; the reference steps are torch ops
        # that it traces (and fuses).
        return Plan(reference, "torch.compile of a layer outside the native operator")
    persistent = plain and fused.persistent_applies(kernels, spec, needs_grad)
    return Plan(fused, why, kernels, native, persistent)
