"""Load forecasting: a week of half-hourly history (336 steps) predicts the next 4 (2 h).

The series is cut chronologically into train, validation and test parts (70 / 15 / 15); a window
belongs to the part its targets fall in, and its history may reach back into the part before, as
it would in use. The scaling is fitted on the training part; the linear autoregressions on the
windows of the training and validation parts, everything before the test part.

Every report scores three baselines on the same windows: the seasonal naive forecast (the same
step one ``period`` earlier: a day), the weekly naive (7 periods earlier, where the series reaches
back that far) and a linear autoregression (least squares from the window's values and a constant
to each horizon step). The model predicts the residual over its own linear base: its output, times
the residuals' training standard deviation, is added to the base's forecast. The base is the
equal-weight mean of the forecasts of the ``--combine`` (5) candidates that forecast the windows
before the test part best out of fold (each block of 5 by a fit on the others): the linear
autoregression above or one from the window's step-to-step changes to each target's change from
the last value, each with a ridge penalty of several weights, or either of those with two more
regressors per step from an exponential smoothing with one profile per season (``--seasons``;
:class:`Smoothing`), which reads the whole history, not one window, as MSTL does: the daily and
weekly profiles of half-hourly load are estimated over many weeks. A mean of several good
forecasts is steadier than the one that scored best (the lesson of the M3 and M4 competitions).
The network's input is the window folded by the period: the recurrent layer reads the last
``period`` steps, each with the values 0, 1, ... periods earlier, the calendar (hour of day and
day of week, when the CSV has time stamps) and the base's forecast (and the smoothing's, where
the base has one).

Covariates (``--covariates``: other columns of the CSV) are read the same way: the autoregression
becomes an ARX, least squares from the window's values of every column, and the recurrent layer
reads each covariate's values 0, 1, ... periods earlier beside the target's. Only their past is
read, so a covariate helps where it leads the target or shares its dynamics.

The model predicts quantiles of the residual (``--quantiles``, by default 10, 50 and 90%) under
the pinball loss; the median corrects the base, and the quantiles cannot cross: the others are
the median minus or plus cumulative sums of softplus increments. After training, each quantile
but the median is moved by the conformal correction that makes it hold its level on the
validation windows (:func:`conformal_shifts`), saved with the model. The point forecast is the
network's median or the equal-weight mean of it and the base, whichever beats the base alone on
the validation windows by two standard errors (of both that do, the one of less validation MAE),
else the base alone (:meth:`ForecastTask.calibrate`). The test report scores every test window,
and, as a rolling-origin backtest, the windows every ``horizon`` steps (one forecast per step of
the test part, from origins that never see their own targets, nothing refitted), by MAE per step
ahead.
"""

import argparse
import csv
import functools
import io
import itertools
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from rnnkit.data import DataError, chronological_split, load_taylor, read_series
from rnnkit.data.readers import csv_header, numeric_columns, read_columns, read_times, taylor_csv
from rnnkit.tasks.base import Prepared, Split, Task, forward_all
from rnnkit.train import plots as draw
from rnnkit.train.objective import Report

# The weekly naive looks back this many periods (a week when the period is a day).
WEEK = 7
# Calendar inputs per step: sin and cos of the time of day, then the day of the week one-hot.
CALENDAR_FEATURES = 9


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


def seasonal_naive(series: np.ndarray, starts: np.ndarray, lag: int, horizon: int) -> np.ndarray:
    """``(N, horizon)``: for the window whose first target is step ``t``, the values at
    ``t - lag, ..., t - lag + horizon - 1`` (``lag >= horizon``, so all in the past)."""
    return np.stack([series[t - lag : t - lag + horizon] for t in starts])


def _columns(series: np.ndarray) -> np.ndarray:
    """``(n, C)``: a series of one column ``(n,)`` or several ``(n, C)``, the target first."""
    return series.reshape(len(series), -1)


def history(series: np.ndarray, starts: np.ndarray, window: int) -> np.ndarray:
    """``(N, window * C)``: the ``window`` values of every column before each first target, step
    by step (``(N, window)`` for one column)."""
    x = np.stack([_columns(series)[t - window : t] for t in starts])  # (N, W, C)
    return x.reshape(len(starts), -1)


def targets(series: np.ndarray, starts: np.ndarray, horizon: int) -> np.ndarray:
    """``(N, horizon)``: the target's (the first column's) values from each first target."""
    return np.stack([_columns(series)[t : t + horizon, 0] for t in starts])


@dataclass(frozen=True)
class Smoothing:
    """Additive exponential smoothing with one profile per season and no trend: Taylor's (2003)
    double seasonal Holt-Winters with its AR(1) adjustment of the forecast, as one set of
    parameters. It reads the whole history before each origin, not one window. From the state
    after step ``t - 1`` (a level ``l`` and a profile ``s_i`` of ``p_i`` values per season):

        e_t = z_t - (l + sum_i s_i[t mod p_i])            (the one-step error)
        l <- l + alpha e_t,   s_i[t mod p_i] <- s_i[t mod p_i] + gammas[i] e_t

    and the forecast from origin ``t`` of ``z_{t+k}`` is ``l + sum_i s_i[(t+k) mod p_i] +
    phi^k e_t``. The state starts from the first ``max(seasons)`` values (their mean, then each
    season's mean profile of what the shorter seasons leave), and the recursion runs from there."""

    seasons: tuple[int, ...]
    alpha: float
    gammas: tuple[float, ...]
    phi: float


# The grid fit_smoothing searches: the level's, each season's and the error's weights.
SMOOTHING_ALPHAS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.7, 1.0)
SMOOTHING_GAMMAS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)
SMOOTHING_PHIS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99)
# More seasons would make the grid too large to search in a few seconds (6 ** seasons).
MAX_SEASONS = 2


