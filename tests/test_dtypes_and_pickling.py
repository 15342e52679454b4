"""bfloat16 on the native engine (stored in bfloat16, computed in float32), the auto rule's dtype
guard, and whole-model pickling under ``torch.load(weights_only=True)``.

bfloat16 bounds come from the arithmetic: the reference is float64 on the same bfloat16-rounded
inputs and weights, so what remains is the float32 arithmetic (about 1e-7 relative, negligible)
and one rounding of each result to bfloat16, at most half an ulp, 2^-9 of its magnitude.
Norm-wise that is at most 2^-9 of the reference's norm; the tests allow 2^-8.
"""

import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import rnnkit
from rnnkit import engines
from rnnkit.engines import native
from rnnkit.engines.native import loop as native_loop
from rnnkit.engines.spec import LayerSpec

BF16_BOUND = 2.0**-8
LAYERS = {"LSTM": rnnkit.LSTM, "GRU": rnnkit.GRU, "RNN": rnnkit.RNN}
VARIANTS = {
    "plain": {},
    "layer-norm+zoneout": dict(layer_norm=True, zoneout=0.25),
    "projection": dict(proj_size=5),
}

needs_native = pytest.mark.skipif(
    not native_loop.available(), reason="the native loop could not be built"
)


def _cases():
    for mode in LAYERS:
        for name, options in VARIANTS.items():
            if (mode != "LSTM" and name == "projection") or (mode == "RNN" and name != "plain"):
                continue
            yield pytest.param(mode, options, id=f"{mode}-{name}")


