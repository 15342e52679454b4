"""
Streaming: the state carried from one call to the next
======================================================

A model that reads a live signal (a sensor, frames of audio, a user's keystrokes) gets its input a
step or a chunk at a time, and must carry the recurrent state from each call to the next. The
state a layer returns, ``h_n`` (and an LSTM's ``c_n``), is exactly what the next call takes as
``hx``. This tutorial shows that chunks then give the numbers of one call over the whole sequence;
how to run many streams as one batch and restart one of them; why a bidirectional layer cannot
stream; how training on a long stream cuts the graph between chunks; and the cell, the engine and
the int8 model for the same job.
"""

import matplotlib.pyplot as plt
import torch

import rnnkit
from rnnkit import engines

torch.manual_seed(0)
T, I, H = 60, 8, 32
lstm = rnnkit.LSTM(I, H, num_layers=2).eval()
x = torch.randn(T, 1, I)  # one stream of 60 steps, 8 features each
with torch.no_grad():
    whole, (h_n, c_n) = lstm(x)  # (T, 1, H); h_n and c_n (2 layers, 1, H)

# %%
# Chunks, with the state passed back in
# -------------------------------------
# Feed the same stream in chunks of 7 steps, then one step at a time. The first call starts from
# zeros (``hx=None``); every later call starts from the state the previous one returned. The
# outputs are the whole call's, to float32 rounding, and so is the final state.


def stream(layer, steps, size):
    """Run ``steps`` through ``layer`` ``size`` steps a call, carrying the state."""
    state, outputs = None, []
    with torch.no_grad():
        for chunk in steps.split(size):
            out, state = layer(chunk, state)
            outputs.append(out)
    return torch.cat(outputs), state


chunked, (h_c, c_c) = stream(lstm, x, 7)
stepped, _ = stream(lstm, x, 1)
for name, got in (("chunks of 7", chunked), ("one step a call", stepped)):
    gap = (got - whole).abs().max().item()
    print(f"{name:16s} largest difference from the whole call: {gap:.1e}")
    assert gap < 1e-5
assert torch.allclose(h_c, h_n, atol=1e-5) and torch.allclose(
    c_c, c_n, atol=1e-5
)

# %%
# Without the state, each chunk starts from zeros: the model forgets everything before it.

forgetful = torch.cat([lstm(chunk)[0].detach() for chunk in x.split(7)])
print(
    f"chunks without the state: largest difference {(forgetful - whole).abs().max():.2f}"
)
assert (forgetful - whole).abs().max() > 0.01

fig, ax = plt.subplots(figsize=(7, 3))
steps = range(T)
ax.plot(
    steps, whole[:, 0, 0], lw=7, color="silver", label="one call, 60 steps"
)
ax.plot(
    steps,
    chunked[:, 0, 0],
    color="tab:blue",
    label="chunks of 7, state passed on",
)
ax.plot(
    steps,
    forgetful[:, 0, 0],
    "--",
    color="tab:red",
    label="chunks of 7, no state",
)
for start in range(7, T, 7):
    ax.axvline(start - 0.5, color="black", lw=0.5, alpha=0.3)
ax.set_xlabel("time step")
ax.set_ylabel("output feature 0 (unitless)")
ax.set_title("The state carried between calls gives the whole call's output")
ax.legend(fontsize=8)
fig.tight_layout()

# %%
# Many streams in one batch, and restarting one
# ---------------------------------------------
# Streams that run side by side are the rows of a batch: each has its own row of ``h`` and
# ``c`` (dimension 1 of the state, ``(num_layers, batch, H)``). When one stream ends and a new
# one starts in its place, zero its rows of the state and leave the others alone.

streams = torch.randn(T, 3, I)  # three streams
restart = 30  # stream 1 starts afresh here
with torch.no_grad():
    first, (h, c) = lstm(streams[:restart])
    h, c = h.clone(), c.clone()
    h[:, 1], c[:, 1] = 0.0, 0.0
    second, _ = lstm(streams[restart:], (h, c))
    fresh, _ = lstm(streams[restart:, 1:2])  # stream 1's new part, from zeros
    carried, _ = lstm(streams[:, 0:1])  # stream 0, never restarted
assert torch.allclose(second[:, 1:2], fresh, atol=1e-5)
assert torch.allclose(torch.cat([first, second])[:, 0:1], carried, atol=1e-5)
print("stream 1 after its restart equals a fresh run; stream 0 carried on")

# %%
# A bidirectional layer cannot stream
# -----------------------------------
# Its backward direction reads the sequence from the end: its output at step ``t`` depends on
# every step after ``t``, which a stream has not seen yet. Chunked, the backward half is wrong
# (each chunk's backward pass starts at the chunk's end), however the state is passed.

