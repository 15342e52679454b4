"""Engines: how a layer stack runs, and :func:`plan`, the one place that decides which.

An engine is a module with ``run(spec, x, hx, weights, batch_sizes, training, variants=None) ->
(output, h_n)``: ``x`` is time-major ``(T, B, I)`` or packed data ``(N, I)`` with
``batch_sizes``; ``hx`` is ``(h0,)`` or ``(h0, c0)``, each ``(L * D, B, *)`` and already
validated; ``weights[layer * D + direction]`` holds that layer's tensors; ``variants`` (one
:class:`~rnnkit.engines.spec.StepVariants` per layer and direction, or None) the per-step
variants. Layers validate and reshape; engines only compute. One engine per job:

- ``reference``: the cells' steps (``steps.py``) under autograd; the spec. Also what runs under
  torch.func transforms, for second derivatives and for an unrolled export.
- ``torch``: torch's own kernels (cuDNN, oneDNN), behind rnnkit's validation (``torch_native``).
- ``native`` (CPU): the C time loop, forward and backward, every variant and the projection, as
  the operator ``rnnkit::native_layer`` (``native/``).
- ``triton`` (CUDA, or the CPU under ``TRITON_INTERPRET=1``): the per-step loop over Triton
  kernels and the persistent LSTM kernel (``triton/``).

``backend="fused"`` names "the fast engine of this device": native on the CPU, triton on CUDA.
``auto``: see :func:`plan`.
"""

import functools
import warnings
from types import ModuleType
from typing import NamedTuple

import torch

from rnnkit.engines import native, reference, shared, torch_native
from rnnkit.engines import triton as triton_engine
from rnnkit.engines.native import build as native_build
from rnnkit.engines.spec import LayerSpec

BACKENDS = ("auto", "reference", "fused", "native", "triton", "torch")
# The largest batch at which auto trains a CPU LSTM on the native engine in float64 and
# bfloat16; float32 trains native at every batch (BENCHMARKS.md, "Which engine auto picks for
# LSTM training").
LSTM_NATIVE_MAX_BATCH = 8
# The most multiply-adds (batch times one step of the whole stack) at which auto runs a call of a
# single step on torch's kernel, inference or training: GRU, RNN, a projected LSTM, and a plain
# LSTM below STREAMING_LSTM_NATIVE_MIN_WEIGHTS (BENCHMARKS.md, "One step at a time", "An LSTM
# with a projection" and "Training a step at a time").
SINGLE_STEP_TORCH_MAX_MACS = 1 << 22
# The fewest weights (one step's multiply-adds of one sequence through the stack) from which
# auto runs a float32 LSTM inference call of one step of one sequence (streaming) natively:
# torch's oneDNN LSTM copies both weight matrices of every layer into its own layout on every
# call, 0.03-0.3 ms a MiB by the state of the allocator, more than such a step's work
# (BENCHMARKS.md, "One LSTM step at a time").
STREAMING_LSTM_NATIVE_MIN_WEIGHTS = 1 << 19
# Dtypes that torch's CPU kernels (oneDNN) run on every x86 CPU; bfloat16 needs instructions that
# many CPUs lack (see _torch_cpu_runs_bfloat16), float16 is left to the native engine.
TORCH_CPU_DTYPES = (torch.float32, torch.float64)
# The reasons already warned about, once each per process.
_WARNED: set[str] = set()


class Plan(NamedTuple):
    """What runs one call of a layer stack, as :func:`plan` decided it."""

    engine: ModuleType  # reference, torch_native, native or triton
    why: str  # the rule that chose it, in words

    def run(self, spec, x, hx, weights, batch_sizes, training, variants=None):
        return self.engine.run(spec, x, hx, weights, batch_sizes, training, variants)


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


