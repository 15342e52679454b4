"""The native time loop (engines/native/) against torch.nn and the fused engine, one layer.

    .venv/bin/python benchmarks/bench_native_loop.py
    .venv/bin/python benchmarks/bench_native_loop.py --modes lstm --batches 1 --repeats 21
    .venv/bin/python benchmarks/bench_native_loop.py --modes lstm gru --layer-norm
    .venv/bin/python benchmarks/bench_native_loop.py --gemms --batches 16 64
    .venv/bin/python benchmarks/bench_native_loop.py --modes lstm --batches 1 2 8 --own-loops

Prints a Markdown table: median milliseconds of forward (no grad) and forward+backward for
torch.nn (oneDNN), rnnkit's fused engine (backend="fused") and the native loop (the same layer's
weights through ``native.op.run_layer``), and each one's ratio to torch.nn. The three run
interleaved, repeat by repeat, so that a machine shared with other work slows all alike. With
``--layer-norm`` the fused and native columns run the layer-norm variant (issue 9's target
compares it with torch.nn's plain layer). ``--own-loops`` runs the native column on the own dot
products instead of the panels (what a step below ``GEMM_MIN_ROWS`` rows runs). ``--gemms``
prints instead the input side's GEMMs of one LSTM layer (``x W_ih^T + b`` and its input
gradient ``dG W_ih``) through torch's addmm/mm (MKL) and through oneDNN
(``engines/native/onednn.py``), interleaved.
"""

import argparse
import statistics
import time

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


def steps(fn, x):
    def forward():
        with torch.no_grad():
            fn(x)

    def train():
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.gemms:
        gemms(args)
        return
    assert native_loop.available(torch.float32), "the native loop could not be built"
    print(f"T={args.T}, I=H={args.H}, float32, {args.threads} threads, median of "
          f"{args.repeats} interleaved repeats; torch {torch.__version__}, native panels from "
          f"{native_loop.GEMM_MIN_ROWS} rows"
          f"{'; fused and native: layer_norm=True' if args.layer_norm else ''}\n")  # fmt: skip
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
                                            False if args.own_loops else None), x),
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
        "dx dnn": lambda: onednn._linear(dG, w.t().contiguous(), None),
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
        print(f"| {B} | {m['fwd mkl']:.2f} | {m['fwd dnn']:.2f} | "
              f"{m['fwd dnn'] / m['fwd mkl']:.2f} | {m['dx mkl']:.2f} | {m['dx dnn']:.2f} | "
              f"{m['dx dnn'] / m['dx mkl']:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
