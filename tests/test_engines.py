"""The fast engines equal the reference engine: outputs, final states and every gradient."""

import itertools

import pytest
import torch
from helpers import MODES, OURS, assert_twins_agree, packed_input

import rnnkit
from rnnkit.engines import cpu, pointwise

KINDS = [
    "padded",
    "padded_hx",
    "batch_first_hx",
    "unbatched_hx",
    "packed_sorted",
    "packed_unsorted_hx",
]


def engine_twins(cls, backend, dtype, **kwargs):
    ref = OURS[cls](**kwargs, dtype=dtype, backend="reference")
    fast = OURS[cls](**kwargs, dtype=dtype, backend=backend)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


def check_engine(backend, mode, kind, dtype, T=6, B=3, I=4, H=5, **layer):
    cls, extra = MODES[mode]
    batch_first = kind.startswith("batch_first")
    kw = dict(input_size=I, hidden_size=H, batch_first=batch_first, **extra, **layer)
    ref, fast = engine_twins(cls, backend, dtype, **kw)
    g = torch.Generator().manual_seed(0)
    unbatched = kind.startswith("unbatched")
    shape = (T, I) if unbatched else ((B, T, I) if batch_first else (T, B, I))
    x = torch.randn(shape, generator=g, dtype=dtype, requires_grad=True)
    rows = layer.get("num_layers", 1) * (2 if layer.get("bidirectional") else 1)
    batch = () if unbatched else (B,)
    leaves, hx = [x], None
    if kind.endswith("_hx"):
        h0 = torch.randn(rows, *batch, layer.get("proj_size") or H, generator=g, dtype=dtype)
        leaves.append(h0.requires_grad_())
        hx = h0
        if cls == "LSTM":
            c0 = torch.randn(rows, *batch, H, generator=g, dtype=dtype, requires_grad=True)
            leaves.append(c0)
            hx = (h0, c0)
    if kind.startswith("packed"):
        lengths = sorted(torch.randint(1, T + 1, (B,), generator=g).tolist(), reverse=True)
        lengths[0] = T
        if kind != "packed_sorted":
            lengths = lengths[1:] + lengths[:1]

        def make_args():
            return packed_input(x, lengths, enforce_sorted=kind == "packed_sorted"), hx
    else:

        def make_args():
            return x, hx

    assert_twins_agree(ref, fast, make_args, leaves, dtype)


GRID = [
    pytest.param(
        mode,
        layers,
        bidir,
        bias,
        id=f"{mode}-L{layers}-{'bi' if bidir else 'uni'}-{'b' if bias else 'nob'}",
    )
    for mode, layers, bidir, bias in itertools.product(MODES, (1, 2), (False, True), (True, False))
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode, layers, bidir, bias", GRID)
def test_fused_matches_reference_float64(mode, layers, bidir, bias, kind):
    check_engine(
        "fused", mode, kind, torch.float64, num_layers=layers, bidirectional=bidir, bias=bias
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bidir", [False, True], ids=["uni", "bi"])
def test_fused_lstm_with_projection_matches_reference(kind, bidir):
    check_engine(
        "fused", "lstm", kind, torch.float64, num_layers=2, bidirectional=bidir, proj_size=3
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "T, B, H",
    [(1, 3, 5), (37, 2, 6), (5, 4, 100), (1, 1, 1)],
    ids=["T1", "T37", "H100", "T1-B1-H1"],
)
@pytest.mark.parametrize("kind", ["padded_hx", "packed_unsorted_hx"])
def test_fused_odd_shapes_match_reference(mode, T, B, H, kind):
    if kind.startswith("packed") and B == 1:
        kind = "packed_sorted"
    check_engine(
        "fused", mode, kind, torch.float64, T=T, B=B, H=H, bidirectional=True, num_layers=2
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["padded_hx", "packed_unsorted_hx", "unbatched_hx"])
def test_fused_float32_matches_reference(mode, kind):
    check_engine("fused", mode, kind, torch.float32, T=9, H=16, num_layers=2, bidirectional=True)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "kind", ["padded_hx", "batch_first_hx", "packed_unsorted_hx", "unbatched_hx"]
)
def test_torch_engine_matches_reference(mode, kind):
    check_engine("torch", mode, kind, torch.float64, num_layers=2, bidirectional=True)


def test_torch_engine_lstm_with_projection():
    check_engine("torch", "lstm", "packed_unsorted_hx", torch.float64, num_layers=2, proj_size=3)


@pytest.mark.parametrize("backend", ["fused", "torch"])
@pytest.mark.parametrize("mode", MODES)
def test_dropout_one_matches_reference(backend, mode):
    # p=1 zeroes every layer's output but the last one, deterministically.
    check_engine(backend, mode, "padded_hx", torch.float64, num_layers=3, dropout=1.0)


def test_fused_eval_mode_has_no_dropout():
    layer = rnnkit.GRU(4, 5, num_layers=2, dropout=0.5, backend="fused", dtype=torch.float64).eval()
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], layer(x)[0], rtol=0, atol=0)


