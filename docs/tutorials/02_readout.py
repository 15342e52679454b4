"""
Reading out a sequence
======================

A classifier needs *one* vector per sequence, but a recurrent layer returns a state per step
(``output``) and a final state per layer and direction (``h_n``). Seed 003's three readouts are
three ways to get there; rnnkit's models call them ``last``, ``hn`` and ``mean``
(:func:`rnnkit.models.readout`). This tutorial builds each by hand, checks it against
:func:`rnnkit.models.readout`, and then shows the trap of padded batches: ``output[:, -1]`` is
wrong there, and what to use instead.
"""

import matplotlib.pyplot as plt
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit.models import ModelConfig, SequenceClassifier, readout

torch.manual_seed(0)
B, T, I, H, L = 3, 6, 5, 4, 2
lstm = rnnkit.LSTM(I, H, num_layers=L, bidirectional=True, batch_first=True)
x = torch.randn(B, T, I)
output, (h_n, c_n) = lstm(x)  # output (B, T, 2H), h_n (L * 2, B, H)

# %%
# The three readouts of a full batch
# ----------------------------------
# ``last`` is the output at the last step, both directions side by side: ``(B, 2H)``. As the
# first tutorial showed, its backward half has read only the last step.

last = output[:, -1]
assert last.shape == (B, 2 * H)
assert torch.equal(last, readout("last", output, h_n, None, num_directions=2))

# %%
# ``hn`` is ``h_n`` of every layer and direction side by side: ``(B, L * 2 * H)``. Each direction
# has read the whole sequence. ``h_n``'s rows are ``layer * 2 + direction``, so the concatenation
# runs layer 0 forward, layer 0 backward, layer 1 forward, layer 1 backward.

hn = torch.cat([h_n[k] for k in range(L * 2)], dim=-1)
assert hn.shape == (B, L * 2 * H)
assert torch.equal(hn, readout("hn", output, h_n, None, num_directions=2))

# %%
# ``mean`` averages the two directions of ``last`` instead of concatenating them: ``(B, H)``.

mean = (last[:, :H] + last[:, H:]) / 2
assert mean.shape == (B, H)
assert torch.allclose(
    mean, readout("mean", output, h_n, None, num_directions=2)
)

# %%
# A common middle way, the final state of the top layer in both directions, is
# ``torch.cat([h_n[-2], h_n[-1]], -1)``: the last ``2H`` features of ``hn``.

top = torch.cat([h_n[-2], h_n[-1]], dim=-1)
assert torch.equal(top, hn[:, -2 * H :])

# %%
# Padded batches: why ``output[:, -1]`` is wrong
# ----------------------------------------------
# Sequences of different lengths are padded to the longest one. Take lengths 6, 4 and 2.

lengths = torch.tensor([6, 4, 2])
padded = x.clone()
for b, n in enumerate(lengths):
    padded[b, n:] = 0.0  # the padding

# %%
# **Fed as is**, the layer reads the padding as if it were data: the state at the last step of
# a short sequence has gone through zeros after its real end, and is not what the sequence alone
# gives.

output_padded, _ = lstm(padded)
alone, _ = lstm(x[1:2, : lengths[1]])  # sequence 1 alone, its 4 real steps
assert not torch.allclose(output_padded[1, -1], alone[0, -1], atol=1e-3)

# %%
# **Packed**, the layer skips the padding: ``pack_padded_sequence`` gives it each sequence's
# real steps only. Unpacked again, the padded steps of ``output`` are zeros, so
# ``output[:, -1]`` of a short sequence is a zero vector: still not its last state.

packed = pack_padded_sequence(
    padded, lengths, batch_first=True, enforce_sorted=False
)
packed_output, (h_n, c_n) = lstm(packed)
output, _ = pad_packed_sequence(
    packed_output, batch_first=True, total_length=T
)
assert torch.count_nonzero(output[2, -1]) == 0

# %%
# What to use instead: index each sequence at its own last step ``lengths[b] - 1``, or take
# ``h_n``, which with packed input is every sequence's own final state (torch.nn's rule too).
# The forward half of the indexed output and the top layer's forward ``h_n`` are the same
# numbers, and both equal what the sequence gives alone.

at_last = output[torch.arange(B), lengths - 1]  # (B, 2H)
assert torch.equal(at_last[:, :H], h_n[-2])
assert torch.allclose(at_last[1], alone[0, -1], atol=1e-6)
assert torch.equal(
    at_last, readout("last", output, h_n, lengths, num_directions=2)
)

# %%
# The backward direction of a packed sequence starts at the sequence's *own* last step, so its
# final state ``h_n[-1]`` sits at step 0 of ``output``, as for a full batch.

assert torch.equal(output[:, 0, H:], h_n[-1])

# %%
# The figure shows the size of each state in the unpacked ``output`` (its norm, per sequence
# and step): the padding is zero, ``output[:, -1]`` (crosses) falls into it for the two short
# sequences, and ``lengths - 1`` (orange circles) finds each sequence's last real step.

norms = output.norm(dim=-1).detach()  # (B, T)
fig, ax = plt.subplots(figsize=(7, 2.8))
image = ax.imshow(norms, cmap="viridis", aspect="auto")
ax.scatter(
    [T - 1] * B,
    range(B),
    marker="x",
    s=140,
    color="red",
    label="output[:, -1]",
)
ax.scatter(
    lengths - 1,
    range(B),
    marker="o",
    s=160,
    facecolors="none",
    edgecolors="darkorange",
    linewidths=2.5,
    label="output[b, lengths[b] - 1]",
)
ax.set_xlabel("time step t (index)")
ax.set_ylabel("sequence b (index)")
ax.set_yticks(
    range(B), [f"b={b}, length {int(n)}" for b, n in enumerate(lengths)]
)
ax.set_title("Unpacked output of a packed batch: padding is zero")
ax.legend(
    loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, frameon=False
)
fig.colorbar(image, ax=ax, label="norm of output[b, t] (unitless)")
fig.tight_layout()

assert (
    (norms[1, 4:] == 0).all()
    and (norms[2, 2:] == 0).all()
    and (norms[0] > 0).all()
)

# %%
# rnnkit's models take the lengths and do all of this for you: a
# :class:`rnnkit.models.SequenceClassifier` given ``lengths`` packs the batch and reads out at
# each sequence's own end, so a padded batch gives the same logits as each sequence alone.

config = ModelConfig(
    "classifier",
    input_size=I,
    output_size=3,
    hidden_size=H,
    bidirectional=True,
    readout="last",
)
model = SequenceClassifier(config).eval()
batch_logits = model(padded, lengths)
one_by_one = torch.cat([model(x[b : b + 1, : lengths[b]]) for b in range(B)])
assert torch.allclose(batch_logits, one_by_one, atol=1e-6)
