"""Part-of-speech tagging from CoNLL-U files (the UPOS column), seed 002's ``LSTMTagger``.

Words are looked up lower-cased. A word not in the training vocabulary becomes one of a few
unknown-word classes by its shape (capitalised, a number, punctuation, a common suffix), so the
tagger still has a clue; during training, words seen only once are dropped to their class with
probability ``--word-dropout`` so that the classes are learnt.
"""

import argparse
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from rnnkit import train_plots
from rnnkit.data import DataError, Vocab, read_conllu, sample_conllu
from rnnkit.data.readers import _existing, _read_text
from rnnkit.tasks.base import Prepared, Report, Split, Task, forward_all

_SUFFIXES = ("ing", "ed", "ly", "s")
SIGNATURES = (
    ["<unk:num>", "<unk:punct>", "<unk:Cap>"] + [f"<unk:-{s}>" for s in _SUFFIXES] + ["<unk:other>"]
)
IGNORE = -100


def signature(word: str) -> str:
    """The unknown-word class of ``word``."""
    if any(ch.isdigit() for ch in word):
        return "<unk:num>"
    if not any(ch.isalnum() for ch in word):
        return "<unk:punct>"
    if word[0].isupper():
        return "<unk:Cap>"
    for s in _SUFFIXES:
        if word.lower().endswith(s):
            return f"<unk:-{s}>"
    return "<unk:other>"


def encode_words(words: list[str], vocab: Vocab) -> list[int]:
    return [vocab.stoi.get(w.lower(), vocab.stoi[signature(w)]) for w in words]


