"""The fast engines equal the reference engine: outputs, final states and every gradient (float64
to 1e-10, float32 within the bound of ``helpers``); the triton engine's per-step loop on the CPU
(over the torch-op twins of its kernels) too; and ``engines.plan``, the one place that decides
which engine runs a call."""

import itertools

import pytest
import torch
from helpers import MODES, OURS, assert_twins_agree, packed_input
from one_layer import VARIANT_MODES, assert_matches_reference, make_layer, make_variants

import rnnkit
from rnnkit import engines
from rnnkit.engines import native, reference, torch_native
from rnnkit.engines import triton as triton_engine

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


CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _plan(backend, mode="LSTM", device=CPU, dtype=torch.float32, proj_size=0, size=(3, 4), **kw):
    """``plan`` for one layer of ``size`` (input, hidden)."""
    spec = rnnkit.layers.LayerSpec(mode, *size, 1, 1, True, 0.0, proj_size)
    kw.setdefault("batch", 2)
    return engines.plan("x", backend, spec, device, dtype, **kw)


def test_auto_backend_follows_the_documented_rule(monkeypatch):
    def engine(mode, device, **kw):
        return _plan("auto", mode, device, **kw).engine

    # LSTM on the CPU: inference on oneDNN; float32 training native at every batch, float64
    # training native at small batches and on oneDNN from B=16.
    assert engine("LSTM", CPU) is torch_native
    assert engine("LSTM", CPU, needs_grad=True) is native
    assert engine("LSTM", CPU, needs_grad=True, batch=1024) is native
    f64 = dict(needs_grad=True, dtype=torch.float64)
    assert engine("LSTM", CPU, batch=engines.LSTM_NATIVE_MAX_BATCH, **f64) is native
    assert engine("LSTM", CPU, batch=16, **f64) is torch_native
    assert engine("LSTM", CUDA, needs_grad=True) is torch_native
    assert engine("GRU", CPU) is native
    assert engine("RNN_RELU", CPU) is native
    # A single step of a small GRU or RNN runs on torch's kernel, inference or training; more
    # steps, per-step variants or a larger step (batch times one step's multiply-adds) run native.
    assert engine("GRU", CPU, steps=1) is torch_native
    assert engine("RNN_TANH", CPU, steps=1, dtype=torch.float64) is torch_native
    assert engine("GRU", CPU, steps=2) is native
    assert engine("GRU", CPU, steps=1, needs_grad=True) is torch_native
    assert engine("GRU", CPU, steps=2, needs_grad=True) is native
    assert engine("GRU", CPU, steps=1, per_step=True) is native
    assert engine("GRU", CPU, steps=1, dtype=torch.float16) is native
    spec = rnnkit.layers.LayerSpec("GRU", 3, 4, 1, 1, True, 0.0, 0)
    largest = engines.SINGLE_STEP_TORCH_MAX_MACS // engines._step_macs(spec)
    assert engine("GRU", CPU, steps=1, batch=largest) is torch_native
    assert engine("GRU", CPU, steps=1, batch=largest + 1) is native

    # One step of one sequence through a large float32 LSTM (streaming) runs inference native;
    # more steps or sequences, float64, or fewer weights stay on oneDNN.
    def lstm(I, H, **kw):
        return engine("LSTM", CPU, size=(I, H), **{"steps": 1, "batch": 1, **kw})

    # 4 H (I + H) weights: 4 * 256 * (256 + 256) = 2^19.
    assert engines.STREAMING_LSTM_NATIVE_MIN_WEIGHTS == 4 * 256 * (256 + 256)
    assert lstm(256, 256) is native
    assert lstm(255, 256) is torch_native
    assert lstm(256, 256, steps=2) is torch_native
    assert lstm(256, 256, batch=2) is torch_native
    assert lstm(256, 256, dtype=torch.float64) is torch_native
    # Training a step at a time: a small LSTM on torch's kernel, a large one (oneDNN copies its
    # weights every call) and longer calls native.
    assert lstm(255, 256, needs_grad=True) is torch_native
    assert lstm(256, 256, needs_grad=True) is native
    assert lstm(255, 256, needs_grad=True, steps=2) is native
    # With a projection torch's LSTM is its ATen loop, not oneDNN: the GRU and RNN rule, native
    # but for one small inference step.
    assert engine("LSTM", CPU, proj_size=2) is native
    assert engine("LSTM", CPU, proj_size=2, steps=2) is native
    assert engine("LSTM", CPU, proj_size=2, steps=1) is torch_native
    assert engine("LSTM", CPU, proj_size=2, steps=1, needs_grad=True) is torch_native
    assert engine("LSTM", CPU, proj_size=2, steps=2, needs_grad=True) is native
    projected = rnnkit.layers.LayerSpec("LSTM", 3, 4, 1, 1, True, 0.0, 2)
    largest = engines.SINGLE_STEP_TORCH_MAX_MACS // engines._step_macs(projected)
    assert engine("LSTM", CPU, proj_size=2, steps=1, batch=largest) is torch_native
    assert engine("LSTM", CPU, proj_size=2, steps=1, batch=largest + 1) is native
    assert all(engine(m, CUDA) is torch_native for m in ("LSTM", "GRU"))
    assert engine("LSTM", CUDA, per_step=True) is triton_engine
    assert engine("GRU", CPU, batch=0) is reference
    # bfloat16 goes to torch's CPU kernels only where the CPU has bfloat16 dot products (oneDNN
    # cannot run it elsewhere), float16 never: the native engine computes them in float32.
    for runs_bfloat16 in (False, True):
        monkeypatch.setattr(engines, "_torch_cpu_runs_bfloat16", lambda r=runs_bfloat16: r)
        bf16 = engine("LSTM", CPU, dtype=torch.bfloat16, batch=16)
        assert bf16 is (torch_native if runs_bfloat16 else native)
        assert engine("LSTM", CPU, dtype=torch.float16) is native
    assert engine("LSTM", CPU, dtype=torch.float64, batch=16) is torch_native
    # Per-step variants go to the native engine whatever the rule says.
    assert engine("LSTM", CPU, per_step=True, batch=16) is native
    layer = rnnkit.LSTM(3, 4, layer_norm=True, dtype=torch.float64)
    ref = rnnkit.LSTM(3, 4, layer_norm=True, dtype=torch.float64, backend="native")
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 1, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(x)[0], ref(x)[0], rtol=0, atol=0)


