"""int8 inference (rnnkit.quantize, engines/native/int8.py and int8.h).

What is checked, and against what:
- the integer product is exact: the kernels' output equals the quantized arithmetic done in
  torch (int8 values multiplied in float64, where every sum is an exact integer), on every
  build (AVX-512 VNNI or this CPU's best, AVX2, plain C), including operands at +-127 where
  AVX2's one-row kernel's 16-bit pair sums would saturate if anything were wrong;
- the loop around it: every step of a layer recomputed from the layer's own previous output
  (teacher forcing) in float64 with the same quantization, so the only difference left is
  float32 rounding of the gate math, bounded from the arithmetic;
- the quantization itself: one step against the unquantized layer in float64, within the bound
  that the rounding of weights and activations (half a quantization step each) allows;
- the module contract: every layer and cell, packed, reverse, bidirectional, stacked, the
  variants in eval, threads, save and load, bad input.
"""

import ctypes
import io
import platform

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit.engines.native import int8
from rnnkit.engines.native import loop as native_loop
from rnnkit.engines.spec import LN_EPS, StepVariants
from rnnkit.quantized import QuantizedGRU, QuantizedLSTM, QuantizedLSTMCell, quantize

F64 = torch.float64
U32 = 2.0**-24  # float32's unit roundoff

pytestmark = pytest.mark.skipif(not native_loop.available(), reason="no native engine here")

X86 = platform.machine() in ("x86_64", "AMD64")
BUILDS = [
    "native",
    pytest.param("baseline", marks=pytest.mark.skipif(not X86, reason="x86-64 builds only")),
    pytest.param("portable", marks=pytest.mark.skipif(not X86, reason="x86-64 builds only")),
]


@pytest.fixture(params=BUILDS)
def build(request):
    """The loop built for this CPU, for AVX2 (x86-64-v3) and for plain x86-64 (the C kernel)."""
    with native_loop.use_arch(request.param):
        if not native_loop.available():
            pytest.skip(f"the {request.param} build failed: {native_loop.build_error()}")
        yield request.param


def quantized_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' activation quantization, in float32 as they do it: (q, scale)."""
    x = x.to(torch.float32)
    top = x.abs().amax(dim=1)
    # A division as the C code does it (torch's 127.0 / top is 127 * (1 / top): two roundings).
    inv = torch.where(top > 0, torch.full_like(top, 127.0) / top, torch.zeros_like(top))
    q = torch.round(x * inv[:, None]).clamp(-127, 127)
    return q, top / 127


def int8_product(x: torch.Tensor, m: int8.Int8Matrix) -> torch.Tensor:
    """x W^T as the kernels compute it: exact integer sums, then float32 scaling."""
    qa, sa = quantized_rows(x)
    acc = (qa.to(F64) @ m.q.to(F64).t()).to(torch.float32)  # exact: |sum| < 2^24
    return acc * (m.scale[None, :] * sa[:, None])


def matrix(rows: int, K: int, gates: int = 1, seed: int = 0) -> int8.Int8Matrix:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, K, generator=g)
    if rows > 2:
        w[1] = 0  # a zero row: scale 0
        w[2, 0] = 50  # an outlier: the rest of its row rounds coarsely
    return int8.pack(*int8.quantize_rows(w), gates)


# ---- the integer product


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "N,K,gates,H",
    [(1, 1, 1, 1), (3, 5, 4, 3), (7, 33, 3, 17), (9, 100, 4, 40), (130, 64, 1, 20),
     (1, 31, 3, 50), (1, 300, 4, 29), (5, 7, 4, 29), (2, 261, 3, 45)],
    ids=lambda v: str(v),
)
def test_int8_linear_is_the_exact_integer_product(build, N, K, gates, H, threads):
    m = matrix(gates * H, K, gates)
    x = torch.randn(N, K)
    x[0] = 0
    bias = torch.randn(gates * H)
    out = int8.linear(x, m, bias, threads=threads)
    assert torch.equal(out, int8_product(x, m) + bias)


