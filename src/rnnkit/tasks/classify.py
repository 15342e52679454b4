"""Sequence classification: handwritten digits, sequential MNIST and char-level text classes."""

import argparse
import csv
import io
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from rnnkit.data import DataError, Vocab, load_digits, load_mnist, read_idx, read_labelled_text
from rnnkit.data.readers import check_finite_images, check_pixels, parse_numbers, read_lines
from rnnkit.tasks.base import Prepared, Split, Task, forward_all
from rnnkit.train import plots as draw
from rnnkit.train.objective import Report


def _split(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> Split:
    xt = torch.as_tensor(x[idx])
    return Split(
        xt, torch.full((len(idx),), xt.shape[1], dtype=torch.long), torch.as_tensor(y[idx])
    )


def _confusion(pred: np.ndarray, true: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros((n, n), dtype=np.int64)
    np.add.at(m, (true, pred), 1)
    return m


def _rows_csv(rows: list[tuple], header: tuple) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


class ClassificationTask(Task):
    metric = "accuracy"

    def report(self, out: Tensor, y: Tensor, split: Split) -> Report:
        classes = self.preprocessing["classes"]
        pred = out.argmax(-1).numpy()
        true = split.y.numpy()
        loss = nn.functional.cross_entropy(out, split.y).item()
        matrix = _confusion(pred, true, len(classes))
        per_class = {
            c: float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None
            for i, c in enumerate(classes)
        }
        metrics = {
            "test_accuracy": float((pred == true).mean()),
            "test_loss": loss,
            "test_examples": len(true),
            "test_errors": int((pred != true).sum()),
            "test_accuracy_per_class": per_class,
        }
        return Report(metrics, {"confusion": matrix})

    def plots(self, report: Report, run_dir: Path) -> list[str]:
        acc = report.metrics["test_accuracy"]
        draw.confusion(
            report.arrays["confusion"],
            list(self.preprocessing["classes"]),
            f"{self.name}: test confusion matrix (accuracy {100 * acc:.2f}%)",
            run_dir / "confusion.png",
        )
        return ["confusion.png"]

    def _label_rows(self, out: Tensor) -> list[tuple]:
        classes = self.preprocessing["classes"]
        prob = out.softmax(-1)
        p, k = prob.max(-1)
        return [
            (i, classes[int(j)], f"{float(q):.4f}")
            for i, (j, q) in enumerate(zip(k, p, strict=True))
        ]


class DigitsTask(ClassificationTask):
    name = "digits"
    help = "the 1,797 8x8 handwritten digits (bundled), read as 8 steps of 8 pixels"
    train: ClassVar[dict] = dict(epochs=30, lr=0.01)
    model: ClassVar[dict] = dict(hidden_size=128)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        self.option(
            p,
            "--data",
            metavar="CSV",
            help="a digits CSV of 64 pixel values (0..16) and the label per row; "
            "default: the bundled copy of scikit-learn's digits",
        )

    def data_config(self, o: dict) -> dict:
        return {
            "data": str(Path(o["data"]).resolve()) if o["data"] else None,
            "split": [0.7, 0.1, 0.2],
            "split_seed": 0,
        }

    def prepare(self, data: dict) -> Prepared:
        from rnnkit.data import stratified_split

        x, y = load_digits(data["data"])
        if len(np.unique(y)) < 2:
            raise DataError(
                f"digits file {data['data']!r}: every row has the label {y[0]}; a classifier "
                "needs at least two labels"
            )
        tr, va, te = stratified_split(y, tuple(data["split"]), data["split_seed"])
        if not (len(tr) and len(va) and len(te)):
            raise DataError(
                f"digits file {data['data']!r} holds {len(y)} rows, too few to split "
                f"70/10/20 into train, validation and test ({len(tr)} / {len(va)} / {len(te)}); "
                "give at least 10 rows, or a few of each label"
            )
        self.preprocessing = {"classes": [str(c) for c in range(10)], "pixel_max": 16.0}
        return Prepared(
            _split(x, y, tr),
            _split(x, y, va),
            _split(x, y, te),
            {"kind": "classifier", "input_size": 8, "output_size": 10},
            self.preprocessing,
        )

    def predict(self, model: nn.Module, path: Path, device: torch.device, batch_size: int) -> str:
        rows = []
        for k, line in enumerate(read_lines(path, "digits CSV"), 1):
            fields = line.split(",")
            # A trailing comma (a spreadsheet's export) is no value; an empty field inside is.
            while fields and not fields[-1].strip():
                fields.pop()
            if len(fields) not in (64, 65):
                raise DataError(
                    f"digits CSV {str(path)!r}, line {k}: expected 64 pixel values (0..16), "
                    f"optionally followed by the label; found {len(fields)} values"
                )
            values = parse_numbers(fields[:64])
            if values is None:
                if k == 1:
                    continue
                j = next(j for j, f in enumerate(fields) if parse_numbers([f]) is None)
                raise DataError(
                    f"digits CSV {str(path)!r}, line {k}: value {j + 1} is {fields[j].strip()!r}, "
                    "expected a number"
                )
            check_pixels(values, fields, f"digits CSV {str(path)!r}, line {k}")
            rows.append(values)
        if not rows:
            raise DataError(f"digits CSV {str(path)!r} holds no rows of pixels")
        x = torch.tensor(rows, dtype=torch.float32).view(-1, 8, 8) / self.preprocessing["pixel_max"]
        out = forward_all(model, x, torch.full((len(x),), 8), False, device, batch_size)
        return _rows_csv(self._label_rows(out), ("row", "label", "probability"))


class MnistTask(ClassificationTask):
    name = "mnist"
    help = "sequential MNIST: 28 steps of 28 pixels, from IDX files in a folder you name"
    train: ClassVar[dict] = dict(epochs=5, batch_size=128, lr=0.005)
    model: ClassVar[dict] = dict(hidden_size=128, readout="hn")

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        self.option(
            p,
            "--data",
            metavar="DIR",
            required=False,
            help="folder with train-images-idx3-ubyte, train-labels-idx1-ubyte, "
            "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each may end in .gz); "
            "nothing is downloaded",
        )
        self.option(
            p,
            "--val-fraction",
            type=float,
            default=0.1,
            help="share of the training images held out for validation (default 0.1)",
        )

    def data_config(self, o: dict) -> dict:
        if not o["data"]:
            raise DataError("mnist needs --data DIR, the folder holding the MNIST IDX files")
        if not 0 < o["val_fraction"] < 1:
            raise DataError(f"--val-fraction must be between 0 and 1; got {o['val_fraction']}")
        return {
            "data": str(Path(o["data"]).resolve()),
            "val_fraction": o["val_fraction"],
            "split_seed": 0,
        }

    def prepare(self, data: dict) -> Prepared:
        from rnnkit.data import stratified_split

        d = load_mnist(data["data"])
        x, y = d["train_images"], d["train_labels"]
        f = data["val_fraction"]
        tr, va, _ = stratified_split(y, (1 - f, f, 0.0), data["split_seed"])
        classes = int(max(y.max(), d["test_labels"].max())) + 1
        self.preprocessing = {
            "classes": [str(c) for c in range(classes)],
            "image_shape": list(x.shape[1:]),
        }
        all_test = np.arange(len(d["test_labels"]))
        return Prepared(
            _split(x, y, tr),
            _split(x, y, va),
            _split(d["test_images"], d["test_labels"], all_test),
            {"kind": "classifier", "input_size": int(x.shape[2]), "output_size": classes},
            self.preprocessing,
        )

    def predict(self, model: nn.Module, path: Path, device: torch.device, batch_size: int) -> str:
        images = read_idx(path)
        want = tuple(self.preprocessing["image_shape"])
        if images.ndim != 3 or images.shape[1:] != want:
            raise DataError(
                f"IDX file {str(path)!r}: expected images of shape (N, {want[0]}, {want[1]}) "
                f"like the training images; found {images.shape}"
            )
        if len(images) == 0:
            raise DataError(f"IDX file {str(path)!r} holds no images (its header says 0)")
        check_finite_images(images, path, "IDX file")
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        x = torch.as_tensor(images.astype(np.float32) / scale)
        out = forward_all(model, x, torch.full((len(x),), x.shape[1]), False, device, batch_size)
        return _rows_csv(self._label_rows(out), ("image", "label", "probability"))


class TextClassificationTask(ClassificationTask):
    name = "textclf"
    help = "char-level classification of short texts from a TSV of label<TAB>text"
    variable_length = True
    train: ClassVar[dict] = dict(epochs=20, lr=0.005)
    model: ClassVar[dict] = dict(
        cell="gru", hidden_size=128, bidirectional=True, dropout=0.1, readout="hn"
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        self.option(p, "--data", metavar="TSV", help="label<TAB>text per line (required)")
        self.option(p, "--dev", metavar="TSV", help="validation examples; default: 10%% of --data")
        self.option(p, "--test", metavar="TSV", help="test examples; default: 10%% of --data")
        self.option(
            p, "--max-chars", type=int, default=200, help="longer texts are cut (default 200)"
        )
        self.option(
            p, "--embedding-dim", type=int, default=32, help="character embedding size (default 32)"
        )

    def data_config(self, o: dict) -> dict:
        if not o["data"]:
            raise DataError("textclf needs --data TSV, a file of label<TAB>text lines")
        if o["max_chars"] < 1:
            raise DataError(f"--max-chars must be at least 1; got {o['max_chars']}")

        def path(p: str | None) -> str | None:
            return str(Path(p).resolve()) if p else None

        return {
            "data": path(o["data"]),
            "dev": path(o["dev"]),
            "test": path(o["test"]),
            "max_chars": o["max_chars"],
            "embedding_dim": o["embedding_dim"],
            "split_seed": 0,
        }

    def _encode(self, texts: list[str], vocab: Vocab) -> tuple[Tensor, Tensor]:
        cut = [t[: self.preprocessing["max_chars"]] for t in texts]
        lengths = torch.tensor([max(len(t), 1) for t in cut])
        x = torch.zeros(len(cut), int(lengths.max()), dtype=torch.long)
        for i, t in enumerate(cut):
            ids = vocab.encode(t) or [1]
            x[i, : len(ids)] = torch.tensor(ids)
        return x, lengths

    def prepare(self, data: dict) -> Prepared:
        from rnnkit.data import stratified_split

        labels, texts = read_labelled_text(data["data"])
        parts = {}
        rest_labels = np.array(labels)
        need = [data["dev"] is None, data["test"] is None]
        if any(need):
            fv = 0.1 if need[0] else 0.0
            ft = 0.1 if need[1] else 0.0
            tr, va, te = stratified_split(rest_labels, (1 - fv - ft, fv, ft), data["split_seed"])
            parts["train"] = ([labels[i] for i in tr], [texts[i] for i in tr])
            if need[0]:
                parts["dev"] = ([labels[i] for i in va], [texts[i] for i in va])
            if need[1]:
                parts["test"] = ([labels[i] for i in te], [texts[i] for i in te])
        else:
            parts["train"] = (labels, texts)
        for key in ("dev", "test"):
            if data[key] is not None:
                parts[key] = read_labelled_text(data[key])
        classes = sorted(set(parts["train"][0]))
        if len(classes) < 2:
            raise DataError(
                f"TSV file {data['data']!r}: every training example has the label "
                f"{classes[0]!r}; a classifier needs at least two labels"
            )
        for key in ("dev", "test"):
            unseen = sorted(set(parts[key][0]) - set(classes))
            if unseen:
                raise DataError(
                    f"the {key} examples have labels the training examples lack: "
                    f"{', '.join(unseen[:10])}"
                )
            if not parts[key][0]:
                raise DataError(
                    f"no {key} examples: --data holds too few examples per label to hold 10% out; "
                    f"give --{key} TSV"
                )
        vocab = Vocab.build(t[: data["max_chars"]] for t in parts["train"][1])
        self.preprocessing = {
            "classes": classes,
            "chars": vocab.itos,
            "max_chars": data["max_chars"],
        }
        index = {c: i for i, c in enumerate(classes)}
        splits = []
        for key in ("train", "dev", "test"):
            lab, txt = parts[key]
            x, lengths = self._encode(txt, vocab)
            splits.append(Split(x, lengths, torch.tensor([index[c] for c in lab])))
        return Prepared(
            *splits,
            {
                "kind": "charrnn",
                "input_size": len(vocab),
                "output_size": len(classes),
                "embedding_dim": data["embedding_dim"],
            },
            self.preprocessing,
        )

    def predict(self, model: nn.Module, path: Path, device: torch.device, batch_size: int) -> str:
        texts = read_lines(path, "text file")
        if not texts:
            raise DataError(f"text file {str(path)!r} holds no lines to classify")
        vocab = Vocab(self.preprocessing["chars"][2:])
        x, lengths = self._encode(texts, vocab)
        out = forward_all(model, x, lengths, True, device, batch_size)
        rows = [(*r, t) for r, t in zip(self._label_rows(out), texts, strict=True)]
        return _rows_csv(rows, ("line", "label", "probability", "text"))
