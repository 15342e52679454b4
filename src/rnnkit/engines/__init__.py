"""Engines: how a layer stack runs.

An engine is a module with ``run(spec, x, hx, weights, batch_sizes, training) -> (output, h_n)``:
``x`` is time-major ``(T, B, I)`` or packed data ``(N, I)`` with ``batch_sizes``; ``hx`` is
``(h0,)`` or ``(h0, c0)``, each ``(L * D, B, *)`` and already validated; ``weights[layer * D +
direction]`` holds that layer's tensors. Layers validate and reshape; engines only compute.

- ``reference``: the functional cells stepped under autograd (``scan.py``); the spec.
- ``fused``: one autograd.Function per layer and direction with a hand-written backward; per-step
  pointwise kernels in C on the CPU and Triton on CUDA (``fused.py``).
- ``triton``: the fused engine with the Triton kernels forced (CUDA, or the CPU under
  ``TRITON_INTERPRET=1``, which is how CI tests them).
- ``torch``: torch's own kernels (cuDNN, oneDNN), behind rnnkit's validation.
- ``auto``: see :func:`resolve`.
"""

from functools import partial
from types import SimpleNamespace

import torch

from rnnkit.engines import fused, reference, torch_native

BACKENDS = ("auto", "reference", "fused", "triton", "torch")


def check_backend(owner: str, backend: str) -> str:
    if backend not in BACKENDS:
        choices = ", ".join(map(repr, BACKENDS))
        raise ValueError(f"{owner}: backend must be one of {choices}; got {backend!r}")
    return backend


def _triton_engine(owner: str, dtype: torch.dtype, device: torch.device) -> SimpleNamespace:
    from rnnkit.engines import triton_kernels

    reason = triton_kernels.unavailable_reason(dtype, device)
    if reason:
        raise ValueError(f"{owner}: backend='triton' cannot run: {reason}")
    return SimpleNamespace(run=partial(fused.run, kernels=triton_kernels))


def capturing_graph() -> str | None:
    """``"onnx"`` while ``torch.onnx.export`` runs (either exporter), ``"graph"`` under
    ``torch.jit.trace`` or ``torch.export``, else ``None``: a graph is being recorded that has
    to be made of torch's own operators."""
    if torch.onnx.is_in_onnx_export():
        return "onnx"
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        return "graph"
    return None


def resolve(
    backend: str,
    mode: str = "LSTM",
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    owner: str = "rnnkit",
    *,
    per_step: bool = False,
    projected: bool = False,
):
    """The engine for ``backend``.

    ``"auto"`` follows the measured tables in BENCHMARKS.md (layers send per-step variants to
    the fused engine before they get here):

    - CPU, GRU and RNN: the fused engine, faster than torch.nn for forward+backward at every
      measured shape (0.59x to 1.05x of its time).
    - CPU, LSTM: torch's kernels (oneDNN), which beat the fused engine at every measured shape
      (the fused one takes 1.0x to 2.1x their time).
    - CUDA: torch's cuDNN kernels; the Triton path has not been timed on a GPU yet.
    - Under ``torch.compile`` on the CPU, LSTM too runs on the fused engine, whose native loop
      compile keeps in its graph (``fullgraph=True`` works), where torch's kernels break it.

    While a graph is recorded (:func:`capturing_graph`), every backend gives way, because the
    fused engine's C and Triton kernels are opaque to tracers and exporters: plain layers run on
    torch's kernels (``torch._VF.lstm`` etc., which the ONNX exporters write as ONNX's own
    LSTM, GRU and RNN operators), layers with ``per_step`` variants on the reference engine
    (an unrolled graph of plain torch ops), and so does a ``projected`` LSTM under ONNX export,
    since ONNX's LSTM has no projection.
    """
    capture = capturing_graph()
    if capture is not None:
        return reference if per_step or (projected and capture == "onnx") else torch_native
    device = torch.device("cpu") if device is None else device
    if backend == "auto":
        # torch.compile cannot trace torch's own RNN kernels (it breaks the graph there, as on
        # torch.nn.LSTM); the fused engine's native loop is an operator it keeps in the graph.
        on_cpu_fused = mode != "LSTM" or torch.compiler.is_compiling()
        backend = "fused" if device.type == "cpu" and on_cpu_fused else "torch"
    if backend == "triton":
        return _triton_engine(owner, dtype, device)
    return {"reference": reference, "fused": fused, "torch": torch_native}[backend]