def test_int8_kernels_do_not_saturate_at_the_extremes(build):
    """Every pair of products at 127 * 127 with one sign: AVX2's one-row vpmaddubsw would clip
    a pair above 32767, VNNI's offset form would lose a bit of the +128; the sums must be exact,
    for each tile of rows (AVX2: one row, two, four; three are two and one) and for a row
    longer than the one-row kernel's chunk of 1024 columns."""
    K, rows = 4100, 32
    q = torch.full((rows, K), 127, dtype=torch.int8)
    q[1::2] = -127
    q[2, ::3] = -127
    m = int8.pack(q, torch.ones(rows), 1)
    x = torch.ones(4, K)
    x[1] = -1
    x[2, ::2] = -1
    x[3, 7] = 0
    out = int8.linear(x, m, None)
    assert torch.equal(out, int8_product(x, m))
    assert out[0, 0] == 127 * K  # scale 1/127 on the activations: 127 * 127 * K / 127
    for n in (1, 2, 3):
        assert torch.equal(int8.linear(x[-n:], m, None, threads=1), int8_product(x[-n:], m))


def test_thread_counts_out_of_range_are_refused_and_the_c_side_bounds_them(build):
    """threads=0, -1, 2**62 or a bool: a clear ValueError before any C code runs. Called past
    that guard, the C kernel bounds the count itself (2**62 once wrapped its allocation's size to
    0 bytes and OpenMP read it as "all cores": heap corruption) and computes the same product."""
    m = matrix(48, 16, 3)
    x = torch.randn(10, 16)
    for bad in (0, -1, 2**62, True, 2.0):
        with pytest.raises(ValueError, match="threads must be an int from 1 to"):
            int8.linear(x, m, None, threads=bad)
    out = torch.empty(10, 48)
    rc = native_loop.library().nl_q8_linear(
        ctypes.c_int64(10), ctypes.c_void_p(x.data_ptr()), ctypes.byref(m.c()), None,
        ctypes.c_void_p(out.data_ptr()), ctypes.c_int64(2**62),
    )  # fmt: skip
    assert rc == 0
    assert torch.equal(out, int8_product(x, m))


def test_int8_rows_with_nan_or_inf_come_out_nan_and_the_others_do_not_change():
    m = matrix(12, 10)
    x = torch.randn(4, 10)
    clean = int8.linear(x, m, None)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    out = int8.linear(x, m, None)
    assert out[1].isnan().all() and out[2].isnan().all()
    assert torch.equal(out[[0, 3]], clean[[0, 3]])


def test_weights_quantize_per_row_to_127_steps():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [3.0, 1.0, -2.0]])
    q, scale = int8.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.abs().max() == 127 and (q != -128).all()
    assert torch.equal(q[1], torch.zeros(3, dtype=torch.int8)) and scale[1] == 0
    # Half a step at most, per element.
    assert ((q.to(F64) * scale.to(F64)[:, None] - w.to(F64)).abs()
            <= scale.to(F64)[:, None] / 2 * (1 + 1e-6)).all()  # fmt: skip


def test_pack_refuses_what_the_kernels_cannot_take():
    q = torch.zeros(8, 4, dtype=torch.int8)
    with pytest.raises(ValueError, match="-128"):
        int8.pack(q.clone().fill_(-128), torch.ones(8), 1)
    with pytest.raises(ValueError, match="float32 scale of shape"):
        int8.pack(q, torch.ones(7), 1)
    with pytest.raises(ValueError, match="2-D int8"):
        int8.pack(q.float(), torch.ones(8), 1)
    with pytest.raises(ValueError, match="blocks of rows"):
        int8.pack(q, torch.ones(8), 3)
    with pytest.raises(ValueError, match="finite and non-negative"):
        int8.pack(q, -torch.ones(8), 1)


# ---- the loop: each step is the quantized arithmetic


def _layer_weights(mode, I, H, P, bias, seed):
    gates = {"LSTM": 4, "GRU": 3}.get(mode, 1)
    g = torch.Generator().manual_seed(seed)
    R = P or H
    k = H**-0.5
    w_ih = (torch.rand(gates * H, I, generator=g) * 2 - 1) * k
    w_hh = (torch.rand(gates * H, R, generator=g) * 2 - 1) * k
    b = [(torch.rand(gates * H, generator=g) * 2 - 1) * k for _ in range(2)] if bias else [None] * 2
    w_hr = (torch.rand(P, H, generator=g) * 2 - 1) * k if P else None
    mats = tuple(int8.pack(*int8.quantize_rows(w), gates) for w in (w_ih, w_hh))
    hr = int8.pack(*int8.quantize_rows(w_hr), 1) if P else None
    return (*mats, b[0], b[1], hr)