class TaggerTask(Task):
    name = "tagger"
    help = "part-of-speech tagging from CoNLL-U files (UPOS); token accuracy"
    metric = "accuracy"
    loss_name = "cross-entropy per token"
    variable_length = True
    per_step_targets = True
    defaults: ClassVar[dict] = dict(
        cell="lstm",
        hidden_size=64,
        num_layers=1,
        bidirectional=True,
        dropout=0.1,
        readout="last",
        epochs=30,
        batch_size=8,
        lr=0.01,
        optimizer="adam",
        schedule="onecycle",
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        self.option(
            p, "--train", metavar="CONLLU", help="training sentences (default: the bundled sample)"
        )
        self.option(
            p, "--dev", metavar="CONLLU", help="validation sentences (default: the bundled sample)"
        )
        self.option(
            p, "--test", metavar="CONLLU", help="test sentences (default: the bundled sample)"
        )
        self.option(
            p, "--embedding-dim", type=int, default=64, help="word embedding size (default 64)"
        )
        self.option(
            p,
            "--word-dropout",
            type=float,
            default=0.3,
            help="chance that a word seen once in training is replaced by its unknown-word class "
            "(default 0.3)",
        )

    def data_config(self, args: argparse.Namespace) -> dict:
        given = [args.train, args.dev, args.test]
        if any(given) and not all(given):
            raise DataError(
                "tagger: give all of --train, --dev and --test, or none for the bundled sample"
            )
        paths = {
            k: str(Path(v).resolve()) if v else str(sample_conllu(k))
            for k, v in zip(("train", "dev", "test"), given, strict=True)
        }
        if not 0 <= args.word_dropout < 1:
            raise DataError(f"--word-dropout must be in [0, 1); got {args.word_dropout}")
        return {**paths, "embedding_dim": args.embedding_dim, "word_dropout": args.word_dropout}

    def _tensors(self, sentences: list[tuple[list[str], list[str]]], vocab: Vocab) -> Split:
        tags = {t: i for i, t in enumerate(self.preprocessing["tags"])}
        lengths = torch.tensor([len(w) for w, _ in sentences])
        x = torch.zeros(len(sentences), int(lengths.max()), dtype=torch.long)
        y = torch.full(x.shape, IGNORE, dtype=torch.long)
        for i, (words, labels) in enumerate(sentences):
            x[i, : len(words)] = torch.tensor(encode_words(words, vocab))
            y[i, : len(words)] = torch.tensor([tags.get(t, IGNORE) for t in labels])
        return Split(x, lengths, y)

    def prepare(self, data: dict) -> Prepared:
        train, dev, test = (read_conllu(data[k]) for k in ("train", "dev", "test"))
        words = [[w.lower() for w in ws] for ws, _ in train]
        vocab = Vocab(SIGNATURES + Vocab.build(words).itos[2:])
        tags = sorted({t for _, ts in train for t in ts})
        for name, part in (("dev", dev), ("test", test)):
            unseen = sorted({t for _, ts in part for t in ts} - set(tags))
            if unseen:
                raise DataError(
                    f"the {name} file {data[name]!r} uses UPOS tags the training file lacks: "
                    f"{', '.join(unseen)}"
                )
        self.preprocessing = {"words": vocab.itos, "tags": tags}
        counts: dict[str, int] = {}
        for ws in words:
            for w in ws:
                counts[w] = counts.get(w, 0) + 1
        # Per word id: the id of its unknown-word class when it was seen once, else itself.
        self._rare_to = torch.arange(len(vocab))
        for ws, _ in train:
            for w in ws:
                if counts[w.lower()] == 1:
                    self._rare_to[vocab.stoi[w.lower()]] = vocab.stoi[signature(w)]
        self._word_dropout = data["word_dropout"]
        self._vocab = vocab
        splits = [self._tensors(s, vocab) for s in (train, dev, test)]
        return Prepared(
            *splits,
            {
                "kind": "tagger",
                "input_size": len(vocab),
                "output_size": len(tags),
                "embedding_dim": data["embedding_dim"],
            },
            self.preprocessing,
        )

    def train_inputs(self, x: Tensor) -> Tensor:
        if not self._word_dropout:
            return x
        rare = self._rare_to.to(x.device)[x]
        drop = torch.rand(x.shape, device=x.device) < self._word_dropout
        return torch.where(drop, rare, x)

    def scores(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mask = y != IGNORE
        loss = nn.functional.cross_entropy(
            out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=IGNORE, reduction="sum"
        )
        correct = ((out.argmax(-1) == y) & mask).sum()
        return loss, mask.sum().float(), correct.float()

    def report(self, out: Tensor, split: Split) -> Report:
        tags = self.preprocessing["tags"]
        mask = split.y != IGNORE
        pred = out.argmax(-1)
        right = (pred == split.y) & mask
        unknown = mask & (split.x < len(SIGNATURES) + 2)
        matrix = np.zeros((len(tags), len(tags)), dtype=np.int64)
        np.add.at(matrix, (split.y[mask].numpy(), pred[mask].numpy()), 1)
        loss, count, _ = self.scores(out, split.y)
        metrics = {
            "test_accuracy": float(right.sum() / mask.sum()),
            "test_loss": float(loss / count),
            "test_tokens": int(mask.sum()),
            "test_sentences": len(split),
            "test_unknown_tokens": int(unknown.sum()),
            "test_unknown_accuracy": float((right & unknown).sum() / unknown.sum())
            if unknown.any()
            else None,
        }
        return Report(metrics, {"confusion": matrix})

    def plots(self, report: Report, run_dir: Path) -> list[str]:
        acc = report.metrics["test_accuracy"]
        train_plots.confusion(
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
                    rows.append(k - 1)
            token_words = [[lines[i].split("\t")[1] for i in s] for s in sentences]
        else:
            token_words = [line.split() for line in lines if line.strip()]
        if not token_words:
            raise DataError(f"input file {str(p)!r} holds no sentences to tag")
        vocab = Vocab(self.preprocessing["words"][2:])
        lengths = torch.tensor([len(w) for w in token_words])
        x = torch.zeros(len(token_words), int(lengths.max()), dtype=torch.long)
        for i, ws in enumerate(token_words):
            x[i, : len(ws)] = torch.tensor(encode_words(ws, vocab))
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
