"""Where a run happens: its device, processes and threads, and its folder.

A run folder holds ``config.json``, ``metrics.jsonl``, ``checkpoint.pt`` (the commit record of
every epoch), ``model.safetensors``, ``summary.json`` (written last) and PNG plots; see
``rnnkit.train.loop`` for the order of the writes.
"""

import datetime
import math
import os
from pathlib import Path

import torch
from torch import distributed as dist

from rnnkit.train.checkpoint import CHECKPOINT
from rnnkit.train.config import RESUME_FREE, RunError

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RunError("--device cuda was asked for, but torch sees no CUDA device here")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(device_choice: str) -> tuple[int, int, torch.device]:
    """``(rank, world size, device)``; under ``torchrun`` the process group is started here
    (gloo on CPU, nccl on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device(device_choice, 0)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    here = device(device_choice, local)
    if here.type == "cuda":
        torch.cuda.set_device(here)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if here.type == "cuda" else "gloo")
    return rank, world, here


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


def run_dir(out: str | None, resume: bool, name: str, rank: int, world: int) -> Path:
    """The run folder: ``out``, else a new ``runs/<name>-<timestamp>`` that every process
    agrees on."""
    if out is not None and not out.strip():
        raise RunError("--out is empty; give the run folder, or leave --out out for runs/...")
    if out:
        return Path(out)
    if resume:
        raise RunError("--resume needs --out DIR, the run folder to continue")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = [f"runs/{name}-{stamp}"]
    if world > 1:
        # Every process must write to (and read from) the folder rank 0 named.
        dist.broadcast_object_list(base, src=0)
    path = Path(base[0])
    if rank == 0:
        k = 1
        while path.exists():
            k += 1
            path = Path(f"{base[0]}-{k}")
    if world > 1:
        final = [str(path)]
        dist.broadcast_object_list(final, src=0)
        path = Path(final[0])
    return path


def committed(run: Path) -> bool:
    """Whether an epoch of the run in ``run`` ever committed: its checkpoint is there, or (the
    checkpoint lost) metrics.jsonl, written after each checkpoint, records an epoch."""
    if (run / CHECKPOINT).exists() or (run / SUMMARY).exists():
        return True
    try:
        with open(run / METRICS, encoding="utf-8") as f:
            return any('"kind": "epoch"' in line for line in f)
    except (OSError, UnicodeDecodeError):
        return False


def check_writable(run: Path) -> None:
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


def check_backend(backend: str, here: torch.device) -> None:
    """Refuse an engine that cannot run here before the run folder is made."""
    if backend != "triton":
        return
    from rnnkit.engines.triton import kernels as triton_kernels

    reason = triton_kernels.unavailable_reason(torch.float32, here)
    if reason is not None:
        raise RunError(
            f"--backend triton cannot run on {here}: {reason}; choose another --backend "
            "(auto picks one that runs here)"
        )


def available_memory() -> int | None:
    """Bytes of memory this process could still take (Linux's MemAvailable), or None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_resumable(
    run: Path, saved: dict, task: str, world: int, options: dict, names: set[str], spell=str
) -> None:
    """Refuse to resume the run in ``run`` (``saved``: its config.json) as another task, on
    another number of processes, or with other values of the options ``names`` (those outside
    RESUME_FREE); ``spell`` writes an option's name as the user gave it (a flag, a field)."""
    if saved.get("task") != task:
        raise RunError(f"{str(run)!r} holds a {saved.get('task')!r} run, not {task!r}")
    before = saved.get("options", {})
    changed = [
        f"{spell(k)} {options.get(k)!r} (the run has {before.get(k)!r})"
        for k in sorted(names - RESUME_FREE)
        if before.get(k) != options.get(k)
    ]
    if changed:
        raise RunError(
            "resuming continues a run with its own options; these differ: " + "; ".join(changed)
        )
    if saved.get("world_size", 1) != world:
        raise RunError(
            f"the run was started with {saved.get('world_size', 1)} process(es); resume it with "
            f"the same number (this is {world})"
        )
