"""The forecast task's parts on tiny series: baselines by hand, calendar inputs, residual wiring,
covariates and the ARX, quantiles and their coverage, the rolling-origin backtest."""

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from rnnkit.cli import main
from rnnkit.data import DataError
from rnnkit.data.readers import read_times
from rnnkit.tasks.forecast import (
    RIDGES,
    SMOOTHING_RIDGES,
    ForecastTask,
    LinearBase,
    Smoothing,
    auto_seasons,
    backtest_origins,
    calendar,
    choose_linear_base,
    combined_ar,
    conformal_shifts,
    fit_linear_ar,
    fit_smoothing,
    fold,
    linear_ar,
    model_inputs,
    network_beats_base,
    ordered_quantiles,
    out_of_fold_ar,
    parse_quantiles,
    pinball,
    seasonal_naive,
    shift_quantiles,
    smoothing_forecasts,
)
from rnnkit.train import load


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


def test_the_linear_base_in_changes_is_least_squares_by_hand():
    rng = np.random.default_rng(6)
    series = np.cumsum(rng.normal(size=(80, 2)), axis=0)  # (n, target + a covariate)
    starts = np.arange(4, 76)
    base = LinearBase(differences=True)
    coef = fit_linear_ar(series, starts, 3, 2, base)  # window 3, horizon 2
    # Each column's 3 changes before t (t-3 - t-4, ..., t-1 - t-2), then 1, to the targets'
    # changes from the value at t-1.
    d = np.diff(series, axis=0, prepend=np.nan)
    x = np.array([[*d[t - 3], *d[t - 2], *d[t - 1], 1.0] for t in starts])
    y = np.array([series[t : t + 2, 0] - series[t - 1, 0] for t in starts])
    want = np.linalg.lstsq(x, y, rcond=None)[0]
    assert coef == pytest.approx(want, abs=1e-10)
    t = 77
    got = linear_ar(series, np.array([t]), coef, base)[0]
    assert got == pytest.approx(np.r_[d[t - 3], d[t - 2], d[t - 1], 1.0] @ want + series[t - 1, 0])
    # The ridge weight penalises the coefficients but the constant's, per window.
    ridged = fit_linear_ar(series, starts, 3, 2, LinearBase(True, 0.5))
    penalty = 0.5 * len(starts) * np.diag([1.0] * 6 + [0.0])
    assert ridged == pytest.approx(np.linalg.solve(x.T @ x + penalty, x.T @ y), abs=1e-9)
    assert np.abs(ridged[:-1]).sum() < np.abs(want[:-1]).sum()


def test_the_linear_base_is_the_candidate_best_out_of_fold():
    rng = np.random.default_rng(7)
    k = np.arange(400)
    series = 0.02 * k + np.sin(2 * np.pi * k / 6) + 0.3 * rng.normal(size=len(k))
    starts = np.arange(13, 340)
    (base,), forecasts, maes = choose_linear_base(series, starts, 12, 2, 5)
    assert len(maes) == 2 * len(RIDGES) and maes[base] == min(maes.values())
    # Each candidate's figure is that of its out-of-fold forecasts; the chosen one's are returned.
    truth = np.stack([series[t : t + 2] for t in starts])
    assert forecasts == pytest.approx(out_of_fold_ar(series, starts, 12, 2, 5, base))
    for cand in (LinearBase(), LinearBase(True, 1e-3)):
        oof = out_of_fold_ar(series, starts, 12, 2, 5, cand)
        assert maes[cand] == pytest.approx(np.abs(oof - truth).mean())


def test_a_combined_base_is_the_mean_of_the_candidates_best_out_of_fold():
    rng = np.random.default_rng(7)
    k = np.arange(400)
    series = 0.02 * k + np.sin(2 * np.pi * k / 6) + 0.3 * rng.normal(size=len(k))
    starts = np.arange(13, 340)
    bases, forecasts, maes = choose_linear_base(series, starts, 12, 2, 5, members=3)
    # The 3 least out-of-fold MAEs, best first.
    assert [maes[b] for b in bases] == sorted(maes.values())[:3]
    oofs = [out_of_fold_ar(series, starts, 12, 2, 5, b) for b in bases]
    assert forecasts == pytest.approx((oofs[0] + oofs[1] + oofs[2]) / 3)
    # combined_ar is the plain mean of the members' forecasts, each with its own coefficients.
    later = np.arange(340, 398)
    members = [(b, fit_linear_ar(series, starts, 12, 2, b)) for b in bases]
    each = [linear_ar(series, later, c, b) for b, c in members]
    assert combined_ar(series, later, members) == pytest.approx((each[0] + each[1] + each[2]) / 3)
    assert combined_ar(series, later, members[:1]) == pytest.approx(each[0])


def test_the_smoothing_alone_is_a_candidate_that_fits_nothing():
    k = np.arange(300)
    rng = np.random.default_rng(3)
    series = np.sin(2 * np.pi * k / 6) + 0.2 * rng.normal(size=len(k))
    starts = np.arange(13, 290)
    sm = Smoothing((6,), 0.1, (0.2,), 0.5)
    alone = LinearBase(smoothing=sm, alone=True)
    fc, _ = smoothing_forecasts(series, starts, 2, sm)
    # Its coefficients are 1 for the smoothing's forecast, 0 for the window, the error and 1.
    coef = fit_linear_ar(series, starts, 4, 2, alone)
    assert coef.shape == (4 + 2 + 1, 2) and coef.sum() == 2 and (coef[4] == 1).all()
    assert linear_ar(series, starts, coef, alone) == pytest.approx(fc, abs=1e-12)
    assert out_of_fold_ar(series, starts, 4, 2, 5, alone) == pytest.approx(fc, abs=1e-12)
    _, _, maes = choose_linear_base(series, starts, 4, 2, 5, sm, alone=True)
    assert maes[alone] == pytest.approx(np.abs(fc - targets_of(series, starts, 2)).mean())
    assert alone not in choose_linear_base(series, starts, 4, 2, 5, sm)[2]
    with pytest.raises(ValueError, match="alone"):
        LinearBase(True, smoothing=sm, alone=True)


