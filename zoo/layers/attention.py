"""The zoo's attention: one pattern description, one oracle, one dispatch to the best kernel.

`AttentionSpec.kind` names the causal pattern, always intersected with causality (key position <=
query position) and, for packed documents, with segment equality:
- "full":   every earlier key;
- "window": the last `spec.window` keys up to and including the query (sliding window);
- "block":  the keys of the query's own block of `spec.block` positions (block-local).
Positions are positions within a document, so a packed document sees exactly what it sees alone.

`attend` is the dense XLA oracle (fp32 scores and softmax; a query that sees no key gets zeros),
written for any query/key positions, so it also serves decoding against a KV cache (`k_valid`
marks the filled slots). `self_attention` is the one dispatch every model's training path uses:

- "auto": on GPU, cuDNN flash attention (`jax.nn.dot_product_attention`, `local_window_size` for
  windows) for bf16/fp16 without segment ids, else the Pallas sparse op; on TPU, splash attention
  (causal / local masks, segment ids); on CPU, the XLA oracle;
- "pallas": the zoo's Pallas sparse op (`pallas_kernels.sparse_attention`; interpreted on CPU);
- "xla" / "reference": the XLA oracle.

Block-local layers on packed rows (segment ids with kind "block") always use the oracle: their block
grid follows document positions, which the kernels' row-index block grid does not.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels import dispatch
from pallas_kernels.sparse_attention import sparse_attention

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


def attention_mask(
    q_pos: jax.Array,
    k_pos: jax.Array,
    spec: AttentionSpec,
    k_valid: jax.Array | None = None,
    q_seg: jax.Array | None = None,
    k_seg: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask [B, T, S] (True = attend) from positions q_pos [B, T] and k_pos [B, S]."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    mask = kp <= qp  # causal
    if spec.kind == "window":
        mask &= kp > qp - spec.window
    elif spec.kind == "block":
        mask &= (kp // spec.block) == (qp // spec.block)
    if k_valid is not None:
        mask &= k_valid[:, None, :]
    if q_seg is not None:
        mask &= q_seg[:, :, None] == k_seg[:, None, :]
    return mask


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_pos: jax.Array,
    k_pos: jax.Array,
    spec: AttentionSpec = AttentionSpec(),
    k_valid: jax.Array | None = None,
    q_seg: jax.Array | None = None,
    k_seg: jax.Array | None = None,
) -> jax.Array:
    """Grouped-query causal attention, the dense oracle (fp32 scores [B, K, G, T, S]).

    Args:
      q: [B, T, H, P] queries; k, v: [B, S, K, P] keys/values with K dividing H.
      q_pos: [B, T] (or [T]) query positions; k_pos: [B, S] (or [S]) key positions.
      spec: the attention pattern.
      k_valid: optional [B, S] bool, False for empty cache slots.
      q_seg, k_seg: optional [B, T] / [B, S] segment ids; attend only within equal ids.

    Returns:
      [B, T, H, P] in q's dtype.
    """
    b, t, h, p = q.shape
    kh = k.shape[2]
    if h % kh:
        raise ValueError(f"kv heads ({kh}) must divide query heads ({h})")
    q_pos = jnp.broadcast_to(q_pos, (b, t))
    k_pos = jnp.broadcast_to(k_pos, (b, k.shape[1]))
    mask = attention_mask(q_pos, k_pos, spec, k_valid, q_seg, k_seg)  # [B, T, S]
    qg = q.reshape(b, t, kh, h // kh, p)
    scores = jnp.einsum("btkgp,bskp->bkgts", qg, k, preferred_element_type=jnp.float32) * p**-0.5
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # rows that see nothing
    weights = jnp.exp(scores - row_max)
    denom = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bkgts,bskp->btkgp", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, p).astype(q.dtype)


def sparse_pattern_kwargs(spec: AttentionSpec, seq_len: int, batch: int, heads: int, tile: int) -> dict:
    """Keyword arguments of `sparse_attention` that give `spec`'s causal pattern."""
    if spec.kind == "full":
        return dict(block_q=tile, block_k=tile)
    if spec.kind == "window":
        return dict(window=spec.window, block_q=tile, block_k=tile)
    nq = -(-seq_len // spec.block)
    # Query block i lists key block i: block-local, causal within the block.
    own = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.int32)[:, None], (batch, heads, nq, 1))
    return dict(block_indices=own, block_q=spec.block, block_k=spec.block)


