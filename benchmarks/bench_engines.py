"""Engine x mode x shape x dtype timing table, with torch.nn measured in the same run.

    .venv/bin/python benchmarks/bench_engines.py                      # CPU, the issue's shapes
    .venv/bin/python benchmarks/bench_engines.py --device cuda --dtype float32 bfloat16
    .venv/bin/python benchmarks/bench_engines.py --shapes 100x64x256 --modes lstm
    .venv/bin/python benchmarks/bench_engines.py --shapes 100x1x256 100x16x256 100x64x256 \
        --engines fused fused+ln --onnxruntime --repeats 15     # issue 9's targets
    .venv/bin/python benchmarks/bench_engines.py --dtype bfloat16 --engines auto fused \
        --shapes 100x16x256 100x64x256 --modes lstm gru         # bfloat16 against float32
    .venv/bin/python benchmarks/bench_engines.py --as-avx2 ...  # as on a CPU without AVX-512

Prints a Markdown table: median milliseconds of forward (no grad) and forward+backward, peak memory
of forward+backward (CUDA only), and each engine's ratio to torch.nn (cuDNN or oneDNN) at the same
configuration. Timing uses CUDA events on CUDA and perf_counter on the CPU, after warm-up; the
rows of one configuration run interleaved (a b c a b c ...), medians of --repeats. ``fused+ln``
is the fused engine with layer_norm=True, compared with torch.nn's plain layer.

``--as-avx2`` runs every row as a CPU with AVX2 and no AVX-512 would (rnnkit's baseline build,
torch's kernels held to AVX2 by their own environment variables; see AVX2_ENV), to measure the
AVX2 targets on a machine that has AVX-512: the baseline build alone would race torch's AVX-512
code. The caches and clock stay this machine's.

With a low-precision ``--dtype`` on the CPU every row is compared with torch.nn in float32 (the
rows ``torch.nn float32`` and, per engine, ``ENGINE float32`` are added), since bfloat16 is
there to be faster than float32; torch.nn's own bfloat16 row is printed where its oneDNN kernel
runs on this CPU, else marked as failing.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
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


# What a CPU with AVX2 and no AVX-512 runs, on one that has AVX-512 (``--as-avx2``): rnnkit's
# baseline build, and torch's own kernels (ATen), oneDNN (torch.nn's RNN layers), MKL and
# fbgemm (torch's int8) each held to its AVX2 code. Each library reads its variable when it
# loads, so the script runs itself again with them set. ONNX Runtime has no such setting: its
# rows stay on the CPU's best code. Caches and clock are this machine's, not an AVX2 CPU's.
AVX2_ENV = {
    "RNNKIT_NATIVE_ARCH": "baseline",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
}
AS_AVX2_HELP = "run torch's kernels and rnnkit's loop as on a CPU with AVX2 and no AVX-512"


def as_avx2(wanted: bool) -> str:
    """With ``wanted``, run this script again under AVX2_ENV unless it already is; the
    instruction sets in use, for a table's header."""
    if wanted and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})
    from rnnkit.engines.native import loop as native_loop

    held = ", oneDNN, MKL and fbgemm held to AVX2 (--as-avx2)" if wanted else ""
    return (f"rnnkit's native build: {native_loop.ARCH}, "
            f"torch's CPU kernels: {torch.backends.cpu.get_cpu_capability()}{held}")  # fmt: skip


