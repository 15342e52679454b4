"""The native engine's C time loop (engines/native/) against the reference engine, the spec:
outputs, states and every gradient, on odd shapes, with every variant and LSTM's projection;
float64 to 1e-10, float32 within the bound of ``helpers`` (the reference engine's own float32
error on the same input). The parity tests run on two builds of the loop: this CPU's
(``-march=native``) and the baseline x86-64 level (AVX2, no AVX-512), whose summation order the
users on AMD and older Intel CPUs get. Then the loop's own guards, in Python and in C."""

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import FACTOR, FLOOR, assert_float32_as_accurate
from one_layer import (
    GATES,
    MODES,
    VARIANT_MODES,
    VARIANTS,
    assert_matches_reference,
    make_layer,
    make_variants,
)

from rnnkit.engines import reference, shared
from rnnkit.engines.native import build as native_build
from rnnkit.engines.native import loop as native_loop
from rnnkit.engines.native import op
from rnnkit.engines.spec import StepVariants
from rnnkit.scan import scan

pytestmark = pytest.mark.skipif(
    not native_loop.available(torch.float64), reason="the native loop could not be built"
)

F64 = torch.float64
BUILDS = [
    pytest.param("native", id="native-build"),
    pytest.param(
        "baseline",
        id="baseline-build",
        marks=pytest.mark.skipif(
            platform.machine() not in ("x86_64", "AMD64"),
            reason=f"the baseline build is x86-64's; this is {platform.machine()}",
        ),
    ),
]


@pytest.fixture(params=BUILDS)
def build(request):
    """Run the test on the loop built for this CPU, then on the baseline x86-64 build."""
    with native_loop.use_arch(request.param):
        if not native_loop.available(F64):
            pytest.skip(f"the {request.param} build failed: {native_loop.build_error()}")
        yield request.param


