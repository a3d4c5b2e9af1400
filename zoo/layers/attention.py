"""The zoo's attention interface: one function, several causal patterns.

`attend(q, k, v, q_pos=..., k_pos=..., spec=...)` computes softmax attention with the mask that
`spec.kind` names, always intersected with causality (key position <= query position):
- "full":   every earlier key;
- "window": the last `spec.window` keys up to and including the query (sliding window);
- "block":  the keys of the query's own block of `spec.block` positions (block-local).
Positions are explicit so that the same code serves training (q_pos == k_pos == arange(T)) and
decoding with a KV cache (one query at position t against the cache, with `k_valid` marking the
filled slots). The scores and the softmax are computed in fp32; a query that sees no key gets
zeros. This dense path materialises [B, H, T, S] scores; the block-sparse Pallas kernels
(`pallas_kernels.sparse_attention`) are the fast path for long sequences.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ATTENTION_KINDS = ("full", "window", "block")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Which keys a query may see. `window`/`block` are used by the matching kinds only."""

    kind: str = "full"
    window: int = 256
    block: int = 256

    def __post_init__(self):
        if self.kind not in ATTENTION_KINDS:
            raise ValueError(f"attention kind {self.kind!r} is unknown; choose one of {ATTENTION_KINDS}")
        if self.window < 1 or self.block < 1:
            raise ValueError(f"window ({self.window}) and block ({self.block}) must be >= 1")


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, spec: AttentionSpec,
                   k_valid: jax.Array | None = None) -> jax.Array:
    """Boolean mask [B, T, S] (True = attend) from positions q_pos [B, T] and k_pos [B, S]."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = kp <= qp  # causal
    if spec.kind == "window":
        mask &= kp > qp - spec.window
    elif spec.kind == "block":
        mask &= (kp // spec.block) == (qp // spec.block)
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    return mask


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_pos: jax.Array, k_pos: jax.Array,
           spec: AttentionSpec = AttentionSpec(), k_valid: jax.Array | None = None) -> jax.Array:
    """Grouped-query causal attention.

    Args:
      q: [B, T, H, P] queries; k, v: [B, S, K, P] keys/values with K dividing H.
      q_pos: [B, T] (or [T]) query positions; k_pos: [B, S] (or [S]) key positions.
      spec: the attention pattern.
      k_valid: optional [B, S] bool, False for empty cache slots.

    Returns:
      [B, T, H, P] in q's dtype.
    """
    b, t, h, p = q.shape
    kh = k.shape[2]
    if h % kh:
        raise ValueError(f"kv heads ({kh}) must divide query heads ({h})")
    q_pos = jnp.broadcast_to(q_pos, (b, t))
    k_pos = jnp.broadcast_to(k_pos, (b, k.shape[1]))
    mask = attention_mask(q_pos, k_pos, spec, k_valid)  # [B, T, S]
    qg = q.reshape(b, t, kh, h // kh, p)
    scores = jnp.einsum("btkgp,bskp->bkgts", qg, k, preferred_element_type=jnp.float32) * p ** -0.5
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # rows that see nothing
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskp->btkgp", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, p).astype(q.dtype)