def test_step_macs_count_every_layer_direction_and_projection():
    gru = rnnkit.layers.LayerSpec("GRU", 5, 7, 2, 2, True, 0.0, 0)
    # Layer 0 reads 5 features, layer 1 both directions' 7: per direction 3 H (I + H).
    assert engines._step_macs(gru) == 2 * 21 * (5 + 7) + 2 * 21 * (14 + 7)
    lstm = rnnkit.layers.LayerSpec("LSTM", 5, 7, 1, 1, True, 0.0, 3)
    # W_hh reads the projected 3; W_hr is 3 x 7.
    assert engines._step_macs(lstm) == 28 * (5 + 3) + 3 * 7


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fused_names_the_fast_engine_of_the_device(device):
    chosen = _plan("fused", device=torch.device(device), per_step=True)
    assert chosen.engine is (native if device == "cpu" else triton_engine), chosen.why
    assert device in chosen.why


@pytest.mark.parametrize("backend", ["reference", "native", "torch"])
def test_a_named_engine_runs_and_says_why(backend):
    expected = {"reference": reference, "native": native, "torch": torch_native}[backend]
    chosen = _plan(backend)
    assert chosen.engine is expected and backend in chosen.why


def test_an_engine_that_cannot_run_is_an_error_when_named():
    with pytest.raises(ValueError, match="native engine runs on the CPU; got a cuda tensor"):
        _plan("native", device=CUDA)
    with pytest.raises(ValueError, match="backend='torch' cannot run layer_norm"):
        _plan("torch", per_step=True)
    with pytest.raises(ValueError, match="native engine runs float32, float64, bfloat16"):
        _plan("native", dtype=torch.int64)


