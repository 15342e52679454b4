"""RNN, LSTM, GRU and their cells: torch.nn's contract, rnnkit's engines.

Modules own their parameters (torch.nn's names, shapes, registration order and initialisation, so
state dicts move both ways and a seeded layer holds the same weights as torch.nn's), validate
once through ``rnnkit.validation`` and hand the computation to an engine.
"""

import dataclasses
import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnkit import engines
from rnnkit import functional as F
from rnnkit.deploy import TorchNNInterop
from rnnkit.engines import shared
from rnnkit.engines.spec import LayerSpec, StepVariants, Weights
from rnnkit.params import param_suffix
from rnnkit.validation import (
    check_cell_constructor,
    check_constructor,
    prepare_cell_input,
    prepare_layer_input,
)
from rnnkit.variants import Variants, draw_step_variants
from rnnkit.variants import gru_cell as gru_variant_cell
from rnnkit.variants import lstm_cell as lstm_variant_cell


class RNNBase(TorchNNInterop, nn.Module):
    """The base class of ``RNN``, ``LSTM`` and ``GRU``, as ``torch.nn.RNNBase`` is of
    torch.nn's: build those, and test for this one where code tests for torch.nn's, e.g. an
    initialisation function given to ``model.apply``::

        if isinstance(m, (torch.nn.RNNBase, rnnkit.RNNBase)):
            for name, p in m.named_parameters():
                if "weight_hh" in name:
                    torch.nn.init.orthogonal_(p)

    rnnkit's layers are not torch.nn's subclasses (``torch.compile`` refuses to trace into an
    ``nn.LSTM``, where rnnkit's compile whole, and ``nn.RNNBase`` would bring its flat-weight
    machinery for cuDNN), so ``isinstance(m, torch.nn.RNNBase)`` alone passes them by."""

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
        variants: Variants | None = None,
    ) -> None:
        super().__init__()
        name = {"RNN_TANH": "RNN", "RNN_RELU": "RNN"}.get(mode, mode)
        self.variants = variants or Variants()
        self.variants.check(name, mode, bias)
        if proj_size and mode != "LSTM":
            raise ValueError(
                f"{name}: proj_size argument is only supported for LSTM, not RNN or GRU"
            )
        check_constructor(
            name, input_size, hidden_size, num_layers, dropout, proj_size, bias, batch_first
        )
        self.mode = mode
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.backend = engines.check_backend(name, backend)
        factory = {"device": device, "dtype": dtype}
        gate_size = self._spec().gates * hidden_size
        num_directions = 2 if bidirectional else 1
        real_hidden = proj_size or hidden_size
        self._flat_weights_names: list[str] = []
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            for direction in range(num_directions):
                layer_input = input_size if layer == 0 else real_hidden * num_directions
                suffix = param_suffix(layer, direction)
                shapes = [
                    ("weight_ih", (gate_size, layer_input)),
                    ("weight_hh", (gate_size, real_hidden)),
                ]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size:
                    shapes.append(("weight_hr", (proj_size, hidden_size)))
                names = []
                for base, shape in shapes:
                    self.register_parameter(
                        base + suffix, nn.Parameter(torch.empty(shape, **factory))
                    )
                    names.append(base + suffix)
                self._flat_weights_names.extend(names)
                self._all_weights.append(names)
        # Variant parameters come after torch.nn's, so that those draw the same random numbers.
        if self.variants.layer_norm:
            for layer in range(num_layers):
                for direction in range(num_directions):
                    suffix = param_suffix(layer, direction)
                    for part, size in self._layer_norm_parts():
                        for kind in ("weight", "bias"):
                            p = nn.Parameter(torch.empty(size, **factory))
                            self.register_parameter(f"ln_{part}_{kind}{suffix}", p)
        if self.variants.learn_init:
            rows = num_layers * num_directions
            self.init_h = nn.Parameter(torch.empty(rows, real_hidden, **factory))
            if mode == "LSTM":
                self.init_c = nn.Parameter(torch.empty(rows, hidden_size, **factory))
        self.reset_parameters()

    def __getstate__(self) -> dict:
        # The variants travel as a plain dict, so that a whole-model torch.load (weights_only)
        # needs only the layer's own class in safe_globals, as torch.nn's layers do.
        state = self.__dict__.copy()
        state["variants"] = dataclasses.asdict(self.variants)
        return state

    def __setstate__(self, state: dict) -> None:
        variants = state.get("variants")
        if isinstance(variants, dict):
            state = {**state, "variants": Variants(**variants)}
        super().__setstate__(state)

    def _layer_norm_parts(self) -> list[tuple[str, int]]:
        gates = self._spec().gates * self.hidden_size
        parts = [("ih", gates), ("hh", gates)]
        return [*parts, ("c", self.hidden_size)] if self.mode == "LSTM" else parts

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _spec(self) -> LayerSpec:
        return LayerSpec(
            mode=self.mode,
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_directions=2 if self.bidirectional else 1,
            bias=self.bias,
            dropout=self.dropout,
            proj_size=self.proj_size,
        )

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: U(-1/sqrt(H), 1/sqrt(H)) for every tensor, in order."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for name in self._flat_weights_names:
            nn.init.uniform_(getattr(self, name), -stdv, stdv)
        v = self.variants
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.startswith("ln_"):
                    p.fill_(1.0 if "_weight_" in name else 0.0)
                elif name in ("init_h", "init_c"):
                    p.zero_()
            if v.forget_bias is not None:
                H = self.hidden_size
                for name in self._flat_weights_names:
                    if name.startswith("bias_"):
                        getattr(self, name)[H : 2 * H] = v.forget_bias / 2

    def flatten_parameters(self) -> None:
        """Accepted for torch.nn compatibility; rnnkit needs no flat weight buffer."""

    @property
    def _flat_weights(self) -> list[Tensor]:
        """torch.nn's flat list of the layers' tensors, in ``_flat_weights_names`` order (read
        through getattr, so weight-norm parametrisations and functional_call are honoured)."""
        return [getattr(self, name) for name in self._flat_weights_names]

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    def _weights(self) -> list[Weights]:
        # Read through getattr on every call so that functional_call and .to() are honoured.
        out = []
        for layer in range(self.num_layers):
            for direction in range(2 if self.bidirectional else 1):
                suffix = param_suffix(layer, direction)
                out.append(
                    (
                        getattr(self, "weight_ih" + suffix),
                        getattr(self, "weight_hh" + suffix),
                        getattr(self, "bias_ih" + suffix) if self.bias else None,
                        getattr(self, "bias_hh" + suffix) if self.bias else None,
                        getattr(self, "weight_hr" + suffix) if self.proj_size else None,
                    )
                )
        return out

    def _run(self, input: Tensor | PackedSequence, hx: object) -> tuple[object, tuple[Tensor, ...]]:
        spec, v = self._spec(), self.variants
        weights = self._weights()
        prepared = prepare_layer_input(self._name, spec, input, hx, self.batch_first, weights[0][0])
        x = prepared.x
        if hx is None and v.learn_init:
            batch = prepared.hx[0].shape[1]
            inits = (self.init_h, self.init_c) if self.mode == "LSTM" else (self.init_h,)
            prepared.hx = tuple(s.unsqueeze(1).expand(-1, batch, -1) for s in inits)
        if v.weight_drop > 0 and self.training:
            weights = [
                (w_ih, nn.functional.dropout(w_hh, v.weight_drop), b_ih, b_hh, w_hr)
                for w_ih, w_hh, b_ih, b_hh, w_hr in weights
            ]
        tensors = [x, *prepared.hx, *(w for ws in weights for w in ws if w is not None)]
        plan = engines.plan(
            self._name,
            self.backend,
            spec,
            x.device,
            x.dtype,
            batch=prepared.batch,
            steps=prepared.steps,
            per_step=v.per_step,
            needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in tensors),
        )
        variants = None
        if v.per_step:
            variants = draw_step_variants(
                v,
                self._layer_norm_params() if v.layer_norm else None,
                x,
                prepared.hx[0].shape[1],
                len(weights),
                spec.out_size,
                self.hidden_size,
                self.mode == "LSTM",
                self.training,
            )
        output, hn = plan.run(
            spec, x, prepared.hx, weights, prepared.batch_sizes, self.training, variants
        )
        # Under CPU autocast, the dtypes torch.nn's kernels return (its GRU: float32 from a
        # float32 state), whichever engine ran.
        dtypes = shared.cpu_autocast_dtypes(self.mode, spec.proj_size > 0, x.device.type,
                                            prepared.hx)  # fmt: skip
        if dtypes is not None:
            output = output.to(dtypes[0])
            hn = tuple(s.to(d) for s, d in zip(hn, dtypes[1], strict=True))
        return prepared.finish(output, hn)

    def _layer_norm_params(self) -> list[tuple[Tensor, ...]]:
        """(g_ih, b_ih, g_hh, b_hh[, g_c, b_c]) of every layer and direction."""
        out = []
        for layer in range(self.num_layers):
            for direction in range(2 if self.bidirectional else 1):
                suffix = param_suffix(layer, direction)
                names = [
                    f"ln_{part}_{kind}{suffix}"
                    for part, _ in self._layer_norm_parts()
                    for kind in ("weight", "bias")
                ]
                out.append(tuple(getattr(self, name) for name in names))
        return out

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if self.batch_first is not False:
            s += f", batch_first={self.batch_first}"
        if self.dropout != 0:
            s += f", dropout={self.dropout}"
        if self.bidirectional is not False:
            s += f", bidirectional={self.bidirectional}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        for field, default in Variants().__dict__.items():
            value = getattr(self.variants, field)
            if value != default:
                s += f", {field}={value!r}"
        return s


