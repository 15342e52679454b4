"""int8 against float32 accuracy: the tasks' default models and random layers.

    .venv/bin/python benchmarks/bench_int8_accuracy.py                  # trains what is missing
    .venv/bin/python benchmarks/bench_int8_accuracy.py --runs runs/int8 --tasks digits forecast

For each task (digits, the EWT tagger, the Taylor forecaster) it trains the default model with
``rnnkit train TASK`` into ``--runs/TASK`` (reused when it is already there), then evaluates its
test part with the float32 weights and with ``rnnkit.quantize`` (what ``rnnkit evaluate
--quantize`` prints). Then random layers (torch.nn's initialisation, inputs N(0, 1)): the
relative error of the int8 layer's output against float32's, over T steps.
"""

import argparse
import subprocess
import sys
from pathlib import Path

import torch

import rnnkit
from rnnkit.tasks import TASKS
from rnnkit.train.api import load, task_of
from rnnkit.train.data import SplitSource

METRICS = {"digits": "test_accuracy", "tagger": "test_accuracy", "forecast": "mae"}


def evaluate(run: Path, quantize: bool, **override) -> dict:
    """The test metrics, as ``rnnkit evaluate`` computes them: with what training learnt after
    reading the data (the forecaster's calibration), then ``override``'s entries."""
    model = load(run, quantize=quantize)
    task = task_of(model)
    prepared = task.prepare(model.run_info["data"])
    saved = model.run_info["preprocessing"]
    task.preprocessing.update({k: saved[k] for k in task.calibration_keys if k in saved})
    task.preprocessing.update(override)
    out, y = SplitSource(prepared.test, task).outputs(model, "cpu", 256)
    return task.report(out, y, prepared.test).metrics


def _row(name: str, key: str, f: float, q: float) -> list[str]:
    if key == "mae":
        return [name, key, f"{f:.2f}", f"{q:.2f}", f"{100 * (q - f) / f:+.2f}% of MAE"]
    return [name, key, f"{100 * f:.2f}%", f"{100 * q:.2f}%", f"{100 * (q - f):+.2f} points"]


def task_rows(runs: Path, tasks: list[str]) -> list[list[str]]:
    rows = []
    for name in tasks:
        run = runs / name
        if not (run / "summary.json").exists():
            cmd = [sys.executable, "-m", "rnnkit", "train", name, "--out", str(run), "--quiet"]
            print(f"# training: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
        key = METRICS[name]
        rows.append(_row(name, key, evaluate(run, False)[key], evaluate(run, True)[key]))
        if name == "forecast":
            # The point forecast may be the linear base alone (network_weight 0), which int8
            # leaves as it is; the network's median alone shows what int8 does to the network.
            median = {"network_weight": 1.0}
            f, q = (evaluate(run, quantize, **median)[key] for quantize in (False, True))
            rows.append(_row("forecast, the network's median alone", key, f, q))
    return rows


def layer_rows(T: int, B: int) -> list[list[str]]:
    rows = []
    configs = [
        ("LSTM", 256, {}), ("GRU", 256, {}), ("RNN", 256, {}), ("LSTM", 64, {}),
        ("LSTM", 256, {"layer_norm": True}), ("GRU", 256, {"layer_norm": True}),
        ("LSTM", 256, {"proj_size": 64}), ("LSTM", 256, {"num_layers": 2, "bidirectional": True}),
    ]  # fmt: skip
    for mode, H, kw in configs:
        torch.manual_seed(0)
        layer = getattr(rnnkit, mode)(H, H, **kw).eval()
        x = torch.randn(T, B, H)
        with torch.no_grad():
            exact = layer.double()(x.double())[0]
            layer.float()
            f32 = layer(x)[0].double()
        got = rnnkit.quantize(layer)(x)[0].double()
        rel = float((got - exact).norm() / exact.norm())
        rel32 = float((f32 - exact).norm() / exact.norm())
        opts = ", ".join(f"{k}={v}" for k, v in kw.items()) or "plain"
        rows.append([mode, str(H), opts, f"{rel:.2e}", f"{float((got - exact).abs().max()):.2e}",
                     f"{rel32:.1e}"])  # fmt: skip
    return rows


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--runs", type=Path, default=Path("runs/int8-accuracy"))
    p.add_argument("--tasks", nargs="*", default=list(METRICS), choices=sorted(METRICS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    assert all(t in TASKS for t in args.tasks)
    print(f"# int8 kernel: {rnnkit.engines.native.int8.kernel()}, torch {torch.__version__}")
    if args.tasks:
        print(table(["task", "metric", "float32", "int8", "int8 - float32"],
                    task_rows(args.runs, args.tasks)))  # fmt: skip
        print()
    head = ["layer", "I=H", "options", "int8 rel. error", "int8 max abs error",
            "float32 rel. error"]  # fmt: skip
    print(f"Random layers, T={args.steps}, B={args.batch}, against float64:")
    print(table(head, layer_rows(args.steps, args.batch)))


if __name__ == "__main__":
    main()
