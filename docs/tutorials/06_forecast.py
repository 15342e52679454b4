"""
Forecasting electricity load
============================

Seed 003 forecasts electricity load: 24 hours of history predict the next 2 hours. This tutorial
does that on the bundled series of Taylor (2003), the half-hourly demand of England and Wales in
the summer of 2000 (4,032 values, in megawatts), with an LSTM trained by :func:`rnnkit.fit`, and
scores it against three baselines on the same windows: the same time yesterday, the same time
last week, and a linear autoregression.

A forecast is only worth its margin over such baselines: load follows the clock so closely that
"the same as a week ago" is already hard to beat.
"""

import tempfile

import matplotlib.dates as mdates
import matplotlib.pyplot as plt
import numpy as np
import torch

import rnnkit
from rnnkit.data import chronological_split, load_taylor
from rnnkit.data.readers import read_times, taylor_csv
from rnnkit.models import ModelConfig, SequenceRegressor
from rnnkit.tasks.forecast import (
    calendar,
    fit_linear_ar,
    linear_ar,
    out_of_fold_ar,
    seasonal_naive,
)

load = load_taylor()  # (4032,) MW
times = read_times(taylor_csv())  # (4032,) datetime64
print(
    f"{len(load)} half-hourly values from {times[0]} to {times[-1]}, "
    f"{load.min():,.0f} to {load.max():,.0f} MW"
)
assert (
    len(load) == 4032
    and (times[1:] - times[:-1] == np.timedelta64(30, "m")).all()
)

# %%
# Windows and splits
# ------------------
# A window is 48 steps of history (24 h) and 4 targets (2 h). The series is cut by time into
# training, validation and test parts (70 / 15 / 15 %); a window belongs to the part its targets
# fall in. Every window starts at least a week into the series, so that the weekly baseline has
# its week of history everywhere.

WINDOW, HORIZON, DAY, WEEK = 48, 4, 48, 336
parts = chronological_split(len(load), (0.70, 0.15, 0.15))
starts = [
    np.arange(max(part.start, WEEK), part.stop - HORIZON + 1) for part in parts
]
print("windows per part (train, validation, test):", [len(s) for s in starts])
assert all(
    s[-1] + HORIZON <= p.stop for s, p in zip(starts, parts, strict=True)
)  # targets stay in the part

# %%
# The network sees standardised load (the training part's mean and deviation):

mean, std = load[parts[0]].mean(), load[parts[0]].std()
z = (load - mean) / std

# %%
# The baselines
# -------------
# The seasonal naive forecasts repeat the values one day or one week earlier. The linear
# autoregression is a least-squares fit from the 48 values of the window (and a constant) to
# each of the 4 targets, fitted on the training windows.

coef = fit_linear_ar(z, starts[0], WINDOW, HORIZON)  # (49, 4)
targets = [
    np.stack([z[t : t + HORIZON] for t in s]) for s in starts
]  # (N, 4) each

# %%
# The model: an LSTM that corrects the autoregression
# ---------------------------------------------------
# The LSTM reads the 48 steps of the window; at each step it gets the load, the time of day (its
# sine and cosine) and the day of the week (one-hot), and the autoregression's 4-step forecast.
# It predicts the autoregression's *error*, so it only has to learn what a linear model
# cannot. On the training windows the autoregression's forecasts come from fits on the other
# windows (out of fold), so that its errors there look like its errors on new data.

ar = [
    out_of_fold_ar(z, starts[0], WINDOW, HORIZON),
    linear_ar(z, starts[1], coef),
    linear_ar(z, starts[2], coef),
]
scale = (
    targets[0] - ar[0]
).std()  # the residuals' size, so that the network's targets are ~1
cal = calendar(times)  # (4032, 9)


def inputs(s, ar_forecast):
    steps = (
        s[:, None] - WINDOW + np.arange(WINDOW)
    )  # (N, 48): the time step of each input step
    repeat = np.broadcast_to(
        ar_forecast[:, None, :], (len(s), WINDOW, HORIZON)
    )
    return np.concatenate(
        [z[steps][..., None], cal[steps], repeat], axis=-1
    ).astype(np.float32)


data = [
    (
        torch.from_numpy(inputs(s, a)),
        torch.from_numpy(((t - a) / scale).astype(np.float32)),
    )
    for s, a, t in zip(starts, ar, targets, strict=True)
]
print("inputs (N, T, features):", tuple(data[0][0].shape))
assert data[0][0].shape == (len(starts[0]), WINDOW, 1 + 9 + HORIZON)

# %%
# :class:`rnnkit.models.SequenceRegressor` is seed 000's ``LSTMModel``: an LSTM and a linear
# layer on its output at the last step. The targets are floats, so :func:`rnnkit.fit` trains
# with mean squared error and reports the mean absolute error.

