"""Ahead-of-time compile of the Triton kernels for real NVIDIA targets, with no GPU.

    python tools/triton_aot.py [--targets 80,90,100] [--jobs 2] [--full] [-v]

The interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels) accepts code that the real
compiler rejects or crashes on, so this compiles every kernel the way a GPU would:

1. Imports :mod:`rnnkit.engines.triton.kernels` with ``TRITON_INTERPRET`` unset, so its kernels
   are real ``JITFunction``\\ s, and replaces ``JITFunction.run`` (what ``kernel[grid](...)``
   calls) by a recorder that binds the arguments as Triton's launcher does for a CUDA target
   (dtypes, int and pointer specialisations, constexprs, num_warps) and launches nothing.
2. Runs the public layers (LSTM, GRU, RNN; float32, float64, bfloat16, float16; a sweep of H and
   B, packed and ragged, bidirectional; training and inference; layer norm, zoneout, projection)
   on CPU tensors through the triton engine, so every launcher records the
   signatures it really uses.
3. Compiles one launch per (kernel, dtypes, constexprs, num_warps) down to cubin with
   ``triton.compile`` and Triton's bundled ptxas, for each target, in a pool of forked children:
   a compiler abort (an LLVM assertion is a SIGABRT) costs only the child. Registers, spills and
   shared memory come from the bundled ``cuobjdump`` and the metadata.

Fails (exit status 1) on a crash, a compile error, a kernel that would not launch on the target
(shared memory over its limit, registers x threads over the 64K of an SM), a kernel no scenario
reached, or more specialisations than a ragged sweep should produce. A compiler abort inside a
user's process cannot be caught at run time; this check, run in CI, is the guard against it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import ClassVar

# Per compute capability: the opt-in maximum of dynamic shared memory per block, bytes.
MAX_SHARED = {75: 65536, 80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
REGS_PER_SM = 65536
# Distinct launch specialisations a kernel may have over the whole sweep (dtypes, H, layouts):
# B is not specialised and blocks depend on H only, so ragged batches add none.
MAX_SPECIALISATIONS_PER_KERNEL = 48
# The CI sweep's storage dtypes per target (--full: all of them everywhere), to fit about a
# minute on two cores: float16 compiles as bfloat16 does (16-bit storage, float32 math), so it
# is checked on sm_90 only; float64, whose products need the most shared memory, on sm_80 (the
# smallest limit) and sm_90. Targets not listed get every dtype.
CI_DTYPES = {80: {"fp32", "bf16", "fp64"}, 90: {"fp32", "bf16", "fp16", "fp64"},
             100: {"fp32", "bf16"}}  # fmt: skip


def _parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python tools/triton_aot.py",
        description="Compile rnnkit's Triton kernels ahead of time for NVIDIA targets (no GPU).",
    )
    p.add_argument(
        "--targets",
        default="80,90,100",
        help="compute capabilities; those the installed ptxas does not know are "
        "skipped with a note (default: 80,90,100)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="compiler processes in parallel (default: 2)",
    )
    p.add_argument(
        "--full",
        action="store_true",
        help="a wider sweep of H and B (slower); default: the CI sweep",
    )
    p.add_argument(
        "--kernels", default="", help="compile only these kernels (comma-separated names)"
    )
    p.add_argument("--job-timeout", type=float, default=120.0)
    p.add_argument("-v", "--verbose", action="store_true", help="one line per compile")
    return p.parse_args(argv)


# ---------------------------------------------------------------- record the launches
@dataclass
class Launch:
    fn: object
    kwargs: dict
    bound_args: tuple
    specialization: list
    options: tuple
    grid: tuple
    keys: set = field(default_factory=set)


def _skey(v) -> str:
    return v.cache_key if hasattr(v, "cache_key") else repr(v)


def install_recorder(tk) -> dict:
    """Make every ``kernel[grid](...)`` record its binding instead of launching; returns the
    dict of recorded launches, keyed by kernel name and specialisation."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime import jit as tjit

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binders: dict = {}
    records: dict = {}

    def run(self, *args, grid, warmup, **kwargs):
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", self.debug) or triton.knobs.runtime.debug
        binder = binders.get(id(self))
        if binder is None:
            binder = tjit.create_function_from_signature(self.signature, self.params, backend)
            binders[id(self)] = binder
        bound_args, specialization, options = binder(*args, **kwargs)
        key = (
            self.__name__,
            tuple(tuple(_skey(x) for x in s) for s in specialization),
            tuple(sorted((k, repr(v)) for k, v in kwargs.items())),
        )
        if key not in records:
            grid = grid(bound_args) if callable(grid) else grid
            records[key] = Launch(self, kwargs, bound_args, specialization, options, tuple(grid))
        return None

    tjit.JITFunction.run = run
    # Let the engine take CPU tensors: nothing runs, only the bindings matter.
    tk.unavailable_reason = lambda *a, **k: None
    return records


