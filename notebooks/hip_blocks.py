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
# # HiP: which key blocks the hierarchical search keeps
# HiP (Lee et al., ICLR 2025) makes a model trained with full attention sub-quadratic without
# training: every query block keeps only its top-K key blocks, found by a binary-split search that
# scores each branch by its representative (the 2 keys at its centre, against every other query
# of the block), plus the first `sinks` keys and a causal window.
# `pallas_kernels.sparse_attention.hip_block_indices` is that search; `sparse_attention`
# then attends to the selected keys. Here one head's queries and keys have a planted structure
# (a few "topic" key blocks that later queries look up), and the selected blocks are drawn over the
# dense attention map. It needs no model: HiP is an operation on one layer's q and k (`zoo.models.hip`
# puts it into any trained attention model). `ZOO_NOTEBOOK_FAST=1` shortens the sequence (the tests run it that way).

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.patches import Rectangle

from pallas_kernels.sparse_attention import hip_block_indices, sparse_attention

FAST = os.environ.get("ZOO_NOTEBOOK_FAST") == "1"
T = 256 if FAST else 1024  # tokens
BLOCK = 32  # block_q = block_k
K_BLOCKS = 2 if FAST else 4  # key blocks kept per query block
WINDOW, SINKS = 32, 4
P = 32  # head dim
n_blocks = T // BLOCK

# Queries and keys: noise plus, for a few topic key blocks, a shared direction that the queries of
# every later block share (each query block looks up one topic).
rng = np.random.default_rng(0)
topics = rng.choice(np.arange(1, n_blocks - 2), size=3, replace=False)  # key block ids
directions = rng.normal(size=(len(topics), P))
q = rng.normal(size=(T, P))
k = rng.normal(size=(T, P))
for j, blk in enumerate(topics):
    k[blk * BLOCK : (blk + 1) * BLOCK] += 1.0 * directions[j]
for qb in range(n_blocks):
    q[qb * BLOCK : (qb + 1) * BLOCK] += 0.8 * directions[qb % len(topics)]
q = jnp.asarray(q[None, :, None], jnp.float32)  # [B=1, T, H=1, P]
k = jnp.asarray(k[None, :, None], jnp.float32)  # [1, T, 1, P]
v = jax.random.normal(jax.random.key(1), k.shape)  # [1, T, 1, P]
print("topic key blocks:", sorted(topics.tolist()))

# %% [markdown]
# ## The search
# `hip_block_indices` returns int32 [B, H, T / block_q, K] key block ids (ascending, -1 = unused
# slot when a query block has fewer than K searchable blocks, e.g. near the start).

# %%
idx = hip_block_indices(q, k, k_blocks=K_BLOCKS, block_q=BLOCK, block_k=BLOCK, window=WINDOW, sinks=SINKS)
idx = np.asarray(idx)[0, 0]  # [nq, K]
print("selected key blocks of the last 8 query blocks:\n", idx[-8:])

# the dense causal attention map of the head, softmax(q k^T / sqrt(P))
scores = np.asarray(q[0, :, 0] @ k[0, :, 0].T) / np.sqrt(P)  # [T, T]
scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
probs = np.exp(scores - scores.max(-1, keepdims=True))
probs /= probs.sum(-1, keepdims=True)


def pattern_mask(blocks: np.ndarray) -> np.ndarray:
    """bool [T, T]: the keys query i attends to under listed key blocks [nq, K] + window + sinks."""
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    mask = (j > i - WINDOW) | (j < SINKS)
    for qb, row in enumerate(blocks):
        for b in row[row >= 0]:
            mask[qb * BLOCK : (qb + 1) * BLOCK, b * BLOCK : (b + 1) * BLOCK] = True
    return mask & (j <= i)


# The same number of random causal blocks per query block, for comparison.
random_idx = np.full_like(idx, -1)
for qb in range(n_blocks):
    candidates = np.arange(max(0, (qb * BLOCK - WINDOW) // BLOCK + 1))
    if len(candidates):
        random_idx[qb, : min(K_BLOCKS, len(candidates))] = rng.choice(candidates, min(K_BLOCKS, len(candidates)), False)
mass_hip = float((probs * pattern_mask(idx)).sum(-1).mean())
mass_random = float((probs * pattern_mask(random_idx)).sum(-1).mean())
mass_window = float((probs * pattern_mask(np.full_like(idx, -1))).sum(-1).mean())
print(f"attention mass kept per query: HiP {mass_hip:.3f} | random blocks {mass_random:.3f}", end=" | ")
print(f"window + sinks only {mass_window:.3f}")

# %% [markdown]
# ## The selected blocks over the attention map
# Green squares: HiP's key blocks per query block; the window and sinks are attended as well.

# %%
fig_blocks, (ax_map, ax_err) = plt.subplots(1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [1.2, 1]})
ax_map.imshow(np.log10(probs + 1e-6), cmap="magma", vmin=-6, vmax=0, interpolation="nearest")
for qb, row in enumerate(idx):
    for b in row[row >= 0]:
        ax_map.add_patch(Rectangle((b * BLOCK - 0.5, qb * BLOCK - 0.5), BLOCK, BLOCK, fill=False, ec="lime", lw=1.2))
ax_map.set(title=f"log10 attention (one head), HiP top-{K_BLOCKS} blocks in green", xlabel="key", ylabel="query")

# Output error of the sparse pattern against dense attention, per query.
dense = probs @ np.asarray(v[0, :, 0])  # dense causal attention of the head [T, P]
pattern = dict(window=WINDOW, sinks=SINKS, block_q=BLOCK, block_k=BLOCK)
sparse_out = {  # [1, T, 1, P] each
    name: sparse_attention(q, k, v, block_indices=jnp.asarray(blocks)[None, None], **pattern)
    for name, blocks in (("HiP blocks", idx), ("random blocks", random_idx))
}
rel_error = {}
for name, out in sparse_out.items():
    err = np.linalg.norm(np.asarray(out)[0, :, 0] - dense, axis=-1) / np.linalg.norm(dense, axis=-1)
    rel_error[name] = float(err.mean())
    ax_err.plot(err, lw=1, label=f"{name} (mean {err.mean():.3f})")
ax_err.set(xlabel="query", ylabel="||o_sparse - o_dense|| / ||o_dense||", title="output error vs dense attention")
ax_err.legend(fontsize=8)
fig_blocks.tight_layout()
plt.show()
