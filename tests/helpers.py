"""Shared test helpers: build twin torch.nn / rnnkit layers and compare them.

Tolerances. float64 results are compared element-wise to 1e-10 (the engines agree to a few ulps
of float64; 1e-10 leaves room for sums of a few thousand terms and nothing else). A float32
result is never compared with a fixed element-wise tolerance, which holds on the CPU it was set
on and fails on one that sums in another order (issue 16: a gradient 1.8e-4 off where 1e-4 was
allowed, on AVX2 instead of AVX-512). It is held to the accuracy that float32 arithmetic allows
on that input, measured (:func:`assert_float32_as_accurate`):

    ||ours - exact|| <= FACTOR * ||base - exact|| + FLOOR * u * ||exact||    (per tensor)

- ``exact``: the same computation in float64 on the float32 inputs cast up (exactly), so the
  only differences left are float32's rounding on the way;
- ``base``: a trusted float32 implementation of it (torch.nn, or the reference engine) on the
  same float32 inputs: its error is what float32 costs on this input, rounding amplified through
  the recurrence and the layer norms as the problem's conditioning dictates, whatever the CPU;
- ``u = 2**-24``, float32's unit roundoff; norms are Frobenius norms over the whole tensor.

FACTOR = 4: two float32 implementations of the same function differ only in how they round
(the order and grouping of their sums, FMA or not, fused or separate pointwise ops). Rounding
errors of a sum accumulate like a random walk, growing as the square root of the longest chain
of sequential additions (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., 2.8
and 4.2), so a factor of 4 lets rnnkit's longest chain be up to 16 times the base's: a C loop
that sums H=100 products one lane at a time against a BLAS that splits them over 8 or 16 lanes
is within it. A defect (a wrong gate, mask, step or sign) is off by about the values
themselves, 10^4 times more than this bound on the shapes tested.

FLOOR = 8: where the base happens to be exact or nearly so (a tiny tensor, T=1), the bound
still allows the float32 rounding that any implementation pays: the result's own rounding
(u relative) and a few pointwise ops before it (an activation, a product, a sum: u each,
Higham 2.2), 8 u in all; it also covers the float64 run's rounding of the gradients that flow
back into float32 leaves (u relative).
"""

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import rnnkit

TORCH = {"RNN": nn.RNN, "LSTM": nn.LSTM, "GRU": nn.GRU}
OURS = {"RNN": rnnkit.RNN, "LSTM": rnnkit.LSTM, "GRU": rnnkit.GRU}

# mode id -> (class name, extra constructor arguments)
MODES = {
    "rnn_tanh": ("RNN", {}),
    "rnn_relu": ("RNN", {"nonlinearity": "relu"}),
    "lstm": ("LSTM", {}),
    "gru": ("GRU", {}),
}

# float64: element-wise, for results that agree to a few float64 ulps.
F64_TOL = {"atol": 1e-10, "rtol": 1e-10}
# float32: see the module's docstring.
U32 = 2.0**-24
FACTOR = 4.0
FLOOR = 8.0