torch.manual_seed(0)
model = SequenceRegressor(
    ModelConfig(
        "regressor",
        input_size=data[0][0].shape[-1],
        output_size=HORIZON,
        hidden_size=64,
    )
)
history = rnnkit.fit(
    model,
    data[0],
    data[1],
    config=rnnkit.TrainConfig(
        epochs=20,
        batch_size=64,
        lr=0.003,
        threads=1,
        out=tempfile.mkdtemp(),
        quiet=True,
    ),
)

# %%
# Scores on the test windows
# --------------------------
# All forecasts back in megawatts, all on the same 602 test windows and all 4 steps.

x_test, _ = data[2]
in_mw = lambda zs: zs * std + mean  # noqa: E731
truth = in_mw(targets[2])
forecasts = {
    "LSTM + autoregression": in_mw(
        rnnkit.predict(model, x_test).numpy() * scale + ar[2]
    ),
    "linear autoregression": in_mw(ar[2]),
    "same time last week": in_mw(seasonal_naive(z, starts[2], WEEK, HORIZON)),
    "same time yesterday": in_mw(seasonal_naive(z, starts[2], DAY, HORIZON)),
}
mae = {name: float(np.abs(f - truth).mean()) for name, f in forecasts.items()}
for name, value in mae.items():
    print(f"{name:24s} MAE {value:7.1f} MW")

# %%
# The LSTM's errors are more than 15% smaller than the best baseline's.

best_baseline = min(v for k, v in mae.items() if k != "LSTM + autoregression")
print(
    f"LSTM / best baseline: {mae['LSTM + autoregression'] / best_baseline:.2f}"
)
assert mae["LSTM + autoregression"] < 0.85 * best_baseline

# %%
# The day-ago forecast is by far the worst, and the calendar says why: a Saturday does not look
# like a Friday, nor a Monday like a Sunday. On the windows whose targets fall on a Saturday,
# Sunday or Monday its error is several times its error on Tuesday to Friday, where yesterday
# was a similar day.

weekday = (
    times[starts[2]].astype("datetime64[D]").astype(np.int64) + 3
) % 7  # Monday = 0
after_change = np.isin(weekday, [0, 5, 6])
day_error = np.abs(forecasts["same time yesterday"] - truth).mean(
    axis=1
)  # (N,)
print(
    f"day-ago MAE: Sat/Sun/Mon {day_error[after_change].mean():,.0f} MW, "
    f"Tue-Fri {day_error[~after_change].mean():,.0f} MW"
)
assert mae["same time yesterday"] > 2 * mae["same time last week"]
assert day_error[after_change].mean() > 3 * day_error[~after_change].mean()

# %%
# The forecast plot: three days of the test part, each step forecast from the window that ends
# 2 h before it (the 4th step of each window), against the truth.

show = slice(0, 3 * DAY)
t_test = times[starts[2] + HORIZON - 1][show]
fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), height_ratios=[2, 1])
ax1.plot(
    t_test, truth[show, -1], color="black", linewidth=2, label="actual load"
)
for name, style in (
    ("LSTM + autoregression", "-"),
    ("linear autoregression", "--"),
    ("same time last week", ":"),
):
    ax1.plot(
        t_test, forecasts[name][show, -1], style, label=f"{name} (2 h ahead)"
    )
ax1.set_ylabel("load (MW)")
ax1.set_xlabel("time (August 2000, half-hourly steps)")
ax1.xaxis.set_major_locator(mdates.HourLocator(byhour=[0, 12]))
ax1.xaxis.set_major_formatter(mdates.DateFormatter("%a %d %b\n%H:%M"))
ax1.legend(
    fontsize=8,
    ncol=4,
    loc="lower center",
    bbox_to_anchor=(0.5, 1.0),
    frameon=False,
)
epochs = np.arange(1, len(history["val_mae"]) + 1)
ax2.plot(
    epochs,
    np.array(history["val_mae"]) * scale * std,
    "o-",
    label="LSTM + autoregression",
)
ax2.axhline(
    np.abs(ar[1] - targets[1]).mean() * std,
    color="C1",
    linestyle="--",
    label="linear autoregression",
)
ax2.set_xlabel("epoch")
ax2.set_xticks(epochs)
ax2.set_ylabel("validation MAE (MW)")
ax2.legend(fontsize=8)
fig.tight_layout()
assert (
    min(history["val_mae"]) * scale * std
    < np.abs(ar[1] - targets[1]).mean() * std
)

# %%
# ``rnnkit train forecast`` is this model with a week of history (folded by the day, so that each
# step also sees the same time on earlier days) and 40 epochs: about 200 MW on these test windows.