SHAPES = {
    "T1-B1-H100": ((1,), 100),
    "T37-B1-H100": ((1,) * 37, 100),
    "T5-B3-H16": ((3,) * 5, 16),
    "packed-ragged-H100": ((3, 3, 2, 2, 2, 1, 1), 100),
    "packed-B9-H33": ((9, 9, 7, 4, 4, 1), 33),
}
# Rows below and above GEMM_MIN_ROWS, so that both the own loops and the panels run, and row
# counts that are not a multiple of the panels' register tile (8 rows with AVX-512, 4 without).
MIXED_ROWS = (16, 16, 13, 5, 5, 5, 3, 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_native_loop_matches_reference(build, mode, shape, reverse, dtype):
    batch_sizes, H = SHAPES[shape]
    layer = make_layer(mode, 7, H, batch_sizes[0], sum(batch_sizes), dtype)
    assert_matches_reference("native", mode, reverse, batch_sizes, layer)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gemm", [False, True], ids=["own-loops", "panels"])
@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
def test_native_loop_own_loops_and_panels_match_reference(build, mode, gemm, threads):
    layer = make_layer(mode, 5, 37, 16, sum(MIXED_ROWS), F64, seed=3)
    for reverse in (False, True):
        assert_matches_reference("native", mode, reverse, MIXED_ROWS, layer, gemm=gemm,
                                 threads=threads)  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
def test_native_loop_float32_partial_panels_match_reference(build, mode, threads):
    """Float32 panels whose last one is part-filled: H=40 is two and a half panels of 16 lanes
    (five of 8), and two threads own 32 and 8 units; the later steps run fewer rows than the
    panels' register tile."""
    layer = make_layer(mode, 5, 40, 16, sum(MIXED_ROWS), torch.float32, seed=4)
    for reverse in (False, True):
        assert_matches_reference("native", mode, reverse, MIXED_ROWS, layer, threads=threads)


def _walk(mode, reverse, t, v, save, split, grads=None):
    """native_loop's forward (and with ``grads``, (d_out, d_hn, d_cn), its backward) of one layer
    ``t`` (make_layer's tensors) on MIXED_ROWS with two threads split as ``split`` says."""
    bias = t["b_ih"] if mode == "GRU" else t["b_ih"] + t["b_hh"]
    G = t["x"] @ t["w_ih"].t() + bias
    f = native_loop.forward(mode, reverse, MIXED_ROWS, G, t["h0"], t["c0"], t["w_hh"],
                            t["b_hh"] if mode == "GRU" else None, save, w_hr=t.get("w_hr"),
                            variants=v, threads=2, split=split)  # fmt: skip
    if grads is None:
        return f, None
    return f, native_loop.backward(
        mode, reverse, MIXED_ROWS, G if f.A is None else f.A, f.out, f.C, f.GH, t["h0"], t["c0"],
        t["w_hh"], *grads, variants=v, Zr=f.Zr, stats=f.stats, CZ=f.CZ, w_hr=t.get("w_hr"),
        threads=2, split=split,
    )  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_native_loop_threads_taking_rows_compute_what_threads_taking_units_do(build, mode, dtype):
    """Two threads that each take rows of the batch through every step (split="rows", which
    "auto" picks for wide batches whose weights fit a core's cache) give the outputs, states,
    saved tensors and backward gradients of two threads that split the units, to the bit: with
    every variant (recurrent dropout keeps to units) and LSTM's projection, ragged batches,
    either direction, saving or not. The exception is the layer norms' gains and biases: each
    thread sums its rows of a step before adding to its own float64 totals, so their sums group
    differently: float64 to its rounding, float32 held to the module's bound against a float64
    run. The reference tests above check the units' numbers."""
    B, H, N = MIXED_ROWS[0], 37, sum(MIXED_ROWS)
    for variant in ["none", *(VARIANTS if mode in VARIANT_MODES else [])]:
        for P in [0, 11] if mode == "LSTM" else [0]:
            t = {k: v if v is None else v.detach()
                 for k, v in make_layer(mode, 5, H, B, N, dtype, seed=5, P=P).items()}  # fmt: skip
            sv = None if variant == "none" else make_variants(mode, variant, B, H, dtype, seed=5,
                                                              N=N, R=P or None)  # fmt: skip
            v = native_loop.NativeVariants.of(mode, sv, N)
            g = torch.Generator().manual_seed(1)
            d_out, d_hn = (torch.randn(n, P or H, generator=g, dtype=dtype) for n in (N, B))
            grads = (d_out, d_hn, torch.randn(B, H, generator=g, dtype=dtype) if mode == "LSTM"
                     else None)  # fmt: skip
            for reverse, save in [(False, True), (True, True), (False, False), (True, False)]:
                (fu, bu), (fr, br) = (_walk(mode, reverse, t, v, save, split,
                                            grads if save else None)
                                      for split in ("units", "rows"))  # fmt: skip
                pairs = [*zip(fu._fields, fu, fr, strict=True)]
                if save:
                    pairs += zip(bu._fields, bu, br, strict=True)
                for name, a, b in pairs:
                    assert (a is None) == (b is None), name
                    if a is not None and name.startswith("ln_"):
                        if dtype == F64:  # float64 sums grouped by thread: rounding apart
                            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
                        continue
                    assert a is None or torch.equal(a, b), (variant, P, reverse, save, name)
                if not save or sv is None or sv.layer_norm is None or dtype == F64:
                    continue
                t64 = {k: v if v is None else v.to(F64) for k, v in t.items()}
                v64 = native_loop.NativeVariants.of(mode, sv.to(F64), N)
                grads64 = tuple(d if d is None else d.to(F64) for d in grads)
                _, exact = _walk(mode, reverse, t64, v64, True, "units", grads64)
                names = [k for k, a in bu._asdict().items() if k[:3] == "ln_" and a is not None]
                assert_float32_as_accurate([getattr(br, k) for k in names],
                                           [getattr(bu, k) for k in names],
                                           [getattr(exact, k) for k in names], names)  # fmt: skip


def test_native_loop_rejects_an_unknown_split():
    G, h0, w = _good_args()
    with pytest.raises(ValueError, match="split must be one of"):
        native_loop.forward("GRU", False, (2, 2, 2), G, h0, None, w, None, split="columns")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_native_loop_without_bias_matches_reference(mode):
    layer = make_layer(mode, 4, 20, 3, 12, F64, bias=False)
    assert_matches_reference("native", mode, False, (3, 3, 3, 3), layer)


def test_native_loop_inference_saves_nothing_and_gives_the_same_outputs():
    layer = {k: (v.detach() if v is not None else None) for k, v in make_layer(
        "LSTM", 5, 32, 2, 6, F64).items()}  # fmt: skip
    G = layer["x"] @ layer["w_ih"].t() + layer["b_ih"] + layer["b_hh"]
    a = native_loop.forward("LSTM", False, (2, 2, 2), G.clone(), layer["h0"], layer["c0"],
                            layer["w_hh"], None, save=False)  # fmt: skip
    b = native_loop.forward("LSTM", False, (2, 2, 2), G.clone(), layer["h0"], layer["c0"],
                            layer["w_hh"], None, save=True)  # fmt: skip
    assert a.C is None and a.GH is None and b.C is not None
    for x, y in [(a.out, b.out), (a.h_n, b.h_n), (a.c_n, b.c_n)]:
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_native_loop_propagates_nan():
    G = torch.zeros(3, 4 * 8, dtype=F64)
    G[1, 0] = float("nan")
    h0, c0, w = torch.zeros(1, 8, dtype=F64), torch.zeros(1, 8, dtype=F64), \
        torch.full((32, 8), 0.1, dtype=F64)  # fmt: skip
    r = native_loop.forward("LSTM", False, (1, 1, 1), G, h0, c0, w, None)
    assert not r.out[0].isnan().any() and r.out[1, 0].isnan() and r.out[2].isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_native_loop_activations_are_exact_over_the_whole_range(build, dtype):
    """The loop's own exp (built without -ffast-math) against torch's, from -inf to inf: an
    LSTM step with W_hh = 0 and zero states computes c = i g and h = o tanh(c) from the gates
    alone. Element-wise, as there is no reduction to reorder: each value within FACTOR times
    torch's own error (in the same dtype, against float64) plus FLOOR roundings of the outputs'
    range (-1, 1). Of that range, not of the value: the loop's tanh(x) = (1 - e^-2x) / (...)
    cancels near 0, so its error there is a few ulps of 1, not of x (torch's is of x); in a
    layer, where h and c sit beside values of order 1, that is the same rounding."""
    values = torch.cat([
        torch.linspace(-800, 800, 4001, dtype=F64),
        torch.tensor([0.0, -0.0, 1e-30, -1e-30, float("inf"), float("-inf"), float("nan")],
                     dtype=F64),
    ]).to(dtype)  # fmt: skip
    H = values.numel()
    G = torch.stack([values, torch.zeros_like(values), values, values]).reshape(1, 4 * H)
    zeros = torch.zeros(1, H, dtype=dtype)
    r = native_loop.forward("LSTM", False, (1,), G, zeros, zeros, torch.zeros(4 * H, H,
                            dtype=dtype), None, save=False)  # fmt: skip

    def spec(v):
        c = torch.sigmoid(v) * torch.tanh(v)
        return torch.sigmoid(v) * torch.tanh(c), c

    u = torch.finfo(dtype).eps / 2
    results = zip(
        ("h", "c"), (r.out[0], r.c_n[0]), spec(values), spec(values.double()), strict=True
    )
    for name, ours, base, exact in results:
        assert torch.equal(ours.isnan(), exact.isnan()), name
        ours, base, exact = (t.double().nan_to_num() for t in (ours, base, exact))
        error = (ours - exact).abs()
        bound = FACTOR * (base - exact).abs() + FLOOR * u * exact.abs().clamp_min(1)
        worst = (error - bound).argmax()
        assert (error <= bound).all(), (
            f"{name} at {values[worst].item()}: {ours[worst].item()} against "
            f"{exact[worst].item()}, error {error[worst].item():.3g} > {bound[worst].item():.3g}"
        )


def _good_args():
    G = torch.zeros(6, 12, dtype=F64)
    h0 = torch.zeros(2, 4, dtype=F64)
    return G, h0, torch.zeros(12, 4, dtype=F64)


@pytest.mark.parametrize(
    "batch_sizes, message",
    [
        ((2, 2, 3), "non-increasing"),
        ((2, 2, 0, 2), "positive"),
        ((2, 2, 1), "sum to 5"),
        ((3, 3), "exceeds"),
        ((2, -2, 2, 2, 2), "positive"),
    ],
    ids=["increasing", "zero", "wrong-sum", "too-many-rows", "negative"],
)
def test_native_loop_rejects_bad_batch_sizes(batch_sizes, message):
    G, h0, w = _good_args()
    with pytest.raises(ValueError, match=message):
        native_loop.forward("GRU", False, batch_sizes, G, h0, None, w, None)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(G=torch.zeros(6, 12, dtype=torch.float32)), "float64"),
        (dict(G=torch.zeros(6, 13, dtype=F64)), "columns"),
        (dict(G=torch.zeros(12, 6, dtype=F64).t()), "contiguous"),
        (dict(w=torch.zeros(12, 5, dtype=F64)), "w_hh"),
        (dict(w=torch.zeros(13, 4, dtype=F64)), "w_hh"),
        (dict(w=torch.zeros(4, 12, dtype=F64).t()), "contiguous"),
        (dict(h0=torch.zeros(2, 4, 1, dtype=F64)), "matrices"),
        (dict(h0=torch.zeros(2, 4, dtype=torch.float32)), "h0"),
        (dict(mode="LSTM"), "columns"),
        (dict(mode="lstm"), "mode"),
    ],
    ids=[
        "dtype", "width", "strided", "w_hh-shape", "w_hh-rows", "w_hh-strided", "h0-3d",
        "h0-dtype", "lstm-width", "mode-name",
    ],
)  # fmt: skip
def test_native_loop_rejects_malformed_tensors(change, message):
    """Every tensor is checked in Python before the C loop trusts its pointers: a wrong dtype,
    shape or stride is a ValueError naming the tensor, never a read out of bounds."""
    G, h0, w = _good_args()
    args = dict(mode="GRU", G=G, h0=h0, w=w) | change
    with pytest.raises(ValueError, match=message):
        native_loop.forward(args["mode"], False, (2, 2, 2), args["G"], args["h0"], None,
                            args["w"], None)  # fmt: skip