def twins(kind: str, dtype: torch.dtype = torch.float64, **kwargs) -> tuple[nn.Module, nn.Module]:
    """A torch.nn layer and an rnnkit layer holding the same weights."""
    backend = kwargs.pop("backend", "reference")
    ref = TORCH[kind](**kwargs, dtype=dtype)
    ours = OURS[kind](**kwargs, dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """The element-wise tolerance of float64 results; float32 has none (the docstring)."""
    if dtype != torch.float64:
        raise ValueError(f"float32 results are compared by assert_float32_as_accurate; got {dtype}")
    return F64_TOL


def float32_bound(base: torch.Tensor, exact: torch.Tensor) -> float:
    """The largest ``||ours - exact||`` that the module's rule allows, given the base's result."""
    base_error = (base.double() - exact.double()).norm().item()
    return FACTOR * base_error + FLOOR * U32 * exact.double().norm().item()


def assert_float32_as_accurate(
    ours: Sequence[torch.Tensor],
    base: Sequence[torch.Tensor],
    exact: Sequence[torch.Tensor],
    names: Sequence[str] | None = None,
) -> None:
    """Each float32 tensor of ``ours`` is within the module's bound of its float64 ``exact``
    twin, given ``base``'s (a trusted float32 implementation's) error on the same input."""
    assert len(ours) == len(base) == len(exact), (len(ours), len(base), len(exact))
    names = names or [f"result {i}" for i in range(len(ours))]
    for name, o, b, e in zip(names, ours, base, exact, strict=True):
        assert o.shape == b.shape == e.shape, f"{name}: shapes {o.shape}, {b.shape}, {e.shape}"
        assert torch.equal(o.isnan(), e.isnan()), f"{name}: NaN where float64 has none, or back"
        o, b, e = (t.double().nan_to_num() for t in (o, b, e))
        error, bound = (o - e).norm().item(), float32_bound(b, e)
        assert error <= bound, (
            f"{name}: float32 error {error:.3g} against float64 exceeds {bound:.3g} = "
            f"{FACTOR:g} x the base's {(b - e).norm().item():.3g} + {FLOOR:g} u x "
            f"||exact|| {e.norm().item():.3g}"
        )


def cast(obj: object, dtype: torch.dtype) -> object:
    """``obj`` (a tensor, PackedSequence, tuple or list of them, or None) with every floating
    tensor cast to ``dtype``, differentiably."""
    if isinstance(obj, PackedSequence):
        return obj._replace(data=obj.data.to(dtype))
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(cast(o, dtype) for o in obj)
    return obj


def flat(out: object) -> list[torch.Tensor]:
    """Every tensor in a layer's result, packed data included, in a fixed order."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in flat(item)]


def projection_loss(outs: Sequence[torch.Tensor], seed: int = 1234) -> torch.Tensor:
    """A fixed random projection of ``outs`` to a scalar. The weights are drawn in float32 and
    cast, so that float32 and float64 runs take the very same loss."""
    gen = torch.Generator().manual_seed(seed)
    weights = (torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs)
    return sum((o * w).sum() for o, w in zip(outs, weights, strict=True))


def run_and_grad(
    layer: nn.Module, make_args, leaves: list[torch.Tensor], dtype: torch.dtype | None = None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs of ``layer(*make_args())`` and the gradients of a random projection of them
    with respect to ``leaves`` and every parameter of the layer. With ``dtype``, the arguments
    are cast to it first."""
    args = make_args()
    outs = flat(layer(*(args if dtype is None else cast(args, dtype))))
    wrt = [t for t in leaves if t.requires_grad] + list(layer.parameters())
    grads = torch.autograd.grad(projection_loss(outs), wrt, allow_unused=False)
    return [o.detach() for o in outs], list(grads)


def assert_twins_agree(ref: nn.Module, ours: nn.Module, make_args, leaves, dtype) -> None:
    """``ours`` gives ``ref``'s outputs and gradients: to 1e-10 in float64; in float32 within
    the module's bound, with ``ref`` as the base and a float64 copy of it as the exact run."""
    out_ref, g_ref = run_and_grad(ref, make_args, leaves)
    out_ours, g_ours = run_and_grad(ours, make_args, leaves)
    names = [f"output {i}" for i in range(len(out_ref))]
    names += [f"grad leaf{i}" for i, t in enumerate(leaves) if t.requires_grad]
    names += [f"grad {n}" for n, _ in ref.named_parameters()]
    assert len(out_ref) == len(out_ours) and len(g_ref) == len(g_ours)
    if dtype == torch.float32:
        exact = copy.deepcopy(ref).double()
        out_ex, g_ex = run_and_grad(exact, make_args, leaves, torch.float64)
        assert_float32_as_accurate(out_ours + g_ours, out_ref + g_ref, out_ex + g_ex, names)
        return
    for name, a, b in zip(names, out_ours + g_ours, out_ref + g_ref, strict=True):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, **tolerance(dtype), msg=lambda m, n=name: f"{n}: {m}")


def assert_results_agree(
    run: Callable[[torch.dtype], tuple[list, list]],
    run_base: Callable[[torch.dtype], tuple[list, list]],
    dtype: torch.dtype,
) -> None:
    """``run(dtype)`` and ``run_base(dtype)`` each give ``(outputs, gradients)`` of the same
    computation: in float64 they agree to 1e-10; in float32 ``run``'s are within the module's
    bound, with ``run_base`` as the base and ``run_base(float64)`` as the exact run."""
    ours, base = run(dtype), run_base(dtype)
    ours, base = [*ours[0], *ours[1]], [*base[0], *base[1]]
    assert len(ours) == len(base)
    if dtype == torch.float32:
        exact = run_base(torch.float64)
        assert_float32_as_accurate(ours, base, [*exact[0], *exact[1]])
        return
    for i, (a, b) in enumerate(zip(ours, base, strict=True)):
        assert b is not None and a.shape == b.shape, i
        torch.testing.assert_close(a, b, **tolerance(dtype), msg=lambda m, i=i: f"result {i}: {m}")


def packed_input(x: torch.Tensor, lengths: list[int], enforce_sorted: bool) -> PackedSequence:
    """``x`` is (T, B, I) padded."""
    return pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
