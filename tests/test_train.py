"""``rnnkit train / evaluate / predict`` on every task, small: run folders, resume, errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import rnnkit.train.checkpoint
import rnnkit.train.run
import rnnkit.train.state
from rnnkit.cli import main
from rnnkit.data import chronological_split, load_taylor, sample_conllu, write_idx

TINY = ["--hidden-size", "16", "--quiet"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clear_error(rc: int, err: str, *fragments: str, status: int = 2) -> None:
    """One line on stderr naming the fragments; status 2 for usage errors, 1 for failures."""
    assert rc == status, err
    assert err.startswith("rnnkit ") and "Traceback" not in err, err
    assert err.strip().count("\n") == 0, err
    for f in fragments:
        assert f in err, err


def assert_real_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 200 and img.shape[1] > 200
    # Not a blank canvas: a plot has lines, text and markers in several colours.
    assert img[..., :3].std() > 0.05


def assert_load_round_trips(run: Path) -> None:
    """rnnkit.load gives the run's best weights and preprocessing, from a str and from a Path."""
    import rnnkit
    from rnnkit.train.checkpoint import load_model

    saved, meta = load_model(run / "model.safetensors")
    best = torch.load(run / "checkpoint.pt", weights_only=True)["best"]
    for where in (str(run), run):
        model = rnnkit.load(where)
        assert type(model) is type(saved) and not model.training
        assert (
            model.preprocessing == meta["preprocessing"]
            and model.run_info["epoch"] == best["epoch"]
        )
        for k, v in model.state_dict().items():
            assert torch.equal(v, best["state"][k]), k


