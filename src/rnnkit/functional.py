"""The spec: one pure function per cell step.

Every other implementation in rnnkit (the layers, the native and triton engines, the Triton
kernels) is tested against these functions, and these functions are tested against ``torch.nn``
and with float64 ``gradcheck``. Each is its input projection followed by the cell's step in
``rnnkit.engines.steps``, where the step's math is written once. Shapes: ``x`` is ``(B, I)``
and states are ``(B, H)`` (``(B, P)`` for a projected LSTM hidden state); weights use torch.nn's
layouts, gate blocks stacked along the first dimension.
"""

from __future__ import annotations

from torch import Tensor
from torch.nn.functional import linear as _linear

from rnnkit.engines import steps


def rnn_tanh_cell(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> Tensor:
    """One step of the Elman RNN with tanh.

    h' = tanh(W_ih x + b_ih + W_hh h + b_hh)

    ``w_ih`` is ``(H, I)``, ``w_hh`` is ``(H, H)``, biases ``(H,)``. Returns h' ``(B, H)``.
    """
    return steps.rnn(_linear(x, w_ih, b_ih), h, w_hh, b_hh, relu=False)


def rnn_relu_cell(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> Tensor:
    """One step of the Elman RNN with ReLU.

    h' = relu(W_ih x + b_ih + W_hh h + b_hh)
    """
    return steps.rnn(_linear(x, w_ih, b_ih), h, w_hh, b_hh, relu=True)


def lstm_cell(
    x: Tensor,
    h: Tensor,
    c: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    w_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One step of the LSTM (Hochreiter and Schmidhuber 1997), torch.nn's form and gate order.

    i  = sigmoid(W_ii x + b_ii + W_hi h + b_hi)
    f  = sigmoid(W_if x + b_if + W_hf h + b_hf)
    g  = tanh   (W_ig x + b_ig + W_hg h + b_hg)
    o  = sigmoid(W_io x + b_io + W_ho h + b_ho)
    c' = f * c + i * g
    h' = o * tanh(c')
    h' = W_hr h'                     (only with a projection, Sak et al. 2014)

    ``w_ih`` is ``(4H, I)`` stacked as i, f, g, o; ``w_hh`` is ``(4H, P)`` with a projection and
    ``(4H, H)`` without; ``w_hr`` is ``(P, H)``. Returns ``(h', c')``: ``(B, P or H)`` and
    ``(B, H)``.

    Example: one step with ``torch.nn.LSTMCell``'s weights gives its numbers.

        >>> import torch
        >>> from rnnkit.functional import lstm_cell
        >>> cell = torch.nn.LSTMCell(3, 5)
        >>> x, h, c = torch.randn(2, 3), torch.zeros(2, 5), torch.zeros(2, 5)
        >>> h1, c1 = lstm_cell(x, h, c, cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh)
        >>> h2, c2 = cell(x, (h, c))
        >>> torch.allclose(h1, h2, atol=1e-6) and torch.allclose(c1, c2, atol=1e-6)
        True
    """
    return steps.lstm(_linear(x, w_ih, b_ih), h, c, w_hh, b_hh, w_hr)


def gru_cell(
    x: Tensor,
    h: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> Tensor:
    """One step of the GRU (Cho et al. 2014), torch.nn's form and gate order.

    r  = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z  = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n  = tanh   (W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

    The reset gate multiplies ``W_hn h + b_hn``, after the recurrent product, as torch.nn and
    cuDNN do (not ``W_hn (r * h)`` as in the paper). ``w_ih`` is ``(3H, I)`` stacked as r, z, n.
    """
    return steps.gru(_linear(x, w_ih, b_ih), h, w_hh, b_hh)
