"""The PNG plots of a run, drawn with matplotlib's headless Agg backend."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg", force=True)

import matplotlib.pyplot as plt
import numpy as np

from rnnkit.train import checkpoint


def _save(fig: plt.Figure, path: Path) -> None:
    # A temporary name then a rename, so that a crash never leaves half a PNG.
    try:
        checkpoint.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def curves(history: list[dict], metric: str, loss_name: str, title: str, path: Path) -> None:
    """Loss (left) and ``metric`` (right) per epoch, training and validation, and the logged
    training steps behind the training loss."""
    epochs = [r for r in history if r.get("kind") == "epoch"]
    steps = [r for r in history if r.get("kind") == "step"]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        ax_loss.plot(
            [r["epoch_float"] for r in steps],
            [r["loss"] for r in steps],
            color="tab:blue",
            alpha=0.25,
            linewidth=0.8,
            label="train (logged steps)",
        )
    x = [r["epoch"] for r in epochs]
    scale = 100.0 if metric == "accuracy" else 1.0
    # Validation only where the run had validation data (rnnkit.fit without val_data has none).
    for part, color in (("train", "tab:blue"), ("val", "tab:orange")):
        if epochs and f"{part}_loss" not in epochs[0]:
            continue
        label = "train" if part == "train" else "validation"
        ax_loss.plot(x, [r[f"{part}_loss"] for r in epochs], "o-", color=color, label=label)
        values = [r[f"{part}_{metric}"] * scale for r in epochs]
        ax_metric.plot(x, values, "o-", color=color, label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel(loss_name)
    ax_loss.set_yscale("log")
    ax_loss.set_title("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(
        "accuracy (%)" if metric == "accuracy" else f"{metric.upper()} (data units)"
    )
    ax_metric.set_title("accuracy" if metric == "accuracy" else metric.upper())
    ax_metric.grid(alpha=0.3)
    ax_metric.legend()
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def confusion(matrix: np.ndarray, labels: list[str], title: str, path: Path) -> None:
    """Counts of true class (rows) against predicted class (columns)."""
    n = len(labels)
    size = max(4.5, min(14.0, 0.45 * n + 2.5))
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), labels, rotation=90 if max(map(len, labels)) > 2 else 0)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        top = matrix.max() if matrix.size else 0
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    color = "white" if matrix[i, j] > top / 2 else "black"
                    ax.text(
                        j,
                        i,
                        str(int(matrix[i, j])),
                        ha="center",
                        va="center",
                        color=color,
                        fontsize=8,
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def forecast(
    truth: np.ndarray,
    model: np.ndarray,
    baselines: dict[str, np.ndarray],
    steps_per_day: int,
    title: str,
    path: Path,
    band: tuple[np.ndarray, np.ndarray, str] | None = None,
) -> None:
    """The test part: the truth against the model's and each baseline's 1-step-ahead forecasts,
    whole (top), and its first two days with the model's full horizon from every 4th window
    (bottom); ``band``, ``(lower, upper, name)`` like ``model``, shades the model's interval."""
    fig, (ax_all, ax_zoom) = plt.subplots(2, 1, figsize=(12, 7))
    t = np.arange(len(truth))
    n = min(len(truth), 2 * steps_per_day)
    horizon = truth.shape[1]
    if band is not None:
        lower, upper, name = band
        ax_all.fill_between(
            t,
            lower[:, 0],
            upper[:, 0],
            color="tab:red",
            alpha=0.2,
            linewidth=0,
            label=f"model's {name} interval, 1 step ahead",
        )
        for i in range(0, n, 4):
            ax_zoom.fill_between(
                np.arange(i, i + horizon),
                lower[i],
                upper[i],
                color="tab:red",
                alpha=0.15,
                linewidth=0,
                label=f"{name} interval" if i == 0 else None,
            )
    known = {"seasonal naive": "tab:gray", "weekly naive": "tab:green", "linear AR": "tab:blue"}
    colors = {name: known.get(name, "tab:purple") for name in baselines}
    ax_all.plot(t, truth[:, 0], color="black", linewidth=1.0, label="truth")
    ax_all.plot(t, model[:, 0], color="tab:red", linewidth=0.9, label="model, 1 step ahead")
    for name, forecast in baselines.items():
        ax_all.plot(t, forecast[:, 0], color=colors[name], linewidth=0.8, alpha=0.7, label=name)
    ax_all.set_xlabel("test step")
    ax_all.set_title(title)
    ax_all.grid(alpha=0.3)
    ax_all.legend(loc="upper right")
    ax_zoom.plot(t[:n], truth[:n, 0], color="black", linewidth=1.2, label="truth")
    for i in range(0, n, 4):
        ax_zoom.plot(
            np.arange(i, i + horizon),
            model[i],
            color="tab:red",
            linewidth=1.0,
            marker=".",
            label=f"model, {horizon} steps ahead" if i == 0 else None,
        )
    for name, forecast in baselines.items():
        ax_zoom.plot(
            t[:n], forecast[:n, 0], color=colors[name], linewidth=0.8, alpha=0.7, label=name
        )
    ax_zoom.set_xlabel("test step")
    ax_zoom.set_title(f"first {n} steps of the test part")
    ax_zoom.grid(alpha=0.3)
    ax_zoom.legend(loc="upper right")
    fig.tight_layout()
    _save(fig, path)


def per_step(curves: dict[str, list[float]], title: str, path: Path) -> None:
    """The MAE per step ahead of each forecaster (the model first), one line each."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    known = {"seasonal naive": "tab:gray", "weekly naive": "tab:green", "linear AR": "tab:blue"}
    known.update({"ARX": "tab:blue", "model": "tab:red"})
    for name, mae in curves.items():
        steps = np.arange(1, len(mae) + 1)
        ax.plot(steps, mae, marker="o", color=known.get(name, "tab:purple"), label=name)
    ax.set_xlabel("steps ahead")
    ax.set_ylabel("MAE")
    # A poor baseline (the seasonal naive on load) would flatten the others' lines into one.
    values = [v for mae in curves.values() for v in mae if v > 0]
    if values and max(values) > 5 * min(values):
        ax.set_yscale("log")
        ax.set_ylabel("MAE (log scale)")
    ax.set_xticks(np.arange(1, len(next(iter(curves.values()))) + 1))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
