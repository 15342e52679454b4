"""The named structures that the triton engine's time loop (``loop.py``) and its step definitions
(``lstm.py``, ``gru.py``, ``rnn.py``) share: one layer and direction's tensors, its settings,
its resolved kernels, and the contract of a step definition."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from types import ModuleType
from typing import NamedTuple

from torch import Tensor

from rnnkit.engines.triton import twins


class LayerTensors(NamedTuple):
    """The tensors of one layer and direction (None where absent), in the order that
    ``FusedLayer`` takes them. The same structure carries which of them need a gradient and,
    from backward, their gradients: matched by name, never by position."""

    x: Tensor | None = None  # (N, I) packed rows
    h0: Tensor | None = None  # (B, R)
    c0: Tensor | None = None  # (B, H), LSTM
    w_ih: Tensor | None = None  # (G*H, I)
    w_hh: Tensor | None = None  # (G*H, R)
    b_ih: Tensor | None = None  # (G*H,)
    b_hh: Tensor | None = None  # (G*H,)
    w_hr: Tensor | None = None  # (P, H), LSTM projection
    ln_ih_weight: Tensor | None = None  # layer-norm gains and biases (rnnkit.variants)
    ln_ih_bias: Tensor | None = None
    ln_hh_weight: Tensor | None = None
    ln_hh_bias: Tensor | None = None
    ln_c_weight: Tensor | None = None  # LSTM
    ln_c_bias: Tensor | None = None
    recurrent_mask: Tensor | None = None  # (B, R), scaled
    zoneout_h_mask: Tensor | None = None  # (N, R), 1 keeps the previous value; training
    zoneout_c_mask: Tensor | None = None  # (N, H), LSTM

    # In the order of StepVariants.layer_norm.
    LAYER_NORM = ("ln_ih_weight", "ln_ih_bias", "ln_hh_weight", "ln_hh_bias", "ln_c_weight",
                  "ln_c_bias")  # fmt: skip
    # Drawn, not learned: these get no gradient.
    MASKS = ("recurrent_mask", "zoneout_h_mask", "zoneout_c_mask")


@dataclass(frozen=True)
class StepKernels:
    """The pointwise kernels of a layer's steps, with the signatures of ``twins.py``,
    resolved once from a kernels module (``kernels`` or ``twins``): the
    module's own where it has one, else its torch-op twin. The steps ask nothing more."""

    lstm_forward: Callable
    lstm_backward: Callable
    lstm_forward_zoneout: Callable
    lstm_backward_zoneout: Callable
    ln_lstm_forward: Callable
    ln_lstm_backward: Callable
    gru_forward: Callable
    gru_backward: Callable
    gru_forward_zoneout: Callable
    gru_backward_zoneout: Callable
    rnn_forward: Callable
    rnn_backward: Callable
    layer_norm: Callable
    layer_norm_input_grad: Callable

    @classmethod
    def of(cls, module: ModuleType) -> StepKernels:
        # Read afresh on every call, not cached: the tests rebuild the Triton module in place.
        names = (f.name for f in fields(cls))
        return cls(**{n: getattr(module, n, None) or getattr(twins, n) for n in names})


@dataclass(frozen=True)
class LayerSettings:
    """Everything but tensors that one layer and direction runs with, decided once by
    :meth:`make`; the forward and backward loops and the steps only read it."""

    mode: str  # RNN_TANH, RNN_RELU, LSTM or GRU
    reverse: bool
    batch_sizes: tuple[int, ...]
    kernels: StepKernels
    layer_norm: bool = False
    projected: bool = False
    zoneout: bool = False
    # Zoneout's probability, what eval keeps; training's masks are tensors (LayerTensors).
    zoneout_p: float | None = None

    @classmethod
    def make(
        cls,
        mode: str,
        reverse: bool,
        batch_sizes: tuple[int, ...],
        kernels: ModuleType,
        tensors: LayerTensors,
        zoneout_p: float | None,
    ) -> LayerSettings:
        return cls(
            mode,
            reverse,
            tuple(batch_sizes),
            StepKernels.of(kernels),
            layer_norm=tensors.ln_ih_weight is not None,
            projected=tensors.w_hr is not None,
            zoneout=zoneout_p is not None or tensors.zoneout_h_mask is not None,
            zoneout_p=zoneout_p,
        )

    def steps(self, backward: bool = False) -> range:
        """The step indices in the order a walk visits them: the direction's own order
        forward, the opposite one backward."""
        T = len(self.batch_sizes)
        return range(T - 1, -1, -1) if self.reverse != backward else range(T)


class LoopSaved(NamedTuple):
    """What the time loop keeps for backward besides the layer's tensors and the cell's own."""

    out: Tensor  # (N, R): every h_t, hence every h_{t-1}
    G: Tensor  # (N, G*H): the input side in, the gate activations out
    P: Tensor | None  # (N, G*H): x W_ih^T before its layer norm
    mu_i: Tensor | None  # (N, 1): that norm's statistics
    rs_i: Tensor | None


# A step definition (lstm.py, gru.py, rnn.py) is a module with GATES, Saved (a NamedTuple of
# what its forward keeps), input_bias(tensors), forward(...) -> Forward and
# backward(...) -> Backward; loop.py runs any of them.


class Forward(NamedTuple):
    """One forward walk of a cell. ``step(rows, bs, g, hs, gh)`` advances the state ``hs``
    (the first ``bs`` rows of h) by one step from the input side ``g`` and the recurrent
    product ``gh`` and writes ``out[rows]``."""

    step: Callable[[slice, int, Tensor, Tensor, Tensor], None]
    c: Tensor | None  # the LSTM's cell state (B, H), c_n once the walk is done
    saved: tuple  # the cell's Saved


class CellGrads(NamedTuple):
    """What a cell's backward leaves for the gradients over all steps at once."""

    d_rec: Tensor  # (N, G*H): the gradient at W_hh h's output, for dW_hh
    d_hidden: Tensor | None  # (N, G*H): at W_hh h + b_hh where b_hh is apart from b_ih (GRU)
    named: dict[str, Tensor | None]  # the cell's own gradients by LayerTensors name


class Backward(NamedTuple):
    """One backward walk of a cell. ``step(rows, bs, dh_t, dg)`` takes dL/dh_t, writes the
    gradient of the input side into ``dg`` and returns the gradient at the recurrent product's
    output. With ``accumulates`` the step has written the direct part of dL/dh_{t-1} into
    ``dh[:bs]`` and the loop adds the product's share to it, else the loop assigns it.
    ``finish(dG, needs)`` gives the cell's gradients once the walk is done."""

    step: Callable[[slice, int, Tensor, Tensor], Tensor]
    accumulates: bool
    finish: Callable[[Tensor, LayerTensors], CellGrads]
