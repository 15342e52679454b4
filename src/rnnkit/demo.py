"""The worked example ``rnnkit demo`` prints: shapes, parameter counts, parity with torch.nn."""

import torch

import rnnkit
from rnnkit.cli import shape_rows
from rnnkit.validation import format_shape


def main() -> int:
    I, H, L, T, B = 10, 20, 2, 5, 3
    print(f"rnnkit {rnnkit.__version__} on torch {torch.__version__}\n")
    print(
        f"A 2-layer bidirectional LSTM, input_size={I}, hidden_size={H}, on a batch of {B} "
        f"sequences of {T} steps (batch_first=True):\n"
    )
    torch.manual_seed(0)
    ours = rnnkit.LSTM(I, H, L, batch_first=True, bidirectional=True)
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(I, H, L, batch_first=True, bidirectional=True)
    print(f"  {ours}")
    pc = rnnkit.param_count("lstm", I, H, L, bidirectional=True)
    print(
        f"  parameters: {rnnkit.count_parameters(ours):,} (closed form: {pc.total:,}; "
        f"torch.nn: {rnnkit.count_parameters(theirs):,})\n"
    )
    x = torch.randn(B, T, I, requires_grad=True)
    out, (hn, cn) = ours(x)
    for name, shape, meaning in shape_rows("lstm", I, H, L, True, 0, T, B, True):
        got = {"input": x, "output": out, "h_n": hn, "c_n": cn}.get(name)
        check = "" if got is None else ("  ok" if tuple(got.shape) == shape else "  MISMATCH")
        print(f"  {name:<7}{format_shape(shape):<13}{meaning}{check}")
    ref_out, (ref_hn, ref_cn) = theirs(x)
    g_ours = torch.autograd.grad(out.sum() + hn.sum() + cn.sum(), [x, *ours.parameters()])
    g_ref = torch.autograd.grad(
        ref_out.sum() + ref_hn.sum() + ref_cn.sum(), [x, *theirs.parameters()]
    )
    diff_out = max(
        (a - b).abs().max().item() for a, b in ((out, ref_out), (hn, ref_hn), (cn, ref_cn))
    )
    diff_grad = max((a - b).abs().max().item() for a, b in zip(g_ours, g_ref, strict=False))
    print("\nSame seed, same weights as torch.nn.LSTM; largest difference against it:")
    print(f"  outputs and final states: {diff_out:.2e}")
    print(f"  gradients (input and {len(g_ours) - 1} parameter tensors): {diff_grad:.2e}")
    ok = diff_out < 1e-5 and diff_grad < 1e-5
    print("  parity: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1
