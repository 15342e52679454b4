"""The native loop's buffer pool on and off in one process, interleaved: training and inference
milliseconds of the fused engine on the CPU.

    .venv/bin/python benchmarks/bench_native_pool.py --shapes 100x16x256 100x64x256 --repeats 9

A process of this machine runs in one of two speed modes (BENCHMARKS.md), which two processes
cannot compare; here both settings share one. The pool is switched through
``native_loop.POOL_MAX_BYTES`` (what ``RNNKIT_NATIVE_POOL_MIB`` sets at import; 0: no pool).
Prints a Markdown table of medians.
"""

import argparse
import statistics
import time

import torch

import rnnkit
from rnnkit.engines.native import loop as native_loop

OURS = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--modes", nargs="+", default=["lstm", "gru"])
    p.add_argument("--shapes", nargs="+", default=["100x16x256", "100x64x256"], help="TxBxH, I=H")
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args()
    pooled = native_loop.POOL_MAX_BYTES or 512 << 20
    cases = {}
    for mode in args.modes:
        for shape in args.shapes:
            T, B, H = map(int, shape.split("x"))
            layer, x = OURS[mode](H, H, backend="fused"), torch.randn(T, B, H)

            def forward(layer=layer, x=x):
                with torch.no_grad():
                    layer(x)

            def train(layer=layer, x=x):
                out, _ = layer(x.detach().requires_grad_())
                out.backward(torch.ones_like(out))

            for pool in (0, pooled):
                for what, fn in (("fwd", forward), ("fwd+bwd", train)):
                    cases[(mode, T, B, H, what, pool)] = fn
    for (*_, pool), fn in cases.items():
        native_loop.POOL_MAX_BYTES = pool
        fn()
    times = {key: [] for key in cases}
    for _ in range(args.repeats):
        for key, fn in cases.items():
            native_loop.POOL_MAX_BYTES = key[-1]
            t0 = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - t0) * 1e3)
    print(f"threads: {torch.get_num_threads()}, torch {torch.__version__}\n")
    print("| mode | T | B | I=H | pass | no pool ms | pool ms | pool / no pool |")
    print("|---|---|---|---|---|---|---|---|")
    for (mode, T, B, H, what, pool), t in times.items():
        if pool:
            base, ms = statistics.median(times[(mode, T, B, H, what, 0)]), statistics.median(t)
            row = f"| {mode} | {T} | {B} | {H} | {what} | {base:.2f} | {ms:.2f}"
            print(f"{row} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
