"""Runs fuzz cases for tests/test_fuzz.py in a process of its own, so that a crash of native
code fails that test instead of killing the suite.

Reads one JSON case per line on stdin and answers one JSON line per case on stdout:
``{"outcome": "ok"}`` (valid input, same numbers as the oracle), ``"mismatch"``, ``"clear"`` (an
error raised by rnnkit's own code, a ValueError or TypeError), ``"raw"`` (any other exception,
with where it came from) or ``"accepted"`` (malformed input that raised nothing).
"""

import json
import sys
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import rnnkit

RNNKIT_DIR = str(Path(rnnkit.__file__).parent)
DTYPE = torch.float64


def _tensor(spec: dict) -> object:
    """A tensor (or a non-tensor) described by the case."""
    kind = spec["kind"]
    if kind == "list":
        return [[0.0] * spec["shape"][-1]]
    if kind == "none":
        return None
    if kind == "number":
        return 1.5
    g = torch.Generator().manual_seed(spec["seed"])
    t = torch.randn(spec["shape"], generator=g, dtype=torch.float64)
    if spec.get("nan") and t.numel():
        t.view(-1)[spec["nan"] % t.numel()] = float(spec["nan_value"])
    if kind == "int":
        return t.round().to(torch.int64)
    t = t.to({"f64": torch.float64, "f32": torch.float32}[kind])
    if spec.get("permute") and t.dim() == 3:
        # The same values seen through a non-contiguous view.
        t = t.permute(1, 0, 2).contiguous().permute(1, 0, 2)
    return t


def _input(case: dict) -> object:
    x = _tensor(case["x"])
    packed = case.get("packed")
    if packed is None:
        return x
    sizes = torch.tensor(
        packed["batch_sizes"],
        dtype={"i64": torch.int64, "f32": torch.float32, "i32": torch.int32}[packed["dtype"]],
    )
    if packed.get("two_d"):
        sizes = sizes.unsqueeze(0)
    index = packed.get("sorted_indices")
    if index is not None:
        index = torch.tensor(index, dtype=torch.int64)
        return PackedSequence(x, sizes, index, torch.argsort(index))
    return PackedSequence(x, sizes)


def _hx(case: dict) -> object:
    hx = case.get("hx")
    if hx is None:
        return None
    if isinstance(hx, list):
        return tuple(_tensor(s) for s in hx)
    return _tensor(hx)


def _build(case: dict) -> tuple[nn.Module, nn.Module | None]:
    """The rnnkit module and its oracle: torch.nn's twin, or rnnkit's reference engine."""
    name, kwargs = case["layer"], dict(case["kwargs"])
    cls = getattr(rnnkit, name)
    if name.endswith("Cell"):
        ours = cls(**kwargs, dtype=DTYPE)
        twin = getattr(nn, name)(**kwargs, dtype=DTYPE)
        twin.load_state_dict(ours.state_dict())
        return ours, twin
    ours = cls(**kwargs, dtype=DTYPE, backend=case["backend"])
    variants = {"layer_norm", "zoneout", "recurrent_dropout"} & kwargs.keys()
    if variants:
        twin = cls(**kwargs, dtype=DTYPE, backend="reference")
    else:
        twin = getattr(nn, name)(**kwargs, dtype=DTYPE)
    twin.load_state_dict(ours.state_dict())
    ours.eval(), twin.eval()
    return ours, twin


def _flat(result: object) -> list[torch.Tensor]:
    if isinstance(result, PackedSequence):
        return [result.data]
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for part in result for t in _flat(part)]


def _raised_by_rnnkit(e: BaseException) -> bool:
    tb = traceback.extract_tb(e.__traceback__)
    return bool(tb) and tb[-1].filename.startswith(RNNKIT_DIR)


def run(case: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ours, twin = _build(case)
            x, hx = _input(case), _hx(case)
            result = ours(x, hx)
        except (ValueError, TypeError) as e:
            if _raised_by_rnnkit(e):
                return {"outcome": "clear", "message": str(e)}
            return _raw(e)
        except Exception as e:
            return _raw(e)
        if not case["valid"]:
            return {"outcome": "accepted"}
        expected = twin(x, hx)
    for a, b in zip(_flat(result), _flat(expected), strict=True):
        if a.shape != b.shape or not torch.allclose(a, b, atol=1e-8, equal_nan=True):
            return {"outcome": "mismatch", "shapes": [list(a.shape), list(b.shape)]}
    return {"outcome": "ok"}


def _raw(e: BaseException) -> dict:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    where = f"{frame.filename}:{frame.lineno}"
    return {"outcome": "raw", "error": f"{type(e).__name__}: {e}"[:500], "where": where}


def main() -> None:
    for line in sys.stdin:
        print(json.dumps(run(json.loads(line))), flush=True)


if __name__ == "__main__":
    main()
