"""int8 inference for recurrent layers: :func:`quantize` turns every rnnkit (or torch.nn) RNN,
LSTM, GRU and cell in a model into its int8 twin, in the spirit of torch's
``quantize_dynamic``: weights int8 with a scale per output row, activations quantized per row at
run time, int32 products, gate math in float32 (``rnnkit.engines.native.int8``).

The twins keep their float layer's contract (arguments, shapes, ``hx``, ``batch_first``,
``PackedSequence``, the variants in eval) and its parameter names, now buffers: each weight
``weight_ih_l0`` becomes int8 with a float32 ``weight_ih_l0_scale`` beside it, and biases, layer
norms and learned initial states stay float32. So ``state_dict()`` and safetensors hold a
quantized model as they hold a float one.

Example:
    >>> import torch, rnnkit
    >>> model = torch.nn.Sequential(rnnkit.LSTM(8, 32, batch_first=True))
    >>> qmodel = rnnkit.quantize(model)
    >>> type(qmodel[0]).__name__
    'QuantizedLSTM'
    >>> qmodel[0].weight_hh_l0.dtype, qmodel[0].weight_hh_l0_scale.shape
    (torch.int8, torch.Size([128]))
    >>> x = torch.randn(2, 5, 8)
    >>> out, _ = qmodel(x)
    >>> with torch.no_grad():
    ...     expected, _ = model(x)
    >>> float((out - expected).abs().max()) < 0.05  # int8 rounding, not an error
    True
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnkit.engines.native import int8
from rnnkit.engines.spec import LayerSpec, StepVariants
from rnnkit.params import param_suffix
from rnnkit.validation import RNNInputError, prepare_cell_input, prepare_layer_input
from rnnkit.variants import Variants, draw_step_variants

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


def _float_copy(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True)


class _Int8Module(nn.Module):
    """What the int8 twins share: the weights as int8 buffers with scales, packed for the
    kernels on first use (and again whenever a buffer changes, as ``load_state_dict`` does)."""

    def _add_weight(self, name: str, w: Tensor) -> None:
        q, scale = int8.quantize_rows(w.detach().to("cpu"))
        self.register_buffer(name, q)
        self.register_buffer(name + "_scale", scale)

    def _matrix(self, name: str, gates: int) -> int8.Int8Matrix:
        q, scale = getattr(self, name), self._float(name + "_scale")
        for what, t in ((name, q), (name + "_scale", scale)):
            if t.device.type != "cpu":
                raise RuntimeError(f"{self._name}: int8 layers run on the CPU; {what} is on "
                                   f"{t.device}")  # fmt: skip
        return self._cached(name, (q, scale), lambda: int8.pack(q, scale, gates,
                                                                f"{self._name}.{name}"))

    def _cached(self, name: str, tensors, make):
        """``make()``, kept under ``name`` while ``tensors`` hold what they held when it was
        made (the same tensors, data pointers and versions). Tensors made under
        ``torch.inference_mode`` keep no version, so a change in place would go unseen: with
        one among ``tensors``, ``make()`` runs on every call."""
        if any(t.is_inference() for t in tensors):
            return make()
        key = tuple((id(t), t.data_ptr(), t._version) for t in tensors)
        cache = self.__dict__.setdefault("_packed", {})
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, make())
        return cache[name][1]

    def _float(self, name: str) -> Tensor | None:
        t = getattr(self, name, None)
        if t is not None and t.dtype != torch.float32:
            raise RuntimeError(f"{self._name}: {name} must stay float32 (the int8 layers compute "
                               f"in float32); got {t.dtype}")  # fmt: skip
        return t

    @property
    def _name(self) -> str:
        return type(self).__name__

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_packed", None)
        if isinstance(state.get("variants"), Variants):
            state["variants"] = dataclasses.asdict(state["variants"])
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("variants"), dict):
            state = {**state, "variants": Variants(**state["variants"])}
        super().__setstate__(state)

    def _apply(self, fn, recurse=True):
        # .to(device), .cuda(), .half() change the buffers: the packed copies are stale.
        self.__dict__.pop("_packed", None)
        return super()._apply(fn, recurse)


class QuantizedRNNBase(_Int8Module):
    """The int8 twin of an RNN, LSTM or GRU layer (rnnkit's or torch.nn's); made by
    :func:`quantize`. Inference only: it computes as its layer does in eval mode, whatever
    ``training`` says, and nothing it returns has a gradient."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.mode = layer.mode
        self.input_size = layer.input_size
        self.hidden_size = layer.hidden_size
        self.num_layers = layer.num_layers
        self.bias = bool(layer.bias)
        self.batch_first = bool(layer.batch_first)
        self.bidirectional = bool(layer.bidirectional)
        self.proj_size = int(getattr(layer, "proj_size", 0) or 0)
        self.variants = copy.copy(getattr(layer, "variants", None) or Variants())
        self._flat_weights_names = list(layer._flat_weights_names)
        for name in self._flat_weights_names:
            w = getattr(layer, name)
            if name.startswith("weight_"):
                self._add_weight(name, w)
            else:
                self.register_buffer(name, _float_copy(w))
        for name, p in layer.named_parameters(recurse=False):
            if name.startswith("ln_") or name in ("init_h", "init_c"):
                self.register_buffer(name, _float_copy(p))

    def _spec(self) -> LayerSpec:
        D = 2 if self.bidirectional else 1
        return LayerSpec(self.mode, self.input_size, self.hidden_size, self.num_layers, D,
                         self.bias, 0.0, self.proj_size)  # fmt: skip

    def _weights(self) -> list[int8.Int8Weights]:
        # Checked and packed once per state of the buffers (about 12 us a call otherwise).
        buffers = [t for t in self._buffers.values() if t is not None]
        return self._cached("<weights>", buffers, self._pack_weights)

    def _pack_weights(self) -> list[int8.Int8Weights]:
        gates, out = _GATES[self.mode], []
        for layer in range(self.num_layers):
            for direction in range(2 if self.bidirectional else 1):
                s = param_suffix(layer, direction)
                b_ih = self._float("bias_ih" + s) if self.bias else None
                b_hh = self._float("bias_hh" + s) if self.bias else None
                if b_ih is not None and self.mode != "GRU":
                    # LSTM and RNN add the two biases: summed once here, not every call.
                    b_ih, b_hh = b_ih + b_hh, None
                out.append((
                    self._matrix("weight_ih" + s, gates),
                    self._matrix("weight_hh" + s, gates),
                    b_ih,
                    b_hh,
                    self._matrix("weight_hr" + s, 1) if self.proj_size else None,
                ))  # fmt: skip
        return out

    def _layer_norm_params(self) -> list[tuple[Tensor, ...]]:
        parts = ("ih", "hh", "c") if self.mode == "LSTM" else ("ih", "hh")
        return [
            tuple(self._float(f"ln_{part}_{kind}{param_suffix(layer, direction)}")
                  for part in parts for kind in ("weight", "bias"))
            for layer in range(self.num_layers)
            for direction in range(2 if self.bidirectional else 1)
        ]  # fmt: skip

    def _run(self, input: Tensor | PackedSequence, hx: object) -> tuple[object, tuple]:
        spec, v, name = self._spec(), self.variants, self._name
        data = input.data if isinstance(input, PackedSequence) else input
        if isinstance(data, Tensor) and data.device.type != "cpu":
            raise RNNInputError(f"{name}: int8 layers run on the CPU; got input on {data.device}")
        weights = self._weights()
        prepared = prepare_layer_input(name, spec, input, hx, self.batch_first,
                                       weights[0][0].scale)  # fmt: skip
        x = prepared.x
        batch = prepared.hx[0].shape[1]
        if hx is None and v.learn_init:
            inits = (self.init_h, self.init_c) if self.mode == "LSTM" else (self.init_h,)
            prepared.hx = tuple(s.unsqueeze(1).expand(-1, batch, -1) for s in inits)
        variants = None
        if v.per_step:
            variants = draw_step_variants(
                v, self._layer_norm_params() if v.layer_norm else None, x, batch, len(weights),
                spec.out_size, self.hidden_size, self.mode == "LSTM", training=False,
            )  # fmt: skip
        if batch == 0:
            # No sequences: empty outputs of the right shapes, as torch.nn gives.
            D = spec.num_directions
            output = x.new_empty(*x.shape[:-1], D * spec.out_size)
            return prepared.finish(output, tuple(s.clone() for s in prepared.hx))
        with torch.no_grad():
            output, hn = int8.run(spec, x, prepared.hx, weights, prepared.batch_sizes, variants)
        return prepared.finish(output, hn)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        for flag in ("batch_first", "bidirectional"):
            if getattr(self, flag):
                s += f", {flag}=True"
        if not self.bias:
            s += ", bias=False"
        if self.mode == "RNN_RELU":
            s += ", nonlinearity='relu'"
        changed = {k: v for k, v in dataclasses.asdict(self.variants).items()
                   if v != getattr(Variants(), k)}  # fmt: skip
        s += "".join(f", {k}={v!r}" for k, v in changed.items())
        return s + ", dtype=int8"


