"""Shared pieces of the sparse attention op: notation, validation, the visibility rule, the slot
table and its transpose, and the tile table.

Notation (used in every file of this folder, in names, shape comments and docstrings):

    B   batch                          Tq, Tk  query / key length
    H   query heads                    K       key/value heads (GQA: K divides H)
    G   query heads per kv head H // K P       head dim
    bq  query block (tile) size        bk      key block (tile) size
    nq  ceil(Tq / bq)                  nk      ceil(Tk / bk)
    k_blocks  listed key blocks per query block (block_indices[..., k_blocks])
    S   slots per query block in the slot table (listed + window + sink blocks, deduplicated)
    E   entries of the transposed (key-major) table of one (batch, kv head)
    U   B * K "units" (one batch row and kv head with its G query heads; TPU layout)

Query row i sits at absolute position p_i = i + (Tk - Tq) (queries aligned to the end of the keys).
Key j is visible to query i iff

        (j in a listed block of i's query block  or  p_i - window < j <= p_i  or  j < sinks)
        and (j <= p_i if causal) and (seg_q[i] == seg_k[j]) and j < Tk.

With no listed blocks and no window every key is "listed" (dense attention).

The slot table (`slot_table`) lists, per (batch, head, query block), the key blocks to visit:
the union of the listed blocks, the blocks the window of any query of the block touches and the
sink blocks, deduplicated, causally pruned, and classified FULL (every key visible to every query
of the block: no element mask needed) or PARTIAL (the element mask of the rule above is applied);
FULL slots come first. The transposed table (`transpose_table`) lists, per (batch, kv head, key
block), the (query head, query block) pairs that visit that key block: the dK/dV kernels walk it.
Dense patterns (no listed blocks, no window) need no table: the kernels derive the causal block
range of every query block arithmetically (`dense_bounds`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

NEG_INF = -1e30  # finite "minus infinity" for masked scores (no inf - inf = NaN)
LSE_EMPTY = 1e30  # log-sum-exp stored for rows that see nothing: exp(s - LSE_EMPTY) == 0

# Slot codes of the slot table (and of the transposed table's entries).
INVALID = -1  # padding slot: visit nothing
PARTIAL = 0  # window / sink block (not listed): apply the element mask
PARTIAL_LISTED = 1  # listed block that still needs the mask (diagonal, tail, segments)
FULL = 2  # every key of the block is visible to every query of the query block


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Config:
    """Static (hashable) description of one sparse attention call."""

    seq_q: int  # Tq
    seq_k: int  # Tk
    block_q: int  # bq
    block_k: int  # bk
    causal: bool
    window: int | None
    sinks: int
    sm_scale: float
    dense: bool  # no block_indices and no window: every key block is listed
    segmented: bool = False  # segment ids were given (no block is FULL then)

    @property
    def offset(self) -> int:
        return self.seq_k - self.seq_q

    @property
    def nq(self) -> int:
        return cdiv(self.seq_q, self.block_q)

    @property
    def nk(self) -> int:
        return cdiv(self.seq_k, self.block_k)

    def with_blocks(self, block_q: int, block_k: int) -> Config:
        """The same pattern tiled differently (only meaningful for dense patterns)."""
        return dataclasses.replace(self, block_q=block_q, block_k=block_k)


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


def validate(q, k, v, block_indices, segment_ids, *, causal, window, sinks, block_q, block_k, sm_scale):
    """Checks shapes and options at the API boundary; returns (Config, q_seg, k_seg).

    q_seg / k_seg are int32 [B, Tq] / [B, Tk] (zeros when `segment_ids` is None).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be [B, T, heads, head_dim]; got q.shape={q.shape}, k.shape={k.shape}, v.shape={v.shape}."
        )
    b, tq, h, p = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k.shape={k.shape} must equal v.shape={v.shape}.")
    if k.shape[0] != b or k.shape[3] != p:
        raise ValueError(f"k.shape={k.shape} must match q.shape={q.shape} in batch and head_dim.")
    kv_heads = k.shape[2]
    if h % kv_heads:
        raise ValueError(
            f"kv_heads={kv_heads} must divide heads={h} (grouped-query attention); "
            "repeat k/v heads or change the head counts."
        )
    tk = k.shape[1]
    if tq < 1 or tk < 1:
        raise ValueError(f"seq_q={tq} and seq_k={tk} must be >= 1.")
    for name, val in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name}={val!r} must be a positive int (e.g. 64).")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be None or an int >= 1.")
    if not isinstance(sinks, int) or sinks < 0:
        raise ValueError(f"sinks={sinks!r} must be an int >= 0.")
    nq = cdiv(tq, block_q)
    if block_indices is not None:
        if block_indices.ndim != 4 or block_indices.shape[:3] != (b, h, nq):
            raise ValueError(
                f"block_indices.shape={block_indices.shape} must be [B, H, "
                f"ceil(seq_q/block_q), k_blocks] = [{b}, {h}, {nq}, k_blocks]."
            )
        if not jnp.issubdtype(block_indices.dtype, jnp.integer):
            raise ValueError(f"block_indices.dtype={block_indices.dtype} must be an integer type.")
    if segment_ids is None:
        q_seg = jnp.zeros((b, tq), jnp.int32)
        k_seg = jnp.zeros((b, tk), jnp.int32)
    else:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError("segment_ids must be one [B, T] array or a (q_ids, kv_ids) pair.")
            q_seg, k_seg = segment_ids
        else:
            if tq != tk:
                raise ValueError(
                    f"a single segment_ids array needs seq_q == seq_k (got {tq}, {tk}); "
                    "pass a (q_segment_ids, kv_segment_ids) pair."
                )
            q_seg = k_seg = segment_ids
        if q_seg.shape != (b, tq) or k_seg.shape != (b, tk):
            raise ValueError(f"segment_ids shapes {q_seg.shape}, {k_seg.shape} must be ({b}, {tq}) and ({b}, {tk}).")
        q_seg = q_seg.astype(jnp.int32)
        k_seg = k_seg.astype(jnp.int32)
    scale = float(sm_scale) if sm_scale is not None else 1.0 / float(p) ** 0.5
    cfg = Config(
        seq_q=tq,
        seq_k=tk,
        block_q=block_q,
        block_k=block_k,
        causal=bool(causal),
        window=window,
        sinks=sinks,
        sm_scale=scale,
        dense=block_indices is None and window is None,
        segmented=segment_ids is not None,
    )
    return cfg, q_seg, k_seg


