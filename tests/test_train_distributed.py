"""Two CPU processes under torchrun train one model with DistributedDataParallel (gloo)."""

import json
import math
import os
import subprocess
import sys


def test_two_gloo_processes_finish_and_agree(tmp_path):
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "rnnkit",
        "train",
        "digits",
        "--epochs",
        "2",
        "--hidden-size",
        "16",
        "--batch-size",
        "32",
        "--out",
        str(run),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    # Both processes end with bit-identical weights.
    a, b = summary["rank_checksums"]
    assert a == b
    # Each process took its half of every epoch: ceil(ceil(1259 / 2) / 32) steps per epoch,
    # not ceil(1259 / 32).
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs] == [math.ceil(math.ceil(1259 / 2) / 32) * k for k in (1, 2)]
    # Only rank 0 writes: one final table, one set of files.
    assert done.stdout.count("run folder:") == 1
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert 0 <= summary["test_accuracy"] <= 1