def _cudnn_ok(q: jax.Array, spec: AttentionSpec, segment_ids) -> bool:
    return (
        jax.default_backend() == "gpu"
        and segment_ids is None
        and spec.kind != "block"
        and q.dtype in (jnp.bfloat16, jnp.float16)
    )


def _cudnn(q, k, v, spec: AttentionSpec) -> jax.Array:
    window = (spec.window - 1, 0) if spec.kind == "window" else None
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window, implementation="cudnn")


def splash_attention(q, k, v, spec: AttentionSpec, segment_ids=None, *, interpret: bool = False) -> jax.Array:
    """JAX's TPU splash attention for a "full" / "window" pattern; q [B, T, H, P], k, v [B, T, K, P]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, t, h, p = q.shape
    kh = k.shape[2]
    g = h // kh
    if spec.kind == "window":
        mask = sm.LocalMask((t, t), window_size=(spec.window - 1, 0), offset=0)
    else:
        mask = sm.CausalMask((t, t))
    kernel = sk.make_splash_mqa_single_device(sm.MultiHeadMask([mask] * g), interpret=interpret)
    qg = jnp.moveaxis((q * p**-0.5).reshape(b, t, kh, g, p), 1, 3)  # [B, K, G, T, P]
    kg, vg = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)  # [B, K, T, P]

    def one(qi, ki, vi, seg):  # one batch row, one kv head: q [G, T, P], k, v [T, P]
        ids = None if seg is None else sk.SegmentIds(q=seg, kv=seg)
        return kernel(qi, ki, vi, segment_ids=ids)

    over_heads = jax.vmap(one, in_axes=(0, 0, 0, None))
    out = jax.vmap(over_heads, in_axes=(0, 0, 0, None if segment_ids is None else 0))(qg, kg, vg, segment_ids)
    return jnp.moveaxis(out, 3, 1).reshape(b, t, h, p).astype(q.dtype)


def self_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    spec: AttentionSpec,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    implementation: str = "auto",
    tile: int = 64,
) -> jax.Array:
    """Causal self-attention of T tokens with the pattern `spec`, through the best kernel available.

    Args:
      q: [B, T, H, P]; k, v: [B, T, K, P] (K divides H).
      spec: the pattern; positions: int32 [B, T] positions within each document (window / block
        grid and the oracle's causality); segment_ids: int32 [B, T] or None.
      implementation: see the module docstring.
      tile: block size of the Pallas sparse op for "full" / "window".

    Returns:
      [B, T, H, P] in q's dtype.
    """
    impl = dispatch.resolve(implementation)
    use_oracle = impl in ("xla", "reference") or (spec.kind == "block" and segment_ids is not None)
    if use_oracle:
        return attend(q, k, v, q_pos=positions, k_pos=positions, spec=spec, q_seg=segment_ids, k_seg=segment_ids)
    if implementation == "auto" and _cudnn_ok(q, spec, segment_ids):
        return _cudnn(q, k, v, spec)
    if implementation == "auto" and jax.default_backend() == "tpu" and spec.kind != "block":
        return splash_attention(q, k, v, spec, segment_ids)
    b, t, h, _ = q.shape
    return sparse_attention(
        q,
        k,
        v,
        causal=True,
        segment_ids=segment_ids,
        implementation="pallas",
        interpret=dispatch.resolve_interpret("pallas"),
        **sparse_pattern_kwargs(spec, t, b, h, tile),
    )


__all__ = [
    "ATTENTION_KINDS",
    "AttentionSpec",
    "attend",
    "attention_mask",
    "self_attention",
    "splash_attention",
    "sparse_pattern_kwargs",
]
