"""Building the native engine's C library (``loop.c``) on first use.

Each is compiled with the machine's C compiler into ``$RNNKIT_CACHE`` (default
``~/.cache/rnnkit``), named by a hash of its source, the headers it includes, the compiler, the
flags and the CPU's features (``-march=native`` code must not be loaded on another CPU sharing
the cache), and renamed into place so that concurrent processes never load a half-written file.
Every failure is an ``OSError`` for the caller to turn into its fallback.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

HEADERS = [Path(__file__).with_name(name) for name in ("native_math.h", "int8.h")]


def compiler() -> str:
    found = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if found is None:
        raise OSError("no C compiler found (set CC, or install cc or gcc)")
    return found


def cache_dir() -> Path:
    return Path(os.environ.get("RNNKIT_CACHE", Path.home() / ".cache" / "rnnkit"))


def cpu_features() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep))) or f"{platform.machine()} {platform.processor()}"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``'s ``flags`` or ``Features``; empty elsewhere)."""
    flags: set[str] = set()
    for line in cpu_features().splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def library_path(source: Path, cc: str, flags: list[str], cache: Path) -> Path:
    """Where the library built from ``source`` (and the headers) with these settings lives."""
    code = source.read_bytes() + b"".join(h.read_bytes() for h in HEADERS)
    fingerprint = " ".join([cc, *flags, cpu_features()]).encode()
    key = hashlib.sha256(code + fingerprint).hexdigest()[:16]
    return cache / f"{source.stem}-{key}.so"


def _compile(source: Path, cc: str, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run(
            [cc, *flags, "-o", tmp, str(source), "-lm"],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(tmp, target)
    except subprocess.CalledProcessError as e:
        raise OSError(f"{cc} failed: {e.stderr.strip()[:300]}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)


def build(source: Path, flag_sets: list[list[str]]) -> ctypes.CDLL:
    """Find in the cache or compile, then load, trying each set of flags in turn."""
    cc, cache = compiler(), cache_dir()
    error: OSError | None = None
    for flags in flag_sets:
        target = library_path(source, cc, flags, cache)
        try:
            if not target.exists():
                _compile(source, cc, flags, target)
            return ctypes.CDLL(str(target))
        except OSError as e:
            error = error or e
    raise error


def constant_under_compile(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without importing dynamo, which takes a
    second, when the library is imported: torch's decorator only marks the function so (a test
    checks that it still does)."""
    fn._dynamo_marked_constant = True
    return fn


class OnFirstUse:
    """A C library built (or found in the cache) and loaded on first use, once. :meth:`get`
    gives it, or None: after one warning where the build or the load failed (``fallback``
    says what runs instead, ``{}`` the error), and whenever ``RNNKIT_NO_NATIVE=1``
    switches rnnkit's native code off."""

    def __init__(self, build: Callable[[], ctypes.CDLL], fallback: str) -> None:
        self._build, self._fallback = build, fallback
        self.lib: ctypes.CDLL | None = None
        self.failed = False
        self.error: str | None = None

    def get(self) -> ctypes.CDLL | None:
        if os.environ.get("RNNKIT_NO_NATIVE") == "1":
            self.error = "RNNKIT_NO_NATIVE=1 switches it off"
            return None
        if self.failed:
            return None
        if self.lib is None:
            try:
                self.lib = self._build()
            except (OSError, AttributeError) as e:
                self.failed, self.error = True, str(e)
                warnings.warn(f"rnnkit: {self._fallback.format(e)}", stacklevel=4)
        return self.lib