def test_native_loop_backward_rejects_missing_saved_tensors():
    G, h0, w = _good_args()
    out = torch.zeros(6, 4, dtype=F64)
    with pytest.raises(ValueError, match="GH"):
        native_loop.backward("GRU", False, (2, 2, 2), G, out, None, None, h0, None, w,
                             None, None, None)  # fmt: skip
    with pytest.raises(ValueError, match="d_out"):
        native_loop.backward("GRU", False, (2, 2, 2), G, out, None, G.clone(), h0, None, w,
                             torch.zeros(5, 4, dtype=F64), None, None)  # fmt: skip


def test_native_loop_refuses_thread_counts_out_of_range():
    G, h0, w = _good_args()
    for bad in (0, -1, 2**62, True, 1.5):
        with pytest.raises(ValueError, match="threads must be an int from 1 to"):
            native_loop.forward("GRU", False, (2, 2, 2), G, h0, None, w, None, threads=bad)


def test_native_loop_names_g_when_g_is_wrong():
    """G's own dtype and emptiness are named as G's (an int64 G once blamed w_hh)."""
    G, h0, w = _good_args()
    with pytest.raises(ValueError, match=r"G must be a float32 or float64 tensor; got a to"):
        native_loop.forward("GRU", False, (2, 2, 2), G.long(), h0, None, w, None)
    with pytest.raises(ValueError, match="G has no rows"):
        native_loop.forward("GRU", False, (), G[:0], h0, None, w, None)


def _c_library() -> ctypes.CDLL:
    assert native_loop.available(F64)
    return native_loop._library().get()


