"""Smoke test of an installed rnnkit: run it with the python of a venv that has the wheel installed,
from a folder outside the checkout (tests/test_packaging.py does both).

Every layer and cell runs forward and backward on the auto, fused and reference backends, the
plain ones against torch.nn with the same weights, the variants against the reference engine; the
installed C source must have been built; int8 layers (``rnnkit.quantize``) give the same numbers
on two threads as on one, and after their state dict is loaded; then the installed ``rnnkit``
command trains one epoch of digits, tagger and textclf (three processes at once). Exits
non-zero on the first failure.

float32 results are held to the rule of tests/helpers.py (not importable from an installed
wheel): per tensor, ``||ours - exact|| <= 4 ||torch - exact|| + 8 u ||exact||``, where
``torch`` is torch.nn's (or the reference engine's) float32 result and ``exact`` that module in
float64 on the same inputs; the derivation of 4 and 8 is in that module's docstring.

    VENV/bin/python scripts/wheel_smoke.py WORKDIR
"""

import copy
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn

import rnnkit

BACKENDS = ("auto", "fused", "reference")
# tests/helpers.py's FACTOR, FLOOR and float32's unit roundoff.
FACTOR, FLOOR, U32 = 4.0, 8.0, 2.0**-24
T, B, I, H, P = 5, 3, 4, 6, 3


def check_installed() -> None:
    """rnnkit is the installed copy, with its C source beside it, not the checkout's src/."""
    package = Path(rnnkit.__file__).resolve().parent
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    assert package.is_relative_to(site), f"rnnkit imported from {package}, not from {site}"
    sources = sorted(p.name for p in package.rglob("*.c"))
    assert sources, f"no C source in the installed package {package}"
    print(f"rnnkit {rnnkit.__version__} from {package}; C sources: {', '.join(sources)}")


def close(name: str, got: torch.Tensor | None, want: torch.Tensor | None, exact) -> None:
    """``got`` (rnnkit, float32) is as accurate as ``want`` (float32) against ``exact``."""
    assert got is not None and want is not None, f"{name}: a gradient is missing"
    got, want, exact = got.double(), want.double(), exact.double()
    err, base = (got - exact).norm().item(), (want - exact).norm().item()
    bound = FACTOR * base + FLOOR * U32 * exact.norm().item()
    assert err <= bound, f"{name}: float32 error {err:.2e} exceeds {bound:.2e} (torch's {base:.2e})"


def _flat(state) -> list[torch.Tensor]:
    return list(state) if isinstance(state, tuple) else [state]


