"""Engine x mode x shape x dtype timing table, with torch.nn measured in the same run.

    .venv/bin/python benchmarks/bench_engines.py                      # CPU, the issue's shapes
    .venv/bin/python benchmarks/bench_engines.py --device cuda --dtype float32 bfloat16
    .venv/bin/python benchmarks/bench_engines.py --shapes 100x64x256 --modes lstm

Prints a Markdown table: median milliseconds of forward (no grad) and forward+backward, peak memory
of forward+backward (CUDA only), and each engine's ratio to torch.nn (cuDNN or oneDNN) at the same
configuration. Timing uses CUDA events on CUDA and perf_counter on the CPU, after warm-up.
"""

import argparse
import platform
import statistics
import time

import torch

import rnnkit

DEFAULT_SHAPES = [
    "100x1x256",
    "100x16x256",
    "100x64x256",
    "100x64x512",
    "100x128x1024",
    "1000x16x256",
]
TORCH = {"rnn": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
OURS = {"rnn": rnnkit.RNN, "lstm": rnnkit.LSTM, "gru": rnnkit.GRU}


def timed(fn, device: str, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(layer, x, device, repeats):
    def forward():
        with torch.no_grad():
            layer(x)

    def train_step():
        out, _ = layer(x.requires_grad_(False).detach().requires_grad_())
        out.backward(torch.ones_like(out))

    fwd = timed(forward, device, repeats)
    peak = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        train_step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    both = timed(train_step, device, repeats)
    return fwd, both, peak


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} x{len(names)}"
    except (OSError, IndexError):
        return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", nargs="+", default=["float32"])
    p.add_argument("--modes", nargs="+", default=["lstm", "gru", "rnn"])
    p.add_argument("--engines", nargs="+", default=["fused", "reference"])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="TxBxH with I=H")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--reference-max-steps",
        type=int,
        default=100,
        help="skip the slow reference engine above this T (it is linear in T)",
    )
    args = p.parse_args()
    device = args.device
    print(
        f"device: {_device_name(device)}, "
        f"threads: {torch.get_num_threads()}, torch {torch.__version__}, "
        f"TF32: {torch.backends.cuda.matmul.allow_tf32}\n"
    )
    print(
        "| mode | T | B | I=H | dtype | engine | fwd ms | fwd+bwd ms | peak MiB "
        "| fwd / torch.nn | fwd+bwd / torch.nn |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for mode in args.modes:
            for shape in args.shapes:
                T, B, H = map(int, shape.split("x"))
                torch.manual_seed(0)
                x = torch.randn(T, B, H, device=device, dtype=dtype)
                ref = TORCH[mode](H, H, device=device, dtype=dtype)
                base = measure(ref, x, device, args.repeats)
                rows = [("torch.nn", base)]
                for engine in args.engines:
                    if engine == "reference" and T > args.reference_max_steps:
                        continue
                    layer = OURS[mode](H, H, device=device, dtype=dtype, backend=engine)
                    layer.load_state_dict(ref.state_dict())
                    rows.append((engine, measure(layer, x, device, args.repeats)))
                for name, (fwd, both, peak) in rows:
                    mem = f"{peak:.0f}" if peak is not None else "n/a"
                    print(
                        f"| {mode} | {T} | {B} | {H} | {dtype_name} | {name} "
                        f"| {fwd:.2f} | {both:.2f} | "
                        f"{mem} | {fwd / base[0]:.2f} | {both / base[1]:.2f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