def module_kernels(tk) -> dict:
    """The module's ``@triton.jit`` functions that no other one calls: its kernels."""
    from triton.runtime import jit as tjit

    fns = {n: v for n, v in vars(tk).items() if isinstance(v, tjit.JITFunction)}
    srcs = {n: getattr(f, "src", "") for n, f in fns.items()}
    called = {n for n in fns for m, s in srcs.items() if m != n and re.search(rf"\b{n}\s*\(", s)}
    return {n: f for n, f in fns.items() if n not in called}


def scenarios(full: bool):
    import torch

    # CI: one H per tile shape (48: the 64-wide step and persistent tiles; 256: the widest
    # layer-norm chunk); full: odd and unit sizes, the largest H, more batches.
    hs = [1, 37, 48, 64, 100, 256, 512, 1024] if full else [48, 256]
    bs = [1, 3, 64, 200] if full else [1, 64]
    # Packed and ragged, as in training on sequences of different lengths.
    ragged = (3,) * 2 + (2,) * 3 + (1,) * 5
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU"):
            for H in hs:
                for B in bs:
                    yield dict(mode=mode, dtype=dtype, H=H, B=B)
                yield dict(mode=mode, dtype=dtype, H=H, B=len(ragged), packed=ragged, bidir=True)
                if mode in ("LSTM", "GRU"):
                    yield dict(mode=mode, dtype=dtype, H=H, B=5, layer_norm=True, packed=ragged)
                    yield dict(
                        mode=mode,
                        dtype=dtype,
                        H=H,
                        B=5,
                        zoneout=0.1,
                        packed=ragged,
                        recurrent_dropout=0.1,
                    )
                if mode == "LSTM" and H > 1:
                    yield dict(mode=mode, dtype=dtype, H=H, B=3, proj_size=max(1, H // 2))


def run_scenario(s) -> None:
    import torch

    import rnnkit

    mode, dtype, H, B = s["mode"], s["dtype"], s["H"], s["B"]
    I, T = 8, 3
    kw = dict(backend="triton", bidirectional=s.get("bidir", False), dtype=dtype)
    extra = {k: s[k] for k in ("layer_norm", "zoneout", "recurrent_dropout") if k in s}
    if mode == "LSTM":
        layer = rnnkit.LSTM(I, H, proj_size=s.get("proj_size", 0), **kw, **extra)
    elif mode == "GRU":
        layer = rnnkit.GRU(I, H, **kw, **extra)
    else:
        layer = rnnkit.RNN(I, H, nonlinearity="relu" if mode == "RNN_RELU" else "tanh", **kw)
    if "packed" in s:
        lengths = torch.tensor(s["packed"]) + 1
        x = torch.randn(int(lengths.max()), len(lengths), I, dtype=dtype)
        x = torch.nn.utils.rnn.pack_padded_sequence(x, lengths)
    else:
        x = torch.randn(T, B, I, dtype=dtype)
    layer.train()
    out, _ = layer(x)
    out = out if torch.is_tensor(out) else out.data
    out.float().sum().backward()  # the fused backward launches the backward kernels
    layer.eval()
    with torch.no_grad():  # inference: the persistent LSTM kernel where it applies
        layer(x)


def representatives(launches: list[Launch]) -> list[Launch]:
    """One launch per (kernel, pointer dtypes, constexprs, num_warps): the one Triton
    specialised most (16-divisible ints and pointers), i.e. the most vectorised code."""
    best: dict = {}
    for r in launches:
        key, score = [r.fn.__name__, repr(r.kwargs.get("num_warps"))], 0
        for p, s in zip(r.fn.params, r.specialization, strict=True):
            if p.is_constexpr:
                key.append(f"{p.name}={_skey(s[1])}")
            elif isinstance(s[0], str) and s[0].startswith("*"):
                key.append(s[0])
            score += s[0] == "constexpr" or s[1] == "D"
        key = tuple(key)
        if key not in best or score > best[key][0]:
            best[key] = (score, r)
    return [r for _, r in best.values()]


def describe(r: Launch) -> str:
    ptrs = sorted({s[0] for s in r.specialization if isinstance(s[0], str) and s[0][:1] == "*"})
    cx = []
    for p, s in zip(r.fn.params, r.specialization, strict=True):
        if s[0] == "constexpr" and p.name.isupper():
            v = s[1]
            v = getattr(v, "name", None) or (v.value if hasattr(v, "value") else v)
            cx.append(f"{p.name}={v}")
    nw = r.kwargs.get("num_warps", 4)
    return f"{r.fn.__name__}[{','.join(ptrs)}] {' '.join(cx)} nw={nw}"


# ---------------------------------------------------------------- compile in forked children
def _resource_usage(cubin: bytes, bindir: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        r = subprocess.run(
            [os.path.join(bindir, "cuobjdump"), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            timeout=60,
        )
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", r.stdout)
        return (
            {}
            if not m
            else dict(regs=int(m[1]), stack=int(m[2]), static_shared=int(m[3]), local=int(m[4]))
        )
    finally:
        os.unlink(f.name)


def _compile(r: Launch, cc: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", cc, 32)
    backend = make_backend(target)
    options, signature, constexprs, attrs = r.fn._pack_args(
        backend, dict(r.kwargs), r.bound_args, list(r.specialization), r.options
    )
    ck = triton.compile(
        ASTSource(r.fn, signature, constexprs, attrs), target=target, options=options.__dict__
    )
    res = dict(shared=int(ck.metadata.shared or 0), num_warps=int(ck.metadata.num_warps))
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    res.update(_resource_usage(ck.asm["cubin"], bindir))
    return res


def _error_text(e: BaseException) -> str:
    lines = "".join(traceback.format_exception_only(type(e), e)).strip().splitlines()
    cause = e.__cause__
    why = f" <- {type(cause).__name__}: {cause}" if cause is not None else ""
    where = next(
        (lines[i - 1].strip() for i, ln in enumerate(lines) if ln.strip() == "^" and i), ""
    )
    head = lines[0] if lines else type(e).__name__
    return f"{head} {('`' + where + '`') if where else ''}{why}".replace("\n", " ")[:400]


class Worker:
    """A forked child that compiles the jobs it is sent, one at a time; a crash or a timeout
    costs only the job it was on."""

    # The parent's ends of every live worker's pipes: a child closes them all, or a worker
    # would hold another's job pipe open and that one would never see the end of its jobs.
    parent_fds: ClassVar[set[int]] = set()

    def __init__(self, launches: list[Launch]):
        self.err = tempfile.TemporaryFile()
        jr, self.jw = os.pipe()
        self.rr, rw = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            for fd in (self.jw, self.rr, *Worker.parent_fds):
                os.close(fd)
            os.dup2(self.err.fileno(), 2)
            jobs, results = os.fdopen(jr, "r"), os.fdopen(rw, "w")
            for line in jobs:
                i, cc = map(int, line.split())
                t0 = time.time()
                try:
                    out = dict(ok=True, **_compile(launches[i], cc))
                except BaseException as e:
                    out = dict(ok=False, error=_error_text(e))
                out["secs"] = time.time() - t0
                results.write(json.dumps(out) + "\n")
                results.flush()
            os._exit(0)
        os.close(jr)
        os.close(rw)
        Worker.parent_fds.update((self.jw, self.rr))
        self.buf = b""
        self.job = None
        self.deadline = 0.0
        self.errpos = 0

    def send(self, job, timeout: float) -> None:
        self.job, self.deadline = job, time.time() + timeout
        self.errpos = self.err.seek(0, 2)
        os.write(self.jw, f"{job[0]} {job[1]}\n".encode())

    def receive(self) -> dict | None:
        """The finished job's result, or None while it runs; closes the worker on a crash."""
        chunk = os.read(self.rr, 65536)
        if not chunk:
            _, status = os.waitpid(self.pid, 0)
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            self.err.seek(self.errpos)
            text = self.err.read().decode(errors="replace").splitlines()
            lines = [ln for ln in text if ln.strip() and "warn" not in ln.lower()]
            self.close()
            return dict(
                ok=False,
                crash=True,
                error=f"compiler process died (signal {sig}): {(lines[-1] if lines else '')[:300]}",
            )
        self.buf += chunk
        if b"\n" not in self.buf:
            return None
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self, kill: bool = False) -> None:
        Worker.parent_fds.difference_update((self.jw, self.rr))
        for fd in (self.jw, self.rr):
            try:
                os.close(fd)
            except OSError:
                pass
        if kill:
            try:
                os.kill(self.pid, 9)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.err.close()


def storage_dtypes(r: Launch) -> set[str]:
    """The element types of a launch's floating-point tensors (``fp32``, ``bf16``, ...)."""
    return {s[0][1:] for s in r.specialization if isinstance(s[0], str) and s[0][:3] in
            ("*fp", "*bf")}  # fmt: skip


def compile_all(pairs: list[tuple[int, int]], launches: list[Launch], jobs: int,
                timeout: float):  # fmt: skip
    """Compiles ``(launch index, target)`` pairs; yields ``(index, target, result)`` as the
    pool finishes them."""
    todo = list(pairs)
    todo.reverse()
    idle: list[Worker] = []
    busy: dict[int, Worker] = {}
    while todo or busy:
        while todo and len(busy) < jobs:
            w = idle.pop() if idle else Worker(launches)
            w.send(todo.pop(), timeout)
            busy[w.rr] = w
        left = max(0.0, min(w.deadline for w in busy.values()) - time.time())
        ready, _, _ = select.select(list(busy), [], [], left)
        for fd in ready:
            w = busy[fd]
            res = w.receive()
            if res is None:
                continue
            del busy[fd]
            if not res.pop("crash", False):
                idle.append(w)
            yield (*w.job, res)
        for fd, w in list(busy.items()):
            if time.time() > w.deadline:
                del busy[fd]
                w.close(kill=True)
                yield (*w.job, dict(ok=False, error=f"timed out after {timeout:.0f}s"))
    for w in idle:
        w.close()


def fit_problems(info: dict, cc: int) -> list[str]:
    """Why a compiled kernel would not launch on ``sm_cc``; empty when it would."""
    threads = info.get("num_warps", 4) * 32
    problems = []
    limit = MAX_SHARED.get(cc, 101376)
    shared = info.get("shared", 0) + info.get("static_shared", 0)
    if shared > limit:
        problems.append(f"shared {shared} B > sm_{cc} limit {limit} B")
    if info.get("regs", 0) * threads > REGS_PER_SM:
        problems.append(f"{info['regs']} regs x {threads} threads > {REGS_PER_SM}")
    return problems


def known_targets(targets: list[int]) -> tuple[list[int], list[str]]:
    """The targets the installed Triton's ptxas can assemble for, and notes on the others."""
    from triton.backends.nvidia.compiler import get_ptxas_version

    keep, notes = [], []
    for cc in targets:
        try:
            m = re.search(r"release (\d+)\.(\d+)", get_ptxas_version(cc))
            version = (int(m[1]), int(m[2])) if m else (0, 0)
        except Exception as e:
            notes.append(f"sm_{cc} skipped: no ptxas for it ({type(e).__name__}: {e})")
            continue
        if cc >= 100 and version < (12, 8):
            notes.append(f"sm_{cc} skipped: the bundled ptxas {version} predates it")
            continue
        keep.append(cc)
    return keep, notes


def main(argv=None) -> int:
    args = _parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("triton-aot: unset TRITON_INTERPRET (it turns the kernels into Python functions)")
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    # A fresh cache, so that every kernel compiles here and nothing is cached in the repository.
    cache = tempfile.TemporaryDirectory(prefix="rnnkit-triton-aot-")
    os.environ["TRITON_CACHE_DIR"] = cache.name
    t0 = time.time()

    import torch
    import triton
    import triton.compiler.code_generator

    from rnnkit.engines.triton import kernels as tk

    torch.set_num_threads(1)
    kernels = module_kernels(tk)
    if not kernels:
        print("triton-aot: no @triton.jit kernels found")
        return 1
    records = install_recorder(tk)
    targets, notes = known_targets([int(t) for t in args.targets.split(",") if t.strip()])
    print(
        f"triton {triton.__version__}, torch {torch.__version__}, targets "
        f"{','.join(f'sm_{c}' for c in targets)}; kernels: {', '.join(sorted(kernels))}"
    )
    for n in notes:
        print(n)
    failed = 0
    for s in scenarios(args.full):
        try:
            run_scenario(s)
        except Exception as e:
            failed += 1
            print(f"FAIL scenario {s}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    launches = list(records.values())
    counts: dict = {}
    for r in launches:
        counts[r.fn.__name__] = counts.get(r.fn.__name__, 0) + 1
    reps = sorted(representatives(launches), key=describe)
    if args.kernels:
        reps = [r for r in reps if r.fn.__name__ in args.kernels.split(",")]
    print(
        f"recorded {len(launches)} distinct launch specialisations of {len(counts)} kernels in "
        f"{time.time() - t0:.0f}s ({', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}); "
        f"{len(reps)} to compile per target, {args.jobs} processes"
    )
    for name, n in sorted(counts.items()):
        if n > MAX_SPECIALISATIONS_PER_KERNEL:
            failed += 1
            print(
                f"FAIL {name}: {n} specialisations > {MAX_SPECIALISATIONS_PER_KERNEL} (each is "
                "a compile on the user's GPU)"
            )
    for name in sorted(set(kernels) - set(counts) if not args.kernels else ()):
        failed += 1
        print(f"FAIL {name}: no scenario launched it, so its signature is unknown")

    ok = 0
    summary: dict = {}
    todo = [
        (i, cc) for cc in targets for i, r in enumerate(reps)
        if args.full or storage_dtypes(r) <= CI_DTYPES.get(cc, storage_dtypes(r))
    ]  # fmt: skip
    print(f"compiling {len(todo)} (kernel, target) pairs"
          + ("" if args.full else " (the CI dtypes per target; --full: all)"))  # fmt: skip
    for i, cc, info in compile_all(todo, reps, args.jobs, args.job_timeout):
        r = reps[i]
        status = "ok" if info.pop("ok") else ("CRASH" if "died" in info["error"] else "FAIL")
        if status == "ok" and (problems := fit_problems(info, cc)):
            status, info["error"] = "NOFIT", "; ".join(problems)
        agg = summary.setdefault(
            (r.fn.__name__, cc), dict(n=0, bad=0, regs=0, local=0, shared=0, threads=0, secs=0.0)
        )
        agg["n"] += 1
        agg["secs"] += info.get("secs", 0.0)
        if status == "ok":
            ok += 1
            for k in ("regs", "local", "shared"):
                agg[k] = max(agg[k], info.get(k, 0))
            agg["threads"] = max(agg["threads"], info.get("num_warps", 0) * 32)
        else:
            failed += 1
            agg["bad"] += 1
        if args.verbose or status != "ok":
            usage = (
                f" regs={info.get('regs')} local={info.get('local')} shared={info.get('shared')}"
                if "regs" in info
                else ""
            )
            print(
                f"{status:5s} sm_{cc} {describe(r)}{usage} {info.get('secs', 0):.1f}s "
                f"{info.get('error', '')}",
                flush=True,
            )
    print(
        "\nkernel, target: compiled/failed, max registers a thread (x threads of 64K an SM), "
        "max spill (local) bytes, max shared bytes (limit), compile seconds"
    )
    for (name, cc), a in sorted(summary.items()):
        limit = MAX_SHARED.get(cc, 101376)
        print(
            f"  {name:30s} sm_{cc:<3d} {a['n'] - a['bad']:3d}/{a['bad']:<2d} "
            f"regs {a['regs']:3d} (x{a['threads']:<4d}) spill {a['local']:<4d} "
            f"shared {a['shared']:6d} ({limit}) {a['secs']:5.1f}s"
        )
    print(f"elapsed {time.time() - t0:.0f}s")
    print(f"triton-aot: {ok} kernels x targets compiled, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