def test_the_combined_base_is_chosen_and_fitted_without_the_test_part(tmp_path):
    values = _tiny_csv(tmp_path / "s.csv")
    task, prep = _prepare(tmp_path / "s.csv", combine=5)
    first_test_target = int(prep.test.index[0])
    # The same series with its test part (past the last validation target) changed.
    changed = values.copy()
    changed[first_test_target + 2 :] += 50 * np.sin(np.arange(len(values) - first_test_target - 2))
    rows = [f"{t},{v}" for t, v in zip(read_times(tmp_path / "s.csv"), changed, strict=True)]
    (tmp_path / "c.csv").write_text("time,v\n" + "\n".join(rows) + "\n")
    other, _ = _prepare(tmp_path / "c.csv", combine=5)
    assert len(task.members) == 5 and task.bases == other.bases
    for (_, a), (_, b) in zip(task.members, other.members, strict=True):
        assert a == pytest.approx(b, abs=1e-12)
    pre = prep.preprocessing
    assert "ar" not in pre and len(pre["bases"]) == 5
    # The report's base is the mean of the 5, fitted on the windows before the test part.
    z = (values - pre["mean"]) / pre["std"]
    before = np.r_[prep.train.index.numpy(), prep.val.index.numpy()]
    starts = prep.test.index.numpy()
    want = np.mean(
        [linear_ar(z, starts, fit_linear_ar(z, before, 8, 2, b), b) for b in task.bases], axis=0
    )
    report = task.report(torch.zeros_like(prep.test.y), prep.test.y, prep.test)
    assert report.arrays["pred"] == pytest.approx(want * pre["std"] + pre["mean"])
    m = report.metrics
    assert m["linear_base"].startswith("mean of 5") and len(m["linear_base_members"]) == 5
    assert m["linear_base_members"][0] == task._members_text(task.bases)[0]


def test_runs_of_earlier_versions_keep_the_plain_ar_on_the_training_windows(tmp_path):
    values = _tiny_csv(tmp_path / "s.csv")
    # Their options have no --no-conformal, and their data no base.
    options = {"data": str(tmp_path / "s.csv"), "column": "v", "window": 8, "horizon": 2}
    options["period"] = 4
    assert ForecastTask().data_config(options)["base"] == "plain"
    new = ForecastTask().data_config({**options, "no_conformal": False})
    assert new["base"] == "cross-validated" and "conformal" not in new
    task, prep = _prepare(tmp_path / "s.csv", base="plain")
    pre = prep.preprocessing
    assert "ar_differences" not in pre and "ar_ridge" not in pre
    # Windows from step 8 (the window alone), the AR fitted on the training ones only.
    train = prep.train.index.numpy()
    assert train[0] == 8
    z = (values - pre["mean"]) / pre["std"]
    assert np.asarray(pre["ar"]) == pytest.approx(fit_linear_ar(z, train, 8, 2), abs=1e-9)
    zeros = torch.zeros_like(prep.test.y)
    m = task.report(zeros, prep.test.y, prep.test).metrics
    assert m["mae"] == pytest.approx(m["ar_mae"]) and m["linear_base"] == "values, ridge 0"


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
    # With a covariate (-z), each lag gives the target's value then the covariate's.
    x = model_inputs(np.c_[z, -z], None, np.array([10]), 6, 3, ar)  # (1, 3, 2 lags * 2 + 2)
    assert x[0, 0].tolist() == [7, -7, 4, -4, 100, 101]
    assert x[0, 2].tolist() == [9, -9, 6, -6, 100, 101]


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


