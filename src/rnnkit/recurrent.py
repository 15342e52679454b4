"""``Recurrent``: any user cell run with the layer features of the built-in layers.

A cell is an ``nn.Module`` whose ``forward(x, state)`` takes ``x`` ``(B, I)`` and returns
``(y, state)``, ``y`` ``(B, H)``; the state is a tensor or a tuple of tensors, each ``(B, *)``.
``Recurrent`` makes one cell per layer and direction and runs them with ``scan.stack``, the loop
that the reference engine runs on, so stacking, directions, packed and unbatched input and ``hx``
behave exactly as in ``rnnkit.LSTM``.
"""

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnkit.scan import Carry, Step, stack
from rnnkit.validation import check_constructor, prepare_sequence_input, prepare_states

NAME = "Recurrent"


class Recurrent(nn.Module):
    """Any cell as a multi-layer, optionally bidirectional recurrent layer with torch.nn's contract.

    ``cell_factory(input_size, hidden_size)`` returns an ``nn.Module`` and is called once per
    layer and direction in torch.nn's order (layer by layer, forward before reverse); the cells
    live in ``self.cells``, index ``layer * num_directions + direction``. Layer 0's cells get
    ``input_size`` features, the others ``num_directions * hidden_size``: a cell's output ``y``
    must have ``hidden_size`` features (checked at run time).

    A cell has ``forward(x, state) -> (y, state)`` with ``x`` ``(B, I)``, ``y`` ``(B, H)`` and the
    state a tensor or a tuple of tensors, each ``(B, *)``, given back in the form it came. Its
    optional ``initial_state(batch_size, device, dtype)`` gives the state used when ``hx`` is None
    (a tensor or a tuple); without one the state is a ``(B, hidden_size)`` zero tensor.

    ``forward(input, hx=None) -> (output, h_n)`` as in torch.nn: ``input`` ``(T, B, I)`` (or
    ``(B, T, I)`` with ``batch_first``), ``(T, I)`` unbatched, or a ``PackedSequence`` (output
    packed, ``h_n`` each sequence's own last state). ``output`` has ``num_directions * H``
    features. ``hx`` and ``h_n`` are ``(L * D, B, *)`` per state tensor (no batch dimension when
    unbatched): one tensor when the cell's state is a tensor, a tuple when it is a tuple, like
    LSTM's ``(h_n, c_n)``. ``dropout`` applies to the outputs of every layer but the last.

    ``compile=True`` runs each cell step through ``torch.compile`` (falling back to eager, with a
    warning, if compilation fails); the first call compiles (seconds to a minute). A compiled call
    costs tens of microseconds of overhead per step, so it pays only when a step has enough
    pointwise work to fuse: on a shared 2-core CPU, training a hand-written LSTM cell (B=16 to
    256, H=32 to 64) measured from 1.7x faster to 1.5x slower, and no faster under ``no_grad``.
    On CUDA, where fusing also saves kernel launches, it should help more (not measured yet).
    Each variant of a step (a new batch size, as packed input makes; inputs with and without
    ``requires_grad``) is one more compilation, and past torch's ``recompile_limit`` (8 per cell
    class) torch runs the remaining variants eagerly: same numbers, less speed. Measure on your
    own shapes.

    Example: a minimal GRU-like cell, run as two bidirectional layers.

        >>> import torch, rnnkit
        >>> from torch import nn
        >>> class MinimalGRU(nn.Module):
        ...     def __init__(self, input_size, hidden_size):
        ...         super().__init__()
        ...         self.x2zh = nn.Linear(input_size, 2 * hidden_size)
        ...         self.h2z = nn.Linear(hidden_size, hidden_size, bias=False)
        ...     def forward(self, x, h):
        ...         z_x, h_x = self.x2zh(x).chunk(2, dim=-1)
        ...         h = torch.lerp(h, torch.tanh(h_x), torch.sigmoid(z_x + self.h2z(h)))
        ...         return h, h
        >>> layer = rnnkit.Recurrent(MinimalGRU, 10, 20, num_layers=2, bidirectional=True)
        >>> output, h_n = layer(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 40]), torch.Size([4, 3, 20]))
    """

    def __init__(
        self,
        cell_factory: Callable[[int, int], nn.Module],
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bidirectional: bool = False,
        batch_first: bool = False,
        dropout: float = 0.0,
        *,
        compile: bool = False,
    ) -> None:
        super().__init__()
        check_constructor(NAME, input_size, hidden_size, num_layers, dropout)
        if not callable(cell_factory):
            raise TypeError(
                f"{NAME}: cell_factory must be callable as cell_factory(input_size, hidden_size); "
                f"got {type(cell_factory).__name__}"
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.use_compile = compile
        D = 2 if bidirectional else 1
        cells = []
        for layer in range(num_layers):
            for _ in range(D):
                cell = cell_factory(input_size if layer == 0 else D * hidden_size, hidden_size)
                if not isinstance(cell, nn.Module):
                    raise TypeError(
                        f"{NAME}: cell_factory must return an nn.Module; got {type(cell).__name__}"
                    )
                cells.append(cell)
        self.cells = nn.ModuleList(cells)
        # Compiled steps are built on first use and kept out of the module tree (and state_dict).
        self._compiled: dict[int, Callable] = {}
        self._compile_failed = False

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def forward(
        self, input: Tensor | PackedSequence, hx: Tensor | tuple[Tensor, ...] | None = None
    ) -> tuple[Tensor | PackedSequence, Tensor | tuple[Tensor, ...]]:
        param = next(self.parameters(), None)
        prepared = prepare_sequence_input(NAME, self.input_size, input, self.batch_first, param)
        x = prepared.x
        zeros, is_tuple = self._initial_states(prepared.batch, x.device, x.dtype)
        prepared.hx = prepare_states(NAME, hx, zeros, is_tuple, prepared)
        D = self.num_directions
        output, hn = stack(
            lambda layer, direction: self._step(layer * D + direction, is_tuple),
            x,
            prepared.hx,
            self.num_layers,
            D,
            self.dropout,
            self.training,
            prepared.batch_sizes,
        )
        output, hn = prepared.finish(output, hn)
        return output, (hn if is_tuple else hn[0])

    def _initial_states(
        self, batch: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[Carry, bool]:
        """Every cell's initial state stacked to ``(L * D, B, *)`` per state tensor, and whether
        the cells' state is a tuple."""
        per_cell = []
        for k, cell in enumerate(self.cells):
            init = getattr(cell, "initial_state", None)
            if init is None:
                state = torch.zeros(batch, self.hidden_size, device=device, dtype=dtype)
            else:
                state = init(batch, device, dtype)
            is_tuple = isinstance(state, (tuple, list))
            states = tuple(state) if is_tuple else (state,)
            if not states or any(
                not isinstance(s, Tensor) or s.dim() == 0 or s.shape[0] != batch for s in states
            ):
                raise TypeError(
                    f"{NAME}: cells[{k}].initial_state({batch}, ...) must return a tensor or a "
                    f"tuple of tensors, each (batch, *) = ({batch}, ...); got {_describe(state)}"
                )
            if per_cell and (is_tuple, _shapes(states)) != (
                per_cell[0][0],
                _shapes(per_cell[0][1]),
            ):
                raise TypeError(
                    f"{NAME}: cells[{k}]'s initial state is {_describe(state)} but cells[0]'s "
                    f"is {_describe(per_cell[0][1] if per_cell[0][0] else per_cell[0][1][0])}; "
                    f"hx stacks the states of all cells, so they must match"
                )
            per_cell.append((is_tuple, states))
        zeros = tuple(torch.stack(s) for s in zip(*(states for _, states in per_cell), strict=True))
        return zeros, per_cell[0][0]

    def _step(self, k: int, is_tuple: bool) -> Step:
        """The step of ``cells[k]`` in ``scan``'s form, checking what the cell returns."""
        run = self._runner(k)

        def step(x: Tensor, carry: Carry) -> tuple[Tensor, Carry]:
            y, state = run(x, carry if is_tuple else carry[0])
            new = _check_step(k, self.cells[k], x, carry, y, state, is_tuple, self.hidden_size)
            return y, new

        return step

    def _runner(self, k: int) -> Callable:
        cell = self.cells[k]
        if not self.use_compile or self._compile_failed:
            return cell
        if k not in self._compiled:
            self._compiled[k] = torch.compile(cell)
        compiled = self._compiled[k]

        def run(x: Tensor, state: object) -> object:
            if self._compile_failed:
                return cell(x, state)
            try:
                return compiled(x, state)
            except Exception as error:
                self._compile_failed = True
                warnings.warn(
                    f"{NAME}: torch.compile failed on cells[{k}] ({type(cell).__name__}); "
                    f"running the cells eagerly from now on. The error: "
                    f"{type(error).__name__}: {error}",
                    stacklevel=2,
                )
                return cell(x, state)

        return run

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.use_compile:
            s += ", compile=True"
        return s


def _check_step(
    k: int,
    cell: nn.Module,
    x: Tensor,
    carry: Carry,
    y: object,
    state: object,
    is_tuple: bool,
    hidden_size: int,
) -> Carry:
    """The new carry, after checking that ``cell`` returned ``(y, state)`` in the expected form."""
    who = f"{NAME}: cells[{k}] ({type(cell).__name__})"
    expected_y = (x.shape[0], hidden_size)
    if not isinstance(y, Tensor) or tuple(y.shape) != expected_y:
        raise ValueError(
            f"{who} returned y as {_describe(y)}; expected (batch, hidden_size) = "
            f"{expected_y}: Recurrent assumes a cell's output has hidden_size features (layer "
            f"l > 0 gets num_directions * hidden_size of them)"
        )
    if is_tuple != isinstance(state, (tuple, list)) or (is_tuple and len(state) != len(carry)):
        raise ValueError(
            f"{who} returned its state as {_describe(state)}; expected "
            f"{_describe(carry if is_tuple else carry[0])}, the form of the state it was given "
            f"(define initial_state when the state is not one (batch, hidden_size) tensor)"
        )
    new = tuple(state) if is_tuple else (state,)
    for i, (s, old) in enumerate(zip(new, carry, strict=True)):
        if not isinstance(s, Tensor) or s.shape != old.shape:
            what = f"state[{i}]" if is_tuple else "state"
            raise ValueError(
                f"{who} returned {what} as {_describe(s)}; expected shape "
                f"{tuple(old.shape)}, the shape of the state it was given"
            )
    return new


def _shapes(states: tuple[Tensor, ...]) -> list[tuple[int, ...]]:
    return [tuple(s.shape) for s in states]


def _describe(value: object) -> str:
    """``a tensor of shape (3, 7)``, ``a tuple of shapes ((3, 7), (3, 7))``, ``a NoneType``."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(
            str(tuple(v.shape)) if isinstance(v, Tensor) else type(v).__name__ for v in value
        )
        return f"a {type(value).__name__} of shapes ({inner})"
    return f"a {type(value).__name__}"
