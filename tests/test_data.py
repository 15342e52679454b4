"""The bundled data and the readers of the user's files, bad files included."""

import gzip

import numpy as np
import pytest

from rnnkit.data import (
    DataError,
    Vocab,
    chronological_split,
    load_digits,
    load_mnist,
    load_taylor,
    read_conllu,
    read_idx,
    read_labelled_text,
    read_series,
    sample_conllu,
    stratified_split,
    write_idx,
)


def test_bundled_digits_are_scikit_learns_1797():
    x, y = load_digits()
    assert x.shape == (1797, 8, 8) and y.shape == (1797,)
    assert x.min() == 0 and x.max() == 1
    assert np.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # The first digit is a 0: its top row, read as the first step, is 0 0 5 13 9 1 0 0 (of 16).
    assert (x[0, 0] * 16).tolist() == [0, 0, 5, 13, 9, 1, 0, 0]


def test_bundled_taylor_is_the_4032_half_hours():
    s = load_taylor()
    assert s.shape == (4032,)
    assert s[:3].tolist() == [22262, 21756, 22247]
    assert s[-1] == 23132
    assert 18000 < s.min() and s.max() < 40000


def test_stratified_split_keeps_class_shares_and_covers_every_index():
    y = np.array([0] * 50 + [1] * 30 + [2] * 20)
    tr, va, te = stratified_split(y, (0.7, 0.1, 0.2), seed=3)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(100))
    assert np.bincount(y[te]).tolist() == [10, 6, 4]
    assert np.bincount(y[va]).tolist() == [5, 3, 2]
    again = stratified_split(y, (0.7, 0.1, 0.2), seed=3)
    assert all((a == b).all() for a, b in zip((tr, va, te), again, strict=True))


def test_chronological_split_is_consecutive():
    a, b, c = chronological_split(100, (0.7, 0.15, 0.15))
    assert (a.start, a.stop, b.stop, c.stop) == (0, 70, 85, 100)


@pytest.mark.parametrize("suffix", ["", ".gz"], ids=["plain", "gzip"])
def test_idx_round_trip(tmp_path, suffix):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / f"a{suffix}", a)
    back = read_idx(tmp_path / f"a{suffix}")
    assert back.dtype == np.uint8 and (back == a).all()


def test_truncated_idx_says_what_the_header_promised(tmp_path):
    write_idx(tmp_path / "a", np.zeros((10, 28, 28), dtype=np.uint8))
    data = (tmp_path / "a").read_bytes()
    (tmp_path / "a").write_bytes(data[:-100])
    with pytest.raises(
        DataError, match=r"promises shape \(10, 28, 28\) = 7,840 bytes.*holds 7,740"
    ):
        read_idx(tmp_path / "a")


def test_truncated_gzip_idx_is_named(tmp_path):
    write_idx(tmp_path / "a.gz", np.zeros((10, 28, 28), dtype=np.uint8))
    data = (tmp_path / "a.gz").read_bytes()
    (tmp_path / "a.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt gzip"):
        read_idx(tmp_path / "a.gz")


def test_a_non_idx_file_is_refused_with_its_first_bytes(tmp_path):
    (tmp_path / "a").write_text("hello world")
    with pytest.raises(DataError, match=r"does not start with an IDX header.*68 65 6c 6c"):
        read_idx(tmp_path / "a")


def test_mnist_folder_reports_the_missing_files(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((4, 28, 28), dtype=np.uint8))
    with pytest.raises(DataError, match=r"lacks train-labels-idx1-ubyte.*t10k-images"):
        load_mnist(tmp_path)
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        load_mnist(tmp_path / "nope")


def test_mnist_labels_must_match_the_images(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, dtype=np.uint8))
    with pytest.raises(DataError, match="expected 4 labels, one per image"):
        load_mnist(tmp_path)


def test_series_reader_names_bad_columns_and_cells(tmp_path):
    p = tmp_path / "load.csv"
    p.write_text("time,load\n0,1.5\n1,2.5\n")
    assert read_series(p, "load").tolist() == [1.5, 2.5]
    assert read_series(p).tolist() == [1.5, 2.5]
    with pytest.raises(DataError, match="has no column 'demand'; its columns are time, load"):
        read_series(p, "demand")
    p.write_text("time,load\n0,1.5\n1,n/a\n")
    with pytest.raises(DataError, match="line 3: column 'load' holds 'n/a', expected a number"):
        read_series(p, "load")
    with pytest.raises(DataError, match="does not exist"):
        read_series(tmp_path / "missing.csv")
    # A name that the header repeats is ambiguous; other columns of the file still read.
    p.write_text("time,load,load,temp\n0,1.5,7,20\n1,2.5,8,21\n")
    with pytest.raises(DataError, match=r"names 2 columns 'load' \(columns 2, 3 of the header\)"):
        read_series(p, "load")
    assert read_series(p, "temp").tolist() == [20, 21]


