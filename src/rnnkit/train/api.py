"""``rnnkit.load`` and ``rnnkit.predict``: a run folder's model back, and what it predicts."""

import copy
import itertools
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from rnnkit.train.checkpoint import (
    CHECKPOINT,
    CONFIG,
    MODEL,
    MODEL_INT8,
    CheckpointError,
    load_model,
    model_checksum,
    read_committed_best,
)
from rnnkit.train.config import RunError
from rnnkit.train.run import SUMMARY, committed


def load(
    run_dir: str | os.PathLike,
    *,
    model: nn.Module | None = None,
    device: str = "cpu",
    quantize: bool = False,
) -> nn.Module:
    """The trained model of a run folder (written by ``rnnkit train`` or ``rnnkit.fit``), with
    the weights of its best epoch, in eval mode on ``device``, ready for :func:`predict`.

    Its preprocessing comes with it: ``model.preprocessing`` holds what the task needs to read
    new input (vocabularies, class names, scaling) and ``model.run_info`` the rest of the saved
    description (``task``, ``data``, ``epoch``, ``model_config``). A model of the command line's
    tasks is rebuilt from its ``ModelConfig``; for a model of your own class, pass ``model``, a
    new instance of it, and the weights are loaded into that. An unfinished run gives the best
    epoch its checkpoint committed, as resuming it would.

    ``quantize=True`` gives the int8 model (:func:`rnnkit.quantize`, CPU only): the run's
    ``model-int8.safetensors`` where ``rnnkit quantize`` wrote one from these weights, else the
    weights quantized now (the same numbers).
    """
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(
            f"rnnkit.load: run_dir must be a str or a path; got {type(run_dir).__name__}"
        )
    if not str(run_dir).strip():
        raise RunError("RUN is empty; expected a run folder written by rnnkit train")
    run = Path(run_dir)
    if not run.is_dir():
        what = "is a file, not a folder" if run.exists() else "does not exist"
        raise RunError(f"run folder {str(run_dir)!r} {what}")
    if (run / CONFIG).exists() and not committed(run):
        raise CheckpointError(
            f"the run in {str(run)!r} stopped before its first epoch ended, so it has no weights "
            "yet; train it again with the same --out"
        )
    net, meta = load_model(run / MODEL, model)
    _check_meta(run / MODEL, meta)
    if not (run / SUMMARY).exists() and (run / CHECKPOINT).exists():
        # An unfinished run: its checkpoint is the commit record, and the weights file may be an
        # epoch ahead of it (a crash between the two writes). Use what resuming would use.
        best = read_committed_best(run / CHECKPOINT)
        if best is not None and best.get("epoch") != meta.get("epoch"):
            try:
                net.load_state_dict(best["state"])
                meta = {**meta, "epoch": best["epoch"]}
            except (RuntimeError, KeyError, TypeError):
                pass
    if quantize:
        net, meta = _quantized(run, net, meta, model, device)
    net.preprocessing = meta["preprocessing"]
    net.run_info = meta
    return net.to(device).eval()


def _quantized(run: Path, net: nn.Module, meta: dict, model: nn.Module | None, device: str):
    """The int8 twin of a loaded run's model: its saved int8 file where that was made from the
    same weights (and epoch), else ``net`` quantized."""
    from rnnkit.quantized import quantize

    if torch.device(device).type != "cpu":
        raise RunError(f"int8 models run on the CPU; got device {device!r} (drop --quantize or "
                       "use --device cpu)")  # fmt: skip
    saved = run / MODEL_INT8
    if saved.exists():
        qnet, qmeta = load_model(saved, None if model is None else copy.deepcopy(model))
        same = qmeta.get("float_sha256") == model_checksum(run / MODEL)
        if same and qmeta.get("epoch") == meta.get("epoch"):
            return qnet, {**meta, "quantized": "int8"}
    return quantize(net), {**meta, "quantized": "int8"}


def _check_meta(path: Path, meta: dict) -> None:
    """The description in a model file holds what evaluate and predict read, and its classes
    agree with the model's outputs (a file from another version or edited by hand may not)."""
    from rnnkit.tasks import TASKS

    if meta.get("task") not in (*TASKS, "fit"):
        raise CheckpointError(f"{str(path)!r} names an unknown task {meta.get('task')!r}")
    missing = [k for k in ("preprocessing", "data", "epoch") if k not in meta]
    if missing or not isinstance(meta.get("preprocessing"), dict):
        raise CheckpointError(
            f"model file {str(path)!r} lacks {', '.join(missing) or 'a valid preprocessing'} in "
            "its description; it was written by another version of rnnkit or edited"
        )
    labels = meta["preprocessing"].get("classes", meta["preprocessing"].get("tags"))
    outputs = (meta.get("model_config") or {}).get("output_size")
    if labels is not None and (not isinstance(labels, list) or len(labels) != outputs):
        raise CheckpointError(
            f"model file {str(path)!r} names {len(labels) if isinstance(labels, list) else 0} "
            f"classes, but its model has {outputs} outputs; it was edited or is damaged"
        )


def task_of(model: nn.Module):
    """The command-line task a loaded model was trained on, with its preprocessing; None for
    ``rnnkit.fit`` runs."""
    from rnnkit.tasks import TASKS

    name = getattr(model, "run_info", {}).get("task")
    if name not in TASKS:
        return None
    task = TASKS[name]()
    task.preprocessing = model.preprocessing
    return task


@torch.no_grad()
def predict(
    model: nn.Module,
    data: Tensor | tuple | str | os.PathLike,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> Tensor | str:
    """What ``model`` predicts for ``data``: its outputs for a tensor (or a tuple of the model's
    inputs), in batches along the first dimension, in eval mode, on the CPU; or, for a model
    :func:`load` ed from a task's run and a file path, the task's predictions as the text of an
    output file (what ``rnnkit predict`` writes)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise RunError(f"--batch-size must be a positive integer; got {batch_size}")
    if device is None:
        first = next(itertools.chain(model.parameters(), model.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    if isinstance(data, (str, os.PathLike)):
        task = task_of(model)
        if task is None:
            raise TypeError(
                "rnnkit.predict: a file path needs a model loaded from a task's run folder; give "
                "tensors for a model trained with rnnkit.fit"
            )
        if not str(data).strip():
            raise RunError("INPUT is empty; expected the file to predict for")
        return task.predict(model.to(device), Path(data), device, batch_size)
    inputs = (data,) if isinstance(data, Tensor) else tuple(data)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TypeError("rnnkit.predict: data must be a tensor, a tuple of tensors or a file path")
    model.eval()
    outs = []
    for start in range(0, inputs[0].shape[0], batch_size):
        batch = (t[start : start + batch_size].to(device) for t in inputs)
        outs.append(model(*batch).cpu())
    return torch.cat(outs)
