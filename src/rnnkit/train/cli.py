"""``rnnkit train``, ``rnnkit evaluate`` and ``rnnkit predict``: thin users of ``rnnkit.fit``,
``rnnkit.load`` and ``rnnkit.predict`` over the tasks in ``rnnkit.tasks``.

Options come from the task's defaults, then ``--config FILE.toml``, then the flags; they are one
flat dict of names (as ``config.json`` records them) that become a ``TrainConfig``, a
``ModelConfig`` and the task's data options.
"""

import argparse
import sys
from dataclasses import fields
from pathlib import Path

import torch
from torch import distributed as dist

from rnnkit import engines
from rnnkit.data import DataError
from rnnkit.models import CELLS, READOUTS, ModelConfig, build_model
from rnnkit.params import count_parameters
from rnnkit.tasks import TASKS, Task
from rnnkit.train import run as runs
from rnnkit.train.api import load, predict, task_of
from rnnkit.train.checkpoint import CONFIG, CheckpointError, read_json, write_json, write_text
from rnnkit.train.config import (
    RESUME_FREE,
    TRAIN_FIELDS,
    RunError,
    TrainConfig,
    TrainingFailed,
    check_options,
    flag,
    read_toml,
)
from rnnkit.train.data import SplitSource
from rnnkit.train.loop import fit, summary_rows, table

_ERRORS = (RunError, DataError, CheckpointError)
# The ModelConfig fields a flag sets; the data decide the others.
MODEL_FIELDS = (
    "cell",
    "hidden_size",
    "num_layers",
    "bidirectional",
    "dropout",
    "readout",
    "backend",
)
# Flags that are about this invocation, not options of the run.
_NOT_OPTIONS = {"command", "task", "func", "out", "resume", "quiet", "config"}


def defaults(task: Task) -> dict:
    """Every option of ``task`` with its default, by name."""
    model = {f.name: f.default for f in fields(ModelConfig) if f.name in MODEL_FIELDS}
    train = {k: v for k, v in TrainConfig().to_dict().items() if k not in _NOT_OPTIONS}
    options = {**train, **task.train, **model, **task.model, **task.option_defaults}
    if task.name == "tagger":
        options.pop("readout")
    return options


def _model_options(p: argparse.ArgumentParser, task: Task, d: dict) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--cell", choices=CELLS, help=f"recurrent cell type (default {d['cell']})")
    g.add_argument(
        "--hidden-size",
        type=int,
        metavar="H",
        help=f"hidden state size (default {d['hidden_size']})",
    )
    g.add_argument(
        "--num-layers", type=int, metavar="L", help=f"stacked layers (default {d['num_layers']})"
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
            "last step, 'hn' = h_n of every layer and direction concatenated, 'mean' = the last "
            f"output with both directions averaged (default {d['readout']})",
        )
    g.add_argument(
        "--backend",
        choices=engines.BACKENDS,
        help=f"the engine that runs the recurrent layers (default {d['backend']})",
    )


def _training_options(p: argparse.ArgumentParser, d: dict) -> None:
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
        "--patience",
        type=int,
        metavar="N",
        help="stop early after N epochs without a better validation metric; 0 = off (default 0)",
    )
    g.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        help="bf16: forward passes under bfloat16 autocast, where the device has it (default fp32)",
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


def _output_options(p: argparse.ArgumentParser, task: Task) -> None:
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
        "--config",
        metavar="FILE.toml",
        help="options from a TOML file, one `name = value` per line (names as the flags, e.g. "
        "hidden-size = 64); flags given here override it",
    )
    g.add_argument(
        "--log-every",
        type=int,
        metavar="N",
        help="log the training loss every N steps (default: ~10 per epoch)",
    )
    g.add_argument(
        "--tensorboard",
        action="store_true",
        default=None,
        help="also write TensorBoard scalars to DIR/tensorboard (needs the tensorboard package)",
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
        # argparse formats a help string with %: a task's "90% quantiles" needs its % doubled.
        tp = tasks.add_parser(
            name, help=task.help.replace("%", "%%"), description=f"{name}: {task.help}."
        )
        task.add_arguments(tp.add_argument_group("data"))
        d = defaults(task)
        _model_options(tp, task, d)
        _training_options(tp, d)
        _output_options(tp, task)
        tp.set_defaults(func=cmd_train, parser=tp)
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
    _quantize_option(p)
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
    _quantize_option(p)
    p.set_defaults(func=cmd_predict)
    p = sub.add_parser(
        "quantize",
        help="write a run's int8 model (model-int8.safetensors) for evaluate/predict --quantize",
        description="Quantize a trained run's recurrent layers to int8 (rnnkit.quantize: int8 "
        "weights with a scale per row, activations quantized per step, CPU) and write "
        "RUN/model-int8.safetensors, which evaluate and predict --quantize then read.",
    )
    p.add_argument("run", metavar="RUN", help="a run folder written by rnnkit train")
    p.set_defaults(func=cmd_quantize)


def _quantize_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        action="store_true",
        help="run the int8 model (CPU): RUN/model-int8.safetensors if rnnkit quantize wrote "
        "it, else the weights quantized on loading",
    )


