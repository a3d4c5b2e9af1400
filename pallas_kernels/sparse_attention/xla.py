"""Blocked online-softmax sparse attention in pure JAX (runs on every backend).

For every query block only the key blocks of its slot table (common.slot_table) are gathered; a
`lax.scan` walks the slots `slot_chunk` at a time and keeps the flash-attention running statistics
(max m, normaliser l, accumulator acc; Dao et al. 2022, Alg. 1). Memory per scan step is
O(T * slot_chunk * bk); the whole pass touches O(T * S * bk) scores instead of O(T^2).

`forward` / `backward` take the op's layout (q [B, Tq, H, P], k / v [B, Tk, K, P], segment ids
[B, Tq] / [B, Tk], the SlotTable [B, H, nq, S]) and work internally on head-major tensors padded
to whole blocks (q [B, H, nq*bq, P], k / v [B, K, nk*bk, P]). FULL and PARTIAL_LISTED slots count
as listed (a FULL block is visible everywhere by construction).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.sparse_attention import common


def _chunked_tables(fetch, code, chunk: int):
    """Pads S to a multiple of `chunk` and moves the chunk axis first: [nc, B, H, nq, chunk]."""
    s = fetch.shape[-1]
    nc = common.cdiv(s, chunk)
    pad = nc * chunk - s
    fetch = jnp.pad(fetch, ((0, 0),) * 3 + ((0, pad),), mode="edge")
    code = jnp.pad(code, ((0, 0),) * 3 + ((0, pad),), constant_values=-1)
    split = lambda x: jnp.moveaxis(x.reshape(x.shape[:3] + (nc, chunk)), 3, 0)
    return split(fetch), split(code)


def _gather(kb, blk, hk_idx):
    """kb [B, K, nk, bk, P], blk [B, H, nq, c] -> [B, H, nq, c, bk, P]."""
    b_idx = jnp.arange(kb.shape[0])[:, None, None, None]
    return kb[b_idx, hk_idx[None, :, None, None], blk]


def _flat(x, kv=False):
    """Merges the slot and key axes: [..., c, bk] -> [..., c*bk] (kv=True: [..., c, bk, P])."""
    if kv:
        return x.reshape(x.shape[:-3] + (x.shape[-3] * x.shape[-2], x.shape[-1]))
    return x.reshape(x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


def _chunk_scores(qb, kg, blk, code, q_seg_b, k_seg_b, cfg: common.Config):
    """Masked fp32 scores of one slot chunk and their visibility.

    qb [B,H,nq,bq,P], kg [B,H,nq,c,bk,P], blk/code [B,H,nq,c] -> s, vis [B,H,nq,bq,c,bk].
    """
    bq, bk = cfg.block_q, cfg.block_k
    nq = qb.shape[2]
    b, h, _, c, _, _ = kg.shape
    # One [bq, c*bk] matmul per query block (faster on CPU than a 6-D contraction).
    s = jnp.einsum("bhqrd,bhqkd->bhqrk", qb, _flat(kg, kv=True), preferred_element_type=jnp.float32)
    s = s.reshape(b, h, nq, bq, c, bk) * cfg.sm_scale
    qpos = (jnp.arange(nq, dtype=jnp.int32)[:, None] * bq + jnp.arange(bq, dtype=jnp.int32) + cfg.offset)[
        :, :, None, None
    ]  # [nq,bq,1,1]
    kpos = (blk[..., None] * bk + jnp.arange(bk, dtype=jnp.int32))[:, :, :, None]  # [B,H,nq,1,c,bk]
    listed = (code >= common.PARTIAL_LISTED)[:, :, :, None, :, None]
    vis = common.visible(qpos, kpos, listed, cfg) & (code >= 0)[:, :, :, None, :, None]
    b_idx = jnp.arange(blk.shape[0])[:, None, None, None]
    kseg = k_seg_b[b_idx, blk][:, :, :, None]  # [B,H,nq,1,c,bk]
    qseg = q_seg_b[:, None, :, :, None, None]  # [B,1,nq,bq,1,1]
    vis = vis & (qseg == kseg)
    return jnp.where(vis, s, common.NEG_INF), vis


def _head_major(q, k, v, q_seg, k_seg, cfg: common.Config):
    """The op's layout -> padded head-major tensors and segment ids."""
    tq_pad, tk_pad = cfg.nq * cfg.block_q, cfg.nk * cfg.block_k
    return (
        common.to_head_major(q, tq_pad),
        common.to_head_major(k, tk_pad),
        common.to_head_major(v, tk_pad),
        common.pad_seg(q_seg, tq_pad),
        common.pad_seg(k_seg, tk_pad),
    )


