"""The native time loop (engines/native/) against torch.nn and the fused engine, one layer.

    .venv/bin/python benchmarks/bench_native_loop.py
    .venv/bin/python benchmarks/bench_native_loop.py --modes lstm --batches 1 --repeats 21
    .venv/bin/python benchmarks/bench_native_loop.py --modes lstm gru --layer-norm
    .venv/bin/python benchmarks/bench_native_loop.py --gemms --batches 16 64
    .venv/bin/python benchmarks/bench_native_loop.py --modes lstm --batches 1 2 8 --own-loops
    .venv/bin/python benchmarks/bench_native_loop.py --breakdown --modes lstm --batches 16 64
    .venv/bin/python benchmarks/bench_native_loop.py --modes lstm gru --batches 16 64 --split units

Prints a Markdown table: median milliseconds of forward (no grad) and forward+backward for
torch.nn (oneDNN), rnnkit's fused engine (backend="fused") and the native loop (the same layer's
weights through ``native.op.run_layer``), and each one's ratio to torch.nn. The three run
interleaved, repeat by repeat, so that a machine shared with other work slows all alike. With
``--layer-norm`` the fused and native columns run the layer-norm variant (issue 9's target
compares it with torch.nn's plain layer). ``--own-loops`` runs the native column on the own dot
products instead of the panels (what a step below ``GEMM_MIN_ROWS`` rows runs). ``--split
units`` (or ``rows``) makes the native column's threads split the hidden units of every step
(or take rows of the batch) whatever loop.c's rule picks, while the fused column keeps the
rule: one interleaved run compares the two splits. ``--gemms``
prints instead the input side's GEMMs of one LSTM layer (``x W_ih^T + b`` and its input
gradient ``dG W_ih``) through torch's addmm/mm (MKL) and through oneDNN
(``engines/native/onednn.py``), interleaved. ``--breakdown`` prints instead where one training
step (forward and backward) of the fused engine goes: each part timed where it runs (the C
loops, the input side's GEMM, its backward, ``dW_hh``, the rest: Python, autograd, the norms'
torch ops, the gradients' accumulation), beside its floor, its multiply-adds at the float32
peak that ``floor.c`` measures with the same threads, and torch.nn's whole step.
"""

import argparse
import contextlib
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

import rnnkit
from rnnkit.engines.native import loop as native_loop
from rnnkit.engines.native import onednn
from rnnkit.engines.native import op as ops
from rnnkit.engines.spec import StepVariants

TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
OURS = {"rnn": rnnkit.RNN, "lstm": rnnkit.LSTM, "gru": rnnkit.GRU}
MODE = {"rnn": "RNN_TANH", "lstm": "LSTM", "gru": "GRU"}


