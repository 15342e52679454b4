"""Deployment as on torch.nn: ONNX export (both exporters, checked with onnxruntime),
torch.jit.trace and script, torch.export, the converters and dynamic quantisation."""

import io
import logging
import warnings

import pytest
import torch
from helpers import MODES, flat
from torch import nn

import rnnkit

BACKENDS = ["auto", "fused", "reference", "torch"]
EXPORTERS = ["torchscript", "dynamo"]
# The ONNX operator each mode becomes.
ONNX_OP = {"rnn_tanh": "RNN", "rnn_relu": "RNN", "lstm": "LSTM", "gru": "GRU"}

I, H, B, T = 4, 6, 3, 5


@pytest.fixture(autouse=True)
def quiet_exporters():
    # The dynamo exporter logs its progress and optional-package notes at WARNING level.
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*oneDNN.*")
        yield
    logging.disable(logging.NOTSET)


def assert_same(got: object, expected: object, tol: float) -> None:
    for g, e in zip(flat(got), flat(expected), strict=True):
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


def make(mode: str, **kwargs) -> nn.Module:
    kind, extra = MODES[mode]
    torch.manual_seed(0)
    return getattr(rnnkit, kind)(I, H, **extra, **kwargs).eval()


def initial_state(layer: nn.Module, batch: int = B) -> torch.Tensor | tuple[torch.Tensor, ...]:
    rows = layer.num_layers * (2 if layer.bidirectional else 1)
    h0 = torch.randn(rows, batch, layer.proj_size or layer.hidden_size)
    return (h0, torch.randn(rows, batch, layer.hidden_size)) if layer.mode == "LSTM" else h0


def export_onnx(model: nn.Module, args: tuple, exporter: str):
    """``(onnx model, onnxruntime session)`` of ``model`` exported with ``exporter``."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
        proto = torch.onnx.export(model, args, dynamo=True, verbose=False).model_proto
    else:
        buf = io.BytesIO()
        torch.onnx.export(model, args, buf, dynamo=False)
        proto = onnx.load_from_string(buf.getvalue())
    return proto, ort.InferenceSession(proto.SerializeToString())


def assert_onnxruntime_agrees(model: nn.Module, args: tuple, exporter: str) -> set[str]:
    """Export, run on new inputs of the same shapes in onnxruntime, compare with eager
    (float32, 1e-5); return the graph's operator types."""
    proto, session = export_onnx(model, args, exporter)
    fresh = tuple(flat(args))
    fresh = [torch.randn_like(t) for t in fresh]
    feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), fresh, strict=True)}
    got = session.run(None, feeds)
    rebuilt = iter(fresh)
    eager_args = tuple(
        tuple(next(rebuilt) for _ in a) if isinstance(a, tuple) else next(rebuilt) for a in args
    )
    with torch.no_grad():
        expected = model(*eager_args)
    assert_same([torch.from_numpy(g) for g in got], expected, 1e-5)
    assert all(node.domain in ("", "ai.onnx") for node in proto.graph.node)
    return {node.op_type for node in proto.graph.node}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_onnx_export_of_a_plain_layer_writes_onnx_rnn_operators(mode, backend, exporter):
    layer = make(mode, num_layers=2, bidirectional=True, batch_first=True, backend=backend)
    args = (torch.randn(B, T, I), initial_state(layer))
    ops = assert_onnxruntime_agrees(layer, args, exporter)
    if exporter == "dynamo" and mode.startswith("rnn"):
        # onnxscript's torchlib has no lowering of aten.rnn_tanh/rnn_relu: the dynamo exporter
        # writes the steps as MatMul and Tanh/Relu there, for torch.nn.RNN as well.
        assert "MatMul" in ops
    else:
        assert ONNX_OP[mode] in ops


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("mode", list(MODES))
def test_onnx_export_of_one_time_major_layer_without_hx(mode, exporter):
    layer = make(mode)
    ops = assert_onnxruntime_agrees(layer, (torch.randn(T, B, I),), exporter)
    if not (exporter == "dynamo" and mode.startswith("rnn")):
        assert ONNX_OP[mode] in ops


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_onnx_export_of_a_projected_lstm_composes_its_steps(exporter):
    # ONNX's LSTM operator has no projection (torch.nn.LSTM's own export refuses it).
    layer = make("lstm", num_layers=2, bidirectional=True, proj_size=3)
    args = (torch.randn(T, B, I), initial_state(layer))
    ops = assert_onnxruntime_agrees(layer, args, exporter)
    assert "LSTM" not in ops and "MatMul" in ops


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize(
    "mode, variants, onnx_op",
    [
        ("gru", {"layer_norm": True}, None),
        ("lstm", {"layer_norm": True, "zoneout": 0.1}, None),
        ("lstm", {"recurrent_dropout": 0.25}, None),
        ("gru", {"learn_init": True, "weight_drop": 0.5}, "GRU"),
    ],
    ids=["gru-layer_norm", "lstm-layer_norm-zoneout", "lstm-recurrent_dropout", "gru-learn_init"],
)
def test_onnx_export_of_a_variant_layer_in_eval(mode, variants, onnx_op, exporter):
    # Per-step variants export as the reference engine's unrolled steps; the others leave the
    # step alone and export as ONNX's operator.
    layer = make(mode, num_layers=2, bidirectional=True, batch_first=True, **variants)
    ops = assert_onnxruntime_agrees(layer, (torch.randn(B, T, I),), exporter)
    assert (onnx_op in ops) if onnx_op else not ops & {"LSTM", "GRU", "RNN"}


