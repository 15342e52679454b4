"""Training as a library: :func:`~rnnkit.fit`, :func:`~rnnkit.load`, :func:`~rnnkit.predict`,
:class:`~rnnkit.TrainConfig`.

``rnnkit train`` (``train/cli.py``) is a thin user of them. The modules: ``config`` (TrainConfig
and the option checks), ``state`` (TrainState, the checkpoint), ``loop`` (fit), ``data`` (what
fit accepts as data), ``objective`` (losses and metrics), ``run`` (device, processes, threads and
the run folder), ``checkpoint`` (atomic files), ``plots``, ``api`` (load and predict).

The training stack (matplotlib, safetensors, tqdm, and tensorboard for ``--tensorboard``) is the
``rnnkit[train]`` extra; the names here are imported on first use, so that ``import rnnkit``
stays light and a missing package is named when training starts.
"""

import importlib
import importlib.util

_EXPORTS = {
    "fit": "rnnkit.train.loop",
    "History": "rnnkit.train.loop",
    "load": "rnnkit.train.api",
    "predict": "rnnkit.train.api",
    "TrainConfig": "rnnkit.train.config",
    "TrainState": "rnnkit.train.state",
    "Objective": "rnnkit.train.objective",
}
# The packages of the train extra, by the module name they import as.
EXTRA = {"matplotlib": "matplotlib", "safetensors": "safetensors", "tqdm": "tqdm"}


def require_extra() -> None:
    """Raise ImportError naming the ``rnnkit[train]`` extra when a package of it is missing."""
    missing = [pkg for mod, pkg in EXTRA.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise ImportError(
            f"rnnkit's training needs {', '.join(missing)}, which are not installed; install "
            "the training extra: pip install 'rnnkit[train]'"
        )


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rnnkit.train' has no attribute {name!r}")
    if _EXPORTS[name] != "rnnkit.train.config":
        require_extra()
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = list(_EXPORTS)
