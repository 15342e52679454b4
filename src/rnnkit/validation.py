"""Input checking, written once and called by every path (padded, packed, unbatched, cells).

Errors name the argument, what was expected and what came, in the terms of the layer's own
documentation. ``RNNInputError`` subclasses both ``ValueError`` and ``RuntimeError``, so code
written against torch.nn (which raises ``RuntimeError`` for most of these) keeps working.
"""

import itertools
import numbers
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from rnnkit.engines.spec import LayerSpec


class RNNInputError(ValueError, RuntimeError):
    """A tensor given to an rnnkit layer or cell does not fit it."""


def as_torch_says(message: str) -> str:
    """torch.nn's own wording of the same error, appended to rnnkit's, so that code (and
    PyTorch's test suite) matching torch.nn's messages keeps working."""
    return f" [torch.nn: {message}]"


def format_shape(t: Tensor | tuple[int, ...]) -> str:
    """A shape as Python writes a tuple: ``(3,)``, ``(5, 3, 10)``."""
    return str(tuple(t.shape) if isinstance(t, Tensor) else tuple(t))


def _check_flag(name: str, arg: str, value: object) -> None:
    # torch.nn refuses 0/1 and strings here: 'False' is truthy and would silently mean True.
    if not isinstance(value, bool):
        raise TypeError(f"{name}: {arg} should be of type bool, got: {type(value).__name__}")


def _check_size(name: str, arg: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name}: {arg} should be of type int, got: {type(value).__name__}")
    if value < minimum:
        must = "greater than zero" if minimum == 1 else "zero or greater"
        raise ValueError(f"{name}: {arg} must be {must}, got {value}")


def check_cell_constructor(name: str, input_size: int, hidden_size: int) -> None:
    """A cell's arguments. torch.nn's cells accept zero sizes (empty weights) and take ``bias``
    by truth value, so rnnkit does."""
    _check_size(name, "input_size", input_size, 0)
    _check_size(name, "hidden_size", hidden_size, 0)


def check_constructor(
    name: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    dropout: float = 0.0,
    proj_size: int = 0,
    bias: bool = True,
    batch_first: bool = False,
) -> None:
    """The checks torch.nn makes on constructor arguments, with the same exception types."""
    if (
        not isinstance(dropout, numbers.Number)
        or isinstance(dropout, bool)
        or not 0 <= dropout <= 1
    ):
        raise ValueError(
            f"{name}: dropout should be a number in range [0, 1] representing the probability "
            f"of an element being zeroed, got {dropout!r}"
        )
    if dropout > 0 and num_layers == 1:
        warnings.warn(
            f"{name}: dropout option adds dropout after all but last recurrent layer, so non-zero "
            f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
            f"num_layers={num_layers}",
            stacklevel=3,
        )
    _check_flag(name, "bias", bias)
    _check_flag(name, "batch_first", batch_first)
    _check_size(name, "input_size", input_size, 1)
    _check_size(name, "hidden_size", hidden_size, 1)
    _check_size(name, "num_layers", num_layers, 1)
    if not isinstance(proj_size, int) or isinstance(proj_size, bool):
        raise TypeError(f"{name}: proj_size should be of type int, got: {type(proj_size).__name__}")
    if proj_size < 0:
        raise ValueError(
            f"{name}: proj_size should be a positive integer or zero to disable projections, "
            f"got {proj_size}"
        )
    if proj_size >= hidden_size:
        raise ValueError(
            f"{name}: proj_size has to be smaller than hidden_size, got proj_size={proj_size} "
            f"and hidden_size={hidden_size}"
        )


def _check_tensor(name: str, what: str, t: object, ref: Tensor | None) -> Tensor:
    """``t`` is a floating tensor; when ``ref`` is given, on ``ref``'s device with its dtype."""
    if not isinstance(t, Tensor):
        raise RNNInputError(f"{name}: {what} must be a Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise RNNInputError(
            f"{name}: {what} must be a floating-point tensor; got dtype {t.dtype} "
            f"(convert it with .float())"
        )
    if ref is None:
        return t
    if t.device != ref.device:
        raise RNNInputError(f"{name}: {what} is on {t.device} but input is on {ref.device}")
    if t.dtype != ref.dtype and not torch.is_autocast_enabled(ref.device.type):
        raise RNNInputError(f"{name}: {what} has dtype {t.dtype} but input has dtype {ref.dtype}")
    return t


