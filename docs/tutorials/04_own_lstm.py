"""
Your own LSTM, proven equal
===========================

Seed 001 writes a bidirectional LSTM by hand and shows that it gives ``torch.nn.LSTM``'s
numbers. This tutorial does the same with rnnkit's functional cells
(:func:`rnnkit.functional.lstm_cell`: one step, the equations in its docstring), checks it
against ``torch.nn.LSTM`` in float64, and then lets :class:`rnnkit.Recurrent` run a cell you
write yourself with everything a layer has (stacking, both directions, packed input).
"""

import matplotlib.pyplot as plt
import torch
from torch import nn

import rnnkit
from rnnkit.functional import lstm_cell

torch.manual_seed(0)
T, B, I, H = 12, 4, 6, 8

# %%
# The reference: ``torch.nn.LSTM``, bidirectional, in float64
# -----------------------------------------------------------

reference = nn.LSTM(I, H, bidirectional=True, dtype=torch.float64)
x = torch.randn(T, B, I, dtype=torch.float64)
ref_output, (ref_h_n, ref_c_n) = reference(x)

# %%
# By hand: one loop per direction
# -------------------------------
# One step is ``lstm_cell(x_t, h, c, W_ih, W_hh, b_ih, b_hh) -> (h', c')``. The forward direction
# steps from ``t = 0`` to ``T - 1`` with the ``_l0`` weights; the backward one steps from
# ``T - 1`` down to 0 with the ``_l0_reverse`` weights, and writes its state at step ``t`` into
# ``output[t]``, so that both halves of ``output[t]`` belong to the same input step.


def run_direction(x, weights, reverse):
    h = x.new_zeros(x.shape[1], H)
    c = x.new_zeros(x.shape[1], H)
    states = [None] * x.shape[0]
    steps = range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0])
    for t in steps:
        h, c = lstm_cell(x[t], h, c, *weights)
        states[t] = h
    return torch.stack(states), h, c  # (T, B, H), (B, H), (B, H)


def my_bidirectional_lstm(x, layer):
    outputs, hs, cs = [], [], []
    for suffix, reverse in (("_l0", False), ("_l0_reverse", True)):
        weights = [
            getattr(layer, f"{n}{suffix}")
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
        ]
        out, h, c = run_direction(x, weights, reverse)
        outputs.append(out)
        hs.append(h)
        cs.append(c)
    return torch.cat(outputs, dim=-1), (torch.stack(hs), torch.stack(cs))


output, (h_n, c_n) = my_bidirectional_lstm(x, reference)

# %%
# Equal to float64 precision: the largest difference is a few units of float64's rounding
# (``2.2e-16`` relative), far below ``1e-12``.

errors = {
    "output": (output - ref_output).abs().max().item(),
    "h_n": (h_n - ref_h_n).abs().max().item(),
    "c_n": (c_n - ref_c_n).abs().max().item(),
}
print({k: f"{v:.1e}" for k, v in errors.items()})
assert max(errors.values()) < 1e-12

# %%
# The gradients agree too: the hand-written loop is plain PyTorch, so autograd differentiates it.

grads = torch.autograd.grad(output.sum(), list(reference.parameters()))
ref_grads = torch.autograd.grad(ref_output.sum(), list(reference.parameters()))
assert all(
    torch.allclose(g, r, atol=1e-12)
    for g, r in zip(grads, ref_grads, strict=True)
)

# %%
# The same in float32, where rounding is ``1.2e-7`` relative, agrees to about ``1e-6``: the
# figure compares the error per time step in both precisions.

reference32 = nn.LSTM(I, H, bidirectional=True).float()
reference32.load_state_dict(reference.state_dict())
ref32, _ = reference32(x.float())
mine32, _ = my_bidirectional_lstm(x.float(), reference32)
err64 = (output - ref_output).abs().amax(dim=(1, 2)).detach()  # (T,)
err32 = (mine32 - ref32).abs().amax(dim=(1, 2)).detach()  # (T,)
assert err32.max() < 1e-5 and err64.max() < 1e-12

# %%
# A difference of exactly 0 cannot be drawn on a log scale: those steps are drawn at the
# axis floor, ``1e-18``, and marked as exact.

floor = 1e-18
fig, ax = plt.subplots(figsize=(7, 3.4))
ax.semilogy(range(T), err32.clamp(min=floor), "o-", label="float32")
ax.semilogy(range(T), err64.clamp(min=floor), "s-", label="float64")
exact = (err64 == 0).nonzero().flatten().tolist()
if exact:
    ax.plot(
        exact,
        [floor] * len(exact),
        "kx",
        markersize=9,
        label="float64: exactly equal",
    )
