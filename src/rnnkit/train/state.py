"""What a run carries from epoch to epoch: :class:`TrainState`, which writes itself to
``checkpoint.pt`` and reads itself back, so that saving and resuming are written once."""

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from rnnkit.train.checkpoint import load_checkpoint, save_checkpoint

# The keys of config.json that a checkpoint must share with it to belong to the same run.
RUN_KEYS = ("task", "options", "model_config", "data_fingerprint")


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class TrainState:
    """Epochs and steps done, seconds spent, the history, the best epoch and its weights, and
    the random state of every process (``rng``, one entry per rank)."""

    epoch: int = 0
    step: int = 0
    elapsed: float = 0.0
    history: list[dict] = field(default_factory=list)
    # epoch, score (the validation metric), key (what "better" compares), state (the weights)
    best: dict = field(
        default_factory=lambda: {"epoch": 0, "score": None, "key": None, "state": None}
    )
    rng: list[dict] = field(default_factory=list)

    def end_epoch(
        self, records: list[dict], key: list[float], score: float | None, net: nn.Module
    ) -> bool:
        """Record a finished epoch (its step records, then the epoch record) and keep its
        weights and ``score`` when ``key`` beats the best so far; returns whether it did."""
        record = records[-1]
        self.epoch, self.step, self.elapsed = record["epoch"], record["step"], record["seconds"]
        self.history.extend(records)
        improved = self.best["key"] is None or key > self.best["key"]
        if improved:
            weights = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            self.best = {"epoch": self.epoch, "score": score, "key": key, "state": weights}
        return improved

    def patience_spent(self, patience: int) -> bool:
        """Early stopping: ``patience`` epochs (0 = never) have passed without a better one."""
        return patience > 0 and self.epoch - self.best["epoch"] >= patience

    def save(self, path: Path, run: dict, net: nn.Module, optimizer, scheduler) -> None:
        """Write the checkpoint: this state, the run's identity (the ``RUN_KEYS`` of ``run``),
        the weights and the optimizer's and scheduler's state."""
        save_checkpoint(
            path,
            {
                **{k: run[k] for k in RUN_KEYS},
                "epoch": self.epoch,
                "step": self.step,
                "elapsed": self.elapsed,
                "model": net.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": self.rng,
                "history": self.history,
                "best": self.best,
            },
        )

    @classmethod
    def load(
        cls, path: Path, run: dict, net: nn.Module, optimizer, scheduler, rank: int, device
    ) -> "TrainState":
        """Read the checkpoint of ``run`` back into ``net``, ``optimizer`` and ``scheduler``,
        restore this process's random state, and return the state."""
        saved = load_checkpoint(path, run)
        net.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = cls(
            saved["epoch"], saved["step"], saved["elapsed"], saved["history"], saved["best"]
        )
        state.rng = saved["rng"]
        set_rng_state(state.rng[rank % len(state.rng)], device)
        return state


def better_key(val_loss: float, val_metric: float, higher_is_better: bool) -> list[float]:
    """What "a better epoch" compares: the validation metric, ties (common for accuracy on small
    data) going to the lower loss."""
    return [val_metric if higher_is_better else -val_metric, -val_loss]


def finite(*values: float) -> bool:
    return all(math.isfinite(v) for v in values)
