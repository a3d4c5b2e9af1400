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
# # S4 and S4D: the convolution kernel of a layer and how fast it decays
# An S4 layer is a linear time-invariant SSM per channel, so its whole effect on a sequence is one
# causal convolution kernel K_l = C dA^l dB, l = 0..L-1. S4 (`mode="dplr"`) discretises HiPPO-LegS
# in its normal-plus-low-rank form; S4D (`mode="diag"`) uses a diagonal A (here S4D-Lin,
# A_n = -1/2 + i pi n, zero-order hold). Every mode has real part -1/2, so each channel forgets like
# exp(-dt l / 2): the step size dt sets the memory length. Below: the kernels of a freshly
# initialised layer for a short-memory and a long-memory dt range.
# `ZOO_NOTEBOOK_FAST=1` shortens the kernels (the tests run it that way).

# %%
import os

import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from zoo.models import registry
from zoo.models.s4 import SSMKernel

FAST = os.environ.get("ZOO_NOTEBOOK_FAST") == "1"
LENGTH = 256 if FAST else 2048  # kernel length L
DT_RANGES = {"dt in [1e-1, 1] (short memory)": (1e-1, 1.0), "dt in [1e-3, 1e-2] (long memory)": (1e-3, 1e-2)}
MODES = {
    "S4 (DPLR, HiPPO-LegS)": dict(preset="tiny"),
    "S4D (diagonal, S4D-Lin)": dict(preset="tiny-s4d"),
}


def layer_kernel(preset: str, dt_min: float, dt_max: float) -> np.ndarray:
    """The kernel K [H, L] of one freshly initialised S4 layer (H = 64 channels)."""
    cfg = registry.get_model_config("s4", preset, dt_min=dt_min, dt_max=dt_max, l_max=LENGTH)
    return np.asarray(SSMKernel(cfg, 1, rngs=nnx.Rngs(0)).kernel(LENGTH)[0])  # [H, L]


kernels = {(mode, dt): layer_kernel(spec["preset"], *DT_RANGES[dt]) for mode, spec in MODES.items() for dt in DT_RANGES}
print({k: v.shape for k, v in kernels.items()})

# %% [markdown]
# ## The kernels of three channels
# Each channel draws its own dt (log-uniform in the range), so one layer mixes memory lengths.

# %%
fig_kernels, axes = plt.subplots(2, 2, figsize=(11, 6), sharex="col")
for row, mode in enumerate(MODES):
    for col, dt in enumerate(DT_RANGES):
        k = kernels[mode, dt]
        shown = min(LENGTH, 64) if col == 0 else LENGTH
        for h in range(3):
            axes[row, col].plot(k[h, :shown], lw=1, label=f"channel {h}")
        axes[row, col].set(title=f"{mode}\n{dt}", xlabel="lag l", ylabel="K_l")
axes[0, 0].legend(fontsize=8)
fig_kernels.tight_layout()
plt.show()

# %% [markdown]
# ## Decay: log |K_l| over the lag
# The median over the 64 channels of |K_l| (a running maximum over 8 lags removes the oscillation
# zeros). Small dt keeps the kernel alive for hundreds to thousands of lags; large dt forgets within a few dozen.


# %%
def envelope(k: np.ndarray, width: int = 8) -> np.ndarray:
    """Median over channels of the running max of |K| over `width` lags: [L - width + 1]."""
    a = np.abs(k)
    win = np.lib.stride_tricks.sliding_window_view(a, width, axis=-1).max(-1)  # [H, L-w+1]
    return np.median(win, axis=0)


fig_decay, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
tail_ratio = {}
for ax, mode in zip(axes, MODES):
    for dt in DT_RANGES:
        env = envelope(kernels[mode, dt])
        ax.plot(env, label=dt)
        q = len(env) // 4
        # mean |K| over the last quarter of the lags relative to the first quarter
        tail_ratio[mode, dt] = float(env[-q:].mean() / env[:q].mean())
    ax.set(title=mode, xlabel="lag l", ylabel="median |K_l|", yscale="log", ylim=(1e-12, 10))
    ax.legend(fontsize=8)
fig_decay.tight_layout()
plt.show()
for (mode, dt), r in tail_ratio.items():
    print(f"{mode:26s} {dt:34s} |K| last quarter / first quarter = {r:.2e}")
