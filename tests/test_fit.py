"""``rnnkit.fit``, ``rnnkit.load`` and ``rnnkit.predict`` from Python, on the user's own module and
tensors; the TOML config, bf16 autocast, TensorBoard and the light ``import rnnkit``."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import rnnkit
import rnnkit.train.state
from rnnkit.cli import main
from rnnkit.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """A user's own module: a GRU over (B, T, 3) and a linear head on its last output."""

    def __init__(self, classes: int = 2) -> None:
        super().__init__()
        self.rnn = rnnkit.GRU(3, 8, batch_first=True)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def sign_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences whose class is whether their first feature sums above zero: learnable."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 3, generator=g)
    return x, (x[:, :, 0].sum(1) > 0).long()


def config(tmp_path: Path, **changes) -> TrainConfig:
    base = TrainConfig(epochs=4, batch_size=16, lr=0.02, out=str(tmp_path / "run"), quiet=True)
    return base.replace(**changes)


def test_fit_learns_a_user_module_on_tensors_and_keeps_the_best_weights(tmp_path):
    torch.manual_seed(0)
    model = Net()
    history = rnnkit.fit(model, sign_data(256, 0), sign_data(64, 1), config=config(tmp_path))
    losses = history["train_loss"]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    assert history["val_accuracy"][history.best_epoch - 1] == max(history["val_accuracy"])
    run = history.run_dir
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "model.safetensors"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_epoch"] == history.best_epoch and not summary["stopped_early"]
    best = torch.load(run / "checkpoint.pt", weights_only=True)["best"]["state"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, best[k]), k


def test_fit_takes_datasets_and_dataloaders_and_regression_targets(tmp_path):
    x, _ = sign_data(64, 0)
    target = x[:, :, 0].sum(1, keepdim=True)  # float targets: mean squared error and MAE
    torch.manual_seed(0)
    h = rnnkit.fit(
        Net(classes=1),
        TensorDataset(x, target),
        DataLoader(TensorDataset(x, target), batch_size=32),
        config=config(tmp_path, epochs=2),
    )
    assert set(h.epochs[0]) >= {"train_mae", "val_mae", "val_loss"}
    assert h["train_loss"][1] < h["train_loss"][0]
    # A DataLoader as the training data: the objective is inferred from one of its batches.
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(*sign_data(64, 0)), batch_size=16, shuffle=True)
    h = rnnkit.fit(Net(), loader, config=config(tmp_path / "loader", epochs=2))
    assert "train_accuracy" in h.epochs[0] and h["train_loss"][1] < h["train_loss"][0]


def test_fit_with_a_loss_and_metric_given(tmp_path):
    def agree(out, y):
        return (out.argmax(-1) == y).float().mean()

    torch.manual_seed(0)
    h = rnnkit.fit(
        Net(),
        sign_data(128, 0),
        sign_data(32, 1),
        config=config(tmp_path, epochs=2),
        loss=nn.CrossEntropyLoss(),
        metric=agree,
    )
    assert "val_agree" in h.epochs[-1] and 0 <= h["val_agree"][-1] <= 1


def _train(tmp_path: Path, name: str, interrupt_after: int | None, monkeypatch) -> nn.Module:
    torch.manual_seed(0)
    model = Net()
    c = config(tmp_path / name, epochs=3)
    if interrupt_after is not None:
        real, calls = rnnkit.train.state.save_checkpoint, {"n": 0}

        def save_then_stop(path, state):
            real(path, state)
            calls["n"] += 1
            if calls["n"] == interrupt_after:
                raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(rnnkit.train.state, "save_checkpoint", save_then_stop)
            with pytest.raises(KeyboardInterrupt):
                rnnkit.fit(model, sign_data(96, 0), sign_data(32, 1), config=c)
        # A new process would build the model afresh; resuming replaces its weights anyway.
        torch.manual_seed(123)
        model = Net()
        c = c.replace(resume=True)
    rnnkit.fit(model, sign_data(96, 0), sign_data(32, 1), config=c)
    return model


