"""The files of a run folder, written atomically and read back with errors in the user's terms.

- ``checkpoint.pt``: everything needed to continue training (weights, optimizer, scheduler, random
  state, history, the best weights so far), rewritten after every epoch.
- ``model.safetensors``: the chosen weights, with the model's configuration and the task's
  preprocessing as JSON in the metadata, so that ``evaluate`` and ``predict`` need nothing else.

Every write goes to a temporary file in the same folder that is flushed, synced and then renamed
over the old file: a crash or Ctrl-C at any moment leaves the previous complete file in place.
"""

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from rnnkit.models import ModelConfig, build_model

CHECKPOINT = "checkpoint.pt"
MODEL = "model.safetensors"
CONFIG = "config.json"
FORMAT = "rnnkit-run-1"


class CheckpointError(ValueError):
    """A run folder's file is missing, truncated, corrupt or belongs to a different run."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        kept = "the previous version is untouched" if path.exists() else "nothing was written"
        raise CheckpointError(f"could not write {str(path)!r} ({e}); {kept}") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


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


def save_model(path: Path, state: dict, meta: dict) -> None:
    """A state dict to safetensors, with ``meta`` (JSON-able) under the metadata key ``rnnkit``."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    metadata = {"format": FORMAT, "rnnkit": json.dumps(meta)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_model(path: Path) -> tuple[nn.Module, dict]:
    """The model saved in ``path`` and its metadata (``task``, ``model_config``, ...)."""
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
    if metadata.get("format") != FORMAT or "rnnkit" not in metadata:
        raise CheckpointError(f"{str(path)!r} is a safetensors file but not an rnnkit model")
    meta = json.loads(metadata["rnnkit"])
    model = build_model(ModelConfig(**meta["model_config"]))
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
        raise CheckpointError(
            f"model file {str(path)!r} does not match the model its metadata describes "
            f"({meta['model_config']['cell']}, "
            f"hidden_size {meta['model_config']['hidden_size']}): {detail}"
        )
    model.load_state_dict(tensors)
    return model, meta
