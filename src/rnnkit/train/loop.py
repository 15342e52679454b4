"""``rnnkit.fit``: one training loop for any ``nn.Module``, the CLI's tasks included.

Shuffled mini-batches (the order depends only on the seed and the epoch, so a resumed run sees the
same batches), gradient clipping, Adam or SGD with a one-cycle, cosine or constant learning rate,
bfloat16 autocast on request, validation after every epoch, the weights of the best validation
epoch kept (and loaded into the model at the end), early stopping, and the test data evaluated
once at the end with them.

The run folder's files agree after a crash at any moment. In an epoch that improves,
``model.safetensors`` is written first and ``checkpoint.pt`` last, as the commit record;
``metrics.jsonl`` follows it and ``summary.json`` ends the run. Resuming rewrites the weights from
the checkpoint's best epoch. A run interrupted before its first checkpoint committed nothing: the
same call starts it over in the same folder. A non-finite loss stops the run
(:class:`TrainingFailed`) with the last good checkpoint kept. Under ``torchrun`` the loop runs
with DistributedDataParallel, each process on its share of every epoch's batches; only rank 0
writes.
"""

import hashlib
import importlib.util
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import distributed as dist
from torch import nn

from rnnkit import __version__
from rnnkit.data import DataError
from rnnkit.params import count_parameters
from rnnkit.train import run as runs
from rnnkit.train.checkpoint import (
    CHECKPOINT,
    CONFIG,
    MODEL,
    read_json,
    remove_stale_temps,
    save_model,
    to_json,
    write_json,
    write_text,
)
from rnnkit.train.config import RunError, TrainConfig, TrainingFailed
from rnnkit.train.data import Source, as_source
from rnnkit.train.objective import Objective, infer
from rnnkit.train.state import TrainState, better_key, finite, rng_state


@dataclass
class History:
    """What ``fit`` returns: every record of ``metrics.jsonl`` (``kind`` "step" or "epoch"), the
    best epoch, the test figures (when test data were given) and the run folder.
    ``history["val_loss"]`` lists a figure over the epochs, as Keras's ``History.history``."""

    records: list[dict]
    best_epoch: int
    best_score: float | None
    run_dir: Path
    stopped_early: bool = False
    test: dict = field(default_factory=dict)

    @property
    def epochs(self) -> list[dict]:
        return [r for r in self.records if r["kind"] == "epoch"]

    def __getitem__(self, name: str) -> list:
        return [r[name] for r in self.epochs if name in r]


