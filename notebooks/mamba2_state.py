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
# # Mamba-2: per-head decays and the state norm over a long sequence
# Each Mamba-2 head keeps a state h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T with one scalar A < 0
# per head: alpha = exp(dt A) is how much of the state survives one token. Stuffed Mamba
# (Chen et al. 2024) traces the failure beyond the training length to states that keep growing, and
# proposes training-free fixes, all fields of the model config that `set_inference_options` changes
# on a built or trained model: `a_scale` (forget more), `b_scale` (write less), `window` (the state
# holds only the last R tokens). This notebook shows the decays and the state norms with and without
# them. By default it uses a freshly initialised `mamba2:tiny`; set `ZOO_MAMBA2_RUN` to a `zoo train`
# work directory of a Mamba-2 run (e.g. the one `scripts/stuffed_mamba.py` trains) to look at a
# trained model. `ZOO_NOTEBOOK_FAST=1` shortens the sequence (the tests run it that way).

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np

import zoo
from zoo.data import synthetic
from zoo.models.mamba2 import state_norm_trace

FAST = os.environ.get("ZOO_NOTEBOOK_FAST") == "1"
RUN = os.environ.get("ZOO_MAMBA2_RUN", "")
LENGTH = 256 if FAST else 4096  # tokens of the probe sequence
EVERY = 16 if FAST else 64  # record the state norms after every EVERY tokens
WINDOW = 64 if FAST else 256  # the Method-3 window R

model = zoo.load(RUN, scan_layers=False)[0] if RUN else zoo.create_model("mamba2", "tiny", seed=0)
cfg = model.config
print(f"{cfg.n_layers} layers x {cfg.n_heads} heads, state {cfg.headdim} x {cfg.d_state} per head")
# two passkey sequences (bytes of filler text with a needle) as the probe
probe = np.stack([synthetic.Passkey(LENGTH, seed=7)[i]["tokens"][:LENGTH] for i in range(2)])  # [2, T]

# %% [markdown]
# ## Per-head decay alpha = exp(dt A) and its memory length
# dt = softplus(dt_raw + dt_bias) depends on the token; at dt_raw = 0 it is softplus(dt_bias). The
# memory length 1 / (dt |A|) is the number of tokens after which a write has decayed by 1/e.
# `a_scale` multiplies A, so it divides every head's memory length by the same factor.

# %%
mixers = [block.mixer for block in model.blocks]  # one Mamba2Mixer per layer
dt = np.stack([np.asarray(jax.nn.softplus(m.dt_bias[...])) for m in mixers])  # [L, H]
a = np.stack([-np.exp(np.asarray(m.A_log[...])) for m in mixers])  # [L, H]
A_SCALES = (1.0, 2.0, 4.0)
alpha = {s: np.exp(dt * a * s) for s in A_SCALES}  # [L, H] per a_scale
fig_decay, axes = plt.subplots(1, 2, figsize=(11, 3.8))
heads = np.arange(cfg.n_heads)
for j, s in enumerate(A_SCALES):
    axes[0].bar(heads + (j - 1) * 0.27, alpha[s][0], width=0.27, label=f"a_scale {s:g}")
    axes[1].bar(heads + (j - 1) * 0.27, 1 / (dt[0] * -a[0] * s), width=0.27, label=f"a_scale {s:g}")
axes[0].set(xlabel="head (layer 0)", ylabel="alpha = exp(dt A)", title="decay per token", ylim=(0, 1))
axes[1].set(xlabel="head (layer 0)", ylabel="tokens", title="memory length 1 / (dt |A|)", yscale="log")
axes[0].legend(fontsize=8)
fig_decay.tight_layout()
plt.show()

# %% [markdown]
# ## State norm per position, with and without the mitigations
# `state_norm_trace` runs a chunked prefill and records ||h||_F of every layer and head after every
# chunk. The state is linear in B, so `b_scale = 0.5` halves the first layer's norms exactly; the
# window leaves the first R tokens unchanged and then caps what the state holds. A freshly
# initialised model's state norms stay flat with the length; the growth past the training length that
# Stuffed Mamba describes appears after training (`scripts/stuffed_mamba.py` trains a tiny model and
# plots it; point `ZOO_MAMBA2_RUN` at its `run` directory to see it here).

# %%
DEFAULTS = dict(a_scale=1.0, b_scale=1.0, window=0)
VARIANTS = {
    "original": {},
    "a_scale 2 (forget more)": dict(a_scale=2.0),
    "b_scale 0.5 (write less)": dict(b_scale=0.5),
    f"window {WINDOW}": dict(window=WINDOW),
}
norms = {}
for name, options in VARIANTS.items():
    model.set_inference_options(**{**DEFAULTS, **options})
    positions, n = state_norm_trace(model, probe, every=EVERY)  # [S], [L, B, H, S]
    norms[name] = n
model.set_inference_options(**DEFAULTS)

fig_norms, axes = plt.subplots(1, cfg.n_layers, figsize=(5.5 * cfg.n_layers, 3.8), squeeze=False)
for layer, ax in enumerate(axes[0]):
    for name, n in norms.items():
        ax.plot(positions, n[layer].mean((0, 1)), label=name)  # mean over batch and heads
    ax.axvline(WINDOW, color="k", ls=":", lw=1)
    ax.set(xlabel="position", ylabel="mean ||h||_F over heads", title=f"layer {layer}", yscale="log")
axes[0][0].legend(fontsize=8)
fig_norms.tight_layout()
plt.show()
for name, n in norms.items():
    print(f"{name:26s} final state norm per layer (mean over heads): {np.round(n[..., -1].mean((1, 2)), 3)}")
