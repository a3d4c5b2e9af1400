"""HiP hierarchical top-k key-block search (Lee et al., "A Training-Free Sub-quadratic Cost
Transformer Model Serving Framework With Hierarchically Pruned Attention", ICLR 2025, Sec. 3.1),
for prefill (`hip_block_indices`) and decoding (`hip_decode_block_indices`), both on one search
core (`hip_search`).

Written from the paper's algorithm description (HiP's code is under a non-commercial licence).
For every query block, k_blocks spans evenly tile the searchable key blocks [lo, hi); each round
splits every span into two halves, scores each half by its representative (its first key block)
and keeps the best k_blocks halves; after ceil(log2(n / k_blocks)) rounds every span is one key
block. The score of key block j for query block i is the exact block maximum

        score(i, j) = max over query rows r of block i and keys t of block j of  q_r . k_t

over the causally visible pairs (key position <= query position). A left half starts where its
parent started, so it inherits the parent's score: every round scores only the k_blocks right
halves, and the whole search scores (rounds + 1) * k_blocks key blocks per query block.

Sink keys and the keys every query of the block sees through its sliding window are not searched
(`sparse_attention` attends to them anyway): lo = sinks // block_k, and with `causal` the search
ends at the block holding key p_last - window (p_last the block's last query position).

Cost per query block: (rounds + 1) * k_blocks block scores of block_q x block_k x P, i.e. the
QK^T work of (rounds + 1) * k_blocks / 2 attention slots (attention does QK^T and PV); see
docs/kernels/sparse_attention.md for what that means next to dense attention. The scoring runs as
a Pallas kernel (pallas_gpu / pallas_tpu .score_blocks) or gathered in XLA; the span bookkeeping
and the top-k of every round are XLA ops on [B, H, nq, 2 k_blocks] arrays.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from pallas_kernels import dispatch, sharding
from pallas_kernels.dispatch import Implementation
from pallas_kernels.sparse_attention import api, common, pallas_gpu, pallas_tpu

ScoreFn = Callable[[jax.Array], jax.Array]


# ----------------------------------------------------------------------------- search core


def search_rounds(num_blocks: int, k_blocks: int) -> int:
    """Rounds after which every span of a search over <= num_blocks blocks is one block."""
    return math.ceil(math.log2(max(1, common.cdiv(num_blocks, k_blocks))))


def hip_search(score_fn: ScoreFn, lo: jax.Array, hi: jax.Array, *, k_blocks: int, num_blocks: int) -> jax.Array:
    """HiP's hierarchical top-k search over key blocks [lo, hi) (the core of prefill and decode).

    Args:
        score_fn: maps candidate key blocks int32 [..., C] (always in [0, num_blocks)) to their
            representative scores fp32 [..., C] (HiP: the exact block max of q . k).
        lo, hi: int32 [...] searchable block range of every row (hi >= lo).
        k_blocks: blocks kept per row.
        num_blocks: static bound on hi; sets the number of rounds (extra rounds change nothing:
            once every span is a single block a round keeps the same spans).

    Returns:
        int32 [..., k_blocks] selected key blocks in ascending order, -1 for unused slots (rows
        with fewer than k_blocks searchable blocks return all of them).
    """
    kk = k_blocks
    safe = lambda x: jnp.clip(x, 0, num_blocks - 1)
    # Initial spans: k_blocks spans evenly tiling [lo, hi) (sizes differ by at most one).
    n = (hi - lo)[..., None]
    edges = lo[..., None] + (jnp.arange(kk + 1, dtype=jnp.int32) * n) // kk  # [..., K+1]
    start, end = edges[..., :-1], edges[..., 1:]
    score = jnp.where(end > start, score_fn(safe(start)), -jnp.inf)
    for _ in range(search_rounds(num_blocks, kk)):
        # Split every span (the left half gets the extra block); only right halves are new.
        mid = start + (end - start + 1) // 2
        right = jnp.where(end > mid, score_fn(safe(mid)), -jnp.inf)
        left = jnp.where(mid > start, score, -jnp.inf)
        c_start = jnp.concatenate([start, mid], axis=-1)  # [..., 2K]
        c_end = jnp.concatenate([mid, end], axis=-1)
        c_score = jnp.concatenate([left, right], axis=-1)
        # Keep the best k_blocks halves.
        score, top = jax.lax.top_k(c_score, kk)
        start = jnp.take_along_axis(c_start, top, axis=-1)
        end = jnp.take_along_axis(c_end, top, axis=-1)
    big = jnp.int32(num_blocks + 1)
    blocks = jnp.sort(jnp.where(end > start, start, big), axis=-1)
    return jnp.where(blocks < big, blocks, -1).astype(jnp.int32)


def search_range(p_last, *, num_blocks: int, seq_k, block_k: int, window: int | None, sinks: int, causal: bool):
    """Searchable key blocks [lo, hi) of rows whose last query sits at `p_last` (int32 array).

    Sink-only blocks and the keys every query sees through its window are excluded; `seq_k` (int
    or int32 array) is the number of keys that exist.
    """
    lo = jnp.full(jnp.shape(p_last), sinks // block_k, jnp.int32)
    if causal:
        key_end = p_last + 1 if window is None else p_last - window + 1
        key_end = jnp.clip(key_end, 0, seq_k)
        hi = jnp.minimum((key_end + block_k - 1) // block_k, num_blocks)
    else:
        hi = jnp.full(jnp.shape(p_last), num_blocks, jnp.int32)
    return lo, jnp.maximum(hi, lo).astype(jnp.int32)


# ----------------------------------------------------------------------------- prefill


def score_blocks_xla(q, k, cand, cfg: common.Config):
    """Exact block-max scores in XLA (gathered key blocks): fp32 [B, H, nq, C].

    q [B, Tq, H, P], k [B, Tk, K, P], cand int32 [B, H, nq, C] in-range key blocks.
    """
    b, _, h, p = q.shape
    kv_heads = k.shape[2]
    nq, nk, bq, bk = cfg.nq, cfg.nk, cfg.block_q, cfg.block_k
    qb = common.to_head_major(q.astype(jnp.float32), nq * bq).reshape(b, h, nq, bq, p)
    kb = common.to_head_major(k.astype(jnp.float32), nk * bk).reshape(b, kv_heads, nk, bk, p)
    b_idx = jnp.arange(b)[:, None, None, None]
    kh = common.kv_head_index(h, kv_heads)[None, :, None, None]
    kg = kb[b_idx, kh, cand]  # [B, H, nq, C, bk, P]
    s = jnp.einsum("bhqrp,bhqckp->bhqcrk", qb, kg)  # [B, H, nq, C, bq, bk]
    rows = jnp.arange(nq * bq, dtype=jnp.int32).reshape(nq, bq)  # [nq, bq]
    qpos = (rows + cfg.offset)[None, None, :, None, :, None]
    kpos = (cand[..., None] * bk + jnp.arange(bk, dtype=jnp.int32))[..., None, :]
    ok = (rows < cfg.seq_q)[None, None, :, None, :, None] & (kpos < cfg.seq_k)
    if cfg.causal:
        ok = ok & (kpos <= qpos)
    return jnp.max(jnp.where(ok, s, -jnp.inf), axis=(-2, -1))


def hip_block_indices(
    q: Float[Array, "B Tq H P"],
    k: Float[Array, "B Tk K P"],
    *,
    k_blocks: int,
    block_q: int = 64,
    block_k: int = 64,
    window: int | None = None,
    sinks: int = 0,
    causal: bool = True,
    implementation: Implementation = "auto",
    interpret=None,
    backend: api.Backend | None = None,
) -> Int[Array, "B H nq k_blocks"]:
    """Estimates the top-`k_blocks` key blocks of every query block by HiP's hierarchical search.

    Args:
        q: [B, Tq, H, P] queries (scored at their dtype with fp32 accumulation; fp32 in "xla").
        k: [B, Tk, K, P] keys; K divides H.
        k_blocks: key blocks kept per query block.
        block_q, block_k: the block sizes later passed to `sparse_attention`.
        window, sinks, causal: the same pattern options as `sparse_attention`; they set the search
            range (window and sink keys are attended anyway and are not searched).
        implementation: how the block scores are computed: "pallas" (the scoring kernel of the
            backend), "xla" / "reference" (gathered in XLA), "auto" (pallas on TPU/GPU).
        interpret, backend: as in `sparse_attention`.

    Returns:
        int32 [B, H, ceil(Tq/block_q), k_blocks] key block ids in ascending order, -1 for unused
        slots (when fewer than k_blocks blocks are searchable). Feed to
        `sparse_attention(block_indices=...)`.
    """
    if not isinstance(k_blocks, int) or k_blocks < 1:
        raise ValueError(f"k_blocks={k_blocks!r} must be an int >= 1.")
    cfg, _, _ = common.validate(
        q, k, k, None, None, causal=causal, window=window, sinks=sinks, block_q=block_q, block_k=block_k, sm_scale=None
    )
    impl = dispatch.resolve(implementation)
    interpret = dispatch.resolve_interpret(impl, interpret)
    # The block ids are piecewise constant in q and k: no gradient flows through the search, and
    # JAX must not try to differentiate the scoring kernel (it cannot) when the caller is.
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    search = functools.partial(_search_local, cfg=cfg, k_blocks=k_blocks, window=window, sinks=sinks, causal=causal)
    if impl != "pallas":
        return search(q, k, lambda q_, k_, cand: score_blocks_xla(q_, k_, cand, cfg))
    kb = api.kernel_backend(interpret, backend)
    api._check_tiles(kb, interpret, block_q, block_k)  # pylint: disable=protected-access
    kernel = pallas_gpu.score_blocks if kb == "gpu" else pallas_tpu.score_blocks
    score = lambda q_, k_, cand: kernel(q_, k_, cand, cfg, interpret=interpret)  # noqa: E731
    # Under a mesh the search (its scoring kernel included) runs on per-device blocks.
    return sharding.shard_map_kernel(
        lambda q_, k_: search(q_, k_, score),
        (q, k),
        (("batch", None, "heads", None), ("batch", None, "groups", None)),
        ("batch", "heads", None, None),
    )


def _search_local(q, k, score, *, cfg: common.Config, k_blocks: int, window, sinks: int, causal: bool):
    """`hip_block_indices` on one device's blocks; `score(q, k, cand)` scores candidate blocks."""
    b, _, h, _ = q.shape
    block_k = cfg.block_k
    score_fn = lambda cand: score(q, k, cand)  # noqa: E731
    _, p_last = common.query_block_positions(cfg)
    lo, hi = search_range(
        p_last, num_blocks=cfg.nk, seq_k=cfg.seq_k, block_k=block_k, window=window, sinks=sinks, causal=causal
    )
    shape = (b, h, cfg.nq)
    return hip_search(
        score_fn, jnp.broadcast_to(lo, shape), jnp.broadcast_to(hi, shape), k_blocks=k_blocks, num_blocks=cfg.nk
    )