ax.axhline(
    torch.finfo(torch.float32).eps,
    color="C0",
    linestyle=":",
    label="float32 epsilon",
)
ax.axhline(
    torch.finfo(torch.float64).eps,
    color="C1",
    linestyle=":",
    label="float64 epsilon",
)
ax.set_ylim(floor / 3, 1e-4)
ax.set_xlabel("time step t (index)")
ax.set_ylabel("max |mine - torch.nn| (unitless)")
ax.set_title("Hand-written bidirectional LSTM against torch.nn.LSTM")
ax.legend(fontsize=8, ncol=2, loc="center right")
fig.tight_layout()

# %%
# rnnkit's own LSTM is the same
# -----------------------------
# :class:`rnnkit.LSTM` holds the same parameters under the same names, so the reference's state
# dict loads into it as it is, and it gives the same numbers.

ours = rnnkit.LSTM(I, H, bidirectional=True, dtype=torch.float64)
ours.load_state_dict(reference.state_dict())
our_output, (our_h_n, our_c_n) = ours(x)
assert torch.allclose(our_output, ref_output, atol=1e-12)
assert torch.allclose(our_h_n, ref_h_n, atol=1e-12) and torch.allclose(
    our_c_n, ref_c_n, atol=1e-12
)

# %%
# Your own cell, with every layer feature: ``rnnkit.Recurrent``
# -------------------------------------------------------------
# A cell is one step, ``forward(x, state) -> (y, state)``. :class:`rnnkit.Recurrent` runs it
# over time with stacking, both directions, packed and unbatched input and ``hx``. Here is the
# LSTM step as a module holding ``torch.nn.LSTM``'s parameters of one layer and direction:


class MyLSTMCell(nn.Module):
    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.weight_ih = nn.Parameter(
            torch.empty(4 * hidden_size, input_size, dtype=torch.float64)
        )
        self.weight_hh = nn.Parameter(
            torch.empty(4 * hidden_size, hidden_size, dtype=torch.float64)
        )
        self.bias_ih = nn.Parameter(
            torch.empty(4 * hidden_size, dtype=torch.float64)
        )
        self.bias_hh = nn.Parameter(
            torch.empty(4 * hidden_size, dtype=torch.float64)
        )
        self.hidden_size = hidden_size

    def initial_state(self, batch_size, device, dtype):
        zeros = torch.zeros(
            batch_size, self.hidden_size, device=device, dtype=dtype
        )
        return zeros, zeros

    def forward(self, x, state):
        h, c = lstm_cell(
            x,
            *state,
            self.weight_ih,
            self.weight_hh,
            self.bias_ih,
            self.bias_hh,
        )
        return h, (h, c)


mine = rnnkit.Recurrent(MyLSTMCell, I, H, num_layers=2, bidirectional=True)
print(mine)

# %%
# Copy a two-layer bidirectional ``torch.nn.LSTM``'s weights into its cells, and the outputs
# match to float64 precision, for a padded batch of different lengths too (packed on the way
# in, as ``torch.nn`` takes it).

reference2 = nn.LSTM(
    I, H, num_layers=2, bidirectional=True, dtype=torch.float64
)
with torch.no_grad():
    for k, cell in enumerate(mine.cells):  # k = layer * 2 + direction
        suffix = f"_l{k // 2}" + ("_reverse" if k % 2 else "")
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(reference2.get_parameter(name + suffix))

lengths = torch.tensor([12, 9, 5, 1])
packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
out_mine, (h_mine, c_mine) = mine(packed)
out_ref, (h_ref, c_ref) = reference2(packed)
assert torch.allclose(out_mine.data, out_ref.data, atol=1e-12)
assert torch.allclose(h_mine, h_ref, atol=1e-12) and torch.allclose(
    c_mine, c_ref, atol=1e-12
)
print(
    "largest difference, packed 2-layer bidirectional:",
    f"{(out_mine.data - out_ref.data).abs().max():.1e}",
)

# %%
# From here, changing the cell is one edit in ``forward``: a peephole, a normalisation, a new
# gate, and ``rnnkit.Recurrent`` still gives you layers, directions and packed batches. The
# variants rnnkit ships ready-made (layer norm, zoneout, recurrent dropout) are in
# :doc:`08_variants`.
