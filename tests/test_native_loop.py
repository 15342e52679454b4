"""The native time loop (engines/native_loop.py) against the fused engine's FusedLayer, which the
engine tests hold to the reference: outputs, states and every gradient, on odd shapes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from rnnkit.engines import fused, native_loop, ops, pointwise

pytestmark = pytest.mark.skipif(
    not native_loop.available(torch.float64), reason="the native loop could not be built"
)

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
TOL = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=1e-5, rtol=1e-5)}


def make_layer(mode, I, H, B, N, dtype, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.rand(*shape, generator=gen, dtype=dtype) * 2 - 1).requires_grad_()

    GW = GATES[mode] * H
    return dict(
        x=rand(N, I),
        h0=rand(B, H),
        c0=rand(B, H) if mode == "LSTM" else None,
        w_ih=rand(GW, I) * 0.5,
        w_hh=rand(GW, H) * (0.5 / H**0.5),
        b_ih=rand(GW) if bias else None,
        b_hh=rand(GW) if bias else None,
    )


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
    rc = native_loop._lib.nl_forward_f64(
        i64(1), i64(0), i64(3), ctypes.c_void_p(bs.data_ptr()), i64(6), i64(2), i64(4),
        p[0], p[1], None, p[2], p[3], p[4], None, None, None, p[5],
        ctypes.c_void_p(offsets.data_ptr()), i64(1), i64(4),
    )  # fmt: skip
    assert rc == -3
    rc = native_loop._lib.nl_forward_f64(
        i64(7), i64(0), i64(3), ctypes.c_void_p(bs.data_ptr()), i64(6), i64(2), i64(4),
        *([None] * 11), None, i64(1), i64(4),
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
        "print('ok')",
    ])  # fmt: skip
    env = dict(os.environ, RNNKIT_NATIVE_BLAS="0")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
