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
# # zoo quickstart
# Load the checkpoint that `zoo train` wrote (the README's main command writes `runs/default`),
# evaluate it, decode a passkey prompt token by token, and show the plots.

# %%
import os

import jax.numpy as jnp
import numpy as np
from IPython.display import Image, display

import zoo
from zoo.data import synthetic
from zoo.eval.evaluate import evaluate

workdir = os.environ.get("ZOO_WORKDIR", "runs/default")
model, config = zoo.load(workdir)  # the model and its run config, in one line
print(config.model_name, config.preset, "trained for", config.train.steps, "steps on", config.data.source)

# %% [markdown]
# ## Evaluate: passkey retrieval by length and needle depth

# %%
result = evaluate(model, config)
if "passkey" in result:
    grid = result["passkey"]
    print("exact match, rows = length", grid["lengths"], "columns = depth", grid["depths"])
    print(np.round(np.asarray(grid["exact_match"]), 2))

# %% [markdown]
# ## Decode a prompt with the KV cache (`init_cache` / `decode_step`)

# %%
example = synthetic.Passkey(config.data.seq_len, depth=0.5, seed=123)[0]
prompt = jnp.asarray(example["tokens"][None, : -synthetic.N_DIGITS])  # everything but the answer
cache = model.init_cache(1, prompt.shape[1] + synthetic.N_DIGITS)
for t in range(prompt.shape[1]):
    logits, cache = model.decode_step(prompt[:, t], cache)
generated = []
for _ in range(synthetic.N_DIGITS):
    token = jnp.argmax(logits, -1)
    generated.append(int(token[0]))
    logits, cache = model.decode_step(token, cache)
print(
    "true key:",
    bytes(example["tokens"][-synthetic.N_DIGITS :].astype(np.uint8)).decode(),
    "| generated:",
    bytes(generated).decode(errors="replace"),
)

# %% [markdown]
# ## Plots written by training and evaluation

# %%
for name in ("training.png", "eval.png"):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
        display(Image(path))
