# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # SpaceTime: a forecast against the truth on a synthetic AR process
# SpaceTime (Zhang et al., ICLR 2023) forecasts with companion-matrix SSMs: an encoder reads the
# lag window, and a closed-loop decoder rolls its state forward, feeding its own predictions back.
# A companion SSM can represent an AR(p) process exactly, so a stable AR(p) series is the cleanest
# test: the optimal forecast (the true-coefficient recursion, `ARTask.oracle`) is the error floor.
# Training uses `fit` of `scripts/forecast_ar.py` (AdamW, cosine decay, then test metrics).
# `ZOO_NOTEBOOK_FAST=1` trains for a few steps only (the tests run it that way); the default takes
# about a minute on two CPU cores.

# %%
import os
import pathlib
import sys

import matplotlib.pyplot as plt
import numpy as np

import zoo
from zoo.data.timeseries import ARTask

sys.path.insert(0, str(pathlib.Path(zoo.__file__).resolve().parents[1] / "scripts"))
from forecast_ar import fit  # noqa: E402  (scripts/forecast_ar.py)

FAST = os.environ.get("ZOO_NOTEBOOK_FAST") == "1"
STEPS = 40 if FAST else 600
LAG, HORIZON = 64, 16
# 512 test windows (fit predicts them in one batch); roots of modulus 0.8 to 0.99: a predictable process
task = ARTask(
    p=4,
    lag=LAG,
    horizon=HORIZON,
    seed=0,
    train_length=8192,
    eval_length=512 + LAG + HORIZON - 1,
    min_radius=0.8,
    max_radius=0.99,
)
print("AR coefficients phi:", np.round(task.phi, 3))

model = zoo.create_model(
    "spacetime",
    "tiny",
    seed=0,
    lag=task.lag,
    horizon=task.horizon,
    kernel_dim=16,
    max_avg_window=32,
    input_transform="none",  # the series is zero-mean and stationary: keep its level
    decoder_norm="a",  # b, c, k free: the decoder can realise any AR(p) recursion
)
result = fit(model, task, steps=STEPS, batch_size=32, lr=1e-2, seed=0)

# %% [markdown]
# ## Test error against two naive forecasts and the optimal one
# RMSE over every test window, in units of the series' standard deviation: predicting zero (the
# mean), repeating the last observed value, SpaceTime, and the optimal forecast (the floor).

# %%
test = task.oracle("test")  # {"x" [W, lag, 1], "y" [W, horizon, 1], "forecast" [W, horizon, 1]}
rmse = {
    "zero (the mean)": float(np.sqrt(np.mean(test["y"] ** 2))),
    "last value": float(np.sqrt(np.mean((test["y"] - test["x"][:, -1:]) ** 2))),
    "SpaceTime": result["rmse"],
    "optimal (true AR)": result["oracle"],
}
for name, value in rmse.items():
    print(f"{name:18s} test RMSE {value:.3f}")

# %% [markdown]
# ## One test window
# The last part of the input, the true continuation, the optimal forecast and SpaceTime's.

# %%
ex = result["example"]
lag, horizon = len(ex["x"]), len(ex["y"])
t_in, t_out = np.arange(lag), lag + np.arange(horizon)
fig_forecast, (ax, ax_bar) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [2, 1]})
ax.plot(t_in[-48:], ex["x"][-48:], color="gray", label="input (lag window)")
ax.plot(t_out, ex["y"], "k", label="truth")
ax.plot(t_out, ex["oracle"], "k:", label="optimal forecast")
ax.plot(t_out, ex["pred"], "C1", lw=2, label=f"SpaceTime ({STEPS} steps)")
ax.axvline(lag - 0.5, color="k", lw=0.5)
ax.set(xlabel="t", title=f"AR({task.p}) test window: forecast of {horizon} steps")
ax.legend(fontsize=8)
ax_bar.barh(list(rmse), list(rmse.values()), color=["C7", "C7", "C1", "k"])
ax_bar.set(xlabel="test RMSE", title="all test windows")
fig_forecast.tight_layout()
plt.show()
