"""The native time loop (engines/native_loop.py) against the fused engine's FusedLayer, which the
engine tests hold to the reference: outputs, states and every gradient, on odd shapes."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from rnnkit.engines import fused, native_loop, ops, pointwise, reference
from rnnkit.engines.spec import StepVariants
from rnnkit.scan import scan

pytestmark = pytest.mark.skipif(
    not native_loop.available(torch.float64), reason="the native loop could not be built"
)

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def make_layer(mode, I, H, B, N, dtype, bias=True, seed=0, P=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.rand(*shape, generator=gen, dtype=dtype) * 2 - 1).requires_grad_()

    GW, R = GATES[mode] * H, P or H
    layer = dict(
        x=rand(N, I),
        h0=rand(B, R),
        c0=rand(B, H) if mode == "LSTM" else None,
        w_ih=rand(GW, I) * 0.5,
        w_hh=rand(GW, R) * (0.5 / R**0.5),
        b_ih=rand(GW) if bias else None,
        b_hh=rand(GW) if bias else None,
    )
    if P:
        layer["w_hr"] = (rand(P, H) * (1 / H**0.5)).detach().requires_grad_()
    return layer


def leaves(layer: dict) -> dict[str, Tensor]:
    return {k: v for k, v in layer.items() if v is not None}


def run_both(mode, reverse, batch_sizes, layer, native_opts, kernels=None):
    """Outputs and all gradients from FusedLayer and from ops.native_layer."""
    args = [layer[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")]
    results = []
    for name in ("fused", "native"):
        tensors = [t.detach().requires_grad_() if t is not None else None for t in args]
        if name == "fused":
            kern = kernels or fused.pointwise_kernels(tensors[0].device, tensors[0].dtype)
            # Not native: run_layer's per-step path, FusedLayer.
            outs = fused.run_layer(mode, reverse, batch_sizes, kern, *tensors, None)
        else:
            outs = ops.run_layer(mode, reverse, batch_sizes, *tensors, **native_opts)
        outs = [o for o in outs if o is not None]
        gen = torch.Generator().manual_seed(1)
        loss = sum((o * torch.rand(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
        loss.backward()
        grads = [t.grad for t in tensors if t is not None]
        results.append(([o.detach() for o in outs], grads))
    return results


def assert_same(results, dtype):
    (outs_f, grads_f), (outs_n, grads_n) = results
    assert len(outs_f) == len(outs_n) and len(grads_f) == len(grads_n)
    for a, b in zip(outs_f + grads_f, outs_n + grads_n, strict=True):
        assert b is not None
        torch.testing.assert_close(b, a, **TOL[dtype])


MODES = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
SHAPES = {
    "T1-B1-H100": ((1,), 100),
    "T37-B1-H100": ((1,) * 37, 100),
    "T5-B3-H16": ((3,) * 5, 16),
    "packed-ragged-H100": ((3, 3, 2, 2, 2, 1, 1), 100),
    "packed-B9-H33": ((9, 9, 7, 4, 4, 1), 33),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_native_loop_matches_fused_layer(mode, shape, reverse, dtype):
    batch_sizes, H = SHAPES[shape]
    layer = make_layer(mode, 7, H, batch_sizes[0], sum(batch_sizes), dtype)
    assert_same(run_both(mode, reverse, batch_sizes, layer, {}), dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("blas", [False, True], ids=["own-loops", "blas"])
@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
def test_native_loop_own_loops_and_blas_agree_with_fused(mode, blas, threads):
    batch_sizes = (16, 16, 12, 5, 5, 5, 3, 1)  # rows below and above BLAS_MIN_ROWS
    layer = make_layer(mode, 5, 37, 17, sum(batch_sizes), torch.float64, seed=3)
    opts = dict(blas=blas, threads=threads)
    assert_same(run_both(mode, True, batch_sizes, layer, opts), torch.float64)
    assert_same(run_both(mode, False, batch_sizes, layer, opts), torch.float64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
def test_native_loop_float32_packed_gemm_agrees_with_fused(mode, threads):
    """Float32 with at least BLAS_MIN_ROWS rows packs W_hh once for MKL's packed GEMM (where
    torch's MKL has it); the later steps run fewer rows than it was packed for."""
    batch_sizes = (16, 16, 12, 5, 5, 5, 3, 1)
    layer = make_layer(mode, 5, 40, 16, sum(batch_sizes), torch.float32, seed=4)
    for reverse in (False, True):
        results = run_both(mode, reverse, batch_sizes, layer, dict(threads=threads))
        assert_same(results, torch.float32)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_native_loop_without_bias_matches_fused(mode):
    layer = make_layer(mode, 4, 20, 3, 12, torch.float64, bias=False)
    assert_same(run_both(mode, False, (3, 3, 3, 3), layer, {}), torch.float64)


