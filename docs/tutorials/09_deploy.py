"""
Deploying
=========

A model built with rnnkit layers leaves Python the way a ``torch.nn`` model does. This tutorial
takes one small classifier through ``torch.compile``, ``torch.export``, ONNX (run in
onnxruntime) and :func:`rnnkit.to_torch` (for TorchScript and tools that look for
``torch.nn``'s classes), and checks each against the eager model's output.
"""

import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import onnx
import onnxruntime
import torch
from torch import nn

import rnnkit


class Net(nn.Module):
    def __init__(self, **variants):
        super().__init__()
        self.lstm = rnnkit.LSTM(
            8, 32, num_layers=2, batch_first=True, **variants
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):  # (B, T, 8)
        out, _ = self.lstm(x)  # (B, T, 32)
        return self.head(out[:, -1])  # (B, 10)


torch.manual_seed(0)
model = Net().eval()
x = torch.randn(4, 12, 8)
with torch.no_grad():
    eager = model(x)
difference = {}


def record(name, out):
    difference[name] = (torch.as_tensor(out) - eager).abs().max().item()
    print(f"{name:28s} max |difference to eager| = {difference[name]:.1e}")


# %%
# ``torch.compile``
# -----------------
# The first call compiles (tens of seconds on a laptop CPU); later calls reuse the compiled
# code. ``fullgraph=True`` would raise if anything in the model broke the graph.

compiled = torch.compile(model, fullgraph=True)
with torch.no_grad():
    record("torch.compile", compiled(x))

# %%
# ``torch.export``
# ----------------
# One graph of ATen operators, without Python, as a program to save with ``torch.export.save``
# or hand to a compiler.

exported = torch.export.export(model, (x,))
with torch.no_grad():
    record("torch.export", exported.module()(x))

# %%
# ONNX, run in onnxruntime
# ------------------------
# While a graph is recorded, a plain rnnkit layer runs on torch's own kernels, which the
# exporters know, so the ONNX file holds ONNX's own ``LSTM`` operator.

folder = Path(tempfile.mkdtemp())
torch.onnx.export(model, (x,), folder / "net.onnx", dynamo=True, verbose=False)
ops = [node.op_type for node in onnx.load(folder / "net.onnx").graph.node]
print("ONNX operators:", sorted(set(ops)))
assert ops.count("LSTM") == 2  # one per layer

session = onnxruntime.InferenceSession(
    folder / "net.onnx", providers=["CPUExecutionProvider"]
)
(onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
record("ONNX in onnxruntime", onnx_out)

# %%
# A layer with per-step variants (layer norm, zoneout, recurrent dropout) has no ONNX
# operator: it is exported as its unrolled steps, plain matrix products and pointwise
# operations, and runs the same.

torch.manual_seed(0)
normed = Net(layer_norm=True).eval()
with torch.no_grad():
    normed_eager = normed(x)
torch.onnx.export(
    normed, (x,), folder / "normed.onnx", dynamo=True, verbose=False
)
normed_ops = [
    node.op_type for node in onnx.load(folder / "normed.onnx").graph.node
]
print(
    f"layer_norm=True: {len(normed_ops)} ONNX nodes, no LSTM operator:",
    "LSTM" not in normed_ops,
)
assert "LSTM" not in normed_ops and len(normed_ops) > 10 * len(ops)
session = onnxruntime.InferenceSession(
    folder / "normed.onnx", providers=["CPUExecutionProvider"]
)
(normed_onnx,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
assert torch.allclose(torch.as_tensor(normed_onnx), normed_eager, atol=1e-5)

# %%
# ``rnnkit.to_torch``: the same model on ``torch.nn``'s classes
# --------------------------------------------------------------
# :func:`rnnkit.to_torch` returns a copy in which every plain rnnkit layer is the ``torch.nn``
# class holding the same parameters. Use it for ``torch.jit.script``, which cannot compile
# rnnkit's Python forward, and for tools that find layers by their ``torch.nn`` type, such as
# dynamic quantisation.

converted = rnnkit.to_torch(model)
print(converted)
assert type(converted.lstm) is nn.LSTM and isinstance(model.lstm, rnnkit.LSTM)
scripted = torch.jit.script(converted)
with torch.no_grad():
    record("to_torch + torch.jit.script", scripted(x))

# %%
# A layer with variants has no ``torch.nn`` twin: it stays an rnnkit layer, with a warning
# that names the variant. :func:`rnnkit.from_torch` goes the other way.

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    kept = rnnkit.to_torch(normed)
assert isinstance(kept.lstm, rnnkit.LSTM) and any(
    "layer_norm" in str(w.message) for w in caught
)
back = rnnkit.from_torch(converted)
assert isinstance(back.lstm, rnnkit.LSTM)
with torch.no_grad():
    assert torch.allclose(back(x), eager, atol=1e-6)

# %%
# All paths give the eager model's numbers to float32 rounding (a few times ``1e-7``, often
# exactly): the figure shows the largest difference of each. A difference of exactly 0 is
# drawn at the axis floor, ``1e-10``, and labelled.

assert all(d < 1e-5 for d in difference.values())
floor = 1e-10
fig, ax = plt.subplots(figsize=(8, 3.2))
names = list(difference)
heights = [max(difference[n], floor) for n in names]
ax.barh(
    names,
    heights,
    color=["lightgray" if difference[n] == 0 else "C0" for n in names],
)
for i, n in enumerate(names):
    ax.text(
        heights[i] * 1.5,
        i,
        "exactly equal" if difference[n] == 0 else f"{difference[n]:.1e}",
        va="center",
    )
ax.axvline(
    torch.finfo(torch.float32).eps,
    color="gray",
    linestyle=":",
    label="float32 epsilon",
)
ax.set_xscale("log")
ax.set_xlim(floor / 2, 1e-3)
ax.set_xlabel("max |output - eager output| (logits, unitless)")
ax.set_title("Each deployment path against the eager model")
ax.legend(loc="lower right", fontsize=8)
fig.tight_layout()