# ----------------------------------------------------------------------------- decoding


def hip_decode_block_indices(
    q: Float[Array, "B H P"],
    k_cache: Float[Array, "B S K P"],
    pos: jax.Array | int,  # int32 [] or [B]
    *,
    k_blocks: int,
    block_k: int = 64,
    window: int | None = None,
    sinks: int = 0,
) -> Int[Array, "B H k_blocks"]:
    """HiP's search for one decoding step: one query per head at position `pos` over a KV cache
    whose valid prefix is keys 0..pos (static shapes, jittable; `pos` may be traced).

    Returns exactly the blocks `hip_block_indices` returns for that query with block_q = 1 (the
    same search core and scores; scored in fp32 with XLA gathers of the candidate blocks: a
    step touches (rounds + 1) * k_blocks * block_k keys per head).

    Args:
        q: [B, H, P] the query of every head.
        k_cache: [B, S, K, P] keys; slots past `pos` are ignored.
        pos: int32 scalar or [B]: position of the query (its key is already in the cache).
        k_blocks, block_k, window, sinks: as in `hip_block_indices` (causal).

    Returns:
        int32 [B, H, k_blocks] ascending key block ids, -1 for unused slots.
    """
    if not isinstance(k_blocks, int) or k_blocks < 1:
        raise ValueError(f"k_blocks={k_blocks!r} must be an int >= 1.")
    if (
        q.ndim != 3
        or k_cache.ndim != 4
        or q.shape[0] != k_cache.shape[0]
        or q.shape[2] != k_cache.shape[3]
        or q.shape[1] % k_cache.shape[2]
    ):
        raise ValueError(
            f"q.shape={q.shape} must be [B, H, P] and k_cache.shape={k_cache.shape} [B, S, K, P] with K dividing H."
        )
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be None or an int >= 1.")
    b, h, p = q.shape
    slots, kv_heads = k_cache.shape[1], k_cache.shape[2]
    nk = common.cdiv(slots, block_k)
    pos = jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (b,))
    kc = jnp.pad(k_cache.astype(jnp.float32), ((0, 0), (0, nk * block_k - slots), (0, 0), (0, 0)))
    kc = jnp.swapaxes(kc.reshape(b, nk, block_k, kv_heads, p), 1, 3)  # [B, K, bk, nk, P]
    kh = common.kv_head_index(h, kv_heads)[None, :, None]
    b_idx = jnp.arange(b)[:, None, None]
    qf = q.astype(jnp.float32)

    def score_fn(cand):  # [B, H, C] -> [B, H, C]
        kg = kc[b_idx, kh, :, cand]  # [B, H, C, bk, P]
        s = jnp.einsum("bhp,bhckp->bhck", qf, kg)
        kpos = cand[..., None] * block_k + jnp.arange(block_k, dtype=jnp.int32)
        ok = (kpos <= pos[:, None, None, None]) & (kpos < slots)
        return jnp.max(jnp.where(ok, s, -jnp.inf), axis=-1)

    lo, hi = search_range(
        pos, num_blocks=nk, seq_k=jnp.minimum(pos + 1, slots), block_k=block_k, window=window, sinks=sinks, causal=True
    )
    shape = (b, h)
    return hip_search(
        score_fn,
        jnp.broadcast_to(lo[:, None], shape),
        jnp.broadcast_to(hi[:, None], shape),
        k_blocks=k_blocks,
        num_blocks=nk,
    )