def test_native_loop_matches_the_torch_op_twins():
    """Against FusedLayer running pointwise.py (torch ops), not only the C kernels."""
    layer = make_layer("GRU", 6, 24, 4, 16, torch.float64)
    assert_same(run_both("GRU", False, (4,) * 4, layer, {}, pointwise), torch.float64)


def test_native_loop_inference_saves_nothing_and_gives_the_same_outputs():
    layer = {k: (v.detach() if v is not None else None) for k, v in make_layer(
        "LSTM", 5, 32, 2, 6, torch.float64).items()}  # fmt: skip
    G = layer["x"] @ layer["w_ih"].t() + layer["b_ih"] + layer["b_hh"]
    a = native_loop.forward("LSTM", False, (2, 2, 2), G.clone(), layer["h0"], layer["c0"],
                            layer["w_hh"], None, save=False)  # fmt: skip
    b = native_loop.forward("LSTM", False, (2, 2, 2), G.clone(), layer["h0"], layer["c0"],
                            layer["w_hh"], None, save=True)  # fmt: skip
    assert a.C is None and a.GH is None and b.C is not None
    for x, y in [(a.out, b.out), (a.h_n, b.h_n), (a.c_n, b.c_n)]:
        torch.testing.assert_close(x, y, atol=0, rtol=0)


def test_native_loop_propagates_nan():
    G = torch.zeros(3, 4 * 8, dtype=torch.float64)
    G[1, 0] = float("nan")
    h0, c0, w = torch.zeros(1, 8, dtype=torch.float64), torch.zeros(1, 8, dtype=torch.float64), \
        torch.full((32, 8), 0.1, dtype=torch.float64)  # fmt: skip
    r = native_loop.forward("LSTM", False, (1, 1, 1), G, h0, c0, w, None)
    assert not r.out[0].isnan().any() and r.out[1, 0].isnan() and r.out[2].isnan().all()


def _good_args():
    G = torch.zeros(6, 12, dtype=torch.float64)
    h0 = torch.zeros(2, 4, dtype=torch.float64)
    return G, h0, torch.zeros(12, 4, dtype=torch.float64)


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
        (dict(G=torch.zeros(6, 13, dtype=torch.float64)), "columns"),
        (dict(G=torch.zeros(12, 6, dtype=torch.float64).t()), "contiguous"),
        (dict(w=torch.zeros(12, 5, dtype=torch.float64)), "w_hh"),
        (dict(h0=torch.zeros(2, 4, 1, dtype=torch.float64)), "matrices"),
        (dict(mode="LSTM"), "columns"),
        (dict(mode="lstm"), "mode"),
    ],
    ids=["dtype", "width", "strided", "w_hh-shape", "h0-3d", "lstm-width", "mode-name"],
)
def test_native_loop_rejects_malformed_tensors(change, message):
    G, h0, w = _good_args()
    args = dict(mode="GRU", G=G, h0=h0, w=w) | change
    with pytest.raises(ValueError, match=message):
        native_loop.forward(args["mode"], False, (2, 2, 2), args["G"], args["h0"], None,
                            args["w"], None)  # fmt: skip


