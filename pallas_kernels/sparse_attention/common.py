"""Shared pieces of the sparse attention op: validation, the visibility rule and the slot table.

Notation: B batch, Tq / Tk query / key length, H query heads, Hk key/value heads (H % Hk == 0,
G = H // Hk query heads per key head), D head dim, bq / bk query / key block, nq = ceil(Tq/bq),
nk = ceil(Tk/bk), K listed blocks per query block, S slots (listed + window + sink blocks).

Query i sits at absolute position p_i = i + (Tk - Tq) (queries aligned to the end of the keys).
Key j is visible to query i iff

        (j in a listed block of i's query block  or  p_i - window < j <= p_i  or  j < sinks)
        and (j <= p_i if causal) and (seg_q[i] == seg_k[j]) and j < Tk.

With no listed blocks and no window every key is "listed" (dense attention).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

NEG_INF = -1e30  # finite "minus infinity" for masked scores (no inf - inf = NaN)
LSE_EMPTY = 1e30  # log-sum-exp stored for rows that see nothing: exp(s - LSE_EMPTY) == 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static (hashable) description of one sparse attention call."""

    seq_q: int
    seq_k: int
    block_q: int
    block_k: int
    causal: bool
    window: int | None
    sinks: int
    sm_scale: float
    dense: bool  # no block_indices and no window: every key block is listed

    @property
    def offset(self) -> int:
        return self.seq_k - self.seq_q

    @property
    def nq(self) -> int:
        return cdiv(self.seq_q, self.block_q)

    @property
    def nk(self) -> int:
        return cdiv(self.seq_k, self.block_k)


def visible(qpos, kpos, listed, cfg: Config):
    """The visibility rule of the module docstring on broadcastable position arrays.

    Args:
        qpos: int32 absolute query positions, e.g. [..., bq, 1].
        kpos: int32 key positions, e.g. [..., 1, bk].
        listed: bool, broadcastable: the key lies in a listed block of the query's block.
        cfg: the static configuration.

    Returns:
        bool mask, the broadcast shape of the inputs (without the segment test).
    """
    vis = listed
    if cfg.window is not None:
        vis = vis | ((kpos > qpos - cfg.window) & (kpos <= qpos))
    if cfg.sinks:
        vis = vis | (kpos < cfg.sinks)
    if cfg.causal:
        vis = vis & (kpos <= qpos)
    return vis & (kpos < cfg.seq_k)