def check_against_parameters(name: str, x: Tensor, param: Tensor | None) -> None:
    if param is None:
        return
    if x.device != param.device:
        raise RNNInputError(
            f"{name}: input is on {x.device} but the parameters are on {param.device}; "
            f"move one with .to()"
        )
    if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
        raise RNNInputError(
            f"{name}: input has dtype {x.dtype} but the parameters have dtype {param.dtype}; "
            f"convert one with .to(dtype)"
            + as_torch_says(
                f"RNN input dtype ({x.dtype}) does not match weight dtype ({param.dtype}). "
                f"Convert input: input.to({param.dtype}), or convert model: model.to({x.dtype})"
            )
        )


@dataclass
class Prepared:
    """A layer's input in the engines' form, and what is needed to give results back."""

    x: Tensor  # (T, B, I) time-major, or packed data (N, I)
    hx: tuple[Tensor, ...]  # (h0,) or (h0, c0), or a cell's states; each (L * D, B, *)
    batch_sizes: list[int] | None
    packed: PackedSequence | None
    unbatched: bool
    batch_first: bool

    @property
    def batch(self) -> int:
        """B: the number of sequences."""
        return self.batch_sizes[0] if self.batch_sizes is not None else self.x.shape[1]

    @property
    def steps(self) -> int:
        """T: the number of time steps (of the longest sequence)."""
        return len(self.batch_sizes) if self.batch_sizes is not None else self.x.shape[0]

    def finish(self, output: Tensor, hn: tuple[Tensor, ...]) -> tuple[object, tuple[Tensor, ...]]:
        """Output and final states in the caller's layout."""
        if self.packed is not None:
            p = self.packed
            if p.unsorted_indices is not None:
                hn = tuple(s.index_select(1, p.unsorted_indices) for s in hn)
            return PackedSequence(output, p.batch_sizes, p.sorted_indices, p.unsorted_indices), hn
        if self.unbatched:
            return output.squeeze(1), tuple(s.squeeze(1) for s in hn)
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, hn


def prepare_sequence_input(
    name: str,
    input_size: int,
    input: object,
    batch_first: bool,
    param: Tensor | None,
) -> Prepared:
    """Validate a layer's ``input`` and bring it to the time-major, batched form.

    The states are left empty (``hx=()``): ``prepare_layer_input`` fills them from a ``LayerSpec``,
    ``rnnkit.Recurrent`` through ``prepare_states`` from its cells' zero state.
    """
    packed = input if isinstance(input, PackedSequence) else None
    if packed is not None:
        x = _check_tensor(name, "input", packed.data, None)
        if x.dim() != 2:
            raise RNNInputError(
                f"{name}: packed input data must be 2-D (total steps, input_size); "
                f"got shape {format_shape(x)}"
            )
        batch_sizes = _check_batch_sizes(name, packed, x.shape[0])
        steps, unbatched = len(batch_sizes), False
    else:
        x = _check_tensor(name, "input", input, None)
        layout = "(batch, seq_len, input_size)" if batch_first else "(seq_len, batch, input_size)"
        if x.dim() not in (2, 3):
            raise RNNInputError(
                f"{name}: input must be 3-D {layout} for a batch or 2-D (seq_len, input_size) "
                f"for one sequence; got a {x.dim()}-D tensor of shape {format_shape(x)}"
                + as_torch_says(
                    f"{name}: Expected input to be 2D or 3D, got {x.dim()}D"
                    + (" tensor instead" if name == "RNN" else " instead")
                )
            )
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(1)
        elif batch_first:
            x = x.transpose(0, 1)
        batch_sizes = None
        steps = x.shape[0]
    if x.shape[-1] != input_size:
        raise RNNInputError(
            f"{name}: input has {x.shape[-1]} features per step but input_size={input_size}"
            + as_torch_says(
                f"input.size(-1) must be equal to input_size. Expected {input_size}, "
                f"got {x.shape[-1]}"
            )
        )
    if steps == 0:
        raise RNNInputError(
            f"{name}: input has 0 time steps (seq_len=0); each sequence needs at least one step"
            + as_torch_says("Expected sequence length to be larger than 0 in RNN")
        )
    check_against_parameters(name, x, param)
    return Prepared(x, (), batch_sizes, packed, unbatched, batch_first)


