"""PyTorch's own test inputs for its recurrent modules, run on rnnkit's.

``torch.testing._internal.common_modules.module_db`` is the table PyTorch's module tests
(``test/test_modules.py``) draw from: for ``nn.RNN``, ``nn.LSTM``, ``nn.GRU`` and the three
cells, the constructor arguments and inputs it tests (unbatched, batch_first, bidirectional,
packed, every nonlinearity), a reference function for some, and the inputs that must fail with
torch.nn's error type and message. Each sample runs here on torch.nn's module and on rnnkit's
holding the same weights, in float64: the same outputs, the reference function's, and the same
gradient for every parameter; and each error sample must raise the error type torch.nn raises,
with a message that torch's pattern finds (rnnkit's messages quote torch.nn's).
"""

import copy
import re

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence

import rnnkit

# torch's internal testing helpers import expecttest (the test extra installs it).
pytest.importorskip("expecttest")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")

PAIRS = {
    torch.nn.RNN: rnnkit.RNN,
    torch.nn.LSTM: rnnkit.LSTM,
    torch.nn.GRU: rnnkit.GRU,
    torch.nn.RNNCell: rnnkit.RNNCell,
    torch.nn.LSTMCell: rnnkit.LSTMCell,
    torch.nn.GRUCell: rnnkit.GRUCell,
}
INFOS = [info for info in common_modules.module_db if info.module_cls in PAIRS]
# float64 results of the same arithmetic in another order.
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _tensors(out: object) -> list[torch.Tensor]:
    """The tensors of a module's result, in order (a PackedSequence's data)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def test_module_db_has_the_recurrent_modules():
    assert {info.module_cls for info in INFOS} == set(PAIRS)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("info", INFOS, ids=[info.name for info in INFOS])
def test_torch_inputs_give_torch_results(info, training):
    samples = info.module_inputs_func(
        info, device="cpu", dtype=torch.float64, requires_grad=True, training=training
    )
    for sample in samples:
        if sample.forward_input is None:
            continue
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        ref = info.module_cls(*args, **kwargs).double().train(training)
        ours = PAIRS[info.module_cls](*args, **kwargs).double().train(training)
        ours.load_state_dict(ref.state_dict())
        inputs = sample.forward_input
        want = _tensors(ref(*inputs.args, **inputs.kwargs))
        got = _tensors(ours(*copy.deepcopy(inputs.args), **copy.deepcopy(inputs.kwargs)))
        what = f"{info.name}{args}{kwargs}"
        assert [t.shape for t in got] == [t.shape for t in want], what
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, **TOL, msg=what)
        if sample.reference_fn is not None:
            expected = sample.reference_fn(
                ours, *copy.deepcopy(inputs.args), **copy.deepcopy(inputs.kwargs)
            )
            for g, e in zip(got, _tensors(expected), strict=True):
                torch.testing.assert_close(g, e, **TOL, msg=f"{what}: torch's reference")
        grads = [
            torch.autograd.grad(sum(t.sum() for t in out), list(m.parameters()))
            for out, m in ((want, ref), (got, ours))
        ]
        for g, w in zip(grads[1], grads[0], strict=True):
            torch.testing.assert_close(g, w, **TOL, msg=f"{what}: a parameter's gradient")


@pytest.mark.parametrize("info", INFOS, ids=[info.name for info in INFOS])
def test_torch_error_inputs_raise_torch_errors(info):
    if info.module_error_inputs_func is None:
        pytest.skip(f"{info.name}: torch lists no error inputs")
    samples = info.module_error_inputs_func(
        info, device="cpu", dtype=torch.float32, requires_grad=False, training=False
    )
    for sample in samples:
        inp = sample.module_error_input
        args, kwargs = inp.constructor_input.args, inp.constructor_input.kwargs
        with pytest.raises(sample.error_type) as raised:
            module = PAIRS[info.module_cls](*args, **kwargs)
            assert sample.error_on != common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR
            module(*inp.forward_input.args, **inp.forward_input.kwargs)
        assert re.search(sample.error_regex, str(raised.value)), (
            f"{info.name}{args}: {sample.error_regex!r} not in {raised.value}"
        )
