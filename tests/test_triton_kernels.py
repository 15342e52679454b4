"""The Triton kernels equal their torch-op twins in ``engines/triton/twins.py``: each kernel on
its own, and the triton engine's whole layer (outputs, final states and every gradient) run with
either set. float64 to 1e-10; float32 within the bound of ``helpers`` (the twin in float32 as the
base, the twin in float64 on the same inputs as the exact result); bfloat16 and float16 within a
few roundings of their own.

Without CUDA the kernels run through Triton's interpreter on tiny shapes; with CUDA the same tests
run on the GPU at real shapes, plus bfloat16.
"""

import importlib
import importlib.util
import os
import sys
import warnings

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Read by triton.jit when it decorates the kernels, so it must precede their import.
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from helpers import assert_float32_as_accurate  # noqa: E402

from rnnkit.engines import triton as triton_engine  # noqa: E402
from rnnkit.engines.spec import LN_EPS  # noqa: E402
from rnnkit.engines.triton import kernels as tk  # noqa: E402
from rnnkit.engines.triton import twins  # noqa: E402

# A kernel that fails falls back to its twin with a warning: here that is an error, or the
# parity tests would compare the twin with itself.
pytestmark = pytest.mark.filterwarnings("error:rnnkit. the Triton kernel:RuntimeWarning")

if not CUDA and not tk._INTERPRET:
    # Another test imported the kernels before the interpreter was asked for: build them again.
    importlib.reload(tk)

DEVICE = torch.device("cuda" if CUDA else "cpu")
KERNEL_SHAPES = [(1, 1), (3, 5), (3, 33)] + ([(64, 256), (37, 1000)] if CUDA else [])
# (T, B, I, H, P) for the fused layer; P is the LSTM projection size.
LAYER_SHAPE = (20, 64, 48, 256, 96) if CUDA else (4, 3, 2, 5, 3)
TOL = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    # One rounding to 8 (11) mantissa bits here against one per torch op in the twin.
    torch.bfloat16: {"atol": 5e-2, "rtol": 5e-2},
    torch.float16: {"atol": 5e-3, "rtol": 5e-3},
}


def _dtype_id(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _as(tensors, dtype):
    """Copies of ``tensors`` (None stays None) in ``dtype``, leaves again if they were."""
    return [
        None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors
    ]


def assert_agree(got, want, exact, dtype, tol=None) -> None:
    """The kernels' results ``got`` equal the twins' ``want``: float32 within the bound of
    ``helpers`` (``exact``: the twins' float64 results on the same inputs), other dtypes
    element-wise to ``tol`` (TOL by default)."""
    got, want = [t for t in got if t is not None], [t for t in want if t is not None]
    if dtype == torch.float32:
        assert_float32_as_accurate(got, want, [t for t in exact if t is not None])
        return
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, **(tol or TOL)[dtype])


def fused_layer(mode, reverse, batch_sizes, kernels, *tensors):
    """One layer of the triton engine on ``kernels`` (Triton's, or the torch-op twins)."""
    return triton_engine.run_layer(mode, reverse, batch_sizes, *tensors, module=kernels)