def test_native_loop_backward_rejects_missing_saved_tensors():
    G, h0, w = _good_args()
    out = torch.zeros(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="GH"):
        native_loop.backward("GRU", False, (2, 2, 2), G, out, None, None, h0, None, w,
                             None, None, None)  # fmt: skip
    with pytest.raises(ValueError, match="d_out"):
        native_loop.backward("GRU", False, (2, 2, 2), G, out, None, G.clone(), h0, None, w,
                             torch.zeros(5, 4, dtype=torch.float64), None, None)  # fmt: skip


def test_native_loop_c_side_refuses_bad_batch_sizes_without_crashing():
    """The C loop checks the batch sizes again: called past the Python guard, it refuses."""
    import ctypes

    G, h0, w = _good_args()
    bs = torch.tensor([2, 3, 1], dtype=torch.int64)  # increasing, and 3 > B
    scratch = [torch.zeros(6, 12, dtype=torch.float64) for _ in range(4)]
    offsets = torch.zeros(4, dtype=torch.int64)
    p = [ctypes.c_void_p(t.data_ptr()) for t in (G, w, h0, *scratch)]
    i64 = ctypes.c_int64
    rc = native_loop._LIBRARY.lib.nl_forward_f64(
        i64(1), i64(0), i64(3), ctypes.c_void_p(bs.data_ptr()), i64(6), i64(2), i64(4),
        p[0], None, p[1], None, p[2], p[3], p[4], None, None, None, p[5],
        ctypes.c_void_p(offsets.data_ptr()), i64(1), i64(4), None,
    )  # fmt: skip
    assert rc == -3
    rc = native_loop._LIBRARY.lib.nl_forward_f64(
        i64(7), i64(0), i64(3), ctypes.c_void_p(bs.data_ptr()), i64(6), i64(2), i64(4),
        *([None] * 12), None, i64(1), i64(4), None,
    )  # fmt: skip
    assert rc == -1