def _check_batch_sizes(name: str, packed: PackedSequence, rows: int) -> list[int]:
    """``batch_sizes`` and the permutations of a PackedSequence, as the engines rely on them.

    PackedSequence is a plain tuple that anyone can build by hand, so nothing in it is trusted:
    the kernels index the data rows by these numbers.
    """
    sizes = packed.batch_sizes
    if not isinstance(sizes, Tensor):
        raise RNNInputError(
            f"{name}: packed input's batch_sizes must be a Tensor; got {type(sizes).__name__}"
        )
    if sizes.dim() != 1 or sizes.dtype != torch.int64 or sizes.device.type != "cpu":
        raise RNNInputError(
            f"{name}: packed input's batch_sizes must be a 1-D int64 tensor on the CPU, as "
            f"pack_padded_sequence makes it; got a {sizes.dim()}-D {sizes.dtype} tensor on "
            f"{sizes.device}"
        )
    if sizes.numel() == 0:
        raise RNNInputError(
            f"{name}: packed input's batch_sizes is empty; each sequence needs at least one step"
        )
    values = sizes.tolist()
    if min(values) < 1:
        raise RNNInputError(
            f"{name}: packed input's batch_sizes must be positive (sequences alive at each "
            f"step); got {_brief(values)}"
        )
    if any(b > a for a, b in itertools.pairwise(values)):
        raise RNNInputError(
            f"{name}: packed input's batch_sizes must not increase over time (sequences sorted "
            f"by decreasing length); got {_brief(values)}"
        )
    if sum(values) != rows:
        raise RNNInputError(
            f"{name}: packed input's batch_sizes sum to {sum(values)} steps but its data has "
            f"{rows} rows; they must be equal"
        )
    for what in ("sorted_indices", "unsorted_indices"):
        index = getattr(packed, what)
        if index is None:
            continue
        if (
            not isinstance(index, Tensor)
            or index.dim() != 1
            or index.dtype != torch.int64
            or index.numel() != values[0]
            or index.device != packed.data.device
            or not torch.equal(index.sort().values.cpu(), torch.arange(values[0], device="cpu"))
        ):
            got = (
                f"shape {format_shape(index)}, dtype {index.dtype} on {index.device}"
                if isinstance(index, Tensor)
                else type(index).__name__
            )
            if isinstance(index, Tensor) and index.dim() == 1 and not index.is_floating_point():
                # Its values, which are what is wrong when the shape and dtype are right.
                shown = index[:10].tolist()
                got += f", values {shown}" + (" ..." if index.numel() > 10 else "")
            raise RNNInputError(
                f"{name}: packed input's {what} must be a permutation of 0..{values[0] - 1} "
                f"(one entry per sequence, int64, on the data's device); got {got}"
            )
    return values


def _brief(values: list[int]) -> str:
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:8]))}, ...]"


def prepare_layer_input(
    name: str,
    spec: LayerSpec,
    input: object,
    hx: object,
    batch_first: bool,
    param: Tensor | None,
) -> Prepared:
    """Validate a layer's ``(input, hx)`` and bring it to the engines' time-major, batched form."""
    prepared = prepare_sequence_input(name, spec.input_size, input, batch_first, param)
    x, batch = prepared.x, prepared.batch
    rows = spec.num_layers * spec.num_directions
    if hx is None:
        states = [x.new_zeros(rows, batch, spec.out_size)]
        if spec.mode == "LSTM":
            states.append(x.new_zeros(rows, batch, spec.hidden_size))
    else:
        states = _check_hx(
            name, spec, hx, x, batch, prepared.unbatched, prepared.packed is not None
        )
        states = _to_sorted(prepared.packed, states)
    prepared.hx = tuple(states)
    return prepared