def _prepare(path, window=8, horizon=2, period=4, column="v", **more):
    task = ForecastTask()
    data = {
        "data": str(path),
        "column": column,
        "window": window,
        "horizon": horizon,
        "period": period,
        "split": [0.7, 0.15, 0.15],
        "base": "cross-validated",
        **more,
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
    # The linear base: the form chosen out of fold on the training and validation windows of
    # the standardised series, then fitted on them all.
    train_starts, val_starts = prep.train.index.numpy(), prep.val.index.numpy()
    before = np.r_[train_starts, val_starts]
    z = (values - pre["mean"]) / pre["std"]
    (base,), _, _ = choose_linear_base(z, before, 8, 2, 5)
    assert task.bases == (base,)
    ar = linear_ar(z, starts, fit_linear_ar(z, before, 8, 2, base), base)
    ar = ar * pre["std"] + pre["mean"]
    # A network that outputs 0 is the linear base; one that outputs the targets is the truth.
    report = task.report(torch.zeros_like(test.y), test.y, test)
    assert report.arrays["pred"] == pytest.approx(ar)
    assert report.metrics["mae"] == pytest.approx(report.metrics["linear_base_mae"])
    assert report.metrics["linear_base_mae"] == pytest.approx(np.abs(ar - true).mean())
    assert task.report(test.y, test.y, test).metrics["mae"] == pytest.approx(0, abs=1e-3)
    # The linear AR baseline is the plain one: values to values, least squares, in data units.
    plain = linear_ar(values, starts, fit_linear_ar(values, before, 8, 2))
    assert report.metrics["ar_mae"] == pytest.approx(np.abs(plain - true).mean())
    # The targets are the residuals scaled by their training standard deviation.
    residual = (true - ar) / pre["std"] / pre["residual_scale"]
    assert test.y.numpy() == pytest.approx(residual, abs=1e-4)
    # Those of the training and validation windows are over the base's forecasts out of fold,
    # as on new data, not over the fit that saw their targets.
    oof = out_of_fold_ar(z, before, 8, 2, 5, base)  # (train + val windows, 2)
    z_true = np.stack([z[t : t + 2] for t in before])
    seen = torch.cat([prep.train.y, prep.val.y]).numpy()
    assert seen == pytest.approx((z_true - oof) / pre["residual_scale"], abs=1e-4)
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
    pre, (base,) = prep.preprocessing, task.bases
    z = (values - pre["mean"]) / pre["std"]
    before = np.r_[prep.train.index.numpy(), prep.val.index.numpy()]
    coef = fit_linear_ar(z, before, 8, 2, base)
    want = linear_ar(z, np.array([len(values)]), coef, base)[0] * pre["std"] + pre["mean"]
    text = task.predict(_Zeros(2), tmp_path / "s.csv", torch.device("cpu"), 16)
    got = [float(line.split(",")[1]) for line in text.splitlines()[1:]]
    assert got == pytest.approx(want, abs=0.01)
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


# ---- covariates and the ARX


def _leading_csv(path, n=600, lead=3, more=False):
    """A target ``y`` that is 3 times the covariate ``c`` (an AR(1)) ``lead`` steps earlier, plus a
    little noise; a text column ``label``; hourly time stamps; optionally a noise column
    ``more``."""
    rng = np.random.default_rng(0)
    c = np.zeros(n)
    for t in range(1, n):
        c[t] = 0.8 * c[t - 1] + rng.normal()
    y = 10 + 3 * np.roll(c, lead) + 0.1 * rng.normal(size=n)
    stamps = np.datetime64("2001-01-01T00:00") + np.arange(n) * np.timedelta64(1, "h")
    rows = [f"{s},{a:.5f},{b:.5f},x" for s, a, b in zip(stamps, c, y, strict=True)]
    header = "time,c,y,label"
    if more:
        header += ",more"
        rows = [f"{r},{v:.4f}" for r, v in zip(rows, rng.normal(size=n), strict=True)]
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return y, c


def test_arx_is_the_least_squares_solution_over_every_columns_window():
    rng = np.random.default_rng(2)
    series = rng.normal(size=(60, 3))  # (n, target + 2 covariates)
    starts = np.arange(2, 57)
    coef = fit_linear_ar(series, starts, 2, 3)  # window 2, horizon 3
    # The design by hand: each column at t-2, then each at t-1, then 1.
    x = np.array([[*series[t - 2], *series[t - 1], 1.0] for t in starts])
    y = np.array([series[t : t + 3, 0] for t in starts])
    want = np.linalg.lstsq(x, y, rcond=None)[0]
    assert coef == pytest.approx(want, abs=1e-10)
    assert linear_ar(series, np.array([58]), coef)[0] == pytest.approx(
        np.r_[series[56], series[57], 1.0] @ want
    )


def test_the_arx_reads_the_covariates_and_the_network_their_lags(tmp_path):
    _y, c = _leading_csv(tmp_path / "s.csv")
    task, prep = _prepare(tmp_path / "s.csv", column="y", covariates=["c"], quantiles=[0.5])
    pre = prep.preprocessing
    assert pre["covariates"] == ["c"] and pre["covariate_mean"][0] == pytest.approx(
        c[: int(0.7 * 600)].mean()
    )
    # The network reads 2 lags of both columns, the calendar and the 2 ARX forecasts.
    assert prep.model == {"kind": "regressor", "input_size": 2 * 2 + 9 + 2, "output_size": 2}
    # A network that outputs 0 is the ARX, which recovers the lead: far below the linear AR.
    test = prep.test
    report = task.report(torch.zeros(len(test), 2), test.y, test)
    plain_task, plain = _prepare(tmp_path / "s.csv", column="y", quantiles=[0.5])
    zeros = torch.zeros(len(plain.test), 2)
    alone = plain_task.report(zeros, plain.test.y, plain.test).metrics["ar_mae"]
    assert report.metrics["best_baseline"] == "ARX"
    assert report.metrics["ar_mae"] < 0.2 * alone
    # The ARX's error is the noise's: 0.1 times E|N(0, 1)| = 0.08.
    assert report.metrics["ar_mae"] == pytest.approx(0.08, rel=0.3)


def test_a_covariate_that_determines_the_target_is_learned(tmp_path, capsys):
    _leading_csv(tmp_path / "s.csv")
    maes = {}
    for name, extra in (("alone", []), ("with c", ["--covariates", "c"])):
        argv = ["train", "forecast", "--data", tmp_path / "s.csv", "--column", "y", *extra]
        argv += ["--window", "8", "--period", "4", "--horizon", "2", "--epochs", "2"]
        argv += ["--hidden-size", "8", "--threads", "1", "--quiet", "--out", tmp_path / name]
        assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
        maes[name] = json.loads((tmp_path / name / "summary.json").read_text())["mae"]
    assert maes["with c"] < 0.2 * maes["alone"]
    capsys.readouterr()
    # predict reads the covariate too, and refuses a file without it.
    (tmp_path / "recent.csv").write_text(
        "\n".join((tmp_path / "s.csv").read_text().splitlines()[:30]) + "\n"
    )
    rc = main(["predict", str(tmp_path / "with c"), str(tmp_path / "recent.csv")])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0 and out[0] == "steps_ahead,forecast,q0.1,q0.9" and len(out) == 3
    lines = [f"2001-01-01 {h:02d}:00,{h}" for h in range(20)]
    (tmp_path / "no-c.csv").write_text("time,y\n" + "\n".join(lines) + "\n")
    rc = main(["predict", str(tmp_path / "with c"), str(tmp_path / "no-c.csv")])
    err = capsys.readouterr().err
    assert rc != 0 and "has no column 'c'" in err and err.strip().count("\n") == 0


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--covariates", "nope"], ["has no column 'nope'"]),
        (["--covariates", "label"], ["column 'label' holds 'x', expected a number"]),
        (["--covariates", "gap"], ["line 3: column 'gap' is empty"]),
        (["--covariates", "y"], ["'y' is the column forecast"]),
        (["--covariates", "c,c"], ["names 'c' more than once"]),
        (["--covariates", "flat"], ["covariate 'flat'", "constant"]),
        (["--covariates", "c", "--all-covariates"], ["exclude each other"]),
        (["--all-covariates"], ["column 'gap' is empty"]),
    ],
    ids=["unknown", "text", "missing-value", "the-target", "twice", "constant", "both", "all"],
)
def test_bad_covariate_columns_are_refused_naming_the_column(tmp_path, capsys, flags, fragments):
    _y, _c = _leading_csv(tmp_path / "s.csv", n=200)
    lines = (tmp_path / "s.csv").read_text().splitlines()
    body = [f"{row},{'' if k == 1 else k},5" for k, row in enumerate(lines[1:])]
    (tmp_path / "s.csv").write_text(lines[0] + ",gap,flat\n" + "\n".join(body) + "\n")
    argv = ["train", "forecast", "--data", tmp_path / "s.csv", "--column", "y", *flags]
    argv += ["--window", "8", "--period", "4", "--horizon", "2", "--out", tmp_path / "r"]
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("rnnkit ") and err.strip().count("\n") == 0, err
    for f in fragments:
        assert f in err, err


