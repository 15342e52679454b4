"""Parameter counts: measured on a module, and in closed form from the constructor arguments."""

from dataclasses import dataclass

from torch import nn

_GATES = {"rnn": 1, "rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}


def param_suffix(layer: int, direction: int) -> str:
    """torch.nn's suffix of one layer and direction's parameter names: ``_l1_reverse``."""
    return f"_l{layer}" + ("_reverse" if direction == 1 else "")


@dataclass(frozen=True)
class ParamCount:
    """The total and one row per tensor: ``(name, shape, count)`` in registration order."""

    total: int
    tensors: list[tuple[str, tuple[int, ...], int]]
    formula: str
    per_layer: list[int]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalars in ``module``'s parameters (only those with ``requires_grad`` if asked).

    Example:
        >>> import rnnkit
        >>> rnnkit.count_parameters(rnnkit.LSTM(10, 20))  # 4 * (20*10 + 20*20 + 2*20)
        2560
    """
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def param_count(
    mode: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    bias: bool = True,
    bidirectional: bool = False,
    proj_size: int = 0,
) -> ParamCount:
    """Closed-form parameter count of ``rnnkit.RNN``/``LSTM``/``GRU`` (and torch.nn's).

    With G gates (1 for RNN, 4 for LSTM, 3 for GRU), D directions, R = P or H the size of h, and
    I_l the input of layer l (I for l = 0, D * R above), each layer and direction holds
    G*H*I_l + G*H*R (weights) + 2*G*H (biases) + P*H (projection).

    Example:
        >>> import rnnkit
        >>> count = rnnkit.param_count("lstm", 10, 20, num_layers=2)
        >>> count.total, count.per_layer
        (5920, [2560, 3360])
        >>> count.tensors[0]
        ('weight_ih_l0', (80, 10), 800)
    """
    key = mode.lower()
    if key not in _GATES:
        raise ValueError(f"param_count: mode must be one of rnn, lstm, gru; got {mode!r}")
    if proj_size and key != "lstm":
        raise ValueError(f"param_count: proj_size is only supported for lstm, got mode {mode!r}")
    g, h = _GATES[key], hidden_size
    d = 2 if bidirectional else 1
    r = proj_size or h
    rows: list[tuple[str, tuple[int, ...], int]] = []
    per_layer = []
    for layer in range(num_layers):
        start = len(rows)
        i = input_size if layer == 0 else d * r
        for direction in range(d):
            suffix = param_suffix(layer, direction)
            shapes = [("weight_ih", (g * h, i)), ("weight_hh", (g * h, r))]
            if bias:
                shapes += [("bias_ih", (g * h,)), ("bias_hh", (g * h,))]
            if proj_size:
                shapes.append(("weight_hr", (proj_size, h)))
            for base, shape in shapes:
                n = 1
                for s in shape:
                    n *= s
                rows.append((base + suffix, shape, n))
        per_layer.append(sum(n for _, _, n in rows[start:]))
    terms = "G*H*I_l + G*H*R" + (" + 2*G*H" if bias else "") + (" + P*H" if proj_size else "")
    formula = (
        f"sum over layers l and directions of {terms}; G={g}, H={h}, R={r}, D={d}, "
        f"I_0={input_size}, I_l={d * r} for l>0"
    )
    return ParamCount(sum(n for _, _, n in rows), rows, formula, per_layer)
