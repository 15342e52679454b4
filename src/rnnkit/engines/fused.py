"""The fused engine: one ``autograd.Function`` per layer and direction with a hand-written BPTT.

Forward: the input projections of all steps in one GEMM; per step one recurrent GEMM and one
pointwise kernel that saves only what backward needs. Backward walks time in reverse with one
recurrent GEMM and one pointwise kernel per step; the weight gradients and the input gradient are
each one GEMM over all steps. Variable lengths run as per-step batch sizes: sequences are sorted
by decreasing length (as in ``PackedSequence``), so step t touches rows ``[:batch_sizes[t]]`` of
the state and a finished sequence keeps its state, which is its ``h_n``. Derivations:
``engines/README.md``. The pointwise kernels come from :func:`pointwise_kernels`.
"""

from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from torch import Tensor

from rnnkit.engines import pointwise
from rnnkit.engines.spec import LayerSpec, Weights
from rnnkit.scan import Carry


def pointwise_kernels(device: torch.device, dtype: torch.dtype) -> ModuleType:
    """Compiled kernels for this device and dtype where they exist, else the torch-op twins."""
    if device.type == "cpu":
        from rnnkit.engines import cpu

        if cpu.available(dtype):
            return cpu
    elif device.type == "cuda":
        from rnnkit.engines import triton_kernels

        if triton_kernels.available(dtype, device):
            return triton_kernels
    return pointwise


def _matmul_by(w: Tensor, batch: int) -> Callable[[Tensor], Tensor]:
    """``x -> x @ w.t()`` for the per-step recurrent products. On the CPU in float32 it uses
    MKL's packed GEMM, which packs ``w`` once per call instead of once per step."""
    if w.device.type == "cpu" and w.dtype == torch.float32 and _MKL_PACKED:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(w, batch)
        return lambda x: torch.ops.mkl._mkl_linear(x, packed, w, None, batch)
    wt = w.t()
    return lambda x: x @ wt


_MKL_PACKED = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def _offsets(batch_sizes: Sequence[int]) -> list[int]:
    offsets = [0]
    for bs in batch_sizes:
        offsets.append(offsets[-1] + bs)
    return offsets


def _prev_rows(batch_sizes: Sequence[int], reverse: bool, device: torch.device) -> Tensor:
    """For every row of the packed data, the row of ``cat(out, h0)`` that held its h_{t-1}."""
    bs = torch.tensor(batch_sizes, device=device)
    T, N = len(batch_sizes), int(bs.sum())
    off = torch.cumsum(bs, 0) - bs  # (T,)
    t = torch.repeat_interleave(torch.arange(T, device=device), bs)  # (N,)
    b = torch.arange(N, device=device) - off[t]
    step = 1 if reverse else -1
    src = t + step
    inside = (src >= 0) & (src < T)
    src = src.clamp(0, T - 1)
    valid = inside & (b < bs[src])
    return torch.where(valid, off[src] + b, N + b)


