"""
What an RNN layer returns
=========================

Every recurrent layer returns two things: ``output``, the top layer's hidden state at *every*
time step, and the final state ``h_n`` (an LSTM also ``c_n``) of *every* layer and direction
after the last step. This tutorial takes them apart for :class:`rnnkit.RNN`,
:class:`rnnkit.LSTM` and :class:`rnnkit.GRU` (whose shapes are ``torch.nn``'s), and checks each
statement with an ``assert``.

We use the letters ``T`` (time steps), ``B`` (batch), ``I`` (input features), ``H`` (hidden
size), ``L`` (layers), ``D`` (directions: 2 when bidirectional) and ``P`` (projection size).
"""

import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import torch

import rnnkit

torch.manual_seed(0)
T, B, I, H = 5, 3, 10, 4

# %%
# One layer, the default layout
# -----------------------------
# Without ``batch_first``, the input is ``(T, B, I)``: time first.

lstm = rnnkit.LSTM(I, H)
x = torch.randn(T, B, I)
output, (h_n, c_n) = lstm(x)
print(
    "output",
    tuple(output.shape),
    " h_n",
    tuple(h_n.shape),
    " c_n",
    tuple(c_n.shape),
)
assert output.shape == (T, B, H)
assert h_n.shape == c_n.shape == (1, B, H)

# %%
# ``output[t]`` is the hidden state after step ``t``, so its last slice is the final hidden
# state: **the last slice of output is h_n[-1]**, exactly (the same tensor values).

assert torch.equal(output[-1], h_n[-1])

# %%
# ``c_n`` is the final *cell* state. It never appears in ``output``: an LSTM only emits
# ``h = o * tanh(c)``.

assert not torch.allclose(c_n[-1], h_n[-1])

# %%
# ``batch_first`` moves the batch in ``output``, not in ``h_n``
# -------------------------------------------------------------
# With ``batch_first=True`` the input and ``output`` are ``(B, T, ...)``; ``h_n`` and ``c_n`` stay
# ``(L * D, B, H)``. They have the layout of the initial state ``hx`` you may pass in, which is
# layer-first whatever the input's layout, so that a final state can be fed back as the next
# call's initial state.

lstm_bf = rnnkit.LSTM(I, H, batch_first=True)
lstm_bf.load_state_dict(lstm.state_dict())
output_bf, (h_n_bf, _) = lstm_bf(x.transpose(0, 1))
print(
    "batch_first: output", tuple(output_bf.shape), " h_n", tuple(h_n_bf.shape)
)
assert output_bf.shape == (B, T, H)
assert h_n_bf.shape == (1, B, H)
assert torch.allclose(output_bf.transpose(0, 1), output) and torch.allclose(
    h_n_bf, h_n
)
assert torch.equal(output_bf[:, -1], h_n_bf[-1])

# %%
# Several layers: ``h_n`` holds each one
# --------------------------------------
# ``output`` is the *top* layer's states only; ``h_n`` has one row per layer, bottom first. So
# ``h_n[-1]`` is still the last slice of ``output``, and ``h_n[0]`` is what a one-layer LSTM
# with the bottom layer's weights ends in.

deep = rnnkit.LSTM(I, H, num_layers=3)
output, (h_n, c_n) = deep(x)
print("num_layers=3: output", tuple(output.shape), " h_n", tuple(h_n.shape))
assert output.shape == (T, B, H) and h_n.shape == c_n.shape == (3, B, H)
assert torch.equal(output[-1], h_n[-1])

bottom = rnnkit.LSTM(I, H)
bottom.load_state_dict(
    {k: v for k, v in deep.state_dict().items() if k.endswith("_l0")}
)
_, (h_bottom, _) = bottom(x)
assert torch.allclose(h_bottom[0], h_n[0], atol=1e-6)

# %%
# Bidirectional: where the backward state lives
# ---------------------------------------------
# A bidirectional layer runs a second LSTM from the last step to the first. ``output`` puts the
# two directions side by side, ``(T, B, 2 * H)``: the forward states in the first ``H``
# features, the backward ones in the last ``H``. ``h_n`` has ``L * 2`` rows, ordered
# ``layer * 2 + direction``: for the top layer, ``h_n[-2]`` is forward and ``h_n[-1]`` backward.
#
# The backward direction *ends* at time step 0, so its final state is ``output[0, :, H:]``,
# not anything in ``output[-1]``.

bi = rnnkit.LSTM(I, H, num_layers=2, bidirectional=True)
output, (h_n, c_n) = bi(x)
print(
    "bidirectional, 2 layers: output",
    tuple(output.shape),
    " h_n",
    tuple(h_n.shape),
)
assert output.shape == (T, B, 2 * H) and h_n.shape == (2 * 2, B, H)
assert torch.equal(output[-1, :, :H], h_n[-2])  # forward: after the last step
assert torch.equal(
    output[0, :, H:], h_n[-1]
)  # backward: after step 0, its last
assert not torch.allclose(
    output[-1, :, H:], h_n[-1]
)  # output[-1]'s backward half is not h_n

# %%
# So ``output[-1]`` holds the forward direction's summary of the whole sequence beside the
# backward direction's state after reading only the last step. To read out a whole sequence
# from both directions, take ``h_n[-2]`` and ``h_n[-1]`` (see :doc:`02_readout`).
#
# The figure shows one sequence of this layer: ``output`` on the left, ``h_n`` on the right, and
# where each top-layer row of ``h_n`` sits in ``output``.