def prepare_states(
    name: str,
    hx: object,
    zeros: tuple[Tensor, ...],
    is_tuple: bool,
    prepared: Prepared,
) -> tuple[Tensor, ...]:
    """Validate a user's ``hx`` against the zero state it replaces; states in the engines' form.

    ``zeros`` are ``(L * D, B, *)``, one per state tensor; ``is_tuple`` says whether the user
    passes a tuple of them or a single tensor. Returns ``zeros`` when ``hx`` is None.
    """
    if hx is None:
        return zeros
    if is_tuple:
        if not isinstance(hx, (tuple, list)) or len(hx) != len(zeros):
            got = f"a {type(hx).__name__}" + (
                f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else ""
            )
            raise RNNInputError(
                f"{name}: hx must be a tuple of {len(zeros)} tensors, like the cell's state; "
                f"got {got}"
            )
        names, states = [f"hx[{i}]" for i in range(len(zeros))], list(hx)
    else:
        if not isinstance(hx, Tensor):
            raise RNNInputError(
                f"{name}: hx must be a Tensor, like the cell's state; got {type(hx).__name__}"
            )
        names, states = ["hx"], [hx]
    unbatched = prepared.unbatched
    layout = "(num_layers * num_directions, " + ("" if unbatched else "batch, ") + "*state)"
    out = []
    for what, s, zero in zip(names, states, zeros, strict=True):
        s = _check_tensor(name, what, s, prepared.x)
        expected = tuple(zero.shape)
        if unbatched:
            expected = expected[:1] + expected[2:]
        if tuple(s.shape) != expected:
            raise RNNInputError(
                f"{name}: {what} has shape {format_shape(s)}; expected {layout} = "
                f"{format_shape(expected)}, the cells' initial_state stacked over layers and "
                f"directions"
            )
        out.append(s.unsqueeze(1) if unbatched else s)
    return tuple(_to_sorted(prepared.packed, out))


def _to_sorted(packed: PackedSequence | None, states: list[Tensor]) -> list[Tensor]:
    """States in the packed batch's order (sorted by decreasing length)."""
    if packed is None or packed.sorted_indices is None:
        return states
    return [s.index_select(1, packed.sorted_indices) for s in states]


def _check_hx(
    name: str,
    spec: LayerSpec,
    hx: object,
    x: Tensor,
    batch: int,
    unbatched: bool,
    packed: bool,
) -> list[Tensor]:
    is_lstm = spec.mode == "LSTM"
    if is_lstm:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            got = f"a {type(hx).__name__}" + (
                f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else ""
            )
            raise RNNInputError(f"{name}: hx must be a tuple (h0, c0); got {got}")
        names, states = ("h0", "c0"), list(hx)
        sizes = (spec.out_size, spec.hidden_size)
    else:
        if not isinstance(hx, Tensor):
            raise RNNInputError(f"{name}: hx must be a Tensor h0; got {type(hx).__name__}")
        names, states, sizes = ("h0",), [hx], (spec.out_size,)
    rows = spec.num_layers * spec.num_directions
    out = []
    for index, (what, s, size) in enumerate(zip(names, states, sizes, strict=False)):
        s = _check_tensor(name, what, s, x)
        feature = "proj_size" if (what == "h0" and spec.proj_size) else "hidden_size"
        if s.dim() != (2 if unbatched else 3):
            dims = [t.dim() if isinstance(t, Tensor) else 0 for t in states]
            torch_says = _torch_hx_dims_message(unbatched, dims)
        if unbatched:
            if s.dim() != 2:
                raise RNNInputError(
                    f"{name}: unbatched 2-D input needs a 2-D {what} "
                    f"(num_layers * num_directions, {feature}); got a {s.dim()}-D {what} of "
                    f"shape {format_shape(s)}" + torch_says
                )
            expected = (rows, size)
            layout = f"(num_layers * num_directions, {feature})"
        else:
            if s.dim() != 3:
                kind = "packed input" if packed else "batched 3-D input"
                raise RNNInputError(
                    f"{name}: {kind} needs a 3-D {what} (num_layers * num_directions, batch, "
                    f"{feature}); got a {s.dim()}-D {what} of shape {format_shape(s)}" + torch_says
                )
            expected = (rows, batch, size)
            layout = f"(num_layers * num_directions, batch, {feature})"
        if tuple(s.shape) != expected:
            # torch.nn compares the batched shapes (it adds the batch axis first).
            label = f"hidden[{index}]" if is_lstm else "hidden"
            batched = (rows, 1, size) if unbatched else expected
            got = [*s.shape[:1], 1, *s.shape[1:]] if unbatched else list(s.shape)
            raise RNNInputError(
                f"{name}: {what} has shape {format_shape(s)}; "
                f"expected {layout} = {format_shape(expected)}"
                + as_torch_says(f"Expected {label} size {batched}, got {got}")
            )
        out.append(s.unsqueeze(1) if unbatched else s)
    return out