def test_fused_layer_needs_no_input_gradient():
    layer = rnnkit.LSTM(4, 5, backend="fused")
    out, _ = layer(torch.randn(3, 2, 4))
    out.sum().backward()
    assert all(p.grad is not None for p in layer.parameters())


# The compiled CPU kernels against their torch-op twins, one call each on odd shapes.
needs_cpu_kernels = pytest.mark.skipif(
    not cpu.available(torch.float64), reason="no C compiler for the CPU kernels"
)


def _rand(*shape, dtype, low=-2.0, high=2.0):
    return torch.empty(shape, dtype=dtype).uniform_(low, high)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bs, H", [(1, 1), (3, 5), (2, 33)])
def test_cpu_kernels_match_torch_op_twins(bs, H, dtype):
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}
    torch.manual_seed(0)
    for relu in (False, True):
        g, gh = _rand(bs, H, dtype=dtype), _rand(bs, H, dtype=dtype)
        outs = []
        for k in (cpu, pointwise):
            gg, h, o = g.clone(), torch.zeros(bs, H, dtype=dtype), torch.zeros(bs, H, dtype=dtype)
            k.rnn_forward(gg, gh, h, o, relu)
            dg = torch.zeros(bs, H, dtype=dtype)
            k.rnn_backward(o, g, dg, relu)
            outs.append((h, o, dg))
        for a, b in zip(*outs, strict=False):
            torch.testing.assert_close(a, b, **tol)
    # LSTM: forward then backward from the saved activations.
    g, c, dh, dc = (
        _rand(bs, 4 * H, dtype=dtype),
        _rand(bs, H, dtype=dtype),
        _rand(bs, H, dtype=dtype),
        _rand(bs, H, dtype=dtype),
    )
    gh = _rand(bs, 4 * H, dtype=dtype)
    results = []
    for k in (cpu, pointwise):
        gg, cc, cs = g.clone(), c.clone(), torch.zeros(bs, H, dtype=dtype)
        h, o = torch.zeros(bs, H, dtype=dtype), torch.zeros(bs, H, dtype=dtype)
        k.lstm_forward(gg, gh, cc, cs, h, o)
        ddc, dg = dc.clone(), torch.zeros(bs, 4 * H, dtype=dtype)
        k.lstm_backward(gg, cs, c, dh, ddc, dg)
        results.append((gg, cc, cs, h, o, ddc, dg))
    for a, b in zip(*results, strict=False):
        torch.testing.assert_close(a, b, **tol)
    # GRU.
    g, gh, h0, dh = (
        _rand(bs, 3 * H, dtype=dtype),
        _rand(bs, 3 * H, dtype=dtype),
        _rand(bs, H, dtype=dtype),
        _rand(bs, H, dtype=dtype),
    )
    results = []
    for k in (cpu, pointwise):
        gg, h, o = g.clone(), h0.clone(), torch.zeros(bs, H, dtype=dtype)
        k.gru_forward(gg, gh, h, o)
        dg, dgh, dhp = (torch.zeros(bs, n * H, dtype=dtype) for n in (3, 3, 1))
        k.gru_backward(gg, gh, h0, dh, dg, dgh, dhp)
        results.append((gg, h, o, dg, dgh, dhp))
    for a, b in zip(*results, strict=False):
        torch.testing.assert_close(a, b, **tol)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bs, H", [(1, 1), (3, 5), (2, 33)])
