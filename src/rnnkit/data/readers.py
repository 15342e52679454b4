"""Readers for the bundled data and the user's files: digits, IDX (MNIST), CSV, CoNLL-U, TSV."""

import csv
import datetime
import gzip
import math
import os
import struct
import zlib
from importlib import resources
from pathlib import Path

import numpy as np

from rnnkit.data.errors import DataError

_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}


def _bundled(name: str) -> Path:
    return Path(str(resources.files("rnnkit.data").joinpath(name)))


def _existing(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} {str(p)!r} does not exist")
    if p.is_dir():
        raise DataError(f"{what} {str(p)!r} is a folder; expected a file")
    return p


def _read_bytes(path: Path, what: str) -> bytes:
    """The file's bytes, gunzipped when it is gzip (by content, not by name)."""
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise DataError(f"{what} {str(path)!r} is a truncated or corrupt gzip file ({e})") from None


def _read_text(path: Path, what: str) -> str:
    data = _read_bytes(path, what)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{what} {str(path)!r}, line {line}: not UTF-8 text ({e.reason})") from None


def load_digits(path: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digits as ``(images (N, 8, 8) float32 in [0, 1], labels (N,) int64)``.

    Each image is read row by row: 8 steps of 8 features. ``path`` defaults to the bundled copy
    of scikit-learn's ``digits.csv.gz`` (64 pixel values of 0..16, then the label, per row).
    """
    p = _existing(path, "digits file") if path is not None else _bundled("digits.csv.gz")
    rows = []
    for k, line in enumerate(_read_text(p, "digits file").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(",")
        if len(fields) != 65:
            raise DataError(
                f"digits file {str(p)!r}, line {k}: expected 65 comma-separated values "
                f"(64 pixels and the label), found {len(fields)}"
            )
        values = parse_numbers(fields)
        if values is None:
            if not rows and not any(_is_number(f) for f in fields):
                continue  # a header line
            j = next(j for j, f in enumerate(fields) if not _is_number(f))
            raise DataError(
                f"digits file {str(p)!r}, line {k}: value {j + 1} is {fields[j].strip()!r}, "
                "expected a number"
            )
        check_pixels(values[:64], fields, f"digits file {str(p)!r}, line {k}")
        label = values[64]
        if not (math.isfinite(label) and label == int(label) and 0 <= label <= 9):
            raise DataError(
                f"digits file {str(p)!r}, line {k}: the label is {fields[64].strip()!r}; "
                "expected a whole number from 0 to 9"
            )
        rows.append(values)
    if not rows:
        raise DataError(f"digits file {str(p)!r} holds no rows")
    table = np.asarray(rows, dtype=np.float64)
    images = (table[:, :64] / 16.0).reshape(-1, 8, 8)
    return images.astype(np.float32), table[:, 64].astype(np.int64)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_numbers(fields: list[str]) -> list[float] | None:
    """The fields as floats, or None when one is not a number."""
    try:
        return [float(v) for v in fields]
    except ValueError:
        return None


# The digits' pixels are counts of 0..16 set pixels in 4x4 blocks of the scanned 32x32 bitmap.
DIGITS_PIXEL_MAX = 16.0


def check_pixels(values: list[float], fields: list[str], where: str) -> None:
    """Refuse a digits pixel that is not a number from 0 to 16, naming it."""
    for j, v in enumerate(values):
        if not 0 <= v <= DIGITS_PIXEL_MAX:
            raise DataError(
                f"{where}: pixel {j + 1} is {fields[j].strip()!r}; every pixel must be a number "
                "from 0 to 16"
            )


def check_finite_images(images: np.ndarray, path: Path, what: str) -> None:
    """Refuse an image array holding NaN, infinity or a value beyond float32 (which the model
    reads; it would become infinity), naming the first such image and value."""
    if images.dtype.kind != "f":
        return
    with np.errstate(invalid="ignore"):
        fits = np.abs(images.reshape(len(images), -1)) <= np.finfo(np.float32).max
    bad = ~fits.all(axis=1)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        value = images[i][~fits[i].reshape(images[i].shape)].flat[0]
        raise DataError(
            f"{what} {str(path)!r}, image {i} (0-based): holds the pixel value {value}; "
            "every pixel must be a finite number within float32's range"
        )


def check_labels(labels: np.ndarray, path: Path) -> None:
    """Refuse labels that are not whole numbers >= 0, naming the first bad one."""
    if labels.dtype.kind == "u":
        return
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(labels) | (labels < 0) | (labels >= 2**31) | (labels != np.round(labels))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"IDX file {str(path)!r}, label {i} (0-based): {labels[i]}; a label must be a whole "
            "number, 0 or more"
        )


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (MNIST's format), plain or gzipped, as a numpy array of its shape and type."""
    p = _existing(path, "IDX file")
    data = _read_bytes(p, "IDX file")
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES:
        raise DataError(
            f"IDX file {str(p)!r} does not start with an IDX header (two zero bytes, a type code "
            f"of 0x08-0x0E, the number of dimensions); found {data[:4].hex(' ') or 'an empty file'}"
        )
    dtype, ndim = _IDX_TYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"IDX file {str(p)!r}: header promises {ndim} dimensions but is cut short")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"IDX file {str(p)!r}: header promises shape {tuple(shape)} = {expected:,} bytes of "
            f"data, but the file holds {len(data) - header:,} (truncated or not an IDX file?)"
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file (gzipped when ``path`` ends in ``.gz``)."""
    a = np.asarray(array)
    code = _IDX_CODES.get(a.dtype.newbyteorder("="))
    if code is None:
        raise ValueError(
            f"write_idx: IDX has no type for {a.dtype}; use uint8, int8/16/32, float32/64"
        )
    body = bytes([0, 0, code, a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    body += a.astype(_IDX_TYPES[code]).tobytes()
    p = Path(path)
    p.write_bytes(gzip.compress(body) if p.suffix == ".gz" else body)


_MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def find_mnist_file(folder: Path, role: str) -> Path | None:
    for stem in _MNIST_FILES[role]:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def load_mnist(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """MNIST (or any IDX set laid out like it) from ``folder``, nothing downloaded.

    Looks for ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
    and ``t10k-labels-idx1-ubyte``, each plain or ``.gz`` (a ``.`` before ``idx`` works too).
    Returns ``train_images`` / ``test_images`` ``(N, rows, cols)`` float32 in [0, 1] and
    ``train_labels`` / ``test_labels`` ``(N,)`` int64.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"MNIST folder {str(root)!r} does not exist or is not a folder")
    found = {role: find_mnist_file(root, role) for role in _MNIST_FILES}
    missing = [names[0] + "[.gz]" for role, names in _MNIST_FILES.items() if found[role] is None]
    if missing:
        have = sorted(p.name for p in root.iterdir())[:10]
        raise DataError(
            f"MNIST folder {str(root)!r} lacks {', '.join(missing)}; it holds "
            f"{', '.join(have) if have else 'nothing'}"
        )
    out: dict[str, np.ndarray] = {}
    for part in ("train", "test"):
        images = read_idx(found[f"{part}_images"])
        labels = read_idx(found[f"{part}_labels"])
        if images.ndim != 3:
            raise DataError(
                f"{found[f'{part}_images']}: expected images of shape (N, rows, cols), "
                f"found shape {images.shape}"
            )
        if len(images) == 0:
            raise DataError(f"IDX file {str(found[f'{part}_images'])!r} holds no images")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(
                f"{found[f'{part}_labels']}: expected {len(images)} labels, one per image of "
                f"{found[f'{part}_images'].name}; found shape {labels.shape}"
            )
        check_finite_images(images, found[f"{part}_images"], "IDX file")
        check_labels(labels, found[f"{part}_labels"])
        scale = 255.0 if images.dtype == np.uint8 else 1.0
        out[f"{part}_images"] = (images.astype(np.float32) / scale).astype(np.float32)
        out[f"{part}_labels"] = labels.astype(np.int64)
    train_labels, test_labels = out["train_labels"], out["test_labels"]
    classes = int(train_labels.max()) + 1
    if classes > len(train_labels):
        # Labels are class numbers 0..K-1: a label this large means a file of something else.
        raise DataError(
            f"{str(found['train_labels'])!r}: the largest label is {classes - 1}, which makes "
            f"{classes:,} classes for {len(train_labels):,} images; labels must be class "
            "numbers 0, 1, 2, ..."
        )
    if len(np.unique(train_labels)) < 2:
        raise DataError(
            f"{str(found['train_labels'])!r}: every training image has the label "
            f"{train_labels[0]}; a classifier needs at least two labels"
        )
    unseen = sorted(set(np.unique(test_labels).tolist()) - set(np.unique(train_labels).tolist()))
    if unseen:
        raise DataError(
            f"{str(found['test_labels'])!r}: the test labels include "
            f"{', '.join(map(str, unseen[:10]))}, which no training image has"
        )
    if out["train_images"].shape[1:] != out["test_images"].shape[1:]:
        raise DataError(
            f"MNIST folder {str(root)!r}: training images are {out['train_images'].shape[1:]} "
            f"but test images are {out['test_images'].shape[1:]}"
        )
    return out