def forward(q, k, v, q_seg, k_seg, table: common.SlotTable, cfg: common.Config, slot_chunk: int = 8):
    """Sparse attention forward.

    Args:
        q: [B, Tq, H, P]; k, v: [B, Tk, K, P]; q_seg / k_seg: int32 [B, Tq] / [B, Tk].
        table: the SlotTable (dense patterns list every block).

    Returns:
        o: [B, Tq, H, P] in q.dtype (zeros for rows that see nothing).
        lse: float32 [B, H, nq*bq], log-sum-exp of the visible scaled scores (LSE_EMPTY if none).
    """
    seq_q = q.shape[1]
    q, k, v, q_seg, k_seg = _head_major(q, k, v, q_seg, k_seg, cfg)
    fetch, code = table.fetch, table.code
    b, h, tq, pdim = q.shape
    kv_heads = k.shape[1]
    nq, bq, bk = tq // cfg.block_q, cfg.block_q, cfg.block_k
    qb = q.reshape(b, h, nq, bq, pdim)
    kb = k.reshape(b, kv_heads, -1, bk, pdim)
    vb = v.reshape(b, kv_heads, -1, bk, pdim)
    q_seg_b = q_seg.reshape(b, nq, bq)
    k_seg_b = k_seg.reshape(b, -1, bk)
    hk_idx = common.kv_head_index(h, kv_heads)
    fetch_c, code_c = _chunked_tables(fetch, code, min(slot_chunk, fetch.shape[-1]))

    def step(carry, xs):
        m, l, acc = carry  # [B,H,nq,bq], [B,H,nq,bq], [B,H,nq,bq,P]
        blk, cd = xs  # [B,H,nq,c]
        s, vis = _chunk_scores(qb, _gather(kb, blk, hk_idx), blk, cd, q_seg_b, k_seg_b, cfg)
        # Online softmax update (running max, rescaled normaliser and accumulator).
        m_new = jnp.maximum(m, jnp.max(s, axis=(-2, -1)))
        p = jnp.where(vis, jnp.exp(s - m_new[..., None, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(p, axis=(-2, -1))
        pv = jnp.einsum(
            "bhqrk,bhqkd->bhqrd",
            _flat(p).astype(v.dtype),
            _flat(_gather(vb, blk, hk_idx), kv=True),
            preferred_element_type=jnp.float32,
        )
        return (m_new, l, alpha[..., None] * acc + pv), None

    init = (
        jnp.full((b, h, nq, bq), common.NEG_INF, jnp.float32),
        jnp.zeros((b, h, nq, bq), jnp.float32),
        jnp.zeros((b, h, nq, bq, pdim), jnp.float32),
    )
    (m, l, acc), _ = jax.lax.scan(step, init, (fetch_c, code_c))
    # Normalise; rows with l == 0 saw nothing and return zeros.
    o = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), common.LSE_EMPTY)
    o = jnp.swapaxes(o.reshape(b, h, tq, pdim)[:, :, :seq_q], 1, 2)
    return o.astype(q.dtype), lse.reshape(b, h, tq)


def backward(q, k, v, q_seg, k_seg, table: common.SlotTable, o, lse, do, cfg: common.Config, slot_chunk: int = 8):
    """Flash-attention backward (Dao et al. 2022, Alg. 2) over the same slot table.

    Recomputes P = exp(S - lse) per slot chunk; dV += P^T dO, dP = dO V^T, dS = P * (dP - delta)
    with delta = rowsum(dO * O), dQ += dS K, dK += dS^T Q (times sm_scale). dK/dV are scatter-added
    into their key blocks (several query blocks and GQA heads may hit the same block).

    Args: as `forward`, plus its outputs o [B, Tq, H, P] and lse [B, H, nq*bq] and the output
    cotangent do [B, Tq, H, P].

    Returns:
        dq [B, Tq, H, P], dk, dv [B, Tk, K, P], in the input dtypes.
    """
    seq_q, seq_k = q.shape[1], k.shape[1]
    tq_pad = cfg.nq * cfg.block_q
    o = common.to_head_major(o, tq_pad)
    do = common.to_head_major(do, tq_pad)
    q, k, v, q_seg, k_seg = _head_major(q, k, v, q_seg, k_seg, cfg)
    fetch, code = table.fetch, table.code
    b, h, tq, pdim = q.shape
    kv_heads, tk = k.shape[1], k.shape[2]
    nq, bq, bk = tq // cfg.block_q, cfg.block_q, cfg.block_k
    qb = q.reshape(b, h, nq, bq, pdim)
    kb = k.reshape(b, kv_heads, -1, bk, pdim)
    vb = v.reshape(b, kv_heads, -1, bk, pdim)
    dob = do.reshape(b, h, nq, bq, pdim)
    lse_b = lse.reshape(b, h, nq, bq)
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1).reshape(b, h, nq, bq)
    q_seg_b = q_seg.reshape(b, nq, bq)
    k_seg_b = k_seg.reshape(b, -1, bk)
    hk_idx = common.kv_head_index(h, kv_heads)
    fetch_c, code_c = _chunked_tables(fetch, code, min(slot_chunk, fetch.shape[-1]))
    b_idx = jnp.arange(b)[:, None, None, None]

    def step(carry, xs):
        dq, dk, dv = carry
        blk, cd = xs
        kg = _gather(kb, blk, hk_idx)
        vg = _gather(vb, blk, hk_idx)
        s, vis = _chunk_scores(qb, kg, blk, cd, q_seg_b, k_seg_b, cfg)
        p = jnp.where(vis, jnp.exp(s - lse_b[..., None, None]), 0.0)  # [B,H,nq,bq,c,bk]
        p = _flat(p)  # [B,H,nq,bq,c*bk]
        dv_c = jnp.einsum("bhqrk,bhqrd->bhqkd", p.astype(do.dtype), dob, preferred_element_type=jnp.float32).reshape(
            kg.shape
        )
        dp = jnp.einsum("bhqrd,bhqkd->bhqrk", dob, _flat(vg, kv=True), preferred_element_type=jnp.float32)
        ds = p * (dp - delta[..., None]) * cfg.sm_scale
        dq = dq + jnp.einsum(
            "bhqrk,bhqkd->bhqrd", ds.astype(k.dtype), _flat(kg, kv=True), preferred_element_type=jnp.float32
        )
        dk_c = jnp.einsum("bhqrk,bhqrd->bhqkd", ds.astype(q.dtype), qb, preferred_element_type=jnp.float32).reshape(
            kg.shape
        )
        hi = hk_idx[None, :, None, None]
        dk = dk.at[b_idx, hi, blk].add(dk_c)
        dv = dv.at[b_idx, hi, blk].add(dv_c)
        return (dq, dk, dv), None

    init = (
        jnp.zeros((b, h, nq, bq, pdim), jnp.float32),
        jnp.zeros((b, kv_heads, tk // bk, bk, pdim), jnp.float32),
        jnp.zeros((b, kv_heads, tk // bk, bk, pdim), jnp.float32),
    )
    (dq, dk, dv), _ = jax.lax.scan(step, init, (fetch_c, code_c))
    back = lambda x, ref, t: jnp.swapaxes(x.reshape(ref.shape)[:, :, :t], 1, 2).astype(ref.dtype)
    return back(dq, q, seq_q), back(dk, k, seq_k), back(dv, v, seq_k)
