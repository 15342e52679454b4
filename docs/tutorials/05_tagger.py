"""
A part-of-speech tagger
=======================

Seed 002's ``LSTMTagger`` reads a sentence word by word and gives every word a tag (noun, verb,
determiner, ...): an embedding per word, an LSTM over the sentence, and a linear layer on every
step's output. rnnkit has it as :class:`rnnkit.models.Tagger`. This tutorial trains one with
:func:`rnnkit.fit` on a slice of the bundled English Web Treebank (UD English EWT, the universal
part-of-speech tags) and compares it with the simplest honest baseline: give each word the tag it
had most often in training.

To stay well under a minute on one CPU thread it uses 2,000 of the 12,544 training sentences and
six epochs; ``rnnkit train tagger`` trains the full model (a spelling encoder per word too) to about
95.6% on the same test set.
"""

import tempfile
import time
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import torch

import rnnkit
from rnnkit.data import Vocab, ewt_conllu, read_conllu
from rnnkit.models import ModelConfig, Tagger

train = read_conllu(ewt_conllu("train"))[:2000]
dev = read_conllu(ewt_conllu("dev"))[:500]
test = read_conllu(ewt_conllu("test"))
words, tags = train[0]
print(list(zip(words, tags, strict=True)))
tokens = sum(len(w) for w, _ in train)
print(f"{len(train)} training sentences, {tokens:,} tokens")
print(f"test: {len(test)} sentences")

# %%
# Words and tags as ids
# ---------------------
# Words are lower-cased. A word seen only once in training is left out of the vocabulary, so
# that it is read as the unknown word (id 1): that way the unknown word's embedding is trained
# on real rare words, and the model has learnt something to say about the unseen words of the
# test set. Id 0 is padding.

vocab = Vocab.build(([w.lower() for w in ws] for ws, _ in train), min_count=2)
tag_names = sorted({t for _, ts in train for t in ts})
tag_id = {t: i for i, t in enumerate(tag_names)}
print(f"{len(vocab)} words in the vocabulary")
print(f"{len(tag_names)} tags: {' '.join(tag_names)}")
assert len(tag_names) == 17  # the universal POS tag set


def encode(sentences):
    """(word ids (N, T), lengths (N,), tag ids (N, T)); padding is id 0,
    its tag -100 (ignored)."""
    T = max(len(ws) for ws, _ in sentences)
    x = torch.zeros(len(sentences), T, dtype=torch.long)
    y = torch.full((len(sentences), T), -100)
    for i, (ws, ts) in enumerate(sentences):
        x[i, : len(ws)] = torch.tensor(vocab.encode(w.lower() for w in ws))
        y[i, : len(ts)] = torch.tensor([tag_id[t] for t in ts])
    return x, torch.tensor([len(ws) for ws, _ in sentences]), y


train_data, dev_data, test_data = encode(train), encode(dev), encode(test)

# %%
# The model and the training
# --------------------------
# A 64-dimensional embedding, a bidirectional LSTM (64 per direction: each word is read with its
# left and its right context) and a linear layer to the 17 tags. The model takes the padded
# batch and its lengths and packs it, so padding never reaches the LSTM.
#
# :func:`rnnkit.fit` takes the data as tensors ``(inputs..., targets)`` and calls
# ``model(words, lengths)``. The targets are integers, so it trains with cross-entropy and reports
# accuracy; padded positions carry ``-100`` and are ignored by both. It keeps the weights of the
# best validation epoch and writes a run folder (checkpoints, ``metrics.jsonl``, plots) to
# ``out``, here a temporary folder; ``threads=1`` runs it on one CPU thread, as the build of this
# site does for every tutorial. ``backend="fused"`` names the engine that runs the LSTM (the
# :doc:`guide <../guide/engines>` lists them); the model is the same on any.

torch.manual_seed(0)
config = ModelConfig(
    "tagger",
    input_size=len(vocab),
    output_size=len(tag_names),
    embedding_dim=64,
    hidden_size=64,
    bidirectional=True,
    dropout=0.2,
    backend="fused",
)
model = Tagger(config)
print(f"{rnnkit.count_parameters(model):,} parameters")

start = time.perf_counter()
history = rnnkit.fit(
    model,
    train_data,
    dev_data,
    test_data=test_data,
    config=rnnkit.TrainConfig(
        epochs=6,
        batch_size=64,
        lr=0.02,
        threads=1,
        out=tempfile.mkdtemp(),
        quiet=True,
    ),
)
print(f"trained in {time.perf_counter() - start:.0f} s")