def fit(
    model: nn.Module,
    train_data: object,
    val_data: object = None,
    *,
    config: TrainConfig | None = None,
    loss: object = None,
    metric: object = None,
    objective: Objective | None = None,
    test_data: object = None,
    run_info: dict | None = None,
) -> History:
    """Train ``model`` on ``train_data``, keeping the weights of the best epoch on ``val_data``.

    Data are tensors ``(inputs, ..., targets)``, a ``Dataset`` of such tuples or a
    ``DataLoader``; the model is called as ``model(*inputs)``. ``loss(out, y)`` and
    ``metric(out, y)`` return batch means; without them integer targets mean cross-entropy and
    accuracy, floating ones mean squared error and mean absolute error. ``objective`` replaces
    both (see :class:`~rnnkit.train.Objective`). ``config`` (:class:`TrainConfig`) sets everything
    else, the run folder (``out``) and ``resume`` included. ``test_data`` are evaluated once, with
    the best weights, into ``summary.json``. ``run_info`` is what the command line records about
    its task (``task``, ``title``, ``options``, ``data``, ``preprocessing``, and how to resume or
    start again, ``resume`` and ``again``).
    Returns the :class:`~rnnkit.train.History`; ``model`` ends with the best epoch's weights.
    """
    config = (config or TrainConfig()).check()
    info = dict(run_info or {})
    train = as_source(train_data, "train_data")
    val = None if val_data is None else as_source(val_data, "val_data")
    test = None if test_data is None else as_source(test_data, "test_data")
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise RunError(
            "--tensorboard needs the tensorboard package, which is not installed: "
            "pip install tensorboard (the rnnkit[train] extra has it)"
        )
    if config.patience and val is None:
        raise RunError("patience (early stopping) needs val_data to watch; give val_data")
    if objective is None:
        objective = infer(train.targets_sample(), loss, metric)
    if config.threads is not None:
        # Only when asked: a library call does not change torch's threads behind the user's back
        # (the command line picks them from the load; see run.set_threads).
        runs.set_threads(config.threads)
    started = not (dist.is_available() and dist.is_initialized())
    rank, world, device = runs.init_distributed(config.device)
    run = None
    try:
        run = runs.run_dir(config.out, config.resume, info.get("task", "fit"), rank, world)
        parts = (train, val, test)
        trainer = _Trainer(model, objective, parts, config, info, run, (rank, world, device))
        state = trainer.loop(trainer.start())
        return trainer.finish(state, test_data, val_data)
    except KeyboardInterrupt:
        if rank == 0:
            _say_interrupted(run, info)
        raise
    finally:
        if started and world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _say_interrupted(run: Path | None, info: dict) -> None:
    if run is not None and (run / CHECKPOINT).exists():
        how = info.get(
            "resume", f"rnnkit.fit(..., config=TrainConfig(out={str(run)!r}, resume=True))"
        )
        print(
            f"\ninterrupted; the checkpoint of the last finished epoch is in {run}. "
            f"Continue with:\n  {how}",
            file=sys.stderr,
        )
    else:
        print(
            "\ninterrupted before the first epoch ended; nothing to resume. Start over with "
            + info.get("again", "the same call"),
            file=sys.stderr,
        )