def read_series(path: str | os.PathLike, column: str | None = None) -> np.ndarray:
    """One numeric column of a CSV file with a header, as float64 ``(N,)``.

    ``column`` is a header name or a 0-based index; by default the only numeric column, or the
    last column. Empty or non-numeric cells are errors naming the line.
    """
    p = _existing(path, "CSV file")
    text = _read_text(p, "CSV file")
    rows = _csv_rows(text, p)
    if not rows or not any(r for r in rows):
        raise DataError(f"CSV file {str(p)!r} is empty")
    header = [h.strip() for h in rows[0]]
    if column is None:
        index = len(header) - 1
    elif column in header:
        index = header.index(column)
        where = [k + 1 for k, h in enumerate(header) if h == column]
        if len(where) > 1:
            raise DataError(
                f"CSV file {str(p)!r} names {len(where)} columns {column!r} (columns "
                f"{', '.join(map(str, where))} of the header), so which one is meant is "
                "ambiguous; give each column its own name"
            )
    elif column.isdigit() and int(column) < len(header):
        index = int(column)
    else:
        raise DataError(
            f"CSV file {str(p)!r} has no column {column!r}; its columns are {', '.join(header)}"
        )
    values = []
    for k, row in enumerate(rows[1:], 2):
        if not row:
            continue
        if index >= len(row):
            quote = any("\n" in f for f in row)
            raise DataError(
                f"CSV file {str(p)!r}, line {k}: {len(row)} column(s) where the header names "
                f"{len(header)}; column {header[index]!r} is missing"
                + (" (a quote opened on this line is never closed)" if quote else "")
            )
        if not row[index].strip():
            raise DataError(f"CSV file {str(p)!r}, line {k}: column {header[index]!r} is empty")
        try:
            v = float(row[index])
        except ValueError:
            raise DataError(
                f"CSV file {str(p)!r}, line {k}: column {header[index]!r} holds "
                f"{row[index]!r}, expected a number"
            ) from None
        if not math.isfinite(v):
            raise DataError(
                f"CSV file {str(p)!r}, line {k}: column {header[index]!r} holds {row[index]!r}; "
                "expected a finite number"
            )
        values.append(v)
    return np.asarray(values, dtype=np.float64)