# ----------------------------------------------------------------------------- recall


def exact_block_scores(q, k, *, block_q: int, block_k: int, causal: bool = True, chunk: int = 8):
    """The exact block-max score of every (query block, key block): fp32 [B, H, nq, nk]
    (-inf where no pair is visible). Dense O(Tq * Tk * P) work, `chunk` query blocks at a time;
    for measuring the search's recall."""
    cfg, _, _ = common.validate(
        q, k, k, None, None, causal=causal, window=None, sinks=0, block_q=block_q, block_k=block_k, sm_scale=None
    )
    b, _, h, p = q.shape
    nq, nk, bq, bk = cfg.nq, cfg.nk, cfg.block_q, cfg.block_k
    nc = common.cdiv(nq, chunk)
    qh = common.to_head_major(q.astype(jnp.float32), nc * chunk * bq)
    qh = jnp.moveaxis(qh.reshape(b, h, nc, chunk, bq, p), 2, 0)  # [nc, B, H, chunk, bq, P]
    kh = common.to_head_major(k.astype(jnp.float32), nk * bk)
    kh = kh[:, common.kv_head_index(h, k.shape[2])]  # [B, H, nk*bk, P]
    kpos = jnp.arange(nk * bk, dtype=jnp.int32)

    def one(args):
        c, qc = args  # chunk index, [B, H, chunk, bq, P]
        s = jnp.einsum("bhcrp,bhtp->bhcrt", qc, kh)  # [B, H, chunk, bq, nk*bk]
        rows = (c * chunk + jnp.arange(chunk))[:, None] * bq + jnp.arange(bq)  # [chunk, bq]
        ok = (rows < cfg.seq_q)[..., None] & (kpos < cfg.seq_k)
        if causal:
            ok = ok & (kpos <= (rows + cfg.offset)[..., None])
        s = jnp.where(ok, s, -jnp.inf).reshape(b, h, chunk, bq, nk, bk)
        return jnp.max(s, axis=(3, 5))  # [B, H, chunk, nk]

    out = jax.lax.map(one, (jnp.arange(nc), qh))  # [nc, B, H, chunk, nk]
    return jnp.moveaxis(out, 0, 2).reshape(b, h, nc * chunk, nk)[:, :, :nq]


