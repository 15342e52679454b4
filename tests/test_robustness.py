"""What a hostile user found on the layers (issue 8), each case against torch.nn on every engine:
hand-made PackedSequences, NaN and inf, non-contiguous states, empty batches, constructor types,
double backward and batched gradients, and the native engine's fallback where its C loop cannot
be built (the loop's own guards are tests/test_native_loop.py's)."""

import re
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import MODES, OURS, TORCH
from torch import nn
from torch.autograd import gradgradcheck
from torch.nn.utils.rnn import PackedSequence

import rnnkit

ENGINES = ["reference", "fused", "torch", "triton", "auto"]
F64 = torch.float64


def twins(mode: str, backend: str, dtype=F64, **kwargs):
    cls, extra = MODES[mode]
    ref = TORCH[cls](**extra, **kwargs, dtype=dtype)
    ours = OURS[cls](**extra, **kwargs, dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def flat(result) -> list[torch.Tensor]:
    if isinstance(result, PackedSequence):
        return [result.data]
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for part in result for t in flat(part)]


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize(
    "build, data_rows, sizes, message",
    [
        (rnnkit.RNN, 5, [3, 3, 3], "batch_sizes sum to 9 steps but its data has 5 rows"),
        (rnnkit.LSTM, 4, [3, 1000], "batch_sizes must not increase over time"),
        (rnnkit.GRU, 6, [1, 2, 3], "batch_sizes must not increase over time"),
        (rnnkit.GRU, 2, [3, -1], "batch_sizes must be positive"),
        (rnnkit.RNN, 0, [], "batch_sizes is empty"),
    ],
    ids=["sum", "huge", "increasing", "negative", "empty"],
)
def test_hand_made_packed_batch_sizes_are_refused(build, data_rows, sizes, message, backend):
    layer = build(3, 4, backend=backend)
    bad = PackedSequence(torch.randn(data_rows, 3), torch.tensor(sizes, dtype=torch.int64))
    with pytest.raises(rnnkit.RNNInputError, match=message):
        layer(bad)


@pytest.mark.parametrize(
    "sizes, message",
    [
        (torch.tensor([2.0, 1.0]), "1-D int64 tensor on the CPU"),
        (torch.tensor([[2, 1]]), "1-D int64 tensor on the CPU"),
        ([2, 1], "batch_sizes must be a Tensor"),
    ],
    ids=["float", "2d", "list"],
)
def test_batch_sizes_of_the_wrong_kind_are_refused(sizes, message):
    # PackedSequence is a tuple: anything can be put in it without its constructor's checks.
    packed = tuple.__new__(PackedSequence, (torch.randn(3, 3), sizes, None, None))
    with pytest.raises(rnnkit.RNNInputError, match=message):
        rnnkit.GRU(3, 4)(packed)


