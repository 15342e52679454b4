"""The ``rnnkit`` command: ``params``, ``shapes``, ``demo`` (and the training commands)."""

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

from rnnkit.params import param_count
from rnnkit.validation import format_shape

_MODES = ("rnn", "lstm", "gru")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (the usage block stays behind ``--help``), like
    every other error of the command, so that scripts can read stderr as a single message."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_layer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("mode", choices=_MODES, help="layer type")
    p.add_argument("--input-size", type=int, required=True, help="features per time step (I)")
    p.add_argument(
        "--hidden-size", type=int, required=True, help="features of the hidden state (H)"
    )
    p.add_argument("--num-layers", type=int, default=1, help="stacked layers (L), default 1")
    p.add_argument("--bidirectional", action="store_true", help="two directions (D=2)")
    p.add_argument("--no-bias", action="store_true", help="bias=False")
    p.add_argument("--proj-size", type=int, default=0, help="LSTM projection size (P), default 0")


def _table(rows: Sequence[Sequence[str]], right: Sequence[bool]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        cells = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right, strict=False)
        ]
        lines.append("  ".join(cells).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_params(args: argparse.Namespace) -> int:
    pc = param_count(
        args.mode,
        args.input_size,
        args.hidden_size,
        args.num_layers,
        bias=not args.no_bias,
        bidirectional=args.bidirectional,
        proj_size=args.proj_size,
    )
    rows = [("tensor", "shape", "count")]
    rows += [(name, format_shape(shape), f"{n:,}") for name, shape, n in pc.tensors]
    print(_table(rows, (False, False, True)))
    print()
    print(f"formula: {pc.formula}")
    for layer, subtotal in enumerate(pc.per_layer):
        print(f"  layer {layer}: {subtotal:,}")
    print(f"total: {pc.total:,} parameters")
    return 0


def shape_rows(
    mode: str,
    input_size: int,
    hidden_size: int,
    num_layers: int,
    bidirectional: bool,
    proj_size: int,
    seq_len: int,
    batch: int,
    batch_first: bool,
) -> list[tuple[str, tuple[int, ...], str]]:
    """The tensors going in and out of a layer, their shapes and one line of meaning each."""
    d = 2 if bidirectional else 1
    r = proj_size or hidden_size
    seq = (batch, seq_len) if batch_first else (seq_len, batch)
    order = "batch, seq_len" if batch_first else "seq_len, batch"
    rows = [
        ("input", (*seq, input_size), f"({order}, input_size): one feature vector per step"),
        (
            "h0",
            (num_layers * d, batch, r),
            "initial h of every layer and direction (zeros if omitted); never batch_first",
        ),
    ]
    if mode == "lstm":
        rows.append(
            (
                "c0",
                (num_layers * d, batch, hidden_size),
                "initial cell state of every layer and direction (zeros if omitted)",
            )
        )
    rows.append(
        (
            "output",
            (*seq, d * r),
            "h of the LAST layer at EVERY step, directions side by side",
        )
    )
    rows.append(
        (
            "h_n",
            (num_layers * d, batch, r),
            "h of EVERY layer and direction after its last step (reverse: step 0); "
            "row layer * D + direction",
        )
    )
    if mode == "lstm":
        rows.append(
            (
                "c_n",
                (num_layers * d, batch, hidden_size),
                "c of every layer and direction after its last step",
            )
        )
    return rows


def cmd_shapes(args: argparse.Namespace) -> int:
    rows = shape_rows(
        args.mode,
        args.input_size,
        args.hidden_size,
        args.num_layers,
        args.bidirectional,
        args.proj_size,
        args.seq_len,
        args.batch,
        args.batch_first,
    )
    table = [("tensor", "shape", "meaning")]
    table += [(name, format_shape(shape), meaning) for name, shape, meaning in rows]
    print(_table(table, (False, False, False)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from rnnkit.demo import main as demo_main

    return demo_main()


def _without_training(sub: argparse._SubParsersAction, why: str) -> None:
    """``train``, ``evaluate`` and ``predict`` that say which extra they need."""

    def refuse(args: argparse.Namespace) -> int:
        print(f"rnnkit {args.command}: error: {why}", file=sys.stderr)
        return 2

    for name in ("train", "evaluate", "predict"):
        p = sub.add_parser(name, help=f"({why.split(';')[0]})", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=refuse)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rnnkit", description="Readable, fast, torch.nn-compatible recurrent networks."
    )
    from rnnkit import __version__

    parser.add_argument("--version", action="version", version=f"rnnkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="parameter count of a layer, per tensor, with the formula")
    _add_layer_args(p)
    p.set_defaults(func=cmd_params)
    p = sub.add_parser("shapes", help="the shapes going in and out of a layer, and what they mean")
    _add_layer_args(p)
    p.add_argument("--seq-len", type=int, required=True, help="time steps (T)")
    p.add_argument("--batch", type=int, required=True, help="sequences per batch (B)")
    p.add_argument("--batch-first", action="store_true", help="batch_first=True")
    p.set_defaults(func=cmd_shapes)
    p = sub.add_parser(
        "demo", help="a worked example: shapes, parameter counts, parity with torch.nn"
    )
    p.set_defaults(func=cmd_demo)
    try:
        from rnnkit.train import require_extra

        require_extra()
    except ImportError as e:
        _without_training(sub, str(e))
    else:
        from rnnkit.train.cli import add_commands

        add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "mode", None) is not None and hasattr(args, "input_size"):
        for name in ("input_size", "hidden_size", "num_layers"):
            if getattr(args, name) <= 0:
                parser.error(
                    f"--{name.replace('_', '-')} must be a positive integer, "
                    f"got {getattr(args, name)}"
                )
        if args.proj_size and args.mode != "lstm":
            parser.error(f"--proj-size is only supported for lstm, not {args.mode}")
        for name, least in (("seq_len", 1), ("batch", 0)):
            if getattr(args, name, least) < least:
                what = "a positive integer" if least else "0 or more"
                parser.error(
                    f"--{name.replace('_', '-')} must be {what}, got {getattr(args, name)}"
                )
        if args.proj_size < 0 or (args.proj_size and args.proj_size >= args.hidden_size):
            parser.error(
                f"--proj-size must be 0 or between 1 and hidden_size - 1 = {args.hidden_size - 1}, "
                f"got {args.proj_size}"
            )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
