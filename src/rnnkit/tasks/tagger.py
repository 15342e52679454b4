"""Part-of-speech tagging from CoNLL-U files (the UPOS column); by default the bundled UD English
EWT treebank.

Each token is its word, looked up lower-cased in the training vocabulary, and its spelling in the
original case, read character by character by the model's :class:`~rnnkit.models.CharEncoder`:
a word never seen in training (a name, a number, a rare inflection) is unknown to the word
embedding but still has a spelling. During training, words are replaced by the unknown word at
random, rare ones more often (``--word-dropout``), so that the model learns to lean on spelling.

A batch is ``(B, T, 1 + C)`` integers: per token its word id, then ``C`` character ids (a word
longer than ``C`` keeps its first and last ``C / 2`` characters, where prefixes and suffixes are).
Training batches group sentences of similar length; the dev and test parts are kept sorted by
length (``Split.index`` holds each sentence's place in its file) so evaluation batches are too.

The report gives token accuracy, the accuracy on words unseen in training, and the same two for
the most-frequent-tag baseline: each word's most frequent tag in training, and for an unseen word
the most frequent open-class tag.
"""

import argparse
import re
from collections import Counter
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from rnnkit.data import UNK, DataError, Vocab, ewt_conllu, read_conllu
from rnnkit.data.readers import _existing, _read_text
from rnnkit.tasks.base import Prepared, Split, Task, forward_all
from rnnkit.train import plots as draw
from rnnkit.train.objective import IGNORE, Report

# Characters of a word the encoder reads: the first and last half of this for longer words.
MAX_CHARS = 24
# The open word classes of Universal Dependencies: where an unseen word most likely belongs.
OPEN_CLASS = ("NOUN", "PROPN", "VERB", "ADJ", "ADV", "INTJ")
# Training batches are sorted by length within pools of this many batches.
POOL_BATCHES = 50


def spell(word: str, chars: dict[str, int], max_chars: int) -> list[int]:
    """The character ids of ``word``; a longer word keeps its first and last ``max_chars // 2``."""
    if len(word) > max_chars:
        half = max_chars // 2
        word = word[:half] + word[len(word) - (max_chars - half) :]
    return [chars.get(ch, UNK) for ch in word]


def encode_sentences(words: list[list[str]], preprocessing: dict) -> tuple[Tensor, Tensor]:
    """``(x (N, T, 1 + C) int32, lengths (N,))`` of tokenised sentences: per token the id of the
    lower-cased word, then the character ids of its spelling, zero-padded."""
    vocab = {w: i for i, w in enumerate(preprocessing["words"])}
    chars = {c: i for i, c in enumerate(preprocessing["chars"])}
    max_chars = preprocessing["max_chars"]
    lengths = torch.tensor([len(ws) for ws in words])
    C = min(max_chars, max(len(w) for ws in words for w in ws))
    x = np.zeros((len(words), int(lengths.max()), 1 + C), dtype=np.int32)
    for i, ws in enumerate(words):
        for t, w in enumerate(ws):
            x[i, t, 0] = vocab.get(w.lower(), UNK)
            ids = spell(w, chars, max_chars)
            x[i, t, 1 : 1 + len(ids)] = ids
    return torch.from_numpy(x), lengths