def test_fit_resumes_bit_identically(tmp_path, monkeypatch):
    straight = _train(tmp_path, "a", None, monkeypatch)
    resumed = _train(tmp_path, "b", 1, monkeypatch)
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    a = (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()
    strip = [re.sub(r'"seconds": [0-9.e-]+', "", line) for line in a]
    assert strip == [re.sub(r'"seconds": [0-9.e-]+', "", line) for line in b]


def test_fit_refuses_to_resume_with_other_options(tmp_path):
    torch.manual_seed(0)
    c = config(tmp_path, epochs=1)
    rnnkit.fit(Net(), sign_data(32, 0), sign_data(16, 1), config=c)
    with pytest.raises(ValueError, match=r"these differ: lr 0.5 \(the run has 0.02\)"):
        rnnkit.fit(Net(), sign_data(32, 0), sign_data(16, 1), config=c.replace(resume=True, lr=0.5))
    # What may change between a run and its resumption: threads, quiet, the device.
    h = rnnkit.fit(
        Net(), sign_data(32, 0), sign_data(16, 1), config=c.replace(resume=True, threads=1)
    )
    assert [r["epoch"] for r in h.epochs] == [1]


class Frozen(nn.Module):
    """Outputs that no step can change: every epoch after the first ties with it."""

    def __init__(self) -> None:
        super().__init__()
        self.fixed = nn.Linear(3, 2).requires_grad_(False)
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.fixed(x[:, -1]) + 0 * self.unused


def test_fit_stops_early_after_patience_epochs_without_improvement(tmp_path):
    h = rnnkit.fit(
        Frozen(), sign_data(64, 0), sign_data(32, 1), config=config(tmp_path, patience=2)
    )
    # Epoch 1 is the best; epochs 2 and 3 do not beat it; epoch 4 never runs.
    assert [r["epoch"] for r in h.epochs] == [1, 2, 3]
    assert h.stopped_early and h.best_epoch == 1
    summary = json.loads((h.run_dir / "summary.json").read_text())
    assert summary["stopped_early"] and summary["epochs"] == 3


def test_load_and_predict_a_user_module_by_str_and_path(tmp_path):
    torch.manual_seed(0)
    model = Net()
    x, y = sign_data(64, 0)
    h = rnnkit.fit(model, (x, y), (x, y), config=config(tmp_path, epochs=1))
    with pytest.raises(ValueError, match=r"pass model=<a new instance of it>"):
        rnnkit.load(h.run_dir)
    for where in (str(h.run_dir), h.run_dir):
        loaded = rnnkit.load(where, model=Net())
        assert loaded.run_info["task"] == "fit" and not loaded.training
        expected = model.eval()(x).detach()
        # Batches of 7 rows instead of 64: the same numbers up to the GEMMs' rounding.
        torch.testing.assert_close(rnnkit.predict(loaded, x, batch_size=7), expected)


def test_bf16_autocast_on_the_cpu(tmp_path):
    torch.manual_seed(0)
    model = Net()
    seen = []
    model.head.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    h = rnnkit.fit(
        model, sign_data(128, 0), sign_data(32, 1), config=config(tmp_path, precision="bf16")
    )
    assert seen and set(seen) == {torch.bfloat16}
    assert h["train_loss"][-1] < h["train_loss"][0]
    assert model.head.weight.dtype == torch.float32


def test_tensorboard_scalars_beside_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    h = rnnkit.fit(
        Net(), sign_data(64, 0), sign_data(32, 1), config=config(tmp_path, tensorboard=True)
    )
    events = EventAccumulator(str(h.run_dir / "tensorboard"))
    events.Reload()
    train_loss = events.Scalars("epoch/train_loss")
    assert [round(e.value, 4) for e in train_loss] == [round(v, 4) for v in h["train_loss"]]
    assert "step/loss" in events.Tags()["scalars"]


def test_fit_refuses_bad_arguments_in_the_users_terms(tmp_path):
    with pytest.raises(TypeError, match="train_data must be a tuple"):
        rnnkit.fit(Net(), [[1, 2]], config=config(tmp_path))
    with pytest.raises(ValueError, match="same first"):
        rnnkit.fit(Net(), (torch.zeros(4, 2, 3), torch.zeros(5)), config=config(tmp_path))
    with pytest.raises(ValueError, match=r"patience .* needs val_data"):
        rnnkit.fit(Net(), sign_data(8, 0), config=config(tmp_path, patience=1))
    with pytest.raises(ValueError, match="--lr must be a finite number greater than 0"):
        rnnkit.fit(Net(), sign_data(8, 0), config=config(tmp_path, lr=-1.0))
    with pytest.raises(ValueError, match="--precision must be one of fp32, bf16"):
        rnnkit.fit(Net(), sign_data(8, 0), config=config(tmp_path, precision="fp8"))
    with pytest.raises(TypeError, match="run_dir must be a str or a path"):
        rnnkit.load(3)


def test_a_toml_config_with_a_flag_overriding_it(tmp_path, capsys):
    toml = tmp_path / "digits.toml"
    toml.write_text('cell = "gru"\nhidden-size = 12\nepochs = 3\nlr = 1\nbidirectional = true\n')
    run = tmp_path / "r"
    rc = main(["train", "digits", "--config", str(toml), "--epochs", "1", "--out", str(run)])
    assert rc == 0, capsys.readouterr().err
    options = json.loads((run / "config.json").read_text())["options"]
    assert options["cell"] == "gru" and options["hidden_size"] == 12 and options["bidirectional"]
    assert options["epochs"] == 1 and options["lr"] == 1.0 and isinstance(options["lr"], float)
    capsys.readouterr()
    for text, message in (
        ("hiden-size = 3\n", "unknown option 'hiden_size'"),
        ('hidden-size = "big"\n', "hidden_size must be int"),
        ('cell = "transformer"\n', "cell must be one of rnn, lstm, gru"),
        ("[model]\nhidden-size = 3\n", "options are flat"),
        ("hidden-size = \n", "is not valid TOML"),
    ):
        toml.write_text(text)
        rc = main(["train", "digits", "--config", str(toml), "--out", str(tmp_path / "x")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and err.count("\n") == 1, err


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"rnnkit {rnnkit.__version__}"


def test_import_rnnkit_leaves_dynamo_and_the_training_stack_alone():
    # What rnnkit adds to what torch itself imports (torch.hub imports tqdm where it is there).
    code = (
        "import sys, torch; before = set(sys.modules); import rnnkit; "
        "new = set(sys.modules) - before; "
        "print(sorted(m for m in ('torch._dynamo', 'matplotlib', 'safetensors', 'tqdm', "
        "'tensorboard', 'rnnkit.train.loop') if m in new))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_readme_python_training_example_runs_as_written(tmp_path):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Train your own model in Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "best epoch" in out.stdout
