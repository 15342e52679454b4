"""Deployment: rnnkit's layers under the tools made for torch.nn.

- ``torch.onnx.export``, ``torch.jit.trace`` and ``torch.export`` need no help from here:
  while a graph is recorded, ``rnnkit.engines.plan`` runs plain layers on torch's own kernels
  and variant layers on the reference engine.
- ``torch.jit.script`` cannot compile rnnkit's Python forward; :class:`TorchNNInterop` makes it
  say so once, with the two ways that work.
- torch's quantisation finds modules by their type (``type(m) is nn.LSTM``), so it skips rnnkit's;
  :class:`TorchNNInterop` warns when it touches one, and :func:`to_torch` converts first.
- :func:`to_torch` and :func:`from_torch` swap plain layers and cells for torch.nn's and back,
  sharing the same parameter tensors.
"""

import copy
import sys
import warnings
from collections.abc import Callable

from torch import nn

# Where the qconfig property below keeps its value.
_QCONFIG_KEY = "_rnnkit_qconfig"


def _quantisation_asks_for(torch_class: type | None) -> bool:
    """Whether the quantisation flow assigning a qconfig asks to quantise ``torch_class``: its
    ``qconfig_dict`` (torch's name, a local of the flow's propagate step) lists it. A spec of
    only ``nn.Linear`` does not; the default spec, and any flow whose spec cannot be found,
    count as asking, so the warning errs on the side of saying it."""
    frame = sys._getframe(2)
    while frame is not None:
        spec = frame.f_locals.get("qconfig_dict")
        if isinstance(spec, dict):
            return torch_class in spec
        frame = frame.f_back
    return True


class TorchNNInterop:
    """What rnnkit's layers and cells add so that torch's tools for torch.nn fail loudly
    instead of silently: a mixin of ``RNNBase`` and ``RNNCellBase``."""

    def __prepare_scriptable__(self) -> nn.Module:
        # torch.jit.script calls this on the module and every submodule before compiling.
        name = type(self).__name__
        raise RuntimeError(
            f"torch.jit.script cannot compile rnnkit.{name}: its forward is Python (rnnkit's "
            "validation and engines) outside TorchScript's subset. Use "
            "torch.jit.trace(model, example_inputs), which records torch's own kernels, or "
            "script torch.nn's class: torch.jit.script(rnnkit.to_torch(model)) (plain layers "
            "and cells; one with variants such as layer_norm can only be traced)"
        )

    # torch.ao.quantization (quantize_dynamic, prepare) assigns ``qconfig`` to every submodule
    # it walks, then swaps only those whose exact type it knows: this is the one place where an
    # rnnkit layer sees it go by.
    @property
    def qconfig(self):
        try:
            return self.__dict__[_QCONFIG_KEY]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no qconfig") from None

    @qconfig.setter
    def qconfig(self, value) -> None:
        name = type(self).__name__
        if _quantisation_asks_for(getattr(nn, name, None)):
            warnings.warn(
                f"torch.ao.quantization leaves rnnkit.{name} unquantised: it finds modules by "
                f"type, and rnnkit.{name} is not torch.nn.{name}. Convert plain layers first "
                "with rnnkit.to_torch(model) (same weights, same numbers), then quantise",
                UserWarning,
                stacklevel=3,
            )
        self.__dict__[_QCONFIG_KEY] = value

    @qconfig.deleter
    def qconfig(self) -> None:
        self.__dict__.pop(_QCONFIG_KEY, None)


def _torch_classes() -> dict[type, type]:
    """rnnkit's plain classes and their torch.nn twins (exact classes)."""
    # Imported here: layers.py imports this module for TorchNNInterop.
    from rnnkit import layers

    return {
        layers.RNN: nn.RNN,
        layers.LSTM: nn.LSTM,
        layers.GRU: nn.GRU,
        layers.RNNCell: nn.RNNCell,
        layers.LSTMCell: nn.LSTMCell,
        layers.GRUCell: nn.GRUCell,
    }


def _why_not_plain(module: nn.Module) -> str | None:
    """The options of an rnnkit layer or cell that torch.nn's class lacks, or None."""
    if getattr(module, "layer_norm", False) is True:
        return "layer_norm=True"
    variants = getattr(module, "variants", None)
    if variants is None:
        return None
    default = type(variants)()
    # forget_bias only sets the initial biases: a trained layer with it is a plain one.
    extra = [
        f"{field}={value!r}"
        for field, value in vars(variants).items()
        if field != "forget_bias" and value != getattr(default, field)
    ]
    return ", ".join(extra) or None