def _fail(command: str, e: Exception) -> int:
    """One line on stderr, argparse's way; 2 for a usage error, 1 for a runtime failure."""
    message = " ".join(str(e).split())
    print(f"rnnkit {command}: error: {message}", file=sys.stderr)
    return getattr(e, "exit_status", 2)


def _guarded(command: str, job, args: argparse.Namespace) -> int:
    try:
        return job(args)
    except _ERRORS as e:
        return _fail(command, e)
    except KeyboardInterrupt:
        if command != "train":
            print(f"\nrnnkit {command}: interrupted", file=sys.stderr)
        return 130


def cmd_train(args: argparse.Namespace) -> int:
    return _guarded(f"train {args.task}", train, args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    return _guarded("evaluate", evaluate, args)


def cmd_predict(args: argparse.Namespace) -> int:
    return _guarded("predict", predict_file, args)


def cmd_quantize(args: argparse.Namespace) -> int:
    return _guarded("quantize", quantize_run, args)


# ---- train


def _from_toml(args: argparse.Namespace) -> dict:
    """The ``--config`` file's options, each checked against the flag of the same name."""
    table_ = read_toml(args.config)
    actions = {a.dest: a for a in args.parser._actions if a.dest not in _NOT_OPTIONS | {"help"}}
    unknown = sorted(set(table_) - set(actions))
    if unknown:
        raise RunError(
            f"--config {args.config!r}: unknown option {unknown[0]!r}; the options are "
            + ", ".join(sorted(actions))
        )
    for name, value in table_.items():
        a = actions[name]
        if a.nargs == 0 or isinstance(a, argparse.BooleanOptionalAction):
            ok = isinstance(value, bool)
        elif a.type is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif a.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = isinstance(value, str) and (a.choices is None or value in a.choices)
        if not ok:
            want = f"one of {', '.join(a.choices)}" if a.choices else (a.type or str).__name__
            kind = "true or false" if a.nargs == 0 else want
            raise RunError(f"--config {args.config!r}: {name} must be {kind}; got {value!r}")
        table_[name] = value
    return table_


def _options(args: argparse.Namespace, task: Task) -> tuple[dict, set[str]]:
    """All options with defaults filled in, and the names of those given (as flags or in the
    ``--config`` file): defaults < file < flags."""
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in _NOT_OPTIONS}
    flags.pop("parser", None)
    given = {**(_from_toml(args) if args.config else {}), **flags}
    return {**defaults(task), **given}, set(given)


def _resumed(run: Path, task: Task, options: dict, given: set[str], world: int) -> dict:
    """The options of the run to resume: its own, once the given ones are found to match."""
    saved = read_json(run / CONFIG, "run config")
    runs.check_resumable(run, saved, task.name, world, options, given, spell=flag)
    free = {k: options[k] for k in RESUME_FREE if k in options}
    return {**saved["options"], **free}


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
    free = runs.available_memory()
    if free is not None and need > free:
        raise RunError(
            f"the model would have {n:,} parameters, {need / 2**30:,.1f} GiB to train with "
            f"{optimizer}, more than the {free / 2**30:,.1f} GiB of memory available; choose a "
            "smaller --hidden-size, --num-layers or --embedding-dim"
        )


def _prepare(task: Task, options: dict):
    data = task.data_config(options)
    prepared = task.prepare(data)
    sizes = {"train": len(prepared.train), "validation": len(prepared.val)}
    sizes["test"] = len(prepared.test)
    for part, size in sizes.items():
        if size == 0:
            raise DataError(
                f"the data leave the {part} part empty (train / validation / test: "
                f"{' / '.join(map(str, sizes.values()))} examples); give more data"
            )
    return data, prepared


def train(args: argparse.Namespace) -> int:
    task = TASKS[args.task]()
    options, given = _options(args, task)
    check_options(options)
    runs.set_threads(options.get("threads"))
    rank, world, device = runs.init_distributed(options["device"])
    try:
        run = runs.run_dir(args.out, args.resume, task.name, rank, world)
        if args.resume:
            options = _resumed(run, task, options, given, world)
            check_options(options)
        runs.check_backend(options["backend"], device)
        runs.check_writable(run)
        if world > 1:
            # No process may see the folder rank 0 is about to fill as someone else's run.
            dist.barrier()
        return _train(args, task, options, run)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(args: argparse.Namespace, task: Task, options: dict, run: Path) -> int:
    data, prepared = _prepare(task, options)
    model = {k: options.get(k, "last") for k in MODEL_FIELDS}
    mc = ModelConfig(**prepared.model, **model)
    torch.manual_seed(options["seed"])
    _check_model_fits(mc, options["optimizer"])
    try:
        net = build_model(mc)
    except (MemoryError, torch.OutOfMemoryError) as e:
        raise TrainingFailed(f"the model does not fit in memory ({str(e)[:160]})") from None
    train_fields = {k: options[k] for k in TRAIN_FIELDS if k in options}
    config = TrainConfig(**train_fields).replace(out=str(run), resume=args.resume, quiet=args.quiet)
    info = {
        "task": task.name,
        "title": f"rnnkit train {task.name}",
        "options": {k: v for k, v in options.items() if k != "device"},
        "data": data,
        "preprocessing": prepared.preprocessing,
        "resume": f"rnnkit train {task.name} --out {run} --resume",
        "again": f"the same command (rnnkit train {task.name} --out {run} ...)",
    }
    fit(
        net,
        SplitSource(prepared.train, task),
        SplitSource(prepared.val, task),
        config=config,
        objective=task,
        test_data=SplitSource(prepared.test, task),
        run_info=info,
    )
    return 0