_NOT_GIVEN = object()


def _refuse_proj_size(name: str, proj_size: object) -> None:
    # torch.nn's RNN and GRU take **kwargs and refuse proj_size with a ValueError, even 0.
    if proj_size is not _NOT_GIVEN:
        raise ValueError(f"{name}: proj_size argument is only supported for LSTM, not RNN or GRU")


class RNN(RNNBase):
    """Elman RNN, a drop-in for ``torch.nn.RNN``: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh).

    Arguments, shapes and parameters are torch.nn's; ``backend`` picks the engine.
    ``forward(input, hx=None) -> (output, h_n)``.

    Example:
        >>> import torch, rnnkit
        >>> rnn = rnnkit.RNN(10, 20, num_layers=2, nonlinearity="relu")
        >>> output, h_n = rnn(torch.randn(5, 3, 10))  # (T, B, I)
        >>> output.shape, h_n.shape  # (T, B, H), (L, B, H)
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
        proj_size: object = _NOT_GIVEN,
    ) -> None:
        _refuse_proj_size("RNN", proj_size)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"RNN: Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        self.nonlinearity = nonlinearity
        super().__init__(
            "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            device,
            dtype,
            backend=backend,
        )

    def forward(self, input: Tensor | PackedSequence, hx: Tensor | None = None):
        output, (hn,) = self._run(input, hx)
        return output, hn

    def extra_repr(self) -> str:
        # torch.nn.RNN leaves the nonlinearity out of its repr; rnnkit shows a non-default one.
        s = super().extra_repr()
        if self.nonlinearity != "tanh":
            s += f", nonlinearity={self.nonlinearity!r}"
        return s


class LSTM(RNNBase):
    """LSTM, a drop-in for ``torch.nn.LSTM`` (gate order i, f, g, o; optional projection).

    See ``rnnkit.functional.lstm_cell`` for the equations. Arguments, shapes and parameters are
    torch.nn's; ``backend`` picks the engine. ``forward(input, hx=None) -> (output, (h_n, c_n))``.

    Example:
        >>> import torch, rnnkit
        >>> lstm = rnnkit.LSTM(10, 20, num_layers=2, batch_first=True, bidirectional=True)
        >>> output, (h_n, c_n) = lstm(torch.randn(3, 5, 10))  # (B, T, I)
        >>> output.shape  # (B, T, D * H)
        torch.Size([3, 5, 40])
        >>> h_n.shape, c_n.shape  # (L * D, B, H) whatever batch_first says
        (torch.Size([4, 3, 20]), torch.Size([4, 3, 20]))
        >>> torch.equal(output[:, -1, :20], h_n[-2])  # the top layer's forward final state
        True
        >>> torch.equal(output[:, 0, 20:], h_n[-1])  # the backward one ends at step 0
        True
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
        layer_norm: bool = False,
        recurrent_dropout: float = 0.0,
        zoneout: float = 0.0,
        weight_drop: float = 0.0,
        learn_init: bool = False,
        forget_bias: float | None = None,
    ) -> None:
        variants = Variants(
            layer_norm, recurrent_dropout, zoneout, weight_drop, learn_init, forget_bias
        )
        super().__init__(
            "LSTM",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device,
            dtype,
            backend=backend,
            variants=variants,
        )

    def forward(self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None):
        output, (hn, cn) = self._run(input, hx)
        return output, (hn, cn)