def _optimizer(model: nn.Module, c: TrainConfig, steps: int):
    if c.optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=c.lr, weight_decay=c.weight_decay)
    else:
        opt = torch.optim.SGD(
            model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay
        )
    if c.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=max(steps, 1))
    elif c.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def _autocast(device: torch.device, precision: str):
    """bfloat16 autocast for ``precision="bf16"`` where the device runs it, else a no-op."""
    bf16 = precision == "bf16"
    if bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise RunError(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bfloat16")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _checksum(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _describe(net: nn.Module) -> str:
    c = getattr(net, "config", None)
    if c is None or not hasattr(c, "cell"):
        return type(net).__name__
    return f"{c.cell.upper()} H={c.hidden_size} L={c.num_layers}" + (
        " bidirectional" if c.bidirectional else ""
    )


def fmt_metric(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric == "accuracy":
        return f"{100 * value:.2f}%"
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.4g}"


def _all_finite(loss: torch.Tensor, norm: torch.Tensor, world: int) -> bool:
    """Whether this step's loss and gradient norm are finite, in every process."""
    bad = (~torch.isfinite(loss) | ~torch.isfinite(norm)).float()
    if world > 1:
        # Every process must stop at the same step, or the others wait for it for ever.
        dist.all_reduce(bad)
    return not bool(bad)


class _Trainer:
    """The set-up of one run and the steps of its loop (:meth:`loop`)."""

    def __init__(self, net, objective, parts, config, info, run, where) -> None:
        self.rank, self.world, self.device = where
        self.net, self.objective, self.config, self.info, self.run = (
            net,
            objective,
            config,
            info,
            run,
        )
        self.train, self.val, self.test = parts  # Sources; val and test may be None
        self.writer = self.rank == 0
        self.loud = self.writer and not config.quiet
        self.net.to(self.device)
        self.model = self.net
        if self.world > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(self.net, device_ids=ids)
        self.steps_per_epoch = self.train.steps(config.batch_size, self.world)
        total = config.epochs * self.steps_per_epoch
        self.opt, self.sched = _optimizer(self.net, config, total)
        self.log_every = config.log_every or max(1, self.steps_per_epoch // 10)
        self.autocast = _autocast(self.device, config.precision)
        self.record = self._run_record()
        self.metrics_file = self.tensorboard = None

    def _run_record(self) -> dict:
        """config.json: what identifies the run (a checkpoint must agree) and how it ran."""
        c, info, net = self.config, self.info, self.net
        model_config = getattr(net, "config", None)
        options = info.get("options") or {
            k: v for k, v in c.to_dict().items() if k not in ("device", "out", "resume", "quiet")
        }
        digest = hashlib.sha256(json.dumps(info.get("preprocessing", {}), sort_keys=True).encode())
        # What a resumed run must find again: the split sizes and the preprocessing.
        fingerprint = {
            "sizes": [len(part) if part else 0 for part in (self.train, self.val, self.test)],
            "preprocessing": digest.hexdigest()[:16],
        }
        return {
            "task": info.get("task", "fit"),
            "options": options,
            "device": c.device,
            "data": info.get("data", {}),
            "data_fingerprint": fingerprint,
            "model_config": model_config.to_dict() if hasattr(model_config, "to_dict") else None,
            "model_class": f"{type(net).__module__}.{type(net).__qualname__}",
            "world_size": self.world,
            "rnnkit_version": __version__,
            "torch_version": torch.__version__,
        }

    # ---- set-up: a fresh run, or the state of the one to resume

    def start(self) -> TrainState:
        run, c = self.run, self.config
        fresh_again = (run / CONFIG).exists() and not runs.committed(run)
        if not c.resume and runs.committed(run):
            raise RunError(
                f"{str(run)!r} already holds a run; pass --resume to continue it, "
                "or choose another --out"
            )
        runs.check_writable(run)
        if c.resume and not fresh_again:
            return self._resume()
        if self.writer:
            if c.resume:
                print(
                    f"{self.info.get('title', 'rnnkit.fit')}: nothing to resume in {run} (the "
                    "run stopped before its first epoch ended); starting it over",
                    file=sys.stderr,
                )
            try:
                run.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise RunError(
                    f"cannot make the run folder {str(run)!r} ({e.strerror or e})"
                ) from None
            remove_stale_temps(run)
            write_json(run / CONFIG, self.record)
            write_text(run / runs.METRICS, "")
        self._announce("training", None)
        return TrainState()

    def _resume(self) -> TrainState:
        run = self.run
        saved = read_json(run / CONFIG, "run config")
        now = self.record["options"]
        names = set(saved.get("options", {})) | set(now)
        runs.check_resumable(run, saved, self.record["task"], self.world, now, names)
        if saved.get("data_fingerprint") != self.record["data_fingerprint"]:
            raise DataError(
                f"the data of {str(run)!r} changed since the run started (split sizes or "
                f"preprocessing differ: {saved.get('data_fingerprint')} then, "
                f"{self.record['data_fingerprint']} now); it cannot be resumed on different data"
            )
        if self.writer:
            remove_stale_temps(run)
        state = TrainState.load(
            run / CHECKPOINT, saved, self.net, self.opt, self.sched, self.rank, self.device
        )
        if self.writer:
            # The weights file may be ahead of the checkpoint (a crash between the two writes):
            # the checkpoint is the commit record, so the weights follow it.
            if state.best["state"] is not None:
                self._save_model(state)
            text = "".join(to_json(r) + "\n" for r in state.history)
            write_text(run / runs.METRICS, text)
        self._announce("continuing", state)
        return state

    def _announce(self, what: str, state: TrainState | None) -> None:
        if not self.loud:
            return
        sizes = f"{len(self.train)} train / {len(self.val) if self.val else 0} val"
        if self.test is not None:
            sizes += f" / {len(self.test)} test"
        print(
            f"{self.info.get('title', 'rnnkit.fit')}: {what} {_describe(self.net)} "
            f"({count_parameters(self.net):,} parameters) on {self.device}"
            + (f" x {self.world} processes" if self.world > 1 else "")
            + f"; {sizes}; run folder {self.run}"
        )
        if state is not None:
            print(f"resuming after epoch {state.epoch} of {self.config.epochs}")

    # ---- the loop

    def loop(self, state: TrainState) -> TrainState:
        """Per epoch: train, validate, keep the best, save; until the epochs or the patience
        run out."""
        c, self.state = self.config, state
        self._open_logs(state)
        try:
            for epoch in range(state.epoch, c.epochs):
                if state.patience_spent(c.patience):
                    break
                t0 = time.perf_counter()
                records, sums, step = self.train_epoch(epoch, state)
                record = self.epoch_record(epoch, step, sums, state.elapsed, t0)
                records.append(record)
                key, score = self.rank_epoch(record)
                improved = state.end_epoch(records, key, score, self.net)
                state.rng = self.gather_rng()
                self.save(state, improved, records)
                self.print_epoch(record, improved)
        finally:
            self._close_logs()
        return state

    def train_epoch(self, epoch: int, state: TrainState) -> tuple[list[dict], torch.Tensor, int]:
        """One pass over this process's share of the training data: the step records, the
        sums (loss, count, metric) over its batches from every process, and the step reached."""
        c, model, objective, step = self.config, self.model, self.objective, state.step
        model.train()
        sums = torch.zeros(3, dtype=torch.float64)
        records = []
        batches = self.train.train_batches(epoch, c.seed, c.batch_size, self.rank, self.world)
        bar = self._progress(epoch)
        for b, (inputs, y) in enumerate(batches):
            with self.autocast:
                out = model(*(t.to(self.device) for t in inputs))
                loss_sum, count, metric_sum = objective.scores(out, y.to(self.device))
            loss = loss_sum / count.to(loss_sum.device)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            # With clipping off this only measures the norm (the factor is clamped to 1).
            norm = nn.utils.clip_grad_norm_(model.parameters(), c.clip_grad or math.inf)
            if not _all_finite(loss.detach(), norm, self.world):
                raise self.diverged(
                    f"the training loss became {float(loss.detach()):g} at step {step + 1} "
                    f"(epoch {epoch + 1}), gradient norm {float(norm):g}",
                    epoch,
                    state,
                )
            self.opt.step()
            self.sched.step()
            step += 1
            sums += (
                torch.stack([loss_sum, count.to(loss_sum.device), metric_sum])
                .detach()
                .double()
                .cpu()
            )
            if step % self.log_every == 0:
                records.append(self.step_record(step, epoch, b, loss))
            bar.update(loss)
        bar.close()
        if self.world > 1:
            dist.all_reduce(sums)
        return records, sums, step

    def step_record(self, step: int, epoch: int, b: int, loss: torch.Tensor) -> dict:
        return {
            "kind": "step",
            "step": step,
            "epoch": epoch + 1,
            "epoch_float": round(epoch + (b + 1) / self.steps_per_epoch, 4),
            "loss": float(loss.detach()),
            "lr": self.sched.get_last_lr()[0],
        }

    def evaluate(self, source: Source) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        """``(outputs, targets, mean loss, metric)`` of ``source`` with the current weights."""
        with self.autocast:
            out, y = source.outputs(self.net, self.device, max(self.config.batch_size, 256))
        loss, count, metric = self.objective.scores(out, y)
        return out, y, float(loss / count), self.objective.metric_value(float(metric), float(count))

    def epoch_record(self, epoch: int, step: int, sums, elapsed: float, t0: float) -> dict:
        m = self.objective.metric
        record = {
            "kind": "epoch",
            "epoch": epoch + 1,
            "step": step,
            "train_loss": float(sums[0] / sums[1]),
            f"train_{m}": self.objective.metric_value(float(sums[2]), float(sums[1])),
        }
        if self.val is not None:
            _, _, val_loss, val_metric = self.evaluate(self.val)
            if not finite(val_loss, val_metric):
                raise self.diverged(
                    f"the validation loss became {val_loss:g} after epoch {epoch + 1}",
                    epoch,
                    self.state,
                )
            record.update({"val_loss": val_loss, f"val_{m}": val_metric})
        record["lr"] = self.sched.get_last_lr()[0]
        record["seconds"] = round(elapsed + time.perf_counter() - t0, 3)
        return record

    def rank_epoch(self, record: dict) -> tuple[list[float], float]:
        """What the best epoch is chosen by, and its score: the validation metric, or without
        validation data simply the latest epoch (scored by its training metric)."""
        m = self.objective.metric
        if self.val is None:
            return [float(record["epoch"])], record[f"train_{m}"]
        higher = self.objective.higher_is_better
        return better_key(record["val_loss"], record[f"val_{m}"], higher), record[f"val_{m}"]

    def gather_rng(self) -> list[dict]:
        rng = [rng_state(self.device)]
        if self.world > 1:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        return rng

    def save(self, state: TrainState, improved: bool, records: list[dict]) -> None:
        if not self.writer:
            return
        # The weights first, the checkpoint (the commit record) last: see the module docstring.
        if improved:
            self._save_model(state)
        state.save(self.run / CHECKPOINT, self.record, self.net, self.opt, self.sched)
        self.metrics_file.write("".join(to_json(r) + "\n" for r in records))
        self.metrics_file.flush()
        if self.tensorboard is not None:
            for r in records:
                for k, v in r.items():
                    if k not in ("kind", "epoch", "step", "epoch_float") and v is not None:
                        self.tensorboard.add_scalar(f"{r['kind']}/{k}", v, r["step"])
            self.tensorboard.flush()

    def _save_model(self, state: TrainState) -> None:
        best, r = state.best, self.record
        meta = {
            "task": r["task"],
            "model_config": r["model_config"],
            "model_class": r["model_class"],
            "preprocessing": self.info.get("preprocessing", {}),
            "data": r["data"],
            "epoch": best["epoch"],
            f"val_{self.objective.metric}": best["score"],
        }
        save_model(self.run / MODEL, best["state"], meta)

    def print_epoch(self, r: dict, improved: bool) -> None:
        if not self.loud:
            return
        m, E = self.objective.metric, self.config.epochs
        val = ""
        if self.val is not None:
            val = f"  val loss {r['val_loss']:.4f} {m} {fmt_metric(m, r[f'val_{m}'])}"
        print(
            f"epoch {r['epoch']:>{len(str(E))}}/{E}  train loss {r['train_loss']:.4f} "
            f"{m} {fmt_metric(m, r[f'train_{m}'])}{val}  {r['seconds']:.1f}s"
            + ("  *" if improved else ""),
            flush=True,
        )

    def diverged(self, what: str, epoch: int, state: TrainState) -> TrainingFailed:
        c, run, best = self.config, self.run, state.best["epoch"]
        kept = (
            f"the checkpoint of epoch {epoch} and the weights of epoch {best}, the best so "
            f"far, are kept in {run}"
            if epoch
            else f"no epoch finished, so {run} holds no checkpoint"
        )
        return TrainingFailed(
            f"training stopped: {what} (the weights diverged, or the data holds extreme values); "
            f"try a smaller --lr (it is {c.lr:g}) or --clip-grad (it is {c.clip_grad:g}; "
            f"0 = off); {kept}"
        )

    # ---- logs: progress bar, metrics.jsonl, TensorBoard

    def _progress(self, epoch: int) -> "_Bar":
        enabled = self.loud and sys.stderr.isatty()
        return _Bar(enabled, f"epoch {epoch + 1}/{self.config.epochs}", self.steps_per_epoch)

    def _open_logs(self, state: TrainState) -> None:
        if not self.writer:
            return
        self.metrics_file = open(self.run / runs.METRICS, "a", encoding="utf-8")
        if self.config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Events after the checkpoint's step belong to an interrupted epoch: drop them.
            self.tensorboard = SummaryWriter(str(self.run / "tensorboard"), purge_step=state.step)

    def _close_logs(self) -> None:
        if self.metrics_file is not None:
            self.metrics_file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    # ---- the end: best weights, test figures, summary and plots

    def finish(self, state: TrainState, test_data: object, val_data: object) -> History:
        self.net.load_state_dict(state.best["state"])
        # Only an objective that learns something after training (it names the keys) costs a
        # second pass over the validation data.
        if self.val is not None and self.objective.calibration_keys:
            out, y, _, _ = self.evaluate(self.val)
            learnt = self.objective.calibrate(out, y, getattr(self.val, "split", val_data))
            if learnt:
                self.info["preprocessing"] = {**self.info.get("preprocessing", {}), **learnt}
                if self.writer:
                    self._save_model(state)
        report = None
        if self.test is not None:
            out, y, _, _ = self.evaluate(self.test)
            report = self.objective.report(out, y, getattr(self.test, "split", test_data))
        checksums = [_checksum(self.net)]
        if self.world > 1:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, checksums[0])
            checksums = gathered
        stopped = state.epoch < self.config.epochs
        history = History(
            state.history,
            state.best["epoch"],
            state.best["score"],
            self.run,
            stopped,
            report.metrics if report else {},
        )
        if self.writer:
            self._summarise(state, report, checksums, stopped)
        if self.world > 1:
            # The processes end together: one tearing down gloo while another still writes
            # aborted now and then ("terminate called without an active exception").
            dist.barrier()
        return history

    def _summarise(self, state: TrainState, report, checksums: list[str], stopped: bool) -> None:
        from rnnkit.train import plots

        m, run, best = self.objective.metric, self.run, state.best
        summary = {
            "task": self.record["task"],
            **(report.metrics if report else {}),
            "best_epoch": best["epoch"],
            f"best_val_{m}": best["score"],
            "epochs": state.epoch,
            "stopped_early": stopped,
            "train_seconds": round(state.elapsed, 2),
            "parameters": count_parameters(self.net),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "world_size": self.world,
            "rank_checksums": checksums,
            "run_dir": str(run),
        }
        files = [CONFIG, runs.METRICS, CHECKPOINT, MODEL, runs.SUMMARY]
        title = f"{self.record['task']}: {_describe(self.net)}, best epoch {best['epoch']}"
        plots.curves(state.history, m, self.objective.loss_name, title, run / "curves.png")
        files += ["curves.png", *(self.objective.plots(report, run) if report else [])]
        if self.tensorboard is not None or self.config.tensorboard:
            files.append("tensorboard/")
        summary["files"] = files
        write_json(run / runs.SUMMARY, summary)
        self._print_summary(state, report, files, stopped)

    def _print_summary(self, state: TrainState, report, files: list[str], stopped: bool) -> None:
        m, best, n = self.objective.metric, state.best, state.epoch
        early = f" (stopped early: no better validation {m} for {self.config.patience})"
        print(
            f"\n{self.info.get('title', 'rnnkit.fit')}: done, {n} epoch{'s' if n != 1 else ''} "
            f"in {state.elapsed:.1f} s{early if stopped else ''}; "
            + ("test uses" if report else "the model holds")
            + f" the weights of epoch {best['epoch']}"
            + (f" (best validation {m} {fmt_metric(m, best['score'])})" if self.val else "")
        )
        if report:
            print(table(summary_rows(report.metrics)))
        print(f"run folder: {self.run}/")
        print("  " + ", ".join(files))


class _Bar:
    """The progress bar of an epoch (tqdm: rate and time left) with the live loss, on a
    terminal only; reading the loss syncs the device, so at most ~10 times a second."""

    def __init__(self, enabled: bool, desc: str, total: int) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="batch", leave=False, file=sys.stderr)
        self.shown = 0.0

    def update(self, loss: torch.Tensor) -> None:
        if self.bar is None:
            return
        if time.monotonic() - self.shown > 0.1:
            self.shown = time.monotonic()
            self.bar.set_postfix_str(f"loss {float(loss.detach()):.4f}", refresh=False)
        self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def table(rows: list[tuple[str, str]]) -> str:
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    out = [f"  {'metric'.ljust(w)}  {'value'.rjust(v)}", f"  {'-' * w}  {'-' * v}"]
    out += [f"  {a.ljust(w)}  {b.rjust(v)}" for a, b in rows]
    return "\n".join(out)


def summary_rows(metrics: dict) -> list[tuple[str, str]]:
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