def test_cpu_layer_norm_lstm_kernels_match_torch_op_twins(bs, H, dtype):
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.manual_seed(0)
    g, z = _rand(bs, 4 * H, dtype=dtype), _rand(bs, 4 * H, dtype=dtype)
    c0, c_prev = _rand(bs, H, dtype=dtype), _rand(bs, H, dtype=dtype)
    hw, hb = _rand(4 * H, dtype=dtype), _rand(4 * H, dtype=dtype)
    cw, cb = _rand(H, dtype=dtype), _rand(H, dtype=dtype)
    dh, dc0 = _rand(bs, H, dtype=dtype), _rand(bs, H, dtype=dtype)
    results = []
    for k in (cpu, pointwise):
        gg, c = g.clone(), c0.clone()
        new = [torch.zeros(bs, n, dtype=dtype) for n in (1, 1, H, H, 1, 1, H)]
        mu_h, rs_h, cs, cn, mu_c, rs_c, out = new
        k.ln_lstm_forward(gg, z, hw, hb, mu_h, rs_h, c, cs, cn, mu_c, rs_c, cw, cb, out, 1e-5)
        dc = dc0.clone()
        dg, dcn, dz = (torch.zeros(bs, n, dtype=dtype) for n in (4 * H, H, 4 * H))
        k.ln_lstm_backward(
            gg, cs, c_prev, cn, mu_c, rs_c, cw, z, mu_h, rs_h, hw, dh, dc, dg, dcn, dz
        )
        results.append((gg, c, *new, dc, dg, dcn, dz))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **tol)


@needs_cpu_kernels
@pytest.mark.parametrize("eval_mode", [False, True], ids=["masks", "eval-p"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bs, H", [(1, 1), (3, 5), (2, 33)])
def test_cpu_zoneout_kernels_match_torch_op_twins(bs, H, dtype, eval_mode):
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-6, "atol": 1e-6}
    torch.manual_seed(0)

    def keep():
        return 0.3 if eval_mode else torch.bernoulli(torch.full((bs, H), 0.4, dtype=dtype))

    zh, zc = keep(), keep()
    g, gh = _rand(bs, 4 * H, dtype=dtype), _rand(bs, 4 * H, dtype=dtype)
    c0, h0, dh, dc0 = (_rand(bs, H, dtype=dtype) for _ in range(4))
    results = []
    for k in (cpu, pointwise):
        gg, c, h = g.clone(), c0.clone(), h0.clone()
        cs, cz, out = (torch.zeros(bs, H, dtype=dtype) for _ in range(3))
        k.lstm_forward_zoneout(gg, gh, c, cs, cz, h, out, zh, zc)
        dc, dg, carry = (
            dc0.clone(),
            torch.zeros(bs, 4 * H, dtype=dtype),
            torch.zeros(bs, H, dtype=dtype),
        )
        k.lstm_backward_zoneout(gg, cs, c0, dh, dc, dg, carry, zh, zc)
        results.append((gg, c, h, cs, cz, out, dc, dg, carry))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **tol)
    g3, gh3 = _rand(bs, 3 * H, dtype=dtype), _rand(bs, 3 * H, dtype=dtype)
    results = []
    for k in (cpu, pointwise):
        gg, h, out = g3.clone(), h0.clone(), torch.zeros(bs, H, dtype=dtype)
        k.gru_forward_zoneout(gg, gh3, h, out, zh)
        dg, dgh, dhp = (torch.zeros(bs, n * H, dtype=dtype) for n in (3, 3, 1))
        k.gru_backward_zoneout(gg, gh3, h0, dh, dg, dgh, dhp, zh)
        results.append((gg, h, out, dg, dgh, dhp))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **tol)