def _once(fn, device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(fns: dict, device: str, repeats: int) -> dict:
    """Median ms of each function, run in turn (``a b c a b c ...``) after one warm-up each, so
    that a slow period of a shared machine hits every row alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_once(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def steps(layer, x):
    """(forward without grad, forward+backward) of ``layer`` on ``x``."""

    def forward():
        with torch.no_grad():
            layer(x)

    def train_step():
        out, _ = layer(x.detach().requires_grad_())
        out.backward(torch.ones_like(out))

    return forward, train_step


def peak_memory(train_step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    train_step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def onnxruntime_forward(ref, x, rewrite=None):
    """Inference of torch.nn's layer exported to ONNX (its own LSTM/GRU/RNN operator) in ONNX
    Runtime with torch's thread count and spinning off; None where it is not installed.
    ``rewrite(path) -> path``: a transformation of the exported file first (quantization)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    path = os.path.join(tempfile.mkdtemp(), "layer.onnx")
    torch.onnx.export(ref, (x,), path, dynamo=False, input_names=["x"])
    if rewrite is not None:
        path = rewrite(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: session.run(None, feed)


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
        "--onnxruntime",
        action="store_true",
        help="add ONNX Runtime's inference of the exported torch.nn layer (CPU, float32)",
    )
    p.add_argument("--as-avx2", action="store_true", help=AS_AVX2_HELP)
    p.add_argument(
        "--proj-size", type=int, default=0, help="LSTM rows with this projection (proj_size)"
    )
    p.add_argument(
        "--reference-max-steps",
        type=int,
        default=100,
        help="skip the slow reference engine above this T (it is linear in T)",
    )
    args = p.parse_args()
    device = args.device
    isa = as_avx2(args.as_avx2)
    print(
        f"device: {_device_name(device)}, "
        f"threads: {torch.get_num_threads()}, torch {torch.__version__}, "
        f"TF32: {torch.backends.cuda.matmul.allow_tf32}, {isa}\n"
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
                table(mode, T, B, H, dtype, dtype_name, device, args)


def _runs(layer, x) -> bool:
    try:
        with torch.no_grad():
            layer(x[:2])
        return True
    except RuntimeError:
        return False


def table(mode, T, B, H, dtype, dtype_name, device, args) -> None:
    torch.manual_seed(0)
    low = device == "cpu" and dtype not in (torch.float32, torch.float64)
    x = torch.randn(T, B, H, device=device, dtype=dtype)
    base = "torch.nn float32" if low else "torch.nn"
    # LSTM's projection (--proj-size) on both sides.
    proj = {"proj_size": args.proj_size} if mode == "lstm" and args.proj_size else {}
    ref = TORCH[mode](H, H, device=device, **proj)
    layers = {base: ref}
    if low:
        ref_low = TORCH[mode](H, H, device=device, dtype=dtype, **proj)
        if _runs(ref_low, x):
            layers["torch.nn"] = ref_low
        else:
            print(f"| {mode} | {T} | {B} | {H} | {dtype_name} | torch.nn | fails on this CPU "
                  "| | | | |")  # fmt: skip
    for engine in args.engines:
        if engine == "reference" and T > args.reference_max_steps:
            continue
        kwargs = {}
        if engine.endswith("+ln"):
            if mode == "rnn":
                continue
            engine, kwargs = engine[:-3], {"layer_norm": True}
        name = engine + ("+ln" if kwargs else "")
        for layer_dtype in (dtype, torch.float32) if low else (dtype,):
            layer = OURS[mode](
                H, H, device=device, dtype=layer_dtype, backend=engine, **kwargs, **proj
            )
            layer.load_state_dict(ref.state_dict(), strict=not kwargs)
            layers[name if layer_dtype == dtype else f"{name} float32"] = layer
    forwards, trains = {}, {}
    for name, layer in layers.items():
        # Each layer reads the input in its own dtype.
        forwards[name], trains[name] = steps(layer, x.to(layer.weight_hh_l0.dtype))
    if args.onnxruntime and device == "cpu" and dtype == torch.float32:
        ort_forward = onnxruntime_forward(ref, x)
        if ort_forward is not None:
            forwards["onnxruntime"] = ort_forward
    fwd = interleaved(forwards, device, args.repeats)
    both = interleaved(trains, device, args.repeats)
    for name in forwards:
        peak = peak_memory(trains[name]) if device == "cuda" and name in trains else None
        mem = f"{peak:.0f}" if peak is not None else "n/a"
        train = f"{both[name]:.2f}" if name in both else "n/a"
        ratio = f"{both[name] / both[base]:.2f}" if name in both else "n/a"
        print(
            f"| {mode} | {T} | {B} | {H} | {dtype_name} | {name} | {fwd[name]:.2f} | {train} | "
            f"{mem} | {fwd[name] / fwd[base]:.2f} | {ratio} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
