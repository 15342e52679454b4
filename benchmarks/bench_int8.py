"""int8 inference against float32 and the int8 layers a user could pick instead, with each row's
distance from the machine's floor.

    .venv/bin/python benchmarks/bench_int8.py                       # LSTM and GRU, B=1, 16, 64
    .venv/bin/python benchmarks/bench_int8.py --modes lstm --batches 1 --repeats 31
    .venv/bin/python benchmarks/bench_int8.py --as-avx2    # as on a CPU without AVX-512
    .venv/bin/python benchmarks/bench_int8.py --batches 2 4 6 8 --splits   # how threads split

Rows per configuration (T steps, B sequences, I=H, one layer, forward under ``no_grad``):
``torch.nn`` float32 (oneDNN), ``torch int8`` (``torch.ao.quantization.quantize_dynamic``,
fbgemm), ``onnxruntime`` float32 and, for LSTM, ``onnxruntime int8`` (its
``quantize_dynamic``: DynamicQuantizeLSTM; it has no int8 GRU), rnnkit's ``native`` float32
engine and ``rnnkit int8`` (``rnnkit.quantize``). Medians of ``--repeats`` interleaved runs.

The floor of a row is what the machine cannot beat for that arithmetic: every step reads its
recurrent weights (4 bytes a weight in float32, 1 in int8) at the measured read bandwidth of a
working set that size, or does its multiply-adds at the peak rate, whichever is longer, plus
the input side's multiply-adds at the peak rate. Both are measured here by ``floor.c``, on this
machine and thread count: the bandwidth with each thread re-reading its share of the working
set, the peaks with independent chains of FMA (float32) or of the int8 instructions rnnkit's
kernel uses on this build for several rows (AVX-512 VNNI's vpdpbusd, else AVX2's vpmaddwd and
vpaddd on int16) from registers. Each is the best of five measurements: a busy machine can only
slow one down, and a floor measured in a slow moment came out above the time of the rows.
"""

import argparse
import ctypes
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

import rnnkit
from rnnkit.engines.native import build as native_build
from rnnkit.engines.native import int8
from rnnkit.engines.native import loop as native_loop

sys.path.insert(0, str(Path(__file__).parent))
from bench_engines import AS_AVX2_HELP, _device_name, as_avx2, interleaved, onnxruntime_forward
from bench_native_loop import forced_split

TORCH = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}
OURS = {"lstm": rnnkit.LSTM, "gru": rnnkit.GRU}
GATES = {"lstm": 4, "gru": 3}


def split_forced(split: str, fn):
    """``fn`` with the int8 loop's threads made to split the work as ``split`` says ("units" or
    "rows", instead of loop.c's q8_rows_pay): bench_native_loop's probe of the loop's Python
    entry point, which ``int8.run_layer`` calls."""

    def run():
        with forced_split(split):
            return fn()

    return run