@functools.cache
def _torch_cpu_runs_bfloat16() -> bool:
    """Whether torch's oneDNN RNN kernels run bfloat16 on this CPU: it has bfloat16 dot products
    (AVX-512 BF16 or AMX). Elsewhere oneDNN refuses the LSTM ("could not create a primitive
    descriptor", AMD CPUs with AVX2) or would emulate it."""
    if not torch.backends.mkldnn.is_available():
        return False
    return bool(native_build.cpu_flags() & {"avx512_bf16", "amx_bf16"})


def _torch_cpu_dtype(dtype: torch.dtype) -> bool:
    return dtype in TORCH_CPU_DTYPES or (dtype == torch.bfloat16 and _torch_cpu_runs_bfloat16())


def _step_macs(spec: LayerSpec) -> int:
    """The multiply-adds of one step of one sequence through the whole stack."""
    H, D = spec.hidden_size, spec.num_directions
    inputs = [spec.input_size] + [D * spec.out_size] * (spec.num_layers - 1)
    proj = spec.proj_size * H
    return sum(D * (spec.gates * H * (I + spec.out_size) + proj) for I in inputs)


def _auto(spec: LayerSpec, device: torch.device, dtype: torch.dtype, *, batch: int,
          steps: int | None, per_step: bool, needs_grad: bool) -> str:  # fmt: skip
    """``backend="auto"``'s engine, from the measured tables in BENCHMARKS.md."""
    if device.type == "cpu":
        # Under compile the native operator keeps the graph whole; the CPU's flags are read
        # (from /proc) only outside it.
        plain = not per_step and not torch.compiler.is_compiling()
        torch_wins = not needs_grad or (dtype != torch.float32 and batch > LSTM_NATIVE_MAX_BATCH)
        macs = _step_macs(spec)
        # One step of one sequence (streaming) through a large float32 LSTM: oneDNN's copy of
        # the weights on every call is more than the step.
        streaming = (
            dtype == torch.float32
            and steps == 1
            and batch == 1
            and macs >= STREAMING_LSTM_NATIVE_MIN_WEIGHTS
        )
        # torch's LSTM with a projection is not oneDNN's but its step-by-step ATen loop, as
        # its GRU and RNN are: a projected LSTM follows their rule.
        onednn_lstm = spec.mode == "LSTM" and spec.proj_size == 0
        lstm_on_torch = onednn_lstm and plain and torch_wins and not streaming
        # One step of a small layer (streaming, or a training loop that calls the layer a step
        # at a time, as the char-RNN tutorials do): the native engine's fixed cost per call,
        # its input side's own GEMM, more Python and, under autograd, its backward's, is more
        # than the step's work. A plain LSTM from STREAMING_LSTM_NATIVE_MIN_WEIGHTS stays
        # native: there oneDNN's copies of the weights cost more.
        one_small_step = (
            plain
            and steps == 1
            and batch * macs <= SINGLE_STEP_TORCH_MAX_MACS
            and (not onednn_lstm or macs < STREAMING_LSTM_NATIVE_MIN_WEIGHTS)
        )
        on_torch = (lstm_on_torch or one_small_step) and _torch_cpu_dtype(dtype)
        return "torch" if on_torch else "native"
    if device.type == "cuda":
        return "triton" if per_step else "torch"
    return "reference" if per_step else "torch"