bi = rnnkit.LSTM(I, H, bidirectional=True).eval()
with torch.no_grad():
    bi_whole, _ = bi(x)
bi_chunked, _ = stream(bi, x, 7)
forward_gap = (bi_chunked[..., :H] - bi_whole[..., :H]).abs().max().item()
backward_gap = (bi_chunked[..., H:] - bi_whole[..., H:]).abs().max().item()
print(
    f"bidirectional, chunked: forward half off by {forward_gap:.1e}, "
    f"backward half by {backward_gap:.2f}"
)
assert forward_gap < 1e-5 and backward_gap > 0.01

# %%
# Training on a long stream: cut the graph between chunks
# --------------------------------------------------------
# Trained on one long stream, a model learns from chunks (truncated backpropagation through time).
# Passing the state on as it is keeps every earlier chunk in the autograd graph: the gradients
# of the last chunk's loss reach back to the first chunk, and memory grows with the stream.
# ``detach()`` keeps the values of the state and cuts the graph.

train = rnnkit.LSTM(I, H)
inputs = x.clone().requires_grad_()
state = None
for chunk in inputs.split(20):
    out, state = train(chunk, state)
out.sum().backward()  # the last chunk's loss
reach_all = inputs.grad[:20].abs().sum().item()

inputs.grad = None
state = None
for chunk in inputs.split(20):
    if state is not None:
        state = tuple(s.detach() for s in state)
    out, state = train(chunk, state)
out.sum().backward()
reach_cut = inputs.grad[:20].abs().sum().item()
print(
    f"gradient on the first chunk: {reach_all:.3g} with the state as it is, "
    f"{reach_cut:g} with the state detached"
)
assert reach_all > 0 and reach_cut == 0

# %%
# The cell is one step of the layer
# ---------------------------------
# ``rnnkit.LSTMCell`` holding a one-layer LSTM's weights computes the same step. Its call is a
# dozen small torch operators, so a step costs more than the layer's does for a whole chunk;
# the cell is for loops the layer cannot express (a step that reads the previous output).

one = rnnkit.LSTM(I, H).eval()
cell = rnnkit.LSTMCell(I, H)
cell.load_state_dict(
    {k.removesuffix("_l0"): v for k, v in one.state_dict().items()}
)
with torch.no_grad():
    h, c = torch.zeros(1, H), torch.zeros(1, H)
    for t in range(T):
        h, c = cell(x[t], (h, c))
    layer_out, _ = one(x)
assert torch.allclose(h, layer_out[-1], atol=1e-5)
print("60 cell steps end where the layer's last output is")

# %%
# Which engine runs a step
# ------------------------
# A call of one step is short, and what dominates it is fixed cost. With ``backend="auto"`` a
# one-step call of one stream through a large float32 LSTM (here I=H=256) runs on rnnkit's
# native loop: torch's oneDNN LSTM copies its weights into its own layout on every call, which
# costs more than the step (BENCHMARKS.md, "One LSTM step at a time"). Small layers, and calls
# of more steps, stay on torch's kernel. ``engines.plan`` says what runs a call, and why.

for hidden in (32, 256):
    spec = rnnkit.layers.LayerSpec("LSTM", hidden, hidden, 1, 1, True, 0.0, 0)
    chosen = engines.plan(
        "LSTM",
        "auto",
        spec,
        torch.device("cpu"),
        torch.float32,
        batch=1,
        steps=1,
    )
    print(
        f"I=H={hidden}: a one-step call runs on {chosen.engine.__name__.split('.')[-1]}"
    )
    assert chosen.engine is (
        engines.native if hidden == 256 else engines.torch_native
    )

# %%
# int8 streams the same way
# -------------------------
# :func:`rnnkit.quantize` gives an int8 copy of the model (see the :doc:`guide <../guide/int8>`):
# the same calls, the same state. Chunked, it gives the numbers of its own whole call; against
# float32 its outputs move by a percent or less (each weight and each input is rounded to 1/127
# of its row's largest value).

q = rnnkit.quantize(lstm)
with torch.no_grad():
    q_whole, _ = q(x)
q_stepped, _ = stream(q, x, 1)
relative = ((q_whole - whole).norm() / whole.norm()).item()
print(
    f"int8 one step a call against its whole call: {(q_stepped - q_whole).abs().max():.1e}; "
    f"against float32: {relative:.1%} relative"
)
assert torch.allclose(q_stepped, q_whole, atol=1e-5) and relative < 0.05