def _constructor_args(module: nn.Module) -> dict[str, object]:
    """The torch.nn constructor arguments that both libraries' modules keep as attributes."""
    names = ["input_size", "hidden_size", "bias"]
    if hasattr(module, "num_layers"):
        names += ["num_layers", "batch_first", "dropout", "bidirectional"]
    if getattr(module, "proj_size", 0):
        names.append("proj_size")
    if hasattr(module, "nonlinearity"):
        names.append("nonlinearity")
    return {name: getattr(module, name) for name in names}


def _rebuild(source: nn.Module, target_cls: type, **extra: object) -> nn.Module:
    """``target_cls`` with ``source``'s arguments, holding ``source``'s parameter tensors."""
    params = dict(source.named_parameters(recurse=False))
    # Built on the meta device, so nothing is allocated or initialised only to be replaced.
    target = target_cls(**_constructor_args(source), device="meta", **extra)
    names = dict(target.named_parameters(recurse=False)).keys()
    if names != params.keys():
        raise RuntimeError(
            f"{type(source).__name__} -> {target_cls.__name__}: parameters differ "
            f"({sorted(params)} vs {sorted(names)})"
        )
    for name, p in params.items():
        setattr(target, name, p)
    if hasattr(target, "flatten_parameters"):
        # torch.nn.LSTM on CUDA wants cuDNN's flat buffer (a no-op on the CPU).
        target.flatten_parameters()
    return target.train(source.training)


def _swap(module: nn.Module, convert: Callable, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:
        return memo[id(module)]
    new = convert(module)
    if new is None:
        for name, child in module.named_children():
            swapped = _swap(child, convert, memo)
            if swapped is not child:
                setattr(module, name, swapped)
        new = module
    memo[id(module)] = new
    return new


def to_torch(module: nn.Module, *, inplace: bool = False) -> nn.Module:
    """``module`` with every plain rnnkit ``RNN``, ``LSTM``, ``GRU``, ``RNNCell``, ``LSTMCell``
    and ``GRUCell`` inside it (or ``module`` itself) replaced by torch.nn's class.

    The torch.nn module holds the same parameter tensors (so the same device, dtype and
    ``requires_grad``), the same arguments and training mode, and computes the same numbers.
    As ``torch.ao.quantization.fuse_modules``, it works on a deep copy unless ``inplace=True``
    (then the parameters are the very ones an optimizer may hold). Layers with variants
    (layer_norm, zoneout, ...) have no torch.nn twin: they stay, with a warning that names them.
    This is the documented way to ``torch.ao.quantization.quantize_dynamic`` and to
    ``torch.jit.script`` a model. Exact classes only: a subclass may have changed ``forward``.

    Example:
        >>> import torch, rnnkit
        >>> model = torch.nn.Sequential(rnnkit.GRU(4, 8))
        >>> type(rnnkit.to_torch(model)[0])
        <class 'torch.nn.modules.rnn.GRU'>
        >>> type(model[0])  # a copy was converted, not the model
        <class 'rnnkit.layers.GRU'>
    """
    twins = _torch_classes()

    def convert(m: nn.Module) -> nn.Module | None:
        if type(m) not in twins:
            return None
        why = _why_not_plain(m)
        if why is not None:
            warnings.warn(
                f"rnnkit.to_torch keeps rnnkit.{type(m).__name__} ({why}): "
                f"torch.nn.{type(m).__name__} has no such option",
                UserWarning,
                stacklevel=4,
            )
            return None
        return _rebuild(m, twins[type(m)])

    return _swap(module if inplace else copy.deepcopy(module), convert, {})


def from_torch(module: nn.Module, *, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """The reverse of :func:`to_torch`: every ``torch.nn.RNN``, ``LSTM``, ``GRU``, ``RNNCell``,
    ``LSTMCell`` and ``GRUCell`` inside ``module`` (or ``module`` itself) becomes rnnkit's, on
    ``backend`` (layers only; cells have one implementation), holding the same parameters.
    A deep copy unless ``inplace=True``; exact classes only, so quantized and user subclasses
    stay as they are.

    Example:
        >>> import torch, rnnkit
        >>> type(rnnkit.from_torch(torch.nn.LSTM(4, 8)))
        <class 'rnnkit.layers.LSTM'>
    """
    twins = {torch_cls: ours for ours, torch_cls in _torch_classes().items()}

    def convert(m: nn.Module) -> nn.Module | None:
        if type(m) not in twins:
            return None
        extra = {"backend": backend} if hasattr(m, "num_layers") else {}
        return _rebuild(m, twins[type(m)], **extra)

    return _swap(module if inplace else copy.deepcopy(module), convert, {})
