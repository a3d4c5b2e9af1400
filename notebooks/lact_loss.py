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
# # LaCT: next-token loss by position against a window-only transformer
# LaCT (large-chunk test-time training) adds to sliding-window attention a set of fast weights per
# head, updated once per chunk of tokens by a gradient step on a key -> value loss; the window sees
# the last `window` tokens, the fast weights summarise everything before. The baseline here is the
# same transformer with only the window. Both are trained the same way on byte-level text (this
# Python's standard library source, `data.source = "text"`), then `zoo.eval.longcontext.loss_by_position`
# measures the loss at every position of sequences longer than the training length.
# `ZOO_NOTEBOOK_FAST=1` makes the models tiny and skips the training (the tests run it that way, to
# save the two training compiles; the training loop is the same as in `scripts/masformer_recall.py`,
# which the MASFormer notebook runs); the default
# trains for about a minute and a half on two CPU cores. At this size and budget expect the two
# curves to be close (LaCT need not be ahead): the notebook shows how to measure, not the paper's
# result, which needs long training sequences (`zoo train --config lact:760m` on accelerators).

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import zoo
from zoo.config import make_config
from zoo.data.pipeline import make_batches
from zoo.eval.longcontext import loss_by_position
from zoo.train.step import lm_loss

FAST = os.environ.get("ZOO_NOTEBOOK_FAST") == "1"
WINDOW = 16 if FAST else 32  # window of both models = LaCT's chunk size
SEQ_LEN = 64 if FAST else 128  # training length
EVAL_LEN = 128 if FAST else 512  # loss measured up to this length
STEPS = 0 if FAST else 150
SIZE = dict(d_model=32, n_layers=1, n_heads=2, d_ff=64) if FAST else dict(d_model=64, n_layers=2, n_heads=4, d_ff=192)

data = make_config("lact", "tiny").data
data.update(source="text", seq_len=SEQ_LEN, batch_size=8)
models = {
    "LaCT (window + fast weights)": zoo.create_model(
        "lact", "tiny", seed=0, window=WINDOW, chunk_size=WINDOW, n_lact_heads=1, **SIZE
    ),
    "window-only transformer": zoo.create_model(
        "transformer", "tiny", seed=0, attention="window", window=WINDOW, n_kv_heads=SIZE["n_heads"], **SIZE
    ),
}
for name, m in models.items():
    print(f"{name}: {sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param))):,} parameters")

# %% [markdown]
# ## Train both the same way
# AdamW with warmup and cosine decay on the same batches; the loss is the zoo trainer's `lm_loss`.


# %%
def train(model, steps: int) -> list[float]:
    """Trains `model` in place for `steps` steps; returns the training losses."""
    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, max(1, steps // 10), max(steps, 2), 3e-4)
    opt = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule)), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, batch):
        loss, grads = nnx.value_and_grad(lambda m: lm_loss(m(batch["inputs"]), batch)[0])(model)
        opt.update(model, grads)
        return loss

    batches = make_batches(data, "train")
    return [float(step(model, opt, next(batches))) for _ in range(steps)]


curves = {name: train(m, STEPS) for name, m in models.items()}
for name, c in curves.items():
    if c:
        print(f"{name:30s} training loss {c[0]:.3f} -> {np.mean(c[-10:]):.3f}")

# %% [markdown]
# ## Loss by position beyond the training length
# Mean next-token loss (nats per byte) in position bins of held-out sequences of `EVAL_LEN` tokens.

# %%
by_position = {
    name: loss_by_position(m, data, EVAL_LEN, samples=16, batch_size=8, bins=16) for name, m in models.items()
}
fig_loss, (ax_curve, ax_pos) = plt.subplots(1, 2, figsize=(12, 3.8))
for name, c in curves.items():
    ax_curve.plot(c, label=name)
    ax_pos.plot(by_position[name]["position"], by_position[name]["loss"], marker="o", ms=3, label=name)
ax_curve.set(xlabel="step", ylabel="training loss (nats)", title=f"training at {SEQ_LEN} tokens")
ax_pos.axvline(WINDOW, color="gray", ls=":", lw=1, label=f"window / chunk {WINDOW}")
ax_pos.axvline(SEQ_LEN, color="k", ls="--", lw=1, label=f"training length {SEQ_LEN}")
ax_pos.set(xlabel="position", ylabel="next-token loss (nats)", title=f"loss by position at {EVAL_LEN} tokens")
ax_pos.legend(fontsize=8)
fig_loss.tight_layout()
plt.show()
for name, r in by_position.items():
    beyond = [loss for p, loss in zip(r["position"], r["loss"]) if p >= SEQ_LEN]
    print(f"{name:30s} mean loss beyond the training length {np.mean(beyond):.3f}")