def validate(q, k, v, block_indices, segment_ids, *, causal, window, sinks, block_q, block_k,
             sm_scale):
    """Checks shapes and options at the API boundary; returns (Config, q_seg, k_seg)."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim]; got q.shape={q.shape}, "
                         f"k.shape={k.shape}, v.shape={v.shape}.")
    b, tq, h, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k.shape={k.shape} must equal v.shape={v.shape}.")
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k.shape={k.shape} must match q.shape={q.shape} in batch and head_dim.")
    hk = k.shape[2]
    if h % hk:
        raise ValueError(f"kv_heads={hk} must divide heads={h} (grouped-query attention); "
                         "repeat k/v heads or change the head counts.")
    tk = k.shape[1]
    if tq < 1 or tk < 1:
        raise ValueError(f"seq_q={tq} and seq_k={tk} must be >= 1.")
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{name}={val!r} must be a positive int (e.g. 64).")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be None or an int >= 1.")
    if not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks={sinks!r} must be an int >= 0.")
    nq = cdiv(tq, block_q)
    if block_indices is not None:
        if block_indices.ndim != 4 or block_indices.shape[:3] != (b, h, nq):
            raise ValueError(f"block_indices.shape={block_indices.shape} must be [batch, heads, "
                             f"ceil(seq_q/block_q), K] = [{b}, {h}, {nq}, K].")
        if not jnp.issubdtype(block_indices.dtype, jnp.integer):
            raise ValueError(f"block_indices.dtype={block_indices.dtype} must be an integer type.")
    if segment_ids is None:
        q_seg = jnp.zeros((b, tq), jnp.int32)
        k_seg = jnp.zeros((b, tk), jnp.int32)
    else:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError(
                    "segment_ids must be one [batch, seq] array or a (q_ids, kv_ids) pair.")
            q_seg, k_seg = segment_ids
        else:
            if tq != tk:
                raise ValueError(
                    f"a single segment_ids array needs seq_q == seq_k (got {tq}, {tk}); "
                                 "pass a (q_segment_ids, kv_segment_ids) pair.")
            q_seg = k_seg = segment_ids
        if q_seg.shape != (b, tq) or k_seg.shape != (b, tk):
            raise ValueError(f"segment_ids shapes {q_seg.shape}, {k_seg.shape} must be "
                             f"({b}, {tq}) and ({b}, {tk}).")
        q_seg = q_seg.astype(jnp.int32)
        k_seg = k_seg.astype(jnp.int32)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / float(d) ** 0.5
    cfg = Config(seq_q=tq, seq_k=tk, block_q=block_q, block_k=block_k, causal=bool(causal),
                 window=window, sinks=sinks, sm_scale=scale,
                 dense=block_indices is None and window is None)
    return cfg, q_seg, k_seg


def query_block_positions(cfg: Config):
    """First and last absolute query position of every query block: two int32 [nq]."""
    start = jnp.arange(cfg.nq, dtype=jnp.int32) * cfg.block_q
    p_first = start + cfg.offset
    p_last = jnp.minimum(start + cfg.block_q - 1, cfg.seq_q - 1) + cfg.offset
    return p_first, p_last


def slot_table(block_indices, cfg: Config, batch: int, heads: int):
    """Deduplicated per-query-block list of key blocks to visit.

    The union of the listed blocks, the blocks touched by the window of any query of the block and
    the sink blocks is sorted, duplicates are dropped (a block is visited once, so a key is never
    counted twice), causally unreachable blocks are dropped and the valid slots are packed first.

    Returns:
        fetch: int32 [B, H, nq, S] key block to load per slot (always in range; invalid slots repeat
            the last valid block, so a pipelined kernel issues no new copy for them).
        code: int32 [B, H, nq, S]: -1 invalid slot, 1 listed block, 0 window/sink-only block.
        n_valid: int32 [B, H, nq] number of valid slots (they come first).
    """
    nq, nk = cfg.nq, cfg.nk
    shape = (batch, heads, nq)
    p_first, p_last = query_block_positions(cfg)
    blocks, listed = [], []
    if cfg.dense:
        blocks.append(jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32), shape + (nk,)))
        listed.append(jnp.ones(shape + (nk,), bool))
    else:
        if block_indices is not None:
            blocks.append(block_indices.astype(jnp.int32))
            listed.append(jnp.ones(block_indices.shape, bool))
        if cfg.window is not None:
            # Keys p_first - window + 1 .. p_last span at most this many key blocks.
            nw = (cfg.window + cfg.block_q - 2) // cfg.block_k + 2
            first = jnp.floor_divide(p_first - cfg.window + 1, cfg.block_k)  # [nq]
            wb = first[:, None] + jnp.arange(nw, dtype=jnp.int32)  # [nq, nw]
            blocks.append(jnp.broadcast_to(wb, shape + (nw,)))
            listed.append(jnp.zeros(shape + (nw,), bool))
    if cfg.sinks and not cfg.dense:
        ns = cdiv(cfg.sinks, cfg.block_k)
        blocks.append(jnp.broadcast_to(jnp.arange(ns, dtype=jnp.int32), shape + (ns,)))
        listed.append(jnp.zeros(shape + (ns,), bool))
    blk = jnp.concatenate(blocks, axis=-1)  # [B,H,nq,S]
    lst = jnp.concatenate(listed, axis=-1)
    valid = (blk >= 0) & (blk < nk)
    if cfg.causal:
        # A block whose first key lies after the block's last query is never visible.
        valid &= blk * cfg.block_k <= p_last[:, None]
    big = jnp.int32(2 * nk + 2)
    # Sort key: block id, listed copy before pattern-only copy of the same block.
    key = jnp.sort(jnp.where(valid, blk * 2 + (1 - lst.astype(jnp.int32)), big), axis=-1)
    bid = key // 2
    dup = jnp.concatenate([jnp.zeros_like(bid[..., :1], bool), bid[..., 1:] == bid[..., :-1]], -1)
    key = jnp.sort(jnp.where((key < big) & ~dup, key, big), axis=-1)
    valid = key < big
    code = jnp.where(valid, 1 - key % 2, -1).astype(jnp.int32)
    bid = jnp.where(valid, key // 2, -1)
    last = jnp.maximum(jnp.max(bid, axis=-1, keepdims=True), 0)
    fetch = jnp.where(valid, bid, last).astype(jnp.int32)
    n_valid = jnp.sum(valid, axis=-1).astype(jnp.int32)
    return fetch, code, n_valid


def to_head_major(x, t_pad: int):
    """[B, T, H, D] -> [B, H, T_pad, D], zero padded along T."""
    x = jnp.swapaxes(x, 1, 2)
    return jnp.pad(x, ((0, 0), (0, 0), (0, t_pad - x.shape[2]), (0, 0)))


def pad_seg(seg, t_pad: int):
    """[B, T] -> [B, T_pad] padded with -1 (padded positions are masked by position anyway)."""
    return jnp.pad(seg, ((0, 0), (0, t_pad - seg.shape[1])), constant_values=-1)


def kv_head_index(heads: int, kv_heads: int):
    """Query head h reads key/value head h // (heads // kv_heads): int32 [H]."""
    return jnp.arange(heads, dtype=jnp.int32) // (heads // kv_heads)


__all__ = ["Config", "NEG_INF", "LSE_EMPTY", "cdiv", "visible", "validate", "slot_table",
           "query_block_positions", "to_head_major", "pad_seg", "kv_head_index"]
