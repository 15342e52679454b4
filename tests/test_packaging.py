"""rnnkit as a user gets it: the sdist holds the whole project, the wheel built from that sdist
holds every file the package reads at run time, and the wheel installed in a fresh venv outside
the checkout passes scripts/wheel_smoke.py (every layer on every CPU backend, one epoch of each
task).
"""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

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
    """The sdist, and the wheel that ``build`` makes from it, of a copy of the working tree (so
    that concurrent builds never share the checkout's egg-info)."""
    tmp = tmp_path_factory.mktemp("packaging")
    tree = tmp / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
    out = tmp / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(tree)], 300)
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
        "src/rnnkit/engines/cpu_kernels.c",
        "src/rnnkit/data/digits.csv.gz",
    }
    for folder in ("src/rnnkit", "tests", "benchmarks", "scripts"):
        wanted |= _files(folder)
    assert not wanted - names, f"missing from the sdist: {sorted(wanted - names)}"


def test_wheel_holds_every_file_the_package_reads_and_the_licence(dist):
    with zipfile.ZipFile(_only(dist, "rnnkit-*.whl")) as wheel:
        names = set(wheel.namelist())
        metadata = wheel.read("rnnkit-0.1.0.dist-info/METADATA").decode()
    package = {n.removeprefix("src/") for n in _files("src/rnnkit")}
    assert "rnnkit/engines/cpu_kernels.c" in package
    assert {"rnnkit/data/digits.csv.gz", "rnnkit/data/taylor.csv"} <= package
    wanted = package | {"rnnkit-0.1.0.dist-info/licenses/LICENSE"}
    assert not wanted - names, f"missing from the wheel: {sorted(wanted - names)}"
    assert "License-Expression: MIT" in metadata.splitlines()


def test_wheel_installed_in_a_fresh_venv_passes_the_smoke_test(dist, tmp_path):
    venv, work = tmp_path / "venv", tmp_path / "work"
    work.mkdir()
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "venv", str(venv)], 120)
    # The pinned CPU build, as scripts/setup-venv installs it; an unpinned torch is a CUDA build.
    _run([str(python), "-m", "pip", "install", "-q", "torch==2.13.0"], 600)
    _run([str(python), "-m", "pip", "install", "-q", str(_only(dist, "rnnkit-*.whl"))], 600)
    # Run from a copy, in a folder outside the checkout, so that nothing of src/ is on sys.path.
    script = shutil.copy(ROOT / "scripts" / "wheel_smoke.py", work)
    cmd = [str(python), str(script), str(work)]
    env = {**_env(), "RNNKIT_CACHE": str(tmp_path / "kernel-cache")}
    done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "wheel smoke test passed" in done.stdout
