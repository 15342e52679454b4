"""Random malformed (and valid) inputs over every layer, cell and engine (hypothesis).

Each case runs in a worker process (``fuzz_worker.py``), so that a crash in native code fails the
test with the case that caused it instead of killing the suite. Malformed input must raise a
clear error from rnnkit's own code (a ValueError or TypeError, not a traceback from inside torch),
and nothing malformed may pass silently; valid input (NaN and inf included, non-contiguous views
included) must give torch.nn's numbers, or the reference engine's for the variants.
"""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

WORKER = Path(__file__).with_name("fuzz_worker.py")
LAYERS = [
    ("RNN", {}),
    ("RNN", {"nonlinearity": "relu"}),
    ("LSTM", {}),
    ("LSTM", {"proj_size": 1}),
    ("GRU", {}),
    ("LSTM", {"layer_norm": True}),
    ("GRU", {"zoneout": 0.25}),
]
BACKENDS = ["auto", "reference", "fused", "torch", "triton"]
LAYER_MUTATIONS = [
    "none", "none", "nan", "permute", "features", "dims", "int_dtype", "f32_input", "hx_shape",
    "hx_dims", "hx_type", "hx_dtype", "batch_sizes", "batch_sizes_dtype", "sorted_indices",
    "not_tensor", "seq_len_0",
]  # fmt: skip
CELL_MUTATIONS = [
    "none",
    "nan",
    "features",
    "dims",
    "int_dtype",
    "f32_input",
    "hx_shape",
    "hx_type",
]