def plan(
    owner: str,
    backend: str,
    spec: LayerSpec,
    device: torch.device,
    dtype: torch.dtype,
    *,
    batch: int,
    steps: int | None = None,
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
    3. Under a torch.func transform (:func:`transformed`): the reference engine instead of
       native, triton or ``auto``'s choice (transforms cannot look inside kernels).
    4. ``"fused"`` is native on the CPU and triton on CUDA.
    5. ``"auto"`` follows the measured tables in BENCHMARKS.md:

       - CPU: the native engine, except a plain LSTM that runs inference, or trains in float64
         or bfloat16 with batches over ``LSTM_NATIVE_MAX_BATCH``: there torch's oneDNN kernel is
         the faster or level; but a float32 LSTM inference call of one step of one sequence
         (streaming) through at least ``STREAMING_LSTM_NATIVE_MIN_WEIGHTS`` weights runs
         native, where oneDNN's copy of the weights into its layout on every call costs more
         than the step. An LSTM with a projection is not on oneDNN in torch (its ATen loop
         runs it, as it runs GRU and RNN) and follows the GRU and RNN rule below. float32
         trains native at every batch (0.43-0.67x torch's time at B=1-4, 0.76-0.93x from B=32
         and at H=128 and 512, 0.98-1.10x at B=8-16, I=H=256). Inference on torch's kernel in
         float32 or float64, and in bfloat16 where the CPU has bfloat16 dot products
         (:func:`_torch_cpu_runs_bfloat16`; elsewhere oneDNN cannot run it). A call of a
         single step (``steps`` 1: streaming, or training a step at a time) with at most
         ``SINGLE_STEP_TORCH_MAX_MACS`` multiply-adds (its batch times one step of the stack)
         also runs on torch's kernel, in the same dtypes, for inference and training (a plain
         LSTM only below ``STREAMING_LSTM_NATIVE_MIN_WEIGHTS``): there the native engine's
         fixed cost per call is more than the step's work. Under ``torch.compile`` the native
         engine, whose operator stays in the graph (torch's kernels break it). float16 always
         runs native.
       - CUDA: torch's cuDNN kernels; with ``per_step`` variants the triton engine.
       - Other devices: torch's kernels; with ``per_step`` variants the reference engine.
    6. An engine that cannot run: ``torch`` with ``per_step`` variants, or ``native`` and
       ``triton`` named on a device they do not run on, is an error. Where the native loop
       cannot be built, or Triton is missing, ``auto`` and ``fused`` run the reference engine
       (the native loop's build warns once, naming why); ``native`` and ``triton`` named
       explicitly raise. Under ``torch.compile`` the triton engine's per-step kernels are
       opaque, so its layers take the reference steps, which compile traces.
    """
    projected = spec.proj_size > 0
    # The engines run in the autocast dtype (as torch.nn does): their kernels must too.
    dtype = shared.autocast_dtype(device.type) or dtype
    if batch == 0:
        return Plan(reference, "an empty batch")
    capture = capturing_graph()
    if capture is not None:
        unrolled = per_step or (projected and capture == "onnx")
        return Plan(reference if unrolled else torch_native, f"{capture} capture")
    if transformed() and backend not in ("torch", "reference"):
        return Plan(reference, "a torch.func transform")
    if per_step and backend == "torch":
        raise ValueError(
            f"{owner}: backend='torch' cannot run layer_norm, zoneout or recurrent_dropout; "
            "use backend='fused' or 'reference'"
        )
    explicit = backend in ("native", "triton")
    why = f"backend={backend!r}"
    if backend == "fused":
        backend = "native" if device.type == "cpu" else "triton"
        why = f"backend='fused' on {device.type}"
    elif backend == "auto":
        backend = _auto(spec, device, dtype, batch=batch, steps=steps, per_step=per_step,
                        needs_grad=needs_grad)  # fmt: skip
        why = "the auto rule"
    if backend == "reference":
        return Plan(reference, why)
    if backend == "torch":
        return Plan(torch_native, why)
    engine = native if backend == "native" else triton_engine
    reason = engine.unavailable_reason(device, dtype)
    if reason is not None:
        if explicit:
            raise ValueError(f"{owner}: backend={backend!r} cannot run: {reason}")
        if engine is triton_engine and reason not in _WARNED:
            # The native loop's build warns once itself (native/build.py).
            _WARNED.add(reason)
            warnings.warn(
                f"rnnkit: the triton engine cannot run ({reason}); the reference engine runs "
                "instead (correct, slower)",
                stacklevel=4,
            )
        return Plan(reference, f"{why}, but {reason}")
    if engine is triton_engine and torch.compiler.is_compiling():
        return Plan(reference, "torch.compile of a layer on the triton engine")
    return Plan(engine, why)