class QuantizedRNN(QuantizedRNNBase):
    """int8 ``RNN``: ``forward(input, hx=None) -> (output, h_n)``."""

    def forward(self, input: Tensor | PackedSequence, hx: Tensor | None = None):
        output, (hn,) = self._run(input, hx)
        return output, hn


class QuantizedLSTM(QuantizedRNNBase):
    """int8 ``LSTM``: ``forward(input, hx=None) -> (output, (h_n, c_n))``."""

    def forward(self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None):
        output, (hn, cn) = self._run(input, hx)
        return output, (hn, cn)


class QuantizedGRU(QuantizedRNNBase):
    """int8 ``GRU``: ``forward(input, hx=None) -> (output, h_n)``."""

    def forward(self, input: Tensor | PackedSequence, hx: Tensor | None = None):
        output, (hn,) = self._run(input, hx)
        return output, hn


class QuantizedCellBase(_Int8Module):
    """The int8 twin of an RNNCell, LSTMCell or GRUCell (rnnkit's or torch.nn's): one step of
    the int8 loop. Inference only, as :class:`QuantizedRNNBase`."""

    def __init__(self, cell: nn.Module, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.input_size = cell.input_size
        self.hidden_size = cell.hidden_size
        self.bias = cell.bias_ih is not None
        self.layer_norm = bool(getattr(cell, "layer_norm", False))
        self._ln_names = list(getattr(cell, "_ln_names", []))
        gates = _GATES[mode]
        self._add_weight("weight_ih", cell.weight_ih)
        self._add_weight("weight_hh", cell.weight_hh)
        for name in ("bias_ih", "bias_hh", *self._ln_names):
            t = getattr(cell, name)
            self.register_buffer(name, None if t is None else _float_copy(t))
        self._gates = gates

    def _step(self, input: Tensor, hx: object, states: int) -> tuple[tuple[Tensor, ...], bool]:
        name = self._name
        if isinstance(input, Tensor) and input.device.type != "cpu":
            raise RNNInputError(f"{name}: int8 layers run on the CPU; got input on {input.device}")
        w_ih = self._matrix("weight_ih", self._gates)
        x, hs, unbatched = prepare_cell_input(name, input, hx, self.input_size,
                                              (self.hidden_size,) * states, w_ih.scale)  # fmt: skip
        if x.shape[0] == 0:
            return tuple(h.clone() for h in hs), unbatched
        weights = (w_ih, self._matrix("weight_hh", self._gates), self._float("bias_ih"),
                   self._float("bias_hh"), None)  # fmt: skip
        v = None
        if self.layer_norm:
            v = StepVariants(tuple(self._float(n) for n in self._ln_names))
        with torch.no_grad():
            _, h, c = int8.run_layer(self.mode, False, (x.shape[0],), x.contiguous(), hs[0],
                                     hs[1] if states == 2 else None, *weights, v)  # fmt: skip
        out = (h, c) if states == 2 else (h,)
        return tuple(t.squeeze(0) for t in out) if unbatched else out, unbatched

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            s += ", bias=False"
        if self.mode == "RNN_RELU":
            s += ", nonlinearity='relu'"
        if self.layer_norm:
            s += ", layer_norm=True"
        return s + ", dtype=int8"


class QuantizedRNNCell(QuantizedCellBase):
    """int8 ``RNNCell``: ``forward(input, hx=None) -> h'``."""

    def __init__(self, cell: nn.Module) -> None:
        relu = getattr(cell, "nonlinearity", "tanh") == "relu"
        super().__init__(cell, "RNN_RELU" if relu else "RNN_TANH")

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        (h,), _ = self._step(input, hx, 1)
        return h


class QuantizedLSTMCell(QuantizedCellBase):
    """int8 ``LSTMCell``: ``forward(input, hx=None) -> (h', c')``."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__(cell, "LSTM")

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        (h, c), _ = self._step(input, hx, 2)
        return h, c


class QuantizedGRUCell(QuantizedCellBase):
    """int8 ``GRUCell``: ``forward(input, hx=None) -> h'``."""

    def __init__(self, cell: nn.Module) -> None:
        super().__init__(cell, "GRU")

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        (h,), _ = self._step(input, hx, 1)
        return h


QUANTIZED = (QuantizedRNNBase, QuantizedCellBase)


def _twin(module: nn.Module) -> nn.Module | None:
    """The int8 twin of a recurrent layer or cell, or None for any other module."""
    from rnnkit import layers

    if isinstance(module, (layers.RNNBase, nn.RNNBase)):
        cls = {"LSTM": QuantizedLSTM, "GRU": QuantizedGRU}.get(module.mode, QuantizedRNN)
        return cls(module)
    if isinstance(module, (layers.LSTMCell, nn.LSTMCell)):
        return QuantizedLSTMCell(module)
    if isinstance(module, (layers.GRUCell, nn.GRUCell)):
        return QuantizedGRUCell(module)
    if isinstance(module, (layers.RNNCell, nn.RNNCell)):
        return QuantizedRNNCell(module)
    return None


def _check_quantizable(module: nn.Module, where: str) -> None:
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.device.type != "cpu":
            raise RuntimeError(f"rnnkit.quantize: int8 layers run on the CPU, but {where}{name} "
                               f"is on {t.device}; move the model to the CPU first")  # fmt: skip
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"rnnkit.quantize: {where}{name} holds NaN or infinity")
    for name in ("input_size", "hidden_size", "proj_size"):
        size = getattr(module, name, 0) or 0
        if size < 1 and name != "proj_size":
            # torch.nn's cells take a size of 0; an int8 row of no weights has no scale.
            what = where or f"{type(module).__name__}."
            raise ValueError(f"rnnkit.quantize: int8 layers and cells need {name} of at least "
                             f"1; {what}{name} is {size}")  # fmt: skip
        if size > int8.MAX_COLUMNS:
            raise ValueError(f"rnnkit.quantize: int8 layers take {name} up to "
                             f"{int8.MAX_COLUMNS}; {where or 'the layer'} has {size}")  # fmt: skip