def test_native_loop_c_side_refuses_bad_batch_sizes_without_crashing():
    """The C loop checks the batch sizes again: called past the Python guard, it refuses."""
    G, h0, w = _good_args()
    bs = torch.tensor([2, 3, 1], dtype=torch.int64)  # increasing, and 3 > B
    scratch = [torch.zeros(6, 12, dtype=F64) for _ in range(4)]
    offsets = torch.zeros(4, dtype=torch.int64)
    p = [ctypes.c_void_p(t.data_ptr()) for t in (G, w, h0, *scratch)]
    i64 = ctypes.c_int64
    rc = _c_library().nl_forward_f64(
        i64(1), i64(0), i64(3), ctypes.c_void_p(bs.data_ptr()), i64(6), i64(2), i64(4),
        p[0], None, p[1], None, p[2], None, p[3], p[4], None, None, None, p[5],
        ctypes.c_void_p(offsets.data_ptr()), i64(1), i64(4), i64(0), None, None,
    )  # fmt: skip
    assert rc == -3
    rc = _c_library().nl_forward_f64(
        i64(7), i64(0), i64(3), ctypes.c_void_p(bs.data_ptr()), i64(6), i64(2), i64(4),
        *([None] * 13), None, i64(1), i64(4), i64(0), None, None,
    )  # fmt: skip
    assert rc == -1
    for split in (-1, 3):  # how the threads split the work: 0, 1 or 2
        rc = _c_library().nl_forward_f64(
            i64(1), i64(0), i64(3), ctypes.c_void_p(bs.data_ptr()), i64(6), i64(2), i64(4),
            *([None] * 13), None, i64(1), i64(4), i64(split), None, None,
        )  # fmt: skip
        assert rc == -2


# The variants (rnnkit.variants) in the native loop.

VARIANT_SHAPES = {
    "T1-B1-H100": ((1,), 100),
    "T37-B1-H100": ((1,) * 37, 100),
    "packed-ragged-H100": ((3, 3, 2, 2, 2, 1, 1), 100),
    "packed-B9-H33": ((9, 9, 7, 4, 4, 1), 33),
}