def query_block_positions(cfg: Config):
    """First and last absolute query position of every query block: two int32 [nq]."""
    start = jnp.arange(cfg.nq, dtype=jnp.int32) * cfg.block_q
    p_first = start + cfg.offset
    p_last = jnp.minimum(start + cfg.block_q - 1, cfg.seq_q - 1) + cfg.offset
    return p_first, p_last


def dense_bounds(i, cfg: Config):
    """Key-block range of query block(s) `i` for a dense pattern (no table).

    Blocks [0, n_full) are FULL (no element mask); blocks [n_full, n_vis) need the mask (causal
    diagonal, a key tail past Tk, segment ids). Works on Python ints and traced int32 alike.

    Returns:
        (n_full, n_vis), the type / shape of `i`.
    """
    bq, bk = cfg.block_q, cfg.block_k
    nk_whole = cfg.seq_k // bk  # key blocks without a tail past Tk
    if cfg.causal:
        p_first = i * bq + cfg.offset
        p_last = jnp.minimum(i * bq + bq - 1, cfg.seq_q - 1) + cfg.offset
        # Block j is FULL iff its last key j*bk + bk - 1 <= p_first.
        n_full = jnp.clip(jnp.floor_divide(p_first + 1, bk), 0, nk_whole)
        n_vis = jnp.clip(jnp.floor_divide(p_last, bk) + 1, 0, cfg.nk)
        n_vis = jnp.where(p_last >= 0, n_vis, 0)
    else:
        n_full = jnp.zeros_like(i) + nk_whole
        n_vis = jnp.zeros_like(i) + cfg.nk
    if cfg.segmented:
        n_full = jnp.zeros_like(n_full)
    return n_full, n_vis


