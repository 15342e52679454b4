"""The files of a run folder, written atomically and read back with errors in the user's terms.

- ``checkpoint.pt``: everything needed to continue training (weights, optimizer, scheduler, random
  state, history, the best weights so far), rewritten after every epoch. It is the commit record
  of an epoch: it is written last, and the other files are reconciled with it.
- ``model.safetensors``: the chosen weights, with the model's configuration and the task's
  preprocessing as JSON in the metadata, so that ``evaluate`` and ``predict`` need nothing else,
  and a SHA-256 of that metadata and every tensor's bytes, checked on every load.

Every write goes to a temporary file in the same folder that is flushed, synced and then renamed
over the old file: a crash or Ctrl-C at any moment leaves the previous complete file in place, and
a temporary file that a killed process left behind is removed by the next run in the folder.
JSON files never hold NaN or infinity (JSON has neither): such values are written as null.
"""

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from rnnkit.models import build_model

CHECKPOINT = "checkpoint.pt"
MODEL = "model.safetensors"
# The int8 model of a run (``rnnkit quantize``): model.safetensors' weights quantized.
MODEL_INT8 = "model-int8.safetensors"
CONFIG = "config.json"
FORMAT = "rnnkit-run-1"
# model.safetensors files of this format carry a checksum; rnnkit-run-1 ones (older) do not.
MODEL_FORMAT = "rnnkit-run-2"
_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")


class CheckpointError(ValueError):
    """A run folder's file is missing, truncated, corrupt or belongs to a different run."""

    exit_status = 2


class WriteError(CheckpointError):
    """A file could not be written (no space, no permission, a failing disk): a runtime failure."""

    exit_status = 1


def _write_failure(path: Path, e: BaseException) -> str:
    """Why writing ``path`` failed, in words: the OS error, or torch's error explained."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2**20:
        return f"No space left on device: {free:,} bytes free (torch said: {detail})"
    return f"{type(e).__name__}: {detail}"


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    # torch.save reports a failed write (a full disk among them) as a RuntimeError, safetensors
    # as its own error type.
    except (OSError, RuntimeError, SafetensorError) as e:
        kept = "the previous version is untouched" if path.exists() else "nothing was written"
        raise WriteError(
            f"could not write {str(path)!r} ({_write_failure(path, e)}); {kept}"
        ) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temps(folder: Path) -> list[str]:
    """Remove the temporary files that killed processes left in ``folder``; their names."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = _TEMP.match(p.name)
        if m and p.is_file() and not _alive(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p.name)
            except OSError:
                pass
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def finite_json(obj: object) -> object:
    """``obj`` with every NaN or infinite float replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def to_json(obj: object, indent: int | None = None) -> str:
    """JSON text of ``obj`` with non-finite numbers as null; never NaN or Infinity."""
    return json.dumps(finite_json(obj), indent=indent, allow_nan=False)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: object) -> None:
    write_text(path, to_json(obj, indent=2) + "\n")


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {str(path)!r} is not valid JSON ({e}); truncated?") from None
    if not isinstance(data, dict):
        raise CheckpointError(
            f"{what} {str(path)!r} holds a {type(data).__name__}, expected an object"
        )
    return data


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))


def load_checkpoint(path: Path, config: dict) -> dict:
    """The training state in ``path``, checked to belong to the run described by ``config``."""
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint to resume: {str(path)!r} does not exist (the run stopped before its "
            "first epoch ended, or this is not a run folder)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises a different error for each way a file can be damaged
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or corrupt and cannot be resumed "
            f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'no detail'})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not an rnnkit training checkpoint")
    for key in ("task", "options", "model_config", "data_fingerprint"):
        if state.get(key) != config.get(key):
            raise CheckpointError(
                f"checkpoint {str(path)!r} belongs to a different run: its {key} is "
                f"{_short(state.get(key))} but config.json says {_short(config.get(key))}"
            )
    return state


def _short(value: object) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) < 200 else text[:200] + "..."


def read_committed_best(path: Path) -> dict | None:
    """The ``best`` record (``epoch``, ``state``, ...) of the checkpoint ``path``, or None when it
    cannot be read; evaluating an unfinished run uses it, as resuming the run would."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a damaged checkpoint only matters to --resume, which says so
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return None
    best = state.get("best")
    return best if isinstance(best, dict) and best.get("state") is not None else None