b = 0
fig, (ax_out, ax_h) = plt.subplots(
    1, 2, figsize=(9, 3.8), width_ratios=[2 * H, 2 * H]
)
limit = max(output[:, b].abs().max().item(), h_n[:, b].abs().max().item())
ax_out.imshow(
    output[:, b].detach(),
    cmap="coolwarm",
    vmin=-limit,
    vmax=limit,
    aspect="auto",
)
ax_out.set_title(f"output[:, {b}]  ({T} steps x 2H = {2 * H} features)")
ax_out.set_xlabel("feature (index; 0-3 forward, 4-7 backward)")
ax_out.set_ylabel("time step t (index)")
ax_out.axvline(H - 0.5, color="black", linewidth=1)
ax_out.add_patch(
    plt.Rectangle(
        (-0.5, T - 1.5), H, 1, fill=False, edgecolor="green", linewidth=3
    )
)
ax_out.add_patch(
    plt.Rectangle(
        (H - 0.5, -0.5), H, 1, fill=False, edgecolor="purple", linewidth=3
    )
)
ax_out.text(
    H / 2 - 0.5,
    T - 1,
    "= h_n[-2]",
    ha="center",
    va="center",
    color="green",
    weight="bold",
)
ax_out.text(
    1.5 * H - 0.5,
    0,
    "= h_n[-1]",
    ha="center",
    va="center",
    color="purple",
    weight="bold",
)
image = ax_h.imshow(
    h_n[:, b].detach(), cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto"
)
ax_h.set_title(f"h_n[:, {b}]  (L*D = 4 rows x H = {H} features)")
ax_h.set_xlabel("feature (index)")
ax_h.set_yticks(
    range(4), ["layer 0 fwd", "layer 0 bwd", "layer 1 fwd", "layer 1 bwd"]
)
ax_h.set_ylabel("row of h_n (layer * 2 + direction)")
ax_h.add_patch(
    plt.Rectangle(
        (-0.5, 1.5), H, 1, fill=False, edgecolor="green", linewidth=3
    )
)
ax_h.add_patch(
    plt.Rectangle(
        (-0.5, 2.5), H, 1, fill=False, edgecolor="purple", linewidth=3
    )
)
fig.colorbar(image, ax=ax_h, label="hidden state value (unitless, in (-1, 1))")
fig.tight_layout()

# %%
# The values in the figure are the tensors' own: the boxed row of ``output`` and the boxed row
# of ``h_n`` hold the same numbers.

assert np.array_equal(
    output[T - 1, b, :H].detach().numpy(), h_n[2, b].detach().numpy()
)
assert np.array_equal(
    output[0, b, H:].detach().numpy(), h_n[3, b].detach().numpy()
)

# %%
# Projections: ``proj_size``
# --------------------------
# An LSTM with ``proj_size=P`` multiplies each ``h`` by a ``(P, H)`` matrix (Sak et al. 2014):
# ``output`` and ``h_n`` shrink to ``P`` features, the cell state ``c_n`` keeps ``H``.

P = 2
proj = rnnkit.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P)
output, (h_n, c_n) = proj(x)
print(
    "proj_size=2: output",
    tuple(output.shape),
    " h_n",
    tuple(h_n.shape),
    " c_n",
    tuple(c_n.shape),
)
assert output.shape == (T, B, 2 * P)
assert h_n.shape == (4, B, P) and c_n.shape == (4, B, H)
assert torch.equal(output[-1, :, :P], h_n[-2]) and torch.equal(
    output[0, :, P:], h_n[-1]
)

# %%
# RNN and GRU
# -----------
# The same, without ``c_n``: they return ``(output, h_n)``.

for layer in (rnnkit.RNN(I, H, num_layers=2), rnnkit.GRU(I, H, num_layers=2)):
    output, h_n = layer(x)
    print(
        type(layer).__name__,
        "output",
        tuple(output.shape),
        " h_n",
        tuple(h_n.shape),
    )
    assert output.shape == (T, B, H) and h_n.shape == (2, B, H)
    assert torch.equal(output[-1], h_n[-1])

# %%
# One sequence without a batch
# ----------------------------
# A 2-D input ``(T, I)`` is a single sequence: the batch dimension disappears from everything.

output, (h_n, c_n) = lstm(x[:, 0])
print("unbatched: output", tuple(output.shape), " h_n", tuple(h_n.shape))
assert output.shape == (T, H) and h_n.shape == c_n.shape == (1, H)

# %%
# The same layers in ``torch.nn``
# -------------------------------
# These shapes are ``torch.nn``'s: with the same weights, ``torch.nn.LSTM`` returns tensors of
# the same shapes and the same numbers (to float32 rounding).

reference = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True)
reference.load_state_dict(bi.state_dict())
ref_output, (ref_h_n, ref_c_n) = reference(x)
output, (h_n, c_n) = bi(x)
assert output.shape == ref_output.shape and h_n.shape == ref_h_n.shape
assert torch.allclose(output, ref_output, atol=1e-6) and torch.allclose(
    h_n, ref_h_n, atol=1e-6
)

# %%
# The command line
# ----------------
# ``rnnkit shapes`` prints this table for any layer, with what each tensor means:

args = [
    "lstm",
    "--input-size",
    "10",
    "--hidden-size",
    "20",
    "--num-layers",
    "2",
]
args += ["--bidirectional", "--seq-len", "5", "--batch", "3"]
table = subprocess.run(
    [sys.executable, "-m", "rnnkit", "shapes", *args],
    capture_output=True,
    text=True,
    check=True,
).stdout
print(table)
assert "output  (5, 3, 40)" in table and "h_n     (4, 3, 20)" in table
