"""The forecast task's parts on tiny series: baselines by hand, calendar inputs, residual wiring."""

import numpy as np
import pytest
import torch
from torch import nn

from rnnkit.data import DataError
from rnnkit.data.readers import read_times
from rnnkit.tasks.forecast import (
    ForecastTask,
    calendar,
    fit_linear_ar,
    fold,
    linear_ar,
    model_inputs,
    out_of_fold_ar,
    seasonal_naive,
)


def test_seasonal_naive_takes_the_values_one_lag_back():
    series = np.arange(20.0) ** 2
    # Windows whose first targets are steps 10 and 12, 2 steps ahead, 3 steps back.
    assert seasonal_naive(series, np.array([10, 12]), 3, 2).tolist() == [[49, 64], [81, 100]]
    # The weekly naive is the same with 7 periods: period 2 -> 14 steps back.
    assert seasonal_naive(series, np.array([15]), 14, 2).tolist() == [[1, 4]]


def test_linear_ar_is_least_squares_by_hand():
    # window 1, horizon 1: pairs (1 -> 2), (2 -> 1), (1 -> 3), (3 -> 2): slope -4/11, constant 29/11
    series = np.array([1.0, 2.0, 1.0, 3.0, 2.0])
    coef = fit_linear_ar(series, np.arange(1, 5), 1, 1)
    assert coef[:, 0] == pytest.approx([-4 / 11, 29 / 11])
    assert linear_ar(series, np.array([5]), coef)[0, 0] == pytest.approx(-4 / 11 * 2 + 29 / 11)


def test_linear_ar_recovers_a_doubling_series_exactly_at_every_horizon_step():
    series = 2.0 ** np.arange(16)
    coef = fit_linear_ar(series, np.arange(1, 12), 1, 2)  # (window + 1, horizon)
    assert coef == pytest.approx(np.array([[2.0, 4.0], [0.0, 0.0]]), abs=1e-6)
    assert linear_ar(series, np.array([14]), coef)[0] == pytest.approx([2.0**14, 2.0**15])


def test_out_of_fold_ar_forecasts_each_block_with_the_others_fit():
    rng = np.random.default_rng(0)
    series = np.cumsum(rng.normal(size=200))
    starts = np.arange(10, 190)
    out = out_of_fold_ar(series, starts, 3, 2, folds=4)
    block, rest = np.arange(45, 90), np.r_[0:45, 90:180]
    coef = fit_linear_ar(series, starts[rest], 3, 2)
    assert out[block] == pytest.approx(linear_ar(series, starts[block], coef))
    # Not the in-sample fit, whose forecasts differ.
    assert not np.allclose(out, linear_ar(series, starts, fit_linear_ar(series, starts, 3, 2)))


def test_calendar_features_are_time_of_day_and_weekday_from_timestamps():
    times = np.array(
        ["2000-06-05T00:00", "2000-06-05T06:00", "2000-06-11T12:00", "2000-06-07T18:00"],
        dtype="datetime64[s]",
    )
    cal = calendar(times)  # (4, 9)
    assert cal[:, 0] == pytest.approx([0, 1, 0, -1], abs=1e-6)  # sin of the time of day
    assert cal[:, 1] == pytest.approx([1, 0, -1, 0], abs=1e-6)  # cos
    # Monday 5 June, Monday again, Sunday 11 June, Wednesday 7 June 2000.
    assert cal[:, 2:].argmax(axis=1).tolist() == [0, 0, 6, 2]
    assert cal[:, 2:].sum(axis=1).tolist() == [1, 1, 1, 1]