def test_auto_backend_follows_the_documented_rule():
    from rnnkit import engines
    from rnnkit.engines import fused, torch_native

    cpu_, cuda = torch.device("cpu"), torch.device("cuda")

    def engine(mode, device, **kw):
        spec = rnnkit.layers.LayerSpec(mode, 3, 4, 1, 1, True, 0.0, 0)
        kw.setdefault("batch", 2)
        return engines.plan("x", "auto", spec, device, torch.float32, **kw).engine

    assert engine("LSTM", cpu_) is torch_native
    # LSTM training on the CPU: the native loop at small batches, oneDNN from B=16.
    assert engine("LSTM", cpu_, needs_grad=True) is fused
    assert engine("LSTM", cpu_, needs_grad=True, batch=engines.LSTM_FUSED_MAX_BATCH) is fused
    assert engine("LSTM", cpu_, needs_grad=True, batch=16) is torch_native
    assert engine("LSTM", cuda, needs_grad=True) is torch_native
    assert engine("GRU", cpu_) is fused
    assert engine("RNN_RELU", cpu_) is fused
    assert all(engine(m, cuda) is torch_native for m in ("LSTM", "GRU"))
    assert engine("LSTM", cuda, per_step=True) is fused
    assert engine("GRU", cpu_, batch=0) is not fused
    # Per-step variants go to the fused engine whatever the rule says.
    layer = rnnkit.LSTM(3, 4, layer_norm=True, dtype=torch.float64)
    ref = rnnkit.LSTM(3, 4, layer_norm=True, dtype=torch.float64, backend="fused")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], ref(x)[0], rtol=0, atol=0)


triton_kernels = pytest.importorskip("rnnkit.engines.triton_kernels")
needs_triton = pytest.mark.skipif(
    not triton_kernels.available(torch.float32, torch.device("cpu")),
    reason="Triton is not installed or not in interpreter mode",
)


@needs_triton
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["padded_hx", "packed_unsorted_hx", "unbatched_hx"])
def test_triton_backend_matches_reference(mode, kind):
    check_engine("triton", mode, kind, torch.float64, T=4, H=5, num_layers=2, bidirectional=True)


@needs_triton
@pytest.mark.parametrize("kind", ["padded_hx", "packed_unsorted_hx"])
def test_triton_lstm_inference_takes_the_persistent_kernel_and_matches_reference(kind):
    from rnnkit.engines import plan
    from rnnkit.engines.spec import LayerSpec

    spec = LayerSpec("LSTM", 4, 5, 1, 1, True, 0.0, 0)
    cpu_ = torch.device("cpu")
    assert plan("x", "triton", spec, cpu_, torch.float64, batch=2).persistent
    assert not plan("x", "triton", spec, cpu_, torch.float64, batch=2, needs_grad=True).persistent
    ref, fast = engine_twins(
        "LSTM",
        "triton",
        torch.float64,
        input_size=4,
        hidden_size=5,
        num_layers=2,
        bidirectional=True,
    )
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    h0, c0 = torch.randn(2, 4, 3, 5, dtype=torch.float64).unbind(0)
    inp = packed_input(x, [3, 6, 5], enforce_sorted=False) if kind.startswith("packed") else x
    with torch.no_grad():
        got, (h, c) = fast(inp, (h0, c0))
        want, (h_ref, c_ref) = ref(inp, (h0, c0))
    if kind.startswith("packed"):
        got, want = got.data, want.data
    for a, b in ((got, want), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@needs_triton
def test_triton_backend_lstm_projection_float32():
    check_engine("triton", "lstm", "batch_first_hx", torch.float32, T=3, H=6, proj_size=2)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_fused_runs_under_cpu_autocast_in_bfloat16(mode):
    cls, extra = MODES[mode]
    layer = OURS[cls](8, 16, 2, backend="fused", **extra)
    x = torch.randn(5, 3, 8, requires_grad=True)
    expected = layer(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)[0]
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() < 5e-2
    out.float().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_constant_under_compile_marks_a_function_as_torch_compiler_does():
    from rnnkit.engines import native_build

    ours = native_build.constant_under_compile(lambda: 1)
    torchs = torch.compiler.assume_constant_result(lambda: 1)
    assert vars(ours) == vars(torchs) == {"_dynamo_marked_constant": True}
