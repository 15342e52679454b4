"""The ``torch`` engine: torch's own fused kernels (cuDNN on CUDA, oneDNN or ATen on CPU).

rnnkit still validates, owns the parameters and reshapes; only the computation is torch's. Useful
where torch's kernels are the fastest (see the README's rule for ``backend="auto"``).
"""

from collections.abc import Sequence

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


# torch.compile does not trace torch's own RNN kernels (dynamo skips nn.LSTM for the same
# reason); they run eagerly between the compiled parts.
@torch.compiler.disable
def run(
    spec: LayerSpec,
    x: Tensor,
    hx: Carry,
    weights: Sequence[Weights],
    batch_sizes: Sequence[int] | None,
    training: bool,
) -> tuple[Tensor, Carry]:
    """Run a whole layer stack; see ``rnnkit.engines`` for the contract."""
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