# name -> (function, width of each tensor argument in units of H (None: the argument is None),
# trailing non-tensor arguments)
KERNELS = {
    "lstm_forward": ("lstm_forward", (4, 4, 1, 1, 1, 1), ()),
    "lstm_forward_no_h": ("lstm_forward", (4, 4, 1, 1, None, 1), ()),
    "lstm_backward": ("lstm_backward", (4, 1, 1, 1, 1, 4), ()),
    "gru_forward": ("gru_forward", (3, 3, 1, 1), ()),
    "gru_backward": ("gru_backward", (3, 3, 1, 1, 3, 3, 1), ()),
    "rnn_tanh_forward": ("rnn_forward", (1, 1, 1, 1), (False,)),
    "rnn_relu_forward": ("rnn_forward", (1, 1, 1, 1), (True,)),
    "rnn_tanh_backward": ("rnn_backward", (1, 1, 1), (False,)),
    "rnn_relu_backward": ("rnn_backward", (1, 1, 1), (True,)),
    # Zoneout: masks of 0/1 (training) or the probability (eval) as the trailing arguments.
    "lstm_forward_zoneout_train": ("lstm_forward_zoneout", (4, 4, 1, 1, 1, 1, 1, -1, -1), ()),
    "lstm_forward_zoneout_eval": ("lstm_forward_zoneout", (4, 4, 1, 1, 1, 1, 1), (0.3, 0.3)),
    "lstm_backward_zoneout_train": ("lstm_backward_zoneout", (4, 1, 1, 1, 1, 4, 1, -1, -1), ()),
    "lstm_backward_zoneout_eval": ("lstm_backward_zoneout", (4, 1, 1, 1, 1, 4, 1), (0.3, 0.1)),
    "gru_forward_zoneout_train": ("gru_forward_zoneout", (3, 3, 1, 1, -1), ()),
    "gru_forward_zoneout_eval": ("gru_forward_zoneout", (3, 3, 1, 1), (0.3,)),
    "gru_backward_zoneout_train": ("gru_backward_zoneout", (3, 3, 1, 1, 3, 3, 1, -1), ()),
    "gru_backward_zoneout_eval": ("gru_backward_zoneout", (3, 3, 1, 1, 3, 3, 1), (0.3,)),
}


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "row_strided"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=_dtype_id
)
@pytest.mark.parametrize("bs,H", KERNEL_SHAPES, ids=[f"bs{b}-H{h}" for b, h in KERNEL_SHAPES])
@pytest.mark.parametrize("name", list(KERNELS))
def test_kernel_matches_pointwise(name, bs, H, dtype, strided):
    fn, widths, extra = KERNELS[name]
    gen = torch.Generator().manual_seed(0)
    # Saved activations lie in (-1, 1); inputs in that range keep the bf16 errors small.
    args = [_kernel_arg(w, bs, H, gen).to(DEVICE, dtype) if w is not None else None
            for w in widths]  # fmt: skip
    ours = [None if a is None else _copy(a, strided) for a in args]
    exact = _as(args, torch.float64)
    args = [None if a is None else _copy(a, strided) for a in args]
    getattr(twins, fn)(*args, *extra)
    getattr(tk, fn)(*ours, *extra)
    if dtype == torch.float32:
        getattr(twins, fn)(*exact, *extra)
    assert_agree(ours, args, exact, dtype)
    for got in ours:
        if strided and got is not None:
            assert got.as_strided((bs, 2), (got.stride(0), 1), got.shape[1]).isnan().all()


def _kernel_arg(width: int, bs: int, H: int, gen: torch.Generator) -> torch.Tensor:
    """Width ``width * H`` entries in (-1, 1); width -1: a zoneout mask of 0s and 1s (bs, H)."""
    if width == -1:
        return (torch.rand(bs, H, generator=gen) < 0.5).double()
    return torch.rand(bs, width * H, generator=gen) * 2 - 1


def _copy(t: torch.Tensor, strided: bool) -> torch.Tensor:
    """A copy of ``t``; when ``strided``, its rows lie 2 elements apart more than their width, as
    in a slice of a wider tensor, with NaN in the gaps."""
    if not strided:
        return t.clone()
    wide = torch.full((t.shape[0], t.shape[1] + 2), float("nan"), dtype=t.dtype, device=t.device)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


# mode id -> (FusedLayer mode, gates per hidden unit, LSTM projection)
MODES = {
    "rnn_tanh": ("RNN_TANH", 1, False),
    "rnn_relu": ("RNN_RELU", 1, False),
    "lstm": ("LSTM", 4, False),
    "lstm_proj": ("LSTM", 4, True),
    "gru": ("GRU", 3, False),
}


