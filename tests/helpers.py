"""Shared test helpers: build twin torch.nn / rnnkit layers and compare them."""

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


def twins(kind: str, dtype: torch.dtype = torch.float64, **kwargs) -> tuple[nn.Module, nn.Module]:
    """A torch.nn layer and an rnnkit layer holding the same weights."""
    backend = kwargs.pop("backend", "reference")
    ref = TORCH[kind](**kwargs, dtype=dtype)
    ours = OURS[kind](**kwargs, dtype=dtype, backend=backend)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return (
        {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-5}
    )


def flat(out: object) -> list[torch.Tensor]:
    """Every tensor in a layer's result, packed data included, in a fixed order."""
    if isinstance(out, PackedSequence):
        return [out.data]
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for item in out for t in flat(item)]


def run_and_grad(
    layer: nn.Module, make_args, leaves: list[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Outputs of ``layer(*make_args())`` and the gradients of a random projection of them
    with respect to ``leaves`` and every parameter of the layer."""
    outs = flat(layer(*make_args()))
    gen = torch.Generator().manual_seed(1234)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs)
    wrt = [t for t in leaves if t.requires_grad] + list(layer.parameters())
    grads = torch.autograd.grad(loss, wrt, allow_unused=False)
    return [o.detach() for o in outs], list(grads)


def assert_twins_agree(ref: nn.Module, ours: nn.Module, make_args, leaves, dtype) -> None:
    out_ref, g_ref = run_and_grad(ref, make_args, leaves)
    out_ours, g_ours = run_and_grad(ours, make_args, leaves)
    assert len(out_ref) == len(out_ours)
    for a, b in zip(out_ours, out_ref, strict=False):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **tolerance(dtype))
    names = [f"leaf{i}" for i, t in enumerate(leaves) if t.requires_grad]
    names += [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, g_ours, g_ref, strict=False):
        torch.testing.assert_close(a, b, **tolerance(dtype), msg=lambda m, n=name: f"grad {n}: {m}")


def packed_input(x: torch.Tensor, lengths: list[int], enforce_sorted: bool) -> PackedSequence:
    """``x`` is (T, B, I) padded."""
    return pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
