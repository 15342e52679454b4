"""Train / validation / test splits."""

import numpy as np


def stratified_split(
    labels: np.ndarray, fractions: tuple[float, float, float], seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of a train / validation / test split that keeps every class's share in each part.

    Each class is shuffled with ``seed`` and cut at ``fractions`` (rounded per class), so a class
    of n items gives about ``n * fraction`` to each part. The indices come back sorted.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    total = sum(fractions)
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_val = round(len(idx) * fractions[1] / total)
        n_test = round(len(idx) * fractions[2] / total)
        n_train = len(idx) - n_val - n_test
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train : n_train + n_val])
        parts[2].append(idx[n_train + n_val :])
    train, val, test = (np.sort(np.concatenate(p)) for p in parts)
    return train, val, test


def chronological_split(
    n: int, fractions: tuple[float, float, float]
) -> tuple[slice, slice, slice]:
    """Consecutive slices of ``n`` time steps, oldest first: train, validation, test."""
    total = sum(fractions)
    a = round(n * fractions[0] / total)
    b = a + round(n * fractions[1] / total)
    return slice(0, a), slice(a, b), slice(b, n)