class TaggerTask(Task):
    name = "tagger"
    help = "part-of-speech tagging from CoNLL-U files (UPOS); token accuracy"
    metric = "accuracy"
    loss_name = "cross-entropy per token"
    variable_length = True
    per_step_targets = True
    train: ClassVar[dict] = dict(epochs=16, batch_size=64, lr=0.006)
    model: ClassVar[dict] = dict(hidden_size=128, bidirectional=True, dropout=0.33, backend="fused")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        for part in ("train", "dev", "test"):
            self.option(
                p,
                f"--{part}",
                metavar="CONLLU",
                help=f"{part} sentences, CoNLL-U, plain or .gz (default: the bundled UD English "
                f"EWT {part} file)",
            )
        self.option(
            p, "--embedding-dim", type=int, default=100, help="word embedding size (default 100)"
        )
        self.option(
            p,
            "--char-embedding-dim",
            type=int,
            default=32,
            help="character embedding size of the spelling encoder (default 32)",
        )
        self.option(
            p,
            "--char-hidden-size",
            type=int,
            default=64,
            help="hidden size per direction of the bidirectional spelling encoder; a word's "
            "spelling vector has twice this (default 64)",
        )
        self.option(
            p,
            "--word-dropout",
            type=float,
            default=0.25,
            help="chance that a word seen once in training is read as the unknown word in a "
            "training batch (its spelling stays); a word seen c times is dropped with chance "
            "a / (a + c) for the same a (default 0.25)",
        )

    def data_config(self, o: dict) -> dict:
        given = [o["train"], o["dev"], o["test"]]
        if any(given) and not all(given):
            raise DataError(
                "tagger: give all of --train, --dev and --test, or none for the bundled UD "
                "English EWT treebank"
            )
        paths = {
            k: str(Path(v).resolve()) if v else str(ewt_conllu(k))
            for k, v in zip(("train", "dev", "test"), given, strict=True)
        }
        if not 0 <= o["word_dropout"] < 1:
            raise DataError(f"--word-dropout must be in [0, 1); got {o['word_dropout']}")
        for flag, value in (
            ("--char-embedding-dim", o["char_embedding_dim"]),
            ("--char-hidden-size", o["char_hidden_size"]),
        ):
            if value < 1:
                raise DataError(f"{flag} must be a positive integer; got {value}")
        return {
            **paths,
            "embedding_dim": o["embedding_dim"],
            "char_embedding_dim": o["char_embedding_dim"],
            "char_hidden_size": o["char_hidden_size"],
            "word_dropout": o["word_dropout"],
        }

    def _split(self, sentences: list[tuple[list[str], list[str]]], by_length: bool) -> Split:
        order = list(range(len(sentences)))
        if by_length:
            order.sort(key=lambda i: len(sentences[i][0]))
        x, lengths = encode_sentences([sentences[i][0] for i in order], self.preprocessing)
        tags = {t: k for k, t in enumerate(self.preprocessing["tags"])}
        y = torch.full(x.shape[:2], IGNORE, dtype=torch.long)
        for row, i in enumerate(order):
            labels = sentences[i][1]
            y[row, : len(labels)] = torch.tensor([tags.get(t, IGNORE) for t in labels])
        return Split(x, lengths, y, index=torch.tensor(order))

    def prepare(self, data: dict) -> Prepared:
        train, dev, test = (read_conllu(data[k]) for k in ("train", "dev", "test"))
        tags = sorted({t for _, ts in train for t in ts})
        for name, part in (("dev", dev), ("test", test)):
            unseen = sorted({t for _, ts in part for t in ts} - set(tags))
            if unseen:
                raise DataError(
                    f"the {name} file {data[name]!r} uses UPOS tags the training file lacks: "
                    f"{', '.join(unseen)}"
                )
        vocab = Vocab.build([w.lower() for w in ws] for ws, _ in train)
        chars = Vocab.build(w for ws, _ in train for w in ws)
        self.preprocessing = {
            "words": vocab.itos,
            "chars": chars.itos,
            "tags": tags,
            "max_chars": MAX_CHARS,
        }
        # Word dropout: a / (a + count), so that a word seen once is dropped with the given chance.
        counts = Counter(w.lower() for ws, _ in train for w in ws)
        p = data["word_dropout"]
        a = p / (1 - p)
        seen = torch.tensor([counts.get(w, 0) for w in vocab.itos], dtype=torch.float)
        self._drop = torch.where(seen > 0, a / (a + seen), torch.zeros(()))
        self._dropping = p > 0
        self._baseline = self._most_frequent_tags(train, vocab, tags)
        splits = [self._split(train, False), self._split(dev, True), self._split(test, True)]
        return Prepared(
            *splits,
            {
                "kind": "tagger",
                "input_size": len(vocab),
                "output_size": len(tags),
                "embedding_dim": data["embedding_dim"],
                "char_vocab_size": len(chars),
                "char_embedding_dim": data["char_embedding_dim"],
                "char_hidden_size": data["char_hidden_size"],
            },
            self.preprocessing,
        )

    @staticmethod
    def _most_frequent_tags(
        train: list[tuple[list[str], list[str]]], vocab: Vocab, tags: list[str]
    ) -> Tensor:
        """Per word id, the baseline's tag: the word's most frequent tag in training (ties to the
        tag more frequent overall); for the unknown word, the most frequent open-class tag."""
        overall = Counter(t for _, ts in train for t in ts)
        rank = {t: k for k, t in enumerate(sorted(tags, key=lambda t: (-overall[t], t)))}
        per_word: dict[str, Counter] = {}
        for ws, ts in train:
            for w, t in zip(ws, ts, strict=True):
                per_word.setdefault(w.lower(), Counter())[t] += 1
        index = {t: k for k, t in enumerate(tags)}
        open_tags = [t for t in tags if t in OPEN_CLASS] or tags
        fallback = index[min(open_tags, key=lambda t: rank[t])]
        table = torch.full((len(vocab),), fallback, dtype=torch.long)
        for w, c in per_word.items():
            table[vocab.stoi[w]] = index[min(c, key=lambda t: (-c[t], rank[t]))]
        return table

    def batches(self, order: Tensor, lengths: Tensor, batch_size: int, seed: int) -> list[Tensor]:
        # Sentences of similar length share a batch (fewer time steps, less padding); sorting
        # within pools of the shuffled order, then shuffling the batches, keeps epochs random.
        pool = batch_size * POOL_BATCHES
        out: list[Tensor] = []
        for i in range(0, len(order), pool):
            part = order[i : i + pool]
            part = part[torch.argsort(lengths[part], stable=True)]
            out += list(part.split(batch_size))
        shuffle = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed))
        return [out[k] for k in shuffle]

    def train_inputs(self, x: Tensor) -> Tensor:
        if not self._dropping:
            return x
        words = x[..., 0].long()
        drop = torch.rand(words.shape, device=x.device) < self._drop.to(x.device)[words]
        x = x.clone()
        x[..., 0] = torch.where(drop, torch.full_like(x[..., 0], UNK), x[..., 0])
        return x

    def report(self, out: Tensor, y: Tensor, split: Split) -> Report:
        tags = self.preprocessing["tags"]
        mask = split.y != IGNORE
        words = split.x[..., 0].long()
        pred = out.argmax(-1)
        right = (pred == split.y) & mask
        unknown = mask & (words == UNK)
        base_right = (self._baseline[words] == split.y) & mask
        matrix = np.zeros((len(tags), len(tags)), dtype=np.int64)
        np.add.at(matrix, (split.y[mask].numpy(), pred[mask].numpy()), 1)
        loss, count, _ = self.scores(out, split.y)

        def share(hits: Tensor, of: Tensor) -> float | None:
            return float((hits & of).sum() / of.sum()) if of.any() else None

        metrics = {
            "test_accuracy": share(right, mask),
            "test_unknown_accuracy": share(right, unknown),
            "test_baseline_accuracy": share(base_right, mask),
            "test_baseline_unknown_accuracy": share(base_right, unknown),
            "test_loss": float(loss / count),
            "test_tokens": int(mask.sum()),
            "test_sentences": len(split),
            "test_unknown_tokens": int(unknown.sum()),
        }
        return Report(metrics, {"confusion": matrix})

    def plots(self, report: Report, run_dir: Path) -> list[str]:
        acc = report.metrics["test_accuracy"]
        draw.confusion(
            report.arrays["confusion"],
            list(self.preprocessing["tags"]),
            f"tagger: test confusion matrix of UPOS tags (token accuracy {100 * acc:.2f}%)",
            run_dir / "confusion.png",
        )
        return ["confusion.png"]

    def predict(self, model: nn.Module, path: Path, device: torch.device, batch_size: int) -> str:
        """CoNLL-U in, CoNLL-U out with the UPOS column filled; or plain text, one sentence per
        line split at spaces, out as ``ID FORM UPOS`` lines per sentence."""
        p = _existing(path, "input file")
        text = _read_text(p, "input file")
        lines = text.splitlines()
        conllu = any(len(line.split("\t")) == 10 for line in lines)
        if conllu:
            sentences, rows = [], []
            for k, line in enumerate([*lines, ""], 1):
                cols = line.split("\t")
                if not line.strip():
                    if rows:
                        sentences.append(rows)
                        rows = []
                elif not line.startswith("#") and len(cols) != 10:
                    raise DataError(
                        f"CoNLL-U file {str(p)!r}, line {k}: expected 10 tab-separated columns, "
                        f"found {len(cols)}"
                    )
                elif not line.startswith("#") and re.fullmatch(r"\d+", cols[0]):
                    if not cols[1]:
                        raise DataError(
                            f"CoNLL-U file {str(p)!r}, line {k}: the FORM column is empty"
                        )
                    rows.append(k - 1)
            token_words = [[lines[i].split("\t")[1] for i in s] for s in sentences]
        else:
            token_words = [line.split() for line in lines if line.strip()]
        if not token_words:
            raise DataError(f"input file {str(p)!r} holds no sentences to tag")
        x, lengths = encode_sentences(token_words, self.preprocessing)
        out = forward_all(model, x, lengths, True, device, batch_size)
        tags = [
            [self.preprocessing["tags"][int(k)] for k in out[i, : len(ws)].argmax(-1)]
            for i, ws in enumerate(token_words)
        ]
        if conllu:
            lines = list(lines)
            for rows, ts in zip(sentences, tags, strict=True):
                for i, t in zip(rows, ts, strict=True):
                    cols = lines[i].split("\t")
                    cols[3] = t
                    lines[i] = "\t".join(cols)
            return "\n".join(lines) + "\n"
        out_lines = []
        for ws, ts in zip(token_words, tags, strict=True):
            out_lines += [
                *(f"{i}\t{w}\t{t}" for i, (w, t) in enumerate(zip(ws, ts, strict=True), 1)),
                "",
            ]
        return "\n".join(out_lines)