def _torch_hx_dims_message(unbatched: bool, dims: list[int]) -> str:
    kind = "unbatched 2-D" if unbatched else "batched 3-D"
    want = "2-D" if unbatched else "3-D"
    if len(dims) == 2:
        got = f"({dims[0]}-D, {dims[1]}-D) tensors"
        return as_torch_says(f"For {kind} input, hx and cx should also be {want} but got {got}")
    return as_torch_says(f"For {kind} input, hx should also be {want} but got {dims[0]}-D tensor")


def _torch_cell_state_message(
    name: str, index: int, s: Tensor, batch: int, size: int, states: int, unbatched: bool
) -> str:
    if s.dim() not in (1, 2):
        what = f"hx[{index}]" if states == 2 else "hidden"
        return as_torch_says(f"{name}: Expected {what} to be 1D or 2D, got {s.dim()}D instead")
    # torch.nn unsqueezes the state of an unbatched input, whatever its own dimensions: a 2-D
    # state then reads as (1, rows, size), and its second size is checked as the hidden size.
    shape = (1, *s.shape) if unbatched else tuple(s.shape)
    if shape[0] != batch:
        return as_torch_says(
            f"Input batch size {batch} doesn't match hidden{index} batch size {shape[0]}"
        )
    if len(shape) < 2:  # a 1-D state of a batch as long as the batch: no second size to read
        return as_torch_says(
            "Dimension out of range (expected to be in range of [-1, 0], but got 1)"
        )
    return as_torch_says(
        f"hidden{index} has inconsistent hidden_size: got {shape[1]}, expected {size}"
    )


def prepare_cell_input(
    name: str,
    input: object,
    hx: object,
    input_size: int,
    state_sizes: tuple[int, ...],
    param: Tensor | None,
) -> tuple[Tensor, tuple[Tensor, ...], bool]:
    """Validate a cell's ``(input, hx)``; returns 2-D input, 2-D states and whether unbatched."""
    x = _check_tensor(name, "input", input, None)
    if x.dim() not in (1, 2):
        raise RNNInputError(
            f"{name}: input must be 2-D (batch, input_size) or 1-D (input_size,); got a "
            f"{x.dim()}-D tensor of shape {format_shape(x)}"
            + as_torch_says(f"{name}: Expected input to be 1D or 2D, got {x.dim()}D instead")
        )
    unbatched = x.dim() == 1
    if unbatched:
        x = x.unsqueeze(0)
    if x.shape[1] != input_size:
        raise RNNInputError(
            f"{name}: input has {x.shape[1]} features but input_size={input_size}"
            + as_torch_says(
                f"input has inconsistent input_size: got {x.shape[1]} expected {input_size}"
            )
        )
    batch = x.shape[0]
    names = ("h", "c")[: len(state_sizes)]
    if hx is None:
        check_against_parameters(name, x, param)
        return x, tuple(x.new_zeros(batch, size) for size in state_sizes), unbatched
    if len(state_sizes) == 2:
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            got = type(hx).__name__
            if isinstance(hx, (tuple, list)):
                got = f"a {got} of length {len(hx)}"
            raise RNNInputError(f"{name}: hx must be a tuple (h, c); got {got}")
        states = list(hx)
    else:
        if not isinstance(hx, Tensor):
            raise RNNInputError(f"{name}: hx must be a Tensor; got {type(hx).__name__}")
        states = [hx]
    out = []
    # Shapes before dtypes, in torch.nn's order for the cells.
    for index, (what, s, size) in enumerate(zip(names, states, state_sizes, strict=False)):
        s = _check_tensor(name, what, s, None)
        expected = (size,) if unbatched else (batch, size)
        if tuple(s.shape) != expected:
            layout = "(hidden_size,)" if unbatched else "(batch, hidden_size)"
            raise RNNInputError(
                f"{name}: {what} has shape {format_shape(s)}; "
                f"expected {layout} = {format_shape(expected)}"
                + _torch_cell_state_message(
                    name, index, s, batch, size, len(state_sizes), unbatched
                )
            )
        out.append(s.unsqueeze(0) if unbatched else s)
    check_against_parameters(name, x, param)
    for what, s in zip(names, out, strict=False):
        _check_tensor(name, what, s, x)
    return x, tuple(out), unbatched