def _norm_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def _run(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Output, final states and the gradients of the input and every parameter, for a loss
    linear in the outputs (fixed cotangents: both runs backpropagate the same numbers)."""
    out, state = layer(x)
    states = state if isinstance(state, tuple) else (state,)
    generator = torch.Generator().manual_seed(1)
    loss = sum(
        (t.double() * torch.randn(t.shape, generator=generator, dtype=torch.float64)).sum()
        for t in (out, *states)
    )
    params = list(layer.parameters())
    grads = torch.autograd.grad(loss, [x, *params])
    return (out, *states, *grads)


@needs_native
@pytest.mark.parametrize("arch", ["native", "baseline"])
@pytest.mark.parametrize("mode, options", list(_cases()))
def test_bfloat16_layer_on_native_engine_matches_float64_within_one_rounding(mode, options, arch):
    if arch == "baseline" and not _baseline_builds():
        pytest.skip("the baseline x86-64 build needs an x86-64 machine and compiler")
    torch.manual_seed(0)
    layer = LAYERS[mode](7, 12, num_layers=2, bidirectional=True, backend="native", **options)
    layer = layer.bfloat16().eval()
    x = torch.randn(9, 3, 7).bfloat16().requires_grad_()
    reference = LAYERS[mode](7, 12, num_layers=2, bidirectional=True, backend="reference",
                             **options).double().eval()  # fmt: skip
    reference.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    x64 = x.detach().double().requires_grad_()
    with native_loop.use_arch(arch):
        got = _run(layer, x)
    want = _run(reference, x64)
    assert got[0].dtype == torch.bfloat16 and got[-1].dtype == torch.bfloat16
    for g, w in zip(got, want, strict=True):
        assert _norm_error(g, w) <= BF16_BOUND


def _baseline_builds() -> bool:
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        return False
    with native_loop.use_arch("baseline"):
        return native_loop.available()


@needs_native
def test_autocast_bfloat16_training_runs_native_and_matches_float64():
    torch.manual_seed(0)
    layer = rnnkit.LSTM(6, 10, batch_first=True)
    x = torch.randn(4, 8, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chosen = engines.plan("LSTM", "auto", layer._spec(), x.device, x.dtype, batch=4,
                              needs_grad=True)  # fmt: skip
        out, (_h, _c) = layer(x)
    assert chosen.engine is native, chosen.why
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.weight_hh_l0.grad.dtype == torch.float32
    # The reference: float64 on the weights autocast rounded to bfloat16.
    ref = rnnkit.LSTM(6, 10, batch_first=True, backend="reference").double()
    ref.load_state_dict({k: v.bfloat16().double() for k, v in layer.state_dict().items()})
    want_out, _ = ref(x.bfloat16().double())
    want_out.sum().backward()
    assert _norm_error(out, want_out) <= BF16_BOUND
    # The gradient reaches the float32 weight through autocast's cast: rounded once.
    grad, want = layer.weight_hh_l0.grad, ref.weight_hh_l0.grad
    assert _norm_error(grad, want) <= BF16_BOUND


@pytest.mark.parametrize("backend", ["auto", "native", "fused", "reference"])
@pytest.mark.parametrize(
    "cls, kwargs",
    [
        (nn.RNN, {}),
        (nn.LSTM, {}),
        (nn.LSTM, {"proj_size": 3}),
        (nn.GRU, {}),
        (nn.GRU, {"num_layers": 2, "bidirectional": True}),
    ],
    ids=["rnn", "lstm", "lstm-proj", "gru", "gru-2-bi"],
)
def test_cpu_autocast_returns_the_dtypes_torch_nn_returns(backend, cls, kwargs):
    """Under CPU autocast torch.nn's kernels return the autocast dtype, except where the new
    state reads the old one (GRU; a projected LSTM's cell): there the wider of the two, so a
    GRU from a float32 state returns float32. rnnkit returns the same dtypes on every engine,
    for no state, a float32 one and a bfloat16 one."""
    torch.manual_seed(0)
    ref = cls(5, 6, **kwargs)
    ours = getattr(rnnkit, cls.__name__)(5, 6, backend=backend, **kwargs)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 5)
    layers = ref.num_layers * (2 if ref.bidirectional else 1)
    h = torch.zeros(layers, 3, ref.proj_size or 6)
    c = torch.zeros(layers, 3, 6)
    for state in (None, torch.float32, torch.bfloat16):
        hx = None if state is None else h.to(state)
        if hx is not None and cls is nn.LSTM:
            hx = (hx, c.to(state))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            try:
                want = ref(x, hx)
            except RuntimeError:  # oneDNN's LSTM refuses bfloat16 on some CPUs (AVX2 AMD)
                continue
            got = ours(x, hx)
        flat = [want[0], *(want[1] if isinstance(want[1], tuple) else (want[1],))]
        ours_flat = [got[0], *(got[1] if isinstance(got[1], tuple) else (got[1],))]
        assert [t.dtype for t in ours_flat] == [t.dtype for t in flat], state


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
@pytest.mark.parametrize("needs_grad", [False, True], ids=["inference", "training"])
def test_auto_sends_low_precision_to_torch_kernels_only_where_the_cpu_runs_them(
    mode, dtype, needs_grad, monkeypatch
):
    spec = LayerSpec(mode, 8, 8, 1, 1, True, 0.0, 0)
    cpu = torch.device("cpu")
    for runs in (False, True):
        monkeypatch.setattr(engines, "_torch_cpu_runs_bfloat16", lambda runs=runs: runs)
        for batch in (1, 16, 64):
            chosen = engines.plan("x", "auto", spec, cpu, dtype, batch=batch,
                                  needs_grad=needs_grad)  # fmt: skip
            # torch's bfloat16 LSTM where this CPU runs it, by float64's rule; else native.
            torch_rule = (not needs_grad or batch > engines.LSTM_NATIVE_MAX_BATCH) and runs
            on_torch = mode == "LSTM" and dtype == torch.bfloat16 and torch_rule
            want = engines.torch_native if on_torch else native
            assert chosen.engine is want, (runs, batch, chosen.why)


def test_torch_cpu_runs_bfloat16_only_with_bfloat16_dot_products(monkeypatch):
    from rnnkit.engines.native import build

    for flags, want in [({"avx2", "fma"}, False), ({"avx512f", "avx512bw"}, False),
                        ({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True)]:  # fmt: skip
        monkeypatch.setattr(build, "cpu_flags", lambda flags=flags: flags)
        engines._torch_cpu_runs_bfloat16.cache_clear()
        assert engines._torch_cpu_runs_bfloat16() is (want and torch.backends.mkldnn.is_available())
    engines._torch_cpu_runs_bfloat16.cache_clear()


def test_plan_names_its_rule():
    spec = LayerSpec("LSTM", 8, 8, 1, 1, True, 0.0, 0)
    cpu = torch.device("cpu")
    engine, why = engines.plan("x", "fused", spec, cpu, torch.float32, batch=2)
    if native_loop.available():
        assert engine is native and why == "backend='fused' on cpu"
    else:
        assert engine is engines.reference and "could not be built" in why
    with pytest.raises(ValueError, match="backend='native' cannot run: the native engine runs "
                       "on the CPU; got a meta tensor"):  # fmt: skip
        engines.plan("x", "native", spec, torch.device("meta"), torch.float32, batch=2)


def test_native_loop_unavailable_falls_back_to_reference_with_the_reason(monkeypatch):
    monkeypatch.setenv("RNNKIT_NO_NATIVE", "1")
    spec = LayerSpec("GRU", 8, 8, 1, 1, True, 0.0, 0)
    engine, why = engines.plan("x", "auto", spec, torch.device("cpu"), torch.float32, batch=2)
    assert engine is engines.reference
    assert "RNNKIT_NO_NATIVE=1" in why
    with pytest.raises(ValueError, match="backend='native' cannot run"):
        engines.plan("x", "native", spec, torch.device("cpu"), torch.float32, batch=2)
    torch.manual_seed(0)
    layer = rnnkit.GRU(3, 4)
    x = torch.randn(5, 2, 3)
    out = layer(x)[0]
    layer.backend = "reference"
    torch.testing.assert_close(out, layer(x)[0], atol=0, rtol=0)


class _Model(nn.Module):
    def __init__(self, layer: nn.Module, width: int) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer(x)
        y = y[0] if isinstance(y, tuple) else y
        return self.head(y)


PICKLED = {
    "LSTM": lambda: rnnkit.LSTM(4, 6, num_layers=2),
    "LSTM-variants": lambda: rnnkit.LSTM(4, 6, layer_norm=True, zoneout=0.1,
                                         recurrent_dropout=0.2, forget_bias=1.0),
    "LSTM-projection": lambda: rnnkit.LSTM(4, 6, proj_size=3, bidirectional=True),
    "GRU": lambda: rnnkit.GRU(4, 6, backend="reference"),
    "GRU-variants": lambda: rnnkit.GRU(4, 6, layer_norm=True, weight_drop=0.1, learn_init=True),
    "RNN": lambda: rnnkit.RNN(4, 6, nonlinearity="relu"),
    "LSTMCell": lambda: rnnkit.LSTMCell(4, 6),
    "LSTMCell-layer-norm": lambda: rnnkit.LSTMCell(4, 6, layer_norm=True),
    "GRUCell": lambda: rnnkit.GRUCell(4, 6, layer_norm=True),
    "RNNCell": lambda: rnnkit.RNNCell(4, 6),
}


@pytest.mark.parametrize("name", list(PICKLED))
def test_whole_model_loads_with_only_the_public_classes_in_safe_globals(name):
    torch.manual_seed(0)
    layer = PICKLED[name]()
    # Every case's output is 6 wide (the projection: 3 per direction, both directions).
    model = _Model(layer, 6).eval()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals([_Model, type(layer), nn.Linear]):
        loaded = torch.load(buffer, weights_only=True)
    assert type(loaded.layer) is type(layer)
    assert loaded.layer.extra_repr() == layer.extra_repr()
    x = torch.randn(5, 3, 4) if "Cell" not in name else torch.randn(3, 4)
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


DATA = Path(rnnkit.__file__).parent / "data"
TASKS = {
    # The digits task's default LSTM, on the baseline x86-64 build (AVX2, the AMD users' path).
    "digits-baseline": (["digits", "--hidden-size", "32"], {"RNNKIT_NATIVE_ARCH": "baseline"}),
    # The tagger's spelling encoder and packed bidirectional LSTM, on the bundled sample.
    "tagger": (
        ["tagger", *(f"--{part}={DATA / f'pos-sample-{part}.conllu'}"
                     for part in ("train", "dev", "test"))],
        {},
    ),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_cli_trains_every_default_path_in_bfloat16(task, tmp_path):
    args, env = TASKS[task]
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "rnnkit", "train", *args, "--precision", "bf16", "--epochs", "1",
         "--threads", "1", "--quiet", "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((out / "config.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert config["options"]["precision"] == "bf16"
    assert 0 <= summary["test_accuracy"] <= 1


def test_fused_on_cuda_without_triton_warns_once_and_runs_reference(monkeypatch):
    from rnnkit.engines import triton as triton_engine

    reason = "Triton is not installed (pip install triton)"
    monkeypatch.setattr(triton_engine, "unavailable_reason", lambda device, dtype: reason)
    monkeypatch.setattr(engines, "_WARNED", set())
    spec = LayerSpec("LSTM", 8, 8, 1, 1, True, 0.0, 0)
    cuda = torch.device("cuda")
    with pytest.warns(UserWarning, match="the triton engine cannot run .*Triton is not installed"):
        first = engines.plan("x", "fused", spec, cuda, torch.float32, batch=2, per_step=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = engines.plan("x", "auto", spec, cuda, torch.float32, batch=2, per_step=True)
    assert first.engine is second.engine is engines.reference
    assert reason in first.why
    with pytest.raises(ValueError, match="backend='triton' cannot run: Triton is not installed"):
        engines.plan("x", "triton", spec, cuda, torch.float32, batch=2)


@needs_native
def test_compile_fullgraph_of_a_bfloat16_lstm_equals_eager():
    torch.manual_seed(0)
    # Named: in eager mode auto may pick oneDNN's bfloat16 kernel on this CPU, compile the native
    # operator, which round differently.
    layer = rnnkit.LSTM(4, 8, batch_first=True, backend="native").bfloat16()
    x = torch.randn(16, 5, 4).bfloat16()
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x)[0], layer(x)[0], atol=0, rtol=0)
