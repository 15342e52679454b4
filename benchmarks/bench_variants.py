"""The cost of each variant: fused and reference engines against plain torch.nn, same run.

    .venv/bin/python benchmarks/bench_variants.py                    # CPU, T=100, B=64, I=H=256
    .venv/bin/python benchmarks/bench_variants.py --device cuda --hidden 512

Prints a Markdown table of median forward+backward milliseconds (training mode), the ratio to
torch.nn's plain layer and, for the fused engine, the overhead over the same fused layer without
the variant.
"""

import argparse

import torch
from bench_engines import measure

import rnnkit

VARIANTS = {
    "plain": {},
    "layer_norm": {"layer_norm": True},
    "zoneout=0.1": {"zoneout": 0.1},
    "recurrent_dropout=0.25": {"recurrent_dropout": 0.25},
    "weight_drop=0.5": {"weight_drop": 0.5},
    "learn_init": {"learn_init": True},
}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--modes", nargs="+", default=["lstm", "gru"])
    p.add_argument("--engines", nargs="+", default=["fused", "reference"])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    T, B, H = args.steps, args.batch, args.hidden
    print(f"T={T}, B={B}, I=H={H}, {args.dtype}, {device}, threads {torch.get_num_threads()}\n")
    print("| mode | variant | engine | fwd+bwd ms | / torch.nn plain | / fused plain |")
    print("|---|---|---|---|---|---|")
    x = torch.randn(T, B, H, device=device, dtype=dtype)
    for mode in args.modes:
        ref = getattr(torch.nn, mode.upper())(H, H, device=device, dtype=dtype)
        base = measure(ref, x, device, args.repeats)[1]
        print(f"| {mode} | plain | torch.nn | {base:.1f} | 1.00 | |", flush=True)
        fused_plain = None
        for name, kw in VARIANTS.items():
            for engine in args.engines:
                layer = getattr(rnnkit, mode.upper())(
                    H, H, device=device, dtype=dtype, backend=engine, **kw
                )
                both = measure(layer.train(), x, device, args.repeats)[1]
                if engine == "fused" and name == "plain":
                    fused_plain = both
                over = f"{both / fused_plain:.2f}" if engine == "fused" and fused_plain else ""
                print(
                    f"| {mode} | {name} | {engine} | {both:.1f} | {both / base:.2f} | {over} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
