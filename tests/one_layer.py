"""One layer and direction under each engine, for the engines' parity tests: random tensors and
variants as the layers make them, and a run that returns the outputs and every gradient.

The engines: ``reference`` (the spec: the reference engine's step under ``scan``), ``native``
(the C time loop, ``native.op.run_layer``) and ``twins`` (the triton engine's per-step loop on
the torch-op twins of its kernels, ``triton.run_layer(..., module=twins)``, which runs on the
CPU).
"""

import dataclasses
import hashlib
from collections import OrderedDict

import torch
from helpers import assert_results_agree, projection_loss
from torch import Tensor

from rnnkit.engines import reference
from rnnkit.engines import triton as triton_engine
from rnnkit.engines.native import op
from rnnkit.engines.spec import StepVariants
from rnnkit.engines.triton import twins
from rnnkit.scan import scan

GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}
MODES = ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"]
VARIANT_MODES = ["LSTM", "GRU"]
VARIANTS = [
    "layer-norm",
    "recurrent-dropout",
    "zoneout",
    "zoneout-eval",
    "layer-norm+recurrent-dropout",
    "layer-norm+recurrent-dropout+zoneout",
]
# The layer's tensors in run_layer's order.
TENSORS = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


def make_layer(mode, I, H, B, N, dtype, bias=True, seed=0, P=0) -> dict[str, Tensor | None]:
    """x (N, I) and the states and weights of one layer, uniform in (-1, 1) with the weights
    scaled as torch.nn initialises them; P: LSTM's projection size."""
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


def make_variants(mode, variant, B, H, dtype, seed=0, N=None, R=None) -> StepVariants:
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


def _reference(mode, reverse, batch_sizes, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, v):
    step = reference.cell_step(mode, (w_ih, w_hh, b_ih, b_hh, w_hr), v)
    carry = (h0, c0) if mode == "LSTM" else (h0,)
    masks = () if v is None else (v.zoneout_h_mask, v.zoneout_c_mask)
    masks = tuple(m for m in masks if m is not None)
    out, last = scan(step, (x, *masks) if masks else x, carry, reverse, batch_sizes)
    return (out, *last)


def _twins(*args):
    return triton_engine.run_layer(*args, module=twins)


ENGINES = {"reference": _reference, "native": op.run_layer, "twins": _twins}


def run(
    engine: str,
    mode: str,
    reverse: bool,
    batch_sizes,
    layer: dict,
    v: StepVariants | None = None,
    dtype: torch.dtype | None = None,
    **opts,
) -> tuple[list[Tensor], list[Tensor]]:
    """Outputs ``(out, h_n[, c_n])`` of one layer on ``engine``, and the gradients of a fixed
    random projection of them with respect to every tensor of ``layer`` and every layer-norm
    gain and bias, all in ``dtype`` (the layer's by default; other dtypes are cast from it, so
    that a float64 run computes on the float32 run's very numbers)."""
    dtype = dtype or layer["x"].dtype
    t = {
        k: None if layer.get(k) is None else layer[k].detach().to(dtype).requires_grad_()
        for k in TENSORS
    }
    ln = ()
    if v is not None:
        v = v.to(dtype)
        ln = tuple(p.detach().requires_grad_() for p in v.layer_norm or ())
        v = dataclasses.replace(v, layer_norm=ln or None)
    outs = ENGINES[engine](mode, reverse, tuple(batch_sizes), *t.values(), v, **opts)
    outs = [o for o in outs if o is not None]
    leaves = [x for x in (*t.values(), *ln) if x is not None]
    grads = torch.autograd.grad(projection_loss(outs), leaves)
    return [o.detach() for o in outs], list(grads)


# The reference's results by their inputs: the parity tests run each case on two builds of the
# native loop, and the reference (a Python loop over steps, the slow part) need not run twice.
_REFERENCE_RESULTS: OrderedDict[tuple, tuple[list[Tensor], list[Tensor]]] = OrderedDict()


def _digest(*tensors: Tensor | None) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(b"-" if t is None else t.detach().contiguous().numpy().tobytes())
        h.update(b"|" if t is None else f"{t.dtype}{tuple(t.shape)}".encode())
    return h.hexdigest()


def run_reference(mode, reverse, batch_sizes, layer, v=None, dtype=None):
    """:func:`run` on the reference engine, remembered for the last few hundred inputs."""
    dtype = dtype or layer["x"].dtype
    variant_tensors = () if v is None else (
        *(v.layer_norm or ()), v.recurrent_mask, v.zoneout_h_mask, v.zoneout_c_mask
    )  # fmt: skip
    key = (mode, reverse, tuple(batch_sizes), dtype, None if v is None else v.zoneout_p,
           v is None, _digest(*(layer.get(k) for k in TENSORS), *variant_tensors))  # fmt: skip
    if key not in _REFERENCE_RESULTS:
        _REFERENCE_RESULTS[key] = run("reference", mode, reverse, batch_sizes, layer, v, dtype)
        while len(_REFERENCE_RESULTS) > 400:
            _REFERENCE_RESULTS.popitem(last=False)
    outs, grads = _REFERENCE_RESULTS[key]
    return list(outs), list(grads)


def assert_matches_reference(engine, mode, reverse, batch_sizes, layer, v=None, **opts) -> None:
    """``engine``'s outputs and gradients equal the reference's: to 1e-10 in float64, within
    the float32 bound of ``helpers`` (the reference in float32 as the base) in float32."""
    assert_results_agree(
        lambda d: run(engine, mode, reverse, batch_sizes, layer, v, d, **opts),
        lambda d: run_reference(mode, reverse, batch_sizes, layer, v, d),
        layer["x"].dtype,
    )