def layer_matches_torch(kind: str, backend: str, **kw) -> None:
    """An rnnkit layer with torch.nn's weights gives torch.nn's outputs and gradients."""
    name = f"{kind}({kw}) backend={backend}"
    torch.manual_seed(0)
    ref = getattr(nn, kind)(I, H, num_layers=2, bidirectional=True, **kw)
    ours = getattr(rnnkit, kind)(I, H, num_layers=2, bidirectional=True, backend=backend, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(T, B, I)
    outs = []
    for module in (ref, ours, copy.deepcopy(ref).double()):
        xi = x.clone().to(next(module.parameters()).dtype).requires_grad_()
        out, state = module(xi)
        (out.square().sum() + sum(s.sum() for s in _flat(state))).backward()
        outs.append((out, _flat(state), xi.grad, dict(module.named_parameters())))
    (o_ref, s_ref, gx_ref, p_ref), (o, s, gx, p), (o_ex, s_ex, gx_ex, p_ex) = outs
    close(f"{name} output", o, o_ref, o_ex)
    for k, (a, b, e) in enumerate(zip(s, s_ref, s_ex, strict=True)):
        close(f"{name} final state {k}", a, b, e)
    close(f"{name} input grad", gx, gx_ref, gx_ex)
    for pname, param in p_ref.items():
        close(f"{name} {pname}.grad", p[pname].grad, param.grad, p_ex[pname].grad)


def cell_matches_torch(kind: str, **kw) -> None:
    name = f"{kind}({kw})"
    torch.manual_seed(0)
    ref = getattr(nn, kind)(I, H, **kw)
    ours = getattr(rnnkit, kind)(I, H, **kw)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(B, I)
    outs = []
    for module in (ref, ours, copy.deepcopy(ref).double()):
        xi = x.clone().to(next(module.parameters()).dtype).requires_grad_()
        state = module(xi)
        sum(s.square().sum() for s in _flat(state)).backward()
        outs.append((_flat(state), xi.grad, dict(module.named_parameters())))
    (s_ref, gx_ref, p_ref), (s, gx, p), (s_ex, gx_ex, p_ex) = outs
    for k, (a, b, e) in enumerate(zip(s, s_ref, s_ex, strict=True)):
        close(f"{name} state {k}", a, b, e)
    close(f"{name} input grad", gx, gx_ref, gx_ex)
    for pname, param in p_ref.items():
        close(f"{name} {pname}.grad", p[pname].grad, param.grad, p_ex[pname].grad)


def variant_runs(kind: str, backend: str, **kw) -> None:
    """Training mode: forward and backward give finite values and a gradient for every parameter.
    Eval mode (deterministic): the same outputs as the reference engine."""
    name = f"{kind}({kw}) backend={backend}"
    torch.manual_seed(0)
    layer = getattr(rnnkit, kind)(I, H, num_layers=2, backend=backend, **kw)
    x = torch.randn(T, B, I, requires_grad=True)
    out, state = layer(x)
    (out.square().sum() + sum(s.sum() for s in _flat(state))).backward()
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    for pname, param in [("input", x), *layer.named_parameters()]:
        assert param.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {pname}"
    reference = getattr(rnnkit, kind)(I, H, num_layers=2, backend="reference", **kw)
    reference.load_state_dict(layer.state_dict(), strict=True)
    layer.eval()
    reference.eval()
    exact = copy.deepcopy(reference).double()
    with torch.no_grad():
        want, got = reference(x)[0], layer(x)[0]
        close(f"{name} eval output vs reference", got, want, exact(x.double())[0])


def cell_variant_runs(kind: str, **kw) -> None:
    name = f"{kind}({kw})"
    torch.manual_seed(0)
    cell = getattr(rnnkit, kind)(I, H, **kw)
    x = torch.randn(B, I, requires_grad=True)
    sum(s.square().sum() for s in _flat(cell(x))).backward()
    for pname, param in [("input", x), *cell.named_parameters()]:
        assert param.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient for {pname}"


def check_layers() -> int:
    plain = [
        ("RNN", {"nonlinearity": "tanh"}),
        ("RNN", {"nonlinearity": "relu"}),
        ("LSTM", {}),
        ("LSTM", {"proj_size": P}),
        ("GRU", {}),
    ]
    variants = [
        {"layer_norm": True},
        {"zoneout": 0.1},
        {"recurrent_dropout": 0.2},
        {"weight_drop": 0.2},
        {"learn_init": True},
    ]
    n = 0
    for backend in BACKENDS:
        for kind, kw in plain:
            layer_matches_torch(kind, backend, **kw)
            n += 1
        for kind in ("LSTM", "GRU"):
            for kw in variants:
                variant_runs(kind, backend, **kw)
                n += 1
        variant_runs("LSTM", backend, forget_bias=1.0)
        n += 1
    for kind, kw in [
        ("RNNCell", {"nonlinearity": "tanh"}),
        ("RNNCell", {"nonlinearity": "relu"}),
        ("LSTMCell", {}),
        ("GRUCell", {}),
    ]:
        cell_matches_torch(kind, **kw)
        n += 1
    for kind, kw in [
        ("LSTMCell", {"layer_norm": True}),
        ("LSTMCell", {"forget_bias": 1.0}),
        ("GRUCell", {"layer_norm": True}),
    ]:
        cell_variant_runs(kind, **kw)
        n += 1
    return n


def check_int8() -> int:
    """``rnnkit.quantize`` from the installed wheel: LSTM and GRU, one sequence (two threads split
    the units) and a batch (they take rows), against one thread, which must give the same
    numbers to the bit (the same integers and the same float operations per row); the state
    dict loaded into a fresh quantized model gives them again."""
    from rnnkit.engines.native import int8

    reason = int8.unavailable_reason()
    if reason is not None:
        print(f"int8 not checked: {reason}")
        return 0
    threads, n = torch.get_num_threads(), 0
    for kind in ("LSTM", "GRU"):
        torch.manual_seed(0)
        # H=128: a step large enough for one sequence to take two threads (int8.py).
        q = rnnkit.quantize(getattr(rnnkit, kind)(64, 128, num_layers=2).eval())
        fresh = rnnkit.quantize(getattr(rnnkit, kind)(64, 128, num_layers=2).eval())
        fresh.load_state_dict(q.state_dict())
        for batch in (1, 6):
            x = torch.randn(9, batch, 64)
            with torch.no_grad():
                torch.set_num_threads(2)
                out, _ = q(x)
                again, _ = fresh(x)
                torch.set_num_threads(1)
                alone, _ = q(x)
            torch.set_num_threads(threads)
            assert torch.isfinite(out).all(), f"int8 {kind}, batch {batch}: not finite"
            assert torch.equal(out, alone), f"int8 {kind}, batch {batch}: 2 threads != 1"
            assert torch.equal(out, again), f"int8 {kind}, batch {batch}: loaded model differs"
            n += 1
    print(f"int8 ({int8.kernel()} kernel): {n} checks passed")
    return n


def check_kernels_built(cache: Path) -> None:
    """With a C compiler here, the fused runs above built the installed C source into the cache
    (a missing source would only show as a warning and a fallback to torch ops)."""
    if not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")):
        print("no C compiler: the CPU kernels were not built (the fused engine uses torch ops)")
        return
    built = sorted(p.name for p in cache.glob("*") if p.is_file())
    assert built, f"the CPU kernels were not built into RNNKIT_CACHE={cache}"
    print(f"CPU kernels built from the installed source: {', '.join(built)}")


def train(work: Path, runs: dict[str, list[str]]) -> None:
    """One epoch of each task with the installed ``rnnkit`` command, the tasks at once (most of
    each run is starting up); each must exit 0 and write summary.json."""
    command = Path(sys.executable).with_name("rnnkit")
    started = {}
    start = time.perf_counter()
    for task, args in runs.items():
        cmd = [str(command), "train", task, *args, "--epochs", "1", "--device", "cpu"]
        cmd += ["--quiet", "--out", str(work / "runs" / task), "--threads", "1"]
        log = (work / f"{task}.stderr").open("w")
        started[task] = (cmd, subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL,
                                               stderr=log), log)  # fmt: skip
    for task, (cmd, process, log) in started.items():
        code = process.wait(timeout=300)
        log.close()
        stderr = (work / f"{task}.stderr").read_text()
        assert code == 0, f"{' '.join(cmd)} exited {code}:\n{stderr}"
        summary = json.loads((work / "runs" / task / "summary.json").read_text())
        took = time.perf_counter() - start
        print(f"rnnkit train {task}: exit 0, summary.json with {len(summary)} keys ({took:.0f} s)")


def texts(path: Path) -> Path:
    """A small label<TAB>text file for ``train textclf`` (a GRU by default): two classes."""
    lines = [f"vowel\t{'aeiou'[k % 5] * (3 + k % 4)}" for k in range(40)]
    lines += [f"consonant\t{'bcdfg'[k % 5] * (3 + k % 4)}" for k in range(40)]
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> int:
    work = Path(sys.argv[1]).resolve()
    cache = Path(os.environ.setdefault("RNNKIT_CACHE", str(work / "kernel-cache")))
    check_installed()
    start = time.perf_counter()
    n = check_layers()
    took = time.perf_counter() - start
    print(f"{n} layer and cell checks passed on backends {', '.join(BACKENDS)} ({took:.0f} s)")
    check_kernels_built(cache)
    check_int8()
    # The bundled 78-sentence sample: an epoch of the default treebank takes a minute.
    from rnnkit.data import sample_conllu

    tagger = [f"--{k}={sample_conllu(k)}" for k in ("train", "dev", "test")]
    textclf = ["--data", str(texts(work / "texts.tsv"))]
    train(work, {"digits": [], "tagger": tagger, "textclf": textclf})
    print("wheel smoke test passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