def dense_query_bounds(j, cfg: Config):
    """Query-block range visiting key block(s) `j` for a dense pattern (the transpose of
    `dense_bounds`): query blocks [i_first, i_full) need the mask, [i_full, nq) are FULL
    (causal), or all are FULL / masked for non-causal patterns.

    Returns:
        (i_first, i_full), the type / shape of `j`.
    """
    bq, bk = cfg.block_q, cfg.block_k
    nq = cfg.nq
    tail = (j + 1) * bk > cfg.seq_k  # the key block runs past Tk: always masked
    if cfg.causal:
        # Visible iff p_last(i) >= j*bk; FULL iff p_first(i) >= j*bk + bk - 1.
        # p_last(i) = min(i*bq + bq - 1, Tq - 1) + offset, p_first(i) = i*bq + offset.
        i_first = jnp.clip(cdiv_traced(j * bk - cfg.offset - bq + 1, bq), 0, nq)
        i_first = jnp.where(j * bk <= cfg.seq_q - 1 + cfg.offset, i_first, nq)
        i_full = jnp.clip(cdiv_traced(j * bk + bk - 1 - cfg.offset, bq), 0, nq)
        i_full = jnp.maximum(i_full, i_first)
    else:
        i_first = jnp.zeros_like(j)
        i_full = jnp.zeros_like(j)
    i_full = jnp.where(tail, nq, i_full)
    if cfg.segmented:
        i_full = jnp.zeros_like(i_full) + nq
    return i_first, i_full


def cdiv_traced(a, b: int):
    """ceil(a / b) for int32 arrays (b > 0), correct for negative a."""
    return -jnp.floor_divide(-a, b)


class SlotTable(NamedTuple):
    """Per (batch, head, query block) list of key blocks to visit (see module docstring).

    fetch: int32 [B, H, nq, S] key block per slot, always in range; invalid slots repeat the last
        valid block (so a pipelined kernel issues no new copy for them).
    code: int32 [B, H, nq, S] FULL, PARTIAL_LISTED, PARTIAL or INVALID; FULL slots come first,
        then PARTIAL*, then INVALID.
    n_full: int32 [B, H, nq] number of FULL slots.
    n_valid: int32 [B, H, nq] number of valid slots.
    """

    fetch: jax.Array
    code: jax.Array
    n_full: jax.Array
    n_valid: jax.Array


def slot_table(block_indices, cfg: Config, batch: int, heads: int) -> SlotTable:
    """Builds the deduplicated, classified slot table of a non-dense pattern.

    The union of the listed blocks, the blocks touched by the window of any query of the block and
    the sink blocks is sorted and deduplicated (a block is visited once, so a key is never counted
    twice), causally unreachable blocks are dropped, every remaining block is classified FULL or
    PARTIAL, and the slots are ordered FULL (by block id), PARTIAL (by block id), INVALID.
    """
    nq, nk, bk = cfg.nq, cfg.nk, cfg.block_k
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
            nw = (cfg.window + cfg.block_q - 2) // bk + 2
            first = jnp.floor_divide(p_first - cfg.window + 1, bk)  # [nq]
            wb = first[:, None] + jnp.arange(nw, dtype=jnp.int32)  # [nq, nw]
            blocks.append(jnp.broadcast_to(wb, shape + (nw,)))
            listed.append(jnp.zeros(shape + (nw,), bool))
        if cfg.sinks:
            ns = cdiv(cfg.sinks, bk)
            blocks.append(jnp.broadcast_to(jnp.arange(ns, dtype=jnp.int32), shape + (ns,)))
            listed.append(jnp.zeros(shape + (ns,), bool))
    blk = jnp.concatenate(blocks, axis=-1)  # [B,H,nq,S]
    lst = jnp.concatenate(listed, axis=-1)
    valid = (blk >= 0) & (blk < nk)
    if cfg.causal:
        # A block whose first key lies after the block's last query is never visible.
        valid &= blk * bk <= p_last[:, None]
    big = jnp.int32(2 * nk + 2)
    # Deduplicate: sort by (block id, listed copy first), drop repeated ids.
    key = jnp.sort(jnp.where(valid, blk * 2 + (1 - lst.astype(jnp.int32)), big), axis=-1)
    bid = key // 2
    dup = jnp.concatenate([jnp.zeros_like(bid[..., :1], bool), bid[..., 1:] == bid[..., :-1]], -1)
    valid = (key < big) & ~dup
    is_listed = key % 2 == 0
    # Classify: FULL iff every key of the block is visible to every query of the query block.
    k_lo, k_hi = bid * bk, bid * bk + bk - 1  # first / last key of the block
    pf, pl_ = p_first[:, None], p_last[:, None]
    covered = is_listed
    if cfg.window is not None:
        covered = covered | ((k_lo > pl_ - cfg.window) & (k_hi <= pf))
    if cfg.sinks:
        covered = covered | (k_hi < cfg.sinks)
    full = covered & (k_hi < cfg.seq_k)
    if cfg.causal:
        full = full & (k_hi <= pf)
    if cfg.segmented:
        full = jnp.zeros_like(full)
    code = jnp.where(full, FULL, jnp.where(is_listed, PARTIAL_LISTED, PARTIAL))
    # Order: FULL by id, then PARTIAL by id, then invalid; the code rides in the low bits.
    rank = jnp.where(valid, (1 - full.astype(jnp.int32)) * (nk + 1) + bid, 2 * nk + 2)
    packed = jnp.sort(rank * 4 + jnp.where(valid, code, 3), axis=-1)
    rank, code = packed // 4, packed % 4
    valid = rank < 2 * nk + 2
    bid = rank % (nk + 1)
    code = jnp.where(valid, code, INVALID).astype(jnp.int32)
    n_valid = jnp.sum(valid, axis=-1).astype(jnp.int32)
    n_full = jnp.sum(code == FULL, axis=-1).astype(jnp.int32)
    # Invalid slots repeat the last valid block (no new DMA in a pipelined kernel).
    last = jnp.take_along_axis(bid, jnp.maximum(n_valid - 1, 0)[..., None], axis=-1)
    fetch = jnp.where(valid, bid, last).astype(jnp.int32)
    return SlotTable(fetch, code, n_full, n_valid)


