"""What a training task provides to the trainer: data, a loss, metrics, a report and predictions.

A task turns its files into three :class:`Split` s of tensors and a JSON-able ``preprocessing``
dict (vocabularies, class names, scaling: whatever ``predict`` needs to read new input the way the
training data was read). The trainer does the rest, the same for every task.
"""

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from rnnkit.train.objective import Objective


@dataclass
class Split:
    """One part of the data: inputs ``x`` (``(N, T, I)`` floats or ``(N, T)`` ids, padded),
    each sequence's length ``(N,)`` and the targets ``y``."""

    x: Tensor
    lengths: Tensor
    y: Tensor
    # where each row comes from in the task's data (forecast: the first target's time step)
    index: Tensor | None = None

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass
class Prepared:
    train: Split
    val: Split
    test: Split
    # ModelConfig fields that the data decide: kind, input_size, output_size, embedding_dim, ...
    model: dict
    preprocessing: dict
    notes: list[str] = field(default_factory=list)


class Task(Objective):
    """A task of ``rnnkit train``: its options and data, its objective (a loss, one metric, the
    test report and plots: :class:`~rnnkit.train.objective.Objective`) and its predictions."""

    name = ""
    help = ""
    variable_length = False
    # the targets have a time axis (tagging): batches trim it with the inputs'
    per_step_targets = False
    # How this task trains and what its model is, where they differ from TrainConfig's and
    # ModelConfig's defaults.
    train: ClassVar[dict] = {}
    model: ClassVar[dict] = {}

    def __init__(self) -> None:
        self.preprocessing: dict = {}
        self.option_defaults: dict = {}
        self.add_arguments(argparse.ArgumentParser(add_help=False))

    def option(self, p: argparse.ArgumentParser, *flags: str, default: object = None, **kw) -> None:
        """Register a task option. argparse sees ``default=None`` so that the trainer can tell an
        option given on the command line from a default (``--resume`` refuses changed options)."""
        action = p.add_argument(*flags, default=None, **kw)
        self.option_defaults[action.dest] = default

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        """The task's own options (its data files), registered with :meth:`option`."""

    def data_config(self, o: dict) -> dict:
        """The task's options (``o``, by name) as a JSON-able dict, saved in config.json to
        reload the data."""
        return {}

    def prepare(self, data: dict) -> Prepared:
        """Read and split the data; set ``self.preprocessing``."""
        raise NotImplementedError

    def batches(self, order: Tensor, lengths: Tensor, batch_size: int, seed: int) -> list[Tensor]:
        """One epoch's training batches (row indices) from its shuffled ``order``: consecutive
        chunks of ``batch_size``. A task may regroup them (the tagger puts sentences of similar
        length together) but must keep their number, ``ceil(len(order) / batch_size)``, and
        depend only on its arguments, so that a resumed run sees the same batches."""
        return list(order.split(batch_size))

    def train_inputs(self, x: Tensor) -> Tensor:
        """The input of a training batch; the tagger drops rare words to the unknown word here."""
        return x

    def predict(self, model: nn.Module, path: Path, device: torch.device, batch_size: int) -> str:
        """Predictions for the input file ``path`` as the text of the output file."""
        raise NotImplementedError


def trim(
    x: Tensor, lengths: Tensor, y: Tensor | None, per_step: bool
) -> tuple[Tensor, Tensor | None]:
    """Drop the padding columns no sequence of this batch needs."""
    t = int(lengths.max())
    x = x[:, :t]
    if y is not None and per_step:
        y = y[:, :t]
    return x, y


@torch.no_grad()
def forward_all(
    model: nn.Module,
    x: Tensor,
    lengths: Tensor,
    variable_length: bool,
    device: torch.device,
    batch_size: int = 256,
) -> Tensor:
    """The model's outputs for every row of ``x``, in batches, on the CPU; padded steps of
    per-step outputs are left as the model gives them."""
    model.eval()
    outs = []
    total = x.shape[1] if x.dim() > 1 else 0
    for i in range(0, x.shape[0], batch_size):
        xb, lb = x[i : i + batch_size], lengths[i : i + batch_size]
        if variable_length:
            xb, _ = trim(xb, lb, None, False)
            out = model(xb.to(device), lb.to(device))
            if out.dim() == 3 and out.shape[1] < total:
                out = torch.nn.functional.pad(out, (0, 0, 0, total - out.shape[1]))
        else:
            out = model(xb.to(device))
        outs.append(out.float().cpu())
    return torch.cat(outs)