def quantize(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``model`` with every recurrent layer and cell (``rnnkit``'s and ``torch.nn``'s RNN, LSTM,
    GRU, RNNCell, LSTMCell, GRUCell, with their variants) replaced by its int8 twin; other
    modules unchanged. A copy unless ``inplace`` (a layer or cell itself can only be copied).

    int8 layers run on the CPU through the native engine, on every x86-64 CPU (AVX-512 VNNI,
    AVX2, or plain C: the same integer products; the float32 gate math around them can round
    differently per build); where that engine cannot be built, this raises instead of returning
    a model that would give wrong numbers or none.

    Raises:
        RuntimeError: the native engine is unavailable, or a layer is not on the CPU.
        ValueError: a weight is not finite, or a size is 0 or over ``int8.MAX_COLUMNS``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"rnnkit.quantize: expected a torch.nn.Module; got {type(model).__name__}")
    reason = int8.unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"rnnkit.quantize: int8 layers cannot run here: {reason}")
    if _recurrent(model):
        _check_quantizable(model, "")
        return _twin(model)
    if not inplace:
        model = copy.deepcopy(model)
    for name, module in model.named_modules():
        if _recurrent(module):
            _check_quantizable(module, f"{name}.")
    _replace(model)
    return model


def _recurrent(module: nn.Module) -> bool:
    """Whether ``module`` is a float recurrent layer or cell that :func:`_twin` converts."""
    from rnnkit import layers

    return isinstance(module, (layers.RNNBase, nn.RNNBase, layers.RNNCellBase, nn.RNNCellBase))


def _replace(parent: nn.Module) -> None:
    for name, child in parent.named_children():
        twin = _twin(child)
        if twin is not None:
            setattr(parent, name, twin)
        elif not isinstance(child, QUANTIZED):
            _replace(child)


def is_quantized(model: nn.Module) -> bool:
    """Whether ``model`` holds an int8 layer or cell (or is one)."""
    return any(isinstance(m, QUANTIZED) for m in model.modules())