def _ln(mode, H, seed):
    gates = {"LSTM": 4, "GRU": 3}[mode]
    g = torch.Generator().manual_seed(seed)
    parts = [gates * H, gates * H] + ([H] if mode == "LSTM" else [])
    out = []
    for n in parts:
        out += [1 + 0.3 * torch.randn(n, generator=g), 0.2 * torch.randn(n, generator=g)]
    return tuple(out)


def _walk(batch_sizes, reverse):
    """(t, first row, rows, rows continuing from the previous step, its first row) per step."""
    offsets = [0]
    for b in batch_sizes:
        offsets.append(offsets[-1] + b)
    T = len(batch_sizes)
    order = range(T - 1, -1, -1) if reverse else range(T)
    for t in order:
        tp = t + 1 if reverse else t - 1
        n = batch_sizes[t]
        np_ = min(batch_sizes[tp], n) if 0 <= tp < T else 0
        yield t, offsets[t], n, np_, offsets[tp] if np_ else 0


def _teacher_forced(mode, reverse, batch_sizes, x, h0, c0, weights, variants, out):
    """Each step of the int8 loop recomputed in float64 from the loop's own h_{t-1}, with the
    kernels' quantization: (the reference outputs, max |c|, max |pre-activation|)."""
    w_ih, w_hh, b_ih, b_hh, _ = weights
    H = w_hh.H
    ln = variants.layer_norm if variants is not None else None
    zp = variants.zoneout_p if variants is not None else None
    G = int8_product(x, w_ih).to(F64)
    if ln is not None:
        G = torch.nn.functional.layer_norm(G, (G.shape[1],), ln[0].to(F64), ln[1].to(F64), LN_EPS)
    if b_ih is not None:
        G = G + (b_ih if mode == "GRU" else b_ih + b_hh).to(F64)
    ref = torch.empty_like(out, dtype=F64)
    c = None if c0 is None else c0.to(F64).clone()
    cmax, zmax = 0.0, 0.0
    for _t, off, n, np_, offp in _walk(batch_sizes, reverse):
        h_prev = torch.cat([out[offp : offp + np_], h0[np_:n]])  # the loop's own h_{t-1}
        Z = int8_product(h_prev, w_hh).to(F64)
        if ln is not None:
            Z = torch.nn.functional.layer_norm(Z, (Z.shape[1],), ln[2].to(F64), ln[3].to(F64),
                                               LN_EPS)  # fmt: skip
        g = G[off : off + n]
        zmax = max(zmax, float(g.abs().max()), float(Z.abs().max()))
        hp = h_prev.to(F64)
        if mode == "LSTM":
            i, f, gg, o = (g + Z).chunk(4, 1)
            cn = torch.sigmoid(f) * c[:n] + torch.sigmoid(i) * torch.tanh(gg)
            cc = cn
            if ln is not None:
                cc = torch.nn.functional.layer_norm(cn, (H,), ln[4].to(F64), ln[5].to(F64), LN_EPS)
            hn = torch.sigmoid(o) * torch.tanh(cc)
            if zp is not None:
                cn = zp * c[:n] + (1 - zp) * cn
                hn = zp * hp + (1 - zp) * hn
            c[:n] = cn
            cmax = max(cmax, float(cn.abs().max()))
        elif mode == "GRU":
            zb = Z + (b_hh.to(F64) if b_hh is not None else 0)
            xr, xz, xn = g.chunk(3, 1)
            hr, hz, hn_ = zb.chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            nn_ = torch.tanh(xn + r * hn_)
            hn = nn_ + z * (hp - nn_)
            if zp is not None:
                hn = zp * hp + (1 - zp) * hn
        else:
            pre = g + Z
            hn = torch.relu(pre) if mode == "RNN_RELU" else torch.tanh(pre)
        ref[off : off + n] = hn
    return ref, cmax, zmax


