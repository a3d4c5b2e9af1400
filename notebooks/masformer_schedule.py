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
# # MASFormer: which layers get full attention, and what that buys on recall
# MASFormer (Zhang et al. 2023) gives full attention to a few layers and a cheap local (sliding
# window) pattern to the rest. Its layer schedule is the model field `layer_attention` (one kind per
# layer; `zoo.models.masformer.parse_schedule` reads strings like `"window,full,window*2"`). On
# multi-query associative recall the answers lie about a whole sequence back, out of reach of
# stacked windows, so recall needs at least one full layer. This notebook trains the same model
# with no, one, and all full layers with `run` of `scripts/masformer_recall.py` and compares recall
# accuracy with the attention FLOPs of each schedule (`zoo.models.transformer.attention_flops`).
# `ZOO_NOTEBOOK_FAST=1` makes the model and the run tiny (the tests run it that way); the default
# trains three schedules for about two minutes on two CPU cores: all-full attention starts to recall,
# the other schedules may still be near chance. The script's default (500 steps at 256 tokens,
# `docs/models/masformer.md`) trains long enough for one full layer to recover most of the gap;
# raise `steps` below to get there.

# %%
import os
import pathlib
import sys
import types

import matplotlib.pyplot as plt
import numpy as np

import zoo
from zoo.models.masformer import parse_schedule

sys.path.insert(0, str(pathlib.Path(zoo.__file__).resolve().parents[1] / "scripts"))
from masformer_recall import run  # noqa: E402  (scripts/masformer_recall.py)

FAST = os.environ.get("ZOO_NOTEBOOK_FAST") == "1"
settings = types.SimpleNamespace(  # the script's command-line arguments
    steps=60 if FAST else 200,  # the script warms up for 50 steps
    seq_len=48 if FAST else 128,
    window=8 if FAST else 16,
    layers=2 if FAST else 4,
    d_model=16 if FAST else 32,
    pairs=2 if FAST else 4,
    batch_size=8 if FAST else 16,
    lr=8e-3,
    seed=0,
    eval_examples=64 if FAST else 256,
)
L = settings.layers
SCHEDULES = {
    "0 full": f"window*{L}",
    "1 full (layer 1)": "window,full" + (f",window*{L - 2}" if L > 2 else ""),
    "all full": f"full*{L}",
}
for name, text in SCHEDULES.items():
    print(f"{name:18s} {text:22s} -> {parse_schedule(text, L)}")

# %%
results = {name: run(text, settings) for name, text in SCHEDULES.items()}
for name, r in results.items():
    print(
        f"{name:18s} recall accuracy {r['accuracy']:.3f}  attention FLOPs {100 * r['flops_ratio']:5.1f}% of all-full"
        f"  ({r['train_seconds']:.0f}s)"
    )

# %% [markdown]
# ## The schedules and what they recall
# Left: one row per schedule, one cell per layer (dark = full attention, light = window of
# `settings.window` tokens). Right: recall accuracy on held-out sequences against the attention
# FLOPs relative to all-full; chance is 1/64 (values are one of 64 bytes).

# %%
fig_schedule, (ax_grid, ax_acc) = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 1.2]})
grid = np.array([[kind == "full" for kind in r["schedule"]] for r in results.values()], float)  # [S, L]
ax_grid.imshow(grid, cmap="Blues", vmin=-0.3, vmax=1.2, aspect="auto")
for (i, j), full in np.ndenumerate(grid):
    ax_grid.text(j, i, "full" if full else "window", ha="center", va="center", fontsize=9)
ax_grid.set(
    xticks=range(L), yticks=range(len(results)), yticklabels=list(results), xlabel="layer", title="layer schedule"
)
for name, r in results.items():
    ax_acc.scatter(100 * r["flops_ratio"], r["accuracy"], s=60, label=name)
ax_acc.axhline(1 / 64, color="gray", ls=":", label="chance")
ax_acc.set(
    xlabel="attention FLOPs, % of all-full",
    ylabel="recall accuracy",
    ylim=(-0.02, 1.02),
    title=f"associative recall at {settings.seq_len} tokens, {settings.steps} steps",
)
ax_acc.legend(fontsize=8)
fig_schedule.tight_layout()
plt.show()
