"""
Counting parameters
===================

How many numbers does a recurrent layer learn? Each gate of a cell has an input weight
``W_ih`` (``H x I``), a recurrent weight ``W_hh`` (``H x H``) and, in PyTorch, *two* bias vectors
``b_ih`` and ``b_hh`` (``H`` each). A plain RNN has one such gate, a GRU three (reset, update,
new), an LSTM four (input, forget, cell, output). So one layer and direction holds

    ``G * (H * I + H * H + 2 * H)``     with G = 1, 3 or 4

parameters (seed 002). This tutorial checks the formula against the layers themselves
(:func:`rnnkit.count_parameters`), rnnkit's closed form (:func:`rnnkit.param_count`) and
``torch.nn``, and explains why Keras prints a smaller number for the same LSTM.
"""

import subprocess
import sys

import matplotlib.pyplot as plt
import torch

import rnnkit

I, H = 10, 20
GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def formula(G, I, H, biases=2):
    return G * (H * I + H * H + biases * H)


# %%
# One layer of each kind
# ----------------------

for name, G in GATES.items():
    layer = getattr(rnnkit, name)(I, H)
    counted = rnnkit.count_parameters(layer)
    closed = rnnkit.param_count(name.lower(), I, H).total
    torch_count = sum(
        p.numel() for p in getattr(torch.nn, name)(I, H).parameters()
    )
    print(f"{name:4s} G={G}  formula {formula(G, I, H)}", end="  ")
    print(f"counted {counted}  torch.nn {torch_count}")
    assert counted == closed == torch_count == formula(G, I, H)

# %%
# So an LSTM has exactly 4x the parameters of a plain RNN of the same sizes, and a GRU 3x.

rnn, gru, lstm = (
    rnnkit.count_parameters(getattr(rnnkit, n)(I, H)) for n in GATES
)
assert lstm == 4 * rnn and gru == 3 * rnn

# %%
# Where they are
# --------------
# The tensors carry ``torch.nn``'s names and shapes; the ``G`` gates are stacked along the first
# dimension (``i, f, g, o`` for the LSTM, ``r, z, n`` for the GRU).

lstm_layer = rnnkit.LSTM(I, H)
for name, p in lstm_layer.named_parameters():
    print(f"{name:14s} {tuple(p.shape)}")
assert dict((n, tuple(p.shape)) for n, p in lstm_layer.named_parameters()) == {
    "weight_ih_l0": (4 * H, I),
    "weight_hh_l0": (4 * H, H),
    "bias_ih_l0": (4 * H,),
    "bias_hh_l0": (4 * H,),
}

# %%
# Deeper and bidirectional layers
# -------------------------------
# Every layer and direction has its own set; a layer above the first reads the ``D * H``
# features of the layer below, so its ``I`` is ``D * H``. :func:`rnnkit.param_count` also
# returns the count per layer and the formula it used.

count = rnnkit.param_count("lstm", I, H, num_layers=2, bidirectional=True)
print(count.formula)
print("per layer:", count.per_layer, " total:", count.total)
D = 2
assert count.per_layer == [D * formula(4, I, H), D * formula(4, D * H, H)]
assert count.total == rnnkit.count_parameters(
    rnnkit.LSTM(I, H, num_layers=2, bidirectional=True)
)

# %%
# With a projection (``proj_size=P``) the recurrent weight reads ``h`` of ``P`` features and a
# ``(P, H)`` matrix is added: ``4 * (H * I + H * P + 2 * H) + P * H``.

P = 5
assert (
    rnnkit.count_parameters(rnnkit.LSTM(I, H, proj_size=P))
    == 4 * (H * I + H * P + 2 * H) + P * H
)

# %%
# Why Keras counts fewer
# ----------------------
# Keras's ``LSTM`` and ``SimpleRNN`` keep *one* bias vector per gate, so their count is
# ``G * (H * I + H * H + H)``; PyTorch (and cuDNN, whose layout it follows) keeps two. The two
# biases are always added together, ``W_ih x + b_ih + W_hh h + b_hh``, so the second one adds
# parameters but no expressive power. The difference is exactly the ``b_hh`` tensors: ``G * H``
# per layer and direction. (Keras's ``GRU`` with its default ``reset_after=True`` keeps two bias
# vectors too, as cuDNN does, because there the reset gate multiplies ``W_hh h + b_hh``.)

for name, G in GATES.items():
    layer = getattr(rnnkit, name)(I, H)
    keras_style = formula(G, I, H, biases=1)
    b_hh = sum(
        p.numel()
        for n, p in layer.named_parameters()
        if n.startswith("bias_hh")
    )
    torch_style = rnnkit.count_parameters(layer)
    print(f"{name:4s} torch {torch_style}  one bias per gate {keras_style}")
    assert rnnkit.count_parameters(layer) - keras_style == b_hh == G * H

# %%
# The two biases really are redundant: folding ``b_hh`` into ``b_ih`` and zeroing it leaves an
# LSTM's output unchanged (up to float rounding).

x = torch.randn(7, 3, I)
folded = rnnkit.LSTM(I, H)
folded.load_state_dict(lstm_layer.state_dict())
with torch.no_grad():
    folded.bias_ih_l0 += folded.bias_hh_l0
    folded.bias_hh_l0.zero_()
assert torch.allclose(folded(x)[0], lstm_layer(x)[0], atol=1e-6)

# %%
# Without biases (``bias=False``) the count is ``G * (H * I + H * H)`` in both libraries.

assert rnnkit.count_parameters(rnnkit.GRU(I, H, bias=False)) == 3 * (
    H * I + H * H
)

# %%
# The figure shows, for ``I = 10`` and ``H = 20``, how the count of one layer splits into the
# four tensors, and the one-bias count Keras would print for an LSTM and a SimpleRNN.

parts = ["weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"]
fig, ax = plt.subplots(figsize=(7, 3.6))
bottom = [0] * len(GATES)
for part in parts:
    sizes = [
        getattr(rnnkit, n)(I, H).get_parameter(part).numel() for n in GATES
    ]
    ax.bar(list(GATES), sizes, bottom=bottom, label=part)
    bottom = [b + s for b, s in zip(bottom, sizes, strict=True)]
keras = {n: formula(G, I, H, biases=1) for n, G in GATES.items() if n != "GRU"}
positions = {n: k for k, n in enumerate(GATES)}
ax.hlines(
    list(keras.values()),
    [positions[n] - 0.4 for n in keras],
    [positions[n] + 0.4 for n in keras],
    color="black",
    linewidth=2.5,
    zorder=3,
    label="Keras (one bias per gate)",
)
for n, total in zip(GATES, bottom, strict=True):
    ax.text(n, total + 30, f"{total:,}", ha="center")
ax.set_ylabel("parameters (count)")
ax.set_xlabel("layer type (I = 10, H = 20, one layer)")
ax.set_ylim(0, max(bottom) * 1.15)
ax.legend(fontsize=8, loc="upper left")
fig.tight_layout()
assert bottom == [formula(G, I, H) for G in GATES.values()]

# %%
# The command line
# ----------------
# ``rnnkit params`` prints one row per tensor, the formula and the total for any configuration:

args = [
    "lstm",
    "--input-size",
    "10",
    "--hidden-size",
    "20",
    "--num-layers",
    "2",
]
table = subprocess.run(
    [sys.executable, "-m", "rnnkit", "params", *args],
    capture_output=True,
    text=True,
    check=True,
).stdout
print(table)
total = rnnkit.param_count("lstm", 10, 20, num_layers=2).total
assert f"total: {total:,} parameters" in table
