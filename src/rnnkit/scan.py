"""The one time loop: any cell step over time, forward or reverse, padded or packed.

A step is ``step(x_t, carry) -> (y_t, carry)`` where ``carry`` is a tuple of ``(B, *)`` tensors
(``(h,)`` or ``(h, c)``). ``stack`` runs one step per layer and direction in torch.nn's order and
joins the directions and the layers, through ``stack_layers``, the layer and direction loop that
the fused engine shares. Variable lengths follow ``PackedSequence``: ``batch_sizes[t]``
sequences are alive at step ``t`` (sorted by decreasing length), and a finished sequence keeps the
state of its own last step, which is torch.nn's ``h_n``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Carry = tuple[Tensor, ...]
# A step's input is a tensor, or a tuple of tensors sliced alike (the input and its masks).
Inputs = Tensor | tuple[Tensor, ...]
Step = Callable[[Inputs, Carry], tuple[Tensor, Carry]]


def _take(xs: Inputs, index: int | slice) -> Inputs:
    return tuple(x[index] for x in xs) if isinstance(xs, tuple) else xs[index]


def _length(xs: Inputs) -> int:
    return (xs[0] if isinstance(xs, tuple) else xs).shape[0]


def scan(
    step: Step,
    xs: Inputs,
    carry: Carry,
    reverse: bool = False,
    batch_sizes: Sequence[int] | None = None,
) -> tuple[Tensor, Carry]:
    """Run ``step`` over time.

    ``xs`` is ``(T, B, I)``, or packed data ``(N, I)`` when ``batch_sizes`` is given (or a tuple
    of such tensors, sliced alike). Returns the outputs laid out like ``xs`` (``(T, B, Y)`` or
    ``(N, Y)``) and the final carry ``(B, *)``.
    """
    if batch_sizes is None:
        T = _length(xs)
        steps = range(T - 1, -1, -1) if reverse else range(T)
        ys: list[Tensor | None] = [None] * T
        for t in steps:
            ys[t], carry = step(_take(xs, t), carry)
        return torch.stack(ys), carry
    if reverse:
        return _scan_packed_reverse(step, xs, carry, batch_sizes)
    return _scan_packed_forward(step, xs, carry, batch_sizes)


def _scan_packed_forward(
    step: Step, xs: Inputs, carry: Carry, batch_sizes: Sequence[int]
) -> tuple[Tensor, Carry]:
    ys = []
    offset = 0
    for bs in batch_sizes:
        y, alive = step(_take(xs, slice(offset, offset + bs)), tuple(s[:bs] for s in carry))
        ys.append(y)
        # Sequences that ended keep their last state: that is their h_n.
        carry = tuple(torch.cat((a, s[bs:])) for a, s in zip(alive, carry, strict=False))
        offset += bs
    return torch.cat(ys), carry


def _scan_packed_reverse(
    step: Step, xs: Inputs, carry0: Carry, batch_sizes: Sequence[int]
) -> tuple[Tensor, Carry]:
    offsets = [0]
    for bs in batch_sizes[:-1]:
        offsets.append(offsets[-1] + bs)
    ys: list[Tensor | None] = [None] * len(batch_sizes)
    carry = tuple(s[: batch_sizes[-1]] for s in carry0)
    for t in range(len(batch_sizes) - 1, -1, -1):
        bs, alive = batch_sizes[t], carry[0].shape[0]
        # Walking back in time, a sequence joins at its own last step with its initial state.
        if bs > alive:
            carry = tuple(
                torch.cat((s, s0[alive:bs])) for s, s0 in zip(carry, carry0, strict=False)
            )
        ys[t], carry = step(_take(xs, slice(offsets[t], offsets[t] + bs)), carry)
    return torch.cat(ys), carry


def stack(
    step_for: Callable[[int, int], Step],
    xs: Tensor,
    hx: Carry,
    num_layers: int,
    num_directions: int,
    dropout: float = 0.0,
    training: bool = False,
    batch_sizes: Sequence[int] | None = None,
    extras_for: Callable[[int, int], tuple[Tensor, ...]] | None = None,
) -> tuple[Tensor, Carry]:
    """Run ``num_layers`` stacked layers of ``num_directions`` scans each.

    ``step_for(layer, direction)`` gives the step of one layer and direction; ``hx`` holds
    ``(L * D, B, *)`` initial states indexed ``layer * D + direction`` as in torch.nn. Dropout
    applies to the output of every layer but the last. Returns the last layer's output, the
    directions concatenated on the feature dimension, and the final states ``(L * D, B, *)``.
    ``extras_for(layer, direction)``, when given, returns tensors laid out like ``xs`` (per-step
    masks) that the step then receives beside its input, as ``(x_t, *extras_t)``.
    """

    def run(layer: int, direction: int, xs: Tensor) -> tuple[Tensor, Carry]:
        k = layer * num_directions + direction
        inputs = xs if extras_for is None else (xs, *extras_for(layer, direction))
        step = step_for(layer, direction)
        carry = tuple(s[k] for s in hx)
        return scan(step, inputs, carry, reverse=direction == 1, batch_sizes=batch_sizes)

    return stack_layers(run, xs, num_layers, num_directions, dropout, training)


def stack_layers(
    run: Callable[[int, int, Tensor], tuple[Tensor, Carry]],
    xs: Tensor,
    num_layers: int,
    num_directions: int,
    dropout: float = 0.0,
    training: bool = False,
) -> tuple[Tensor, Carry]:
    """The layer and direction loop of every engine, in torch.nn's order.

    ``run(layer, direction, xs)`` runs one layer and direction over that layer's input ``xs``
    and returns its output and final carry. The directions' outputs are concatenated on the
    feature dimension; dropout applies to the output of every layer but the last. Returns the
    last layer's output and the final carries stacked to ``(L * D, B, *)`` per state tensor.
    """
    finals: list[Carry] = []
    for layer in range(num_layers):
        outs = []
        for direction in range(num_directions):
            y, last = run(layer, direction, xs)
            outs.append(y)
            finals.append(last)
        xs = outs[0] if num_directions == 1 else torch.cat(outs, dim=-1)
        if dropout > 0 and training and layer < num_layers - 1:
            xs = torch.nn.functional.dropout(xs, p=dropout, training=True)
    return xs, tuple(torch.stack(states) for states in zip(*finals, strict=False))