class KeyTable(NamedTuple):
    """Transposed slot table: per (batch, kv head, key block) the (query head, query block) pairs
    that visit it, as a CSR list (GPU dK/dV kernel).

    entry: int32 [B, K, E] sorted entries, (g * nq + i) * 4 + code: query head g of the group,
        query block i, slot code (FULL first within each key block, then PARTIAL*); E = G*nq*S.
    bounds: int32 [B, K, nk, 4] per key block: (start, end of FULL entries, end, 0).
    """

    entry: jax.Array
    bounds: jax.Array


def transpose_table(table: SlotTable, cfg: Config, kv_heads: int) -> KeyTable:
    """Builds the key-major CSR table from a slot table (see `KeyTable`)."""
    b, h, nq, s = table.fetch.shape
    g = h // kv_heads
    nk = cfg.nk
    fetch = table.fetch.reshape(b, kv_heads, g * nq * s)
    code = table.code.reshape(b, kv_heads, g * nq * s)
    src = jnp.arange(g * nq * s, dtype=jnp.int32) // s  # g * nq + i of each entry
    valid = code >= 0
    # Sort by (key block, FULL first); invalid entries last.
    order_key = jnp.where(valid, fetch * 2 + (code != FULL).astype(jnp.int32), 2 * nk)
    order = jnp.argsort(order_key, axis=-1, stable=True)
    sorted_key = jnp.take_along_axis(order_key, order, axis=-1)
    entry = src[order] * 4 + jnp.take_along_axis(jnp.maximum(code, 0), order, axis=-1)
    targets = jnp.arange(2 * nk + 1, dtype=jnp.int32)
    edges = jax.vmap(jax.vmap(lambda row: jnp.searchsorted(row, targets, side="left")))(sorted_key)
    start, mid, end = edges[..., 0:-1:2], edges[..., 1::2], edges[..., 2::2]
    bounds = jnp.stack([start, mid, end, jnp.zeros_like(start)], axis=-1).astype(jnp.int32)
    return KeyTable(entry.astype(jnp.int32), bounds)


class FlatKeyTable(NamedTuple):
    """Transposed slot table flattened into one sequential grid axis (TPU dK/dV kernel).

    Every key block gets one placeholder entry (which zeroes its accumulator) followed by its
    visiting entries; padding entries at the end repeat the last block.

    blk: int32 [B, K, E'] key block of the entry; E' = G*nq*S + nk.
    info: int32 [B, K, E'] (g * nq + i) * 16 + last * 8 + first * 4 + code, with code FULL,
        PARTIAL_LISTED, PARTIAL, or 3 (placeholder / padding: no compute); `first` marks the
        placeholder (start of the key block), `last` the block's final entry (write dK/dV).
    """

    blk: jax.Array
    info: jax.Array


SKIP = 3  # FlatKeyTable code: placeholder / padding entry


