"""HiP hierarchical top-k key-block search (Lee et al., "A Training-Free Sub-quadratic Cost
Transformer Model Serving Framework With Hierarchically Pruned Attention", ICLR 2025, Sec. 3.1).

Written from the paper's algorithm description (HiP's code is under a non-commercial licence):
for every query block, K = `k_blocks` spans evenly tile the searchable key blocks; each round
splits every span into two halves, scores each half by its *representative* (first) key block and
keeps the best K halves; after ceil(log2(nk / K)) rounds every span is a single key block. The
score of key block j for query block i is

        score(i, j) = max_{r in block i} max(q_r . kmin_j, q_r . kmax_j)

where kmin_j / kmax_j are the element-wise min / max over the keys of block j (the min/max key
summaries of HiP's key groups). Sink keys and the keys every query of the block sees through its
sliding window are excluded from the search because `sparse_attention` always attends to them.

Cost per query block: 2K representative scores of bq x 2 x D per round and ~log2(T/K) rounds, so
O(T log T) time overall; the working set is O(T/bq * K * D) = O(T) memory.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.sparse_attention import common


def _search_range(cfg: common.Config, window, sinks, causal):
    """Searchable key blocks [lo, hi) per query block: two int32 [nq]."""
    p_first, p_last = common.query_block_positions(cfg)
    del p_first
    lo = jnp.full((cfg.nq,), sinks // cfg.block_k, jnp.int32)  # blocks entirely made of sinks
    if causal:
        # Keys after the last query are invisible; keys that every query of the block sees
        # through its window are excluded.
        key_end = p_last + 1 if window is None else p_last - window + 1
        key_end = jnp.clip(key_end, 0, cfg.seq_k)
        hi = (key_end + cfg.block_k - 1) // cfg.block_k
    else:
        hi = jnp.full((cfg.nq,), cfg.nk, jnp.int32)
    return lo, jnp.maximum(hi, lo)


def hip_block_indices(
    q: Float[Array, "B Tq H D"],
    k: Float[Array, "B Tk Hk D"],
    *,
    k_blocks: int,
    block_q: int = 64,
    block_k: int = 64,
    window: int | None = None,
    sinks: int = 0,
    causal: bool = True,
) -> Int[Array, "B H nq K"]:
    """Estimates the top-`k_blocks` key blocks of every query block by HiP's hierarchical search.

    Args:
        q: [B, Tq, H, D] queries (any float dtype; scored in fp32).
        k: [B, Tk, Hk, D] keys; Hk divides H.
        k_blocks: K, key blocks kept per query block.
        block_q, block_k: the block sizes later passed to `sparse_attention`.
        window, sinks, causal: the same pattern options as `sparse_attention`; they set the search
            range (window/sink keys are attended anyway and are not searched).

    Returns:
        int32 [B, H, ceil(Tq/block_q), K] key block ids in ascending order, -1 for unused slots
        (when fewer than K blocks are searchable). Feed to `sparse_attention(block_indices=...)`.
    """
    if not isinstance(k_blocks, int) or k_blocks < 1:
        raise ValueError(f"k_blocks={k_blocks!r} must be an int >= 1.")
    cfg, _, _ = common.validate(q, k, k, None, None, causal=causal, window=window, sinks=sinks,
                                block_q=block_q, block_k=block_k, sm_scale=None)
    b, tq, h, d = q.shape
    hk = k.shape[2]
    nq, nk, kk = cfg.nq, cfg.nk, k_blocks
    # Query blocks [B,H,nq,bq,D] and key-block min/max summaries [B,Hk,nk,D] (padding excluded).
    qb = common.to_head_major(q.astype(jnp.float32), nq * block_q).reshape(b, h, nq, block_q, d)
    kh = common.to_head_major(k.astype(jnp.float32), nk * block_k).reshape(b, hk, nk, block_k, d)
    kvalid = (jnp.arange(nk * block_k) < cfg.seq_k).reshape(nk, block_k)[:, :, None]
    kmin = jnp.min(jnp.where(kvalid, kh, jnp.inf), axis=3)
    kmax = jnp.max(jnp.where(kvalid, kh, -jnp.inf), axis=3)
    qvalid = (jnp.arange(nq * block_q) < cfg.seq_q).reshape(nq, block_q)  # [nq,bq]
    hk_idx = common.kv_head_index(h, hk)[None, :, None, None]
    b_idx = jnp.arange(b)[:, None, None, None]

    def score(rep):
        """Representative score of key blocks rep [B,H,nq,C] for every query block: [B,H,nq,C]."""
        lo_k = kmin[b_idx, hk_idx, rep]  # [B,H,nq,C,D]
        hi_k = kmax[b_idx, hk_idx, rep]
        s = jnp.maximum(jnp.einsum("bhqrd,bhqcd->bhqrc", qb, lo_k),
                        jnp.einsum("bhqrd,bhqcd->bhqrc", qb, hi_k))
        s = jnp.where(qvalid[None, None, :, :, None], s, -jnp.inf)
        return jnp.max(s, axis=3)  # block max over the query block

    # Initial spans: K spans evenly tiling [lo, hi) (sizes differ by at most one; 0 if n < K).
    lo, hi = _search_range(cfg, window, sinks, causal)  # [nq]
    n = hi - lo
    i = jnp.arange(kk + 1, dtype=jnp.int32)
    edges = lo[:, None] + (i[None, :] * n[:, None]) // kk  # [nq, K+1]
    start = jnp.broadcast_to(edges[:, :-1], (b, h, nq, kk))
    end = jnp.broadcast_to(edges[:, 1:], (b, h, nq, kk))
    rounds = math.ceil(math.log2(max(1, common.cdiv(nk, kk))))
    for _ in range(rounds):
        # Split every span in two halves (left gets the extra block).
        mid = start + (end - start + 1) // 2
        c_start = jnp.concatenate([start, mid], axis=-1)  # [B,H,nq,2K]
        c_end = jnp.concatenate([mid, end], axis=-1)
        # Score each half by its first key block; empty halves never win.
        s = score(jnp.clip(c_start, 0, nk - 1))
        s = jnp.where(c_end > c_start, s, -jnp.inf)
        # Keep the best K halves.
        _, top = jax.lax.top_k(s, kk)
        start = jnp.take_along_axis(c_start, top, axis=-1)
        end = jnp.take_along_axis(c_end, top, axis=-1)
    # Every non-empty span is now one key block.
    big = jnp.int32(nk + 1)
    blocks = jnp.sort(jnp.where(end > start, start, big), axis=-1)
    return jnp.where(blocks < big, blocks, -1).astype(jnp.int32)
