"""``rnnkit train / evaluate`` under hostile input: bad options and data, non-finite losses, full
disks, kills between any two writes, flipped bits. Every failure is one clear line, never a
traceback, and the run folder stays consistent."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import rnnkit.tasks.classify
import rnnkit.train.checkpoint
import rnnkit.train.run
import rnnkit.train.state
from rnnkit.cli import main
from rnnkit.train.checkpoint import CheckpointError, load_model, write_json

# Two epochs of a small LSTM on the bundled digits: a second or so.
SMALL = ["--epochs", "2", "--hidden-size", "8", "--batch-size", "128", "--quiet"]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *fragments: str, status: int = 2) -> None:
    assert rc == status, err
    assert err.startswith("rnnkit ") and "Traceback" not in err, err
    assert err.strip().count("\n") == 0, err
    for f in fragments:
        assert f in err, err


def strict_json(path: Path) -> object:
    """The JSON in ``path``, refusing the NaN and Infinity that Python's json would accept."""

    def refuse(name: str) -> None:
        raise AssertionError(f"{path.name} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def temp_files(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if ".tmp-" in p.name)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """An uninterrupted run that every interrupted one must end up equal to."""
    run = tmp_path_factory.mktemp("runs") / "whole"
    assert main(["train", "digits", "--out", str(run), *SMALL]) == 0
    return run


def assert_same_run(a: Path, b: Path) -> None:
    sa, sb = strict_json(a / "summary.json"), strict_json(b / "summary.json")
    for key in ("test_accuracy", "test_loss", "best_epoch", "best_val_accuracy"):
        assert sa[key] == sb[key], key
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def assert_files_agree(run: Path, capsys) -> None:
    """summary.json, model.safetensors, checkpoint.pt and evaluate name the same best epoch."""
    if not (run / "checkpoint.pt").exists():
        return
    best = torch.load(run / "checkpoint.pt", weights_only=True)["best"]["epoch"]
    if (run / "summary.json").exists():
        assert strict_json(run / "summary.json")["best_epoch"] == best
        assert load_model(run / "model.safetensors")[1]["epoch"] == best
    rc, out, err = run_cli(capsys, "evaluate", run)
    assert rc == 0, err
    assert f"weights of epoch {best}" in out


# ---- options and data are checked before anything is read or written


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "inf"], "--lr must be a finite number greater than 0; got inf"),
        (["--lr", "nan"], "--lr must be a finite number greater than 0; got nan"),
        (["--lr", "0"], "--lr must be a finite number greater than 0; got 0.0"),
        (["--clip-grad", "nan"], "--clip-grad must be a finite number greater than 0, or 0"),
        (["--clip-grad", "-1"], "--clip-grad must be a finite number greater than 0, or 0"),
        (["--weight-decay", "-1"], "--weight-decay must be a finite number, 0 or more; got -1.0"),
        (["--momentum", "nan"], "--momentum must be in [0, 1]; got nan"),
        (["--dropout", "1"], "--dropout must be in [0, 1); got 1.0"),
        (["--batch-size", "0"], "--batch-size must be a positive integer; got 0"),
        (["--epochs", "0"], "--epochs must be a positive integer; got 0"),
        (["--hidden-size", "0"], "--hidden-size must be a positive integer; got 0"),
        (["--log-every", "-1"], "--log-every must be 0 or more; got -1"),
        (["--seed", "-1"], "--seed must be between 0 and 4294967295; got -1"),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) else None,
)
def test_options_out_of_range_are_refused_before_the_data_is_read(tmp_path, capsys, argv, message):
    out = tmp_path / "r"
    # The data file does not exist: the option must be refused first.
    rc, _, err = run_cli(
        capsys, "train", "digits", "--data", tmp_path / "none.csv", "--out", out, *argv
    )
    assert_one_line_error(rc, err, message)
    assert not out.exists()


@pytest.mark.parametrize("task", ["tagger", "textclf"])
def test_embedding_dim_zero_is_refused(tmp_path, capsys, task):
    data = ["--data", tmp_path / "none.tsv"] if task == "textclf" else []
    rc, _, err = run_cli(
        capsys, "train", task, *data, "--embedding-dim", "0", "--out", tmp_path / "r"
    )
    assert_one_line_error(rc, err, "--embedding-dim must be a positive integer; got 0")


def test_evaluate_and_predict_refuse_batch_size_zero(baseline, capsys, tmp_path):
    rc, _, err = run_cli(capsys, "evaluate", baseline, "--batch-size", "0")
    assert_one_line_error(rc, err, "--batch-size must be a positive integer; got 0")
    (tmp_path / "in.csv").write_text(",".join(["0"] * 64) + "\n")
    rc, _, err = run_cli(capsys, "predict", baseline, tmp_path / "in.csv", "--batch-size", "0")
    assert_one_line_error(rc, err, "--batch-size must be a positive integer; got 0")


def test_nan_in_a_digits_csv_is_named_before_training(tmp_path, capsys):
    rows = [["0"] * 64 + [str(k % 10)] for k in range(40)]
    rows[6][5] = "nan"
    (tmp_path / "d.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    out = tmp_path / "r"
    rc, _, err = run_cli(capsys, "train", "digits", "--data", tmp_path / "d.csv", "--out", out)
    assert_one_line_error(rc, err, "d.csv', line 7: pixel 6 is 'nan'")
    assert not out.exists()
    rows[6][5], rows[3][64] = "0", "42"
    (tmp_path / "d.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    rc, _, err = run_cli(capsys, "train", "digits", "--data", tmp_path / "d.csv", "--out", out)
    assert_one_line_error(rc, err, "line 4: the label is '42'; expected a whole number from 0 to 9")


def test_a_series_too_large_to_standardise_is_refused(tmp_path, capsys):
    series = 1e308 * (0.5 + 0.4 * np.sin(np.arange(400) * 2 * np.pi / 8))
    (tmp_path / "s.csv").write_text("v\n" + "\n".join(str(float(v)) for v in series) + "\n")
    argv = ["--data", tmp_path / "s.csv", "--window", "8", "--period", "8"]
    rc, _, err = run_cli(capsys, "train", "forecast", *argv, "--out", tmp_path / "r")
    assert_one_line_error(rc, err, "s.csv: the values are too large to standardise", "rescale")


# ---- the run folder


def test_an_unwritable_out_is_refused_before_the_data_is_read(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    none = tmp_path / "none.csv"
    rc, _, err = run_cli(capsys, "train", "digits", "--data", none, "--out", tmp_path / "file")
    assert_one_line_error(rc, err, "is a file, not a folder")
    out = tmp_path / "file" / "run"
    rc, _, err = run_cli(capsys, "train", "digits", "--data", none, "--out", out)
    assert_one_line_error(rc, err, "cannot make the run folder", "is a file, not a folder")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_folder_is_refused_before_the_data_is_read(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    none = tmp_path / "none.csv"
    rc, _, err = run_cli(capsys, "train", "digits", "--data", none, "--out", locked / "r")
    assert_one_line_error(rc, err, "cannot write the run folder", "not writable")


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs on the GPU here")
def test_backend_triton_without_gpu_or_interpreter_is_refused_before_the_run_folder(
    tmp_path, capsys, monkeypatch
):
    from rnnkit.engines.triton import kernels as triton_kernels

    # As if TRITON_INTERPRET had not been set when the kernels were imported.
    monkeypatch.setattr(triton_kernels, "_INTERPRET", False)
    out = tmp_path / "r"
    rc, _, err = run_cli(capsys, "train", "digits", "--backend", "triton", "--out", out, *SMALL)
    assert_one_line_error(rc, err, "--backend triton cannot run on cpu")
    assert not out.exists()


def test_ctrl_c_in_the_first_epoch_leaves_a_folder_the_same_command_reuses(
    baseline, tmp_path, capsys, monkeypatch
):
    run = tmp_path / "r"
    for again in ([], ["--resume"]):
        with monkeypatch.context() as m:

            def interrupt(path, state):
                raise KeyboardInterrupt

            m.setattr(rnnkit.train.state, "save_checkpoint", interrupt)
            rc, _, err = run_cli(capsys, "train", "digits", "--out", run, *SMALL)
        assert rc == 130 and "Start over with the same command" in err
        assert (run / "config.json").exists() and not (run / "checkpoint.pt").exists()
        rc, _, err = run_cli(capsys, "evaluate", run)
        assert_one_line_error(rc, err, "stopped before its first epoch ended")
        rc, _, err = run_cli(capsys, "train", "digits", "--out", run, *SMALL, *again)
        assert rc == 0, err
        assert ("nothing to resume" in err) == bool(again)
        assert_same_run(baseline, run)
        for name in ("checkpoint.pt", "summary.json", "model.safetensors"):
            (run / name).unlink()
        # Only a folder that never committed an epoch is reused.
        (run / "metrics.jsonl").write_text("")


def test_a_stale_temporary_file_is_removed_on_resume(tmp_path, capsys, monkeypatch):
    run = tmp_path / "r"
    with monkeypatch.context() as m:
        real = rnnkit.train.state.save_checkpoint

        def save_then_stop(path, state):
            real(path, state)
            raise KeyboardInterrupt

        m.setattr(rnnkit.train.state, "save_checkpoint", save_then_stop)
        assert run_cli(capsys, "train", "digits", "--out", run, *SMALL)[0] == 130
    # What a process killed in the middle of a write leaves; PID 2**22 + 1 is beyond pid_max.
    (run / f".checkpoint.pt.tmp-{2**22 + 1}").write_bytes(b"half")
    rc, _, err = run_cli(capsys, "train", "digits", "--out", run, "--resume", "--quiet")
    assert rc == 0, err
    assert temp_files(run) == []


@pytest.mark.parametrize("free", [10_000, 10**12], ids=["disk-full", "other"])
def test_torch_save_failure_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch, free):
    run = tmp_path / "r"
    calls = {"n": 0}
    real_save = torch.save

    def fail_on_second(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
        return real_save(obj, f, *a, **k)

    usage = rnnkit.train.checkpoint.shutil.disk_usage(tmp_path)._replace(free=free)
    with monkeypatch.context() as m:
        m.setattr(rnnkit.train.checkpoint.torch, "save", fail_on_second)
        m.setattr(rnnkit.train.checkpoint.shutil, "disk_usage", lambda _: usage)
        rc, _, err = run_cli(capsys, "train", "digits", "--out", run, *SMALL)
    cause = "No space left on device" if free < 2**20 else "RuntimeError: [enforce fail"
    assert_one_line_error(
        rc, err, "could not write", "checkpoint.pt", cause, "previous version", status=1
    )
    assert temp_files(run) == []
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert_files_agree(run, capsys)


def test_a_failed_weights_write_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(rnnkit.train.checkpoint, "save_file", full)
    rc, _, err = run_cli(capsys, "train", "digits", "--out", tmp_path / "r", *SMALL)
    assert_one_line_error(
        rc, err, "could not write", "model.safetensors", "No space left", status=1
    )
    assert temp_files(tmp_path / "r") == []


# ---- non-finite numbers


def test_a_non_finite_loss_stops_with_status_1_keeping_the_last_good_epoch(
    tmp_path, capsys, monkeypatch
):
    run = tmp_path / "r"
    real = rnnkit.tasks.classify.ClassificationTask.scores
    calls = {"n": 0}

    def scores(self, out, y):
        loss, count, metric = real(self, out, y)
        # Training steps only (validation takes another path): poison epoch 2's third step.
        if out.requires_grad:
            calls["n"] += 1
            if calls["n"] == 13:
                loss = loss * float("nan")
        return loss, count, metric

    with monkeypatch.context() as m:
        m.setattr(rnnkit.tasks.classify.ClassificationTask, "scores", scores)
        rc, _, err = run_cli(capsys, "train", "digits", "--out", run, *SMALL)
    assert_one_line_error(
        rc, err, "training stopped: the training loss became nan at step 13 (epoch 2)", status=1
    )
    assert "the checkpoint of epoch 1 and the weights of epoch 1" in err
    assert not (run / "summary.json").exists()
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    for line in (run / "metrics.jsonl").read_text().splitlines():
        assert "NaN" not in line and "Infinity" not in line
    assert_files_agree(run, capsys)


def test_a_huge_learning_rate_stops_instead_of_training_to_nan(tmp_path, capsys):
    run = tmp_path / "r"
    rc, _, err = run_cli(capsys, "train", "digits", "--out", run, *SMALL, "--lr", "1e38")
    assert_one_line_error(rc, err, "training stopped", "try a smaller --lr (it is 1e+38)", status=1)
    assert not (run / "summary.json").exists()


def test_json_files_hold_null_never_nan(tmp_path, capsys, monkeypatch):
    write_json(tmp_path / "x.json", {"a": float("nan"), "b": [float("inf"), 1.5]})
    assert strict_json(tmp_path / "x.json") == {"a": None, "b": [None, 1.5]}
    real = rnnkit.tasks.classify.ClassificationTask.report

    def report(self, out, y, split):
        r = real(self, out, y, split)
        r.metrics["test_loss"] = float("nan")
        return r

    monkeypatch.setattr(rnnkit.tasks.classify.ClassificationTask, "report", report)
    run = tmp_path / "r"
    rc, _, err = run_cli(capsys, "train", "digits", "--out", run, *SMALL)
    assert rc == 0, err
    assert strict_json(run / "summary.json")["test_loss"] is None
    rc, _, err = run_cli(capsys, "evaluate", run, "--output", tmp_path / "e.json")
    assert rc == 0, err
    assert strict_json(tmp_path / "e.json")["test_loss"] is None


# ---- the weights file's checksum


def test_every_flipped_byte_of_the_model_file_is_refused(baseline, tmp_path):
    data = (baseline / "model.safetensors").read_bytes()
    header = int.from_bytes(data[:8], "little")
    rng = np.random.default_rng(0)
    # Bytes of the header (shapes, offsets, metadata) and of the tensors alike.
    spots = sorted({*rng.integers(8, 8 + header, 25), *rng.integers(8 + header, len(data), 50)})
    damaged = tmp_path / "model.safetensors"
    for spot in spots:
        flipped = bytearray(data)
        flipped[spot] ^= 1 << int(rng.integers(8))
        damaged.write_bytes(bytes(flipped))
        with pytest.raises(CheckpointError, match=r"model\.safetensors"):
            load_model(damaged)


def test_a_flipped_weight_bit_is_a_clear_error_naming_the_file(baseline, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(baseline, run)
    data = bytearray((run / "model.safetensors").read_bytes())
    data[-5] ^= 0x10
    (run / "model.safetensors").write_bytes(bytes(data))
    rc, _, err = run_cli(capsys, "evaluate", run)
    assert_one_line_error(rc, err, "model.safetensors' is damaged", "SHA-256")


# ---- a kill between any two writes


class Killed(BaseException):
    """Stands for kill -9: no except clause of rnnkit catches it."""


def _writes(monkeypatch, stop_after: int | None) -> list[str]:
    """Record the files written (atomically) in order; raise Killed after ``stop_after`` of them."""
    names: list[str] = []
    real = rnnkit.train.checkpoint.atomic_write

    def write(path, fn):
        real(path, fn)
        names.append(path.name)
        if len(names) == stop_after:
            raise Killed

    monkeypatch.setattr(rnnkit.train.checkpoint, "atomic_write", write)
    return names


def test_a_kill_between_any_two_writes_leaves_files_that_agree_and_resume(
    baseline, tmp_path, capsys, monkeypatch
):
    with monkeypatch.context() as m:
        order = _writes(m, None)
        assert main(["train", "digits", "--out", str(tmp_path / "count"), *SMALL]) == 0
    # The weights go before the checkpoint (the commit record) of each improving epoch.
    assert order.count("model.safetensors") == 2
    assert order.index("model.safetensors") < order.index("checkpoint.pt")
    for k in range(1, len(order)):
        run = tmp_path / f"killed-after-{k}-{order[k - 1]}"
        with monkeypatch.context() as m:
            _writes(m, k)
            with pytest.raises(Killed):
                main(["train", "digits", "--out", str(run), *SMALL])
        assert_files_agree(run, capsys)
        rc, _, err = run_cli(capsys, "train", "digits", "--out", run, "--resume", *SMALL)
        assert rc == 0, f"after write {k} ({order[k - 1]}): {err}"
        assert_same_run(baseline, run)
        assert_files_agree(run, capsys)
        assert temp_files(run) == []


_KILL_IN_CHECKPOINT_2 = """
import os, sys
import rnnkit.train.checkpoint as tc
from rnnkit.cli import main

real, seen = tc.atomic_write, []

def atomic_write(path, write):
    if path.name == "checkpoint.pt" and seen.count("checkpoint.pt") == 1:
        # Epoch 2's weights are written; die half-way through its checkpoint.
        write(path.with_name(f".{path.name}.tmp-{os.getpid()}"))
        os._exit(137)
    real(path, write)
    seen.append(path.name)

tc.atomic_write = atomic_write
sys.exit(main(sys.argv[1:]))
"""


def test_a_real_kill_inside_a_checkpoint_write_is_recovered(baseline, tmp_path, capsys):
    run = tmp_path / "r"
    argv = ["train", "digits", "--out", str(run), *SMALL]
    done = subprocess.run(
        [sys.executable, "-c", _KILL_IN_CHECKPOINT_2, *argv], capture_output=True, text=True
    )
    assert done.returncode == 137, done.stderr
    # What the dead process was writing is left behind, as kill -9 leaves it.
    assert [name.split("-")[0] for name in temp_files(run)] == [".checkpoint.pt.tmp"]
    # The weights file is an epoch ahead of the checkpoint; evaluate follows the checkpoint.
    assert load_model(run / "model.safetensors")[1]["epoch"] == 2
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert_files_agree(run, capsys)
    rc, _, err = run_cli(capsys, "train", "digits", "--out", run, "--resume", *SMALL)
    assert rc == 0, err
    assert_same_run(baseline, run)
    assert temp_files(run) == []
