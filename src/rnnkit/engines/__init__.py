"""Engines: how a layer stack runs.

An engine is a module with ``run(spec, x, hx, weights, batch_sizes, training) -> (output, h_n)``:
``x`` is time-major ``(T, B, I)`` or packed data ``(N, I)`` with ``batch_sizes``; ``hx`` is
``(h0,)`` or ``(h0, c0)``, each ``(L * D, B, *)`` and already validated; ``weights[layer * D +
direction]`` holds that layer's tensors. Layers validate and reshape; engines only compute.

``backend="auto"`` resolves by :func:`resolve`.
"""

from types import ModuleType

from rnnkit.engines import reference

BACKENDS = ("auto", "reference")


def check_backend(owner: str, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(
            f"{owner}: backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}"
        )
    return backend


def resolve(backend: str) -> ModuleType:
    """The engine for ``backend``; ``"auto"`` is the reference engine until faster ones land."""
    return {"auto": reference, "reference": reference}[backend]
