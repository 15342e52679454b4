"""Two revisions of rnnkit timed in one run: bench_engines.py on each, interleaved round by round.

    .venv/bin/python benchmarks/compare_revisions.py --base e9b6609 --rounds 5 -- \
        --shapes 100x1x256 100x16x256 100x64x256 --engines fused fused+ln --repeats 5

The base revision is checked out into a temporary git worktree; the working tree is the head.
Each round runs this checkout's ``bench_engines.py`` (public API only, so it times either
revision) once against the base's package and once against the head's, alternating which goes
first, so that a slow period of the machine hits both alike. Prints a Markdown table: per row,
the median over rounds of each revision's medians (ms), and head / base. Everything after
``--`` goes to bench_engines.py.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_engines.py"


def run_bench(src: Path, bench_args: list[str]) -> dict[tuple, tuple[float, float | None]]:
    """``{(mode, T, B, H, dtype, engine): (fwd ms, fwd+bwd ms)}`` of one bench_engines.py run
    with ``src`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    result = subprocess.run(
        [sys.executable, str(BENCH), *bench_args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 8 or not cells[1].isdigit():
            continue
        key = tuple(cells[:6])
        try:
            fwd = float(cells[6])
        except ValueError:
            continue
        both = float(cells[7]) if cells[7] not in ("n/a", "") else None
        rows[key] = (fwd, both)
    return rows


def _median(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


def main() -> None:
    argv = sys.argv[1:]
    bench_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    own = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--base", required=True, help="the revision to compare with (git rev)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(own)
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_tree), args.base],
            check=True,
            capture_output=True,
        )
        try:
            sources = {"base": base_tree / "src", "head": ROOT / "src"}
            results: dict[str, list[dict]] = {"base": [], "head": []}
            for r in range(args.rounds):
                order = ("base", "head") if r % 2 == 0 else ("head", "base")
                for name in order:
                    results[name].append(run_bench(sources[name], bench_args))
                print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                check=False,
                capture_output=True,
            )
    print(f"base {args.base} vs head (working tree), {args.rounds} rounds, medians of medians\n")
    print("| mode | T | B | I=H | dtype | engine | base fwd | head fwd | head/base fwd "
          "| base fwd+bwd | head fwd+bwd | head/base fwd+bwd |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    keys = [k for k in results["head"][0] if k in results["base"][0]]
    for key in keys:
        med = {
            name: tuple(_median([run[key][i] for run in runs if key in run]) for i in (0, 1))
            for name, runs in results.items()
        }
        (bf, bb), (hf, hb) = med["base"], med["head"]
        print(f"| {' | '.join(key)} | {_fmt(bf)} | {_fmt(hf)} | {_ratio(hf, bf)} | "
              f"{_fmt(bb)} | {_fmt(hb)} | {_ratio(hb, bb)} |")  # fmt: skip


if __name__ == "__main__":
    main()