def test_covariates_need_a_csv(tmp_path, capsys):
    rc = main(["train", "forecast", "--covariates", "a", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "--covariates names columns of --data CSV, which is not given" in err


def test_all_covariates_takes_every_other_numeric_column(tmp_path):
    _leading_csv(tmp_path / "s.csv", more=True)
    _, prep = _prepare(tmp_path / "s.csv", column="y", covariates=[], all_covariates=True)
    # Not the time stamps, the target, nor the text column.
    assert prep.preprocessing["covariates"] == ["c", "more"]
    assert prep.model["input_size"] == 2 * 3 + 9 + 2


# ---- quantiles


def test_quantiles_never_cross_and_keep_the_median_output():
    raw = 20 * torch.randn(50, 3 * 5)  # (N, horizon 3 * 5 levels), far from the origin
    q = ordered_quantiles(raw, 5, 2)  # (N, 3, 5)
    assert q.shape == (50, 3, 5)
    assert (q.diff(dim=-1) >= 0).all()
    assert torch.equal(q[..., 2], raw.reshape(50, 3, 5)[..., 2])


def test_pinball_loss_by_hand_and_the_levels_parsed():
    q = torch.tensor([[[0.0, 1.0]]])  # (1, 1, 2) at levels 0.1, 0.9
    y = torch.tensor([[2.0]])
    # y above both: 0.1 * 2 + 0.9 * 1
    assert float(pinball(q, y, torch.tensor([0.1, 0.9]))) == pytest.approx(1.1)
    assert parse_quantiles("0.9, 0.1") == [0.1, 0.5, 0.9]
    assert parse_quantiles("none") == []
    for bad in ("1", "0", "a", "0.1,,0.9"):
        with pytest.raises(DataError, match="is not a level between 0 and 1"):
            parse_quantiles(bad)


def test_the_interval_covers_its_nominal_share_of_gaussian_noise(tmp_path, capsys):
    rng = np.random.default_rng(3)
    k = np.arange(3000)
    values = 10 * np.sin(2 * np.pi * k / 8) + rng.normal(size=len(k))  # noise sd 1
    (tmp_path / "s.csv").write_text("v\n" + "\n".join(f"{v:.5f}" for v in values) + "\n")
    argv = ["train", "forecast", "--data", tmp_path / "s.csv", "--window", "8", "--period", "8"]
    # No smoothing: the width below is that of the window AR's Gaussian errors.
    argv += ["--seasons", "none"]
    argv += ["--horizon", "2", "--epochs", "4", "--lr", "0.03", "--hidden-size", "8"]
    argv += ["--threads", "1", "--quiet", "--out", tmp_path / "r"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["interval"] == "10-90%" and s["interval_nominal"] == pytest.approx(0.8)
    # Three binomial standard errors of the test windows' count (adjacent windows share targets,
    # so the windows, not their 2 targets each, are the independent draws).
    se = math.sqrt(0.8 * 0.2 / s["test_windows"])
    assert abs(s["interval_coverage"] - 0.8) < 3 * se
    # The AR's errors are Gaussian (sums of Gaussian noise): an 80% interval is 2.563 sd wide.
    ar_sd = s["ar_rmse"]
    assert s["interval_width"] == pytest.approx(2 * 1.2816 * ar_sd, rel=0.15)
    assert s["quantile_levels"] == [0.1, 0.5, 0.9]
    text = (tmp_path / "r" / "backtest.png").read_bytes()
    assert text[:8] == b"\x89PNG\r\n\x1a\n"


def test_conformal_shifts_by_hand():
    # 9 held-out windows of one step; the residuals y - q of the upper quantile are 1..9, those
    # of the lower 0..-8 (its targets lie above it but for one).
    y = np.zeros((9, 1))
    q = np.stack([np.arange(0.0, 9.0), np.zeros(9), -np.arange(1.0, 10.0)], axis=-1)[:, None]
    shifts = conformal_shifts(q, y, [0.1, 0.5, 0.9])  # (1, 3)
    # Level 0.9: the ceil(10 * 0.9) = 9th smallest of y - q_0.9 = 1..9: 9, all 9 targets below.
    # Level 0.1: the mirror, the 9th smallest of q_0.1 - y = 0..8: move down by 8.
    assert shifts.tolist() == [[-8.0, 0.0, 9.0]]
    # Fewer windows than the level needs: the largest residual, not past the end.
    assert conformal_shifts(q[:3, :, 1:], y[:3], [0.5, 0.99]).tolist() == [[0.0, 3.0]]


def test_shifted_quantiles_keep_the_median_and_their_order():
    rng = np.random.default_rng(4)
    q = np.sort(rng.normal(size=(40, 3, 5)), axis=-1)  # (N, horizon, Q)
    shifts = 2 * rng.normal(size=(3, 5))  # some narrow the band past the median
    shifts[:, 2] = 0
    out = shift_quantiles(q, shifts, 2)
    assert (np.diff(out, axis=-1) >= 0).all()
    assert np.array_equal(out[..., 2], q[..., 2])
    # Where no neighbour is passed, each quantile moves by its own shift.
    free = (np.diff(q + shifts, axis=-1) >= 0).all(axis=-1)
    assert free.any() and np.allclose(out[free], (q + shifts)[free])


def test_the_conformal_correction_gives_a_too_narrow_band_its_coverage(tmp_path):
    # A "network" whose band is a tenth of the noise: the raw outputs make quantiles 0 and
    # +-0.1 * softplus(0) of the scaled residual around the linear AR.
    _tiny_csv(tmp_path / "s.csv", n=3000)
    task, prep = _prepare(tmp_path / "s.csv", quantiles=[0.1, 0.5, 0.9])
    raw = torch.zeros(1, 2, 3)
    raw[..., 0] = raw[..., 2] = math.log(math.expm1(0.1))
    raw = raw.reshape(1, 6)
    test = prep.test
    before = task.report(raw.expand(len(test), 6), test.y, test).metrics
    val = prep.val
    learnt = task.calibrate(raw.expand(len(val), 6), val.y, val)
    assert np.asarray(learnt["conformal"]).shape == (2, 3)
    after = task.report(raw.expand(len(test), 6), test.y, test).metrics
    assert before["interval_coverage"] < 0.2 and not before["interval_conformal"]
    # Three binomial standard errors of the test windows' count, the windows as the draws;
    # conformal guarantees at least the nominal share, a little more with few windows.
    se = math.sqrt(0.8 * 0.2 / after["test_windows"])
    assert after["interval_conformal"] and abs(after["interval_coverage"] - 0.8) < 3 * se
    for got, level in zip(after["quantile_coverage"], [0.1, 0.5, 0.9], strict=True):
        assert abs(got - level) < 3 * math.sqrt(level * (1 - level) / after["test_windows"])
    # The median, the point forecast, does not move.
    assert after["mae"] == before["mae"]


def test_the_forecast_is_the_base_alone_where_the_network_loses_to_it_on_validation(tmp_path):
    _tiny_csv(tmp_path / "s.csv")
    task, prep = _prepare(tmp_path / "s.csv", quantiles=[0.1, 0.5, 0.9])
    val, test = prep.val, prep.test

    def raw(y, offset):  # quantiles y + offset - 1, y + offset, y + offset + 1 (softplus 1)
        mid = y + offset
        step = torch.full_like(y, math.log(math.expm1(1.0)))
        return torch.stack([step, mid, step], dim=-1).reshape(len(y), -1)  # (N, horizon * 3)

    # A network that knows the validation targets wins: its median stays the forecast.
    decided = task.calibrate(raw(val.y, 0.0), val.y, val)
    assert decided["network_weight"] == 1.0
    assert decided["network_vs_base"]["network_mae"] < 1e-3 < decided["network_vs_base"]["base_mae"]
    m = task.report(raw(test.y, 0.0), test.y, test).metrics
    assert m["forecast_from"] == "the network's median" and m["mae"] < 1e-3
    # One that is 5 scaled residuals off loses to the base alone: the base is the forecast, and
    # the band keeps its width around it.
    task, prep = _prepare(tmp_path / "s.csv", quantiles=[0.1, 0.5, 0.9], conformal=False)
    assert task.calibrate(raw(val.y, 5.0), val.y, val)["network_weight"] == 0.0
    report = task.report(raw(test.y, 5.0), test.y, test)
    m = report.metrics
    assert m["forecast_from"] == "the linear base"
    assert m["mae"] == pytest.approx(m["linear_base_mae"])
    scale = prep.preprocessing["residual_scale"] * prep.preprocessing["std"]
    assert m["interval_width"] == pytest.approx(2 * scale, rel=1e-6)


def test_the_forecast_is_the_mean_of_network_and_base_where_only_the_mean_wins(tmp_path):
    _tiny_csv(tmp_path / "s.csv")
    task, prep = _prepare(tmp_path / "s.csv", quantiles=[0.1, 0.5, 0.9], conformal=False)
    val, test = prep.val, prep.test

    def raw(y):  # a median twice the residual, quantiles 1 below and above it
        step = torch.full_like(y, math.log(math.expm1(1.0)))
        return torch.stack([step, 2 * y, step], dim=-1).reshape(len(y), -1)

    # Twice the residual is as far off as the base (0): the median alone does not win, the
    # equal-weight mean of the two (the residual itself) does, and is decided on validation.
    decided = task.calibrate(raw(val.y), val.y, val)
    figures = decided["network_vs_base"]
    assert figures["network_mae"] == pytest.approx(figures["base_mae"], rel=1e-5)
    assert figures["mean_mae"] < 1e-3 and decided["network_weight"] == 0.5
    m = task.report(raw(test.y), test.y, test).metrics
    assert m["forecast_from"] == "the network's median (0.5) and the linear base"
    assert m["mae"] == pytest.approx(0, abs=1e-3)
    # The band keeps its offsets from the network's median around the mean.
    scale = prep.preprocessing["residual_scale"] * prep.preprocessing["std"]
    assert m["interval_width"] == pytest.approx(2 * scale, rel=1e-5)


def test_the_conformal_correction_is_saved_with_the_model_and_used_by_evaluate(tmp_path, capsys):
    _tiny_csv(tmp_path / "s.csv", n=600)
    argv = ["train", "forecast", "--data", tmp_path / "s.csv", "--window", "8", "--period", "4"]
    argv += ["--horizon", "2", "--epochs", "1", "--hidden-size", "4", "--threads", "1"]
    runs = {}
    for name, extra in (("cqr", []), ("raw", ["--no-conformal"])):
        args = [*argv, *extra, "--quiet", "--out", tmp_path / name]
        assert main([str(a) for a in args]) == 0, capsys.readouterr().err
        runs[name] = json.loads((tmp_path / name / "summary.json").read_text())
    assert runs["cqr"]["interval_conformal"] and not runs["raw"]["interval_conformal"]
    model = load(tmp_path / "cqr")
    assert np.asarray(model.preprocessing["conformal"]).shape == (2, 3)
    assert "conformal" not in load(tmp_path / "raw").preprocessing
    # evaluate reads the correction from the model file: the summary's interval again.
    rc = main(["evaluate", str(tmp_path / "cqr"), "--output", str(tmp_path / "m.json")])
    assert rc == 0, capsys.readouterr().err
    again = json.loads((tmp_path / "m.json").read_text())
    for key in ("interval_coverage", "interval_width", "mae"):
        assert again[key] == pytest.approx(runs["cqr"][key], rel=1e-6)
    # predict prints the corrected quantiles: the same weights without the correction differ
    # in the outer quantiles only.
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "cqr"), str(tmp_path / "s.csv")]) == 0
    rows = [line.split(",") for line in capsys.readouterr().out.splitlines()[1:]]
    task = ForecastTask()
    task.preprocessing = {k: v for k, v in model.preprocessing.items() if k != "conformal"}
    text = task.predict(model, tmp_path / "s.csv", torch.device("cpu"), 16)
    plain = [line.split(",") for line in text.splitlines()[1:]]
    assert [r[1] for r in rows] == [r[1] for r in plain]
    assert [r[2:] for r in rows] != [r[2:] for r in plain]