class GRU(RNNBase):
    """GRU, a drop-in for ``torch.nn.GRU`` (gate order r, z, n).

    See ``rnnkit.functional.gru_cell`` for the equations. Arguments, shapes and parameters are
    torch.nn's; ``backend`` picks the engine. ``forward(input, hx=None) -> (output, h_n)``.

    Example:
        >>> import torch, rnnkit
        >>> gru = rnnkit.GRU(10, 20, layer_norm=True)  # a variant torch.nn lacks
        >>> output, h_n = gru(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([1, 3, 20]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        backend: str = "auto",
        layer_norm: bool = False,
        recurrent_dropout: float = 0.0,
        zoneout: float = 0.0,
        weight_drop: float = 0.0,
        learn_init: bool = False,
        proj_size: object = _NOT_GIVEN,
    ) -> None:
        _refuse_proj_size("GRU", proj_size)
        variants = Variants(layer_norm, recurrent_dropout, zoneout, weight_drop, learn_init)
        super().__init__(
            "GRU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            device,
            dtype,
            backend=backend,
            variants=variants,
        )

    def forward(self, input: Tensor | PackedSequence, hx: Tensor | None = None):
        output, (hn,) = self._run(input, hx)
        return output, hn


class RNNCellBase(TorchNNInterop, nn.Module):
    """The base class of ``RNNCell``, ``LSTMCell`` and ``GRUCell``, as
    ``torch.nn.RNNCellBase`` is of torch.nn's: torch.nn's parameters ``weight_ih``,
    ``weight_hh``, ``bias_ih``, ``bias_hh`` and initialisation. Test
    ``isinstance(m, (torch.nn.RNNCellBase, rnnkit.RNNCellBase))`` where code tests for
    torch.nn's cells (see :class:`RNNBase`)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool,
        num_chunks: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        layer_norm: bool = False,
        forget_bias: float | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_cell_constructor(name, input_size, hidden_size)
        bias = bool(bias)
        if forget_bias is not None and not bias:
            raise ValueError(f"{name}: forget_bias needs bias=True")
        if forget_bias is not None and (
            isinstance(forget_bias, bool)
            or not isinstance(forget_bias, (int, float))
            or not math.isfinite(forget_bias)
        ):
            raise ValueError(f"{name}: forget_bias must be a finite number, got {forget_bias!r}")
        if not isinstance(layer_norm, bool):
            got = type(layer_norm).__name__
            raise TypeError(f"{name}: layer_norm should be of type bool, got: {got}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.layer_norm = layer_norm
        self.forget_bias = forget_bias
        factory = {"device": device, "dtype": dtype}
        self.weight_ih = nn.Parameter(torch.empty(num_chunks * hidden_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(num_chunks * hidden_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(num_chunks * hidden_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        # Layer-norm gains and biases (rnnkit.variants), after torch.nn's parameters.
        self._ln_names: list[str] = []
        if layer_norm:
            parts = [("ih", num_chunks), ("hh", num_chunks)]
            if num_chunks == 4:
                parts.append(("c", 1))
            for part, chunks in parts:
                for kind in ("weight", "bias"):
                    p = nn.Parameter(torch.empty(chunks * hidden_size, **factory))
                    self.register_parameter(f"ln_{part}_{kind}", p)
                    self._ln_names.append(f"ln_{part}_{kind}")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn's U(-1/sqrt(H), 1/sqrt(H)) for its tensors; layer-norm gains 1, biases 0."""
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for name, weight in self.named_parameters():
            if name not in self._ln_names:
                nn.init.uniform_(weight, -stdv, stdv)
        with torch.no_grad():
            for name in self._ln_names:
                getattr(self, name).fill_(1.0 if "weight" in name else 0.0)
            if self.forget_bias is not None:
                H = self.hidden_size
                self.bias_ih[H : 2 * H] = self.forget_bias / 2
                self.bias_hh[H : 2 * H] = self.forget_bias / 2

    def _variants(self) -> StepVariants | None:
        if not self.layer_norm:
            return None
        return StepVariants(tuple(getattr(self, name) for name in self._ln_names))

    def _prepare(self, input: Tensor, hx: object, states: int):
        return prepare_cell_input(
            type(self).__name__,
            input,
            hx,
            self.input_size,
            (self.hidden_size,) * states,
            self.weight_ih,
        )

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.bias is not True:
            s += f", bias={self.bias}"
        if getattr(self, "nonlinearity", "tanh") != "tanh":
            s += f", nonlinearity={self.nonlinearity}"
        if self.layer_norm:
            s += ", layer_norm=True"
        if self.forget_bias is not None:
            s += f", forget_bias={self.forget_bias}"
        return s


class RNNCell(RNNCellBase):
    """One Elman RNN step, a drop-in for ``torch.nn.RNNCell``; see ``rnnkit.functional``.

    ``forward(input, hx=None) -> h'`` with input ``(B, I)`` or ``(I,)``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: str = "tanh",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"RNNCell: Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'."
            )
        self.nonlinearity = nonlinearity
        super().__init__(input_size, hidden_size, bias, 1, device, dtype)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, (h,), unbatched = self._prepare(input, hx, 1)
        cell = F.rnn_tanh_cell if self.nonlinearity == "tanh" else F.rnn_relu_cell
        h = cell(x, h, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h.squeeze(0) if unbatched else h


class LSTMCell(RNNCellBase):
    """One LSTM step, a drop-in for ``torch.nn.LSTMCell``; see ``rnnkit.functional.lstm_cell``.

    ``forward(input, hx=None) -> (h', c')`` with input ``(B, I)`` or ``(I,)``. Beyond torch.nn
    (off by default): ``layer_norm`` and ``forget_bias`` as on ``rnnkit.LSTM``
    (``rnnkit.variants``); the parameters are then named ``ln_ih_weight``, ``ln_c_bias``, ...

    Example:
        >>> import torch, rnnkit
        >>> cell = rnnkit.LSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10))  # one step of a batch of 3
        >>> h, c = cell(torch.randn(3, 10), (h, c))  # the next step
        >>> h.shape, c.shape
        (torch.Size([3, 20]), torch.Size([3, 20]))
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        layer_norm: bool = False,
        forget_bias: float | None = None,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, 4, device, dtype, layer_norm, forget_bias)

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        x, (h, c), unbatched = self._prepare(input, hx, 2)
        w = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        v = self._variants()
        if v is None:
            h, c = F.lstm_cell(x, h, c, *w)
        else:
            h, c = lstm_variant_cell(x, h, c, *w, None, v)
        return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)


class GRUCell(RNNCellBase):
    """One GRU step, a drop-in for ``torch.nn.GRUCell``; see ``rnnkit.functional.gru_cell``.

    ``forward(input, hx=None) -> h'`` with input ``(B, I)`` or ``(I,)``. Beyond torch.nn (off by
    default): ``layer_norm`` as on ``rnnkit.GRU`` (``rnnkit.variants``).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        layer_norm: bool = False,
    ) -> None:
        super().__init__(input_size, hidden_size, bias, 3, device, dtype, layer_norm)

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        x, (h,), unbatched = self._prepare(input, hx, 1)
        w = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        v = self._variants()
        h = F.gru_cell(x, h, *w) if v is None else gru_variant_cell(x, h, *w, v)
        return h.squeeze(0) if unbatched else h
