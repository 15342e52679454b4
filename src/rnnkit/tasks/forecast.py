"""Load forecasting: 48 half-hours (24 h) of history predict the next 4 (2 h), seed 003's task.

The series is cut chronologically into train, validation and test parts (70 / 15 / 15); a window
belongs to the part its targets fall in, and its history may reach back into the part before, as
it would in use. The scaling (mean and standard deviation) is fitted on the training part only.
The baseline is the seasonal naive forecast: the same half-hour one period (a day) earlier.
"""

import argparse
import csv
import io
import math
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from rnnkit import train_plots
from rnnkit.data import DataError, chronological_split, load_taylor, read_series
from rnnkit.tasks.base import Prepared, Report, Split, Task, forward_all


def _errors(pred: np.ndarray, true: np.ndarray) -> dict:
    err = pred - true
    with np.errstate(divide="ignore", invalid="ignore"):
        ape = np.abs(err / true)
    ape = ape[np.isfinite(ape)]
    return {
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "mape": float(100 * ape.mean()) if ape.size else float("nan"),
    }


class ForecastTask(Task):
    name = "forecast"
    help = "electricity load: 24 h of half-hourly history -> the next 2 h (Taylor 2003, bundled)"
    metric = "mae"
    loss_name = "MSE of the standardised series"
    defaults: ClassVar[dict] = dict(
        cell="lstm",
        hidden_size=64,
        num_layers=1,
        bidirectional=False,
        dropout=0.0,
        readout="last",
        epochs=20,
        batch_size=64,
        lr=0.01,
        optimizer="adam",
        schedule="onecycle",
    )

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        self.option(
            p,
            "--data",
            metavar="CSV",
            help="a CSV with a header, one row per time step; default: the bundled half-hourly "
            "demand of England and Wales, 5 June - 27 August 2000 (4,032 points, Taylor 2003)",
        )
        self.option(
            p,
            "--column",
            help="the column to forecast, by name or 0-based index (default: the last)",
        )
        self.option(
            p,
            "--window",
            type=int,
            default=48,
            help="steps of history per window (default 48 = 24 h)",
        )
        self.option(p, "--horizon", type=int, default=4, help="steps predicted (default 4 = 2 h)")
        self.option(
            p,
            "--period",
            type=int,
            default=48,
            help="the seasonal-naive baseline's lag in steps (default 48 = one day of half-hours)",
        )

    def data_config(self, args: argparse.Namespace) -> dict:
        for name in ("window", "horizon", "period"):
            if getattr(args, name) < 1:
                raise DataError(f"--{name} must be at least 1; got {getattr(args, name)}")
        if args.horizon > args.period:
            raise DataError(
                f"--horizon {args.horizon} is longer than --period {args.period}: "
                "the seasonal-naive "
                "baseline would need values from the future"
            )
        return {
            "data": str(Path(args.data).resolve()) if args.data else None,
            "column": args.column if args.data else "load_mw",
            "window": args.window,
            "horizon": args.horizon,
            "period": args.period,
            "split": [0.7, 0.15, 0.15],
        }

    def prepare(self, data: dict) -> Prepared:
        series = (
            load_taylor() if data["data"] is None else read_series(data["data"], data["column"])
        )
        w, h, period = data["window"], data["horizon"], data["period"]
        parts = chronological_split(len(series), tuple(data["split"]))
        first = max(w, period)
        # Every part needs a few windows; the first target needs a full history and a baseline.
        need = first + h + 3 * (h + 1)
        if len(series) < need or parts[0].stop <= first + h:
            raise DataError(
                f"{data['data'] or 'the load series'}: {len(series)} values are too few for "
                f"windows of "
                f"{w} steps predicting {h} with a baseline {period} steps back; need at least "
                f"{max(need, int(np.ceil((first + h + 1) / 0.7)))}"
            )
        train = series[parts[0]]
        source = data["data"] or "the load series"
        with np.errstate(over="ignore", invalid="ignore"):
            mean, std = float(train.mean()), float(train.std())
            z = ((series - mean) / std).astype(np.float32)
        if not (math.isfinite(mean) and math.isfinite(std) and np.isfinite(z).all()):
            i = int(np.argmax(np.abs(series)))
            raise DataError(
                f"{source}: the values are too large to standardise (the mean or standard "
                f"deviation of the training part overflows); the largest is {series[i]:g}, at "
                f"step {i + 1} of the series; rescale the column (e.g. to thousands)"
            )
        if std == 0:
            raise DataError(
                "the training part of the series is constant; there is nothing to learn"
            )
        self.preprocessing = {
            "mean": mean,
            "std": std,
            "window": w,
            "horizon": h,
            "period": period,
            "column": data["column"],
            "steps": len(series),
        }
        splits = []
        for part in parts:
            starts = np.arange(max(part.start, first), part.stop - h + 1)
            if len(starts) == 0:
                raise DataError(f"the series of {len(series)} values leaves a part without windows")
            x = np.stack([z[t - w : t] for t in starts])[..., None]  # (N, W, 1)
            y = np.stack([z[t : t + h] for t in starts])  # (N, horizon)
            lengths = torch.full((len(starts),), w)
            splits.append(
                Split(torch.from_numpy(x), lengths, torch.from_numpy(y), torch.from_numpy(starts))
            )
        self._series = series
        return Prepared(
            *splits,
            {"kind": "regressor", "input_size": 1, "output_size": h, "horizon": h},
            self.preprocessing,
        )

    def scores(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        loss = nn.functional.mse_loss(out, y, reduction="sum")
        abs_err = (out - y).abs().sum() * self.preprocessing["std"]
        return loss, torch.tensor(float(y.numel())), abs_err

    def report(self, out: Tensor, split: Split) -> Report:
        mean, std, period, h = (self.preprocessing[k] for k in ("mean", "std", "period", "horizon"))
        pred = out.numpy().astype(np.float64) * std + mean
        true = split.y.numpy().astype(np.float64) * std + mean
        starts = split.index.numpy()
        baseline = np.stack([self._series[t - period : t - period + h] for t in starts])
        model = _errors(pred, true)
        base = _errors(baseline, true)
        metrics = {
            **model,
            "baseline_mae": base["mae"],
            "baseline_rmse": base["rmse"],
            "baseline_mape": base["mape"],
            "mae_per_step": [float(v) for v in np.abs(pred - true).mean(axis=0)],
            "test_loss": float(nn.functional.mse_loss(out, split.y)),
            "test_windows": len(true),
        }
        return Report(metrics, {"pred": pred, "true": true, "baseline": baseline})

    def plots(self, report: Report, run_dir: Path) -> list[str]:
        m = report.metrics
        title = (
            f"forecast, test part: model MAE {m['mae']:.0f}, "
            f"seasonal naive MAE {m['baseline_mae']:.0f}"
        )
        train_plots.forecast(
            report.arrays["true"],
            report.arrays["pred"],
            report.arrays["baseline"],
            self.preprocessing["period"],
            title,
            run_dir / "forecast.png",
        )
        return ["forecast.png"]

    def predict(self, model: nn.Module, path: Path, device: torch.device, batch_size: int) -> str:
        p = self.preprocessing
        column = p["column"]
        try:
            series = read_series(path, column)
        except DataError as e:
            if column != "load_mw" or "has no column" not in str(e):
                raise
            series = read_series(path, None)
        w, h = p["window"], p["horizon"]
        if len(series) < w:
            raise DataError(
                f"CSV file {str(path)!r} holds {len(series)} values; the model needs the last {w} "
                f"to forecast the next {h}"
            )
        x = torch.tensor((series[-w:] - p["mean"]) / p["std"], dtype=torch.float32).view(1, w, 1)
        if not torch.isfinite(x).all():
            raise DataError(
                f"CSV file {str(path)!r}: its last {w} values are too large for the model, which "
                f"was trained on values of mean {p['mean']:g} and standard deviation {p['std']:g}"
            )
        out = forward_all(model, x, torch.tensor([w]), False, device, batch_size)
        pred = out[0].numpy() * p["std"] + p["mean"]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(("steps_ahead", "forecast"))
        writer.writerows((k + 1, f"{v:.2f}") for k, v in enumerate(pred))
        return buf.getvalue()