def test_native_loop_fallback_when_blas_is_absent(tmp_path):
    """With RNNKIT_NATIVE_BLAS=0 the library loads without torch's BLAS: same numbers."""
    here = str(Path(__file__).parent)
    code = "\n".join([
        f"import sys; sys.path.insert(0, {here!r})",
        "import torch",
        "from rnnkit.engines import native_loop",
        "from test_native_loop import make_layer, run_both, assert_same",
        "assert native_loop.available(torch.float32) and not native_loop.blas_available()",
        "for mode in ('LSTM', 'GRU', 'RNN_TANH'):",
        "    layer = make_layer(mode, 5, 40, 16, 16 * 6, torch.float32)",
        "    assert_same(run_both(mode, False, (16,) * 6, layer, {}), torch.float32)",
        "from test_native_loop import make_variants, run_native_and_reference",
        "from test_native_loop import assert_same_variant",
        "for mode in ('LSTM', 'GRU'):",
        "    layer = make_layer(mode, 5, 40, 16, 16 * 6, torch.float32)",
        "    v = make_variants(mode, 'layer-norm+recurrent-dropout+zoneout', 16, 40,",
        "                      torch.float32, N=16 * 6)",
        "    r = run_native_and_reference(mode, True, (16,) * 6, layer, v)",
        "    assert_same_variant(r, torch.float32)",
        "layer = make_layer('LSTM', 5, 40, 16, 16 * 6, torch.float32, P=13)",
        "v = make_variants('LSTM', 'layer-norm+recurrent-dropout+zoneout', 16, 40,",
        "                  torch.float32, N=16 * 6, R=13)",
        "assert_same_variant(run_native_and_reference('LSTM', False, (16,) * 6, layer, v),",
        "                    torch.float32)",
        "print('ok')",
    ])  # fmt: skip
    env = dict(os.environ, RNNKIT_NATIVE_BLAS="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# The variants (rnnkit.variants) in the native loop, against the reference engine's steps.

VARIANT_MODES = ["LSTM", "GRU"]
VARIANTS = [
    "layer-norm",
    "recurrent-dropout",
    "zoneout",
    "zoneout-eval",
    "layer-norm+recurrent-dropout",
    "layer-norm+recurrent-dropout+zoneout",
]
VARIANT_SHAPES = {
    "T1-B1-H100": ((1,), 100),
    "T37-B1-H100": ((1,) * 37, 100),
    "packed-ragged-H100": ((3, 3, 2, 2, 2, 1, 1), 100),
    "packed-B9-H33": ((9, 9, 7, 4, 4, 1), 33),
}


def make_variants(mode, variant, B, H, dtype, seed=0, N=None, R=None):
    """StepVariants as the layers draw them: layer-norm gains and biases near 1 and 0, a mask
    of zeros and 1/(1-p), zoneout's 0/1 masks over the N rows (or, in eval, p alone). R: the
    width of h (a projection's P), H by default."""
    R = R or H
    gen = torch.Generator().manual_seed(seed + 100)
    GW = GATES[mode] * H

    def near(value, n):
        return (value + 0.3 * torch.randn(n, generator=gen, dtype=dtype)).requires_grad_()

    ln = rmask = None
    if "layer-norm" in variant:
        ln = (near(1, GW), near(0, GW), near(1, GW), near(0, GW))
        ln += (near(1, H), near(0, H)) if mode == "LSTM" else ()
    if "recurrent-dropout" in variant:
        rmask = torch.bernoulli(torch.full((B, R), 0.75, dtype=dtype), generator=gen) / 0.75
    p = zh = zc = None
    if "zoneout" in variant:
        p = 0.3
        if not variant.endswith("eval"):
            zh = torch.bernoulli(torch.full((N, R), p, dtype=dtype), generator=gen)
            zc = torch.bernoulli(torch.full((N, H), p, dtype=dtype), generator=gen)
            zc = zc if mode == "LSTM" else None
    return StepVariants(ln, rmask, p, zh, zc)


def run_native_and_reference(mode, reverse, batch_sizes, layer, v, native_opts=None):
    """Outputs and the gradients of every leaf (layer-norm tensors too) from ops.run_layer and
    from the reference engine's steps."""
    names = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")
    results = []
    for name in ("reference", "native"):
        t = {k: layer[k].detach().requires_grad_() if layer.get(k) is not None else None
             for k in names}  # fmt: skip
        ln = tuple(p.detach().requires_grad_() for p in v.layer_norm or ())
        vv = dataclasses.replace(v, layer_norm=ln or None)
        weights = (t["w_ih"], t["w_hh"], t["b_ih"], t["b_hh"])
        carry = (t["h0"], t["c0"]) if mode == "LSTM" else (t["h0"],)
        if name == "reference":
            step = reference.cell_step(mode, (*weights, t["w_hr"]), vv)
            masks = (vv.zoneout_h_mask, vv.zoneout_c_mask)
            xs = (t["x"], *(m for m in masks if m is not None)) if masks[0] is not None else t["x"]
            out, last = scan(step, xs, carry, reverse, batch_sizes)
            outs = [out, *last]
        else:
            opts = native_opts or {}
            outs = ops.run_layer(mode, reverse, batch_sizes, t["x"], *carry[:1], t["c0"],
                                 *weights, t["w_hr"], vv, **opts)  # fmt: skip
            outs = [o for o in outs if o is not None]
        gen = torch.Generator().manual_seed(1)
        loss = sum((o * torch.rand(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
        leaves_ = [x for x in (*t.values(), *ln) if x is not None]
        grads = torch.autograd.grad(loss, leaves_)
        results.append(([o.detach() for o in outs], list(grads)))
    return results


# Float32 through two layer norms a step: rounding differs in the norms' sums.
VARIANT_TOL = {
    torch.float64: dict(atol=1e-10, rtol=1e-10),
    torch.float32: dict(atol=1e-4, rtol=1e-4),
}


def assert_same_variant(results, dtype):
    (outs_r, grads_r), (outs_n, grads_n) = results
    assert len(outs_r) == len(outs_n) and len(grads_r) == len(grads_n)
    for a, b in zip(outs_r + grads_r, outs_n + grads_n, strict=True):
        torch.testing.assert_close(b, a, **VARIANT_TOL[dtype])


@pytest.mark.parametrize("mode", VARIANT_MODES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", list(VARIANT_SHAPES), ids=list(VARIANT_SHAPES))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_native_loop_variants_match_reference(mode, variant, shape, reverse, dtype):
    batch_sizes, H = VARIANT_SHAPES[shape]
    B = batch_sizes[0]
    layer = make_layer(mode, 7, H, B, sum(batch_sizes), dtype)
    v = make_variants(mode, variant, B, H, dtype, N=sum(batch_sizes))
    results = run_native_and_reference(mode, reverse, batch_sizes, layer, v)
    assert_same_variant(results, dtype)


@pytest.mark.parametrize("mode", VARIANT_MODES)
@pytest.mark.parametrize("blas", [False, True], ids=["own-loops", "blas"])
@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
def test_native_loop_variants_own_loops_and_blas_match_reference(mode, blas, threads):
    batch_sizes = (16, 16, 12, 5, 5, 5, 3, 1)  # rows below and above BLAS_MIN_ROWS
    layer = make_layer(mode, 5, 37, 16, sum(batch_sizes), torch.float64, seed=3)
    for variant in ("layer-norm+recurrent-dropout+zoneout", "zoneout-eval"):
        v = make_variants(mode, variant, 16, 37, torch.float64, seed=3, N=sum(batch_sizes))
        opts = dict(blas=blas, threads=threads)
        for reverse in (False, True):
            results = run_native_and_reference(mode, reverse, batch_sizes, layer, v, opts)
            assert_same_variant(results, torch.float64)


@pytest.mark.parametrize("mode", VARIANT_MODES)
def test_native_loop_layer_norm_without_bias_matches_reference(mode):
    layer = make_layer(mode, 4, 20, 3, 12, torch.float64, bias=False)
    v = make_variants(mode, "layer-norm", 3, 20, torch.float64)
    assert_same_variant(run_native_and_reference(mode, False, (3,) * 4, layer, v), torch.float64)


def test_native_loop_layer_norm_inference_saves_nothing_and_gives_the_same_outputs():
    layer = {k: (t.detach() if t is not None else None)
             for k, t in make_layer("LSTM", 5, 32, 2, 6, torch.float64).items()}  # fmt: skip
    v = make_variants("LSTM", "layer-norm+recurrent-dropout", 2, 32, torch.float64)
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
    """create_graph=True differentiates ops.reference_layer's steps (torch.func transforms
    never reach the operator: engines.plan routes them to the reference engine)."""
    batch_sizes = (3, 2, 2, 1)
    layer = make_layer(mode, 4, 6, 3, 8, torch.float64, P=P)
    v = make_variants(mode, "layer-norm+recurrent-dropout+zoneout", 3, 6, torch.float64, N=8,
                      R=P)  # fmt: skip
    x, h0, c0, w_hr = layer["x"], layer["h0"], layer["c0"], layer.get("w_hr")
    weights = [layer[k] for k in ("w_ih", "w_hh", "b_ih", "b_hh")]

    def native(w_hh):
        out = ops.run_layer(mode, True, batch_sizes, x, h0, c0, weights[0], w_hh, *weights[2:],
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
    G = torch.zeros(6, GW, dtype=torch.float64)
    h0 = torch.zeros(B, H, dtype=torch.float64)
    c0 = h0.clone() if mode == "LSTM" else None
    ones = torch.ones(GW, dtype=torch.float64)
    nv = native_loop.NativeVariants(ones, ones * 0, ones[:H], ones[:H] * 0)
    return G, h0, c0, torch.zeros(GW, H, dtype=torch.float64), nv


@pytest.mark.parametrize(
    "mode, change, message",
    [
        ("LSTM", dict(ln_hw=torch.ones(15, dtype=torch.float64)), "ln_hw"),
        ("LSTM", dict(ln_hb=None), "ln_hb"),
        ("LSTM", dict(ln_cw=None), "ln_cw"),
        ("LSTM", dict(ln_cb=torch.ones(4, dtype=torch.float32)), "ln_cb"),
        ("GRU", dict(), "no cell"),
        ("RNN_TANH", dict(), "LSTM and GRU"),
        ("LSTM", dict(rmask=torch.ones(3, 4, dtype=torch.float64)), "rmask"),
        ("LSTM", dict(rmask=torch.ones(4, 2, dtype=torch.float64).t()), "contiguous"),
        ("LSTM", dict(zoneout_p=1.5), "zoneout_p"),
        ("LSTM", dict(zh=torch.ones(6, 4, dtype=torch.float64)), "both masks"),
        ("LSTM", dict(zh=torch.ones(5, 4, dtype=torch.float64), zc=torch.ones(5, 4)), "zh"),
        (
            "GRU",
            dict(
                ln_cw=None,
                ln_cb=None,
                zh=torch.ones(6, 4, dtype=torch.float64),
                zc=torch.ones(6, 4),
            ),
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
    import ctypes

    G, h0, c0, w, nv = _ln_args()
    bs = torch.tensor([2, 2, 2], dtype=torch.int64)
    out, h, c, Z = torch.zeros(6, 4, dtype=torch.float64), h0.clone(), c0.clone(), G.clone()
    offsets = torch.zeros(4, dtype=torch.int64)
    p = {
        k: ctypes.c_void_p(t.data_ptr())
        for k, t in dict(G=G, w=w, h0=h0, out=out, h=h, c=c, Z=Z, off=offsets, bs=bs).items()
    }
    i64 = ctypes.c_int64

    def call(mode, zoneout=0, **fields):
        pointers = {k: t.data_ptr() for k, t in fields.items()}
        cv = native_loop._CVariants(eps=1e-5, zoneout_p=0.5, zoneout=zoneout, **pointers)
        return native_loop._LIBRARY.lib.nl_forward_f64(
            i64(mode), i64(0), i64(3), p["bs"], i64(6), i64(2), i64(4), p["G"], None, p["w"], None,
            p["h0"], p["out"], p["h"], p["c"], None, None, p["Z"], p["off"], i64(1), i64(4),
            ctypes.byref(cv),
        )  # fmt: skip

    assert call(0, ln_hw=nv.ln_hw, ln_hb=nv.ln_hb) == -5
    assert call(2, ln_hw=nv.ln_hw, ln_hb=nv.ln_hb) == -5
    assert call(0, rmask=h0) == -5
    assert call(0, zoneout=1) == -5  # no room for the previous h and c
    ln = dict(ln_hw=nv.ln_hw, ln_hb=nv.ln_hb, ln_cw=nv.ln_cw, ln_cb=nv.ln_cb)
    assert call(0, **ln) == -5  # saves nothing and has no room for the normed product
    assert call(0, **ln, ln_scratch=torch.zeros(2, 16, dtype=torch.float64)) == 0


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
def test_plan_routes_every_variant_and_projection_to_the_native_loop(mode, options, proj_size):
    from rnnkit import engines
    from rnnkit.engines.spec import LayerSpec
    from rnnkit.variants import Variants

    v = Variants(**options)
    spec = LayerSpec(mode, 4, 8, 1, 1, True, 0.0, proj_size)
    chosen = engines.plan("LSTM", "fused", spec, torch.device("cpu"), torch.float32, batch=2,
                          per_step=v.per_step)  # fmt: skip
    assert chosen.native and native_loop.covers(spec)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", ["plain", "layer-norm+recurrent-dropout+zoneout"])
def test_native_loop_eager_inference_equals_the_operator(mode, variant):
    """Under no_grad ops.run_layer calls the loop without the operator's dispatch and saves
    nothing; the numbers are the operator's, bit for bit."""
    if variant != "plain" and mode not in VARIANT_MODES:
        pytest.skip("the variants are for LSTM and GRU")
    batch_sizes = (5, 5, 4, 2, 1)
    layer = make_layer(mode, 3, 24, 5, sum(batch_sizes), torch.float32)
    v = None if variant == "plain" else make_variants(mode, variant, 5, 24, torch.float32, N=17)
    args = [layer[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")]
    with_grad = ops.run_layer(mode, True, batch_sizes, *args, None, v)
    with torch.no_grad():
        without = ops.run_layer(mode, True, batch_sizes, *args, None, v)
    for a, b in zip(with_grad, without, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a.detach(), atol=0, rtol=0)


@pytest.mark.parametrize("output", [0, 1, 2], ids=["out-only", "h_n-only", "c_n-only"])
def test_native_loop_gradients_of_one_output_match_reference(output):
    """The other outputs' gradients arrive as None (not zero-filled) and read as zero."""
    batch_sizes = (4, 3, 3, 1)
    layer = make_layer("LSTM", 3, 10, 4, 11, torch.float64)
    v = make_variants("LSTM", "layer-norm+recurrent-dropout+zoneout", 4, 10, torch.float64, N=11)
    args = [layer[k] for k in ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh")]
    leaves_ = [*args, *v.layer_norm]
    native = ops.run_layer("LSTM", False, batch_sizes, *args, None, v)[output]
    step = reference.cell_step("LSTM", (*args[3:], None), v)
    xs = (args[0], v.zoneout_h_mask, v.zoneout_c_mask)
    out, last = scan(step, xs, tuple(args[1:3]), False, batch_sizes)
    expected = (out, *last)[output]
    for a, b in zip(torch.autograd.grad(native.sum(), leaves_),
                    torch.autograd.grad(expected.sum(), leaves_), strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


PROJECTED_VARIANTS = ["plain", "zoneout-eval", "layer-norm+recurrent-dropout+zoneout"]


@pytest.mark.parametrize("variant", PROJECTED_VARIANTS)
@pytest.mark.parametrize("shape", list(VARIANT_SHAPES), ids=list(VARIANT_SHAPES))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_native_loop_projected_lstm_matches_reference(variant, shape, reverse, dtype):
    """LSTM with proj_size: h = (o tanh(c)) W_hr^T, P < H, alone and with the variants."""
    batch_sizes, H = VARIANT_SHAPES[shape]
    B, N, P = batch_sizes[0], sum(batch_sizes), H // 3
    layer = make_layer("LSTM", 7, H, B, N, dtype, P=P)
    v = StepVariants() if variant == "plain" else make_variants("LSTM", variant, B, H, dtype,
                                                                 N=N, R=P)  # fmt: skip
    results = run_native_and_reference("LSTM", reverse, batch_sizes, layer, v)
    assert_same_variant(results, dtype)


@pytest.mark.parametrize("blas", [False, True], ids=["own-loops", "blas"])
@pytest.mark.parametrize("threads", [1, 2], ids=["1-thread", "2-threads"])
def test_native_loop_projected_own_loops_and_blas_match_reference(blas, threads):
    batch_sizes = (16, 16, 12, 5, 5, 5, 3, 1)
    layer = make_layer("LSTM", 5, 37, 16, sum(batch_sizes), torch.float64, seed=5, P=20)
    v = make_variants("LSTM", "layer-norm+recurrent-dropout+zoneout", 16, 37, torch.float64,
                      seed=5, N=sum(batch_sizes), R=20)  # fmt: skip
    for reverse in (False, True):
        results = run_native_and_reference("LSTM", reverse, batch_sizes, layer, v,
                                           dict(blas=blas, threads=threads))  # fmt: skip
        assert_same_variant(results, torch.float64)


def test_native_loop_rejects_a_malformed_projection():
    G, _, c0, w, _ = _ln_args()  # LSTM, H=4, B=2
    h0p, wp = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(16, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="w_hr"):
        native_loop.forward("LSTM", False, (2, 2, 2), G, h0p, c0, wp, None,
                            w_hr=torch.zeros(3, 5, dtype=torch.float64))  # fmt: skip
    with pytest.raises(ValueError, match="w_hh"):
        native_loop.forward("LSTM", False, (2, 2, 2), G, h0p, c0, w, None,
                            w_hr=torch.zeros(3, 4, dtype=torch.float64))  # fmt: skip
    with pytest.raises(ValueError, match="for LSTM"):
        native_loop.forward("GRU", False, (2, 2, 2), G[:, :12].contiguous(), h0p, None,
                            wp[:12].contiguous(), None,
                            w_hr=torch.zeros(3, 4, dtype=torch.float64))  # fmt: skip
