"""The cells, one step a call, against torch.nn's: the loop a user writes around a cell.

    .venv/bin/python benchmarks/bench_cells.py                       # every cell, B=1 and 8
    .venv/bin/python benchmarks/bench_cells.py --cells GRUCell --hidden 64 256 --repeats 3001

A cell call is a few small operators, so its time is mostly the cost of calling them (Python and
torch's dispatch), not arithmetic: these rows measure that. Each configuration times torch.nn's
cell and rnnkit's holding the same weights, interleaved (``a b a b ...``), forward under
``no_grad`` and forward+backward of the step's output, medians of ``--repeats`` calls after a
warm-up; I = H.
"""

import argparse
import sys
from pathlib import Path

import torch

import rnnkit

sys.path.insert(0, str(Path(__file__).parent))
from bench_engines import _device_name, interleaved

CELLS = ("RNNCell", "LSTMCell", "GRUCell")


def calls(cell, x, hx):
    """(forward without grad, forward+backward) of one step of ``cell``."""

    def forward():
        with torch.no_grad():
            cell(x, hx)

    def train_step():
        out = cell(x, hx)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    return forward, train_step


def rows(name: str, B: int, H: int, repeats: int) -> list[str]:
    torch.manual_seed(0)
    ref = getattr(torch.nn, name)(H, H)
    ours = getattr(rnnkit, name)(H, H)
    ours.load_state_dict(ref.state_dict())
    x, h = torch.randn(B, H), torch.randn(B, H)
    hx = (h, torch.randn(B, H)) if name == "LSTMCell" else h
    fwd, train = {}, {}
    for label, cell in (("torch.nn", ref), ("rnnkit", ours)):
        fwd[label], train[label] = calls(cell, x, hx)
    f, t = interleaved(fwd, "cpu", repeats), interleaved(train, "cpu", repeats)
    return [
        f"| {name} | {B} | {H} | {label} | {f[label] * 1e3:.1f} | {t[label] * 1e3:.1f} | "
        f"{f[label] / f['torch.nn']:.2f} | {t[label] / t['torch.nn']:.2f} |"
        for label in fwd
    ]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cells", nargs="+", default=list(CELLS), choices=CELLS)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--hidden", nargs="+", type=int, default=[64, 256])
    p.add_argument("--repeats", type=int, default=1001)
    args = p.parse_args()
    print(f"# {_device_name('cpu')}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| cell | B | I=H | module | fwd us | fwd+bwd us | fwd / torch.nn | fwd+bwd / torch.nn |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.cells:
        for B in args.batches:
            for H in args.hidden:
                print("\n".join(rows(name, B, H, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