def _smooth(
    z: np.ndarray,
    seasons: tuple[int, ...],
    alpha: np.ndarray,
    gammas: np.ndarray,
    phi: np.ndarray,
    origins: np.ndarray,
    horizon: int,
    truth: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
    """:class:`Smoothing` of the series ``z`` ``(n,)`` run for ``G`` parameter sets at once
    (``alpha`` and ``phi`` ``(G,)``, ``gammas`` ``(G, S)``). Returns the forecasts ``(G, N,
    horizon)`` from the ``origins`` ``(N,)`` (each at least ``max(seasons) - 1``) and the one-step
    errors at them ``(G, N)``, or with ``truth`` ``(N, horizon)`` only the summed absolute errors of
    those forecasts ``(G,)`` (the grid search keeps no forecasts)."""
    G, L = len(alpha), max(seasons)
    if origins.min() < L - 1:
        raise ValueError(f"smoothing: origin {origins.min()} precedes the first season's end")
    order = np.argsort(seasons, kind="stable")
    level = np.full(G, z[:L].mean())
    rest = z[:L] - z[:L].mean()
    profiles = [None] * len(seasons)
    for i in order:
        p = seasons[i]
        prof = np.array([rest[k::p].mean() for k in range(p)])
        rest = rest - prof[np.arange(L) % p]
        profiles[i] = np.tile(prof, (G, 1))  # (G, p)
    index = {int(o): k for k, o in enumerate(origins)}
    steps = np.arange(1, horizon + 1)
    damp = phi[:, None] ** steps  # (G, horizon)
    total = np.zeros(G)
    if truth is None:
        fc, err = np.empty((G, len(origins), horizon)), np.empty((G, len(origins)))
    e = np.zeros(G)
    for t in range(L - 1, int(origins.max()) + 1):
        if t >= L:
            e = (
                z[t]
                - level
                - sum(prof[:, t % p] for prof, p in zip(profiles, seasons, strict=True))
            )
            level = level + alpha * e
            for i, p in enumerate(seasons):
                profiles[i][:, t % p] += gammas[:, i] * e
        k = index.get(t)
        if k is None:
            continue
        ahead = level[:, None] + damp * e[:, None]  # (G, horizon)
        for prof, p in zip(profiles, seasons, strict=True):
            ahead = ahead + prof[:, (t + steps) % p]
        if truth is None:
            fc[:, k], err[:, k] = ahead, e
        else:
            total += np.abs(ahead - truth[k]).sum(axis=1)
    return total if truth is not None else (fc, err)


def smoothing_forecasts(
    z: np.ndarray, starts: np.ndarray, horizon: int, smoothing: Smoothing
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, horizon)`` forecasts of the target (the first column of ``z``) by ``smoothing`` for
    the windows whose first targets are ``starts``, from the values before each, and ``(N,)``
    the one-step error at each origin (the last value before the window)."""
    target = np.ascontiguousarray(_columns(z)[:, 0], dtype=np.float64)
    first = max(smoothing.seasons) - 1
    if (starts - 1).min() < first:
        raise ValueError(
            f"smoothing: a window starts at step {(starts - 1).min() + 1}, before the first "
            f"season's {first + 1} values that the smoothing starts from"
        )
    fc, err = _smoothed_series(target.tobytes(), smoothing, horizon)
    return fc[starts - 1 - first], err[starts - 1 - first]


@functools.lru_cache(maxsize=4)
def _smoothed_series(
    target: bytes, smoothing: Smoothing, horizon: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`smoothing_forecasts` from every origin from ``max(seasons) - 1`` on, kept for the
    next call: the cross-validation asks for the same series' run for every fold."""
    z = np.frombuffer(target, dtype=np.float64)
    one = np.ones(1)
    origins = np.arange(max(smoothing.seasons) - 1, len(z))
    gammas = np.array([smoothing.gammas])
    fc, err = _smooth(
        z, smoothing.seasons, smoothing.alpha * one, gammas, smoothing.phi * one, origins, horizon
    )
    return fc[0], err[0]


def fit_smoothing(
    z: np.ndarray, starts: np.ndarray, horizon: int, seasons: tuple[int, ...]
) -> Smoothing:
    """The :class:`Smoothing` of ``seasons`` whose forecasts of the windows ``starts`` (each
    ``horizon`` steps of the target, the first column of ``z``) have the least mean absolute
    error, among every combination of ``SMOOTHING_ALPHAS``, ``SMOOTHING_GAMMAS`` per season and
    ``SMOOTHING_PHIS``; a tie goes to the first in that order."""
    grid = np.array(
        list(
            itertools.product(
                SMOOTHING_ALPHAS, SMOOTHING_PHIS, *([SMOOTHING_GAMMAS] * len(seasons))
            )
        )
    )  # (G, 2 + S)
    y = np.ascontiguousarray(_columns(z)[:, 0])
    errors = _smooth(
        y,
        seasons,
        grid[:, 0],
        grid[:, 2:],
        grid[:, 1],
        starts - 1,
        horizon,
        truth=targets(z, starts, horizon),
    )
    best = grid[int(np.argmin(errors))]
    return Smoothing(
        tuple(seasons), float(best[0]), tuple(float(g) for g in best[2:]), float(best[1])
    )


@dataclass(frozen=True)
class LinearBase:
    """Which linear autoregression the model corrects, chosen by cross-validation (see
    :func:`choose_linear_base`). ``differences``: it forecasts each target's change from the
    window's last value, from the window's ``window`` step-to-step changes of every column (so
    it reads one value more than the window, the one before it), instead of the values from the
    values; the forecast of no change is its origin, not the training mean. ``ridge``: the
    squared size of the coefficients (but the constant's) weighs that much per window in the
    least squares. ``smoothing``: two more regressors per horizon step, the :class:`Smoothing`'s
    forecast of that step (as a change from the origin with ``differences``) and its one-step
    error at the origin, which the ridge does not penalise: with a large weight the base is the
    smoothing's forecast rescaled per step, with a small one the window corrects it. ``alone``
    (with a ``smoothing``, values, no ridge): nothing is fitted, the base is the smoothing's
    forecast as it is (its coefficients 1 for that forecast, 0 for everything else)."""

    differences: bool = False
    ridge: float = 0.0
    smoothing: Smoothing | None = None
    alone: bool = False

    def __post_init__(self) -> None:
        if self.alone and (self.smoothing is None or self.differences or self.ridge):
            raise ValueError("LinearBase: alone is the smoothing's forecast of values, unfitted")


# The candidates of choose_linear_base: both forms, each with these ridge weights, and with a
# smoothing also these larger ones (its columns are not penalised, so they do not vanish).
RIDGES = (0.0, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)
SMOOTHING_RIDGES = (*RIDGES, 10.0, 100.0)
# The ridge weight per window on the smoothing's columns: none in effect (see fit_linear_ar).
SMOOTHING_JITTER = 1e-10


def _design(series: np.ndarray, starts: np.ndarray, window: int, base: LinearBase) -> np.ndarray:
    """``(N, window * C + 1)``: the regressors of :func:`fit_linear_ar`, the constant last."""
    if base.differences:
        cols = _columns(series)
        change = np.r_[np.full((1, cols.shape[1]), np.nan), np.diff(cols, axis=0)]  # (n, C)
        x = history(change, starts, window)
    else:
        x = history(series, starts, window)
    return np.c_[x, np.ones(len(starts))]


def _smoothing_columns(
    series: np.ndarray, starts: np.ndarray, horizon: int, base: LinearBase
) -> np.ndarray | None:
    """``(N, horizon, 2)``: per horizon step, the smoothing's forecast (minus the origin for
    changes) and its one-step error at the origin; None without a smoothing."""
    if base.smoothing is None:
        return None
    fc, err = smoothing_forecasts(series, starts, horizon, base.smoothing)
    fc = fc - _origin(series, starts, base)
    return np.stack([fc, np.broadcast_to(err[:, None], fc.shape)], axis=-1)


def _with(x: np.ndarray, extra: np.ndarray | None, step: int) -> np.ndarray:
    """The regressors of horizon step ``step``: the window's, its smoothing columns, then 1."""
    if extra is None:
        return x
    return np.c_[x[:, :-1], extra[:, step], x[:, -1:]]


def _origin(series: np.ndarray, starts: np.ndarray, base: LinearBase) -> np.ndarray:
    """``(N, 1)``: what the forecast adds to the regression: the last value of the target before
    each window's first target for changes, 0 for values."""
    if not base.differences:
        return np.zeros((len(starts), 1))
    return _columns(series)[starts - 1, :1]


def fit_linear_ar(
    series: np.ndarray,
    starts: np.ndarray,
    window: int,
    horizon: int,
    base: LinearBase = LinearBase(),
) -> np.ndarray:
    """Least-squares coefficients ``(window * C + 1, horizon)`` (the last row the constant) from
    the ``window`` values of the ``C`` columns before ``t`` to the ``horizon`` values of the
    first from ``t``, over the windows ``starts``: one linear model per horizon step (an ARX
    where the series has covariate columns). ``base`` chooses changes instead of values, and a
    ridge penalty (:class:`LinearBase`)."""
    x = _design(series, starts, window, base)  # (N, W * C + 1)
    if base.alone:
        coef = np.zeros((x.shape[1] + 2, horizon))
        coef[x.shape[1] - 1] = 1.0  # the smoothing's forecast, the first column after the window
        return coef
    y = targets(series, starts, horizon) - _origin(series, starts, base)  # (N, horizon)
    extra = _smoothing_columns(series, starts, horizon, base)  # (N, horizon, 2) or None
    # Ridge as least squares on extra rows: sqrt(ridge * N) times each coefficient of the
    # window should be 0 (not the constant's, nor the smoothing's).
    penalised = x.shape[1] - 1
    width = x.shape[1] + (0 if extra is None else extra.shape[2])
    penalty = math.sqrt(base.ridge * len(starts)) * np.eye(width)[:penalised]
    if base.ridge <= 0:
        penalty = penalty[:0]
    zeros = np.zeros((len(penalty), horizon))
    if extra is None:
        return np.linalg.lstsq(np.r_[x, penalty], np.r_[y, zeros], rcond=None)[0]
    # The smoothing's columns differ per horizon step: one least squares per step, by the
    # normal equations where the ridge makes them well posed (several times faster than lstsq).
    coef = np.empty((width, horizon))
    for j in range(horizon):
        xj = _with(x, extra, j)
        if base.ridge > 0:
            gram = xj.T @ xj + penalty.T @ penalty
            # A vanishing ridge on the smoothing's two columns keeps the equations solvable where
            # one is 0 or repeats another (a series the smoothing forecasts exactly).
            own = np.arange(penalised, width - 1)
            gram[own, own] += SMOOTHING_JITTER * len(starts)
            coef[:, j] = np.linalg.solve(gram, xj.T @ y[:, j])
        else:
            coef[:, j] = np.linalg.lstsq(xj, y[:, j], rcond=None)[0]
    return coef


def linear_ar(
    series: np.ndarray,
    starts: np.ndarray,
    coef: np.ndarray,
    base: LinearBase = LinearBase(),
) -> np.ndarray:
    """``(N, horizon)``: the autoregression ``coef`` (from :func:`fit_linear_ar` with the same
    ``base``) applied."""
    horizon = coef.shape[1]
    extra = _smoothing_columns(series, starts, horizon, base)
    own = 0 if extra is None else extra.shape[2]
    window = (coef.shape[0] - 1 - own) // _columns(series).shape[1]
    x = _design(series, starts, window, base)
    if extra is None:
        return x @ coef + _origin(series, starts, base)
    out = np.stack([_with(x, extra, j) @ coef[:, j] for j in range(horizon)], axis=1)
    return out + _origin(series, starts, base)


def out_of_fold_ar(
    series: np.ndarray,
    starts: np.ndarray,
    window: int,
    horizon: int,
    folds: int = 5,
    base: LinearBase = LinearBase(),
) -> np.ndarray:
    """``(N, horizon)``: the autoregression's forecast of each window in ``starts`` by a fit on
    the other windows: ``starts`` cut into ``folds`` consecutive blocks, each forecast by the
    coefficients fitted on the rest. The residuals of an in-sample fit are smaller than those
    the fit makes on new data; a correction learnt from them would learn too little."""
    out = np.empty((len(starts), horizon))
    for block in np.array_split(np.arange(len(starts)), folds):
        rest = np.setdiff1d(np.arange(len(starts)), block)
        coef = fit_linear_ar(series, starts[rest], window, horizon, base)
        out[block] = linear_ar(series, starts[block], coef, base)
    return out


def choose_linear_base(
    series: np.ndarray,
    starts: np.ndarray,
    window: int,
    horizon: int,
    folds: int,
    smoothing: Smoothing | None = None,
    members: int = 1,
    alone: bool = False,
) -> tuple[tuple[LinearBase, ...], np.ndarray, dict[LinearBase, float]]:
    """The ``members`` :class:`LinearBase` s (values or changes, each with every weight of
    ``RIDGES``, and with a ``smoothing`` the same two forms with it and every weight of
    ``SMOOTHING_RIDGES``, and with ``alone`` the smoothing's forecast alone, last) whose
    out-of-fold forecasts of the windows ``starts``
    (:func:`out_of_fold_ar`, ``folds`` blocks) have the least MAE, best first; the mean of their
    out-of-fold forecasts ``(N, horizon)`` (:func:`combined_ar`'s, out of fold); and every
    candidate's MAE. Blocked cross-validation chooses a linear autoregression as well as a
    later hold-out does, and scores every window instead of the last few (Bergmeir, Hyndman and
    Koo 2018, "A note on the validity of cross-validation for evaluating autoregressive time
    series prediction"). The first of equals ranks first: values before changes, less ridge
    before more, without the smoothing before with it. The smoothing's own parameters are not
    refitted per fold (they are chosen once, on all of ``starts``: a few numbers against
    thousands of windows)."""
    truth = targets(series, starts, horizon)
    maes, forecasts = {}, {}
    kinds = [(None, RIDGES)] + ([(smoothing, SMOOTHING_RIDGES)] if smoothing else [])
    for smooth, ridges in kinds:
        for differences in (False, True):
            for ridge in ridges:
                base = LinearBase(differences, ridge, smooth)
                forecasts[base] = out_of_fold_ar(series, starts, window, horizon, folds, base)
                maes[base] = float(np.abs(forecasts[base] - truth).mean())
    if smoothing and alone:
        base = LinearBase(smoothing=smoothing, alone=True)
        forecasts[base] = smoothing_forecasts(series, starts, horizon, smoothing)[0]
        maes[base] = float(np.abs(forecasts[base] - truth).mean())
    # sorted() is stable: the first of equals stays first.
    chosen = tuple(sorted(maes, key=maes.get)[:members])
    return chosen, np.mean([forecasts[b] for b in chosen], axis=0), maes


def combined_ar(
    series: np.ndarray, starts: np.ndarray, members: list[tuple[LinearBase, np.ndarray]]
) -> np.ndarray:
    """``(N, horizon)``: the equal-weight mean of the forecasts of the linear bases ``members``,
    each a :class:`LinearBase` and its coefficients from :func:`fit_linear_ar`."""
    return np.mean([linear_ar(series, starts, coef, base) for base, coef in members], axis=0)


def calendar(times: np.ndarray) -> np.ndarray:
    """``(N, 9)`` float32 calendar inputs of ``datetime64`` time stamps: the sine and cosine of the
    time of day, then the day of the week one-hot (Monday first)."""
    seconds = times.astype("datetime64[s]").astype(np.int64)
    day = 86_400
    phase = 2 * np.pi * (seconds % day) / day
    # 1970-01-01, day 0, was a Thursday (3 with Monday 0).
    weekday = (seconds // day + 3) % 7
    out = np.zeros((len(times), CALENDAR_FEATURES), dtype=np.float32)
    out[:, 0], out[:, 1] = np.sin(phase), np.cos(phase)
    out[np.arange(len(times)), 2 + weekday] = 1.0
    return out


def fold(window: int, period: int) -> tuple[int, int]:
    """``(steps, lags)`` of the model's input: it reads the last ``min(window, period)`` steps,
    each with its value 0, 1, ... ``lags - 1`` periods earlier, all inside the window."""
    return min(window, period), max(1, window // period)


def model_inputs(
    z: np.ndarray,
    cal: np.ndarray | None,
    starts: np.ndarray,
    window: int,
    period: int,
    ar: np.ndarray,
    smoothed: np.ndarray | None = None,
) -> np.ndarray:
    """``(N, T, lags * C + calendar + horizon)`` float32: see the module docstring. ``z`` is the
    standardised series ``(n,)`` or, with covariates, ``(n, C)``, ``cal`` its calendar rows (or
    None), ``ar`` the standardised autoregression forecasts ``(N, horizon)``; ``smoothed``, the
    smoothing's forecasts ``(N, horizon)`` where the base has one, are read after them."""
    steps, lags = fold(window, period)
    z = _columns(z)
    pos = starts[:, None] - steps + np.arange(steps)  # (N, T): the time step of each input step
    parts = [z[pos - k * period] for k in range(lags)]  # lags x (N, T, C)
    if cal is not None:
        parts.append(cal[pos])  # (N, T, 9)
    for every in (ar, smoothed):
        if every is not None:
            parts.append(np.broadcast_to(every[:, None, :], (len(starts), steps, every.shape[1])))
    return np.concatenate(parts, axis=-1).astype(np.float32)  # (N, T, I)


def ordered_quantiles(raw: Tensor, count: int, median: int) -> Tensor:
    """``(N, horizon, count)`` quantiles, non-decreasing along the last axis, from the model's raw
    outputs ``(N, horizon * count)``: the one at index ``median`` as it is, those above it plus,
    and those below it minus, cumulative sums of softplus increments."""
    raw = raw.reshape(raw.shape[0], -1, count)  # (N, horizon, Q)
    mid = raw[..., median : median + 1]
    up = mid + torch.cumsum(nn.functional.softplus(raw[..., median + 1 :]), -1)
    below = nn.functional.softplus(raw[..., :median]).flip(-1)
    down = mid - torch.cumsum(below, -1).flip(-1)
    return torch.cat([down, mid, up], -1)


def pinball(q: Tensor, y: Tensor, levels: Tensor) -> Tensor:
    """The pinball (quantile) loss of the quantiles ``q`` ``(N, horizon, Q)`` at ``levels``
    ``(Q,)`` against ``y`` ``(N, horizon)``, summed over every element."""
    err = y.unsqueeze(-1) - q  # (N, horizon, Q)
    return torch.maximum(levels * err, (levels - 1) * err).sum()


def conformal_shifts(q: np.ndarray, y: np.ndarray, levels: list[float]) -> np.ndarray:
    """``(horizon, Q)``: how far to move each quantile forecast so that it holds its level on
    held-out windows (conformalized quantile regression, Romano, Patterson and Candes 2019, its
    asymmetric form: one correction per level and horizon step). ``q`` ``(N, horizon, Q)`` are
    the quantiles forecast for ``N`` held-out windows, ``y`` ``(N, horizon)`` their targets.

    A level ``tau`` above 0.5 moves up or down by the ``ceil((N + 1) tau)``-th smallest of
    ``y - q``: afterwards at least that many of the ``N`` targets lie at or below it, so that a
    new target does with probability at least ``tau`` when the windows are exchangeable. A level
    below 0.5 is the mirror image (at least ``1 - tau`` of the targets at or above it), and the
    median does not move: it is the point forecast. An interval between levels ``a`` and ``b``
    then covers at least ``b - a`` of new targets, whatever the network learnt; a band the
    network drew too narrow widens, one too wide narrows."""
    n = len(y)
    s = np.sort(y[..., None] - q, axis=0)  # (N, horizon, Q)
    out = np.zeros(q.shape[1:])
    for k, tau in enumerate(levels):
        if tau > 0.5:
            out[:, k] = s[min(n, math.ceil((n + 1) * tau)) - 1, :, k]
        elif tau < 0.5:
            out[:, k] = s[n - min(n, math.ceil((n + 1) * (1 - tau))), :, k]
    return out


def shift_quantiles(q: np.ndarray, shifts: np.ndarray, median: int) -> np.ndarray:
    """``q`` ``(N, horizon, Q)`` moved by ``shifts`` ``(horizon, Q)`` (from
    :func:`conformal_shifts`), still in order: a quantile that would pass its neighbour nearer the
    median stops at it, so that the median stays and nothing crosses."""
    out = q + shifts
    up = np.maximum.accumulate(out[..., median:], axis=-1)
    down = np.minimum.accumulate(out[..., median::-1], axis=-1)[..., ::-1]
    return np.concatenate([down[..., :-1], up], axis=-1)


def parse_quantiles(text: str) -> list[float]:
    """The levels of ``--quantiles`` (``0.1,0.5,0.9``, or ``none``), sorted, 0.5 always among
    them: the median is the point forecast. ``none``: no quantiles, a point forecast by MSE."""
    if text.strip().lower() == "none":
        return []
    levels = set()
    for field in text.split(","):
        try:
            v = float(field)
        except ValueError:
            v = float("nan")
        if not 0 < v < 1:
            raise DataError(
                f"--quantiles: {field.strip()!r} is not a level between 0 and 1 (exclusive); "
                "expected levels such as 0.1,0.5,0.9, or none"
            )
        levels.add(v)
    return sorted(levels | {0.5})


# The autoregression is fitted on the training windows out of fold, in this many blocks.
AR_FOLDS = 5
# The linear base is the mean of this many candidates best out of fold. Chosen on validation
# windows across the five series of benchmarks/bench_forecast.py: with the candidates ranked and
# fitted on the training windows alone, the mean of the best 2, 3, 5 or 10 forecast the
# validation windows better than the best alone on 4, 3, 5 and 3 of them; only 5 never did worse.
# The smoothing alone joined the candidates on the same evidence: ranked first on Taylor's
# training windows, it took the mean of 5 from 0.990 to 0.985 of the best alone there, and
# ranked below fifth on the other four.
BASE_MEMBERS = 5


def _windows(n: int, first: int, horizon: int, split: tuple) -> list[int] | None:
    """The windows per part of a series of ``n`` steps (train, validation, test), or None where
    a part would have too few: every part needs one, the out-of-fold autoregression a window per
    fold. ``first`` is the earliest first target, one full history in."""
    counts = []
    for k, part in enumerate(chronological_split(n, split)):
        count = part.stop - horizon + 1 - max(part.start, first)
        if count < (AR_FOLDS if k == 0 else 1):
            return None
        counts.append(count)
    return counts


def _window_starts(
    n: int, w: int, h: int, period: int, split: tuple, source: str, reach: int
) -> list[np.ndarray]:
    """The first target step of every window of each part (train, validation, test), each with
    ``reach`` values before it (the window, and one more for a linear base in changes)."""
    first = max(reach, period)
    if _windows(n, first, h, split) is None:
        # The least length that works: the parts grow with the series, so search upward.
        lengths = range(first + h, 20 * (first + h) + 100)
        need = next((k for k in lengths if _windows(k, first, h, split)), lengths.stop)
        raise DataError(
            f"{source}: {n} values are too few for windows of {w} steps predicting {h} with a "
            f"baseline {period} steps back; need at least {need}"
        )
    starts = []
    for part in chronological_split(n, split):
        s = np.arange(max(part.start, first), part.stop - h + 1)
        if len(s) == 0:
            raise DataError(f"the series of {n} values leaves a part without windows")
        starts.append(s)
    return starts


def _standardise(
    series: np.ndarray, train: np.ndarray, source: str
) -> tuple[float, float, np.ndarray]:
    """``(mean, std, z)``: the training part's mean and deviation, and the standardised series."""
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        mean, std = float(train.mean()), float(train.std())
        z = (series - mean) / std
    if std <= np.finfo(np.float64).tiny:
        raise DataError(
            f"{source}: the training part of the series is constant (standard deviation "
            f"{std:g}); there is nothing to learn"
        )
    if not (math.isfinite(mean) and math.isfinite(std) and np.isfinite(z).all()):
        i = int(np.argmax(np.abs(series)))
        raise DataError(
            f"{source}: the values are too large to standardise (the mean or standard "
            f"deviation of the training part overflows); the largest is {series[i]:g}, at "
            f"step {i + 1} of the series; rescale the column (e.g. to thousands)"
        )
    return mean, std, z


def _parse_covariates(text: str | None) -> list[str]:
    if text is None:
        return []
    names = [c.strip() for c in text.split(",")]
    if not all(names):
        raise DataError(f"--covariates {text!r} has an empty name; expected names such as A,B")
    repeated = sorted({c for c in names if names.count(c) > 1})
    if repeated:
        raise DataError(f"--covariates names {', '.join(map(repr, repeated))} more than once")
    return names


def _parse_seasons(text: str, window: int) -> str | list[int]:
    """``--seasons``: ``auto``, or the seasons in steps (``[]`` for ``none``)."""
    text = text.strip().lower()
    if text in ("auto", "none"):
        return "auto" if text == "auto" else []
    try:
        seasons = sorted({int(f) for f in text.split(",")})
    except ValueError:
        seasons = [0]
    if not seasons or seasons[0] < 2:
        raise DataError(
            f"--seasons {text!r}: expected auto, none or season lengths in steps of at least 2, "
            "such as 48,336"
        )
    if len(seasons) > MAX_SEASONS:
        raise DataError(f"--seasons {text!r}: at most {MAX_SEASONS} seasons; got {len(seasons)}")
    if seasons[-1] > window:
        raise DataError(
            f"--seasons {text!r}: a season of {seasons[-1]} steps is longer than --window "
            f"{window}; the smoothing starts from the first season's values, which the first "
            "window must not precede"
        )
    return seasons


def auto_seasons(period: int, window: int, times: np.ndarray | None) -> list[int]:
    """``--seasons auto``: the period, and a week of such periods where the time stamps say that
    ``period`` steps make a day (their median step times ``period`` is 24 hours) and the window
    holds a week (the smoothing starts from its first week, before the first window)."""
    seasons = [period]
    if times is not None and len(times) > 1:
        step = np.median(np.diff(times.astype("datetime64[s]").astype(np.int64)))
        if step * period == 86_400 and WEEK * period <= window:
            seasons.append(WEEK * period)
    return seasons


def _target_name(path: str, column: str | None) -> str:
    header = csv_header(path)
    if column is None:
        return header[-1]
    if column not in header and column.isdigit() and int(column) < len(header):
        return header[int(column)]
    return column


def _covariate_names(data: dict) -> list[str]:
    """The covariate columns of ``data``: those named, or every other numeric column."""
    if not data.get("all_covariates"):
        names = data.get("covariates") or []
    else:
        names = [c for c in numeric_columns(data["data"]) if c != data["target"]]
        if not names:
            raise DataError(
                f"--all-covariates: CSV file {data['data']!r} has no numeric column besides the "
                f"target {data['target']!r}"
            )
    if data.get("target") in names:
        raise DataError(
            f"--covariates: {data['target']!r} is the column forecast (--column); a covariate "
            "must be another column"
        )
    return names


class ForecastTask(Task):
    name = "forecast"
    help = (
        "electricity load: a week of half-hourly history -> the next 2 h (Taylor 2003, bundled) "
        "with 10/50/90% quantiles and optional covariates, against seasonal-naive and linear "
        "AR/ARX baselines"
    )
    metric = "mae"
    loss_name = "pinball loss of the quantiles of the scaled residual over the linear base"
    train: ClassVar[dict] = dict(epochs=40, batch_size=64)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        self.option(
            p,
            "--data",
            metavar="CSV",
            help="a CSV with a header, one row per time step; time stamps in a column named "
            "timestamp/time/datetime/date/ds (or any ISO 8601 column) become calendar inputs; "
            "default: the bundled half-hourly demand of England and Wales, 5 June - 27 August "
            "2000 (4,032 points, Taylor 2003)",
        )
        self.option(
            p,
            "--column",
            help="the column to forecast, by name or 0-based index (default: the last)",
        )
        self.option(
            p,
            "--covariates",
            metavar="A,B,...",
            help="other numeric columns of --data whose past the model and the linear "
            "autoregression (then an ARX) read beside the target's; predict needs them too",
        )
        self.option(
            p,
            "--all-covariates",
            action="store_true",
            help="every numeric column of --data other than --column is a covariate",
        )
        self.option(
            p,
            "--quantiles",
            metavar="LEVELS",
            default="0.1,0.5,0.9",
            help="the quantiles predicted, under the pinball loss (default 0.1,0.5,0.9: an 80%% "
            "interval); 0.5 is always among them and is the point forecast; none: a point "
            "forecast under the squared error",
        )
        self.option(
            p,
            "--no-conformal",
            action="store_true",
            help="keep the quantiles as the network learnt them; by default each is moved, after "
            "training, by the conformal correction that makes it hold its level on the "
            "validation windows (saved with the model; predict and evaluate use it)",
        )
        self.option(
            p,
            "--window",
            type=int,
            default=336,
            help="steps of history per window, for the model and the linear autoregression "
            "(default 336 = a week of half-hours)",
        )
        self.option(p, "--horizon", type=int, default=4, help="steps predicted (default 4 = 2 h)")
        self.option(
            p,
            "--period",
            type=int,
            default=48,
            help="the season in steps: the seasonal-naive lag (the weekly naive's is 7 times "
            "it) and the steps the recurrent layer reads, each with the values whole periods "
            "earlier in the window (default 48 = one day of half-hours)",
        )

        self.option(
            p,
            "--combine",
            metavar="K",
            type=int,
            default=BASE_MEMBERS,
            help="the linear base is the mean of the forecasts of the K candidates best out of "
            f"fold (default {BASE_MEMBERS}; 1: the best alone)",
        )
        self.option(
            p,
            "--seasons",
            metavar="P,Q",
            default="auto",
            help="the seasons in steps (at most two, none longer than --window) of the "
            "exponential smoothing that the linear base may use, which reads the whole history "
            "as MSTL does; auto (default): --period, and 7 times it where the time stamps say "
            "that --period steps make a day and --window reaches a week; none: no smoothing",
        )

    def data_config(self, o: dict) -> dict:
        for name in ("window", "horizon", "period", "combine"):
            if name not in o:
                continue
            if o[name] < 1:
                raise DataError(f"--{name} must be at least 1; got {o[name]}")
        if not o["data"] and o["column"] not in (None, "load_mw"):
            raise DataError(
                f"--column {o['column']!r} names a column of --data CSV, which is not given "
                "(the bundled series has only load_mw)"
            )
        covariates = _parse_covariates(o.get("covariates"))
        every = bool(o.get("all_covariates"))
        if (covariates or every) and not o["data"]:
            flag = "--all-covariates" if every else "--covariates"
            raise DataError(
                f"{flag} names columns of --data CSV, which is not given (the bundled series "
                "has only load_mw)"
            )
        if covariates and every:
            raise DataError("--covariates and --all-covariates exclude each other; give one")
        if o["horizon"] > o["period"]:
            raise DataError(
                f"--horizon {o['horizon']} is longer than --period {o['period']}: "
                "the seasonal-naive "
                "baseline would need values from the future"
            )
        data = {
            "data": str(Path(o["data"]).resolve()) if o["data"] else None,
            "column": o["column"] if o["data"] else "load_mw",
            "window": o["window"],
            "horizon": o["horizon"],
            "period": o["period"],
            "split": [0.7, 0.15, 0.15],
            # A run of an earlier version, resumed, has no quantiles option: a point forecast.
            "quantiles": parse_quantiles(o.get("quantiles", "none")),
        }
        if o.get("no_conformal"):
            data["conformal"] = False
        # A run of an earlier version, resumed (its options have no --no-conformal), keeps its
        # base: the plain linear AR fitted on the training windows.
        data["base"] = "cross-validated" if "no_conformal" in o else "plain"
        if covariates or every:
            data["covariates"], data["all_covariates"] = covariates, every
        # Runs of earlier versions (no --combine) have one linear base.
        if "combine" in o and data["base"] != "plain":
            data["combine"] = o["combine"]
        # Runs of earlier versions (no --seasons) have no smoothing.
        if "seasons" in o:
            data["seasons"] = _parse_seasons(o["seasons"] or "auto", o["window"])
        return data

    def _read(self, data: dict) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
        """``(values (n, 1 + C), times or None, covariate names)``."""
        if data["data"] is None:
            return load_taylor()[:, None], read_times(taylor_csv()), []
        path = data["data"]
        target = read_series(path, data["column"])
        covariates = []
        if data.get("covariates") or data.get("all_covariates"):
            covariates = _covariate_names({**data, "target": _target_name(path, data["column"])})
        values = np.c_[target, read_columns(path, covariates)] if covariates else target[:, None]
        return values, read_times(path), covariates

    def prepare(self, data: dict) -> Prepared:
        values, times, covariates = self._read(data)
        series = values[:, 0]
        w, h, period = data["window"], data["horizon"], data["period"]
        source = data["data"] or "the load series"
        # Runs of earlier versions (their data name no base) keep the plain AR on the training
        # windows, so that evaluate and --resume find their preprocessing again.
        plain = data.get("base", "plain") == "plain"
        reach = w if plain else w + 1
        starts = _window_starts(len(series), w, h, period, tuple(data["split"]), source, reach)
        train_part = chronological_split(len(series), tuple(data["split"]))[0]
        scaled = [_standardise(series, series[train_part], source)]
        for k, name in enumerate(covariates, 1):
            col = values[:, k]
            scaled.append(_standardise(col, col[train_part], f"{source}, covariate {name!r}"))
        mean, std, _ = scaled[0]
        z = np.stack([s[2] for s in scaled], axis=1)  # (n, 1 + C)
        # The base is chosen and fitted on every window before the test part, as statsforecast's
        # models are fitted; the training and validation windows are forecast out of fold, so
        # that the residuals the network learns and is validated on are those of new data.
        smoothing = None
        if plain:
            bases, before = (LinearBase(),), starts[0]
            oof = out_of_fold_ar(z, before, w, h, AR_FOLDS)
        else:
            before = np.r_[starts[0], starts[1]]
            seasons = data.get("seasons", [])
            if seasons == "auto":
                seasons = auto_seasons(period, w, times)
            smoothing = fit_smoothing(z, before, h, tuple(seasons)) if seasons else None
            # Runs of earlier versions (no --combine): the best candidate of those they had.
            count, alone = data.get("combine", 1), "combine" in data
            bases, oof, _ = choose_linear_base(z, before, w, h, AR_FOLDS, smoothing, count, alone)
        members = [(b, fit_linear_ar(z, before, w, h, b)) for b in bases]
        # The parts the forecasts out of fold cover: the training windows, then the validation's.
        seen = {0: oof[: len(starts[0])]}
        if not plain:
            seen[1] = oof[len(starts[0]) :]
        residual = targets(z, starts[0], h) - seen[0]
        # The residual's own scale, so that the network's targets are about 1, not about 0.05.
        scale = float(residual.std()) or 1.0
        cal = calendar(times) if times is not None else None
        if times is not None and len(times) != len(series):
            raise DataError(f"{source}: {len(times)} time stamps for {len(series)} values")
        levels = data.get("quantiles", [])
        self.preprocessing = {
            "mean": mean,
            "std": std,
            "window": w,
            "horizon": h,
            "period": period,
            "column": data["column"],
            "steps": len(series),
            "calendar": cal is not None,
            "residual_scale": scale,
        }
        if "combine" not in data:
            # The keys of runs of earlier versions: one base.
            (base, coef), *_ = members
            self.preprocessing["ar"] = coef.tolist()
            if not plain:
                self.preprocessing["ar_differences"] = base.differences
                self.preprocessing["ar_ridge"] = base.ridge
        else:
            self.preprocessing["bases"] = [
                {
                    "differences": b.differences,
                    "ridge": b.ridge,
                    "smoothing": b.smoothing is not None,
                    "alone": b.alone,
                    "ar": c.tolist(),
                }
                for b, c in members
            ]
        smoothing = next((b.smoothing for b in bases if b.smoothing is not None), None)
        if smoothing is not None:
            # Lists, as the saved model reads them back, so that evaluate finds them equal.
            smooth = asdict(smoothing)
            self.preprocessing["smoothing"] = {
                k: list(v) if isinstance(v, tuple) else v for k, v in smooth.items()
            }
        # Absent in runs without them, so that the runs of earlier versions read the same.
        if covariates:
            self.preprocessing["covariates"] = covariates
            self.preprocessing["covariate_mean"] = [s[0] for s in scaled[1:]]
            self.preprocessing["covariate_std"] = [s[1] for s in scaled[1:]]
        if levels:
            self.preprocessing["quantiles"] = levels
        self._series, self._z, self._cal = series, z, cal
        self._plain = fit_linear_ar(z, before, w, h)
        self._conformal = data.get("conformal", True)
        splits = []
        for k, s in enumerate(starts):
            ar = seen[k] if k in seen else combined_ar(z, s, members)
            x = model_inputs(z, cal, s, w, period, ar, self._smoothed(z, s))  # (N, T, I)
            y = ((targets(z, s, h) - ar) / scale).astype(np.float32)
            lengths = torch.full((len(s),), x.shape[1])
            splits.append(
                Split(torch.from_numpy(x), lengths, torch.from_numpy(y), torch.from_numpy(s))
            )
        notes = [] if cal is not None else ["no time stamps in the CSV: no calendar inputs"]
        notes.append(f"linear base, chosen out of fold: {self._describe(bases)}")
        if covariates:
            notes.append(f"covariates: {', '.join(covariates)}")
        outputs = h * max(1, len(levels))
        return Prepared(
            *splits,
            {"kind": "regressor", "input_size": x.shape[2], "output_size": outputs},
            self.preprocessing,
            notes,
        )

    # What calibrate() adds to the preprocessing after training; prepare() does not make it.
    calibration_keys = ("network_median", "network_weight", "network_vs_base", "conformal")

    def calibrate(self, out: Tensor, y: Tensor, split: Split) -> dict:
        """What the trained model's outputs ``out`` on the validation windows ``split`` (targets
        ``y``) decide, joined to the preprocessing so that the saved model, the test report and
        ``predict`` use it: ``network_weight``, the weight of the network's median in the
        point forecast, the rest the linear base's: 1 where the median beats the base alone on
        the validation windows by ``NETWORK_MARGIN`` standard errors
        (:func:`network_beats_base`), else 0.5 where the equal-weight mean of the two does
        (of both that win, the one of less validation MAE), else 0 (the band keeps its offsets
        from the network's median); ``network_vs_base`` the figures of that comparison
        (validation MAE of each and the standard error of their difference from the base's, in
        data units); ``conformal``, the correction of every quantile and horizon step
        (:func:`conformal_shifts`, in units of the scaled residual), with at least two quantiles
        unless ``--no-conformal`` turned it off."""
        q = self.quantiles(out).numpy().astype(np.float64)  # (N, horizon, Q)
        truth = y.numpy().astype(np.float64)  # (N, horizon): the residual over the base
        p = self.preprocessing
        block = max(p["period"], p["horizon"])
        # The base alone forecasts a residual of 0.
        base = np.abs(truth).mean(axis=1)  # (N,)
        unit = p["residual_scale"] * p["std"]
        figures, maes = {"base_mae": float(base.mean() * unit)}, {0.0: base.mean()}
        for weight, name in ((1.0, "network"), (0.5, "mean")):
            mixed = np.abs(weight * q[..., self._median] - truth).mean(axis=1)  # (N,)
            wins, se = network_beats_base(mixed, base, block)
            figures[f"{name}_mae"] = float(mixed.mean() * unit)
            figures[f"{name}_difference_se"] = None if math.isnan(se) else float(se * unit)
            if wins:
                maes[weight] = mixed.mean()
        p["network_weight"] = min(maes, key=maes.get)
        # The name of runs of earlier versions for the network's median alone.
        figures["difference_se"] = figures.pop("network_difference_se")
        p["network_vs_base"] = figures
        if len(self.levels) > 1 and self._conformal:
            p["conformal"] = conformal_shifts(self.calibrated(q), truth, self.levels).tolist()
        return {k: p[k] for k in self.calibration_keys if k in p}

    @property
    def _median(self) -> int:
        return self.levels.index(0.5) if self.levels else 0

    def calibrated(self, q: np.ndarray) -> np.ndarray:
        """The quantiles ``q`` ``(N, horizon, Q)`` (scaled residuals) as :meth:`calibrate`
        decided: the median moved toward the base's forecast (0) by ``1 - network_weight``
        of its distance and every quantile with it, then moved by the conformal correction,
        where the model has one."""
        weight = self.network_weight
        if weight != 1.0:
            q = q - (1.0 - weight) * q[..., self._median : self._median + 1]
        shifts = self.preprocessing.get("conformal")
        if shifts is None:
            return q
        return shift_quantiles(q, np.asarray(shifts), self._median)

    @property
    def network_weight(self) -> float:
        """The weight of the network's median in the point forecast (runs of earlier versions:
        1, or 0 where their ``network_median`` is False)."""
        p = self.preprocessing
        return p.get("network_weight", 1.0 if p.get("network_median", True) else 0.0)

    @property
    def smoothing(self) -> Smoothing | None:
        """The smoothing that the linear bases with one share, or None."""
        s = self.preprocessing.get("smoothing")
        if s is None:
            return None
        return Smoothing(tuple(s["seasons"]), s["alpha"], tuple(s["gammas"]), s["phi"])

    @property
    def members(self) -> list[tuple[LinearBase, np.ndarray]]:
        """The linear bases whose mean the model corrects, each with its coefficients (runs of
        earlier versions: one; the plain AR's: values, no ridge)."""
        p, smoothing = self.preprocessing, self.smoothing
        if "bases" not in p:
            base = LinearBase(p.get("ar_differences", False), p.get("ar_ridge", 0.0), smoothing)
            return [(base, np.asarray(p["ar"]))]
        return [
            (
                LinearBase(
                    b["differences"], b["ridge"], smoothing if b["smoothing"] else None, b["alone"]
                ),
                np.asarray(b["ar"]),
            )
            for b in p["bases"]
        ]

    @property
    def bases(self) -> tuple[LinearBase, ...]:
        """The linear bases of :attr:`members`, best out of fold first."""
        return tuple(base for base, _ in self.members)

    @classmethod
    def _describe(cls, bases: tuple[LinearBase, ...], members: bool = True) -> str:
        """``values, ridge 0``; several bases: ``mean of 2: ...; ...``, each in that form, or
        without ``members`` ``mean of 2`` (:meth:`_members_text` names them); then the
        smoothing's parameters, where a base has one."""
        texts = cls._members_text(bases)
        text = texts[0] if len(texts) == 1 else f"mean of {len(texts)}"
        if len(texts) > 1 and members:
            text += ": " + "; ".join(texts)
        s = next((b.smoothing for b in bases if b.smoothing is not None), None)
        if s is not None:
            seasons = ", ".join(map(str, s.seasons))
            gammas = ", ".join(f"{g:g}" for g in s.gammas)
            text += (
                f"{', ' if len(bases) == 1 else '; '}smoothing of seasons {seasons} "
                f"(alpha {s.alpha:g}, gammas {gammas}, phi {s.phi:g})"
            )
        return text

    @staticmethod
    def _members_text(bases: tuple[LinearBase, ...]) -> list[str]:
        """Each base as ``changes, ridge 0.1`` (``, smoothed`` with the smoothing, where there
        are several), or ``the smoothing alone``."""
        return [
            "the smoothing alone"
            if b.alone
            else ("changes" if b.differences else "values")
            + f", ridge {b.ridge:g}"
            + (", smoothed" if b.smoothing is not None and len(bases) > 1 else "")
            for b in bases
        ]

    def _smoothed(self, z: np.ndarray, starts: np.ndarray) -> np.ndarray | None:
        """The bases' smoothing forecasts ``(N, horizon)`` the network reads, or None."""
        smoothing = self.smoothing
        if smoothing is None:
            return None
        return smoothing_forecasts(z, starts, self.preprocessing["horizon"], smoothing)[0]

    @property
    def levels(self) -> list[float]:
        """The quantile levels, or [] for a point forecast (runs of earlier versions)."""
        return self.preprocessing.get("quantiles", [])

    def quantiles(self, out: Tensor) -> Tensor:
        """``(N, horizon, Q)`` ordered quantiles of the scaled residual from the raw outputs
        (``(N, horizon, 1)``, the point forecast, without quantiles)."""
        levels = self.levels
        if not levels:
            return out.unsqueeze(-1)
        return ordered_quantiles(out, len(levels), levels.index(0.5))

    def forecast(self, out: np.ndarray, ar: np.ndarray) -> np.ndarray:
        """The model's forecasts in data units from its outputs (scaled residuals, ``ar``'s shape
        or with a last quantile axis) and the standardised autoregression forecasts ``ar``
        ``(N, horizon)`` they correct."""
        p = self.preprocessing
        if out.ndim == 3:
            ar = ar[..., None]
        return (out * p["residual_scale"] + ar) * p["std"] + p["mean"]

    def scores(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p = self.preprocessing
        q = self.quantiles(out)  # (N, horizon, Q)
        if self.levels:
            levels = torch.tensor(self.levels, dtype=q.dtype, device=q.device)
            loss = pinball(q, y, levels)
            median = q[..., self.levels.index(0.5)]
        else:
            median = q[..., 0]
            loss = nn.functional.mse_loss(median, y, reduction="sum")
        abs_err = (median - y).abs().sum() * (p["residual_scale"] * p["std"])
        return loss, torch.tensor(float(y.numel())), abs_err

    def baselines(self, starts: np.ndarray) -> dict[str, np.ndarray]:
        """The baselines' forecasts ``(N, horizon)`` for the windows ``starts``, by name; the
        weekly naive only where every window reaches back a week. The linear AR (or ARX) is
        the plain one, values to values by least squares, whatever the model's base."""
        p = self.preprocessing
        h, period = p["horizon"], p["period"]
        ar = linear_ar(self._z, starts, self._plain) * p["std"] + p["mean"]
        out = {"seasonal naive": seasonal_naive(self._series, starts, period, h)}
        if starts.min() >= WEEK * period:
            out["weekly naive"] = seasonal_naive(self._series, starts, WEEK * period, h)
        out["ARX" if "covariates" in p else "linear AR"] = ar
        return out

    def report(self, out: Tensor, y: Tensor, split: Split) -> Report:
        starts = split.index.numpy()
        h = self.preprocessing["horizon"]
        ar_z = combined_ar(self._z, starts, self.members)
        q = self.quantiles(out)
        calibrated = self.calibrated(q.numpy().astype(np.float64))
        quantiles = self.forecast(calibrated, ar_z)  # (N, horizon, Q)
        levels = self.levels
        pred = quantiles[..., levels.index(0.5) if levels else 0]
        true = targets(self._series, starts, h)
        baselines = self.baselines(starts)
        metrics = _errors(pred, true)
        scored = {name: _errors(f, true) for name, f in baselines.items()}
        # baseline_* is the seasonal naive, as before; weekly_naive_* None where it is absent.
        for name in BASELINES:
            if name in scored or name == "weekly naive":
                for m in ("mae", "rmse", "mape"):
                    metrics[f"{KEYS[name]}_{m}"] = scored[name][m] if name in scored else None
        best = min(scored, key=lambda name: scored[name]["mae"])
        metrics["best_baseline"] = best
        best_mae = scored[best]["mae"]
        metrics["mae_vs_best_baseline"] = metrics["mae"] / best_mae if best_mae > 0 else None
        metrics["mae_per_step"] = [float(v) for v in np.abs(pred - true).mean(axis=0)]
        arrays = {"pred": pred, "true": true, **baselines}
        if len(levels) > 1:
            lo, hi = quantiles[..., 0], quantiles[..., -1]
            inside = (lo <= true) & (true <= hi)
            metrics["interval"] = f"{100 * levels[0]:g}-{100 * levels[-1]:g}%"
            metrics["interval_nominal"] = round(levels[-1] - levels[0], 12)
            metrics["interval_coverage"] = float(inside.mean())
            metrics["interval_width"] = float((hi - lo).mean())
            metrics["interval_conformal"] = "conformal" in self.preprocessing
            # the share of the targets at or below each quantile: its level, when calibrated
            below = (true[..., None] <= quantiles).mean(axis=(0, 1))
            metrics["quantile_levels"] = levels
            metrics["quantile_coverage"] = [float(v) for v in below]
            arrays["lower"], arrays["upper"] = lo, hi
        if levels:
            levels_t = torch.tensor(levels, dtype=q.dtype)
            metrics["test_loss"] = float(pinball(q, split.y, levels_t)) / split.y.numel()
        else:
            metrics["test_loss"] = float(nn.functional.mse_loss(q[..., 0], split.y))
        metrics["test_windows"] = len(true)
        metrics.update(backtest(pred, true, baselines, h))
        # The model's linear base alone (the model with a network that outputs 0): what the
        # network adds is the difference.
        base = ar_z * self.preprocessing["std"] + self.preprocessing["mean"]
        # The members in a list of their own: the summary's table prints one line per metric.
        metrics["linear_base"] = self._describe(self.bases, members=False)
        if len(self.bases) > 1:
            metrics["linear_base_members"] = self._members_text(self.bases)
        metrics["linear_base_mae"] = _errors(base, true)["mae"]
        weight = self.network_weight
        metrics["forecast_from"] = {
            1.0: "the network's median",
            0.0: "the linear base",
        }.get(weight, f"the network's median ({weight:g}) and the linear base")
        for k, v in self.preprocessing.get("network_vs_base", {}).items():
            metrics[f"val_{k}"] = v
        rows = backtest_origins(len(true), h)
        metrics["backtest_linear_base_mae"] = float(np.abs(base[rows] - true[rows]).mean())
        return Report(metrics, arrays)

    def plots(self, report: Report, run_dir: Path) -> list[str]:
        m = report.metrics
        names = [n for n in BASELINES if n in report.arrays]
        title = f"forecast, test part: MAE model {m['mae']:.0f}, " + ", ".join(
            f"{n} {m[f'{KEYS[n]}_mae']:.0f}" for n in names
        )
        band = None
        if "lower" in report.arrays:
            band = (report.arrays["lower"], report.arrays["upper"], m["interval"])
            title += f"; {m['interval']} interval covers {100 * m['interval_coverage']:.0f}%"
        draw.forecast(
            report.arrays["true"],
            report.arrays["pred"],
            {n: report.arrays[n] for n in names},
            self.preprocessing["period"],
            title,
            run_dir / "forecast.png",
            band=band,
        )
        curves = {"model": m["backtest_mae_per_step"]}
        curves.update({n: m[f"backtest_{KEYS[n]}_mae_per_step"] for n in names})
        draw.per_step(
            curves,
            f"rolling-origin backtest, test part: {m['backtest_origins']} origins "
            f"{self.preprocessing['horizon']} steps apart",
            run_dir / "backtest.png",
        )
        return ["forecast.png", "backtest.png"]

    def predict(self, model: nn.Module, path: Path, device: torch.device, batch_size: int) -> str:
        p = self.preprocessing
        column = p["column"]
        try:
            series = read_series(path, column)
        except DataError as e:
            if column != "load_mw" or "has no column" not in str(e):
                raise
            series = read_series(path, None)
        w, h, period = p["window"], p["horizon"], p["period"]
        # The linear base in changes reads the value before the window too.
        need = w + int(any(b.differences for b in self.bases))
        if len(series) < need:
            raise DataError(
                f"CSV file {str(path)!r} holds {len(series)} values; the model needs the last "
                f"{need} to forecast the next {h}"
            )
        cal = None
        if p["calendar"]:
            times = read_times(path)
            if times is None:
                raise DataError(
                    f"CSV file {str(path)!r} has no time stamps; the model was trained with "
                    "calendar inputs and needs a time column (e.g. timestamp) beside the values"
                )
            cal = calendar(times)
        end = np.array([len(series)])
        covariates = p.get("covariates", [])
        values = series[:, None]
        if covariates:
            values = np.c_[series, read_columns(path, covariates)]
        mean = np.array([p["mean"], *p.get("covariate_mean", [])])
        std = np.array([p["std"], *p.get("covariate_std", [])])
        # Values far outside the training range overflow here; the check below names them.
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            z = (values - mean) / std
            ar = combined_ar(z, end, self.members)
            smoothed = self._smoothed(z, end)
            x = torch.from_numpy(model_inputs(z, cal, end, w, period, ar, smoothed))  # (1, T, I)
        if not torch.isfinite(x).all():
            raise DataError(
                f"CSV file {str(path)!r}: its last {w} values are too large for the model, which "
                f"was trained on values of mean {p['mean']:g} and standard deviation {p['std']:g}"
            )
        out = forward_all(model, x, torch.tensor([x.shape[1]]), False, device, batch_size)
        q = self.calibrated(self.quantiles(out).numpy().astype(np.float64))
        q = self.forecast(q, ar)[0]  # (horizon, Q)
        levels = self.levels
        median = levels.index(0.5) if levels else 0
        others = [k for k in range(len(levels)) if k != median]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(("steps_ahead", "forecast", *(f"q{levels[k]:g}" for k in others)))
        writer.writerows(
            (k + 1, f"{row[median]:.2f}", *(f"{row[j]:.2f}" for j in others))
            for k, row in enumerate(q)
        )
        return buf.getvalue()


# The baselines in the order the report and the plots show them, and their metrics' prefixes.
BASELINES = ("seasonal naive", "weekly naive", "linear AR", "ARX")
KEYS = {
    "seasonal naive": "baseline",
    "weekly naive": "weekly_naive",
    "linear AR": "ar",
    "ARX": "ar",
}


# The network's median replaces the base only where it beats it on the validation windows by this
# many standard errors (its epoch was chosen on those windows, which flatters it).
NETWORK_MARGIN = 2.0


def network_beats_base(network: np.ndarray, base: np.ndarray, block: int) -> tuple[bool, float]:
    """Whether the network's absolute errors ``network`` ``(N,)`` (one per validation window, in
    time order) are below the base's ``base`` ``(N,)`` by more than ``NETWORK_MARGIN`` standard
    errors of the mean paired difference, and that standard error. Neighbouring windows share
    targets and seasons, so the error is that of the means of consecutive blocks of ``block``
    windows (a period), as independent draws; with fewer than two blocks the network cannot show
    that it wins. The best epoch is the one whose validation MAE was least: comparing that MAE
    with the base's without a margin kept networks that lost to the base on new data."""
    d = network - base
    count = len(d) // block
    if count < 2:
        return False, float("nan")
    means = np.array([b.mean() for b in np.array_split(d[: count * block], count)])
    se = float(means.std(ddof=1) / math.sqrt(count))
    return bool(d.mean() < 0 and d.mean() < -NETWORK_MARGIN * se), se


def backtest_origins(windows: int, horizon: int) -> np.ndarray:
    """The indices of the test windows a rolling-origin backtest scores: every ``horizon``-th,
    so that consecutive forecasts tile the test part without overlapping (statsforecast's
    ``cross_validation(h=horizon, step_size=horizon)``)."""
    return np.arange(0, windows, horizon)


def backtest(pred: np.ndarray, true: np.ndarray, baselines: dict, horizon: int) -> dict:
    """The rolling-origin backtest's figures: its origin count and the MAE per step ahead of the
    model and of each baseline, over the windows of :func:`backtest_origins`."""
    rows = backtest_origins(len(true), horizon)
    per_step = {"model": np.abs(pred[rows] - true[rows]).mean(axis=0)}
    out = {"backtest_origins": len(rows), "backtest_mae": float(per_step["model"].mean())}
    out["backtest_mae_per_step"] = [float(v) for v in per_step["model"]]
    for name, forecast in baselines.items():
        mae = np.abs(forecast[rows] - true[rows]).mean(axis=0)
        out[f"backtest_{KEYS[name]}_mae_per_step"] = [float(v) for v in mae]
    return out
