"""
Sequential digits
=================

Seed 003 classifies MNIST digits with an LSTM that reads each 28 x 28 image row by row: 28 time
steps of 28 pixels. This tutorial does the same on the handwritten digits bundled with rnnkit
(the 1,797 8 x 8 digits of scikit-learn: 8 steps of 8 pixels), trains with :func:`rnnkit.fit`,
plots the training curves and the confusion matrix of the test set.
"""

import tempfile

import matplotlib.pyplot as plt
import numpy as np
import torch

import rnnkit
from rnnkit.data import load_digits, stratified_split
from rnnkit.models import ModelConfig, SequenceClassifier

images, labels = load_digits()  # (1797, 8, 8) in [0, 1], (1797,)
print(
    "images",
    images.shape,
    "labels",
    labels.shape,
    "classes",
    np.bincount(labels),
)
assert images.shape == (1797, 8, 8) and set(labels) == set(range(10))

# %%
# Each image is a sequence: row ``t`` is the input at step ``t``, 8 features. The split keeps
# every digit's share in each part: 70% training, 10% validation, 20% test.

train, val, test = stratified_split(labels, (0.7, 0.1, 0.2), seed=0)
x = torch.from_numpy(images)  # (N, T=8, I=8)
y = torch.from_numpy(labels)
print("train / validation / test:", len(train), len(val), len(test))

fig, axes = plt.subplots(1, 10, figsize=(10, 1.6))
for digit, ax in enumerate(axes):
    ax.imshow(
        images[np.flatnonzero(labels == digit)[0]],
        cmap="gray_r",
        vmin=0,
        vmax=1,
    )
    ax.set_title(str(digit))
    ax.set_xticks([])
    ax.set_yticks(range(0, 8, 7), ["t=0", "t=7"] if digit == 0 else ["", ""])
axes[0].set_ylabel("row = step")
axes[0].set_xlabel("8 pixels")
fig.suptitle("One digit of each class; each row of 8 pixels is one time step")
fig.tight_layout()

# %%
# The model and the training
# --------------------------
# Seed 003's model is :class:`rnnkit.models.SequenceClassifier`: an LSTM over the rows and a
# linear layer on a readout of it (here ``last``, the output at the last row). Adam with a
# one-cycle schedule, 30 epochs of 39 batches: a few seconds on one thread.

torch.manual_seed(0)
model = SequenceClassifier(
    ModelConfig(
        "classifier",
        input_size=8,
        output_size=10,
        hidden_size=128,
        readout="last",
    )
)
config = rnnkit.TrainConfig(
    epochs=30,
    batch_size=32,
    lr=0.01,
    threads=1,
    out=tempfile.mkdtemp(),
    quiet=True,
)
history = rnnkit.fit(
    model,
    (x[train], y[train]),
    (x[val], y[val]),
    test_data=(x[test], y[test]),
    config=config,
)
print(f"best epoch {history.best_epoch}")
print(f"test accuracy {history.test['test_accuracy']:.2%}")

# %%
# The test digits are recognised at over 97%: almost all of the 359.

assert history.test["test_accuracy"] > 0.97

# %%
# Training curves
# ---------------
# The loss on the training batches and on the validation set, and the validation accuracy, per
# epoch, from the history :func:`rnnkit.fit` returns (as ``metrics.jsonl`` in the run folder).

epochs = np.arange(1, len(history["train_loss"]) + 1)
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.plot(epochs, history["train_loss"], label="training")
ax1.plot(epochs, history["val_loss"], label="validation")
ax1.set_yscale("log")
ax1.set_xlabel("epoch")
ax1.set_ylabel("cross-entropy (nats per digit)")
ax1.legend()
ax2.plot(epochs, 100 * np.array(history["val_accuracy"]), color="C1")
ax2.axvline(
    history.best_epoch,
    color="gray",
    linestyle=":",
    label=f"best epoch ({history.best_epoch})",
)
ax2.set_xlabel("epoch")
ax2.set_ylabel("validation accuracy (%)")
ax2.legend(loc="lower right")
fig.tight_layout()
assert history["train_loss"][-1] < 0.1 * history["train_loss"][0]

# %%
# The confusion matrix
# --------------------
# :func:`rnnkit.predict` runs the model (with the best epoch's weights, which :func:`rnnkit.fit`
# left in it) on the test images. Row: the true digit; column: the predicted one.

predicted = rnnkit.predict(model, x[test]).argmax(-1).numpy()
matrix = np.zeros((10, 10), dtype=int)
np.add.at(matrix, (labels[test], predicted), 1)
assert np.trace(matrix) / matrix.sum() == history.test["test_accuracy"]

fig, ax = plt.subplots(figsize=(5, 4.4))
image = ax.imshow(matrix, cmap="Blues")
for i in range(10):
    for j in range(10):
        if matrix[i, j]:
            ax.text(
                j,
                i,
                matrix[i, j],
                ha="center",
                va="center",
                color="white" if matrix[i, j] > matrix.max() / 2 else "black",
                fontsize=8,
            )
ax.set_xticks(range(10))
ax.set_yticks(range(10))
ax.set_xlabel("predicted digit")
ax.set_ylabel("true digit")
ax.set_title(f"Test set: {np.trace(matrix)} of {matrix.sum()} right")
fig.colorbar(image, ax=ax, label="test images (count)")
fig.tight_layout()

# %%
# Which digits does it confuse? The off-diagonal cells:

mistakes = [
    (i, j, int(matrix[i, j]))
    for i in range(10)
    for j in range(10)
    if i != j and matrix[i, j]
]
print("true -> predicted (count):", mistakes)
assert sum(n for _, _, n in mistakes) == matrix.sum() - np.trace(matrix)