def exact_top_blocks(
    scores,
    *,
    k_blocks: int,
    block_q: int,
    block_k: int,
    seq_q: int,
    seq_k: int,
    window: int | None = None,
    sinks: int = 0,
    causal: bool = True,
):
    """The exact top-k_blocks key blocks per query block within HiP's searchable range.

    Args:
        scores: fp32 [B, H, nq, nk] from `exact_block_scores`.

    Returns:
        (blocks int32 [B, H, nq, k_blocks] (-1 past the searchable count), n_search int32 [nq]).
    """
    nk = scores.shape[3]
    cfg = common.Config(
        seq_q=seq_q,
        seq_k=seq_k,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        window=window,
        sinks=sinks,
        sm_scale=1.0,
        dense=False,
    )
    _, p_last = common.query_block_positions(cfg)
    lo, hi = search_range(
        p_last, num_blocks=nk, seq_k=seq_k, block_k=block_k, window=window, sinks=sinks, causal=causal
    )
    j = jnp.arange(nk)
    inside = (j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None])  # [nq, nk]
    masked = jnp.where(inside, scores, -jnp.inf)
    kk = min(k_blocks, nk)
    _, top = jax.lax.top_k(masked, kk)
    top = jnp.where(jnp.arange(kk) < (hi - lo)[:, None], top, -1)
    return top.astype(jnp.int32), (hi - lo).astype(jnp.int32)