@pytest.mark.parametrize("mode", VARIANT_MODES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", list(VARIANT_SHAPES))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_native_loop_variants_match_reference(build, mode, variant, shape, reverse, dtype):
    batch_sizes, H = VARIANT_SHAPES[shape]
    B = batch_sizes[0]
    layer = make_layer(mode, 7, H, B, sum(batch_sizes), dtype)
    v = make_variants(mode, variant, B, H, dtype, N=sum(batch_sizes))
    assert_matches_reference("native", mode, reverse, batch_sizes, layer, v)


@pytest.mark.parametrize("mode", VARIANT_MODES)
@pytest.mark.parametrize("gemm", [False, True], ids=["own-loops", "panels"])
@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
def test_native_loop_variants_own_loops_and_panels_match_reference(build, mode, gemm, threads):
    layer = make_layer(mode, 5, 37, 16, sum(MIXED_ROWS), F64, seed=3)
    for variant in ("layer-norm+recurrent-dropout+zoneout", "zoneout-eval"):
        v = make_variants(mode, variant, 16, 37, F64, seed=3, N=sum(MIXED_ROWS))
        for reverse in (False, True):
            assert_matches_reference("native", mode, reverse, MIXED_ROWS, layer, v, gemm=gemm,
                                     threads=threads)  # fmt: skip


@pytest.mark.parametrize("mode", VARIANT_MODES)
def test_native_loop_layer_norm_without_bias_matches_reference(mode):
    layer = make_layer(mode, 4, 20, 3, 12, F64, bias=False)
    v = make_variants(mode, "layer-norm", 3, 20, F64)
    assert_matches_reference("native", mode, False, (3,) * 4, layer, v)


# Many rows (N = 330), ragged: the norms' gain and bias gradients are sums over every row of the
# call, which the C loop adds up step by step on each thread's units.
MANY_ROWS = (9,) * 20 + (7,) * 15 + (4,) * 10 + (1,) * 5


@pytest.mark.parametrize("mode", VARIANT_MODES)
@pytest.mark.parametrize("variant", ["layer-norm", "layer-norm+recurrent-dropout+zoneout"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_native_loop_layer_norm_param_grads_over_many_rows_match_reference(
    build, mode, variant, reverse, dtype
):
    H = 33
    layer = make_layer(mode, 5, H, 9, sum(MANY_ROWS), dtype, seed=5)
    v = make_variants(mode, variant, 9, H, dtype, seed=5, N=sum(MANY_ROWS))
    assert_matches_reference("native", mode, reverse, MANY_ROWS, layer, v, threads=2)


@pytest.mark.parametrize("mode", VARIANT_MODES)
@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_native_loop_layer_norm_param_grads_equal_torch_sums_over_the_saved_rows(
    build, mode, threads, dtype
):
    """The hidden norm's gain and bias gradients from the loop equal torch's layer-norm backward
    over the rows the loop saved (Zr, its statistics) and the gradient it wrote (dG, or dGH for
    GRU): to 1e-10 in float64, in float32 within the bound of ``helpers`` with torch's float32
    sum as the base and its float64 sum on the same rows as the exact one."""
    batch_sizes, H = MANY_ROWS, 40
    B, N = batch_sizes[0], sum(batch_sizes)
    layer = {k: (t.detach() if t is not None else None)
             for k, t in make_layer(mode, 6, H, B, N, dtype, seed=7).items()}  # fmt: skip
    v = make_variants(mode, "layer-norm", B, H, dtype, seed=7)
    ln = [t.detach() for t in v.layer_norm]
    nv = native_loop.NativeVariants(*ln[2:])
    G = layer["x"] @ layer["w_ih"].t()
    c0 = layer["c0"] if mode == "LSTM" else None
    f = native_loop.forward(mode, True, batch_sizes, G, layer["h0"], c0, layer["w_hh"],
                            layer["b_hh"] if mode == "GRU" else None, variants=nv,
                            threads=threads)  # fmt: skip
    d_out = torch.randn(f.out.shape, generator=torch.Generator().manual_seed(8)).to(dtype)
    r = native_loop.backward(mode, True, batch_sizes, f.A, f.out, f.C, f.GH, layer["h0"], c0,
                             layer["w_hh"], d_out, None, None, variants=nv, Zr=f.Zr,
                             stats=f.stats, threads=threads)  # fmt: skip
    dY = r.dGH if mode == "GRU" else r.dG

    def torch_sums(dtype):
        mean, rstd = (s.to(dtype).view(N, 1) for s in f.stats[:2])
        return shared.layer_norm_param_grads(dY.to(dtype), f.Zr.to(dtype), mean, rstd,
                                             nv.ln_hw.to(dtype))  # fmt: skip

    ours, base = [r.ln_hw, r.ln_hb], list(torch_sums(dtype))
    if dtype == F64:
        for a, b in zip(ours, base, strict=True):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    else:
        assert_float32_as_accurate(ours, base, list(torch_sums(F64)), ["ln_hw", "ln_hb"])
    assert (r.ln_cw is not None) == (mode == "LSTM")


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_native_loop_matches_reference_again_on_pooled_buffers(mode, dtype):
    """Saved activations and gradients of 1 MiB and more come from the loop's pool: a second
    run, on the buffers the first one left, gives the reference's numbers again."""
    batch_sizes, H = (16,) * 60 + (9,) * 10, 100
    assert sum(batch_sizes) * GATES[mode] * H * 4 >= native_loop.POOL_MIN_BYTES
    layer = make_layer(mode, 5, H, 16, sum(batch_sizes), dtype, seed=11)
    v = make_variants(mode, "layer-norm+zoneout", 16, H, dtype, seed=11, N=sum(batch_sizes))
    for _ in range(2):
        assert_matches_reference("native", mode, True, batch_sizes, layer, v, threads=2)


def test_native_loop_pool_hands_out_a_buffer_only_when_no_tensor_holds_it():
    N, B, H = 2003, 1, 64  # A: N x 4H float32, about 2 MiB, an odd size of its own
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4 * H, H, generator=gen) * 0.1
    h0, c0 = torch.zeros(B, H), torch.zeros(B, H)

    def run(scale):
        G = torch.randn(N, 4 * H, generator=gen) * scale
        return native_loop.forward("LSTM", False, (B,) * N, G, h0, c0, w, None)

    first = run(1.0)
    held, ptr = first.A.clone(), first.A.data_ptr()
    second = run(2.0)
    assert second.A.data_ptr() != ptr
    torch.testing.assert_close(first.A, held, atol=0, rtol=0)
    del first
    third = run(3.0)
    assert third.A.data_ptr() == ptr
    assert second.A.data_ptr() != ptr


def test_native_loop_pool_keeps_at_most_its_count_while_a_caller_keeps_every_output(monkeypatch):
    monkeypatch.setattr(native_loop, "POOL_MAX_BUFFERS", 3)
    monkeypatch.setattr(native_loop, "_pool", [])
    N, H = 1100, 256  # out: N x H float32, about 1.1 MiB
    w, h0 = torch.randn(H, H) * 0.05, torch.zeros(1, H)
    kept = []
    with torch.inference_mode():
        for k in range(6):
            G = torch.full((N, H), 0.01 * k)
            kept.append(native_loop.forward("RNN_TANH", False, (1,) * N, G, h0, None, w, None,
                                            save=False).out)  # fmt: skip
    assert len(native_loop._pool) <= 3
    assert len({o.data_ptr() for o in kept}) == 6
    for k, o in enumerate(kept[1:], 1):
        assert not torch.equal(o, kept[0]), k


def test_native_loop_layer_norm_inference_saves_nothing_and_gives_the_same_outputs():
    layer = {k: (t.detach() if t is not None else None)
             for k, t in make_layer("LSTM", 5, 32, 2, 6, F64).items()}  # fmt: skip
    v = make_variants("LSTM", "layer-norm+recurrent-dropout", 2, 32, F64)
    ln = [t.detach() for t in v.layer_norm]
    nv = native_loop.NativeVariants(*ln[2:], rmask=v.recurrent_mask)
    G = layer["x"] @ layer["w_ih"].t()
    args = ("LSTM", False, (2, 2, 2))
    a = native_loop.forward(*args, G.clone(), layer["h0"], layer["c0"], layer["w_hh"], None,
                            save=False, variants=nv)  # fmt: skip
    b = native_loop.forward(*args, G.clone(), layer["h0"], layer["c0"], layer["w_hh"], None,
                            save=True, variants=nv)  # fmt: skip
    assert a.Zr is None and a.stats is None and b.Zr is not None and b.stats.shape == (4, 6)
    for x, y in [(a.out, b.out), (a.h_n, b.h_n), (a.c_n, b.c_n)]:
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize("mode, P", [("LSTM", 0), ("GRU", 0), ("LSTM", 4)],
                         ids=["LSTM", "GRU", "LSTM-projected"])  # fmt: skip
def test_native_loop_variants_double_backward_matches_reference(mode, P):
    """create_graph=True differentiates op.reference_layer's steps (torch.func transforms
    never reach the operator: engines.plan routes them to the reference engine)."""
    batch_sizes = (3, 2, 2, 1)
    layer = make_layer(mode, 4, 6, 3, 8, F64, P=P)
    v = make_variants(mode, "layer-norm+recurrent-dropout+zoneout", 3, 6, F64, N=8, R=P)
    x, h0, c0, w_hr = layer["x"], layer["h0"], layer["c0"], layer.get("w_hr")
    weights = [layer[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh")]

    def native(w_hh):
        out = op.run_layer(mode, True, batch_sizes, x, h0, c0, weights[0], w_hh, *weights[2:],
                           w_hr, v)[0]  # fmt: skip
        return out.pow(2).sum()

    def ref(w_hh):
        step = reference.cell_step(mode, (weights[0], w_hh, *weights[2:], w_hr), v)
        carry = (h0, c0) if mode == "LSTM" else (h0,)
        masks = tuple(m for m in (v.zoneout_h_mask, v.zoneout_c_mask) if m is not None)
        return scan(step, (x, *masks), carry, True, batch_sizes)[0].pow(2).sum()

    w = weights[1].detach().requires_grad_()
    (g_native,) = torch.autograd.grad(native(w), w, create_graph=True)
    (g_ref,) = torch.autograd.grad(ref(w), w, create_graph=True)
    torch.testing.assert_close(g_native, g_ref, atol=1e-10, rtol=1e-10)
    (gg_native,) = torch.autograd.grad(g_native.sum(), w)
    (gg_ref,) = torch.autograd.grad(g_ref.sum(), w)
    torch.testing.assert_close(gg_native, gg_ref, atol=1e-9, rtol=1e-9)


def _ln_args(mode="LSTM", H=4, B=2):
    GW = GATES[mode] * H
    G = torch.zeros(6, GW, dtype=F64)
    h0 = torch.zeros(B, H, dtype=F64)
    c0 = h0.clone() if mode == "LSTM" else None
    ones = torch.ones(GW, dtype=F64)
    nv = native_loop.NativeVariants(ones, ones * 0, ones[:H], ones[:H] * 0)
    return G, h0, c0, torch.zeros(GW, H, dtype=F64), nv


@pytest.mark.parametrize(
    "mode, change, message",
    [
        ("LSTM", dict(ln_hw=torch.ones(15, dtype=F64)), "ln_hw"),
        ("LSTM", dict(ln_hb=None), "ln_hb"),
        ("LSTM", dict(ln_cw=None), "ln_cw"),
        ("LSTM", dict(ln_cb=torch.ones(4, dtype=torch.float32)), "ln_cb"),
        ("GRU", dict(), "no cell"),
        ("RNN_TANH", dict(), "LSTM and GRU"),
        ("LSTM", dict(rmask=torch.ones(3, 4, dtype=F64)), "rmask"),
        ("LSTM", dict(rmask=torch.ones(4, 2, dtype=F64).t()), "contiguous"),
        ("LSTM", dict(zoneout_p=1.5), "zoneout_p"),
        ("LSTM", dict(zh=torch.ones(6, 4, dtype=F64)), "both masks"),
        ("LSTM", dict(zh=torch.ones(5, 4, dtype=F64), zc=torch.ones(5, 4)), "zh"),
        (
            "GRU",
            dict(ln_cw=None, ln_cb=None, zh=torch.ones(6, 4, dtype=F64), zc=torch.ones(6, 4)),
            "zc",
        ),
        ("RNN_TANH", dict(ln_hw=None, ln_hb=None, zoneout_p=0.5), "zoneout is for"),
    ],
    ids=[
        "gain-width",
        "no-bias",
        "no-cell-gain",
        "cell-dtype",
        "gru-cell",
        "rnn-norm",
        "mask-rows",
        "mask-strided",
        "zoneout-p",
        "one-lstm-mask",
        "zoneout-mask-rows",
        "gru-cell-mask",
        "rnn-zoneout",
    ],
)
def test_native_loop_rejects_malformed_variants(mode, change, message):
    G, h0, c0, w, nv = _ln_args(mode)
    if mode == "GRU":
        G, w = G[:, :12].contiguous(), w[:12].contiguous()
        nv = nv._replace(ln_hw=nv.ln_hw[:12], ln_hb=nv.ln_hb[:12])
    if mode == "RNN_TANH":
        G, w = G[:, :4].contiguous(), w[:4].contiguous()
        nv = native_loop.NativeVariants(nv.ln_hw[:4], nv.ln_hb[:4])
    with pytest.raises(ValueError, match=message):
        native_loop.forward(mode, False, (2, 2, 2), G, h0, c0, w, None,
                            variants=nv._replace(**change))  # fmt: skip


def test_native_loop_backward_rejects_missing_layer_norm_saves():
    G, h0, c0, w, nv = _ln_args()
    r = native_loop.forward("LSTM", False, (2, 2, 2), G.clone(), h0, c0, w, None, variants=nv)
    with pytest.raises(ValueError, match="Zr"):
        native_loop.backward("LSTM", False, (2, 2, 2), G, r.out, r.C, None, h0, c0, w, None,
                             None, None, variants=nv, stats=r.stats)  # fmt: skip
    with pytest.raises(ValueError, match="stats"):
        native_loop.backward("LSTM", False, (2, 2, 2), G, r.out, r.C, None, h0, c0, w, None,
                             None, None, variants=nv, Zr=r.Zr, stats=r.stats[:2])  # fmt: skip


def test_native_loop_c_side_refuses_incomplete_variants_without_crashing():
    """Past the Python guard, the C loop refuses a layer norm without its cell's tensors or
    room for its normed product, one for RNN, a mask without its scratch buffer, and zoneout
    without room for the previous state."""
    G, h0, c0, w, nv = _ln_args()
    bs = torch.tensor([2, 2, 2], dtype=torch.int64)
    out, h, c, Z = torch.zeros(6, 4, dtype=F64), h0.clone(), c0.clone(), G.clone()
    offsets = torch.zeros(4, dtype=torch.int64)
    p = {
        k: ctypes.c_void_p(t.data_ptr())
        for k, t in dict(G=G, w=w, h0=h0, out=out, h=h, c=c, Z=Z, off=offsets, bs=bs).items()
    }
    i64 = ctypes.c_int64

    def call(mode, zoneout=0, **fields):
        pointers = {k: t.data_ptr() for k, t in fields.items()}
        cv = native_loop._CVariants(eps=1e-5, zoneout_p=0.5, zoneout=zoneout, **pointers)
        return _c_library().nl_forward_f64(
            i64(mode), i64(0), i64(3), p["bs"], i64(6), i64(2), i64(4), p["G"], None, p["w"], None,
            p["h0"], None, p["out"], p["h"], p["c"], None, None, p["Z"], p["off"], i64(1), i64(4),
            i64(0), ctypes.byref(cv), None,
        )  # fmt: skip

    assert call(0, ln_hw=nv.ln_hw, ln_hb=nv.ln_hb) == -5
    assert call(2, ln_hw=nv.ln_hw, ln_hb=nv.ln_hb) == -5
    assert call(0, rmask=h0) == -5
    assert call(0, zoneout=1) == -5  # no room for the previous h and c
    ln = dict(ln_hw=nv.ln_hw, ln_hb=nv.ln_hb, ln_cw=nv.ln_cw, ln_cb=nv.ln_cb)
    assert call(0, **ln) == -5  # saves nothing and has no room for the normed product
    assert call(0, **ln, ln_scratch=torch.zeros(2, 16, dtype=F64)) == 0


@pytest.mark.parametrize(
    "mode, options, proj_size",
    [
        ("LSTM", dict(), 0),
        ("LSTM", dict(), 3),
        ("LSTM", dict(layer_norm=True), 0),
        ("GRU", dict(layer_norm=True, recurrent_dropout=0.2), 0),
        ("LSTM", dict(weight_drop=0.3), 0),
        ("GRU", dict(zoneout=0.1), 0),
        ("LSTM", dict(layer_norm=True, zoneout=0.1, recurrent_dropout=0.2), 3),
    ],
    ids=[
        "plain", "projected", "layer-norm", "gru-layer-norm-dropout", "weight-drop", "zoneout",
        "all-three-projected",
    ],
)  # fmt: skip
def test_plan_routes_every_variant_and_projection_to_the_native_engine(mode, options, proj_size):
    from rnnkit import engines
    from rnnkit.engines import native
    from rnnkit.engines.spec import LayerSpec
    from rnnkit.variants import Variants

    v = Variants(**options)
    spec = LayerSpec(mode, 4, 8, 1, 1, True, 0.0, proj_size)
    for dtype in (torch.float32, F64, torch.bfloat16):
        chosen = engines.plan("LSTM", "fused", spec, torch.device("cpu"), dtype, batch=2,
                              per_step=v.per_step)  # fmt: skip
        assert chosen.engine is native, chosen.why
    assert native_loop.covers(spec)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["plain", "layer-norm+recurrent-dropout+zoneout"])
def test_native_loop_eager_inference_equals_the_operator(mode, variant):
    """Under no_grad op.run_layer calls the loop without the operator's dispatch and saves
    nothing; the numbers are the operator's, bit for bit."""
    if variant != "plain" and mode not in VARIANT_MODES:
        pytest.skip("the variants are for LSTM and GRU")
    batch_sizes = (5, 5, 4, 2, 1)
    layer = make_layer(mode, 3, 24, 5, sum(batch_sizes), torch.float32)
    v = None if variant == "plain" else make_variants(mode, variant, 5, 24, torch.float32, N=17)
    args = [layer[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")]
    with_grad = op.run_layer(mode, True, batch_sizes, *args, None, v)
    with torch.no_grad():
        without = op.run_layer(mode, True, batch_sizes, *args, None, v)
    for a, b in zip(with_grad, without, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("output", [0, 1, 2], ids=["out-only", "h_n-only", "c_n-only"])
def test_native_loop_gradients_of_one_output_match_reference(output):
    """The other outputs' gradients arrive as None (not zero-filled) and read as zero."""
    batch_sizes = (4, 3, 3, 1)
    layer = make_layer("LSTM", 3, 10, 4, 11, F64)
    v = make_variants("LSTM", "layer-norm+recurrent-dropout+zoneout", 4, 10, F64, N=11)
    args = [layer[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")]
    leaves_ = [*args, *v.layer_norm]
    native = op.run_layer("LSTM", False, batch_sizes, *args, None, v)[output]
    step = reference.cell_step("LSTM", (*args[3:], None), v)
    xs = (args[0], v.zoneout_h_mask, v.zoneout_c_mask)
    out, last = scan(step, xs, tuple(args[1:3]), False, batch_sizes)
    expected = (out, *last)[output]
    for a, b in zip(torch.autograd.grad(native.sum(), leaves_),
                    torch.autograd.grad(expected.sum(), leaves_), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


PROJECTED_VARIANTS = ["plain", "zoneout-eval", "layer-norm+recurrent-dropout+zoneout"]


@pytest.mark.parametrize("variant", PROJECTED_VARIANTS)
@pytest.mark.parametrize("shape", list(VARIANT_SHAPES))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_native_loop_projected_lstm_matches_reference(build, variant, shape, reverse, dtype):
    """LSTM with proj_size: h = (o tanh(c)) W_hr^T, P < H, alone and with the variants."""
    batch_sizes, H = VARIANT_SHAPES[shape]
    B, N, P = batch_sizes[0], sum(batch_sizes), H // 3
    layer = make_layer("LSTM", 7, H, B, N, dtype, P=P)
    v = StepVariants() if variant == "plain" else make_variants("LSTM", variant, B, H, dtype,
                                                                 N=N, R=P)  # fmt: skip
    assert_matches_reference("native", "LSTM", reverse, batch_sizes, layer, v)


@pytest.mark.parametrize("gemm", [False, True], ids=["own-loops", "panels"])
@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
def test_native_loop_projected_own_loops_and_panels_match_reference(build, gemm, threads):
    layer = make_layer("LSTM", 5, 37, 16, sum(MIXED_ROWS), F64, seed=5, P=20)
    v = make_variants("LSTM", "layer-norm+recurrent-dropout+zoneout", 16, 37, F64, seed=5,
                      N=sum(MIXED_ROWS), R=20)  # fmt: skip
    for reverse in (False, True):
        assert_matches_reference("native", "LSTM", reverse, MIXED_ROWS, layer, v, gemm=gemm,
                                 threads=threads)  # fmt: skip


def test_native_loop_rejects_a_malformed_projection():
    G, _, c0, w, _ = _ln_args()  # LSTM, H=4, B=2
    h0p, wp = torch.zeros(2, 3, dtype=F64), torch.zeros(16, 3, dtype=F64)
    with pytest.raises(ValueError, match="w_hr"):
        native_loop.forward("LSTM", False, (2, 2, 2), G, h0p, c0, wp, None,
                            w_hr=torch.zeros(3, 5, dtype=F64))  # fmt: skip
    with pytest.raises(ValueError, match="w_hh"):
        native_loop.forward("LSTM", False, (2, 2, 2), G, h0p, c0, w, None,
                            w_hr=torch.zeros(3, 4, dtype=F64))  # fmt: skip
    with pytest.raises(ValueError, match="for LSTM"):
        native_loop.forward("GRU", False, (2, 2, 2), G[:, :12].contiguous(), h0p, None,
                            wp[:12].contiguous(), None,
                            w_hr=torch.zeros(3, 4, dtype=F64))  # fmt: skip


# The build: one library per CPU and per instruction-set level.


def _library_file(arch: str) -> Path:
    with native_loop.use_arch(arch):
        if not native_loop.available(F64):
            pytest.skip(f"the {arch} build failed: {native_loop.build_error()}")
        return Path(native_loop._library().get()._name)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the baseline build is x86-64's")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump is not installed")
def test_baseline_build_has_no_avx512_instructions():
    """The baseline library is what a CPU without AVX-512 runs: not one instruction of it
    names a 512-bit register (zmm) or a mask register (k0-k7), while it does use AVX2's
    256-bit ones (ymm), so the check can see vector code at all."""
    code = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(_library_file("baseline"))],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "%ymm" in code
    assert "%zmm" not in code
    assert not any(f"%k{i}" in code for i in range(8))


def test_the_builds_and_cpus_get_libraries_of_their_own(monkeypatch, tmp_path):
    """The cache key holds the CPU's features (``-march=native`` code must not load on
    another CPU sharing the cache) and the flags (the baseline and native builds differ)."""
    cc, source = "cc", native_loop._SOURCE
    flags = {arch: native_loop._flag_sets(arch)[0] for arch in native_loop.ARCHES}
    assert "-march=x86-64-v3" in flags["baseline"] and "-march=native" in flags["native"]
    names = set()
    for features in ("model name: A\nflags: avx2 avx512f", "model name: B\nflags: avx2"):
        monkeypatch.setattr(native_build, "cpu_features", lambda f=features: f)
        for arch_flags in flags.values():
            names.add(native_build.library_path(source, cc, arch_flags, tmp_path).name)
    assert len(names) == 2 * len(native_loop.ARCHES), names


def test_use_arch_switches_the_library_in_process_and_back():
    before = native_loop.ARCH
    with native_loop.use_arch("baseline"):
        assert native_loop.ARCH == "baseline"
        assert native_loop._library() is native_loop._LIBRARIES["baseline"]
    assert native_loop.ARCH == before
    with pytest.raises(ValueError, match="arch must be one of"):
        with native_loop.use_arch("avx9000"):
            pass