# ---- the rolling-origin backtest


def test_backtest_windows_never_see_their_own_future(tmp_path):
    values = _tiny_csv(tmp_path / "s.csv")
    _task, prep = _prepare(tmp_path / "s.csv", quantiles=[0.1, 0.5, 0.9])
    starts = prep.test.index.numpy()
    origin = int(starts[10])
    # The same series with everything from the origin on replaced.
    changed = values.copy()
    changed[origin:] = 1e3 + np.arange(len(values) - origin)
    lines = (tmp_path / "s.csv").read_text().splitlines()
    rows = [f"{line.split(',')[0]},{v}" for line, v in zip(lines[1:], changed, strict=True)]
    (tmp_path / "t.csv").write_text(lines[0] + "\n" + "\n".join(rows) + "\n")
    _, other = _prepare(tmp_path / "t.csv", quantiles=[0.1, 0.5, 0.9])
    # The training part and so everything fitted is the same; the inputs of every window whose
    # first target is at or before the origin too, and its targets differ.
    assert other.preprocessing == prep.preprocessing
    seen = starts <= origin
    assert torch.equal(other.test.x[seen], prep.test.x[seen])
    assert not torch.equal(other.test.y[10], prep.test.y[10])
    assert not torch.equal(other.test.x[~seen][0], prep.test.x[~seen][0])
    # The origins tile the test part: every target step once.
    rows = backtest_origins(len(starts), 2)
    covered = np.concatenate([starts[r] + np.arange(2) for r in rows])
    assert len(set(covered.tolist())) == len(covered)
    assert set(covered.tolist()) >= set(range(starts[0], starts[-1] + 1))