def block_recall(found, exact, n_search, k_blocks: int) -> float:
    """Fraction of the exact top-k blocks that the search found, over the query blocks with more
    than k_blocks searchable blocks (where the search has a choice). NaN if there are none."""
    found, exact = np.asarray(found), np.asarray(exact)
    rows = np.asarray(n_search) > k_blocks  # [nq]
    if not rows.any():
        return float("nan")
    f, e = found[:, :, rows], exact[:, :, rows]
    hit = (e[..., :, None] == f[..., None, :]).any(-1) & (e >= 0)
    return float(hit.sum() / (e >= 0).sum())


def locality_inputs(
    key,
    *,
    batch: int,
    seq: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    length_scale: float,
    noise: float = 0.3,
    dtype=jnp.float32,
):
    """Queries and keys with attention locality: smooth random processes in time.

    Every channel of q and k is a stationary Gaussian process with a squared-exponential
    covariance of `length_scale` tokens (64 random Fourier features, Rahimi & Recht 2007) plus
    white noise of relative scale `noise`, so q_i . k_j varies smoothly with the key position j
    (HiP's premise: nearby keys have similar scores). length_scale=0 gives white noise (no
    locality).

    Returns:
        q [B, T, H, P], k [B, T, K, P] in `dtype`, unit variance per channel.
    """
    kq, kk_, nq_, nk_ = jax.random.split(key, 4)
    t = jnp.arange(seq, dtype=jnp.float32)

    def smooth(key, n):
        if length_scale <= 0:
            return jax.random.normal(key, (batch, seq, n, head_dim))
        kw, kp, ka = jax.random.split(key, 3)
        feats = 64
        w = jax.random.normal(kw, (batch, feats)) / length_scale  # frequencies
        phase = jax.random.uniform(kp, (batch, feats), maxval=2 * jnp.pi)
        basis = jnp.cos(t[None, :, None] * w[:, None, :] + phase[:, None, :])  # [B, T, F]
        amp = jax.random.normal(ka, (batch, feats, n * head_dim)) * jnp.sqrt(2.0 / feats)
        return jnp.einsum("btf,bfc->btc", basis, amp).reshape(batch, seq, n, head_dim)

    def mix(key_s, key_n, n):
        x = smooth(key_s, n)
        if length_scale > 0:
            x = x + noise * jax.random.normal(key_n, x.shape)
        return (x / jnp.sqrt(1.0 + noise**2 * (length_scale > 0))).astype(dtype)

    return mix(kq, nq_, heads), mix(kk_, nk_, kv_heads)


__all__ = [
    "block_recall",
    "exact_block_scores",
    "exact_top_blocks",
    "hip_block_indices",
    "hip_decode_block_indices",
    "hip_search",
    "locality_inputs",
    "score_blocks_xla",
    "search_range",
    "search_rounds",
]