class FusedLayer(torch.autograd.Function):
    """One layer and direction over packed-layout data ``x`` (N, I) with ``batch_sizes``."""

    @staticmethod
    def forward(
        ctx,
        mode: str,
        reverse: bool,
        batch_sizes: tuple[int, ...],
        kernels: ModuleType,
        x: Tensor,
        h0: Tensor,
        c0: Tensor | None,
        w_ih: Tensor,
        w_hh: Tensor,
        b_ih: Tensor | None,
        b_hh: Tensor | None,
        w_hr: Tensor | None,
    ):
        N, H = x.shape[0], w_hh.shape[0] // {"LSTM": 4, "GRU": 3}.get(mode, 1)
        offsets = _offsets(batch_sizes)
        steps = range(len(batch_sizes) - 1, -1, -1) if reverse else range(len(batch_sizes))
        gru = mode == "GRU"
        if gru or b_ih is None:
            G = x @ w_ih.t() if b_ih is None else torch.addmm(b_ih, x, w_ih.t())  # (N, G*H)
        else:
            G = torch.addmm(b_ih + b_hh, x, w_ih.t())  # (N, G*H)
        out = x.new_empty(N, h0.shape[1])
        h = h0.clone()
        c = c0.clone() if c0 is not None else None
        C = x.new_empty(N, H) if mode == "LSTM" else None
        GH = x.new_empty(N, 3 * H) if gru else None
        R = x.new_empty(N, H) if w_hr is not None else None
        relu = mode == "RNN_RELU"
        recurrent = _matmul_by(w_hh, h0.shape[0])  # h -> h @ W_hh^T
        for t in steps:
            bs, rows = batch_sizes[t], slice(offsets[t], offsets[t + 1])
            g, hs = G[rows], h[:bs]
            gh = recurrent(hs)  # (bs, G*H)
            if mode == "LSTM":
                if w_hr is None:
                    kernels.lstm_forward(g, gh, c[:bs], C[rows], hs, out[rows])
                else:
                    kernels.lstm_forward(g, gh, c[:bs], C[rows], None, R[rows])
                    torch.mm(R[rows], w_hr.t(), out=out[rows])
                    hs.copy_(out[rows])
            elif gru:
                if b_hh is not None:
                    gh.add_(b_hh)
                GH[rows] = gh
                kernels.gru_forward(g, gh, hs, out[rows])
            else:
                kernels.rnn_forward(g, gh, hs, out[rows], relu)
        ctx.mode, ctx.reverse, ctx.batch_sizes, ctx.kernels = mode, reverse, batch_sizes, kernels
        ctx.has_c0, ctx.has_bias = c0 is not None, b_ih is not None
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, G, out, C, GH)
        ctx.mark_non_differentiable()
        return out, h, c

    @staticmethod
    def backward(ctx, d_out: Tensor | None, d_hn: Tensor | None, d_cn: Tensor | None):
        x, h0, c0, w_ih, w_hh, w_hr, G, out, C, GH = ctx.saved_tensors
        mode, reverse, batch_sizes, kernels = ctx.mode, ctx.reverse, ctx.batch_sizes, ctx.kernels
        H = G.shape[1] // {"LSTM": 4, "GRU": 3}.get(mode, 1)
        offsets = _offsets(batch_sizes)
        steps = range(len(batch_sizes)) if reverse else range(len(batch_sizes) - 1, -1, -1)
        d_out = torch.zeros_like(out) if d_out is None else d_out.contiguous()
        dh = torch.zeros_like(h0) if d_hn is None else d_hn.clone()
        dc = None
        prev = _prev_rows(batch_sizes, reverse, x.device)
        H_prev = torch.cat((out, h0)).index_select(0, prev)  # (N, R)
        dG = torch.empty_like(G)
        dGH = torch.empty_like(GH) if GH is not None else None
        if mode == "LSTM":
            dc = torch.zeros_like(c0) if d_cn is None else d_cn.clone()
            C_prev = torch.cat((C, c0)).index_select(0, prev)  # (N, H)
            if w_hr is not None:
                R = G[:, 3 * H :] * torch.tanh(C)  # (N, H): o * tanh(c), before projection
                dH = torch.empty_like(out)  # (N, P)
        relu = mode == "RNN_RELU"
        recurrent = _matmul_by(w_hh.t().contiguous(), dh.shape[0])  # dg -> dg @ W_hh
        for t in steps:
            bs, rows = batch_sizes[t], slice(offsets[t], offsets[t + 1])
            dht = dh[:bs] + d_out[rows]
            if mode == "LSTM":
                if w_hr is not None:
                    dH[rows] = dht
                    dht = dht @ w_hr  # (bs, H)
                kernels.lstm_backward(G[rows], C[rows], C_prev[rows], dht, dc[:bs], dG[rows])
                dh[:bs] = recurrent(dG[rows])
            elif mode == "GRU":
                kernels.gru_backward(
                    G[rows], GH[rows], H_prev[rows], dht, dG[rows], dGH[rows], dh[:bs]
                )
                dh[:bs] += recurrent(dGH[rows])
            else:
                kernels.rnn_backward(out[rows], dht, dG[rows], relu)
                dh[:bs] = recurrent(dG[rows])
        needs = ctx.needs_input_grad
        dx = dG @ w_ih if needs[4] else None
        dw_ih = dG.t() @ x if needs[7] else None
        dw_hh = (dGH if dGH is not None else dG).t() @ H_prev if needs[8] else None
        db_ih = db_hh = None
        if ctx.has_bias:
            db_ih = dG.sum(0)
            db_hh = dGH.sum(0) if dGH is not None else db_ih
        dw_hr = dH.t() @ R if w_hr is not None and needs[11] else None
        return None, None, None, None, dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh, dw_hr


def run(
    spec: LayerSpec,
    x: Tensor,
    hx: Carry,
    weights: Sequence[Weights],
    batch_sizes: Sequence[int] | None,
    training: bool,
    kernels: ModuleType | None = None,
) -> tuple[Tensor, Carry]:
    """Run a whole layer stack; see ``rnnkit.engines`` for the contract. ``kernels`` forces a
    pointwise kernel module (default: :func:`pointwise_kernels`)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # As torch.nn does under autocast: run in the autocast dtype (the kernels still do their
        # pointwise math in float32), then keep autocast away from the engine's own GEMMs.
        dtype = torch.get_autocast_dtype(device_type)
        x, hx = x.to(dtype), tuple(s.to(dtype) for s in hx)
        weights = [tuple(w if w is None else w.to(dtype) for w in ws) for ws in weights]
    padded = batch_sizes is None
    if padded:
        T, B = x.shape[0], x.shape[1]
        batch_sizes = (B,) * T
        x = x.reshape(T * B, x.shape[2])  # (T*B, I)
    batch_sizes = tuple(batch_sizes)
    kernels = kernels or pointwise_kernels(x.device, x.dtype)
    D = spec.num_directions
    h_n, c_n = [], []
    with torch.autocast(device_type, enabled=False):
        for layer in range(spec.num_layers):
            outs = []
            for direction in range(D):
                k = layer * D + direction
                out, h, c = FusedLayer.apply(
                    spec.mode,
                    direction == 1,
                    batch_sizes,
                    kernels,
                    x.contiguous(),
                    hx[0][k],
                    hx[1][k] if spec.mode == "LSTM" else None,
                    *weights[k],
                )
                outs.append(out)
                h_n.append(h)
                c_n.append(c)
            x = outs[0] if D == 1 else torch.cat(outs, dim=1)  # (N, D*R)
            if spec.dropout > 0 and training and layer < spec.num_layers - 1:
                x = torch.nn.functional.dropout(x, p=spec.dropout, training=True)
    if padded:
        x = x.view(T, B, x.shape[1])  # (T, B, D*R)
    states = (torch.stack(h_n),) + ((torch.stack(c_n),) if spec.mode == "LSTM" else ())
    return x, states
