"""HiP hierarchical top-k key-block search (Lee et al., "A Training-Free Sub-quadratic Cost
Transformer Model Serving Framework With Hierarchically Pruned Attention", ICLR 2025, Sec. 3.1 and
Algorithm 1), for prefill (`hip_block_indices`) and decoding (`hip_decode_block_indices`), both on
one search core (`hip_search`).

Written from the paper's algorithm description (HiP's code is under a non-commercial licence).
For every query block, k_blocks spans evenly tile the searchable key blocks [lo, hi); each round
splits every span into two branches, scores each branch and keeps the best k_blocks branches;
after ceil(log2(n / k_blocks)) rounds every branch is one key block. Two scorings:

* "representative" (the paper's, the default): a branch is scored by its representative, the
  b_k (`rep_keys`, default 2) keys at the centre of the branch, against the query block's rows
  sampled with stride b_sq (`query_stride`, default 2; rows 0, b_sq, 2 b_sq, ...):

        score(i, branch) = max over sampled rows r of block i and the b_k centre keys t of  q_r . k_t

  Both branches of every span are scored each round: 2 k_blocks scores of
  ceil(block_q / b_sq) x b_k x P per query block and round.
* "block_max": a branch is scored by the exact maximum of q . k over the full block_q x block_k
  tile of its first key block. A left branch starts where its parent started and inherits its
  score, so every round scores only the k_blocks right branches: (rounds + 1) * k_blocks tile
  scores per query block, the QK^T work of (rounds + 1) * k_blocks / 2 attention slots.

Pairs that are not causally visible (key position > query position) or do not exist are left out
of either maximum. Sink keys and the keys every query of the block sees through its sliding window
are not searched (`sparse_attention` attends to them anyway): lo = sinks // block_k, and with
`causal` the search ends at the block holding key p_last - window (p_last the block's last query
position). docs/kernels/sparse_attention.md counts what both scorings cost next to dense attention.

Scores are computed by a Pallas kernel (pallas_gpu / pallas_tpu .score_blocks and
.score_representatives), by XLA gathers ("xla"), or read off the dense q k^T matrix
("reference", the obvious definition; small inputs only). The span bookkeeping and the top-k of
every round are XLA ops on [B, H, nq, 2 k_blocks] arrays.
"""

from __future__ import annotations

import dataclasses
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

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]
SCORINGS = ("representative", "block_max")
_NEVER = jnp.iinfo(jnp.int32).max  # the position of a key that does not exist
_ALL = 1 << 30  # the key limit of a row that sees every existing key (non-causal)


# ----------------------------------------------------------------------------- search core


def search_rounds(num_blocks: int, k_blocks: int) -> int:
    """Rounds after which every span of a search over <= num_blocks blocks is one block."""
    return math.ceil(math.log2(max(1, common.cdiv(num_blocks, k_blocks))))


def check_scoring(scoring: str, rep_keys: int, query_stride: int, block_k: int) -> None:
    """Raises ValueError for a scoring name or representative size the search cannot use."""
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r} is not one of {SCORINGS}.")
    if not isinstance(rep_keys, int) or not 1 <= rep_keys <= block_k:
        raise ValueError(f"rep_keys={rep_keys!r} must be an int in [1, block_k={block_k}].")
    if not isinstance(query_stride, int) or query_stride < 1:
        raise ValueError(f"query_stride={query_stride!r} must be an int >= 1.")