class SelectOutput(nn.Module):
    def forward(self, result):
        return result[0]


def test_onnx_export_of_a_model_with_a_head():
    torch.manual_seed(0)
    model = nn.Sequential(rnnkit.GRU(I, H), SelectOutput(), nn.Linear(H, 2)).eval()
    ops = assert_onnxruntime_agrees(model, (torch.randn(T, B, I),), "torchscript")
    assert {"GRU", "Gemm"} <= ops or {"GRU", "MatMul"} <= ops


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", list(MODES))
def test_jit_trace_gives_eager_numbers_on_a_new_input(mode, backend):
    layer = make(mode, num_layers=2, bidirectional=True, batch_first=True, backend=backend)
    traced = torch.jit.trace(layer, (torch.randn(B, T, I), initial_state(layer)))
    x, hx = torch.randn(B, T, I), initial_state(layer)
    assert_same(traced(x, hx), layer(x, hx), 1e-5)


@pytest.mark.parametrize(
    "mode, variants",
    [("gru", {"layer_norm": True}), ("lstm", {"zoneout": 0.1, "proj_size": 3})],
    ids=["gru-layer_norm", "lstm-zoneout-proj"],
)
def test_jit_trace_of_a_variant_layer_in_eval(mode, variants):
    layer = make(mode, bidirectional=True, **variants)
    traced = torch.jit.trace(layer, (torch.randn(T, B, I),))
    x = torch.randn(T, B, I)
    assert_same(traced(x), layer(x), 1e-5)


CELLS = {
    "rnn_cell_tanh": (rnnkit.RNNCell, {}),
    "rnn_cell_relu": (rnnkit.RNNCell, {"nonlinearity": "relu"}),
    "lstm_cell": (rnnkit.LSTMCell, {}),
    "gru_cell": (rnnkit.GRUCell, {}),
    "lstm_cell_layer_norm": (rnnkit.LSTMCell, {"layer_norm": True}),
}


@pytest.mark.parametrize("cell", list(CELLS))
def test_jit_trace_of_a_cell_gives_eager_numbers(cell):
    cls, kwargs = CELLS[cell]
    torch.manual_seed(0)
    module = cls(I, H, **kwargs)
    traced = torch.jit.trace(module, (torch.randn(B, I),))
    x = torch.randn(B, I)
    assert_same(traced(x), module(x), 1e-6)


@pytest.mark.parametrize("cell", list(CELLS))
def test_jit_script_of_a_cell_raises_one_error_that_says_what_works(cell):
    cls, kwargs = CELLS[cell]
    with pytest.raises(RuntimeError, match=r"torch\.jit\.trace.*rnnkit\.to_torch"):
        torch.jit.script(cls(I, H, **kwargs))


def test_jit_script_of_a_model_holding_a_layer_raises_the_same_error():
    model = nn.Sequential(nn.Linear(I, I), rnnkit.LSTM(I, H))
    with pytest.raises(RuntimeError, match=r"cannot compile rnnkit\.LSTM"):
        torch.jit.script(model)


