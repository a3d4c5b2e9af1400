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
# evaluate it, generate from a passkey prompt, and show the plots.

# %%
import os

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
# ## Generate: `zoo.generate` continues a batch of prompts
# One jitted program: a parallel prefill of the prompts, then a `lax.while_loop` of `decode_step`
# with the KV cache. Prompts may differ in length; greedy by default, or sampled with
# `temperature`, `top_k`, `top_p` and a `seed`.

# %%
example = synthetic.Passkey(config.data.seq_len, depth=0.5, seed=123)[0]
prompt = example["tokens"][: -synthetic.N_DIGITS]  # everything but the answer
out = zoo.generate(model, [prompt], max_new_tokens=synthetic.N_DIGITS)
print(
    "true key:",
    bytes(example["tokens"][-synthetic.N_DIGITS :].astype(np.uint8)).decode(),
    "| generated:",
    bytes(out.tokens[0].astype(np.uint8)).decode(errors="replace"),
)
# A batch of two prompts of different lengths, sampled (one seed per row).
batch = zoo.generate(model, [prompt, prompt[-60:]], max_new_tokens=24, temperature=0.8, top_p=0.95, seed=[1, 2])
for row in batch.tokens:
    print(repr(bytes(row.astype(np.uint8)).decode(errors="replace")))

# %% [markdown]
# ## Plots written by training and evaluation

# %%
for name in ("training.png", "eval.png"):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
        display(Image(path))