# %%
# The baseline: each word's most frequent tag
# -------------------------------------------
# For a word seen in training, the tag it had most often; for an unseen word, the most frequent
# open-class tag (a new word is far more often a noun than a determiner).

per_word = {}
for ws, ts in train:
    for w, t in zip(ws, ts, strict=True):
        per_word.setdefault(w.lower(), Counter())[t] += 1
open_class = {"ADJ", "ADV", "INTJ", "NOUN", "PROPN", "VERB"}
overall = Counter(t for _, ts in train for t in ts)
fallback = max(open_class, key=lambda t: overall[t])
baseline = {w: counts.most_common(1)[0][0] for w, counts in per_word.items()}

# %%
# Both on the same test tokens, all 2,077 test sentences:

x_test, lengths_test, y_test = test_data
model.eval()
with torch.no_grad():
    predicted = model(x_test, lengths_test).argmax(-1)  # (N, T)
real = y_test != -100
model_right = (predicted == y_test) & real
base_pred = torch.full_like(y_test, -100)
for i, (ws, _) in enumerate(test):
    base_pred[i, : len(ws)] = torch.tensor(
        [tag_id[baseline.get(w.lower(), fallback)] for w in ws]
    )
base_right = (base_pred == y_test) & real
seen = torch.zeros_like(real)
for i, (ws, _) in enumerate(test):
    seen[i, : len(ws)] = torch.tensor([w.lower() in per_word for w in ws])

model_accuracy = model_right.sum().item() / real.sum().item()
base_accuracy = base_right.sum().item() / real.sum().item()
unseen = real & ~seen
unseen_model = (model_right & unseen).sum().item() / unseen.sum().item()
unseen_base = (base_right & unseen).sum().item() / unseen.sum().item()
print(
    f"test accuracy: tagger {model_accuracy:.2%}, baseline {base_accuracy:.2%}"
)
print(f"on the {unseen.sum().item():,} test tokens unseen in training:")
print(f"  tagger {unseen_model:.2%}, baseline {unseen_base:.2%}")
# the same figure as fit's own evaluation of the test data
assert abs(model_accuracy - history.test["test_accuracy"]) < 1e-6

# %%
# The tagger beats the baseline by more than a point overall, and by more than ten points on the
# words it never saw, where the baseline can only guess one tag and the LSTM reads the context.

assert model_accuracy > base_accuracy + 0.01
assert unseen_model > unseen_base + 0.10

# %%
# A sentence of our own:

sentence = "The old man saw a strange bird in the garden yesterday".split()
with torch.no_grad():
    ids = torch.tensor([vocab.encode(w.lower() for w in sentence)])
    guess = model(ids).argmax(-1)[0]
print(
    " ".join(
        f"{w}/{tag_names[t]}" for w, t in zip(sentence, guess, strict=True)
    )
)

# %%
# The figures: validation accuracy over the epochs against the baseline's, and the test
# accuracy of both for each tag.

per_tag_model = [
    ((model_right & (y_test == k)).sum() / (y_test == k).sum()).item()
    for k in range(17)
]
per_tag_base = [
    ((base_right & (y_test == k)).sum() / (y_test == k).sum()).item()
    for k in range(17)
]
dev_base = np.mean(
    [
        baseline.get(w.lower(), fallback) == t
        for ws, ts in dev
        for w, t in zip(ws, ts, strict=True)
    ]
)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), width_ratios=[1, 2.4])
epochs = range(1, len(history["val_accuracy"]) + 1)
ax1.plot(
    epochs,
    [100 * a for a in history["val_accuracy"]],
    "o-",
    label="tagger (validation)",
)
ax1.axhline(
    100 * dev_base, color="gray", linestyle="--", label="baseline (validation)"
)
ax1.set_xlabel("epoch")
ax1.set_ylabel("token accuracy (%)")
ax1.set_xticks(list(epochs))
ax1.legend()
order = np.argsort(per_tag_model)
at = np.arange(17)
ax2.bar(at - 0.2, [100 * per_tag_model[k] for k in order], 0.4, label="tagger")
ax2.bar(
    at + 0.2,
    [100 * per_tag_base[k] for k in order],
    0.4,
    label="most frequent tag",
)
ax2.set_xticks(at, [tag_names[k] for k in order], rotation=60)
ax2.set_xlabel("universal POS tag")
ax2.set_ylabel("test accuracy (%)")
ax2.legend(loc="upper left")
fig.tight_layout()
assert max(history["val_accuracy"]) > dev_base
