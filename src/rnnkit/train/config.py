"""How a run trains: :class:`TrainConfig`, one flat dataclass, and the range checks of every option.

The command line, a ``--config FILE.toml`` and ``rnnkit.fit(config=...)`` all end in the same
``TrainConfig``; tasks override only the fields that differ (``DigitsTask.train``). The checks
here cover every option a run can take, the model's and the data's too, by name, so that a bad
value is refused once, before anything is read or written, with the flag the user typed.
"""

import math
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

from rnnkit.data import DataError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library (the train extra installs it)
    import tomli as tomllib


class RunError(ValueError):
    """A bad option or run folder; the message says what to do instead."""

    exit_status = 2


class TrainingFailed(RunError):
    """The run could not go on (a non-finite loss): a runtime failure, not a usage error."""

    exit_status = 1


@dataclass(frozen=True)
class TrainConfig:
    """Everything about how a model trains (not what it is: that is its ``ModelConfig``).

    Example:
        >>> import rnnkit
        >>> config = rnnkit.TrainConfig(epochs=5, lr=0.01, out="runs/own")
        >>> config.replace(resume=True).resume  # continue that run where it stopped
        True
    """

    epochs: int = 10  #: passes over the training data
    batch_size: int = 32  #: sequences per step, per process
    lr: float = 1e-3  #: the peak learning rate under onecycle
    optimizer: str = "adam"  #: "adam" or "sgd" (with momentum)
    momentum: float = 0.9  #: sgd's momentum
    weight_decay: float = 0.0  #: the optimizer's weight decay; 0 = off
    schedule: str = "onecycle"  #: "onecycle", "cosine" or "constant", over all steps
    clip_grad: float = 1.0  #: the gradient norm is clipped to this; 0 = off
    patience: int = 0  #: stop after this many epochs without a better validation metric; 0 = off
    precision: str = "fp32"  #: "fp32", or "bf16" (forward passes under bfloat16 autocast)
    #: The batch order; the command line also seeds torch with it before building the model (its
    #: weights, then dropout), so with rnnkit.fit, call torch.manual_seed before building yours.
    seed: int = 0
    device: str = "auto"  #: "cpu", "cuda" or "auto" (cuda when there is one)
    #: torch's CPU threads per process; with None, rnnkit.fit leaves them as they are and the
    #: command line takes what the machine can serve (run.set_threads)
    threads: int | None = None
    out: str | None = None  #: the run folder (None means runs/<name>-<timestamp>)
    resume: bool = False  #: continue the run in ``out`` from its last checkpoint
    log_every: int = 0  #: log the training loss every N steps (0 means about 10 times an epoch)
    quiet: bool = False  #: no progress bar or epoch lines
    tensorboard: bool = False  #: TensorBoard scalars in <out>/tensorboard as well

    def replace(self, **changes) -> "TrainConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> "TrainConfig":
        check_options(self.to_dict())
        return self


# Fields that may differ between a run and its resumption; every other one must match.
RESUME_FREE = frozenset({"device", "threads", "out", "resume", "quiet", "tensorboard"})
TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig))
CHOICES = {
    "optimizer": ("adam", "sgd"),
    "schedule": ("onecycle", "cosine", "constant"),
    "precision": ("fp32", "bf16"),
    "device": ("cpu", "cuda", "auto"),
}

# Integer options (of the run, the model and the data) and their least value.
_INT_MINIMUM = {
    "hidden_size": 1,
    "num_layers": 1,
    "epochs": 1,
    "batch_size": 1,
    "embedding_dim": 1,
    "char_embedding_dim": 1,
    "char_hidden_size": 1,
    "max_chars": 1,
    "window": 1,
    "horizon": 1,
    "period": 1,
    "log_every": 0,
    "patience": 0,
    "seed": 0,
    "threads": 1,
}
# The optimizers step float32 weights with these factors: a larger one does not fit (torch raises
# "value cannot be converted to type float without overflow" mid-step).
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# Real options: (the range as the user reads it, the test); NaN fails every test.
_REAL_RANGE = {
    "lr": ("a finite number greater than 0", lambda v: 0 < v < math.inf),
    "weight_decay": ("a finite number, 0 or more", lambda v: 0 <= v < math.inf),
    "clip_grad": (
        "a finite number greater than 0, or 0 for no clipping",
        lambda v: 0 <= v < math.inf,
    ),
    "momentum": ("in [0, 1]", lambda v: 0 <= v <= 1),
    "dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "word_dropout": ("in [0, 1)", lambda v: 0 <= v < 1),
    "val_fraction": ("between 0 and 1", lambda v: 0 < v < 1),
}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_options(o: dict) -> None:
    """Every option in ``o`` (by field name) in range; raises :class:`RunError` naming the flag."""
    for name, value in o.items():
        # An empty path or column would otherwise read as "not given" and pick the default.
        if isinstance(value, str) and not value.strip():
            raise RunError(f"{flag(name)} is empty; give a value or leave the option out")
        if name in CHOICES and value not in CHOICES[name]:
            raise RunError(f"{flag(name)} must be one of {', '.join(CHOICES[name])}; got {value!r}")
    for name, least in _INT_MINIMUM.items():
        value = o.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise RunError(f"{flag(name)} must be an integer; got {value!r}")
        if name == "seed" and not 0 <= value < 2**32:
            raise RunError(f"--seed must be between 0 and {2**32 - 1}; got {value}")
        if value < least:
            what = "a positive integer" if least == 1 else "0 or more"
            raise RunError(f"{flag(name)} must be {what}; got {value}")
    cpus = os.cpu_count() or 1
    if o.get("threads") is not None and o["threads"] > cpus:
        # torch starts every thread asked for; a million of them crash the process.
        raise RunError(
            f"--threads must be at most {cpus}, the CPUs of this machine; got {o['threads']}"
        )
    for name, (what, ok) in _REAL_RANGE.items():
        if name not in o:
            continue
        if not isinstance(o[name], (int, float)) or isinstance(o[name], bool):
            raise RunError(f"{flag(name)} must be a number; got {o[name]!r}")
        if not ok(o[name]):
            raise RunError(f"{flag(name)} must be {what}; got {o[name]}")
    for name in ("lr", "weight_decay"):
        if name in o and o[name] > _FLOAT32_MAX:
            raise RunError(
                f"{flag(name)} must be at most {_FLOAT32_MAX:.4g}, the largest float32; "
                f"got {o[name]:g}"
            )


def read_toml(path: str) -> dict:
    """The options of a ``--config`` file: flat ``name = value`` pairs, names as the flags
    spell them (``hidden-size``) or as fields (``hidden_size``)."""
    try:
        with open(Path(path), "rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise RunError(f"--config {path!r}: cannot read it ({e.strerror or e})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"--config {path!r} is not valid TOML: {e}") from None
    nested = [k for k, v in table.items() if isinstance(v, dict)]
    if nested:
        raise RunError(
            f"--config {path!r}: options are flat `name = value` lines; [{nested[0]}] is a table"
        )
    return {k.replace("-", "_"): v for k, v in table.items()}