def hip_search(
    score_fn: ScoreFn,
    lo: jax.Array,
    hi: jax.Array,
    *,
    k_blocks: int,
    num_blocks: int,
    scoring: str = "representative",
) -> jax.Array:
    """HiP's hierarchical top-k search over key blocks [lo, hi) (the core of prefill and decode).

    Args:
        score_fn: maps candidate branches, int32 [..., C] spans [start, end) of key blocks with
            0 <= start < end <= num_blocks, to their scores fp32 [..., C] (see the module
            docstring; "block_max" score functions may read `start` only).
        lo, hi: int32 [...] searchable block range of every row (hi >= lo).
        k_blocks: blocks kept per row.
        num_blocks: static bound on hi; sets the number of rounds (extra rounds change nothing:
            once every span is a single block a round keeps the same spans).
        scoring: "representative" scores both branches of every span each round; "block_max"
            scores only right branches (a left branch inherits its parent's first block).

    Returns:
        int32 [..., k_blocks] selected key blocks in ascending order, -1 for unused slots (rows
        with fewer than k_blocks searchable blocks return all of them).
    """
    if scoring not in SCORINGS:
        raise ValueError(f"scoring={scoring!r} is not one of {SCORINGS}.")
    kk = k_blocks

    def scores(start, end):  # -inf for empty branches; score_fn only sees non-empty in-range spans
        s = jnp.clip(start, 0, num_blocks - 1)
        return jnp.where(end > start, score_fn(s, jnp.clip(end, s + 1, num_blocks)), -jnp.inf)

    # Initial spans: k_blocks spans evenly tiling [lo, hi) (sizes differ by at most one).
    n = (hi - lo)[..., None]
    edges = lo[..., None] + (jnp.arange(kk + 1, dtype=jnp.int32) * n) // kk  # [..., K+1]
    start, end = edges[..., :-1], edges[..., 1:]
    inherit = scoring == "block_max"
    score = scores(start, end) if inherit else None
    for _ in range(search_rounds(num_blocks, kk)):
        # Split every span into two branches (the left one gets the extra block).
        mid = start + (end - start + 1) // 2
        c_start = jnp.concatenate([start, mid], axis=-1)  # [..., 2K]
        c_end = jnp.concatenate([mid, end], axis=-1)
        if inherit:
            left = jnp.where(mid > start, score, -jnp.inf)
            c_score = jnp.concatenate([left, scores(mid, end)], axis=-1)
        else:
            c_score = scores(c_start, c_end)
        # Keep the best k_blocks branches.
        score, top = jax.lax.top_k(c_score, kk)
        start = jnp.take_along_axis(c_start, top, axis=-1)
        end = jnp.take_along_axis(c_end, top, axis=-1)
    big = jnp.int32(num_blocks + 1)
    blocks = jnp.sort(jnp.where(end > start, start, big), axis=-1)
    return jnp.where(blocks < big, blocks, -1).astype(jnp.int32)


def representative_keys(start, end, *, block_k: int, rep_keys: int):
    """Key positions int32 [..., C, rep_keys] of the representatives of branches [start, end)
    (in key blocks): the rep_keys keys centred on the branch's centre key (start + end) * block_k / 2."""
    centre = (start + end) * block_k // 2
    return centre[..., None] - rep_keys // 2 + jnp.arange(rep_keys, dtype=jnp.int32)


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


def sampled_rows(cfg: common.Config, query_stride: int):
    """Rows 0, b_sq, 2 b_sq, ... of every query block: (row index int32 [nq, R], key limit int32
    [nq, R]: the largest key position the row may see, -1 for rows past Tq)."""
    rows = jnp.arange(cfg.nq, dtype=jnp.int32)[:, None] * cfg.block_q
    rows = rows + jnp.arange(0, cfg.block_q, query_stride, dtype=jnp.int32)  # [nq, R]
    limit = rows + cfg.offset if cfg.causal else jnp.full_like(rows, _ALL)
    return rows, jnp.where(rows < cfg.seq_q, limit, -1)


def representative_inputs(q, k, start, end, cfg: common.Config, *, rep_keys: int, query_stride: int):
    """What the representative scoring reads: sampled query rows qs [B, H, nq, R, P], the keys
    reps [B, H, nq, b_k, C, P] of every candidate's representative, the rows' key limits qlim
    int32 [nq, R] and the keys' positions kpos int32 [B, H, nq, b_k, C] (int32 max past Tk)."""
    b, _, h, p = q.shape
    kv_heads = k.shape[2]
    rows, qlim = sampled_rows(cfg, query_stride)
    qh = common.to_head_major(q, cfg.nq * cfg.block_q)  # [B, H, nq*bq, P]
    qs = qh[:, :, rows]  # [B, H, nq, R, P]
    pos = jnp.moveaxis(representative_keys(start, end, block_k=cfg.block_k, rep_keys=rep_keys), -1, -2)
    kh = common.to_head_major(k, cfg.nk * cfg.block_k)  # [B, K, nk*bk, P]
    b_idx = jnp.arange(b)[:, None, None, None, None]
    kv_idx = common.kv_head_index(h, kv_heads)[None, :, None, None, None]
    reps = kh[b_idx, kv_idx, jnp.clip(pos, 0, cfg.nk * cfg.block_k - 1)]  # [B, H, nq, b_k, C, P]
    kpos = jnp.where((pos >= 0) & (pos < cfg.seq_k), pos, _NEVER)
    return qs, reps, qlim, kpos


