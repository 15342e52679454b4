"""
Beyond torch.nn: layer norm, zoneout, recurrent dropout
=======================================================

``rnnkit.LSTM`` and ``rnnkit.GRU`` take keyword arguments that ``torch.nn`` lacks. All are off by
default, and then the layer is exactly ``torch.nn``'s. This tutorial shows what three of them do
to a layer, each with a small measurement, and then trains a small digit classifier with each.

- ``layer_norm=True``: layer normalisation (Ba et al. 2016) of the input projection
  ``W_ih x``, the recurrent projection ``W_hh h`` and the cell state, each with a learnt gain and
  bias.
- ``zoneout=p``: in training, each unit of ``h`` and ``c`` keeps its previous value with
  probability ``p`` at each step (Krueger et al. 2016); in evaluation, the expectation.
- ``recurrent_dropout=p``: dropout on the ``h`` that enters ``W_hh``, with one mask per sequence
  for all its steps (Gal and Ghahramani 2016); training only.

The equations are in ``rnnkit.variants``; the :doc:`guide <../guide/variants>` lists the others
(``weight_drop``, ``learn_init``, ``forget_bias``).
"""

import tempfile

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

import rnnkit
from rnnkit.data import load_digits, stratified_split

torch.manual_seed(0)
T, B, I, H = 40, 16, 8, 32
x = torch.randn(T, B, I)

# %%
# Layer norm: the scale of the input no longer matters
# ----------------------------------------------------
# Multiply the input by 10. A plain LSTM's gates saturate and its outputs change completely; with
# layer norm, ``W_ih x`` is normalised before it reaches the gates, so the outputs barely move
# (only the norm's small epsilon keeps them from being identical).

plain, normed = rnnkit.LSTM(I, H), rnnkit.LSTM(I, H, layer_norm=True)
with torch.no_grad():
    change = {
        name: (layer(10 * x)[0] - layer(x)[0]).abs().max().item()
        for name, layer in (("plain", plain), ("layer_norm", normed))
    }
print({k: f"{v:.1e}" for k, v in change.items()})
assert change["plain"] > 0.5 and change["layer_norm"] < 1e-2

# %%
# Layer norm adds a gain and a bias per normalised quantity, after ``torch.nn``'s parameters
# (whose names and initialisation stay): here ``3 * 2`` vectors.

extra = {
    n: tuple(p.shape)
    for n, p in normed.named_parameters()
    if n.startswith("ln_")
}
print(extra)
assert rnnkit.count_parameters(normed) - rnnkit.count_parameters(
    plain
) == 2 * (4 * H + 4 * H + H)

# %%
# Zoneout: units that keep their value
# ------------------------------------
# In training mode, count how often a unit's output equals its value one step earlier: that is
# the zoneout probability. In evaluation mode the layer is deterministic (it uses the
# expectation ``p * h_{t-1} + (1 - p) * h~_t``), so two calls agree.

measured = {}
for p in (0.0, 0.1, 0.3, 0.5, 0.7):
    layer = rnnkit.LSTM(I, H, zoneout=p).train()
    with torch.no_grad():
        out, _ = layer(x)
    measured[p] = (out[1:] == out[:-1]).float().mean().item()
print({p: round(m, 3) for p, m in measured.items()})
assert all(abs(measured[p] - p) < 0.02 for p in measured)
layer.eval()
with torch.no_grad():
    assert torch.equal(layer(x)[0], layer(x)[0])

# %%
# Recurrent dropout: noisy in training, plain in evaluation
# ---------------------------------------------------------
# The dropout masks are scaled by ``1 / (1 - p)``, so in evaluation the layer is the plain LSTM
# with the same weights (the same numbers up to float32 rounding: the two may run on different
# engines). In training, every call draws new masks.

dropped = rnnkit.LSTM(I, H, recurrent_dropout=0.25)
same = rnnkit.LSTM(I, H)
same.load_state_dict(dropped.state_dict())
with torch.no_grad():
    assert torch.allclose(dropped.eval()(x)[0], same(x)[0], atol=1e-6)
    dropped.train()
    runs = torch.stack(
        [dropped(x)[0][:, 0, 0] for _ in range(30)]
    )  # (30, T): unit 0, sequence 0
    clean = same(x)[0][:, 0, 0]
assert (
    runs.std(dim=0)[1:].min() > 0
)  # every step after the first varies between calls

# %%
# The figures. First, one unit's output over the first 20 steps, for the input at scale 1 and
# at scale 10: the plain LSTM's two curves part, the layer-normed LSTM's lie on each other.

show = 20
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
with torch.no_grad():
    for ax, (name, layer) in zip(
        axes, (("plain LSTM", plain), ("layer_norm=True", normed)), strict=True
    ):
        ax.plot(layer(x)[0][:show, 0, 0], "o-", label="input x")
        ax.plot(
            layer(10 * x)[0][:show, 0, 0],
            "x--",
            markersize=8,
            label="input 10 x",
        )
        ax.set_title(name)
        ax.set_xlabel("time step t (index)")
        ax.legend(fontsize=8)