def csv_header(path: str | os.PathLike) -> list[str]:
    """The column names of a CSV file's header row."""
    p = _existing(path, "CSV file")
    rows = _csv_rows(_read_text(p, "CSV file"), p)
    if not rows or not any(r for r in rows):
        raise DataError(f"CSV file {str(p)!r} is empty")
    return [h.strip() for h in rows[0]]


def read_columns(path: str | os.PathLike, columns: list[str]) -> np.ndarray:
    """Numeric columns of a CSV file with a header, as float64 ``(N, len(columns))``, each read
    (and its errors named) as :func:`read_series` reads one."""
    return np.stack([read_series(path, c) for c in columns], axis=1)


def numeric_columns(path: str | os.PathLike) -> list[str]:
    """The header names of the columns whose first row holds a number, in order."""
    p = _existing(path, "CSV file")
    rows = [r for r in _csv_rows(_read_text(p, "CSV file"), p) if r]
    if len(rows) < 2:
        return []
    header = [h.strip() for h in rows[0]]
    return [h for h, cell in zip(header, rows[1], strict=False) if _is_number(cell)]


def _csv_rows(text: str, path: Path) -> list[list[str]]:
    """The rows of a CSV text. Python's csv module refuses fields over 128 KiB by default; a field
    can be no longer than the whole file, so the limit is raised to that while reading."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))
    reader = csv.reader(text.splitlines())
    try:
        return list(reader)
    except csv.Error as e:
        raise DataError(f"CSV file {str(path)!r}, line {reader.line_num}: {e}") from None
    finally:
        csv.field_size_limit(limit)


def load_taylor() -> np.ndarray:
    """The 4,032 half-hourly loads (MW) of England and Wales, 5 June - 27 August 2000.

    Taylor (2003); see ``README.md`` beside this module.
    """
    return read_series(_bundled("taylor.csv"), "load_mw")


def taylor_csv() -> Path:
    """The bundled ``taylor.csv`` (columns ``timestamp,load_mw``)."""
    return _bundled("taylor.csv")


_TIME_HEADERS = ("timestamp", "time", "datetime", "date", "ds")


def _parse_time(text: str) -> np.datetime64 | None:
    try:
        t = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    # Wall-clock time is what the calendar follows; an offset would shift the hour of day.
    return np.datetime64(t.replace(tzinfo=None), "s")


def read_times(path: str | os.PathLike) -> np.ndarray | None:
    """The time stamps of a series CSV as ``datetime64[s]`` ``(N,)``, or None when it has none.

    The time column is the first whose header is ``timestamp``, ``time``, ``datetime``, ``date``
    or ``ds`` (any case), else the first whose first cell is an ISO 8601 date or date-time
    (``2000-06-05 00:30``). Every row must then hold one, in increasing order.
    """
    p = _existing(path, "CSV file")
    rows = [r for r in _csv_rows(_read_text(p, "CSV file"), p) if r]
    if len(rows) < 2:
        return None
    header = [h.strip().lower() for h in rows[0]]
    named = [j for j, h in enumerate(header) if h in _TIME_HEADERS]
    # A "-" keeps an 8-digit number (20000605 is also an ISO date) a number.
    parsed = [j for j, c in enumerate(rows[1]) if "-" in c and _parse_time(c) is not None]
    if not (named or parsed):
        return None
    index = (named or parsed)[0]
    times = []
    for k, row in enumerate(rows[1:], 2):
        t = _parse_time(row[index]) if index < len(row) else None
        if t is None:
            raise DataError(
                f"CSV file {str(p)!r}, line {k}: the time column {rows[0][index].strip()!r} "
                f"holds {row[index] if index < len(row) else ''!r}, expected an ISO 8601 date "
                "or date-time such as 2000-06-05 00:30"
            )
        if times and t <= times[-1]:
            raise DataError(
                f"CSV file {str(p)!r}, line {k}: the time {row[index].strip()!r} does not come "
                f"after the row before's; the rows must be in time order, one per step"
            )
        times.append(t)
    return np.asarray(times, dtype="datetime64[s]")


def read_conllu(path: str | os.PathLike) -> list[tuple[list[str], list[str]]]:
    """Sentences of a CoNLL-U file as ``(words, upos_tags)``.

    Comment lines are skipped, and so are multiword-token ranges (``1-2``) and empty nodes
    (``1.1``), whose words are already counted by their parts. A token line needs the 10
    tab-separated columns and a UPOS tag in the fourth.
    """
    p = _existing(path, "CoNLL-U file")
    sentences: list[tuple[list[str], list[str]]] = []
    words: list[str] = []
    tags: list[str] = []
    for k, line in enumerate([*_read_text(p, "CoNLL-U file").splitlines(), ""], 1):
        if not line.strip():
            if words:
                sentences.append((words, tags))
                words, tags = [], []
            continue
        if line.startswith("#"):
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise DataError(
                f"CoNLL-U file {str(p)!r}, line {k}: expected 10 tab-separated columns "
                f"(ID FORM LEMMA UPOS ...), found {len(cols)}"
            )
        if "-" in cols[0] or "." in cols[0]:
            continue
        if not cols[0].isdigit():
            raise DataError(f"CoNLL-U file {str(p)!r}, line {k}: ID {cols[0]!r} is not a number")
        if cols[3] in ("", "_"):
            raise DataError(f"CoNLL-U file {str(p)!r}, line {k}: the UPOS column is empty")
        if not cols[1]:
            raise DataError(f"CoNLL-U file {str(p)!r}, line {k}: the FORM column is empty")
        words.append(cols[1])
        tags.append(cols[3])
    if not sentences:
        raise DataError(f"CoNLL-U file {str(p)!r} holds no sentences")
    return sentences


def sample_conllu(part: str) -> Path:
    """The bundled part-of-speech sample: ``part`` is "train", "dev" or "test"."""
    return _bundled(f"pos-sample-{part}.conllu")


def ewt_conllu(part: str) -> Path:
    """The bundled UD English EWT treebank (gzipped CoNLL-U): ``part`` is "train", "dev" or
    "test"; 12,544 / 2,001 / 2,077 sentences. See ``README.md`` beside this module."""
    return _bundled(f"en_ewt-ud-{part}.conllu.gz")


def read_labelled_text(path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``(labels, texts)`` from a TSV file of ``label<TAB>text`` lines; blank lines are skipped."""
    p = _existing(path, "TSV file")
    labels, texts = [], []
    for k, line in enumerate(_read_text(p, "TSV file").splitlines(), 1):
        if not line.strip():
            continue
        label, tab, text = line.partition("\t")
        if not tab:
            raise DataError(
                f"TSV file {str(p)!r}, line {k}: expected label<TAB>text, "
                f"found no tab in {line[:40]!r}"
            )
        if not label.strip() or not text:
            raise DataError(f"TSV file {str(p)!r}, line {k}: the label or the text is empty")
        labels.append(label.strip())
        texts.append(text)
    if not labels:
        raise DataError(f"TSV file {str(p)!r} holds no examples")
    return labels, texts


def read_lines(path: str | os.PathLike, what: str) -> list[str]:
    """The non-blank lines of a text file."""
    p = _existing(path, what)
    return [line for line in _read_text(p, what).splitlines() if line.strip()]