class Worker:
    """One fuzz_worker.py process, restarted after a crash."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def run(self, case: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(
                [sys.executable, str(WORKER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "TRITON_INTERPRET": "1"},
            )
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            return {"outcome": "crash", "returncode": code}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _tensor(draw, shape, kind="f64") -> dict:
    return {"kind": kind, "shape": list(shape), "seed": draw(st.integers(0, 2**16))}


@st.composite
def layer_cases(draw) -> dict:
    name, extra = draw(st.sampled_from(LAYERS))
    mutation = draw(st.sampled_from(LAYER_MUTATIONS))
    I, H = draw(st.integers(1, 4)), draw(st.integers(2, 4))
    L, D = draw(st.integers(1, 2)), draw(st.sampled_from([1, 2]))
    batch_first = draw(st.booleans())
    kwargs = {"input_size": I, "hidden_size": H, "num_layers": L, "bidirectional": D == 2,
              "batch_first": batch_first, **extra}  # fmt: skip
    R = extra.get("proj_size") or H
    T, B = draw(st.integers(1, 4)), draw(st.integers(0, 3))
    form = draw(st.sampled_from(["padded", "unbatched", "packed"]))
    if mutation in ("batch_sizes", "batch_sizes_dtype", "sorted_indices"):
        form = "packed"
    if form == "packed":
        B = max(B, 1)
    # backend='torch' refuses the per-step variants by design (test_variants.py tests that).
    backends = [
        b for b in BACKENDS if b != "torch" or name == "RNN" or not set(extra) - {"proj_size"}
    ]
    case = {"layer": name, "kwargs": kwargs, "backend": draw(st.sampled_from(backends))}
    packed = None
    if form == "padded":
        x_shape = (B, T, I) if batch_first else (T, B, I)
    elif form == "unbatched":
        x_shape = (T, I)
    else:
        lengths = sorted(draw(st.lists(st.integers(1, T), min_size=B, max_size=B)), reverse=True)
        batch_sizes = [sum(n > t for n in lengths) for t in range(max(lengths))]
        x_shape = (sum(lengths), I)
        packed = {"batch_sizes": batch_sizes, "dtype": "i64"}
        if draw(st.booleans()):
            packed["sorted_indices"] = draw(st.permutations(list(range(B))))
    x = _tensor(draw, x_shape)
    rows = L * D
    hx = None
    if draw(st.booleans()) or mutation.startswith("hx"):
        batch = () if form == "unbatched" else (B,)
        h = _tensor(draw, (rows, *batch, R))
        hx = [h, _tensor(draw, (rows, *batch, H))] if name == "LSTM" else h
    valid = True
    if mutation == "nan":
        x["nan"] = draw(st.integers(0, 100))
        x["nan_value"] = draw(st.sampled_from(["nan", "inf", "-inf"]))
    elif mutation == "permute":
        x["permute"] = True
    elif mutation == "features":
        x["shape"][-1] += draw(st.integers(1, 3))
        valid = False
    elif mutation == "dims":
        x["shape"] = draw(st.sampled_from([[I], [2, 1, 1, I]]))
        valid = False
    elif mutation == "int_dtype":
        x["kind"], valid = "int", False
    elif mutation == "f32_input":
        x["kind"], valid = "f32", False
    elif mutation in ("hx_shape", "hx_dims", "hx_dtype"):
        target = hx[draw(st.integers(0, 1))] if isinstance(hx, list) else hx
        if mutation == "hx_shape":
            axis = draw(st.integers(0, len(target["shape"]) - 1))
            target["shape"][axis] += draw(st.integers(1, 2))
            valid = False
        elif mutation == "hx_dims":
            target["shape"] = [*target["shape"], 1] if draw(st.booleans()) else target["shape"][1:]
            valid = False
        else:
            target["kind"], valid = "f32", False
    elif mutation == "hx_type":
        hx = hx[0] if isinstance(hx, list) else [hx, hx]
        valid = False
    elif mutation == "batch_sizes":
        sizes = draw(st.lists(st.integers(-2, 5), min_size=0, max_size=5))
        x["shape"][0] = draw(st.sampled_from([sum(sizes), max(sum(sizes), 0) + 1, 6]))
        packed = {"batch_sizes": sizes, "dtype": "i64"}
        hx = None
        valid = (
            bool(sizes)
            and min(sizes) >= 1
            and all(b <= a for a, b in itertools.pairwise(sizes))
            and sum(sizes) == x["shape"][0]
        )
    elif mutation == "batch_sizes_dtype":
        if draw(st.booleans()):
            packed["dtype"] = draw(st.sampled_from(["f32", "i32"]))
        else:
            packed["two_d"] = True
        valid = False
    elif mutation == "sorted_indices":
        bad = list(range(B))
        bad[draw(st.integers(0, B - 1))] = draw(st.sampled_from([B, -B - 1, B + 5]))
        packed["sorted_indices"] = draw(st.sampled_from([bad, [*range(B), 0]]))
        valid = False
    elif mutation == "not_tensor":
        x = {"kind": draw(st.sampled_from(["list", "none", "number"])), "shape": [I]}
        valid = False
    elif mutation == "seq_len_0":
        x["shape"][1 if batch_first and form == "padded" else 0] = 0
        packed, valid = None, False
    return {**case, "x": x, "hx": hx, "packed": packed, "valid": valid, "mutation": mutation}


@st.composite
def cell_cases(draw) -> dict:
    name = draw(st.sampled_from(["RNNCell", "LSTMCell", "GRUCell"]))
    mutation = draw(st.sampled_from(CELL_MUTATIONS))
    I, H, B = draw(st.integers(0, 4)), draw(st.integers(0, 4)), draw(st.integers(0, 3))
    unbatched = draw(st.booleans())
    batch = () if unbatched else (B,)
    x = _tensor(draw, (*batch, I))
    hx = None
    if draw(st.booleans()) or mutation.startswith("hx"):
        h = _tensor(draw, (*batch, H))
        hx = [h, _tensor(draw, (*batch, H))] if name == "LSTMCell" else h
    valid = True
    if mutation == "nan":
        x["nan"] = draw(st.integers(0, 100))
        x["nan_value"] = draw(st.sampled_from(["nan", "inf", "-inf"]))
    elif mutation == "features":
        x["shape"][-1] += draw(st.integers(1, 3))
        valid = False
    elif mutation == "dims":
        x["shape"] = [1, 1, *x["shape"]]
        valid = False
    elif mutation == "int_dtype":
        x["kind"], valid = "int", False
    elif mutation == "f32_input":
        x["kind"], valid = "f32", False
    elif mutation == "hx_shape":
        target = hx[draw(st.integers(0, 1))] if isinstance(hx, list) else hx
        target["shape"][-1] += draw(st.integers(1, 2))
        valid = False
    elif mutation == "hx_type":
        hx = hx[0] if isinstance(hx, list) else [hx, hx]
        valid = False
    kwargs = {"input_size": I, "hidden_size": H}
    return {"layer": name, "kwargs": kwargs, "backend": None, "x": x, "hx": hx,
            "packed": None, "valid": valid, "mutation": mutation}  # fmt: skip


def _check(worker: Worker, case: dict) -> None:
    result = worker.run(case)
    expected = "ok" if case["valid"] else "clear"
    assert result["outcome"] == expected, f"{result}\ncase: {json.dumps(case)}"


FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(case=layer_cases())
def test_layers_give_clear_errors_or_torch_numbers(worker, case):
    _check(worker, case)


@FUZZ
@given(case=cell_cases())
def test_cells_give_clear_errors_or_torch_numbers(worker, case):
    _check(worker, case)