def score_representatives_xla(qs, reps, qlim, kpos):
    """Representative scores in XLA: the max over rows and representative keys of the allowed
    q . k, fp32 [..., C] (-inf where nothing is allowed). Shapes as in `representative_inputs`
    (qlim broadcasts against [..., R])."""
    s = jnp.einsum("...rp,...jcp->...rjc", qs.astype(jnp.float32), reps.astype(jnp.float32))
    ok = kpos[..., None, :, :] <= qlim[..., :, None, None]
    return jnp.max(jnp.where(ok, s, -jnp.inf), axis=(-3, -2))


def dense_scores(q, k, cfg: common.Config):
    """The reference's q k^T: fp32 [B, H, nq * bq, nk * bk], -inf on pairs that are not allowed
    (rows past Tq, keys past Tk, and key position > query position when causal)."""
    h = q.shape[2]
    qh = common.to_head_major(q.astype(jnp.float32), cfg.nq * cfg.block_q)
    kh = common.to_head_major(k.astype(jnp.float32), cfg.nk * cfg.block_k)[:, common.kv_head_index(h, k.shape[2])]
    s = jnp.einsum("bhqp,bhkp->bhqk", qh, kh)
    rows = jnp.arange(cfg.nq * cfg.block_q, dtype=jnp.int32)[:, None]
    keys = jnp.arange(cfg.nk * cfg.block_k, dtype=jnp.int32)[None, :]
    ok = (rows < cfg.seq_q) & (keys < cfg.seq_k)
    if cfg.causal:
        ok = ok & (keys <= rows + cfg.offset)
    return jnp.where(ok, s, -jnp.inf)


def score_reference(q, k, start, end, cfg: common.Config, *, scoring: str, rep_keys: int, query_stride: int):
    """Branch scores read off the dense q k^T (`dense_scores`): fp32 [B, H, nq, C]."""
    s = dense_scores(q, k, cfg)
    b, h = s.shape[:2]
    nq, nk, bq, bk = cfg.nq, cfg.nk, cfg.block_q, cfg.block_k
    if scoring == "block_max":
        tiles = jnp.max(s.reshape(b, h, nq, bq, nk, bk), axis=(3, 5))  # [B, H, nq, nk]
        return jnp.take_along_axis(tiles, start, axis=-1)
    rows, _ = sampled_rows(cfg, query_stride)
    s_rows = s.reshape(b, h, nq * bq, nk * bk)[:, :, rows]  # [B, H, nq, R, nk*bk]
    pos = representative_keys(start, end, block_k=bk, rep_keys=rep_keys)  # [B, H, nq, C, b_k]
    c = pos.shape[-2]
    cols = jnp.clip(pos, 0, nk * bk - 1).reshape(b, h, nq, 1, c * rep_keys)
    g = jnp.take_along_axis(s_rows, jnp.broadcast_to(cols, s_rows.shape[:-1] + cols.shape[-1:]), axis=-1)
    g = jnp.where((pos >= 0).reshape(cols.shape), g, -jnp.inf)
    return jnp.max(g.reshape(b, h, nq, -1, c, rep_keys), axis=(3, 5))


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
    scoring: str = "representative",
    rep_keys: int = 2,
    query_stride: int = 2,
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
        scoring: "representative" (the paper's Algorithm 1: the `rep_keys` keys at a branch's
            centre against every `query_stride`-th query row) or "block_max" (the exact max over
            the full tile of the branch's first key block; `rep_keys` and `query_stride` unused).
        rep_keys: b_k, keys in a branch's representative (1 <= rep_keys <= block_k).
        query_stride: b_sq, the stride of the query rows a representative is scored against.
        implementation: how the scores are computed: "pallas" (the scoring kernels of the
            backend), "xla" (gathered in XLA), "reference" (read off the dense q k^T; small
            inputs only), "auto" (pallas on TPU/GPU, xla elsewhere).
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
    check_scoring(scoring, rep_keys, query_stride, block_k)
    impl = dispatch.resolve(implementation)
    interpret = dispatch.resolve_interpret(impl, interpret)
    # The block ids are piecewise constant in q and k: no gradient flows through the search, and
    # JAX must not try to differentiate the scoring kernel (it cannot) when the caller is.
    q, k = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k)
    rep = {"rep_keys": rep_keys, "query_stride": query_stride}
    search = functools.partial(
        _search_local, cfg=cfg, k_blocks=k_blocks, window=window, sinks=sinks, causal=causal, scoring=scoring
    )
    if impl == "reference":
        return search(q, k, lambda q_, k_, s, e: score_reference(q_, k_, s, e, cfg, scoring=scoring, **rep))
    if impl == "xla":
        if scoring == "block_max":
            return search(q, k, lambda q_, k_, s, e: score_blocks_xla(q_, k_, s, cfg))
        return search(
            q, k, lambda q_, k_, s, e: score_representatives_xla(*representative_inputs(q_, k_, s, e, cfg, **rep))
        )
    kb = api.kernel_backend(interpret, backend)
    api._check_tiles(kb, interpret, block_q, block_k)  # pylint: disable=protected-access
    mod = pallas_gpu if kb == "gpu" else pallas_tpu
    if scoring == "block_max":
        score = lambda q_, k_, s, e: mod.score_blocks(q_, k_, s, cfg, interpret=interpret)  # noqa: E731
    else:
        score = lambda q_, k_, s, e: mod.score_representatives(  # noqa: E731
            *representative_inputs(q_, k_, s, e, cfg, **rep), interpret=interpret
        )
    # Under a mesh the search (its scoring kernel included) runs on per-device blocks.
    return sharding.shard_map_kernel(
        lambda q_, k_: search(q_, k_, score),
        (q, k),
        (("batch", None, "heads", None), ("batch", None, "groups", None)),
        ("batch", "heads", None, None),
    )


