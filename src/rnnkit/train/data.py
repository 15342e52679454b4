"""The examples ``fit`` trains on, whatever form they come in, as one kind of :class:`Source`.

A batch is ``(inputs, targets)``: the model is called as ``model(*inputs)``. A source gives an
epoch's training batches in an order that depends only on the seed and the epoch (so a resumed run
sees the same batches), each process of a distributed run its own share, and all of its examples in
order for evaluation.

- tensors ``(x, ..., y)``: the last is the target, the others the model's inputs;
- a map-style ``Dataset`` whose items are ``(x, ..., y)`` (batched with torch's default collate);
- a ``DataLoader``: used as it is (its sampler's ``set_epoch`` is called, as DDP users expect);
- a task's :class:`~rnnkit.tasks.Split` (``SplitSource``): padded sequences with their lengths.
"""

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, default_collate

from rnnkit.tasks.base import Split, Task, forward_all, trim

Batch = tuple[tuple[Tensor, ...], Tensor]


def epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> Tensor:
    """This process's sample order for ``epoch``: a function of the seed and epoch only."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    if world == 1:
        return order
    # DistributedSampler's rule: pad to a multiple of the world size, then every world-th item.
    total = math.ceil(n / world) * world
    order = torch.cat([order, order[: total - n]])
    return order[rank:total:world]


class Source:
    """Examples to batch; subclasses say how to read rows (:meth:`rows`)."""

    def __len__(self) -> int:
        raise NotImplementedError

    def rows(self, idx: Tensor, train: bool) -> Batch:
        """The batch of the examples ``idx``."""
        raise NotImplementedError

    def steps(self, batch_size: int, world: int) -> int:
        return math.ceil(math.ceil(len(self) / world) / batch_size)

    def targets_sample(self) -> Tensor:
        """The targets of one batch: what an objective is inferred from."""
        return self.rows(torch.arange(1), False)[1]

    def train_batches(
        self, epoch: int, seed: int, batch_size: int, rank: int, world: int
    ) -> Iterator[Batch]:
        order = epoch_order(len(self), seed, epoch, rank, world)
        for idx in order.split(batch_size):
            yield self.rows(idx, True)

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """Every example once, in order."""
        for idx in torch.arange(len(self)).split(batch_size):
            yield self.rows(idx, False)

    @torch.no_grad()
    def outputs(
        self, net: nn.Module, device: torch.device, batch_size: int
    ) -> tuple[Tensor, Tensor]:
        """The model's outputs for every example, in order, and the targets; both on the CPU."""
        net.eval()
        outs, ys = [], []
        for inputs, y in self.eval_batches(batch_size):
            outs.append(net(*(t.to(device) for t in inputs)).float().cpu())
            ys.append(y)
        return torch.cat(outs), torch.cat(ys)


class TensorSource(Source):
    def __init__(self, tensors: Sequence[Tensor]) -> None:
        self.tensors = tuple(tensors)

    def __len__(self) -> int:
        return self.tensors[0].shape[0]

    def rows(self, idx: Tensor, train: bool) -> Batch:
        picked = tuple(t[idx] for t in self.tensors)
        return picked[:-1], picked[-1]


class DatasetSource(Source):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def rows(self, idx: Tensor, train: bool) -> Batch:
        batch = default_collate([self.dataset[i] for i in idx.tolist()])
        return tuple(batch[:-1]), batch[-1]


class LoaderSource(Source):
    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def steps(self, batch_size: int, world: int) -> int:
        return len(self.loader)

    def targets_sample(self) -> Tensor:
        return next(self._batches())[1]

    def _batches(self) -> Iterator[Batch]:
        for batch in self.loader:
            yield tuple(batch[:-1]), batch[-1]

    def train_batches(self, epoch, seed, batch_size, rank, world) -> Iterator[Batch]:
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        return self._batches()

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        return self._batches()


class SplitSource(Source):
    """A task's split: padded inputs with their lengths; batches grouped as the task likes
    (:meth:`Task.batches`), trimmed to their longest sequence, and augmented in training
    (:meth:`Task.train_inputs`)."""

    def __init__(self, split: Split, task: Task) -> None:
        self.split, self.task = split, task

    def __len__(self) -> int:
        return len(self.split)

    def rows(self, idx: Tensor, train: bool) -> Batch:
        s, task = self.split, self.task
        x, lengths, y = s.x[idx], s.lengths[idx], s.y[idx]
        if not task.variable_length:
            return (task.train_inputs(x) if train else x,), y
        x, y = trim(x, lengths, y, task.per_step_targets)
        return (task.train_inputs(x) if train else x, lengths), y

    def train_batches(self, epoch, seed, batch_size, rank, world) -> Iterator[Batch]:
        order = epoch_order(len(self), seed, epoch, rank, world)
        for idx in self.task.batches(order, self.split.lengths, batch_size, seed * 100_003 + epoch):
            yield self.rows(idx, True)

    def outputs(
        self, net: nn.Module, device: torch.device, batch_size: int
    ) -> tuple[Tensor, Tensor]:
        s = self.split
        out = forward_all(net, s.x, s.lengths, self.task.variable_length, device, batch_size)
        return out, s.y


def as_source(data: object, what: str) -> Source:
    """``data`` as a :class:`Source`; a clear error for anything else or for no examples."""
    if isinstance(data, Source):
        source = data
    elif isinstance(data, DataLoader):
        source = LoaderSource(data)
    elif isinstance(data, (tuple, list)) and all(isinstance(t, Tensor) for t in data):
        if len(data) < 2:
            raise TypeError(
                f"rnnkit.fit: {what} as tensors must be (inputs, ..., targets); got "
                f"{len(data)} tensor(s)"
            )
        sizes = [t.shape[0] if t.dim() else None for t in data]
        if None in sizes or len(set(sizes)) != 1:
            raise ValueError(
                f"rnnkit.fit: the tensors of {what} must have the same first (example) "
                f"dimension; got sizes {sizes}"
            )
        source = TensorSource(data)
    elif isinstance(data, Dataset) and hasattr(data, "__len__"):
        source = DatasetSource(data)
    else:
        raise TypeError(
            f"rnnkit.fit: {what} must be a tuple (inputs, ..., targets) of tensors, a Dataset "
            f"with a length, or a DataLoader; got {type(data).__name__}"
        )
    if len(source) == 0:
        raise ValueError(f"rnnkit.fit: {what} holds no examples")
    return source
