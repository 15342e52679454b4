"""The native engine (CPU): every step of a layer and direction in one call of a C time loop,
forward and backward, with every variant and LSTM's projection.

- ``loop.c``: the time loop (per step the recurrent product and the cell, in phases);
  ``loop.py`` builds it on first use (``build.py``), checks every argument and calls it.
- ``op.py``: the loop as the PyTorch operator ``rnnkit::native_layer`` with its registered
  autograd (so ``torch.compile(fullgraph=True)`` and ``torch.export`` keep it in the graph), and
  the layer-level glue (``run_layer``): the input projection as one GEMM, then the loop.

float32 and float64 run as they are; bfloat16 and float16 are stored in their dtype (weights,
inputs, outputs, the gradients of bfloat16 parameters) and computed in float32. Derivations:
``engines/README.md``.
"""

import torch

from rnnkit.engines import shared
from rnnkit.engines.native import loop, op

# Stored as they are and computed in float32.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the loop computes in for tensors stored in ``dtype``."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the native engine cannot run a layer of ``dtype`` on ``device``, or None."""
    if device.type != "cpu":
        return f"the native engine runs on the CPU; got a {device.type} tensor"
    if compute_dtype(dtype) not in (torch.float32, torch.float64):
        return (
            "the native engine runs float32, float64, bfloat16 and float16; got "
            f"{str(dtype).removeprefix('torch.')}"
        )
    if not loop.available():
        return f"its C library could not be built ({loop.build_error()})"
    return None


def run(spec, x, hx, weights, batch_sizes, training, variants=None):
    """Run a whole layer stack; see ``rnnkit.engines`` for the contract."""
    return shared.run_stack(
        spec, x, hx, weights, batch_sizes, training, variants, op.run_layer, compute_dtype
    )