def test_jit_script_works_on_the_converted_cell():
    torch.manual_seed(0)
    cell = rnnkit.GRUCell(I, H)
    scripted = torch.jit.script(rnnkit.to_torch(cell))
    x = torch.randn(B, I)
    torch.testing.assert_close(scripted(x), cell(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("mode", ["gru", "lstm"])
def test_torch_export_records_torchs_own_rnn_op(mode, strict):
    # The default CPU GRU runs on the fused engine's C kernels, which torch.export cannot see.
    layer = make(mode, batch_first=True)
    program = torch.export.export(layer, (torch.randn(B, T, I),), strict=strict)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert f"aten.{mode}.input" in targets
    x = torch.randn(B, T, I)
    assert_same(program.module()(x), layer(x), 1e-5)


def plain_model(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """Every plain rnnkit class, nested one level."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.ModuleDict(
            {
                "rnn": rnnkit.RNN(I, H, 2, nonlinearity="relu", dtype=dtype),
                "lstm": rnnkit.LSTM(I, H, bidirectional=True, proj_size=3, dtype=dtype),
                "gru": rnnkit.GRU(I, H, batch_first=True, dtype=dtype),
            }
        ),
        rnnkit.RNNCell(I, H, bias=False, dtype=dtype),
        rnnkit.LSTMCell(I, H, forget_bias=1.0, dtype=dtype),
        rnnkit.GRUCell(I, H, dtype=dtype),
    )


def run_all(model: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    layers, *cells = model
    outs = [t for name in ("rnn", "lstm", "gru") for t in flat(layers[name](x))]
    return outs + [t for cell in cells for t in flat(cell(x[0]))]


def test_to_torch_and_from_torch_round_trip_with_the_same_numbers():
    model = plain_model(torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    expected = run_all(model, x)
    converted = rnnkit.to_torch(model)
    kinds = [type(m) for m in converted.modules() if m.__module__ != "torch.nn.modules.container"]
    assert kinds == [nn.RNN, nn.LSTM, nn.GRU, nn.RNNCell, nn.LSTMCell, nn.GRUCell]
    assert isinstance(model[0]["lstm"], rnnkit.LSTM), "to_torch changed its input"
    assert_same(run_all(converted, x), expected, 1e-10)
    back = rnnkit.from_torch(converted, backend="reference")
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    assert back[0]["gru"].backend == "reference"
    assert_same(run_all(back, x), expected, 1e-10)
    state = model.state_dict()
    for converted_state in (converted.state_dict(), back.state_dict()):
        assert converted_state.keys() == state.keys()
        assert all(torch.equal(converted_state[k], state[k]) for k in state)


def test_to_torch_keeps_arguments_training_mode_and_parameters():
    torch.manual_seed(0)
    layer = rnnkit.LSTM(I, H, 2, batch_first=True, dropout=0.25, bidirectional=True).train()
    converted = rnnkit.to_torch(layer, inplace=True)
    assert type(converted) is nn.LSTM and converted.training
    assert (converted.batch_first, converted.dropout, converted.num_layers) == (True, 0.25, 2)
    # inplace: the very same tensors, so an optimizer built on the layer keeps working.
    assert all(p is q for p, q in zip(converted.parameters(), layer.parameters(), strict=True))
    frozen = rnnkit.from_torch(nn.GRU(I, H).eval().requires_grad_(False))
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_to_torch_keeps_a_variant_layer_and_says_why():
    model = nn.Sequential(rnnkit.GRU(I, H, layer_norm=True), rnnkit.LSTM(I, H, learn_init=True))
    with pytest.warns(UserWarning, match=r"keeps rnnkit\.GRU \(layer_norm=True\)"):
        converted = rnnkit.to_torch(model)
    assert isinstance(converted[0], rnnkit.GRU) and isinstance(converted[1], rnnkit.LSTM)


def test_from_torch_leaves_other_classes_alone():
    model = nn.Sequential(nn.Linear(I, I), nn.LSTM(I, H))
    quantized = torch.ao.quantization.quantize_dynamic(model)
    converted = rnnkit.from_torch(quantized)
    assert [type(m) for m in converted] == [type(m) for m in quantized]
    assert type(rnnkit.from_torch(model)[1]) is rnnkit.LSTM


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = rnnkit.LSTM(I, H, bidirectional=True)
        self.gru = rnnkit.GRU(2 * H, H)
        self.head = nn.Linear(H, 3)

    def forward(self, x):
        return self.head(self.gru(self.lstm(x)[0])[0])


def test_quantize_dynamic_on_the_converted_model_quantises_the_rnn_layers():
    torch.manual_seed(0)
    model = Tagger().eval()
    quantized = torch.ao.quantization.quantize_dynamic(rnnkit.to_torch(model))
    assert type(quantized.lstm) is torch.ao.nn.quantized.dynamic.LSTM
    assert type(quantized.gru) is torch.ao.nn.quantized.dynamic.GRU
    x = torch.randn(T, B, I)
    torch.testing.assert_close(quantized(x), model(x), rtol=0.05, atol=0.05)


def test_quantize_dynamic_on_an_unconverted_model_warns():
    model = Tagger().eval()
    with pytest.warns(UserWarning, match=r"leaves rnnkit\.LSTM unquantised.*rnnkit\.to_torch"):
        quantized = torch.ao.quantization.quantize_dynamic(model)
    assert isinstance(quantized.lstm, rnnkit.LSTM)
    # The flow's own bookkeeping still works: it sets qconfig, reads it and deletes it at the end.
    assert not hasattr(quantized.lstm, "qconfig") and not hasattr(quantized.head, "qconfig")


def test_quantize_dynamic_of_only_linear_layers_does_not_warn():
    model = Tagger().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert isinstance(quantized.lstm, rnnkit.LSTM)
    assert type(quantized.head) is torch.ao.nn.quantized.dynamic.Linear
