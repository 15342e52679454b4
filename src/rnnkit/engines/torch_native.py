"""The ``torch`` engine: torch's own fused kernels (cuDNN on CUDA, oneDNN or ATen on CPU).

rnnkit still validates, owns the parameters and reshapes; only the computation is torch's. Useful
where torch's kernels are the fastest (see the README's rule for ``backend="auto"``), and the
engine every plain layer runs on while a graph is traced or exported (``engines.plan``): the
exporters know ``torch._VF.lstm``, ``gru``, ``rnn_tanh`` and ``rnn_relu``.
"""

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from rnnkit.engines.spec import LayerSpec, Weights
from rnnkit.scan import Carry

_VF_FUNCTIONS = {
    "LSTM": torch._VF.lstm,
    "GRU": torch._VF.gru,
    "RNN_TANH": torch._VF.rnn_tanh,
    "RNN_RELU": torch._VF.rnn_relu,
}


def _run_vf(
    spec: LayerSpec,
    x: Tensor,
    hx: Carry,
    weights: Sequence[Weights],
    batch_sizes: Sequence[int] | None,
    training: bool,
) -> tuple[Tensor, Carry]:
    flat = [w for layer in weights for w in layer if w is not None]
    fn = _VF_FUNCTIONS[spec.mode]
    state = tuple(hx) if spec.mode == "LSTM" else hx[0]
    options = (spec.bias, spec.num_layers, spec.dropout, training, spec.num_directions == 2)
    if batch_sizes is None:
        result = fn(x, state, flat, *options, False)
    else:
        sizes = torch.tensor(batch_sizes, dtype=torch.int64)
        result = fn(x, sizes, state, flat, *options)
    return result[0], tuple(result[1:])


@functools.cache
def _between_compiled_parts() -> Callable:
    """``_run_vf`` marked to run eagerly between the compiled parts: torch.compile does not
    trace torch's own RNN kernels (dynamo skips nn.LSTM for the same reason). Made on first
    use, since ``torch.compiler.disable`` imports dynamo (slow) and plain eager use needs none."""
    return torch.compiler.disable(_run_vf)


def run(
    spec: LayerSpec,
    x: Tensor,
    hx: Carry,
    weights: Sequence[Weights],
    batch_sizes: Sequence[int] | None,
    training: bool,
    variants: None = None,
) -> tuple[Tensor, Carry]:
    """Run a whole layer stack; see ``rnnkit.engines`` for the contract. torch's kernels have
    no per-step variants (``engines.plan`` never sends them any)."""
    if variants is not None:
        raise ValueError("the torch engine cannot run per-step variants")
    # torch.export needs the kernels in its graph (as torch.nn.LSTM puts them there), and an
    # exported graph cannot have a part that runs eagerly outside it.
    if torch.compiler.is_exporting():
        return _run_vf(spec, x, hx, weights, batch_sizes, training)
    if torch.compiler.is_compiling():
        return _between_compiled_parts()(spec, x, hx, weights, batch_sizes, training)
    return _run_vf(spec, x, hx, weights, batch_sizes, training)