axes[0].set_ylabel("output of unit 0 (unitless)")
fig.tight_layout()

# %%
# Then the measured zoneout rate against ``p``, and the spread of one unit's output over 30
# training-mode calls with recurrent dropout, around the evaluation-mode output.

fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
ps = list(measured)
axes[0].plot(ps, ps, color="gray", linestyle=":", label="expected (= p)")
axes[0].plot(ps, list(measured.values()), "o", label="measured")
axes[0].set_xlabel("zoneout probability p")
axes[0].set_ylabel("share of units unchanged per step")
axes[0].legend(fontsize=8)
axes[0].set_title("Zoneout, training mode")
steps = np.arange(T)
low, high = runs.min(dim=0).values, runs.max(dim=0).values
axes[1].fill_between(
    steps, low, high, alpha=0.3, label="training mode, 30 calls (min to max)"
)
axes[1].plot(steps, clean, color="black", label="evaluation mode = plain LSTM")
axes[1].set_xlabel("time step t (index)")
axes[1].set_ylabel("output of unit 0 (unitless)")
axes[1].legend(fontsize=8, loc="lower left")
axes[1].set_title("Recurrent dropout p = 0.25")
fig.tight_layout()

# %%
# A small experiment: digits from 180 examples
# --------------------------------------------
# The same small classifier (an LSTM over the 8 rows of each 8 x 8 digit, the last output, a
# linear layer) trained on only 10% of the bundled digits, with each variant, 30 epochs each.
# With so few examples a plain LSTM overfits: its validation loss ends more than ten times its
# training loss (checked below).

images, labels = load_digits()
train, val, test = stratified_split(labels, (0.1, 0.2, 0.7), seed=0)
xd, yd = torch.from_numpy(images), torch.from_numpy(labels)


class Net(nn.Module):
    def __init__(self, **variants):
        super().__init__()
        self.lstm = rnnkit.LSTM(8, 64, batch_first=True, **variants)
        self.head = nn.Linear(64, 10)

    def forward(self, x):  # (B, 8, 8)
        return self.head(self.lstm(x)[0][:, -1])  # (B, 10)


variants = {
    "plain": {},
    "layer_norm": {"layer_norm": True},
    "zoneout 0.2": {"zoneout": 0.2},
    "recurrent_dropout 0.3": {"recurrent_dropout": 0.3},
}
results = {}
for name, kwargs in variants.items():
    torch.manual_seed(0)
    config = rnnkit.TrainConfig(
        epochs=30,
        batch_size=16,
        lr=0.01,
        threads=1,
        out=tempfile.mkdtemp(),
        quiet=True,
    )
    results[name] = rnnkit.fit(
        Net(**kwargs),
        (xd[train], yd[train]),
        (xd[val], yd[val]),
        test_data=(xd[test], yd[test]),
        config=config,
    )
for name, h in results.items():
    print(
        f"{name:22s} final training loss {h['train_loss'][-1]:.3f}   "
        f"test accuracy {h.test['test_accuracy']:.1%}"
    )

# %%
# What the numbers say, for this small model:
#
# - layer norm lifts test accuracy by more than three points;
# - zoneout and recurrent dropout keep the training loss several times higher (the noise they
#   inject is working against memorising the 180 examples) but here end within a few points of
#   the plain LSTM's test accuracy. Whether a regulariser helps depends on the model and the
#   data: the papers measured theirs on large language models, not on a 64-unit LSTM.

test_accuracy = {name: h.test["test_accuracy"] for name, h in results.items()}
final_loss = {name: h["train_loss"][-1] for name, h in results.items()}
assert results["plain"]["val_loss"][-1] > 10 * final_loss["plain"]
assert test_accuracy["layer_norm"] > test_accuracy["plain"] + 0.03
for name in ("zoneout 0.2", "recurrent_dropout 0.3"):
    assert final_loss[name] > 3 * final_loss["plain"]
    assert abs(test_accuracy[name] - test_accuracy["plain"]) < 0.04

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
for name, h in results.items():
    epochs = np.arange(1, len(h["train_loss"]) + 1)
    ax1.plot(epochs, h["train_loss"], label=name)
    ax2.plot(epochs, 100 * np.array(h["val_accuracy"]), label=name)
ax1.set_yscale("log")
ax1.set_xlabel("epoch")
ax1.set_ylabel("training cross-entropy (nats per digit)")
ax2.set_xlabel("epoch")
ax2.set_ylabel("validation accuracy (%)")
ax1.legend(fontsize=8)
ax2.legend(fontsize=8, loc="lower right")
fig.tight_layout()