def _search_local(q, k, score, *, cfg: common.Config, k_blocks: int, window, sinks: int, causal: bool, scoring: str):
    """`hip_block_indices` on one device's blocks; `score(q, k, start, end)` scores branches."""
    b, _, h, _ = q.shape
    block_k = cfg.block_k
    score_fn = lambda start, end: score(q, k, start, end)  # noqa: E731
    _, p_last = common.query_block_positions(cfg)
    lo, hi = search_range(
        p_last, num_blocks=cfg.nk, seq_k=cfg.seq_k, block_k=block_k, window=window, sinks=sinks, causal=causal
    )
    shape = (b, h, cfg.nq)
    return hip_search(
        score_fn,
        jnp.broadcast_to(lo, shape),
        jnp.broadcast_to(hi, shape),
        k_blocks=k_blocks,
        num_blocks=cfg.nk,
        scoring=scoring,
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
    scoring: str = "representative",
    rep_keys: int = 2,
) -> Int[Array, "B H k_blocks"]:
    """HiP's search for one decoding step: one query per head at position `pos` over a KV cache
    whose valid prefix is keys 0..pos (static shapes, jittable; `pos` may be traced).

    Returns exactly the blocks `hip_block_indices` returns for that query with block_q = 1 (the
    same search core and scores; scored in fp32 with XLA gathers: a step reads 2 * rounds *
    k_blocks * rep_keys keys per head with the representative scoring, (rounds + 1) * k_blocks *
    block_k with "block_max").

    Args:
        q: [B, H, P] the query of every head.
        k_cache: [B, S, K, P] keys; slots past `pos` are ignored.
        pos: int32 scalar or [B]: position of the query (its key is already in the cache).
        k_blocks, block_k, window, sinks, scoring, rep_keys: as in `hip_block_indices` (causal;
            a one-row query block has no stride to sample).

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
    check_scoring(scoring, rep_keys, 1, block_k)
    b, h, p = q.shape
    slots, kv_heads = k_cache.shape[1], k_cache.shape[2]
    nk = common.cdiv(slots, block_k)
    pos = jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (b,))
    kc = jnp.pad(k_cache.astype(jnp.float32), ((0, 0), (0, nk * block_k - slots), (0, 0), (0, 0)))
    kc = jnp.swapaxes(kc, 1, 2)  # [B, K, nk*bk, P]
    kh = common.kv_head_index(h, kv_heads)[None, :, None]
    b_idx = jnp.arange(b)[:, None, None]
    qf = q.astype(jnp.float32)

    if scoring == "block_max":

        def score_fn(start, end):  # [B, H, C] -> [B, H, C]
            del end
            kpos = start[..., None] * block_k + jnp.arange(block_k, dtype=jnp.int32)  # [B, H, C, bk]
            s = jnp.einsum("bhp,bhckp->bhck", qf, kc[b_idx[..., None], kh[..., None], kpos])
            ok = (kpos <= pos[:, None, None, None]) & (kpos < slots)
            return jnp.max(jnp.where(ok, s, -jnp.inf), axis=-1)

    else:

        def score_fn(start, end):  # [B, H, C] -> [B, H, C]
            kpos = representative_keys(start, end, block_k=block_k, rep_keys=rep_keys)  # [B, H, C, b_k]
            reps = kc[b_idx[..., None], kh[..., None], jnp.clip(kpos, 0, nk * block_k - 1)]
            kpos = jnp.where((kpos >= 0) & (kpos < slots), kpos, _NEVER)
            return score_representatives_xla(
                qf[:, :, None, :], jnp.swapaxes(reps, -2, -3), pos[:, None, None], jnp.swapaxes(kpos, -1, -2)
            )

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
        scoring=scoring,
    )


# ----------------------------------------------------------------------------- cost


def matmul_flops(
    t: int,
    *,
    k_blocks: int,
    block_q: int,
    block_k: int,
    window: int | None,
    sinks: int,
    scoring: str = "representative",
    rep_keys: int = 2,
    query_stride: int = 2,
    head_dim: int = 128,
) -> dict[str, float]:
    """Matmul FLOPs per head of causal self-attention over t tokens: dense, and HiP's search and
    block-sparse attention (analytic counts, no run).

    Dense visits the causally visible key blocks; HiP visits the window / sink blocks of its
    pattern plus min(k_blocks, searchable) listed blocks (counted apart from them: an upper bound).
    A visited block costs two block_q x block_k x P matmuls (QK^T, PV). The search runs
    `search_rounds(nk, k_blocks)` rounds per query block; a round scores k_blocks tiles of
    block_q x block_k ("block_max", plus k_blocks initial scores) or 2 k_blocks representatives of
    ceil(block_q / query_stride) rows x rep_keys keys ("representative"), one QK^T each.

    Returns:
        {"dense", "attention", "search"} FLOPs (2 per multiply-add).
    """
    cfg = common.Config(
        seq_q=t,
        seq_k=t,
        block_q=block_q,
        block_k=block_k,
        causal=True,
        window=window,
        sinks=sinks,
        sm_scale=1.0,
        dense=False,
    )
    _, p_last = common.query_block_positions(cfg)
    lo, hi = search_range(p_last, num_blocks=cfg.nk, seq_k=t, block_k=block_k, window=window, sinks=sinks, causal=True)
    listed = np.minimum(np.asarray(hi - lo), k_blocks)
    pattern = np.asarray(common.slot_table(None, cfg, 1, 1).n_valid[0, 0])  # window + sink blocks
    rounds = search_rounds(cfg.nk, k_blocks)
    tile = 2.0 * block_q * block_k * head_dim  # one block_q x block_k x P matmul
    if scoring == "block_max":
        search = (rounds + 1) * k_blocks * tile
    else:
        rows = -(-block_q // query_stride)
        search = rounds * 2 * k_blocks * 2.0 * rows * rep_keys * head_dim
    dense = dataclasses.replace(cfg, window=None, sinks=0, dense=True)
    return {
        "dense": 2 * tile * common.visited_pairs(dense, None),
        "attention": 2 * tile * float(np.sum(listed + pattern)),
        "search": float(search * cfg.nq),
    }


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
    "SCORINGS",
    "block_recall",
    "exact_block_scores",
    "exact_top_blocks",
    "hip_block_indices",
    "hip_decode_block_indices",
    "hip_search",
    "locality_inputs",
    "matmul_flops",
    "representative_keys",
    "score_blocks_xla",
    "score_representatives_xla",
    "search_range",
    "search_rounds",
]
