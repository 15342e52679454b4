"""``rnnkit train``, ``rnnkit evaluate`` and ``rnnkit predict``.

One training loop for every task in ``rnnkit.tasks``: shuffled mini-batches (the order depends only
on the seed and the epoch, so a resumed run sees the same batches), gradient clipping, Adam or SGD
with a one-cycle, cosine or constant learning rate, validation after every epoch, the weights of the
best validation epoch kept, and the test part evaluated once at the end with them.

A run folder holds ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` (rewritten atomically after
every epoch; ``--resume`` continues from it and ends where an uninterrupted run would),
``model.safetensors``, ``summary.json`` and PNG plots. Under ``torchrun`` the loop runs with
DistributedDataParallel (gloo on CPU, nccl on GPU), each process on its share of every epoch's
batches; only rank 0 writes.

The files agree after a crash at any moment. In an epoch that improves, ``model.safetensors`` is
written first and ``checkpoint.pt`` last, as the commit record; ``metrics.jsonl`` follows it and
``summary.json`` ends the run. ``--resume`` rewrites the weights from the checkpoint's best epoch,
and ``evaluate`` and ``predict`` on an unfinished run use that epoch too. A run interrupted before
its first checkpoint committed nothing: the same command (with or without ``--resume``) starts it
over in the same folder. A non-finite loss stops the run with exit status 1, the last good
checkpoint kept.
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import distributed as dist
from torch import nn

from rnnkit import __version__, engines
from rnnkit.data import DataError
from rnnkit.models import CELLS, READOUTS, ModelConfig, build_model
from rnnkit.params import count_parameters
from rnnkit.tasks import TASKS, Task
from rnnkit.tasks.base import Split, forward_all, trim
from rnnkit.train_checkpoint import (
    CHECKPOINT,
    CONFIG,
    MODEL,
    CheckpointError,
    load_checkpoint,
    load_model,
    read_committed_best,
    read_json,
    remove_stale_temps,
    save_checkpoint,
    save_model,
    to_json,
    write_json,
    write_text,
)

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
# Options every task shares, with the defaults that no task overrides.
GLOBAL_DEFAULTS = dict(
    backend="auto",
    device="auto",
    seed=0,
    momentum=0.9,
    weight_decay=0.0,
    clip_grad=1.0,
    log_every=0,
)
# Options that may differ between a run and its --resume.
RESUME_FREE = {"device", "quiet", "resume", "out", "threads"}


class RunError(ValueError):
    """A bad option or run folder; the message says what to do instead."""

    exit_status = 2


class TrainingFailed(RunError):
    """The run could not go on (a non-finite loss): a runtime failure, not a usage error."""

    exit_status = 1


_ERRORS = (RunError, DataError, CheckpointError)


# ---- the command line


def _shared_options(p: argparse.ArgumentParser, task: Task) -> None:
    d = {**GLOBAL_DEFAULTS, **task.defaults}
    g = p.add_argument_group("model")
    g.add_argument("--cell", choices=CELLS, help=f"recurrent cell type (default {d['cell']})")
    g.add_argument(
        "--hidden-size",
        type=int,
        metavar="H",
        help=f"features of the hidden state (default {d['hidden_size']})",
    )
    g.add_argument(
        "--num-layers",
        type=int,
        metavar="L",
        help=f"stacked recurrent layers (default {d['num_layers']})",
    )
    g.add_argument(
        "--bidirectional",
        action=argparse.BooleanOptionalAction,
        help=f"read each sequence both ways (default {'on' if d['bidirectional'] else 'off'})",
    )
    g.add_argument(
        "--dropout",
        type=float,
        metavar="P",
        help=f"dropout between layers and before the output layer (default {d['dropout']})",
    )
    if task.name != "tagger":
        g.add_argument(
            "--readout",
            choices=READOUTS,
            help="how a sequence becomes one vector: 'last' = the output at each sequence's own "
            "last "
            "step, 'hn' = h_n of every layer and direction concatenated, 'mean' = the last output "
            f"with both directions averaged (default {d['readout']})",
        )
    g.add_argument(
        "--backend",
        choices=engines.BACKENDS,
        help=f"the engine that runs the recurrent layers (default {d['backend']})",
    )
    g = p.add_argument_group("training")
    g.add_argument(
        "--epochs", type=int, help=f"passes over the training part (default {d['epochs']})"
    )
    g.add_argument(
        "--batch-size",
        type=int,
        metavar="B",
        help=f"sequences per step, per process (default {d['batch_size']})",
    )
    g.add_argument("--lr", type=float, help=f"(peak) learning rate (default {d['lr']})")
    g.add_argument(
        "--optimizer",
        choices=("sgd", "adam"),
        help=f"default {d['optimizer']}; sgd uses --momentum",
    )
    g.add_argument("--momentum", type=float, help=f"SGD momentum (default {d['momentum']})")
    g.add_argument("--weight-decay", type=float, help=f"L2 penalty (default {d['weight_decay']})")
    g.add_argument(
        "--schedule",
        choices=("onecycle", "cosine", "constant"),
        help=f"learning-rate schedule over all steps (default {d['schedule']})",
    )
    g.add_argument(
        "--clip-grad",
        type=float,
        metavar="NORM",
        help=f"clip the gradient norm to this; 0 = off (default {d['clip_grad']})",
    )
    g.add_argument(
        "--seed", type=int, help="seeds the weights, the batch order and dropout (default 0)"
    )
    g.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        help="auto = cuda when there is one (default auto)",
    )
    g.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="CPU threads per process for torch's operations (default: the CPUs this process "
        "may use, less those the load average says are busy, at least 1)",
    )
    g = p.add_argument_group("run folder and output")
    g.add_argument(
        "--out", metavar="DIR", help=f"run folder (default runs/{task.name}-<timestamp>)"
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run in --out from its last checkpoint; options must match",
    )
    g.add_argument(
        "--log-every",
        type=int,
        metavar="N",
        help="log the training loss every N steps (default: ~10 per epoch)",
    )
    g.add_argument(
        "--quiet", action="store_true", help="no progress bar or epoch lines, only the final table"
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``train``, ``evaluate`` and ``predict`` on the ``rnnkit`` command."""
    p = sub.add_parser(
        "train",
        help="train a model on a task (digits, mnist, forecast, tagger, textclf)",
        description="Train a recurrent model on a task and write a run folder.",
    )
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    for name, cls in TASKS.items():
        task = cls()
        tp = tasks.add_parser(name, help=task.help, description=f"{name}: {task.help}.")
        task.add_arguments(tp.add_argument_group("data"))
        _shared_options(tp, task)
        tp.set_defaults(func=cmd_train)
    p = sub.add_parser("evaluate", help="evaluate a trained run's model on its test part again")
    p.add_argument("run", metavar="RUN", help="a run folder written by rnnkit train")
    p.add_argument(
        "--split",
        choices=("test", "val", "train"),
        default="test",
        help="which part (default test)",
    )
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--output", metavar="FILE", help="also write the metrics as JSON to FILE")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser(
        "predict",
        help="predict with a trained run's model",
        description="Predict with a trained model. INPUT by task: digits: CSV of 64 pixel values "
        "(0..16) per row; mnist: IDX image file; forecast: CSV of the series (the model's column, "
        "else the last), forecast follows its end; tagger: CoNLL-U (UPOS filled in) or text, one "
        "sentence per line; textclf: text, one example per line.",
    )
    p.add_argument("run", metavar="RUN", help="a run folder written by rnnkit train")
    p.add_argument("input", metavar="INPUT", help="the file to predict for")
    p.add_argument("--output", metavar="FILE", help="write the predictions here (default: stdout)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=cmd_predict)


def _fail(command: str, e: Exception) -> int:
    """One line on stderr, argparse's way; 2 for a usage error, 1 for a runtime failure."""
    message = " ".join(str(e).split())
    print(f"rnnkit {command}: error: {message}", file=sys.stderr)
    return getattr(e, "exit_status", 2)


def cmd_train(args: argparse.Namespace) -> int:
    try:
        return train(args)
    except _ERRORS as e:
        return _fail(f"train {args.task}", e)


def cmd_evaluate(args: argparse.Namespace) -> int:
    try:
        return evaluate(args)
    except _ERRORS as e:
        return _fail("evaluate", e)
    except KeyboardInterrupt:
        print("\nrnnkit evaluate: interrupted", file=sys.stderr)
        return 130


def cmd_predict(args: argparse.Namespace) -> int:
    try:
        return predict(args)
    except _ERRORS as e:
        return _fail("predict", e)
    except KeyboardInterrupt:
        print("\nrnnkit predict: interrupted", file=sys.stderr)
        return 130


# ---- options and the run folder


def _resolve_options(args: argparse.Namespace, task: Task) -> tuple[dict, set[str]]:
    """All options with defaults filled in, and the names of those given on the command line."""
    skip = {"command", "task", "func", "out", "resume", "quiet"}
    given = {k for k, v in vars(args).items() if v is not None and k not in skip}
    options = {**GLOBAL_DEFAULTS, **task.defaults, **task.option_defaults}
    options.update({k: getattr(args, k) for k in given})
    if task.name == "tagger":
        options.pop("readout", None)
    return options, given


# Integer options and their least value; a task has only some of them.
_INT_MINIMUM = {
    "hidden_size": 1,
    "num_layers": 1,
    "epochs": 1,
    "batch_size": 1,
    "embedding_dim": 1,
    "max_chars": 1,
    "window": 1,
    "horizon": 1,
    "period": 1,
    "log_every": 0,
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


def _check_options(o: dict) -> None:
    """Every option in range, before anything is read or written."""
    for name, value in o.items():
        # An empty path or column would otherwise read as "not given" and pick the default.
        if isinstance(value, str) and not value.strip():
            raise RunError(f"{_flag(name)} is empty; give a value or leave the option out")
    for name, least in _INT_MINIMUM.items():
        if name not in o:
            continue
        value = o[name]
        if name == "seed" and not 0 <= value < 2**32:
            raise RunError(f"--seed must be between 0 and {2**32 - 1}; got {value}")
        if value < least:
            what = "a positive integer" if least == 1 else "0 or more"
            raise RunError(f"{_flag(name)} must be {what}; got {value}")
    cpus = os.cpu_count() or 1
    if o.get("threads") is not None and o["threads"] > cpus:
        # torch starts every thread asked for; a million of them crash the process.
        raise RunError(
            f"--threads must be at most {cpus}, the CPUs of this machine; got {o['threads']}"
        )
    for name, (what, ok) in _REAL_RANGE.items():
        if name in o and not ok(o[name]):
            raise RunError(f"{_flag(name)} must be {what}; got {o[name]}")
    for name in ("lr", "weight_decay"):
        if name in o and o[name] > _FLOAT32_MAX:
            raise RunError(
                f"{_flag(name)} must be at most {_FLOAT32_MAX:.4g}, the largest float32; "
                f"got {o[name]:g}"
            )


def _check_backend(backend: str, device: torch.device) -> None:
    """Refuse an engine that cannot run here before the run folder is made."""
    if backend != "triton":
        return
    from rnnkit.engines import triton_kernels

    reason = triton_kernels.unavailable_reason(torch.float32, device)
    if reason is not None:
        raise RunError(
            f"--backend triton cannot run on {device}: {reason}; choose another --backend "
            "(auto picks one that runs here)"
        )


def _check_writable(run: Path) -> None:
    """The run folder exists as a writable folder or can be made; checked before data is read."""
    if run.exists() and not run.is_dir():
        raise RunError(f"--out {str(run)!r} is a file, not a folder")
    parent = run
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise RunError(
            f"cannot make the run folder {str(run)!r}: {str(parent)!r} is a file, not a folder"
        )
    probe = parent / f".rnnkit-probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        where = "the run folder" if parent == run else f"{str(parent)!r}, where it would go,"
        raise RunError(
            f"cannot write the run folder {str(run)!r}: {where} is not writable "
            f"({e.strerror or e}); choose another --out"
        ) from None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _run_dir(args: argparse.Namespace, task: Task, rank: int, world: int) -> Path:
    if args.out is not None and not args.out.strip():
        raise RunError("--out is empty; give the run folder, or leave --out out for runs/...")
    if args.out:
        return Path(args.out)
    if args.resume:
        raise RunError("--resume needs --out DIR, the run folder to continue")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = [f"runs/{task.name}-{stamp}"]
    if world > 1:
        # Every process must write to (and read from) the folder rank 0 named.
        dist.broadcast_object_list(name, src=0)
    path = Path(name[0])
    if not args.out and rank == 0:
        k = 1
        while path.exists():
            k += 1
            path = Path(f"{name[0]}-{k}")
    if world > 1:
        final = [str(path)]
        dist.broadcast_object_list(final, src=0)
        path = Path(final[0])
    return path


def _committed(run: Path) -> bool:
    """Whether an epoch of the run in ``run`` ever committed: its checkpoint is there, or (the
    checkpoint lost) metrics.jsonl, written after each checkpoint, records an epoch."""
    if (run / CHECKPOINT).exists() or (run / SUMMARY).exists():
        return True
    try:
        with open(run / METRICS, encoding="utf-8") as f:
            return any('"kind": "epoch"' in line for line in f)
    except (OSError, UnicodeDecodeError):
        return False


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RunError("--device cuda was asked for, but torch sees no CUDA device here")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def _init_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, _device(device_choice, 0)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(device_choice, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


# ---- console output


class Progress:
    """A one-line progress bar with the live loss, on a terminal only."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.stream = sys.stderr
        self.drawn = 0.0

    def update(self, epoch: int, epochs: int, done: int, total: int, loss: torch.Tensor) -> None:
        # At most ~10 redraws a second: a terminal write per step would slow small models down.
        if not self.enabled or (time.monotonic() - self.drawn < 0.1 and done < total):
            return
        self.drawn = time.monotonic()
        loss = float(loss)
        width = 24
        filled = int(width * done / max(total, 1))
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\repoch {epoch}/{epochs} [{bar}] {done}/{total} loss {loss:.4f}   ")
        self.stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self.stream.write("\r" + " " * 72 + "\r")
            self.stream.flush()


def _fmt_metric(metric: str, value: float) -> str:
    if metric == "accuracy":
        return f"{100 * value:.2f}%"
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.4g}"


def _table(rows: list[tuple[str, str]]) -> str:
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    out = [f"  {'metric'.ljust(w)}  {'value'.rjust(v)}", f"  {'-' * w}  {'-' * v}"]
    out += [f"  {a.ljust(w)}  {b.rjust(v)}" for a, b in rows]
    return "\n".join(out)


def _summary_rows(task: Task, metrics: dict) -> list[tuple[str, str]]:
    rows = []
    for k, v in metrics.items():
        if isinstance(v, (dict, list)) or v is None:
            continue
        if isinstance(v, float):
            if "accuracy" in k:
                text = f"{100 * v:.2f}%"
            elif "mape" in k:
                text = f"{v:.2f}%"
            else:
                text = f"{v:.4g}" if abs(v) < 10 else f"{v:,.1f}"
        else:
            text = str(v)
        rows.append((k, text))
    return rows


# ---- training


def _optimizer(model: nn.Module, o: dict, steps: int):
    if o["optimizer"] == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=o["lr"], weight_decay=o["weight_decay"])
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=o["lr"], momentum=o["momentum"], weight_decay=o["weight_decay"]
        )
    if o["schedule"] == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o["lr"], total_steps=max(steps, 1))
    elif o["schedule"] == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def _epoch_order(n: int, seed: int, epoch: int, rank: int, world: int) -> torch.Tensor:
    """This process's sample order for ``epoch``: a function of the seed and epoch only."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    if world == 1:
        return order
    # DistributedSampler's rule: pad to a multiple of the world size, then every world-th item.
    total = math.ceil(n / world) * world
    order = torch.cat([order, order[: total - n]])
    return order[rank:total:world]


def _evaluate_split(
    task: Task, net: nn.Module, split: Split, device: torch.device, batch_size: int
):
    out = forward_all(
        net, split.x, split.lengths, task.variable_length, device, max(batch_size, 256)
    )
    loss, count, metric = task.scores(out, split.y)
    return out, float(loss / count), task.metric_value(float(metric), float(count))


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _checksum(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def set_threads(requested: int | None) -> int:
    """Set and return torch's intra-op threads: ``requested``, else what the machine can serve.

    That is the CPUs this process may run on (its affinity mask, shared by the processes of a
    ``torchrun`` launch) less those the 1-minute load average says other processes keep busy,
    at least 1: torch's default, a thread per core, oversubscribes a shared machine, and its
    threads then wait on each other (a run measured 3.6x faster with one thread than with the
    default while other processes ran).
    """
    if requested is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        cpus = max(1, (cpus or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        try:
            busy = os.getloadavg()[0]
        except OSError:
            busy = 0.0
        requested = max(1, min(cpus, math.floor(cpus + 0.5 - busy)))
    torch.set_num_threads(requested)
    return requested


def train(args: argparse.Namespace) -> int:
    task = TASKS[args.task]()
    options, given = _resolve_options(args, task)
    _check_options(options)
    set_threads(options.get("threads"))
    rank, world, device = _init_distributed(options["device"])
    run = None
    try:
        run = _run_dir(args, task, rank, world)
        return _train(args, run, task, options, given, rank, world, device)
    except KeyboardInterrupt:
        if rank == 0 and run is not None and (run / CHECKPOINT).exists():
            print(
                f"\ninterrupted; the checkpoint of the last finished epoch is in {run}. "
                "Continue with:\n"
                f"  rnnkit train {task.name} --out {run} --resume",
                file=sys.stderr,
            )
        elif rank == 0:
            again = f" --out {run}" if run is not None else ""
            print(
                "\ninterrupted before the first epoch ended; nothing to resume. Start over with "
                f"the same command (rnnkit train {task.name}{again} ...)",
                file=sys.stderr,
            )
        return 130
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    args: argparse.Namespace,
    run: Path,
    task: Task,
    options: dict,
    given: set[str],
    rank: int,
    world: int,
    device: torch.device,
) -> int:
    writer = rank == 0
    loud = writer and not args.quiet
    # A folder whose first epoch never committed holds no run: start over there.
    fresh_again = (run / CONFIG).exists() and not _committed(run)
    if args.resume:
        saved = read_json(run / CONFIG, "run config")
        if saved.get("task") != task.name:
            raise RunError(f"{str(run)!r} holds a {saved.get('task')!r} run, not {task.name!r}")
        changed = [
            f"{_flag(k)} {options[k]!r} (the run has {saved['options'].get(k)!r})"
            for k in sorted(given - RESUME_FREE)
            if saved["options"].get(k) != options[k]
        ]
        if changed:
            raise RunError(
                "--resume continues a run with its own options; these differ: " + "; ".join(changed)
            )
        options = {**saved["options"], "device": options["device"]}
        if saved.get("world_size", 1) != world:
            raise RunError(
                f"the run was started with {saved.get('world_size', 1)} process(es); "
                "resume it with "
                f"the same number (this is {world})"
            )
    elif _committed(run):
        raise RunError(
            f"{str(run)!r} already holds a run; pass --resume to continue it, "
            "or choose another --out"
        )
    _check_options(options)
    _check_backend(options["backend"], device)
    _check_writable(run)
    if world > 1:
        # No process may see the folder rank 0 is about to fill as someone else's run.
        dist.barrier()
    data_config = task.data_config(SimpleNamespace(**options))
    prepared = task.prepare(data_config)
    sizes = {"train": len(prepared.train), "validation": len(prepared.val)}
    sizes["test"] = len(prepared.test)
    for part, size in sizes.items():
        if size == 0:
            raise DataError(
                f"the data leave the {part} part empty (train / validation / test: "
                f"{' / '.join(map(str, sizes.values()))} examples); give more data"
            )
    mc = ModelConfig(
        **prepared.model,
        cell=options["cell"],
        hidden_size=options["hidden_size"],
        num_layers=options["num_layers"],
        bidirectional=options["bidirectional"],
        dropout=options["dropout"],
        readout=options.get("readout", "last"),
        backend=options["backend"],
    )
    fingerprint = {
        "sizes": [len(prepared.train), len(prepared.val), len(prepared.test)],
        "preprocessing": hashlib.sha256(
            json.dumps(prepared.preprocessing, sort_keys=True).encode()
        ).hexdigest()[:16],
    }
    config = {
        "task": task.name,
        "options": {k: v for k, v in options.items() if k != "device"},
        "device": options["device"],
        "data": data_config,
        "data_fingerprint": fingerprint,
        "model_config": mc.to_dict(),
        "world_size": world,
        "rnnkit_version": __version__,
        "torch_version": torch.__version__,
    }
    if args.resume and not fresh_again and saved.get("data_fingerprint") != fingerprint:
        raise DataError(
            f"the data of {str(run)!r} changed since the run started (split sizes or "
            f"preprocessing differ: {saved.get('data_fingerprint')} then, {fingerprint} now); "
            "it cannot be resumed on different data"
        )

    torch.manual_seed(options["seed"])
    _check_model_fits(mc, options["optimizer"])
    try:
        net = build_model(mc).to(device)
    except (MemoryError, torch.OutOfMemoryError) as e:
        raise TrainingFailed(f"the model does not fit in memory ({str(e)[:160]})") from None
    train_split, val_split, test_split = prepared.train, prepared.val, prepared.test
    bs = options["batch_size"]
    per_rank = math.ceil(len(train_split) / world)
    steps_per_epoch = math.ceil(per_rank / bs)
    epochs = options["epochs"]
    opt, sched = _optimizer(net, options, epochs * steps_per_epoch)
    log_every = options["log_every"] or max(1, steps_per_epoch // 10)

    history: list[dict] = []
    best = {"epoch": 0, "score": None, "key": None, "state": None}
    start_epoch, step, elapsed = 0, 0, 0.0
    resuming = args.resume and not fresh_again
    if writer:
        remove_stale_temps(run)
    if resuming:
        state = load_checkpoint(run / CHECKPOINT, config)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, step, elapsed = state["epoch"], state["step"], state["elapsed"]
        history, best = state["history"], state["best"]
        _set_rng_state(state["rng"][rank % len(state["rng"])], device)
        if writer:
            # The weights file may be ahead of the checkpoint (a crash between the two writes):
            # the checkpoint is the commit record, so the weights follow it.
            if best["state"] is not None:
                _save_model(run, best, task, config)
            write_text(run / METRICS, "".join(to_json(r) + "\n" for r in history))
    elif writer:
        if args.resume:
            print(
                f"rnnkit train {task.name}: nothing to resume in {run} (the run stopped before its "
                "first epoch ended); starting it over",
                file=sys.stderr,
            )
        try:
            run.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"cannot make the run folder {str(run)!r} ({e.strerror or e})") from None
        write_json(run / CONFIG, config)
        write_text(run / METRICS, "")
    model: nn.Module = net
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            net, device_ids=[device] if device.type == "cuda" else None
        )

    if loud:
        what = "continuing" if resuming else "training"
        print(
            f"rnnkit train {task.name}: {what} {mc.cell.upper()} "
            f"H={mc.hidden_size} L={mc.num_layers}"
            + (" bidirectional" if mc.bidirectional else "")
            + f" ({count_parameters(net):,} parameters) on {device}"
            + (f" x {world} processes" if world > 1 else "")
            + f"; {len(train_split)} train / {len(val_split)} val / {len(test_split)} test; "
            + f"run folder {run}"
        )
        if resuming:
            print(f"resuming after epoch {start_epoch} of {epochs}")
    progress = Progress(loud and sys.stderr.isatty())
    metrics_file = open(run / METRICS, "a", encoding="utf-8") if writer else None
    try:
        for epoch in range(start_epoch, epochs):
            t0 = time.perf_counter()
            model.train()
            order = _epoch_order(len(train_split), options["seed"], epoch, rank, world)
            sums = torch.zeros(3, dtype=torch.float64)
            new_records = []
            seed = options["seed"] * 100_003 + epoch
            batches = task.batches(order, train_split.lengths, bs, seed)
            for b, idx in enumerate(batches):
                x, lengths, y = train_split.x[idx], train_split.lengths[idx], train_split.y[idx]
                if task.variable_length:
                    x, y = trim(x, lengths, y, task.per_step_targets)
                x = task.train_inputs(x.to(device))
                y = y.to(device)
                out = model(x, lengths) if task.variable_length else model(x)
                loss_sum, count, metric_sum = task.scores(out, y)
                loss = loss_sum / count.to(loss_sum.device)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                # With clipping off this only measures the norm (the factor is clamped to 1).
                norm = nn.utils.clip_grad_norm_(
                    model.parameters(), options["clip_grad"] or math.inf
                )
                if not _all_finite(loss.detach(), norm, world):
                    raise _diverged(
                        f"the training loss became {float(loss.detach()):g} at step {step + 1} "
                        f"(epoch {epoch + 1}), gradient norm {float(norm):g}",
                        options,
                        run,
                        best,
                        epoch,
                    )
                opt.step()
                sched.step()
                step += 1
                sums += (
                    torch.stack([loss_sum, count.to(loss_sum.device), metric_sum])
                    .detach()
                    .double()
                    .cpu()
                )
                if step % log_every == 0:
                    new_records.append(
                        {
                            "kind": "step",
                            "step": step,
                            "epoch": epoch + 1,
                            "epoch_float": round(epoch + (b + 1) / steps_per_epoch, 4),
                            "loss": float(loss.detach()),
                            "lr": sched.get_last_lr()[0],
                        }
                    )
                progress.update(epoch + 1, epochs, b + 1, steps_per_epoch, loss.detach())
            if world > 1:
                dist.all_reduce(sums)
            _, val_loss, val_metric = _evaluate_split(task, net, val_split, device, bs)
            if not (math.isfinite(val_loss) and math.isfinite(val_metric)):
                raise _diverged(
                    f"the validation loss became {val_loss:g} after epoch {epoch + 1}",
                    options,
                    run,
                    best,
                    epoch,
                )
            elapsed += time.perf_counter() - t0
            record = {
                "kind": "epoch",
                "epoch": epoch + 1,
                "step": step,
                "train_loss": float(sums[0] / sums[1]),
                f"train_{task.metric}": task.metric_value(float(sums[2]), float(sums[1])),
                "val_loss": val_loss,
                f"val_{task.metric}": val_metric,
                "lr": sched.get_last_lr()[0],
                "seconds": round(elapsed, 3),
            }
            new_records.append(record)
            history.extend(new_records)
            # Ties on the metric (common for accuracy on small data) go to the lower loss.
            key = [val_metric if task.metric == "accuracy" else -val_metric, -val_loss]
            improved = best["key"] is None or key > best["key"]
            if improved:
                best = {
                    "epoch": epoch + 1,
                    "score": val_metric,
                    "key": key,
                    "state": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
                }
            rng = [_rng_state(device)]
            if world > 1:
                gathered: list = [None] * world
                dist.all_gather_object(gathered, rng[0])
                rng = gathered
            progress.clear()
            if writer:
                # The weights first, the checkpoint (the commit record) last: see the docstring.
                if improved:
                    _save_model(run, best, task, config)
                save_checkpoint(
                    run / CHECKPOINT,
                    {
                        **{
                            k: config[k]
                            for k in ("task", "options", "model_config", "data_fingerprint")
                        },
                        "epoch": epoch + 1,
                        "step": step,
                        "elapsed": elapsed,
                        "model": net.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "rng": rng,
                        "history": history,
                        "best": best,
                    },
                )
                metrics_file.write("".join(to_json(r) + "\n" for r in new_records))
                metrics_file.flush()
            if loud:
                m = task.metric
                print(
                    f"epoch {epoch + 1:>{len(str(epochs))}}/{epochs}  "
                    f"train loss {record['train_loss']:.4f} "
                    f"{m} {_fmt_metric(m, record[f'train_{m}'])}  val loss {val_loss:.4f} "
                    f"{m} {_fmt_metric(m, val_metric)}  {elapsed:.1f}s"
                    + ("  *" if improved else ""),
                    flush=True,
                )
    finally:
        progress.clear()
        if metrics_file is not None:
            metrics_file.close()

    net.load_state_dict(best["state"])
    out = forward_all(
        net, test_split.x, test_split.lengths, task.variable_length, device, max(bs, 256)
    )
    report = task.report(out, test_split)
    checksums = [_checksum(net)]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, checksums[0])
        checksums = gathered
    if not writer:
        return 0
    summary = {
        "task": task.name,
        **report.metrics,
        "best_epoch": best["epoch"],
        f"best_val_{task.metric}": best["score"],
        "epochs": epochs,
        "train_seconds": round(elapsed, 2),
        "parameters": count_parameters(net),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "world_size": world,
        "rank_checksums": checksums,
        "run_dir": str(run),
    }
    files = [CONFIG, METRICS, CHECKPOINT, MODEL, SUMMARY]
    from rnnkit import train_plots

    train_plots.curves(
        history,
        task.metric,
        task.loss_name,
        f"{task.name}: {mc.cell.upper()} H={mc.hidden_size} L={mc.num_layers}"
        + (" bidirectional" if mc.bidirectional else "")
        + f", best epoch {best['epoch']}",
        run / "curves.png",
    )
    files += ["curves.png", *task.plots(report, run)]
    summary["files"] = files
    write_json(run / SUMMARY, summary)
    m = task.metric
    print(
        f"\nrnnkit train {task.name}: done, {epochs} epoch{'s' if epochs != 1 else ''} "
        f"in {elapsed:.1f} s; "
        "test uses the weights "
        f"of epoch {best['epoch']} (best validation {m} {_fmt_metric(m, best['score'])})"
    )
    print(_table(_summary_rows(task, {k: v for k, v in summary.items() if k in report.metrics})))
    print(f"run folder: {run}/")
    print("  " + ", ".join(files))
    return 0


def _all_finite(loss: torch.Tensor, norm: torch.Tensor, world: int) -> bool:
    """Whether this step's loss and gradient norm are finite, in every process."""
    bad = (~torch.isfinite(loss) | ~torch.isfinite(norm)).float()
    if world > 1:
        # Every process must stop at the same step, or the others wait for it for ever.
        dist.all_reduce(bad)
    return not bool(bad)


def _diverged(what: str, options: dict, run: Path, best: dict, epoch: int) -> TrainingFailed:
    kept = (
        f"the checkpoint of epoch {epoch} and the weights of epoch {best['epoch']}, the best so "
        f"far, are kept in {run}"
        if epoch
        else f"no epoch finished, so {run} holds no checkpoint"
    )
    return TrainingFailed(
        f"training stopped: {what} (the weights diverged, or the data holds extreme values); "
        f"try a smaller --lr (it is {options['lr']:g}) or --clip-grad (it is "
        f"{options['clip_grad']:g}; 0 = off); {kept}"
    )


def _available_memory() -> int | None:
    """Bytes of memory this process could still take (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _check_model_fits(mc: ModelConfig, optimizer: str) -> None:
    """Refuse a model whose weights, gradients and optimizer state cannot fit in memory, before
    torch tries: an allocation of that size fails with a raw error, or swaps the machine to a
    halt. The parameters are counted on the meta device, which allocates nothing."""
    try:
        with torch.device("meta"):
            n = count_parameters(build_model(mc))
    except (RuntimeError, TypeError, OverflowError):
        # torch cannot even describe tensors of these sizes (2**63 elements or more).
        raise RunError(
            f"the model is too large to build: hidden size {mc.hidden_size:,}, "
            f"{mc.num_layers:,} layer(s), beyond the tensor sizes torch can describe; choose a "
            "smaller --hidden-size, --num-layers or --embedding-dim"
        ) from None
    # weights and gradients, plus Adam's two moments or SGD's momentum buffer, in float32
    need = n * 4 * (4 if optimizer == "adam" else 3)
    free = _available_memory()
    if free is not None and need > free:
        raise RunError(
            f"the model would have {n:,} parameters, {need / 2**30:,.1f} GiB to train with "
            f"{optimizer}, more than the {free / 2**30:,.1f} GiB of memory available; choose a "
            "smaller --hidden-size, --num-layers or --embedding-dim"
        )


def _save_model(run: Path, best: dict, task: Task, config: dict) -> None:
    meta = {
        "task": task.name,
        "model_config": config["model_config"],
        "preprocessing": task.preprocessing,
        "data": config["data"],
        "epoch": best["epoch"],
        f"val_{task.metric}": best["score"],
    }
    save_model(run / MODEL, best["state"], meta)


# ---- evaluate and predict


def _load_run(run_arg: str) -> tuple[Path, nn.Module, dict, Task]:
    if not run_arg.strip():
        raise RunError("RUN is empty; expected a run folder written by rnnkit train")
    run = Path(run_arg)
    if not run.is_dir():
        what = "is a file, not a folder" if run.exists() else "does not exist"
        raise RunError(f"run folder {run_arg!r} {what}")
    if (run / CONFIG).exists() and not _committed(run):
        raise CheckpointError(
            f"the run in {str(run)!r} stopped before its first epoch ended, so it has no weights "
            "yet; train it again with the same --out"
        )
    model, meta = load_model(run / MODEL)
    if meta.get("task") not in TASKS:
        raise CheckpointError(f"{str(run / MODEL)!r} names an unknown task {meta.get('task')!r}")
    _check_meta(run / MODEL, meta)
    if not (run / SUMMARY).exists() and (run / CHECKPOINT).exists():
        # An unfinished run: its checkpoint is the commit record, and the weights file may be an
        # epoch ahead of it (a crash between the two writes). Use what --resume would use.
        best = read_committed_best(run / CHECKPOINT)
        if best is not None and best.get("epoch") != meta.get("epoch"):
            try:
                model.load_state_dict(best["state"])
                meta = {**meta, "epoch": best["epoch"]}
            except (RuntimeError, KeyError, TypeError):
                pass
    task = TASKS[meta["task"]]()
    task.preprocessing = meta["preprocessing"]
    return run, model, meta, task


def _check_meta(path: Path, meta: dict) -> None:
    """The description in a model file holds what evaluate and predict read, and its classes
    agree with the model's outputs (a file from another version or edited by hand may not)."""
    missing = [k for k in ("preprocessing", "data", "epoch") if k not in meta]
    if missing or not isinstance(meta.get("preprocessing"), dict):
        raise CheckpointError(
            f"model file {str(path)!r} lacks {', '.join(missing) or 'a valid preprocessing'} in "
            "its description; it was written by another version of rnnkit or edited"
        )
    labels = meta["preprocessing"].get("classes", meta["preprocessing"].get("tags"))
    outputs = meta["model_config"].get("output_size")
    if labels is not None and (not isinstance(labels, list) or len(labels) != outputs):
        raise CheckpointError(
            f"model file {str(path)!r} names {len(labels) if isinstance(labels, list) else 0} "
            f"classes, but its model has {outputs} outputs; it was edited or is damaged"
        )


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise RunError(f"--batch-size must be a positive integer; got {batch_size}")


def _check_output(output: str | None) -> None:
    if output is not None and not output.strip():
        raise RunError("--output is empty; give a file, or leave --output out")


def evaluate(args: argparse.Namespace) -> int:
    _check_batch_size(args.batch_size)
    _check_output(args.output)
    run, model, meta, task = _load_run(args.run)
    device = _device(args.device, 0)
    prepared = task.prepare(meta["data"])
    if prepared.preprocessing != meta["preprocessing"]:
        diff = sorted(
            k
            for k in meta["preprocessing"]
            if prepared.preprocessing.get(k) != meta["preprocessing"][k]
        )
        raise DataError(
            "the data files of this run changed since it was trained "
            f"(their {', '.join(diff)} differ "
            "from the model's); evaluate cannot reproduce its splits"
        )
    split = {"test": prepared.test, "val": prepared.val, "train": prepared.train}[args.split]
    model.to(device)
    out = forward_all(model, split.x, split.lengths, task.variable_length, device, args.batch_size)
    metrics = task.report(out, split).metrics
    if args.split != "test":
        metrics = {k.replace("test_", f"{args.split}_"): v for k, v in metrics.items()}
    unfinished = "" if (run / SUMMARY).exists() else " (an unfinished run: the best so far)"
    print(
        f"rnnkit evaluate {run}: {task.name}, {args.split} part, weights of epoch {meta['epoch']}"
        + unfinished
    )
    print(_table(_summary_rows(task, metrics)))
    if args.output:
        write_json(Path(args.output), {"split": args.split, **metrics})
    return 0


def predict(args: argparse.Namespace) -> int:
    _check_batch_size(args.batch_size)
    _check_output(args.output)
    if not args.input.strip():
        raise RunError("INPUT is empty; expected the file to predict for")
    _, model, _, task = _load_run(args.run)
    device = _device(args.device, 0)
    model.to(device)
    text = task.predict(model, Path(args.input), device, args.batch_size)
    if args.output:
        write_text(Path(args.output), text)
        print(
            f"rnnkit predict: wrote {text.count(chr(10))} lines to {args.output}", file=sys.stderr
        )
    else:
        sys.stdout.write(text)
    return 0