CONFIGS = {
    "lstm": ("LSTM", {}),
    "gru": ("GRU", {}),
    "rnn-tanh": ("RNN_TANH", {}),
    "rnn-relu": ("RNN_RELU", {}),
    "lstm-nobias": ("LSTM", {"bias": False}),
    "gru-nobias": ("GRU", {"bias": False}),
    "lstm-ln": ("LSTM", {"ln": True}),
    "gru-ln": ("GRU", {"ln": True}),
    "lstm-zoneout": ("LSTM", {"zoneout": 0.3}),
    "gru-ln-zoneout": ("GRU", {"ln": True, "zoneout": 0.2}),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize(
    "batch_sizes", [(1,) * 9, (5, 5, 4, 4, 2, 1, 1)], ids=["T9-B1", "packed-B5"]
)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_int8_layer_steps_are_the_quantized_arithmetic(build, config, batch_sizes, reverse,
                                                       threads):  # fmt: skip
    """Float32 gate math against float64 on the same quantized inputs: each step's few dozen
    roundings of values bounded by (1 + max|pre-activation|) (1 + max|c|) cost at most 32 units
    of roundoff a step, and the cell state carries them forward (h itself is taken from the
    loop at every step, so nothing else accumulates)."""
    mode, opts = CONFIGS[config]
    I, H, B = 13, 37, batch_sizes[0]
    weights = _layer_weights(mode, I, H, 0, opts.get("bias", True), seed=len(config))
    N = sum(batch_sizes)
    x = torch.randn(N, I)
    h0 = 0.5 * torch.randn(B, H)
    c0 = torch.randn(B, H) if mode == "LSTM" else None
    ln = _ln(mode, H, 3) if opts.get("ln") else None
    variants = StepVariants(ln, None, opts.get("zoneout"))
    if ln is None and "zoneout" not in opts:
        variants = None
    out, h_n, _ = int8.run_layer(mode, reverse, batch_sizes, x, h0, c0, *weights, variants,
                                   threads=threads)  # fmt: skip
    ref, cmax, zmax = _teacher_forced(mode, reverse, batch_sizes, x, h0, c0, weights, variants,
                                      out)  # fmt: skip
    bound = 32 * U32 * len(batch_sizes) * (1 + zmax) * (1 + cmax)
    err = (out.to(F64) - ref).abs().max().item()
    assert err <= bound, (err, bound)
    # The final state is the last output of each sequence.
    last = {}
    for _, off, n, _, _ in _walk(batch_sizes, reverse):
        for b in range(n):
            last[b] = off + b
    assert torch.equal(h_n, out[[last[b] for b in range(B)]])


def test_int8_loop_with_a_projection_is_the_quantized_arithmetic_for_one_step(build):
    """With a projection, r_t is quantized inside the loop; one step from h0 checks it against
    the same arithmetic (r_t's float32 rounding may move one of its 127 steps, so only one step
    is compared exactly: below the size of such a move)."""
    mode, I, H, P, B = "LSTM", 11, 24, 7, 3
    weights = _layer_weights(mode, I, H, P, True, seed=5)
    x, h0, c0 = torch.randn(B, I), torch.randn(B, P), torch.randn(B, H)
    out, _, c_n = int8.run_layer(mode, False, (B,), x, h0, c0, *weights)
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    g = int8_product(x, w_ih).to(F64) + (b_ih + b_hh).to(F64) + int8_product(h0, w_hh).to(F64)
    i, f, gg, o = g.chunk(4, 1)
    c = torch.sigmoid(f) * c0.to(F64) + torch.sigmoid(i) * torch.tanh(gg)
    r = (torch.sigmoid(o) * torch.tanh(c)).to(torch.float32)
    ref = int8_product(r, w_hr).to(F64)
    assert (c_n.to(F64) - c).abs().max() <= 64 * U32 * (1 + c.abs().max())
    step = (w_hr.scale.to(F64)[None, :] * r.abs().amax(1, keepdim=True).to(F64) / 127
            * w_hr.q.abs().sum(1).to(F64)[None, :])  # fmt: skip
    assert ((out.to(F64) - ref).abs() <= 64 * U32 * (1 + ref.abs()) + step / 127).all()


# ---- the quantization: one step against the unquantized layer


def _rounding_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """max |x W^T - x^ W^^T| over what rounding to half a step of both allows (float64)."""
    qx, sx = quantized_rows(x)
    _, sw = int8.quantize_rows(w)
    x_hat = qx.to(F64) * sx.to(F64)[:, None]
    dx, dw = sx.to(F64)[:, None] / 2, sw.to(F64)[None, :] / 2
    return dx * w.to(F64).abs().sum(1)[None, :] + x_hat.abs().sum(1)[:, None] * dw  # (B, rows)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_one_int8_step_is_within_the_rounding_of_weights_and_activations(mode):
    """The pre-activations move by at most sum_k |w| dx + |x^| dw (dx, dw: half a quantization
    step); sigmoid's slope is at most 1/4 and tanh's 1, which bounds each cell's output."""
    torch.manual_seed(1)
    I, H, B = 29, 33, 4
    float_layer = {"LSTM": rnnkit.LSTM, "GRU": rnnkit.GRU}.get(mode)
    if float_layer is None:
        float_layer = rnnkit.RNN(I, H, nonlinearity="relu" if mode == "RNN_RELU" else "tanh")
    else:
        float_layer = float_layer(I, H)
    x, h0 = torch.randn(1, B, I), torch.randn(1, B, H)
    c0 = torch.randn(1, B, H)
    q = quantize(float_layer)
    ref = float_layer.double()
    with torch.no_grad():
        if mode == "LSTM":
            exact, (_, c_exact) = ref(x.double(), (h0.double(), c0.double()))
            got, (_, c_got) = q(x, (h0, c0))
        else:
            exact, _ = ref(x.double(), h0.double())
            got, _ = q(x, h0)
    ex = _rounding_bound(x[0], float_layer.weight_ih_l0.float())
    eh = _rounding_bound(h0[0], float_layer.weight_hh_l0.float())
    e = ex + eh  # (B, G*H)
    slack = 64 * U32
    if mode == "LSTM":
        ei, ef, eg, eo = e.chunk(4, 1)
        gates = (x[0].double() @ ref.weight_ih_l0.t() + h0[0].double() @ ref.weight_hh_l0.t()
                 + ref.bias_ih_l0 + ref.bias_hh_l0)  # fmt: skip
        g = torch.tanh(gates.chunk(4, 1)[2])
        dc = ef / 4 * c0[0].double().abs() + ei / 4 * g.abs() + eg
        assert ((c_got[0].double() - c_exact[0]).abs() <= dc + slack).all()
        bound = eo / 4 + dc
    elif mode == "GRU":
        exr, exz, exn = ex.chunk(3, 1)
        ehr, ehz, ehn = eh.chunk(3, 1)
        hn = h0[0].double() @ ref.weight_hh_l0.t() + ref.bias_hh_l0
        n_exact = torch.tanh((x[0].double() @ ref.weight_ih_l0.t() + ref.bias_ih_l0).chunk(3, 1)[2]
                             + torch.sigmoid((x[0].double() @ ref.weight_ih_l0.t()
                                              + ref.bias_ih_l0 + hn).chunk(3, 1)[0])
                             * hn.chunk(3, 1)[2])  # fmt: skip
        dn = exn + (exr + ehr) / 4 * hn.chunk(3, 1)[2].abs() + ehn
        bound = (exz + ehz) / 4 * ((h0[0].double() - n_exact).abs() + dn) + dn
    else:
        bound = e
    assert ((got[0].double() - exact[0]).abs() <= bound + slack).all()


# ---- the modules


def _float_and_int8(cls, *args, **kwargs):
    torch.manual_seed(0)
    layer = cls(*args, **kwargs).eval()
    return layer, quantize(layer)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (rnnkit.LSTM, {"num_layers": 2, "bidirectional": True}),
        (rnnkit.GRU, {"num_layers": 2, "bidirectional": True, "layer_norm": True}),
        (rnnkit.LSTM, {"proj_size": 5, "bidirectional": True}),
        (rnnkit.LSTM, {"layer_norm": True, "zoneout": 0.2, "learn_init": True}),
        (nn.GRU, {"num_layers": 2}),
        (rnnkit.RNN, {"nonlinearity": "relu", "bidirectional": True}),
    ],
    ids=["lstm-2-bi", "gru-ln-2-bi", "lstm-proj-bi", "lstm-variants", "torch-gru", "rnn-relu"],
)
def test_packed_input_gives_each_sequence_what_it_gives_alone(cls, kwargs, threads, monkeypatch):
    """Rows are quantized and computed one by one, so a sequence's numbers do not depend on the
    batch around it: packed, padded and alone agree exactly, on one thread and on two."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    _, q = _float_and_int8(cls, 6, 10, batch_first=True, **kwargs)
    lengths = [7, 4, 1]
    x = torch.randn(3, 7, 6)
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    out, _ = q(packed)
    out, _ = pad_packed_sequence(out, batch_first=True)
    for b, n in enumerate(lengths):
        alone, _ = q(x[b : b + 1, :n])
        assert torch.equal(out[b, :n], alone[0])


@pytest.mark.parametrize("cls", [rnnkit.LSTM, rnnkit.GRU])
def test_threads_taking_units_give_what_threads_taking_rows_give(cls, monkeypatch):
    """int8 threads take rows of a batch unless told to take units (loop.c's q8_rows_pay);
    either way every row gets the same numbers, to the bit, packed and reversed included."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    _, q = _float_and_int8(cls, 6, 40, num_layers=2, bidirectional=True)
    x = torch.randn(9, 5, 6)
    packed = pack_padded_sequence(x, [9, 7, 7, 3, 1], enforce_sorted=False)
    rows = [q(x), q(packed)]
    original = native_loop.forward
    monkeypatch.setattr(native_loop, "forward", lambda *a, **k: original(*a, **k, split="units"))
    units = [q(x), q(packed)]
    for (out_r, h_r), (out_u, h_u) in zip(rows, units, strict=True):
        out_r = out_r.data if isinstance(out_r, PackedSequence) else out_r
        out_u = out_u.data if isinstance(out_u, PackedSequence) else out_u
        assert torch.equal(out_r, out_u)
        for a, b in zip(h_r if isinstance(h_r, tuple) else (h_r,),
                        h_u if isinstance(h_u, tuple) else (h_u,), strict=True):  # fmt: skip
            assert torch.equal(a, b)


def test_stacked_bidirectional_layer_is_its_layers_run_in_turn():
    _, q = _float_and_int8(rnnkit.LSTM, 5, 8, num_layers=2, bidirectional=True)
    x = torch.randn(6, 2, 5)
    out, (h_n, c_n) = q(x)
    ws = q._weights()
    zeros = torch.zeros(2, 8)
    rows = x.reshape(12, 5)
    bs = (2,) * 6
    for layer in range(2):
        outs = [int8.run_layer("LSTM", d == 1, bs, rows, zeros, zeros, *ws[2 * layer + d])
                for d in range(2)]  # fmt: skip
        rows = torch.cat([o for o, _, _ in outs], 1)
        for d in range(2):
            assert torch.equal(h_n[2 * layer + d], outs[d][1])
            assert torch.equal(c_n[2 * layer + d], outs[d][2])
    assert torch.equal(out, rows.view(6, 2, 16))


@pytest.mark.parametrize("cls", [rnnkit.LSTMCell, rnnkit.GRUCell, rnnkit.RNNCell, nn.LSTMCell])
def test_a_quantized_cell_is_one_step_of_its_quantized_layer(cls):
    torch.manual_seed(2)
    cell = cls(7, 9)
    q = quantize(cell)
    x = torch.randn(3, 7)
    mode = {rnnkit.LSTMCell: "LSTM", nn.LSTMCell: "LSTM", rnnkit.GRUCell: "GRU"}.get(
        cls, "RNN_TANH"
    )
    h0 = torch.randn(3, 9)
    c0 = torch.randn(3, 9)
    weights = (q._matrix("weight_ih", q._gates), q._matrix("weight_hh", q._gates), q.bias_ih,
               q.bias_hh, None)  # fmt: skip
    _, h, c = int8.run_layer(mode, False, (3,), x, h0, c0 if mode == "LSTM" else None, *weights)
    got = q(x, (h0, c0)) if mode == "LSTM" else q(x, h0)
    if mode == "LSTM":
        assert torch.equal(got[0], h) and torch.equal(got[1], c)
    else:
        assert torch.equal(got, h)
    # Unbatched input and no state, as torch.nn's cells take them.
    one = q(x[0])
    assert (one[0] if mode == "LSTM" else one).shape == (9,)


def test_quantized_cell_with_layer_norm_and_forget_bias_runs_its_variants():
    torch.manual_seed(3)
    cell = rnnkit.LSTMCell(6, 8, layer_norm=True, forget_bias=1.0)
    q = quantize(cell)
    x = torch.randn(4, 6)
    h, _ = q(x)
    h_float, _ = cell(x)
    assert (h - h_float).abs().max() < 0.05  # the layer norm amplifies the rounding
    assert q.ln_c_weight.dtype == torch.float32


def test_quantize_converts_every_recurrent_module_and_leaves_the_rest():
    model = nn.Sequential(
        nn.Linear(4, 4), rnnkit.LSTM(4, 6), nn.GRU(6, 6), nn.ModuleList([rnnkit.GRUCell(3, 5)])
    )
    q = quantize(model)
    assert isinstance(q[0], nn.Linear) and q[0].weight.dtype == torch.float32
    assert isinstance(q[1], QuantizedLSTM) and isinstance(q[2], QuantizedGRU)
    assert type(q[3][0]).__name__ == "QuantizedGRUCell"
    assert isinstance(model[1], rnnkit.LSTM), "the original model is left as it was"
    assert quantize(model, inplace=True) is model and isinstance(model[1], QuantizedLSTM)
    assert isinstance(quantize(rnnkit.LSTMCell(3, 4)), QuantizedLSTMCell)


@pytest.mark.parametrize("make", [lambda: rnnkit.LSTM(6, 8), lambda: rnnkit.GRUCell(6, 8)],
                         ids=["layer", "cell"])
def test_a_model_quantized_under_inference_mode_runs_and_sees_changes_in_place(make):
    # Its buffers are inference tensors, which keep no version counter for the packed caches.
    torch.manual_seed(5)
    model = make()
    x = torch.randn(4, 6)
    expected = quantize(model)(x)[0]
    with torch.inference_mode():
        q = quantize(model)
        assert torch.equal(q(x)[0], expected)
    assert torch.equal(q(x)[0], expected)
    with torch.inference_mode():
        (q.weight_ih_l0 if hasattr(q, "weight_ih_l0") else q.weight_ih).zero_()
        changed = q(x)[0]
    assert not torch.equal(changed, expected), "a change in place must reach the kernels"


def test_a_quantized_model_saves_and_loads_with_safetensors_and_pickle(tmp_path):
    torch.manual_seed(4)
    model = nn.Sequential(rnnkit.LSTM(5, 12, num_layers=2, layer_norm=True), nn.GRU(12, 7))
    q = quantize(model)

    def run(m):
        out, _ = m[0](x)
        return m[1](out)[0]

    x = torch.randn(9, 2, 5)
    expected = run(q)
    state = q.state_dict()
    assert state["0.weight_hh_l1"].dtype == torch.int8
    assert state["0.weight_hh_l1_scale"].dtype == torch.float32
    save_file(state, str(tmp_path / "q.safetensors"))
    fresh = quantize(nn.Sequential(rnnkit.LSTM(5, 12, num_layers=2, layer_norm=True),
                                   nn.GRU(12, 7)))  # fmt: skip
    fresh.load_state_dict(load_file(str(tmp_path / "q.safetensors")))
    assert torch.equal(run(fresh), expected)
    buffer = io.BytesIO()
    torch.save(q, buffer)
    buffer.seek(0)
    assert torch.equal(run(torch.load(buffer, weights_only=False)), expected)
    # The matrices take a quarter of their float32 bytes (plus a float32 scale per row).
    matrices = [k for k in state if k.split(".")[-1].startswith("weight_") and
                not k.endswith("_scale")]  # fmt: skip
    assert {state[k].dtype for k in matrices} == {torch.int8}
    float_bytes = sum(model.state_dict()[k].numel() * 4 for k in matrices)
    assert sum(state[k].numel() for k in matrices) * 4 == float_bytes


def test_quantized_layers_refuse_bad_input_in_the_users_terms():
    _, q = _float_and_int8(rnnkit.LSTM, 4, 6)
    with pytest.raises(rnnkit.RNNInputError, match="4"):
        q(torch.randn(3, 2, 5))
    with pytest.raises(rnnkit.RNNInputError, match="float"):
        q(torch.randn(3, 2, 4, dtype=torch.float64))
    with pytest.raises(rnnkit.RNNInputError, match="at least one step"):
        q(torch.randn(0, 2, 4))
    out, (h, c) = q(torch.randn(3, 0, 4))  # no sequences: empty results, as torch.nn gives
    assert out.shape == (3, 0, 6) and h.shape == c.shape == (1, 0, 6)
    bf16 = quantize(rnnkit.LSTM(4, 6)).to(torch.bfloat16)
    with pytest.raises((RuntimeError, rnnkit.RNNInputError), match="float32"):
        bf16(torch.randn(3, 2, 4, dtype=torch.bfloat16))


def test_quantize_refuses_what_it_cannot_quantize():
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        quantize("model")
    layer = rnnkit.GRU(3, 4)
    with torch.no_grad():
        layer.weight_hh_l0[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight_hh_l0 holds NaN"):
        quantize(nn.Sequential(layer))
    for cell, name in [(rnnkit.LSTMCell(0, 4), "input_size"), (nn.GRUCell(3, 0), "hidden_size")]:
        with pytest.raises(ValueError, match=f"need {name} of at least 1; .*Cell.{name} is 0"):
            quantize(cell)
    meta = nn.Sequential(nn.LSTM(3, 4, device="meta"))
    with pytest.raises(RuntimeError, match="move the model to the CPU"):
        quantize(meta)


def test_a_state_dict_with_minus_128_is_refused_when_packed():
    _, q = _float_and_int8(rnnkit.GRU, 3, 4)
    state = q.state_dict()
    state["weight_hh_l0"][0, 0] = -128
    q.load_state_dict(state)
    with pytest.raises(ValueError, match="-128"):
        q(torch.randn(2, 1, 3))


def test_the_repr_names_int8():
    _, q = _float_and_int8(rnnkit.GRU, 3, 4, bidirectional=True)
    assert repr(q) == "QuantizedGRU(3, 4, bidirectional=True, dtype=int8)"
    assert int8.kernel() in int8.KERNELS.values()


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("config", ["lstm", "gru", "lstm-zoneout", "rnn-relu", "lstm-nobias"])
def test_one_sequence_split_over_threads_gives_the_numbers_of_one_thread(
    build, config, reverse, threads
):
    """With one sequence the threads split the units, each computing its units' input side
    itself (blocks of 16 units: H=37 leaves a thread a part block, or nothing): the same numbers
    as one thread, and as the input side computed first by int8.linear (a layer norm's path)."""
    mode, opts = CONFIGS[config]
    I, H, T = 9, 37, 11
    weights = _layer_weights(mode, I, H, 0, opts.get("bias", True), seed=7)
    x, h0 = torch.randn(T, I), torch.randn(1, H)
    c0 = torch.randn(1, H) if mode == "LSTM" else None
    variants = StepVariants(None, None, opts["zoneout"]) if "zoneout" in opts else None
    split = int8.run_layer(mode, reverse, (1,) * T, x, h0, c0, *weights, variants,
                           threads=threads)  # fmt: skip
    alone = int8.run_layer(mode, reverse, (1,) * T, x, h0, c0, *weights, variants, threads=1)
    for a, b in zip(split, alone, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    w_ih, w_hh, b_ih, b_hh = weights[:4]
    bias = None if b_ih is None else (b_ih if mode == "GRU" else b_ih + b_hh)
    G = int8.linear(x, w_ih, bias, threads=1)
    v = native_loop.NativeVariants.of(mode, variants, T)
    first = native_loop.forward(
        mode, reverse, (1,) * T, G, h0, c0, w_hh.q, b_hh if mode == "GRU" else None, False,
        variants=v, threads=threads, int8=native_loop.CInt8(w_hh.c(), native_loop.CInt8Matrix()),
    )  # fmt: skip
    assert torch.equal(first.out, split[0])