def test_read_times_finds_the_time_column_or_reports_none(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("when,load\n2000-06-05 00:00,1\n2000-06-05T00:30:00+01:00,2\n")
    assert read_times(p).tolist() == list(
        np.array(["2000-06-05T00:00", "2000-06-05T00:30"], dtype="datetime64[s]").tolist()
    )
    p.write_text("v,w\n20000605,1\n20000606,2\n")
    assert read_times(p) is None
    p.write_text("timestamp,v\n2000-06-05 00:00,1\nsoon,2\n")
    with pytest.raises(DataError, match=r"line 3: the time column 'timestamp' holds 'soon'"):
        read_times(p)
    p.write_text("timestamp,v\n2000-06-05 01:00,1\n2000-06-05 00:00,2\n")
    with pytest.raises(DataError, match=r"line 3: .* does not come after"):
        read_times(p)


def test_model_inputs_fold_the_window_by_the_period():
    z = np.arange(40.0)
    assert fold(6, 3) == (3, 2) and fold(2, 48) == (2, 1) and fold(336, 48) == (48, 7)
    ar = np.array([[100.0, 101.0]])
    x = model_inputs(z, None, np.array([10]), 6, 3, ar)  # (1, 3 steps, 2 lags + 2 AR)
    assert x[0].tolist() == [[7, 4, 100, 101], [8, 5, 100, 101], [9, 6, 100, 101]]
    cal = np.tile(np.arange(9.0), (40, 1))
    assert model_inputs(z, cal, np.array([10]), 6, 3, ar).shape == (1, 3, 2 + 9 + 2)


def _tiny_csv(path, n=400, times=True):
    rng = np.random.default_rng(1)
    k = np.arange(n)
    values = 100 + 10 * np.sin(2 * np.pi * k / 4) + 3 * (k // 4 % 7 == 5) + rng.normal(size=n)
    stamps = np.datetime64("2001-01-01T00:00") + k * np.timedelta64(6, "h")
    rows = [f"{t},{v}" if times else f"{v}" for t, v in zip(stamps, values, strict=True)]
    path.write_text(("time,v\n" if times else "v\n") + "\n".join(rows) + "\n")
    return values


class _Zeros(nn.Module):
    def __init__(self, horizon: int) -> None:
        super().__init__()
        self.horizon = horizon

    def forward(self, x):
        return torch.zeros(x.shape[0], self.horizon)


def _prepare(path, window=8, horizon=2, period=4):
    task = ForecastTask()
    data = {
        "data": str(path),
        "column": "v",
        "window": window,
        "horizon": horizon,
        "period": period,
        "split": [0.7, 0.15, 0.15],
    }
    return task, task.prepare(data)


def test_the_network_predicts_the_residual_over_the_linear_ar(tmp_path):
    values = _tiny_csv(tmp_path / "s.csv")
    task, prep = _prepare(tmp_path / "s.csv")
    pre = prep.preprocessing
    assert prep.model["input_size"] == 2 + 9 + 2 and pre["calendar"]
    test = prep.test
    starts = test.index.numpy()
    true = np.stack([values[t : t + 2] for t in starts])
    # The autoregression fitted on the training part's windows, in data units.
    train_starts = prep.train.index.numpy()
    coef = fit_linear_ar(values, train_starts, 8, 2)
    ar = linear_ar(values, starts, coef)
    # A network that outputs 0 is the linear AR; one that outputs the targets is the truth.
    report = task.report(torch.zeros_like(test.y), test.y, test)
    assert report.arrays["pred"] == pytest.approx(ar)
    assert report.metrics["mae"] == pytest.approx(report.metrics["ar_mae"])
    assert report.metrics["ar_mae"] == pytest.approx(np.abs(ar - true).mean())
    assert task.report(test.y, test.y, test).metrics["mae"] == pytest.approx(0, abs=1e-3)
    # The targets are the residuals scaled by their training standard deviation.
    residual = (true - ar) / pre["std"] / pre["residual_scale"]
    assert test.y.numpy() == pytest.approx(residual, abs=1e-4)
    # The other baselines on the same windows, the weekly one 7 periods = 28 steps back.
    m = report.metrics
    assert m["baseline_mae"] == pytest.approx(
        np.abs(seasonal_naive(values, starts, 4, 2) - true).mean()
    )
    weekly = seasonal_naive(values, starts, 28, 2)
    assert m["weekly_naive_mae"] == pytest.approx(np.abs(weekly - true).mean())
    assert m["best_baseline"] in ("seasonal naive", "weekly naive", "linear AR")


def test_predict_adds_the_network_output_to_the_linear_ar(tmp_path):
    values = _tiny_csv(tmp_path / "s.csv")
    task, prep = _prepare(tmp_path / "s.csv")
    coef = fit_linear_ar(values, prep.train.index.numpy(), 8, 2)
    text = task.predict(_Zeros(2), tmp_path / "s.csv", torch.device("cpu"), 16)
    got = [float(line.split(",")[1]) for line in text.splitlines()[1:]]
    assert got == pytest.approx(linear_ar(values, np.array([len(values)]), coef)[0], abs=0.01)
    _tiny_csv(tmp_path / "plain.csv", times=False)
    with pytest.raises(DataError, match="has no time stamps"):
        task.predict(_Zeros(2), tmp_path / "plain.csv", torch.device("cpu"), 16)


def test_a_series_without_timestamps_has_no_calendar_inputs_nor_short_weekly_naive(tmp_path):
    _tiny_csv(tmp_path / "s.csv", n=120, times=False)
    task, prep = _prepare(tmp_path / "s.csv", window=4, period=20)
    assert prep.model["input_size"] == 1 + 2 and not prep.preprocessing["calendar"]
    # The test part starts at step 102, less than a week (140 steps) into the series.
    metrics = task.report(torch.zeros_like(prep.test.y), prep.test.y, prep.test).metrics
    assert metrics["weekly_naive_mae"] is None and metrics["baseline_mae"] > 0
