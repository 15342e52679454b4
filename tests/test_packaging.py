"""rnnkit as a user gets it: the sdist holds the whole project; the wheel, built from the tree (as
``pip install .`` builds it) or from the sdist, holds every file the package reads at run time and
the licence; and that wheel, installed in a fresh venv outside the checkout, passes
scripts/wheel_smoke.py (every layer on the CPU backends, one epoch of three tasks).
"""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Build outputs and local state that are not part of the project.
_NOT_SOURCE = (".git", ".venv", "build", "dist", "runs", "*.egg-info", ".*_cache", "__pycache__")
_BYTECODE = {".pyc", ".pyo", ".so"}


def _files(folder: str) -> set[str]:
    """The project's files under ``folder``, relative to the repository root."""
    return {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in _BYTECODE
    }


def _env() -> dict[str, str]:
    """The environment without anything that points python at the checkout or at .venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list[str], timeout: int, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), **kw)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """The sdist and the wheel built from a copy of the working tree (so that concurrent builds
    never share the checkout's egg-info), as ``pip install .`` builds it, and in from-sdist/ the
    wheel built from that sdist, as ``pip install rnnkit-*.tar.gz`` builds it."""
    tmp = tmp_path_factory.mktemp("packaging")
    tree, out = tmp / "tree", tmp / "dist"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    build = [sys.executable, "-m", "build", "--no-isolation"]
    _run([*build, "--sdist", "--wheel", "--outdir", str(out), str(tree)], 300)
    sdist = _only(out, "rnnkit-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp, filter="data")
    _run([*build, "--wheel", "--outdir", str(out / "from-sdist"), str(tmp / sdist.name[:-7])], 300)
    return out


def _only(folder: Path, pattern: str) -> Path:
    (found,) = folder.glob(pattern)
    return found


def test_sdist_holds_the_whole_project(dist):
    with tarfile.open(_only(dist, "rnnkit-*.tar.gz")) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    wanted = {
        "LICENSE",
        "README.md",
        "BENCHMARKS.md",
        "pyproject.toml",
        "MANIFEST.in",
        "run",
        "run-tests",
        ".ci/run",
        "tests/conftest.py",
        "tests/helpers.py",
        "src/rnnkit/engines/native/loop.c",
        "src/rnnkit/engines/native/native_math.h",
        "tools/triton_aot.py",
        "src/rnnkit/data/digits.csv.gz",
    }
    for folder in ("src/rnnkit", "tests", "benchmarks", "scripts", "tools"):
        wanted |= _files(folder)
    assert not wanted - names, f"missing from the sdist: {sorted(wanted - names)}"


@pytest.mark.parametrize("where", ["", "from-sdist"], ids=["built_from_tree", "built_from_sdist"])
def test_wheel_holds_every_file_the_package_reads_and_the_licence(dist, where):
    with zipfile.ZipFile(_only(dist / where, "rnnkit-*.whl")) as wheel:
        names = set(wheel.namelist())
        (info,) = {n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA")}
        metadata = wheel.read(f"{info}/METADATA").decode()
    package = {n.removeprefix("src/") for n in _files("src/rnnkit")}
    assert {"rnnkit/engines/native/loop.c", "rnnkit/engines/native/native_math.h"} <= package
    assert {"rnnkit/data/digits.csv.gz", "rnnkit/data/taylor.csv"} <= package
    wanted = package | {f"{info}/licenses/LICENSE"}
    assert not wanted - names, f"missing from the wheel: {sorted(wanted - names)}"
    # The CI tools (the AOT compile check) and the tests are not part of the runtime package.
    assert not [n for n in names if n.startswith(("tools/", "tests/")) or "triton_aot" in n]
    assert "License-Expression: MIT" in metadata.splitlines()


class Installed(NamedTuple):
    python: Path  # the fresh venv's python
    work: Path  # a folder outside the checkout
    bare: subprocess.CompletedProcess  # `rnnkit train digits` before the train extra


@pytest.fixture(scope="module")
def installed(dist, tmp_path_factory) -> Iterator[Installed]:
    """A fresh venv outside the checkout with the wheel installed, made once for every check
    of this module: first without the train extra (``bare`` records what ``rnnkit train`` says
    then), then with it."""
    tmp = tmp_path_factory.mktemp("installed")
    venv, work = tmp / "venv", tmp / "work"
    work.mkdir()
    python = venv / "bin" / "python"
    try:
        _run([sys.executable, "-m", "venv", str(venv)], 120)
        # Without byte-compiling all of torch (a third of the time): python compiles what the
        # smoke test imports. torch pinned to the CPU build, as scripts/setup-venv installs it.
        pip = [str(python), "-m", "pip", "install", "-q", "--no-compile"]
        _run([*pip, "torch==2.13.0"], 600)
        wheel = str(_only(dist, "rnnkit-*.whl"))
        _run([*pip, wheel], 600)
        bare = subprocess.run(
            [str(venv / "bin" / "rnnkit"), "train", "digits"],
            cwd=work,
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(),
        )
        _run([*pip, f"{wheel}[train]"], 600)
        yield Installed(python, work, bare)
    finally:
        # The venv is about 1 GB; pytest keeps the last three runs' temporary folders.
        shutil.rmtree(venv, ignore_errors=True)


def test_wheel_without_the_train_extra_names_the_extra_it_needs(installed):
    bare = installed.bare
    assert bare.returncode == 2 and "pip install 'rnnkit[train]'" in bare.stderr, bare.stderr


def test_wheel_installed_in_a_fresh_venv_passes_the_smoke_test(installed):
    # Run from a copy, in a folder outside the checkout, so that nothing of src/ is on
    # sys.path; with an empty kernel cache, so that the installed C source is built.
    script = shutil.copy(ROOT / "scripts" / "wheel_smoke.py", installed.work)
    env = {**_env(), "RNNKIT_CACHE": str(installed.work / "kernel-cache")}
    cmd = [str(installed.python), str(script), str(installed.work)]
    done = subprocess.run(
        cmd, cwd=installed.work, capture_output=True, text=True, timeout=900, env=env
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wheel smoke test passed" in done.stdout


def test_readme_commands_run_programs_that_a_fresh_checkout_has():
    """Every ``$ `` line of the README and of the documentation's guide (where the README's command
    line reference moved) starts with ./run, ./run-tests or a program in .venv/bin (a bare
    ``torchrun`` is not on PATH after ./run)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs" / "guide").glob("*.rst"))]
    commands = [
        line.strip()[2:].split()[0]
        for page in pages
        for line in page.read_text().splitlines()
        if line.strip().startswith("$ ")
    ]
    assert ".venv/bin/torchrun" in commands
    venv_bin = Path(sys.executable).parent
    for command in commands:
        if command in ("./run", "./run-tests"):
            continue
        assert command.startswith(".venv/bin/"), f"README runs {command!r}, not from .venv/bin"
        assert (venv_bin / command.removeprefix(".venv/bin/")).exists(), f"no {command} in the venv"
