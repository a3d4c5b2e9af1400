"""Dense masked attention: the obvious, slow, exact oracle for `sparse_attention`.

Builds the full [B, H, Tq, Tk] visibility mask from its definition (common.py docstring) and runs
an fp32 softmax over it. Rows that see nothing return zeros.
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.sparse_attention import common


def dense_mask(block_indices, q_seg, k_seg, cfg: common.Config, heads: int):
    """The visibility mask bool [B, H, Tq, Tk] expanded from the definition."""
    b = q_seg.shape[0]
    qpos = jnp.arange(cfg.seq_q, dtype=jnp.int32) + cfg.offset  # [Tq]
    kpos = jnp.arange(cfg.seq_k, dtype=jnp.int32)  # [Tk]
    if cfg.dense:
        listed = jnp.ones((b, heads, cfg.seq_q, cfg.seq_k), bool)
    elif block_indices is None:
        listed = jnp.zeros((b, heads, cfg.seq_q, cfg.seq_k), bool)
    else:
        # Block membership by comparison against every listed id (-1 / out of range match nothing).
        kblock = kpos // cfg.block_k  # [Tk]
        hit = (block_indices[..., :, None] == kblock).any(axis=-2)  # [B,H,nq,Tk]
        listed = jnp.repeat(hit, cfg.block_q, axis=2)[:, :, : cfg.seq_q]  # [B,H,Tq,Tk]
    vis = common.visible(qpos[:, None], kpos[None, :], listed, cfg)
    same = q_seg[:, None, :, None] == k_seg[:, None, None, :]  # [B,1,Tq,Tk]
    return vis & same


def sparse_attention_reference(q, k, v, block_indices, q_seg, k_seg, cfg: common.Config):
    """Dense masked attention in fp32; returns [B, Tq, H, P] in q.dtype."""
    h, kv_heads = q.shape[2], k.shape[2]
    mask = dense_mask(block_indices, q_seg, k_seg, cfg, h)  # [B,H,Tq,Tk]
    kh = jnp.repeat(k.astype(jnp.float32), h // kv_heads, axis=2)  # [B,Tk,H,P]
    vh = jnp.repeat(v.astype(jnp.float32), h // kv_heads, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kh) * cfg.sm_scale
    s = jnp.where(mask, s, common.NEG_INF)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(l > 0, l, 1.0)  # empty rows: all-zero weights, zero output
    o = jnp.einsum("bhqk,bkhd->bqhd", p, vh)
    return o.astype(q.dtype)