def test_graph_capture_and_transforms_take_torch_ops_whatever_the_backend(monkeypatch):
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: True)
    for backend in engines.BACKENDS:
        assert _plan(backend).engine is torch_native
        assert _plan(backend, per_step=True).engine is reference
    monkeypatch.setattr(torch.jit, "is_tracing", lambda: False)
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    # ONNX's LSTM has no projection: a projected LSTM exports unrolled.
    assert _plan("fused", proj_size=2).engine is reference
    assert _plan("fused").engine is torch_native
    monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: False)
    monkeypatch.setattr(engines, "transformed", lambda: True)
    for backend in ("auto", "fused", "native"):
        assert _plan(backend).engine is reference
    assert _plan("torch").engine is torch_native


def test_without_the_native_loop_auto_and_fused_run_the_reference_engine(monkeypatch):
    """Where the C loop cannot be built the CPU falls back to the spec, saying why; naming
    the native engine explicitly is an error."""
    monkeypatch.setattr(native, "unavailable_reason", lambda device, dtype: "no compiler")
    for backend in ("auto", "fused"):
        chosen = _plan(backend, mode="GRU")
        assert chosen.engine is reference and "no compiler" in chosen.why
    with pytest.raises(ValueError, match="backend='native' cannot run: no compiler"):
        _plan("native")


# The triton engine's per-step loop (FusedLayer) on the CPU, over the torch-op twins of its
# kernels: the logic of the loop (the walk over packed rows, reverse, the variants, the
# projection and the gradients over all steps) against the reference, without Triton.

LOOP_SHAPES = {
    "T1-B1-H5": ((1,), 5),
    "T9-B1-H16": ((1,) * 9, 16),
    "packed-ragged-H7": ((3, 3, 2, 2, 1), 7),
}
LOOP_CASES = (
    [(mode, "plain") for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")]
    + [
        (mode, variant)
        for mode in VARIANT_MODES
        for variant in ("layer-norm+recurrent-dropout+zoneout", "zoneout-eval")
    ]
    + [("LSTM-projected", "plain"), ("LSTM-projected", "layer-norm+recurrent-dropout+zoneout")]
)


@pytest.mark.parametrize("mode, variant", LOOP_CASES, ids=[f"{m}-{v}" for m, v in LOOP_CASES])
@pytest.mark.parametrize("shape", list(LOOP_SHAPES))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_triton_engine_loop_on_twins_matches_reference(mode, variant, shape, reverse, dtype):
    batch_sizes, H = LOOP_SHAPES[shape]
    B, N, P = batch_sizes[0], sum(batch_sizes), 3 if mode == "LSTM-projected" else 0
    mode = mode.removesuffix("-projected")
    layer = make_layer(mode, 4, H, B, N, dtype, P=P)
    v = None if variant == "plain" else make_variants(mode, variant, B, H, dtype, N=N, R=P)
    assert_matches_reference("twins", mode, reverse, batch_sizes, layer, v)


triton_kernels = pytest.importorskip("rnnkit.engines.triton.kernels")
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
def test_triton_lstm_inference_takes_the_persistent_kernel_and_matches_reference(kind, monkeypatch):
    calls = []
    persistent = triton_kernels.lstm_persistent_forward

    def counted(*args, **kwargs):
        calls.append(1)
        return persistent(*args, **kwargs)

    monkeypatch.setattr(triton_kernels, "lstm_persistent_forward", counted)
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
    # Two layers of two directions: four persistent launches.
    assert len(calls) == 4
    if kind.startswith("packed"):
        got, want = got.data, want.data
    for a, b in ((got, want), (h, h_ref), (c, c_ref)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # Training (a gradient is needed) takes the per-step loop instead.
    calls.clear()
    fast(inp, (h0, c0))[0]
    assert not calls


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
    # As torch.nn's: a GRU from its float32 initial state returns float32.
    assert out.dtype == (torch.float32 if layer.mode == "GRU" else torch.bfloat16)
    assert (out.float() - expected).abs().max() < 5e-2
    out.float().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_constant_under_compile_marks_a_function_as_torch_compiler_does():
    from rnnkit.engines.native import build as native_build

    ours = native_build.constant_under_compile(lambda: 1)
    torchs = torch.compiler.assume_constant_result(lambda: 1)
    assert vars(ours) == vars(torchs) == {"_dynamo_marked_constant": True}