def native_call(mode: str, layer: torch.nn.Module, T: int, B: int, gemm: bool | None = None):
    """``x -> out`` on the native loop with ``layer``'s parameters (and its layer norm's);
    ``gemm=False``: the own dot products instead of the panels."""
    weights = [getattr(layer, f"{n}_l0") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    ln = getattr(layer, "variants", None) is not None and layer.variants.layer_norm
    variants = StepVariants(layer._layer_norm_params()[0]) if ln else None

    def run(x):
        H = layer.hidden_size
        h0 = x.new_zeros(B, H)
        c0 = x.new_zeros(B, H) if mode == "LSTM" else None
        out, _, _ = ops.run_layer(mode, False, (B,) * T, x.reshape(T * B, -1), h0, c0,
                                  *weights, None, variants, gemm=gemm)  # fmt: skip
        return out

    return run


@contextlib.contextmanager
def forced_split(split: str):
    """The native loop's forward and backward with their threads split as ``split`` says."""
    if split == "auto":
        yield
        return
    forward, backward = native_loop.forward, native_loop.backward
    native_loop.forward = functools.partial(forward, split=split)
    native_loop.backward = functools.partial(backward, split=split)
    try:
        yield
    finally:
        native_loop.forward, native_loop.backward = forward, backward


def steps(fn, x, context=contextlib.nullcontext):
    def forward():
        with torch.no_grad(), context():
            fn(x)

    def train():
        with context():
            out = fn(x.detach().requires_grad_())
            out = out[0] if isinstance(out, tuple) else out
            out.backward(torch.ones_like(out))

    return forward, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["lstm", "gru", "rnn"], choices=list(TORCH))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--H", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layer-norm", action="store_true", help="fused and native: layer_norm=True")
    ap.add_argument("--gemms", action="store_true", help="the input side's GEMMs: MKL, oneDNN")
    ap.add_argument("--own-loops", action="store_true",
                    help="native: the own dot products for every step (gemm=False), no panels")
    ap.add_argument("--split", default="auto", choices=["auto", "units", "rows"],
                    help="native: how its threads share the work (loop.py's forward)")
    ap.add_argument("--breakdown", action="store_true",
                    help="where a fused training step goes, part by part, against its floor")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.gemms:
        gemms(args)
        return
    if args.breakdown:
        breakdown(args)
        return
    assert native_loop.available(torch.float32), "the native loop could not be built"
    print(f"T={args.T}, I=H={args.H}, float32, {args.threads} threads, median of "
          f"{args.repeats} interleaved repeats; torch {torch.__version__}, native panels from "
          f"{native_loop.GEMM_MIN_ROWS} rows"
          f"{'; fused and native: layer_norm=True' if args.layer_norm else ''}"
          f"{f'; native: split={args.split}' if args.split != 'auto' else ''}\n")  # fmt: skip
    print("| mode | B | torch.nn fwd | fused fwd | native fwd | torch.nn f+b | fused f+b | "
          "native f+b | fused/torch fwd, f+b | native/torch fwd, f+b |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in args.modes:
        for B in args.batches:
            ref = TORCH[m](args.H, args.H)
            extra = {"layer_norm": True} if args.layer_norm and m != "rnn" else {}
            fused = OURS[m](args.H, args.H, backend="fused", **extra)
            fused.load_state_dict(ref.state_dict(), strict=not extra)
            x = torch.randn(args.T, B, args.H)
            runs = {
                "torch": steps(ref, x),
                "fused": steps(fused, x),
                "native": steps(native_call(MODE[m], fused, args.T, B,
                                            False if args.own_loops else None), x,
                                functools.partial(forced_split, args.split)),
            }
            times = {(k, p): [] for k in runs for p in ("fwd", "f+b")}
            for fwd, train in runs.values():
                fwd(), train()
            for _ in range(args.repeats):
                for k, (fwd, train) in runs.items():
                    for p, fn in (("fwd", fwd), ("f+b", train)):
                        t0 = time.perf_counter()
                        fn()
                        times[k, p].append((time.perf_counter() - t0) * 1e3)
            med = {k: statistics.median(v) for k, v in times.items()}

            def ratio(k, med=med):
                return f"{med[k, 'fwd'] / med['torch', 'fwd']:.2f}x, " \
                       f"{med[k, 'f+b'] / med['torch', 'f+b']:.2f}x"  # fmt: skip

            cells = [f"{med[k, p]:.2f}" for p in ("fwd", "f+b") for k in runs]
            print(f"| {m} | {B} | " + " | ".join(cells) + f" | {ratio('fused')} | "
                  f"{ratio('native')} |", flush=True)  # fmt: skip


def _gemm_runs(x, w, b, dG) -> dict:
    return {
        "fwd mkl": lambda: torch.addmm(b, x, w.t()),
        "fwd dnn": lambda: onednn._linear(x, w, b),
        "dx mkl": lambda: dG @ w,
        "dx dnn": lambda: onednn._linear(dG, w.t(), None),  # as _InputSide.backward: a view
    }


def gemms(args) -> None:
    """Median ms of one LSTM layer's input-side GEMMs (N = T*B rows), MKL against oneDNN."""
    assert onednn.usable(torch.empty(1)), "torch's oneDNN linear is not available here"
    print(f"T={args.T}, I=H={args.H}, LSTM (G*H = {4 * args.H}), float32, {args.threads} "
          f"threads, median of {args.repeats} interleaved repeats; torch {torch.__version__}\n")
    print("| B | x W_ih^T + b, addmm | oneDNN | oneDNN / addmm | dG W_ih, mm | oneDNN | "
          "oneDNN / mm |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for B in args.batches:
        N, H, GH = args.T * B, args.H, 4 * args.H
        runs = _gemm_runs(torch.randn(N, H), torch.randn(GH, H), torch.randn(GH),
                          torch.randn(N, GH))  # fmt: skip
        times = {k: [] for k in runs}
        for fn in runs.values():
            fn()
        for _ in range(args.repeats):
            for k, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1e3)
        m = {k: statistics.median(v) for k, v in times.items()}
        print(f"| {B} | {m['fwd mkl']:.3f} | {m['fwd dnn']:.3f} | "
              f"{m['fwd dnn'] / m['fwd mkl']:.2f} | {m['dx mkl']:.3f} | {m['dx dnn']:.3f} | "
              f"{m['dx dnn'] / m['dx mkl']:.2f} |", flush=True)  # fmt: skip


# The parts of a fused training step, with the multiply-adds of each as (rows N, K, columns),
# K = I for the input side, H for the recurrent side (I = H here).
PARTS = {
    "input side x W_ih^T + b": 1,
    "C forward loop (h W_hh^T and the cells)": 1,
    "C backward loop (dG W_hh and the cells)": 1,
    "input side backward (dx, dW_ih, db)": 2,
    "dW_hh": 1,
}


@contextlib.contextmanager
def _timed_parts(times: dict):
    """Time each part of PARTS where it runs, appending milliseconds to ``times[part]``, by
    wrapping the functions that run them (private ones: this is a benchmark's probe)."""
    names = list(PARTS)

    def timed(part, fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            r = fn(*a, **k)
            times[part].append((time.perf_counter() - t0) * 1e3)
            return r

        return run

    run_c, input_side, w_hh_grad = native_loop._run, onednn.input_side, ops._w_hh_grad
    side_backward = onednn._InputSide.backward

    def run_loop(fn, *a):
        part = names[1] if fn.__name__.startswith("nl_forward") else names[2]
        return timed(part, run_c)(fn, *a)

    native_loop._run = run_loop
    onednn.input_side = timed(names[0], input_side)
    onednn._InputSide.backward = staticmethod(timed(names[3], side_backward))
    ops._w_hh_grad = timed(names[4], w_hh_grad)
    try:
        yield
    finally:
        native_loop._run, onednn.input_side, ops._w_hh_grad = run_c, input_side, w_hh_grad
        onednn._InputSide.backward = staticmethod(side_backward)


def breakdown(args) -> None:
    """Median ms of each part of a fused training step against its floor, and torch.nn's step."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_int8 import Floor

    peak = Floor(args.threads).f32_macs
    print(f"T={args.T}, I=H={args.H}, float32, {args.threads} threads, median of "
          f"{args.repeats} steps (torch.nn's interleaved); torch {torch.__version__}; float32 "
          f"peak (floor.c, {args.threads} threads) {peak / 1e9:.1f} GMAC/s"
          f"{'; layer_norm=True' if args.layer_norm else ''}\n")  # fmt: skip
    for m in args.modes:
        for B in args.batches:
            ref = TORCH[m](args.H, args.H)
            extra = {"layer_norm": True} if args.layer_norm and m != "rnn" else {}
            fused = OURS[m](args.H, args.H, backend="fused", **extra)
            x = torch.randn(args.T, B, args.H)
            ref_train, fused_train = steps(ref, x)[1], steps(fused, x)[1]
            parts = {k: [] for k in PARTS}
            step, ref_step = [], []
            ref_train(), fused_train()
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ref_train()
                ref_step.append((time.perf_counter() - t0) * 1e3)
                with _timed_parts(parts):
                    t0 = time.perf_counter()
                    fused_train()
                    step.append((time.perf_counter() - t0) * 1e3)
            gw = {"lstm": 4, "gru": 3, "rnn": 1}[m] * args.H
            macs = args.T * B * args.H * gw
            med = {k: statistics.median(v) for k, v in parts.items() if v}
            total, ref_total = statistics.median(step), statistics.median(ref_step)
            print(f"{m}, B={B}: fused step {total:.2f} ms, torch.nn {ref_total:.2f} ms "
                  f"({total / ref_total:.2f}x)\n")  # fmt: skip
            print("| part | ms | floor ms | floor / ms |")
            print("|---|---|---|---|")
            floors = 0.0
            for k, ms in med.items():
                floor = PARTS[k] * macs / peak * 1e3
                floors += floor
                print(f"| {k} | {ms:.2f} | {floor:.2f} | {floor / ms:.2f} |")
            rest = total - sum(med.values())
            print(f"| the rest | {rest:.2f} | 0 | |")
            print(f"| step | {total:.2f} | {floors:.2f} | {floors / total:.2f} |\n", flush=True)


if __name__ == "__main__":
    main()