def test_conllu_reader_skips_comments_ranges_and_empty_nodes(tmp_path):
    p = tmp_path / "a.conllu"
    rows = [
        "# text = Don't go",
        "1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_",
        "1\tDo\tdo\tAUX\t_\t_\t0\troot\t_\t_",
        "2\tn't\tnot\tPART\t_\t_\t1\tadvmod\t_\t_",
        "2.1\tx\t_\t_\t_\t_\t_\t_\t_\t_",
        "3\tgo\tgo\tVERB\t_\t_\t1\txcomp\t_\t_",
    ]
    p.write_text("\n".join(rows) + "\n\n")
    assert read_conllu(p) == [(["Do", "n't", "go"], ["AUX", "PART", "VERB"])]
    assert len(read_conllu(sample_conllu("train"))) == 60


def test_conllu_reader_names_the_bad_line(tmp_path):
    p = tmp_path / "a.conllu"
    p.write_text("1\tDo\tdo\tAUX\t_\t_\t0\troot\t_\t_\n2 go VERB\n")
    with pytest.raises(DataError, match=r"line 2: expected 10 tab-separated columns.*found 1"):
        read_conllu(p)
    p.write_text("1\tDo\tdo\t_\t_\t_\t0\troot\t_\t_\n")
    with pytest.raises(DataError, match="line 1: the UPOS column is empty"):
        read_conllu(p)


def test_labelled_text_reader(tmp_path):
    p = tmp_path / "a.tsv"
    p.write_text("pos\tgood film\n\nneg\tbad\tfilm\n")
    assert read_labelled_text(p) == (["pos", "neg"], ["good film", "bad\tfilm"])
    p.write_text("pos good film\n")
    with pytest.raises(DataError, match="line 1: expected label<TAB>text"):
        read_labelled_text(p)
    p.write_bytes(gzip.compress(b"x") + b"\xff")
    with pytest.raises(DataError):
        read_labelled_text(p)


def test_vocab_reserves_padding_and_unknown():
    v = Vocab.build([["b", "a", "b"], ["c"]])
    assert v.itos[:2] == ["<pad>", "<unk>"] and v.itos[2] == "b"
    assert v.encode(["b", "zzz"]) == [2, 1]


def _digits_csv(path, rows: list[list[str]]) -> None:
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_digits_reader_names_the_file_line_and_value_of_a_non_finite_pixel(tmp_path, value):
    good = ["0"] * 64 + ["3"]
    bad = ["0"] * 10 + [value] + ["0"] * 53 + ["3"]
    _digits_csv(tmp_path / "d.csv", [good, good, bad])
    with pytest.raises(DataError, match=rf"d.csv', line 3: pixel 11 is '{value}'; every pixel"):
        load_digits(tmp_path / "d.csv")


@pytest.mark.parametrize("label", ["3.7", "42", "-1", "nan"])
def test_digits_reader_refuses_a_label_that_is_not_a_digit(tmp_path, label):
    _digits_csv(tmp_path / "d.csv", [["0"] * 64 + ["3"], ["0"] * 64 + [label]])
    with pytest.raises(
        DataError, match=rf"line 2: the label is '{label}'; expected a whole number"
    ):
        load_digits(tmp_path / "d.csv")


def _mnist(folder, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte", images)
    write_idx(folder / "train-labels-idx1-ubyte", labels)
    write_idx(folder / "t10k-images-idx3-ubyte", np.zeros((2, 4, 4), dtype=np.uint8))
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(2, dtype=np.uint8))


def test_mnist_reader_names_a_non_finite_image_and_a_bad_label(tmp_path):
    images = np.zeros((3, 4, 4), dtype=np.float32)
    images[2, 1, 3] = np.nan
    _mnist(tmp_path, images, np.zeros(3, dtype=np.uint8))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte', image 2 .*nan; every pixel"):
        load_mnist(tmp_path)
    _mnist(tmp_path, np.zeros((3, 4, 4), dtype=np.float32), np.array([0, -1, 2], dtype=np.int8))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte', label 1 \(0-based\): -1"):
        load_mnist(tmp_path)
    _mnist(tmp_path, np.zeros((3, 4, 4), dtype=np.uint8), np.array([0, 1, 2.5]))
    with pytest.raises(DataError, match=r"label 2 \(0-based\): 2.5; a label must be a whole"):
        load_mnist(tmp_path)


def test_series_reader_names_an_infinite_cell(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("v\n1\n1e309\n")
    with pytest.raises(
        DataError, match=r"s.csv', line 3: column 'v' holds '1e309'; expected a finite"
    ):
        read_series(p)


def test_series_reader_takes_a_field_longer_than_128_kib(tmp_path):
    import csv

    p = tmp_path / "s.csv"
    note = "x" * 200_000
    p.write_text(f"note,v\n{note},1.5\nshort,2.5\n")
    assert read_series(p, "v").tolist() == [1.5, 2.5]
    # The reader leaves the csv module's process-wide limit as it found it.
    assert csv.field_size_limit() == 131072