def flat_key_table(table: SlotTable, cfg: Config, kv_heads: int) -> FlatKeyTable:
    """Builds the flattened key-major table from a slot table (see `FlatKeyTable`)."""
    b, h, nq, s = table.fetch.shape
    g = h // kv_heads
    nk = cfg.nk
    n = g * nq * s
    fetch = table.fetch.reshape(b, kv_heads, n)
    code = table.code.reshape(b, kv_heads, n)
    src = jnp.arange(n, dtype=jnp.int32) // s
    valid = code >= 0
    # Placeholders (sort key 2j) precede the entries of block j (2j + 1); padding sorts last.
    key = jnp.concatenate(
        [
            jnp.where(valid, fetch * 2 + 1, 2 * nk),
            jnp.broadcast_to(jnp.arange(nk, dtype=jnp.int32) * 2, (b, kv_heads, nk)),
        ],
        axis=-1,
    )
    payload = jnp.concatenate(
        [jnp.where(valid, src * 16 + jnp.maximum(code, 0), SKIP), jnp.full((b, kv_heads, nk), SKIP + 4, jnp.int32)],
        axis=-1,
    )  # placeholder: first bit
    order = jnp.argsort(key, axis=-1, stable=True)
    key = jnp.take_along_axis(key, order, axis=-1)
    payload = jnp.take_along_axis(payload, order, axis=-1)
    blk = key // 2
    real = key < 2 * nk
    nxt = jnp.concatenate([blk[..., 1:], jnp.full_like(blk[..., :1], nk)], axis=-1)
    nxt_real = jnp.concatenate([real[..., 1:], jnp.zeros_like(real[..., :1])], axis=-1)
    last = real & ((nxt != blk) | ~nxt_real)
    info = payload + last.astype(jnp.int32) * 8
    # Padding repeats the last real block so the pipeline neither copies nor writes anew.
    blk = jnp.where(real, blk, nk - 1)
    return FlatKeyTable(blk.astype(jnp.int32), info.astype(jnp.int32))