def test_the_backtest_reports_mae_per_step_over_its_origins(tmp_path):
    values = _tiny_csv(tmp_path / "s.csv")
    task, prep = _prepare(tmp_path / "s.csv", quantiles=[0.1, 0.5, 0.9])
    test = prep.test
    raw = torch.randn(len(test), 2 * 3, generator=torch.Generator().manual_seed(0))
    m = task.report(raw, test.y, test).metrics
    starts = test.index.numpy()[::2]
    true = np.stack([values[t : t + 2] for t in starts])
    pred = task.report(raw, test.y, test).arrays["pred"][::2]
    assert m["backtest_origins"] == len(starts)
    assert m["backtest_mae_per_step"] == pytest.approx(np.abs(pred - true).mean(axis=0))
    naive = seasonal_naive(values, starts, 4, 2)
    assert m["backtest_baseline_mae_per_step"] == pytest.approx(np.abs(naive - true).mean(axis=0))


def test_the_median_alone_has_no_interval_and_old_runs_have_no_quantiles(tmp_path):
    _tiny_csv(tmp_path / "s.csv")
    task, prep = _prepare(tmp_path / "s.csv", quantiles=[0.5])
    assert prep.model["output_size"] == 2
    m = task.report(torch.zeros_like(prep.test.y), prep.test.y, prep.test).metrics
    assert "interval_coverage" not in m and m["mae"] == pytest.approx(m["linear_base_mae"])
    # The options of a run of an earlier version (resumed) name no quantiles: a point forecast.
    options = {"data": str(tmp_path / "s.csv"), "column": "v", "window": 8, "horizon": 2}
    assert ForecastTask().data_config({**options, "period": 4})["quantiles"] == []