def weights_checksum(meta_json: str, tensors: dict) -> str:
    """SHA-256 of the metadata text and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_model(path: Path, state: dict, meta: dict) -> None:
    """A state dict to safetensors, with ``meta`` (JSON-able) under the metadata key ``rnnkit``
    and the checksum of both under ``sha256``."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    meta_json = to_json(meta)
    metadata = {
        "format": MODEL_FORMAT,
        "rnnkit": meta_json,
        "sha256": weights_checksum(meta_json, tensors),
    }
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_model(path: Path, model: nn.Module | None = None) -> tuple[nn.Module, dict]:
    """The model saved in ``path`` and its metadata (``task``, ``model_config``, ...): rebuilt
    from its ``ModelConfig``, or for a model of the user's own class, ``model`` (an instance of
    that class) with the saved weights loaded into it."""
    if path.is_dir():
        raise CheckpointError(f"model file {str(path)!r} is a folder; expected a safetensors file")
    if not path.is_file():
        raise CheckpointError(
            f"model file {str(path)!r} does not exist; did the run finish an epoch?"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors reports damage as several error types
        raise CheckpointError(
            f"model file {str(path)!r} is truncated or not a safetensors file "
            f"({type(e).__name__}: {str(e)[:120]})"
        ) from None
    if metadata.get("format") not in (FORMAT, MODEL_FORMAT) or "rnnkit" not in metadata:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not an rnnkit model")
    if metadata["format"] == MODEL_FORMAT:
        recorded = metadata.get("sha256")
        if recorded != weights_checksum(metadata["rnnkit"], tensors):
            raise CheckpointError(
                f"model file {str(path)!r} is damaged: its contents do not match the SHA-256 "
                f"checksum recorded when it was written ({str(recorded)[:16]}...); restore it "
                "from a copy, or rerun the training (with --resume while checkpoint.pt is there)"
            )
    bad = sorted(k for k, t in tensors.items() if t.is_floating_point() and not t.isfinite().all())
    if bad:
        # Training stops at a non-finite loss, so such weights were never written by rnnkit train.
        raise CheckpointError(
            f"model file {str(path)!r} holds NaN or infinite weights (in {', '.join(bad[:3])}); "
            "it is damaged or not from a finished rnnkit run"
        )
    try:
        meta = json.loads(metadata["rnnkit"])
        if model is None and meta.get("model_config") is None:
            raise CheckpointError(
                f"model file {str(path)!r} holds a model of your own class "
                f"({meta.get('model_class', 'unknown')}), which rnnkit cannot rebuild alone; "
                "pass model=<a new instance of it> to rnnkit.load"
            )
        if model is None:
            model = build_model(meta["model_config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(
            f"model file {str(path)!r} holds an rnnkit model whose description is damaged or "
            f"from another version ({type(e).__name__}: {str(e)[:120]})"
        ) from None
    if meta.get("quantized") == "int8":
        from rnnkit.quantized import quantize

        model = quantize(model)
    _check_shapes(path, model, tensors, meta)
    model.load_state_dict(tensors)
    return model, meta


def model_checksum(path: Path) -> str | None:
    """The SHA-256 a model file recorded when it was written (None for older files)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {}).get("sha256")
    except Exception:  # safetensors reports damage as several error types
        return None


def _check_shapes(path: Path, model: nn.Module, tensors: dict, meta: dict) -> None:
    """The saved tensors are exactly the model's, by name and shape."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != have:
        missing = sorted(set(want) - set(have))
        extra = sorted(set(have) - set(want))
        shapes = [
            f"{k} {have[k]} vs {want[k]}"
            for k in sorted(set(want) & set(have))
            if want[k] != have[k]
        ]
        detail = "; ".join(
            part
            for part in (
                f"missing {', '.join(missing[:5])}" if missing else "",
                f"unexpected {', '.join(extra[:5])}" if extra else "",
                f"shapes differ: {', '.join(shapes[:5])}" if shapes else "",
            )
            if part
        )
        c = meta.get("model_config")
        what = f"{c['cell']}, hidden_size {c['hidden_size']}" if c else meta.get("model_class")
        raise CheckpointError(
            f"model file {str(path)!r} does not match the model its metadata describes "
            f"({what}): {detail}"
        )