def test_packed_permutations_are_checked():
    data, sizes = torch.randn(3, 3), torch.tensor([2, 1])
    for bad in (torch.tensor([0, 5]), torch.tensor([0, 0]), torch.tensor([1, 0, 2])):
        # The message shows the values, the wrong part where shape and dtype are right.
        shown = r"must be a permutation of 0\.\.1.*" + re.escape(f"values {bad.tolist()}")
        with pytest.raises(rnnkit.RNNInputError, match=shown):
            rnnkit.LSTM(3, 4)(PackedSequence(data, sizes, bad, torch.tensor([1, 0])))


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("mode", list(MODES))
def test_nan_and_inf_propagate_as_in_torch(mode, backend):
    ref, ours = twins(mode, backend, input_size=3, hidden_size=4)
    x = torch.randn(5, 3, 3, dtype=F64)
    x[1, 0, 0], x[2, 1, 2], x[0, 2, 1] = float("nan"), float("inf"), float("-inf")
    h0 = torch.randn(1, 3, 4, dtype=F64)
    h0[0, 2, 3] = float("nan")
    hx = (h0, torch.randn(1, 3, 4, dtype=F64)) if mode == "lstm" else h0
    for a, b in zip(flat(ours(x, hx)), flat(ref(x, hx)), strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        assert torch.equal(a.isinf(), b.isinf())
        torch.testing.assert_close(a, b, equal_nan=True)


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("mode", ["lstm", "gru", "rnn_tanh"])
def test_non_contiguous_states_and_input_are_accepted(mode, backend):
    ref, ours = twins(mode, backend, input_size=3, hidden_size=4, num_layers=2)
    x = torch.randn(3, 5, 3, dtype=F64).transpose(0, 1)  # (T, B, I) seen through a transpose
    h0 = torch.randn(3, 4, 2, dtype=F64).permute(2, 0, 1)  # (L, B, H), not contiguous
    c0 = torch.randn(2, 4, 3, dtype=F64).transpose(1, 2)
    hx = (h0, c0) if mode == "lstm" else h0
    assert not h0.is_contiguous()
    for a, b in zip(flat(ours(x, hx)), flat(ref(x, hx)), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("mode", list(MODES))
def test_empty_batch_behaves_as_torch(mode, backend):
    ref, ours = twins(mode, backend, input_size=3, hidden_size=4, bidirectional=True)
    x = torch.zeros(5, 0, 3, dtype=F64, requires_grad=True)
    out, ref_out = ours(x), ref(x)
    for a, b in zip(flat(out), flat(ref_out), strict=True):
        assert a.shape == b.shape
    flat(out)[0].sum().backward()
    assert x.grad.shape == (5, 0, 3)
    assert torch.equal(ours.weight_hh_l0.grad, torch.zeros_like(ours.weight_hh_l0))


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_cells_take_empty_batches_and_zero_sizes_like_torch(name):
    for I, H, B in ((3, 4, 0), (3, 0, 2), (0, 4, 2)):
        ours, ref = getattr(rnnkit, name)(I, H), getattr(nn, name)(I, H)
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(B, I)
        for a, b in zip(flat(ours(x)), flat(ref(x)), strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", [rnnkit.RNN, rnnkit.LSTM, rnnkit.GRU])
@pytest.mark.parametrize("arg", ["bias", "batch_first"])
@pytest.mark.parametrize("value", [0, 1, "True", "False", None])
def test_flags_must_be_bool_as_in_torch(cls, arg, value):
    with pytest.raises(TypeError, match=f"{arg} should be of type bool"):
        cls(3, 4, **{arg: value})
    with pytest.raises(TypeError, match=f"{arg} should be of type bool"):
        getattr(nn, cls.__name__)(3, 4, **{arg: value})


@pytest.mark.parametrize("cls", [rnnkit.RNN, rnnkit.GRU])
@pytest.mark.parametrize("proj_size", [0, 2])
def test_proj_size_on_rnn_and_gru_is_a_value_error_as_in_torch(cls, proj_size):
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        cls(3, 4, proj_size=proj_size)
    with pytest.raises(ValueError, match="proj_size argument is only supported for LSTM"):
        getattr(nn, cls.__name__)(3, 4, proj_size=proj_size)


def _gradient_penalty_grads(layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    out = layer(x)[0]
    (g,) = torch.autograd.grad(out.pow(2).sum(), x, create_graph=True)
    return torch.autograd.grad(g.pow(2).sum(), list(layer.parameters()))


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("mode", list(MODES))
def test_double_backward_equals_torch(mode, backend):
    torch.manual_seed(0)
    ref, ours = twins(mode, backend, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=F64, requires_grad=True)
    ours_grads, ref_grads = _gradient_penalty_grads(ours, x), _gradient_penalty_grads(ref, x)
    # Not silently zero (a relu unit may be dead, so the sum over all parameters).
    assert sum(g.abs().sum() for g in ours_grads) > 0
    for a, b in zip(ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs", [{}, {"layer_norm": True}, {"zoneout": 0.3}], ids=str)
@pytest.mark.parametrize("cls", [rnnkit.LSTM, rnnkit.GRU])
def test_fused_gradgradcheck_with_variants(cls, kwargs):
    layer = cls(2, 3, dtype=F64, backend="fused", **kwargs).eval()
    x = torch.randn(3, 2, 2, dtype=F64, requires_grad=True)
    h0 = torch.randn(1, 2, 3, dtype=F64, requires_grad=True)
    hx = (h0, torch.randn(1, 2, 3, dtype=F64)) if cls is rnnkit.LSTM else h0
    assert gradgradcheck(lambda x, h0: layer(x, hx)[0], (x, h0))


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("mode", list(MODES))
def test_batched_jacobians_equal_torch(mode, backend):
    ref, ours = twins(mode, backend, input_size=3, hidden_size=4, bidirectional=True)
    x = torch.randn(3, 2, 3, dtype=F64)
    expected = torch.autograd.functional.jacobian(lambda x: ref(x)[0], x)
    vectorized = torch.autograd.functional.jacobian(lambda x: ours(x)[0], x, vectorize=True)
    jacrev = torch.func.jacrev(lambda x: ours(x)[0])(x)
    torch.testing.assert_close(vectorized, expected)
    torch.testing.assert_close(jacrev, expected)


@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_vmap_over_a_batch_of_sequences_equals_a_loop(backend):
    layer = rnnkit.GRU(3, 4, dtype=F64, backend=backend)
    xs = torch.randn(5, 6, 3, dtype=F64)  # 5 unbatched sequences of 6 steps
    mapped = torch.func.vmap(lambda x: layer(x)[0])(xs)
    torch.testing.assert_close(mapped, torch.stack([layer(x)[0] for x in xs]))


def test_native_loop_build_failure_falls_back_to_the_reference_engine_with_one_warning(tmp_path):
    """A compiler that fails (as a machine without one, or a broken toolchain, would): the
    CPU's fused and auto layers warn once, naming why, and run the reference engine with the
    same numbers; naming the native engine is an error that says why."""
    script = textwrap.dedent(
        """
        import warnings
        import torch, rnnkit
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            a = rnnkit.GRU(3, 4, backend="fused")
            b = rnnkit.GRU(3, 4, backend="reference")
            c = rnnkit.LSTM(3, 4, layer_norm=True)
            b.load_state_dict(a.state_dict())
            x = torch.randn(5, 2, 3)
            for _ in range(3):
                torch.testing.assert_close(a(x)[0], b(x)[0], rtol=0, atol=0)
                c(x)[0].sum().backward()
        mine = [w for w in caught if "native time loop is unavailable" in str(w.message)]
        assert len(mine) == 1, [str(w.message) for w in caught]
        assert "reference engine runs instead" in str(mine[0].message)
        try:
            rnnkit.GRU(3, 4, backend="native")(x)
        except ValueError as e:
            assert "backend='native' cannot run" in str(e), e
        else:
            raise AssertionError("backend='native' ran without its C loop")
        print(mine[0].message)
        """
    )
    env = {"RNNKIT_CACHE": str(tmp_path), "CC": "false", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "false failed" in result.stdout


@pytest.mark.parametrize("build", [rnnkit.LSTM, rnnkit.LSTMCell])
def test_variant_arguments_are_checked(build):
    for bad in (float("nan"), float("inf"), "1.0"):
        with pytest.raises(ValueError, match="forget_bias must be a finite number"):
            build(3, 4, forget_bias=bad)
    with pytest.raises(TypeError, match="layer_norm should be of type bool"):
        build(3, 4, layer_norm=1)