def _smoothing_by_hand(z, s: Smoothing, origin, horizon):
    """The docstring's equations stepped one value at a time: forecasts from ``origin``."""
    L = max(s.seasons)
    level = z[:L].mean()
    rest = z[:L] - level
    profiles = {}
    for p in sorted(s.seasons):
        profiles[p] = [rest[k::p].mean() for k in range(p)]
        rest = rest - np.array([profiles[p][k % p] for k in range(L)])
    e = 0.0
    for t in range(L, origin + 1):
        e = z[t] - level - sum(profiles[p][t % p] for p in s.seasons)
        level += s.alpha * e
        for p, g in zip(s.seasons, s.gammas, strict=True):
            profiles[p][t % p] += g * e
    ahead = [origin + k for k in range(1, horizon + 1)]
    fc = [
        level + sum(profiles[p][u % p] for p in s.seasons) + s.phi**k * e
        for k, u in enumerate(ahead, 1)
    ]
    return np.array(fc), e


def test_smoothing_follows_its_equations_step_by_step():
    rng = np.random.default_rng(11)
    z = np.cumsum(rng.normal(size=90)) * 0.3 + np.sin(np.arange(90))
    s = Smoothing((3, 12), 0.3, (0.2, 0.1), 0.8)
    starts = np.array([12, 13, 40, 89])  # origins 11 (the first season's end), 12, 39, 88
    fc, err = smoothing_forecasts(z, starts, 3, s)
    for k, t in enumerate(starts):
        want, e = _smoothing_by_hand(z, s, t - 1, 3)
        assert fc[k] == pytest.approx(want, abs=1e-12) and err[k] == pytest.approx(e, abs=1e-12)


def test_smoothing_recovers_two_seasons_exactly_and_the_base_keeps_it():
    # A level plus a daily (4 steps) and a weekly (28 steps) profile, no noise: the state after
    # the first week holds both profiles, every one-step error is 0 and every forecast exact.
    k = np.arange(400)
    day, week = np.array([0.0, 2.0, -1.0, 3.0]), np.sin(2 * np.pi * np.arange(28) / 28)
    series = 5.0 + day[k % 4] + week[k % 28]
    starts = np.arange(30, 396)
    s = Smoothing((4, 28), 0.4, (0.2, 0.3), 0.9)
    fc, err = smoothing_forecasts(series, starts, 3, s)
    assert fc == pytest.approx(targets_of(series, starts, 3), abs=1e-12)
    assert np.abs(err).max() < 1e-12
    # With noise, the level chosen stays nearly fixed, and the base built on the
    # smoothing beats the window AR out of fold (the window of 8 sees too little of the week).
    noisy = series + 0.3 * np.random.default_rng(2).normal(size=len(series))
    fitted = fit_smoothing(noisy, starts, 3, (4, 28))
    assert fitted.alpha <= 0.1
    window = np.arange(30, 396)
    (base,), _, maes = choose_linear_base(noisy, window, 8, 3, 5, fitted)
    assert len(maes) == 2 * len(RIDGES) + 2 * len(SMOOTHING_RIDGES)
    assert base.smoothing == fitted
    plain = min(v for b, v in maes.items() if b.smoothing is None)
    assert maes[base] < 0.8 * plain
    # Noise of sd 0.3 has a mean absolute value of 0.24: the base's error is near that floor.
    assert maes[base] < 0.24 * 1.25


def targets_of(series, starts, horizon):
    return np.stack([series[t : t + horizon] for t in starts])


def test_smoothing_never_reads_a_window_s_own_future():
    rng = np.random.default_rng(5)
    z = rng.normal(size=120)
    s = Smoothing((6, 24), 0.2, (0.1, 0.2), 0.7)
    starts = np.array([60])
    before = smoothing_forecasts(z, starts, 4, s)
    later = z.copy()
    later[60:] += 100.0  # the window's targets and everything after them
    after = smoothing_forecasts(later, starts, 4, s)
    assert after[0] == pytest.approx(before[0]) and after[1] == pytest.approx(before[1])
    earlier = z.copy()
    earlier[59] += 1.0  # the last value before the window is read
    assert not np.allclose(smoothing_forecasts(earlier, starts, 4, s)[0], before[0])


def test_the_linear_base_with_smoothing_is_ridge_least_squares_by_hand():
    rng = np.random.default_rng(8)
    k = np.arange(200)
    series = np.sin(2 * np.pi * k / 6) + 0.5 * rng.normal(size=len(k))
    starts = np.arange(13, 190)
    sm = Smoothing((6,), 0.1, (0.2,), 0.5)
    fc, err = smoothing_forecasts(series, starts, 2, sm)
    for differences, ridge in ((False, 0.0), (True, 0.3)):
        base = LinearBase(differences, ridge, sm)
        coef = fit_linear_ar(series, starts, 4, 2, base)  # (4 window + 2 smoothing + 1, 2)
        origin = series[starts - 1] if differences else np.zeros(len(starts))
        d = np.diff(series, prepend=np.nan) if differences else series
        window = np.stack([d[t - 4 : t] for t in starts])
        for j in range(2):
            x = np.c_[window, fc[:, j] - origin, err, np.ones(len(starts))]
            y = series[starts + j] - origin
            # The ridge penalises the window's 4 coefficients only.
            penalty = ridge * len(starts) * np.diag([1.0] * 4 + [0.0] * 3)
            want = np.linalg.solve(x.T @ x + penalty, x.T @ y)
            assert coef[:, j] == pytest.approx(want, abs=1e-8)
            got = linear_ar(series, starts, coef, base)[:, j]
            assert got == pytest.approx(x @ want + origin, abs=1e-8)