def _median_seconds(fn, repeats: int = 9) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Floor:
    """The measured read bandwidth (by working-set size) and peak multiply-add rates."""

    def __init__(self, threads: int) -> None:
        source = Path(__file__).with_name("floor.c")
        # The instruction set of the loop's build (RNNKIT_NATIVE_ARCH=baseline: AVX2).
        march = native_loop.ARCHES[native_loop.ARCH]
        flags = ["-O3", f"-march={march}", "-fopenmp", "-fPIC", "-shared"]
        self.lib = native_build.build(source, [flags])
        self.lib.read_seconds.restype = ctypes.c_double
        self.threads = threads
        self._bandwidth: dict[int, float] = {}
        self.lib.peak_macs.restype = ctypes.c_double
        i64 = ctypes.c_int64
        self.f32_macs = max(self.lib.peak_macs(i64(0), i64(threads)) for _ in range(5))
        self.int8_macs = max(self.lib.peak_macs(i64(1), i64(threads)) for _ in range(5))
        if min(self.f32_macs, self.int8_macs) <= 0:
            raise SystemExit("bench_int8: this CPU has neither AVX2 nor AVX-512; no floor")

    def bandwidth(self, nbytes: int) -> float:
        """Bytes per second that the threads read from a working set of ``nbytes``."""
        if nbytes not in self._bandwidth:
            reps = max(10, int(2e9 // max(nbytes, 1)) // 10)
            i64 = ctypes.c_int64
            runs = [self.lib.read_seconds(i64(nbytes), i64(reps), i64(self.threads))
                    for _ in range(5)]  # fmt: skip
            self._bandwidth[nbytes] = nbytes * reps / min(runs)
        return self._bandwidth[nbytes]

    def ms(self, T: int, B: int, I: int, H: int, gates: int, weight_bytes: int, int8_: bool):
        """The floor of a T-step forward, in milliseconds."""
        macs = self.int8_macs if int8_ else self.f32_macs
        step_bytes = gates * H * H * weight_bytes
        step = max(step_bytes / self.bandwidth(step_bytes), B * gates * H * H / macs)
        return (T * step + T * B * gates * H * I / macs) * 1e3


def onnx_int8(path: str) -> str:
    """ONNX Runtime's dynamic int8 quantization of an exported layer (its DynamicQuantizeLSTM)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    qpath = path.replace(".onnx", "-int8.onnx")
    quantize_dynamic(path, qpath, weight_type=QuantType.QInt8)
    return qpath


def rows_for(
    mode: str, T: int, B: int, H: int, repeats: int, floor: Floor, splits: bool = False
) -> list[list[str]]:
    torch.manual_seed(0)
    ref = TORCH[mode](H, H).eval()
    ours = OURS[mode](H, H, backend="native").eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, B, H)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_int8 = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(ref), {TORCH[mode]}, dtype=torch.qint8
        )
    ours_int8 = rnnkit.quantize(ours)
    fns = {}
    for name, layer in [("torch.nn", ref), ("torch int8", torch_int8), ("native", ours),
                        ("rnnkit int8", ours_int8)]:  # fmt: skip
        fns[name] = lambda layer=layer: layer(x)
    if splits:
        for split in ("units", "rows"):
            fns[f"rnnkit int8, threads take {split}"] = split_forced(split, fns["rnnkit int8"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fns["onnxruntime"] = onnxruntime_forward(ref, x)
        if mode == "lstm":
            fns["onnxruntime int8"] = onnxruntime_forward(ref, x, onnx_int8)
    fns = {k: v for k, v in fns.items() if v is not None}
    with torch.no_grad():
        ms = interleaved(fns, "cpu", repeats)
    g = GATES[mode]
    out = []
    for name, t in ms.items():
        quantized = "int8" in name
        f = floor.ms(T, B, H, H, g, 1 if quantized else 4, quantized)
        out.append([mode, str(T), str(B), str(H), name, f"{t:.3f}", f"{t / ms['torch.nn']:.2f}",
                    f"{t / T * 1e3:.1f}", f"{f / T * 1e3:.1f}", f"{f / t:.2f}"])  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--modes", nargs="+", default=["lstm", "gru"], choices=sorted(TORCH))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--as-avx2", action="store_true", help=AS_AVX2_HELP)
    p.add_argument("--splits", action="store_true",
                   help="also rnnkit int8 with its threads made to take units, and rows, of "
                        "every step (what loop.c's q8_rows_pay chooses between)")  # fmt: skip
    args = p.parse_args()
    isa = as_avx2(args.as_avx2)
    torch.set_num_threads(args.threads)
    floor = Floor(args.threads)
    print(f"# {_device_name('cpu')}, {args.threads} threads, torch {torch.__version__}, "
          f"int8 kernel: {int8.kernel()}, {isa}")  # fmt: skip
    print(
        f"# measured peaks (floor.c, from registers): float32 FMA {floor.f32_macs / 1e9:.1f} "
        f"GMAC/s, int8 {floor.int8_macs / 1e9:.1f} GMAC/s"
    )
    for nbytes in sorted({GATES[m] * args.hidden**2 * w for m in args.modes for w in (1, 4)}):
        print(f"# read bandwidth, {nbytes / 2**10:.0f} KiB working set: "
              f"{floor.bandwidth(nbytes) / 1e9:.1f} GB/s")  # fmt: skip
    print()
    head = ["mode", "T", "B", "I=H", "engine", "fwd ms", "/ torch.nn", "us/step",
            "floor us/step", "floor / time"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for mode in args.modes:
        for B in args.batches:
            rows = rows_for(mode, args.steps, B, args.hidden, args.repeats, floor, args.splits)
            for row in rows:
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