def epoch_records(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if r["kind"] == "epoch"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "digits"
    assert main(["train", "digits", "--out", str(run), "--epochs", "3", *TINY]) == 0
    return run


def test_digits_writes_the_whole_run_folder(digits_run):
    run = digits_run
    for name in (
        "config.json",
        "metrics.jsonl",
        "checkpoint.pt",
        "model.safetensors",
        "summary.json",
    ):
        assert (run / name).is_file(), name
    config = json.loads((run / "config.json").read_text())
    assert config["task"] == "digits" and config["options"]["hidden_size"] == 16
    assert config["options"]["cell"] == "lstm" and config["options"]["epochs"] == 3
    records = epoch_records(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(records[0])
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    summary = json.loads((run / "summary.json").read_text())
    # Three epochs of a 16-unit LSTM already read digits far better than chance (10%).
    assert summary["test_accuracy"] > 0.5
    assert summary["test_examples"] == 359
    assert summary["best_epoch"] in (1, 2, 3)
    assert_real_png(run / "curves.png")
    assert_real_png(run / "confusion.png")
    assert_load_round_trips(run)


def test_digits_console_ends_with_a_table_and_the_run_folder(tmp_path, capsys):
    rc, out, _ = run_cli(
        capsys,
        "train",
        "digits",
        "--out",
        tmp_path / "r",
        "--epochs",
        "1",
        "--hidden-size",
        "8",
        "--cell",
        "gru",
        "--readout",
        "hn",
    )
    assert rc == 0
    assert "epoch 1/1" in out and "train loss" in out
    assert "test_accuracy" in out and f"run folder: {tmp_path / 'r'}/" in out
    assert "model.safetensors" in out.splitlines()[-1]


def test_evaluate_reproduces_the_summary(digits_run, capsys, tmp_path):
    rc, out, _ = run_cli(capsys, "evaluate", digits_run, "--output", tmp_path / "e.json")
    assert rc == 0
    summary = json.loads((digits_run / "summary.json").read_text())
    again = json.loads((tmp_path / "e.json").read_text())
    assert again["test_accuracy"] == pytest.approx(summary["test_accuracy"])
    assert "test_accuracy" in out


def test_predict_digits_from_csv_matches_evaluate(digits_run, capsys, tmp_path):
    from rnnkit.data import load_digits

    x, y = load_digits()
    rows = (x[:20].reshape(20, 64) * 16).astype(int)
    (tmp_path / "in.csv").write_text("\n".join(",".join(map(str, r)) for r in rows) + "\n")
    rc, out, _ = run_cli(capsys, "predict", digits_run, tmp_path / "in.csv")
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "row,label,probability" and len(lines) == 21
    labels = np.array([int(line.split(",")[1]) for line in lines[1:]])
    assert (labels == y[:20]).mean() > 0.5
    rc, _, _ = run_cli(
        capsys, "predict", digits_run, tmp_path / "in.csv", "--output", tmp_path / "p.csv"
    )
    assert rc == 0 and (tmp_path / "p.csv").read_text() == out


def test_forecast_on_bundled_load_beats_the_naive_baselines(tmp_path, capsys):
    run = tmp_path / "f"
    rc, out, _ = run_cli(capsys, "train", "forecast", "--out", run, "--epochs", "5", "--quiet")
    assert rc == 0
    s = json.loads((run / "summary.json").read_text())
    # The seasonal-naive baseline, by hand: the same half-hour one day (48 steps) earlier.
    series = load_taylor()
    test = chronological_split(len(series), (0.7, 0.15, 0.15))[2]
    starts = range(test.start, len(series) - 4 + 1)
    truth = np.stack([series[t : t + 4] for t in starts])
    naive = np.stack([series[t - 48 : t - 44] for t in starts])
    weekly = np.stack([series[t - 336 : t - 332] for t in starts])
    assert s["test_windows"] == len(starts)
    assert_load_round_trips(run)
    assert s["weekly_naive_mae"] == pytest.approx(np.abs(weekly - truth).mean())
    assert s["baseline_mae"] == pytest.approx(np.abs(naive - truth).mean())
    assert s["baseline_rmse"] == pytest.approx(np.sqrt(((naive - truth) ** 2).mean()))
    assert s["baseline_mape"] == pytest.approx(100 * np.abs((naive - truth) / truth).mean())
    assert {"mae", "rmse", "mape", "ar_mae", "ar_rmse", "ar_mape", "best_baseline"} <= set(s)
    assert s["mae"] < s["weekly_naive_mae"] < s["baseline_mae"]
    assert "baseline_mae" in out and "weekly_naive_mae" in out and "ar_mae" in out
    assert_real_png(run / "forecast.png")
    assert_real_png(run / "backtest.png")
    assert_real_png(run / "curves.png")
    assert s["interval"] == "10-90%" and 0 < s["interval_coverage"] <= 1
    assert len(s["backtest_mae_per_step"]) == 4 and s["backtest_origins"] == len(starts[::4])
    # predict: the next 4 half-hours after a CSV's last 336 values and their time stamps.
    csv = tmp_path / "recent.csv"
    rows = load_taylor_rows()[-400:]
    csv.write_text("timestamp,load_mw\n" + "\n".join(rows) + "\n")
    rc, out, _ = run_cli(capsys, "predict", run, csv)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "steps_ahead,forecast,q0.1,q0.9" and len(lines) == 5
    for line in lines[1:]:
        median, low, high = map(float, line.split(",")[1:])
        assert 15000 < low <= median <= high < 45000


def load_taylor_rows() -> list[str]:
    from rnnkit.data.readers import taylor_csv

    return taylor_csv().read_text().splitlines()[1:]


def test_forecast_scaling_is_fitted_on_the_training_part_only(tmp_path, capsys):
    series = np.concatenate([np.full(700, 10.0) + np.arange(700) % 5, np.full(300, 1000.0)])
    (tmp_path / "s.csv").write_text("v\n" + "\n".join(map(str, series)) + "\n")
    rc, _, err = run_cli(
        capsys,
        "train",
        "forecast",
        "--data",
        tmp_path / "s.csv",
        "--out",
        tmp_path / "r",
        "--epochs",
        "1",
        "--window",
        "8",
        "--period",
        "5",
        "--horizon",
        "2",
        *TINY,
    )
    assert rc == 0, err
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["data"]["column"] is None
    from safetensors import safe_open

    with safe_open(str(tmp_path / "r" / "model.safetensors"), "pt") as f:
        pre = json.loads(f.metadata()["rnnkit"])["preprocessing"]
    train = series[:700]
    assert pre["mean"] == pytest.approx(train.mean()) and pre["std"] == pytest.approx(train.std())


def test_tagger_on_the_bundled_sample_and_predict(tmp_path, capsys):
    run = tmp_path / "t"
    sample = [f"--{k}={sample_conllu(k)}" for k in ("train", "dev", "test")]
    rc, _, err = run_cli(capsys, "train", "tagger", *sample, "--out", run, "--epochs", "2", *TINY)
    assert rc == 0, err
    s = json.loads((run / "summary.json").read_text())
    assert s["test_tokens"] == 65 and s["test_sentences"] == 9
    assert_load_round_trips(run)
    assert 0 < s["test_unknown_tokens"] < 65
    assert 0 <= s["test_accuracy"] <= 1
    assert 0 < s["test_baseline_accuracy"] <= 1 and 0 <= s["test_baseline_unknown_accuracy"] <= 1
    assert_real_png(run / "confusion.png")
    (tmp_path / "s.txt").write_text("The dog sleeps .\nZorblax visited Qwerty in 2024 !\n")
    rc, out, _ = run_cli(capsys, "predict", run, tmp_path / "s.txt")
    assert rc == 0
    rows = [line.split("\t") for line in out.splitlines() if line]
    assert [r[1] for r in rows] == "The dog sleeps . Zorblax visited Qwerty in 2024 !".split()
    tags = set(json.loads((run / "config.json").read_text()) and s and [r[2] for r in rows])
    assert tags <= {
        "ADJ",
        "ADP",
        "ADV",
        "AUX",
        "CCONJ",
        "DET",
        "INTJ",
        "NOUN",
        "NUM",
        "PART",
        "PRON",
        "PROPN",
        "PUNCT",
        "VERB",
    }
    conllu = tmp_path / "in.conllu"
    conllu.write_text(
        "# text = The dog\n1\tThe\t_\t_\t_\t_\t_\t_\t_\t_\n2\tdog\t_\t_\t_\t_\t_\t_\t_\t_\n\n"
    )
    rc, out, _ = run_cli(capsys, "predict", run, conllu)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "# text = The dog" and all(line.split("\t")[3] != "_" for line in lines[1:3])


def test_tagger_refuses_readout_and_partial_paths(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "tagger", "--readout", "hn"])
    capsys.readouterr()
    rc, _, err = run_cli(capsys, "train", "tagger", "--train", "a.conllu", "--out", tmp_path / "r")
    assert_clear_error(rc, err, "give all of --train, --dev and --test")


def _write_tsv(path: Path, n: int = 120) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        label = ["vowels", "consonants"][i % 2]
        alphabet = list("aeiou ") if label == "vowels" else list("xzkqtp ")
        lines.append(f"{label}\t{''.join(rng.choice(alphabet, size=rng.integers(3, 20)))}")
    path.write_text("\n".join(lines) + "\n")


def test_textclf_trains_on_a_tsv_and_predicts_lines(tmp_path, capsys):
    _write_tsv(tmp_path / "d.tsv")
    run = tmp_path / "c"
    rc, _, err = run_cli(
        capsys,
        "train",
        "textclf",
        "--data",
        tmp_path / "d.tsv",
        "--out",
        run,
        "--epochs",
        "3",
        *TINY,
    )
    assert rc == 0, err
    s = json.loads((run / "summary.json").read_text())
    assert s["test_examples"] == 12 and s["test_accuracy"] > 0.6
    assert_load_round_trips(run)
    (tmp_path / "in.txt").write_text("aeiouaeiou\nkqxzt pkz\n")
    rc, out, _ = run_cli(capsys, "predict", run, tmp_path / "in.txt")
    assert rc == 0
    assert out.splitlines()[0] == "line,label,probability,text"
    assert [line.split(",")[1] for line in out.splitlines()[1:]] == ["vowels", "consonants"]


def _write_mnist(folder: Path, gz: bool) -> None:
    """A tiny MNIST look-alike: digit k is a bright horizontal bar at row 2 + 2k."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for part, n in (("train", 120), ("t10k", 30)):
        labels = np.arange(n) % 3
        images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(labels):
            images[i, 2 + 8 * k : 6 + 8 * k] = 255
        ext = ".gz" if gz else ""
        write_idx(folder / f"{part}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{part}-labels-idx1-ubyte{ext}", labels.astype(np.uint8))


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_mnist_from_idx_files(tmp_path, capsys, gz):
    _write_mnist(tmp_path / "mnist", gz)
    run = tmp_path / "m"
    rc, _, err = run_cli(
        capsys,
        "train",
        "mnist",
        "--data",
        tmp_path / "mnist",
        "--out",
        run,
        "--epochs",
        "6",
        "--batch-size",
        "8",
        *TINY,
    )
    assert rc == 0, err
    s = json.loads((run / "summary.json").read_text())
    assert s["test_examples"] == 30
    assert_load_round_trips(run)
    assert s["test_accuracy"] > 0.5
    images = tmp_path / "mnist" / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    rc, out, _ = run_cli(capsys, "predict", run, images)
    assert rc == 0 and len(out.splitlines()) == 31


# ---- resume and checkpoints


RESUMABLE = [
    "--epochs",
    "4",
    "--hidden-size",
    "12",
    "--num-layers",
    "2",
    "--dropout",
    "0.3",
    "--batch-size",
    "64",
    "--quiet",
]


def _interrupt_after_epoch(monkeypatch, n: int) -> None:
    real = rnnkit.train.state.save_checkpoint

    def save_then_stop(path, state):
        real(path, state)
        if state["epoch"] == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(rnnkit.train.state, "save_checkpoint", save_then_stop)


def _interrupt_before_checkpoint(monkeypatch, n: int) -> None:
    """Ctrl-C in epoch ``n`` just before its checkpoint: epoch n - 1 is committed whole."""
    real = rnnkit.train.state.save_checkpoint

    def stop_or_save(path, state):
        if state["epoch"] == n:
            raise KeyboardInterrupt
        real(path, state)

    monkeypatch.setattr(rnnkit.train.state, "save_checkpoint", stop_or_save)


def test_resume_ends_exactly_where_an_uninterrupted_run_does(tmp_path, capsys, monkeypatch):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert main(["train", "digits", "--out", str(whole), *RESUMABLE]) == 0
    with monkeypatch.context() as m:
        _interrupt_after_epoch(m, 2)
        rc, _, err = run_cli(capsys, "train", "digits", "--out", parts, *RESUMABLE)
    assert rc == 130 and "--resume" in err
    assert not (parts / "summary.json").exists()
    assert torch.load(parts / "checkpoint.pt", weights_only=True)["epoch"] == 2
    rc, _, err = run_cli(capsys, "train", "digits", "--out", parts, "--resume", "--quiet")
    assert rc == 0, err
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((parts / "summary.json").read_text())
    for key in ("test_accuracy", "test_loss", "best_epoch", "best_val_accuracy", "rank_checksums"):
        assert a[key] == b[key], key
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in epoch_records(whole)]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in epoch_records(parts)]
    wa, wb = load_file(whole / "model.safetensors"), load_file(parts / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_changed_options(tmp_path, capsys, monkeypatch):
    run = tmp_path / "r"
    with monkeypatch.context() as m:
        _interrupt_after_epoch(m, 1)
        assert run_cli(capsys, "train", "digits", "--out", run, *RESUMABLE)[0] == 130
    rc, _, err = run_cli(capsys, "train", "digits", "--out", run, "--resume", "--lr", "0.5")
    assert_clear_error(rc, err, "--lr 0.5 (the run has 0.01)")
    rc, _, err = run_cli(capsys, "train", "forecast", "--out", run, "--resume")
    assert_clear_error(rc, err, "holds a 'digits' run, not 'forecast'")
    rc, _, err = run_cli(capsys, "train", "digits", "--out", run, *RESUMABLE)
    assert_clear_error(rc, err, "already holds a run; pass --resume")


def test_checkpoint_write_is_atomic(tmp_path, capsys, monkeypatch):
    run = tmp_path / "r"
    calls = {"n": 0}
    real_save = torch.save

    def crash_on_second(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            with open(f, "wb") as h:
                h.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(rnnkit.train.checkpoint.torch, "save", crash_on_second)
        rc, _, err = run_cli(capsys, "train", "digits", "--out", run, *RESUMABLE)
    assert_clear_error(
        rc, err, "could not write", "No space left", "previous version is untouched", status=1
    )
    # The epoch-1 checkpoint survived whole, and no temporary file is left behind.
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    rc, _, err = run_cli(capsys, "train", "digits", "--out", run, "--resume", "--quiet")
    assert rc == 0, err


def test_missing_truncated_and_mismatched_checkpoints(tmp_path, capsys, monkeypatch, digits_run):
    rc, _, err = run_cli(capsys, "train", "digits", "--out", tmp_path / "nothing", "--resume")
    assert_clear_error(rc, err, "run config", "does not exist")
    run = tmp_path / "r"
    with monkeypatch.context() as m:
        _interrupt_before_checkpoint(m, 2)
        assert run_cli(capsys, "train", "digits", "--out", run, *RESUMABLE)[0] == 130
    good = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt").write_bytes(good[: len(good) // 3])
    rc, _, err = run_cli(capsys, "train", "digits", "--out", run, "--resume")
    assert_clear_error(rc, err, "checkpoint.pt", "truncated or corrupt")
    (run / "checkpoint.pt").unlink()
    rc, _, err = run_cli(capsys, "train", "digits", "--out", run, "--resume")
    assert_clear_error(rc, err, "no checkpoint to resume")
    shutil.copy(digits_run / "checkpoint.pt", run / "checkpoint.pt")
    rc, _, err = run_cli(capsys, "train", "digits", "--out", run, "--resume")
    assert_clear_error(rc, err, "belongs to a different run")


def test_damaged_model_files_give_clear_errors(tmp_path, capsys, digits_run):
    run = tmp_path / "copy"
    shutil.copytree(digits_run, run)
    (tmp_path / "in.csv").write_text(",".join(["0"] * 64) + "\n")
    model = run / "model.safetensors"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2])
    rc, _, err = run_cli(capsys, "predict", run, tmp_path / "in.csv")
    assert_clear_error(rc, err, "truncated or not a safetensors file")
    # Weights of another architecture under this run's metadata.
    from safetensors import safe_open
    from safetensors.torch import save_file

    model.write_bytes(data)
    with safe_open(str(model), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["fc.weight"] = torch.zeros(10, 99)
    save_file(tensors, str(model), metadata=meta)
    # Swapped tensors under the old metadata no longer match its checksum.
    rc, _, err = run_cli(capsys, "evaluate", run)
    assert_clear_error(rc, err, "model.safetensors", "is damaged", "SHA-256")
    # A whole file (its checksum right) whose weights do not fit the architecture it names.
    rnnkit.train.checkpoint.save_model(model, tensors, json.loads(meta["rnnkit"]))
    rc, _, err = run_cli(capsys, "evaluate", run)
    assert_clear_error(rc, err, "does not match the model", "fc.weight (10, 99) vs (10, 16)")
    model.unlink()
    rc, _, err = run_cli(capsys, "predict", run, tmp_path / "in.csv")
    assert_clear_error(rc, err, "model.safetensors", "does not exist")
    rc, _, err = run_cli(capsys, "evaluate", tmp_path / "no-such-run")
    assert_clear_error(rc, err, "run folder", "does not exist")


def test_bad_data_files_give_clear_errors(tmp_path, capsys, digits_run):
    out = ["--out", tmp_path / "r", "--epochs", "1", *TINY]
    rc, _, err = run_cli(capsys, "train", "forecast", "--data", tmp_path / "none.csv", *out)
    assert_clear_error(rc, err, "CSV file", "none.csv", "does not exist")
    (tmp_path / "s.csv").write_text("a,b\n1,2\n")
    rc, _, err = run_cli(
        capsys, "train", "forecast", "--data", tmp_path / "s.csv", "--column", "c", *out
    )
    assert_clear_error(rc, err, "has no column 'c'; its columns are a, b")
    rc, _, err = run_cli(capsys, "train", "forecast", "--data", tmp_path / "s.csv", *out)
    assert_clear_error(rc, err, "1 values are too few")
    _write_mnist(tmp_path / "mnist", gz=True)
    f = tmp_path / "mnist" / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-6])
    rc, _, err = run_cli(capsys, "train", "mnist", "--data", tmp_path / "mnist", *out)
    assert_clear_error(rc, err, "train-labels-idx1-ubyte.gz", "truncated or corrupt gzip")
    rc, _, err = run_cli(capsys, "train", "mnist", *out)
    assert_clear_error(rc, err, "mnist needs --data DIR")
    bad = tmp_path / "bad.conllu"
    bad.write_text("1\tThe\tthe\tDET\n")
    rc, _, err = run_cli(
        capsys, "train", "tagger", "--train", bad, "--dev", bad, "--test", bad, *out
    )
    assert_clear_error(rc, err, "bad.conllu', line 1: expected 10 tab-separated columns")
    (tmp_path / "bad.tsv").write_text("pos\tgood\nneg bad\n")
    rc, _, err = run_cli(capsys, "train", "textclf", "--data", tmp_path / "bad.tsv", *out)
    assert_clear_error(rc, err, "line 2: expected label<TAB>text")
    (tmp_path / "in.csv").write_text("1,2,3\n")
    rc, _, err = run_cli(capsys, "predict", digits_run, tmp_path / "in.csv")
    assert_clear_error(rc, err, "expected 64 pixel values", "found 3")


def test_bad_options_give_clear_errors(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "digits", "--out", tmp_path / "r", "--hidden-size", "0")
    assert_clear_error(rc, err, "--hidden-size must be a positive integer; got 0")
    rc, _, err = run_cli(capsys, "train", "digits", "--out", tmp_path / "r", "--dropout", "1.5")
    assert_clear_error(rc, err, "--dropout must be in [0, 1)")
    if not torch.cuda.is_available():
        rc, _, err = run_cli(capsys, "train", "digits", "--out", tmp_path / "r", "--device", "cuda")
        assert_clear_error(rc, err, "--device cuda", "no CUDA device")
    assert not (tmp_path / "r").exists()


def test_every_commands_help_prints_and_exits_0(capsys):
    """`rnnkit train --help` lists every task's own help (the forecast task's says "90%",
    which argparse once read as a format and died on with a traceback)."""
    from rnnkit.tasks import TASKS

    for argv in (["--help"], ["train", "--help"], ["evaluate", "--help"], ["predict", "--help"],
                 *(["train", name, "--help"] for name in TASKS)):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0, argv
        out = capsys.readouterr().out
        assert out.startswith("usage:"), (argv, out[:200])
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "90% quantiles" in out and all(name in out for name in TASKS), out


def test_train_help_explains_each_shared_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "forecast", "--help"])
    out = capsys.readouterr().out
    for option in (
        "--cell",
        "--hidden-size",
        "--num-layers",
        "--bidirectional",
        "--dropout",
        "--readout",
        "--backend",
        "--epochs",
        "--batch-size",
        "--lr",
        "--optimizer",
        "--device",
        "--seed",
        "--out",
        "--resume",
        "--quiet",
        "--window",
        "--horizon",
    ):
        assert option in out, option
    assert "h_n of every layer and direction" in " ".join(out.split())


def test_threads_default_to_what_the_machine_can_serve(tmp_path, capsys, monkeypatch):
    before = torch.get_num_threads()
    try:
        assert rnnkit.train.run.set_threads(3) == 3 and torch.get_num_threads() == 3
        monkeypatch.setattr(rnnkit.train.run.os, "sched_getaffinity", lambda _: {0, 1, 2, 3})
        monkeypatch.setattr(rnnkit.train.run.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
        assert rnnkit.train.run.set_threads(None) == 3
        monkeypatch.setattr(rnnkit.train.run.os, "getloadavg", lambda: (9.0, 0.0, 0.0))
        assert rnnkit.train.run.set_threads(None) == 1
    finally:
        torch.set_num_threads(before)
    rc, _, err = run_cli(capsys, "train", "digits", "--out", tmp_path / "r", "--threads", "0")
    assert_clear_error(rc, err, "--threads must be a positive integer; got 0")


def test_resume_refuses_data_that_changed(tmp_path, capsys, monkeypatch):
    series = 100 + 10 * np.sin(np.arange(400) * 2 * np.pi / 8)
    csv = tmp_path / "s.csv"
    csv.write_text("v\n" + "\n".join(map(str, series)) + "\n")
    argv = [
        "train",
        "forecast",
        "--data",
        csv,
        "--window",
        "8",
        "--period",
        "8",
        "--out",
        tmp_path / "r",
        "--epochs",
        "2",
        *TINY,
    ]
    with monkeypatch.context() as m:
        _interrupt_after_epoch(m, 1)
        assert run_cli(capsys, *argv)[0] == 130
    csv.write_text("v\n" + "\n".join(map(str, series * 2)) + "\n")
    rc, _, err = run_cli(capsys, *argv, "--resume")
    assert_clear_error(rc, err, "changed since the run started")
    csv.write_text("v\n" + "\n".join(map(str, series)) + "\n")
    rc, _, err = run_cli(capsys, *argv, "--resume")
    assert rc == 0, err


def test_quantize_writes_the_int8_model_that_evaluate_and_predict_read(
    digits_run, capsys, tmp_path
):
    import shutil

    import rnnkit
    from rnnkit.quantized import is_quantized
    from rnnkit.train.checkpoint import MODEL_INT8, load_model, save_model

    run = tmp_path / "q"
    shutil.copytree(digits_run, run)
    x = torch.randn(5, 8, 8)
    in_memory = rnnkit.load(run, quantize=True)
    assert is_quantized(in_memory) and not (run / MODEL_INT8).exists()
    rc, out, _ = run_cli(capsys, "quantize", run)
    assert rc == 0 and MODEL_INT8 in out
    from_file = rnnkit.load(run, quantize=True)
    assert is_quantized(from_file) and from_file.run_info["quantized"] == "int8"
    # The file holds the same int8 numbers as quantizing on loading.
    assert torch.equal(from_file(x), in_memory(x))
    saved = load_file(run / MODEL_INT8)
    assert {t.dtype for k, t in saved.items() if k.endswith("weight_hh_l0")} == {torch.int8}
    rc, out, _ = run_cli(capsys, "evaluate", run, "--quantize", "--output", tmp_path / "q.json")
    assert rc == 0 and "(int8)" in out
    assert 0 <= json.loads((tmp_path / "q.json").read_text())["test_accuracy"] <= 1
    from rnnkit.data import load_digits

    pixels = (load_digits()[0][:6].reshape(6, 64) * 16).astype(int)
    (tmp_path / "in.csv").write_text("\n".join(",".join(map(str, r)) for r in pixels) + "\n")
    rc, out, _ = run_cli(capsys, "predict", run, tmp_path / "in.csv", "--quantize")
    labels = [int(line.split(",")[1]) for line in out.splitlines()[1:]]
    digits = torch.tensor(pixels, dtype=torch.float32).view(6, 8, 8) / 16
    assert rc == 0 and labels == from_file(digits).argmax(1).tolist()
    # An int8 file from other weights (another epoch) is not used: the weights are quantized anew.
    net, meta = load_model(run / MODEL_INT8)
    state = {k: torch.zeros_like(v) if v.dtype == torch.int8 else v
             for k, v in net.state_dict().items()}  # fmt: skip
    save_model(run / MODEL_INT8, state, meta)
    assert not torch.equal(rnnkit.load(run, quantize=True)(x), in_memory(x))
    save_model(run / MODEL_INT8, state, {**meta, "epoch": meta["epoch"] - 1})
    assert torch.equal(rnnkit.load(run, quantize=True)(x), in_memory(x))
    rc, _, err = run_cli(capsys, "evaluate", run, "--quantize", "--device", "cuda")
    assert rc != 0 and ("CPU" in err or "cuda" in err.lower())