def test_seasons_auto_adds_a_week_only_for_daily_periods_with_a_week_of_window(tmp_path):
    half_hours = np.datetime64("2000-06-05T00:00") + np.arange(10) * np.timedelta64(30, "m")
    assert auto_seasons(48, 336, half_hours) == [48, 336]
    assert auto_seasons(48, 100, half_hours) == [48]  # the window holds no week
    assert auto_seasons(24, 336, half_hours) == [24]  # 24 half-hours are not a day
    assert auto_seasons(48, 336, None) == [48]
    _tiny_csv(tmp_path / "s.csv")  # 6-hourly: a day is 4 steps
    _, prep = _prepare(tmp_path / "s.csv", window=28, seasons="auto")
    note = next(n for n in prep.notes if n.startswith("linear base"))
    if "smoothing" in note:
        assert "seasons 4, 28" in note
        assert prep.preprocessing["smoothing"]["seasons"] == [4, 28]


@pytest.mark.parametrize(
    "text, fragment",
    [("0,48", "at least 2"), ("a", "expected auto"), ("4,8,12", "at most 2"), ("48,400", "longer")],
    ids=["too-short", "not-a-number", "three-seasons", "longer-than-window"],
)
def test_bad_seasons_are_refused_with_a_clear_error(tmp_path, capsys, text, fragment):
    _tiny_csv(tmp_path / "s.csv")
    argv = ["train", "forecast", "--data", tmp_path / "s.csv", "--window", "336"]
    argv += ["--seasons", text, "--epochs", "1", "--quiet", "--out", tmp_path / "r"]
    assert main([str(a) for a in argv]) != 0
    assert fragment in capsys.readouterr().err


def test_a_model_with_smoothing_trains_and_predicts(tmp_path, capsys):
    k = np.arange(600)
    rng = np.random.default_rng(4)
    values = 50 + 5 * np.sin(2 * np.pi * k / 4) + 2 * (k % 28 < 4) + 0.3 * rng.normal(size=600)
    (tmp_path / "s.csv").write_text("v\n" + "\n".join(f"{v:.5f}" for v in values) + "\n")
    argv = ["train", "forecast", "--data", tmp_path / "s.csv", "--window", "28", "--period", "4"]
    argv += ["--seasons", "4,28", "--horizon", "2", "--epochs", "2", "--hidden-size", "8"]
    argv += ["--threads", "1", "--quiet", "--out", tmp_path / "r"]
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert "smoothing of seasons 4, 28" in summary["linear_base"]
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "r"), str(tmp_path / "s.csv")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("steps_ahead,forecast") and len(lines) == 3


def test_the_network_must_beat_the_base_by_two_standard_errors_of_block_means():
    base = np.ones(12)
    # Blocks of 3 windows: differences -0.3, -0.1, -0.2, -0.2 per block, mean -0.2; the block
    # means' standard deviation is sqrt(0.02 / 3), so the standard error is sqrt(0.02 / 3) / 2.
    network = base + np.repeat([-0.3, -0.1, -0.2, -0.2], 3)
    wins, se = network_beats_base(network, base, 3)
    assert se == pytest.approx(math.sqrt(0.02 / 3) / 2) and wins  # -0.2 < -2 * 0.0408
    # The same mean with blocks far apart: -0.2 is no longer 2 standard errors below 0.
    network = base + np.repeat([-0.8, 0.4, -0.6, 0.2], 3)
    wins, se = network_beats_base(network, base, 3)
    assert se == pytest.approx(np.std([-0.8, 0.4, -0.6, 0.2], ddof=1) / 2) and not wins
    # A worse network never wins; one block is too few to tell.
    assert not network_beats_base(base + 0.1, base, 3)[0]
    assert network_beats_base(base - 1.0, base, 12) == (
        False,
        pytest.approx(float("nan"), nan_ok=True),
    )


def test_a_series_the_smoothing_forecasts_exactly_still_gives_a_base():
    # Every one-step error is 0: the error column is all zeros, and the normal equations of a
    # ridge that leaves it unpenalised would be singular.
    series = np.tile([1.0, 4.0, 2.0, 8.0, 5.0], 60)
    starts = np.arange(9, 290)
    s = Smoothing((5,), 0.1, (0.2,), 0.5)
    for ridge in (0.0, 0.1):
        base = LinearBase(True, ridge, s)
        coef = fit_linear_ar(series, starts, 8, 2, base)
        assert np.isfinite(coef).all()
        assert linear_ar(series, starts, coef, base) == pytest.approx(
            targets_of(series, starts, 2), abs=1e-6
        )
    with pytest.raises(ValueError, match="before the first season"):
        smoothing_forecasts(series, np.array([4]), 2, s)


def test_combine_must_name_at_least_one_base(tmp_path):
    _tiny_csv(tmp_path / "s.csv")
    options = {"data": str(tmp_path / "s.csv"), "column": "v", "window": 8, "horizon": 2}
    options |= {"period": 4, "no_conformal": False, "combine": 0}
    with pytest.raises(DataError, match="--combine must be at least 1; got 0"):
        ForecastTask().data_config(options)
    # Runs of earlier versions (no --combine) keep one base, without the smoothing alone.
    del options["combine"]
    assert "combine" not in ForecastTask().data_config(options)