# ---- evaluate and predict


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise RunError(f"--batch-size must be a positive integer; got {batch_size}")


def _check_output(output: str | None) -> None:
    if output is not None and not output.strip():
        raise RunError("--output is empty; give a file, or leave --output out")


def evaluate(args: argparse.Namespace) -> int:
    _check_batch_size(args.batch_size)
    _check_output(args.output)
    device = _device(args)
    model = load(args.run, device=device, quantize=args.quantize)
    meta, task = model.run_info, task_of(model)
    if task is None:
        raise RunError(f"{args.run!r} is a run of rnnkit.fit; evaluate it in Python")
    prepared = task.prepare(meta["data"])
    # What training learnt after the data were read (a calibration) is the model's, not the data's.
    learnt = {k: v for k, v in meta["preprocessing"].items() if k in task.calibration_keys}
    saved = {k: v for k, v in meta["preprocessing"].items() if k not in learnt}
    if prepared.preprocessing != saved:
        diff = sorted(
            k
            for k in {*saved, *prepared.preprocessing}
            if prepared.preprocessing.get(k) != saved.get(k)
        )
        raise DataError(
            "the data files of this run changed since it was trained "
            f"(their {', '.join(diff)} differ "
            "from the model's); evaluate cannot reproduce its splits"
        )
    task.preprocessing.update(learnt)
    split = {"test": prepared.test, "val": prepared.val, "train": prepared.train}[args.split]
    out, y = SplitSource(split, task).outputs(model, device, args.batch_size)
    metrics = task.report(out, y, split).metrics
    if args.split != "test":
        metrics = {k.replace("test_", f"{args.split}_"): v for k, v in metrics.items()}
    run = Path(args.run)
    unfinished = "" if (run / runs.SUMMARY).exists() else " (an unfinished run: the best so far)"
    int8 = " (int8)" if args.quantize else ""
    print(
        f"rnnkit evaluate {run}: {task.name}, {args.split} part, weights of epoch {meta['epoch']}"
        + int8
        + unfinished
    )
    print(table(summary_rows(metrics)))
    if args.output:
        write_json(Path(args.output), {"split": args.split, **metrics})
    return 0


def _device(args: argparse.Namespace) -> str:
    """The device of evaluate and predict: int8 models run on the CPU, which "auto" picks."""
    if args.quantize and args.device == "auto":
        return "cpu"
    return runs.device(args.device, 0)


def quantize_run(args: argparse.Namespace) -> int:
    from rnnkit.train.checkpoint import MODEL, MODEL_INT8, model_checksum, save_model

    model = load(args.run, quantize=True)
    meta = {k: v for k, v in model.run_info.items() if k != "quantized"}
    run = Path(args.run)
    meta.update(quantized="int8", float_sha256=model_checksum(run / MODEL))
    save_model(run / MODEL_INT8, model.state_dict(), meta)
    before, after = (run / MODEL).stat().st_size, (run / MODEL_INT8).stat().st_size
    print(
        f"rnnkit quantize: wrote {run / MODEL_INT8} ({after / 1024:.0f} KiB; "
        f"{MODEL} is {before / 1024:.0f} KiB); evaluate or predict it with --quantize"
    )
    return 0


def predict_file(args: argparse.Namespace) -> int:
    _check_batch_size(args.batch_size)
    _check_output(args.output)
    if not args.input.strip():
        raise RunError("INPUT is empty; expected the file to predict for")
    device = _device(args)
    model = load(args.run, device=device, quantize=args.quantize)
    if task_of(model) is None:
        raise RunError(
            f"{args.run!r} is a run of rnnkit.fit; predict with rnnkit.predict in Python"
        )
    text = predict(model, args.input, batch_size=args.batch_size, device=device)
    if args.output:
        write_text(Path(args.output), text)
        print(
            f"rnnkit predict: wrote {text.count(chr(10))} lines to {args.output}", file=sys.stderr
        )
    else:
        sys.stdout.write(text)
    return 0