# ----------------------------------------------------------------------------- tiles


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Kernel tiles and launch parameters of one backend for one (head dim, dtype).

    block_q / block_k: forward tiles (and the pattern blocks when block_indices is None).
    bwd_block_q / bwd_block_k: tiles of the dQ and dK/dV kernels for dense patterns (patterns
        with a table use the pattern's blocks).
    num_warps / num_stages: Triton launch parameters of the forward, bwd_* of the backward.
    """

    block_q: int
    block_k: int
    bwd_block_q: int
    bwd_block_k: int
    num_warps: int = 4
    num_stages: int = 2
    bwd_num_warps: int = 4
    bwd_num_stages: int = 2


# Keyed by (backend, head-dim class, dtype class). Unmeasured: chosen from the register / shared
# memory budget of an sm_90 SM (Triton) and the MXU width / VMEM of a TPU core (Mosaic); see
# docs/kernels/sparse_attention.md.
_TILES = {
    ("gpu", 64, "16bit"): Tiles(128, 64, 64, 64, num_warps=4, num_stages=3, bwd_num_warps=4, bwd_num_stages=2),
    ("gpu", 128, "16bit"): Tiles(128, 64, 64, 64, num_warps=8, num_stages=3, bwd_num_warps=8, bwd_num_stages=2),
    ("gpu", 256, "16bit"): Tiles(64, 32, 32, 32, num_warps=8, num_stages=2, bwd_num_warps=8, bwd_num_stages=1),
    ("gpu", 64, "32bit"): Tiles(64, 32, 32, 32, num_warps=4, num_stages=2),
    ("gpu", 128, "32bit"): Tiles(64, 32, 32, 32, num_warps=4, num_stages=2),
    ("gpu", 256, "32bit"): Tiles(32, 32, 32, 16, num_warps=4, num_stages=1, bwd_num_stages=1),
    ("tpu", 64, "16bit"): Tiles(512, 512, 256, 256),
    ("tpu", 128, "16bit"): Tiles(512, 512, 256, 256),
    ("tpu", 256, "16bit"): Tiles(256, 256, 128, 128),
    ("tpu", 64, "32bit"): Tiles(256, 256, 128, 128),
    ("tpu", 128, "32bit"): Tiles(256, 256, 128, 128),
    ("tpu", 256, "32bit"): Tiles(128, 128, 128, 128),
}


@functools.cache
def default_tiles(backend: str, head_dim: int, dtype) -> Tiles:
    """The tile table's entry for `backend` ("gpu" or "tpu"), head dim and input dtype."""
    width = 64 if head_dim <= 64 else 128 if head_dim <= 128 else 256
    bits = "16bit" if jnp.dtype(dtype).itemsize <= 2 else "32bit"
    return _TILES[(backend, width, bits)]


def kv_head_index(heads: int, kv_heads: int):
    """Query head h reads key/value head h // (heads // kv_heads): int32 [H]."""
    return jnp.arange(heads, dtype=jnp.int32) // (heads // kv_heads)


def to_head_major(x, t_pad: int):
    """[B, T, H, P] -> [B, H, T_pad, P], zero padded along T."""
    x = jnp.swapaxes(x, 1, 2)
    if t_pad == x.shape[2]:
        return x
    return jnp.pad(x, ((0, 0), (0, 0), (0, t_pad - x.shape[2]), (0, 0)))


def pad_seg(seg, t_pad: int):
    """[B, T] -> [B, T_pad] padded with -1 (padded positions are masked by position anyway)."""
    if t_pad == seg.shape[1]:
        return seg
    return jnp.pad(seg, ((0, 0), (0, t_pad - seg.shape[1])), constant_values=-1)


def dot_nt(a, b):
    """a [m, r] . b [n, r]^T -> fp32 [m, n]."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):
    """a [m, r] . b [r, n] -> fp32 [m, n]."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """a [r, m]^T . b [r, n] -> fp32 [m, n]."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


# ----------------------------------------------------------------------------- cost model


def visited_pairs(cfg: Config, n_slots: int | None) -> int:
    """(query block, key block) pairs one head visits: exact for dense patterns, the slot
    table's upper bound nq * S otherwise (a static number for `pl.CostEstimate`)."""
    if n_slots is not None:
        return cfg.nq * n_slots
    i = np.arange(cfg.nq)
    if cfg.causal:
        p_last = np.minimum(i * cfg.block_q + cfg.block_q - 1, cfg.seq_q - 1) + cfg.offset
        n_vis = np.where(p_last >= 0, np.clip(p_last // cfg.block_k + 1, 0, cfg.nk), 0)
    else:
        n_vis = np.full(cfg.nq, cfg.nk)
    return int(n_vis.sum())


def cost(
    cfg: Config,
    *,
    batch: int,
    heads: int,
    head_dim: int,
    itemsize: int,
    n_slots: int | None,
    matmuls: int,
    io_bytes: int,
):
    """`pl.CostEstimate` of a kernel that does `matmuls` bq x bk x P matmuls per visited pair.

    Forward: 2 (QK^T, PV); dQ: 3 (QK^T, dO V^T, dS K); dK/dV: 4. `io_bytes` are the bytes of the
    operands read once (q, o, lse, ...); key/value tiles are counted once per visited pair.
    """
    pairs = visited_pairs(cfg, n_slots) * batch * heads
    area = cfg.block_q * cfg.block_k
    return pl.CostEstimate(
        flops=int(2 * matmuls * pairs * area * head_dim),
        transcendentals=int(pairs * area),
        bytes_accessed=int(io_bytes + pairs * cfg.block_k * head_dim * 2 * itemsize),
    )


_PASSES = {"fwd": (2, 2, 4), "dq": (3, 3, 8), "dkv": (4, 4, 8)}  # matmuls, operand reads, row bytes


def pass_cost(kind: str, cfg: Config, q, k, n_slots: int | None):
    """`cost` of one kernel pass over q [B,Tq,H,P] and k [B,Tk,K,P]: "fwd", "dq" or "dkv".

    The passes read q (k for dK/dV) once per extra operand of its shape (q and o; q, o and dO;
    k, v, dK and dV), plus fp32 rows [B,H,Tq] (lse; lse and delta in both backward passes).
    """
    b, tq, h, p = q.shape
    item = jnp.dtype(q.dtype).itemsize
    matmuls, reads, row_bytes = _PASSES[kind]
    operand = k if kind == "dkv" else q
    return cost(
        cfg,
        batch=b,
        heads=h,
        head_dim=p,
        itemsize=item,
        n_slots=n_slots,
        matmuls=matmuls,
        io_bytes=reads * operand.size * item + row_bytes * b * h * tq,
    )


__all__ = [
    "FULL",
    "INVALID",
    "LSE_EMPTY",
    "NEG_INF",
    "PARTIAL",
    "PARTIAL_LISTED",
    "SKIP",
    "Config",
    "FlatKeyTable",
    "KeyTable",
    "SlotTable",
    "Tiles",
    "cdiv",
    "cost",
    "dot_nn",
    "dot_nt",
    "dot_tn",
    "default_tiles",
    "dense_bounds",
    "dense_query_bounds",
    "flat_key_table",
    "kv_head_index",
    "next_pow2",
    "pad_seg",
    "query_block_positions",
    "slot_table",
    "to_head_major",
    "transpose_table",
    "validate",
    "visible",
    "visited_pairs",
]