def _layer_inputs(mode_id: str, batch_sizes: tuple[int, ...], bias: bool, dtype: torch.dtype):
    """Leaf tensors x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr for one fused layer (None where the
    mode or ``bias`` has none), all requiring grad."""
    mode, gates, proj = MODES[mode_id]
    _, B, I, H, P = LAYER_SHAPE
    R = P if proj else H
    gen = torch.Generator().manual_seed(0)
    scale = H**-0.5

    def leaf(*shape, s: float = 1.0) -> torch.Tensor:
        t = (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(DEVICE, dtype)
        return t.requires_grad_()

    return (
        leaf(sum(batch_sizes), I),
        leaf(B, R),
        leaf(B, H) if mode == "LSTM" else None,
        leaf(gates * H, I, s=scale),
        leaf(gates * H, R, s=scale),
        leaf(gates * H, s=scale) if bias else None,
        leaf(gates * H, s=scale) if bias else None,
        leaf(P, H, s=scale) if proj else None,
    )


def _run_layer(kernels, mode_id, reverse, batch_sizes, leaves):
    """Outputs (out, h_n, c_n) of the fused layer and the gradients of a fixed random projection
    of them with respect to every leaf."""
    outs = fused_layer(MODES[mode_id][0], reverse, batch_sizes, kernels, *leaves)
    outs = [o for o in outs if o is not None]
    gen = torch.Generator().manual_seed(1)
    loss = sum(
        (o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(DEVICE)).sum()
        for o in outs
    )
    wrt = [t for t in leaves if t is not None]
    return [o.detach() for o in outs], list(torch.autograd.grad(loss, wrt))


T, B = LAYER_SHAPE[:2]
LAYOUTS = {
    # Sequences sorted by decreasing length, as in a PackedSequence.
    "packed": tuple(max(1, B - (B * t) // T) for t in range(T)),
    "padded": (B,) * T,
}
LAYER_DTYPES = [torch.float32, torch.float64] + ([torch.bfloat16] if CUDA else [])


@pytest.mark.parametrize("dtype", LAYER_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode_id", list(MODES))
def test_fused_layer_with_triton_kernels_matches_pointwise(mode_id, reverse, layout, bias, dtype):
    batch_sizes = LAYOUTS[layout]
    leaves = _layer_inputs(mode_id, batch_sizes, bias, dtype)
    if dtype == torch.bfloat16:
        # bfloat16 GEMMs and states drift over T steps: hold the kernels to the float32 twin.
        want = _run_layer(twins, mode_id, reverse, batch_sizes, _as_float32(leaves))
        got = _run_layer(tk, mode_id, reverse, batch_sizes, leaves)
        for w, g in zip(want[0] + want[1], got[0] + got[1], strict=True):
            assert (g.float() - w).norm() <= 3e-2 * w.norm()
        return
    want = _run_layer(twins, mode_id, reverse, batch_sizes, leaves)
    got = _run_layer(tk, mode_id, reverse, batch_sizes, leaves)
    exact = ([], [])
    if dtype == torch.float32:
        exact = _run_layer(twins, mode_id, reverse, batch_sizes, _as(leaves, torch.float64))
    assert_agree(got[0] + got[1], want[0] + want[1], exact[0] + exact[1], dtype)


def _as_float32(leaves):
    return [None if t is None else t.detach().float().requires_grad_() for t in leaves]


def test_available_names_supported_dtypes():
    assert tk.available(torch.float32) and tk.available(torch.bfloat16)
    assert not tk.available(torch.int64)
    assert "int64" in tk.unavailable_reason(torch.int64)


def test_module_imports_and_reports_unavailable_without_triton(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "triton.language", None)
    spec = importlib.util.spec_from_file_location("tk_without_triton", tk.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert not module.available(torch.float32)
    assert "not installed" in module.unavailable_reason(torch.float32)


# (H, batch_sizes, reverse); 20 sequences take two programs of 16.
PERSISTENT_CASES = {
    "H5-packed-forward": (5, (3, 3, 2, 1), False),
    "H33-packed-reverse": (33, (3, 3, 2, 1), True),
    "H64-padded-B20-forward": (64, (20,) * 3, False),
}
if CUDA:
    PERSISTENT_CASES["H64-padded-B64-T20-reverse"] = (64, (64,) * 20, True)
PERSISTENT_DTYPES = [torch.float32, torch.float64] + ([torch.bfloat16] if CUDA else [])


@pytest.mark.parametrize("dtype", PERSISTENT_DTYPES, ids=_dtype_id)
@pytest.mark.parametrize("case", list(PERSISTENT_CASES))
def test_persistent_lstm_forward_matches_fused_layer(case, dtype):
    H, batch_sizes, reverse = PERSISTENT_CASES[case]
    B, I = batch_sizes[0], 4
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, s: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * s).to(DEVICE, dtype)

    x, h0, c0 = rand(sum(batch_sizes), I), rand(B, H), rand(B, H)
    w_ih, w_hh = rand(4 * H, I, s=H**-0.5), rand(4 * H, H, s=H**-0.5)
    b_ih, b_hh = rand(4 * H), rand(4 * H)
    G = torch.addmm(b_ih + b_hh, x, w_ih.t())  # (N, 4H)
    got = tk.lstm_persistent_forward(G, w_hh, h0, c0, batch_sizes, reverse)
    if dtype == torch.bfloat16:
        ref = [t.float() for t in (x, h0, c0, w_ih, w_hh, b_ih, b_hh)]
        want = fused_layer("LSTM", reverse, batch_sizes, twins, *ref, None)
        for w, g in zip(want, got, strict=True):
            assert (g.float() - w).norm() <= 3e-2 * w.norm()
        return
    tensors = (x, h0, c0, w_ih, w_hh, b_ih, b_hh)
    want = fused_layer("LSTM", reverse, batch_sizes, twins, *tensors, None)
    exact = ()
    if dtype == torch.float32:
        exact = fused_layer("LSTM", reverse, batch_sizes, twins, *_as(tensors, torch.float64), None)
    assert_agree(got, want, exact, dtype)


def test_persistent_lstm_forward_rejects_large_hidden_size():
    H = tk.PERSISTENT_MAX_H + 1
    G, w_hh, h0 = torch.zeros(2, 4 * H), torch.zeros(4 * H, H), torch.zeros(1, H)
    with pytest.raises(ValueError, match=f"at most {tk.PERSISTENT_MAX_H}; got {H}"):
        tk.lstm_persistent_forward(G, w_hh, h0, h0, (1, 1))


# (bs, H): odd sizes, and H = 300 for rows longer than one 256-column chunk of the kernels.
LN_SHAPES = [*KERNEL_SHAPES, (2, 300)]
LN_TOL = {**TOL, torch.bfloat16: {"atol": 1e-1, "rtol": 1e-1}}


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "row_strided"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=_dtype_id
)
@pytest.mark.parametrize("bs,H", LN_SHAPES, ids=[f"bs{b}-H{h}" for b, h in LN_SHAPES])
def test_layer_norm_lstm_kernels_match_pointwise(bs, H, dtype, strided):
    gen = torch.Generator().manual_seed(0)

    def copy(t: torch.Tensor) -> torch.Tensor:
        # Row statistics (bs, 1) stay contiguous, as in the fused engine: torch's layer-norm
        # backward, which the twin calls, ignores their strides.
        return _copy(t, strided and t.dim() == 2 and t.shape[1] > 1)

    def rand(*shape: int) -> torch.Tensor:
        return copy((torch.rand(*shape, generator=gen) * 2 - 1).to(DEVICE, dtype))

    # Forward: g, z, the hidden side's gains and biases, mu_h, rs_h, c, c_save, cn_save, mu_c,
    # rs_c, the cell's gains and biases, out.
    fwd = [rand(bs, 4 * H), rand(bs, 4 * H), rand(4 * H) + 1, rand(4 * H), rand(bs, 1),
           rand(bs, 1), rand(bs, H), rand(bs, H), rand(bs, H), rand(bs, 1), rand(bs, 1),
           rand(H) + 1, rand(H), rand(bs, H)]  # fmt: skip
    want, got, exact = [copy(t) for t in fwd], [copy(t) for t in fwd], _as(fwd, torch.float64)
    c_prev = fwd[6]
    twins.ln_lstm_forward(*want, LN_EPS)
    tk.ln_lstm_forward(*got, LN_EPS)
    if dtype == torch.float32:
        twins.ln_lstm_forward(*exact, LN_EPS)
    assert_agree(got, want, exact, dtype, LN_TOL)
    # Backward from the twin's saved tensors: g, c, c_prev, cn, mu_c, rs_c, ln_cw, z, mu_h,
    # rs_h, ln_hw, then dh, dc in/out, and the outputs dg, dcn, dz.
    g, z, hw, _, mu_h, rs_h, c, _, cn, mu_c, rs_c, cw, _, _ = want
    saved = [g, c, c_prev, cn, mu_c, rs_c, cw, z, mu_h, rs_h, hw]
    grads = [rand(bs, H), rand(bs, H), rand(bs, 4 * H), rand(bs, H), rand(bs, 4 * H)]
    want, got, exact = [copy(t) for t in grads], [copy(t) for t in grads], _as(grads, torch.float64)
    twins.ln_lstm_backward(*saved, *want)
    tk.ln_lstm_backward(*saved, *got)
    if dtype == torch.float32:
        twins.ln_lstm_backward(*_as(saved, torch.float64), *exact)
    assert_agree(got, want, exact, dtype, LN_TOL)


# (bs, width): odd batches; 3 columns, and 300 (the GRU's 3H at H=100) for rows longer than one
# 256-column chunk of the kernels.
ROW_LN_SHAPES = [(bs, W) for bs in (1, 3, 7) for W in (3, 300)]


@pytest.mark.parametrize("strided", [False, True], ids=["contiguous", "row_strided"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=_dtype_id
)
@pytest.mark.parametrize("bs,W", ROW_LN_SHAPES, ids=[f"bs{b}-W{w}" for b, w in ROW_LN_SHAPES])
def test_row_layer_norm_kernels_match_pointwise(bs, W, dtype, strided):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int, shift: float = 0.0) -> torch.Tensor:
        t = (torch.rand(*shape, generator=gen) * 2 - 1 + shift).to(DEVICE, dtype)
        return _copy(t, strided) if t.dim() == 2 else t

    # Rows off centre, so that the mean matters.
    x, weight, bias = rand(bs, W, shift=0.5), rand(W, shift=1.0), rand(W)
    want = twins.layer_norm(x, weight, bias)
    got = tk.layer_norm(x, weight, bias)
    exact = twins.layer_norm(*_as((x, weight, bias), torch.float64))
    for w, g in zip(want, got, strict=True):
        assert (g.shape, g.dtype) == (w.shape, w.dtype)
    assert_agree(got, want, exact, dtype, LN_TOL)
    # The input gradient from the twin's statistics, as the fused engine saves them.
    _, mean, rstd = want
    dy = rand(bs, W)
    want = twins.layer_norm_input_grad(dy, x, mean, rstd, weight)
    got = tk.layer_norm_input_grad(dy, x, mean, rstd, weight)
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
    exact = twins.layer_norm_input_grad(*_as((dy, x, mean, rstd, weight), torch.float64))
    assert_agree([got], [want], [exact], dtype, LN_TOL)


def _count_calls(monkeypatch, module, name: str) -> list:
    """Wrap ``module.name`` so that each call appends to the returned list."""
    calls, fn = [], getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def _refuse(*args, **kwargs):
    raise AssertionError("the torch-op twin ran where a Triton kernel should")


VARIANTS = {"layer_norm": {"layer_norm": True}, "zoneout": {"zoneout": 0.25}}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_layer_with_variants_on_triton_kernels_matches_reference(
    mode, variant, training, monkeypatch
):
    import rnnkit

    T, B, I, H = LAYER_SHAPE[0], LAYER_SHAPE[1], LAYER_SHAPE[2], LAYER_SHAPE[3]
    torch.manual_seed(0)
    kw = VARIANTS[variant]
    cls = rnnkit.LSTM if mode == "LSTM" else rnnkit.GRU
    ours = cls(I, H, backend="triton", dtype=torch.float64, device=DEVICE, **kw)
    ref = cls(I, H, backend="reference", dtype=torch.float64, device=DEVICE, **kw)
    ref.load_state_dict(ours.state_dict())
    ours.train(training)
    ref.train(training)
    x = torch.randn(T, B, I, dtype=torch.float64, device=DEVICE, requires_grad=True)
    results = []
    for layer in (ours, ref):
        # The same zoneout masks for both: they are drawn from the same seed.
        torch.manual_seed(1)
        with monkeypatch.context() as patch:
            if layer is ours and mode == "GRU" and variant == "layer_norm":
                # The GRU's per-step norms run on the kernels (the input side's one norm over
                # all steps stays a torch op), and their input gradients never on the twin.
                forward = _count_calls(patch, tk, "layer_norm")
                backward = _count_calls(patch, tk, "layer_norm_input_grad")
                patch.setattr(twins, "layer_norm_input_grad", _refuse)
            out, _ = layer(x)
            grads = torch.autograd.grad(out.sum(), [x, *layer.parameters()])
        results.append([out, *grads])
    if mode == "GRU" and variant == "layer_norm":
        assert len(forward) == len(backward) == T
    for g, w in zip(*results, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


class _BrokenKernel:
    """Stands in for a Triton kernel that fails to compile: ``kernel[grid](...)`` raises."""

    def __init__(self, name: str):
        self.__name__ = name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("PTXASError: ptxas fatal: simulated failure for this test")

        return launch


def test_kernel_that_fails_to_compile_falls_back_to_twin_with_one_warning(monkeypatch):
    monkeypatch.setattr(tk, "lstm_fwd_kernel", _BrokenKernel("lstm_fwd_kernel"))
    monkeypatch.setattr(tk, "_FAILED", {})
    batch_sizes = LAYOUTS["packed"]
    leaves = _layer_inputs("lstm", batch_sizes, True, torch.float64)
    with pytest.warns(RuntimeWarning, match="lstm_fwd_kernel cannot run.*simulated failure"):
        got = _run_layer(tk, "lstm", False, batch_sizes, leaves)
    want = _run_layer(twins, "lstm", False, batch_sizes, leaves)
    for w, g in zip(want[0] + want[1], got[0] + got[1], strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float64])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning came once; the twin runs from now on
        _run_layer(tk, "lstm", False, batch_sizes, leaves)
    assert "lstm_forward" in tk._FAILED


def test_persistent_kernel_that_fails_falls_back_to_twin(monkeypatch):
    monkeypatch.setattr(
        tk, "lstm_persistent_fwd_kernel", _BrokenKernel("lstm_persistent_fwd_kernel")
    )
    monkeypatch.setattr(tk, "_FAILED", {})
    H, batch_sizes = 5, (3, 3, 2, 1)
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(sum(batch_sizes), 4 * H, generator=gen, dtype=torch.float64).to(DEVICE)
    w_hh = torch.randn(4 * H, H, generator=gen, dtype=torch.float64).to(DEVICE) * H**-0.5
    h0, c0 = torch.randn(2, 3, H, generator=gen, dtype=torch.float64).to(DEVICE)
    with pytest.warns(RuntimeWarning, match="lstm_persistent_fwd_kernel cannot run"):
        got = tk.lstm_persistent_forward(G, w_hh, h0, c0, batch_sizes, True)
    # The fused layer with w_ih the identity takes G itself as the input projection.
    want = fused_layer(
        "LSTM", True, batch_sizes, twins, G, h0, c0,
        torch.eye(4 * H, dtype=torch.float64, device=DEVICE), w_hh, None, None, None,
    )  # fmt: skip
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_row_layer_norm_kernel_that_fails_falls_back_to_twin(monkeypatch):
    monkeypatch.setattr(tk, "layer_norm_fwd_kernel", _BrokenKernel("layer_norm_fwd_kernel"))
    monkeypatch.setattr(tk, "_FAILED", {})
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = (
        torch.randn(*shape, generator=gen, dtype=torch.float64).to(DEVICE)
        for shape in ((3, 300), (300,), (300,))
    )
    with pytest.warns(RuntimeWarning, match="layer_norm_fwd_kernel cannot run"):
        got = tk.layer_norm(x, weight, bias)
    for w, g in zip(twins.layer_norm(x, weight, bias), got, strict=True):
        torch.testing.assert_close(g, w, **TOL[torch.float64])
    assert "layer_norm" in tk._FAILED
