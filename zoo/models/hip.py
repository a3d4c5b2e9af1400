"""HiP attention: training-free hierarchically pruned attention as a drop-in for any attention model.

Lee et al., "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework With
Hierarchically Pruned Attention" (HiP, ICLR 2025, arXiv 2406.09827), Sec. 3. HiP replaces the
quadratic softmax attention of a model trained with full attention, without any training: every
query block keeps only the top-K key blocks found by a hierarchical (binary-split) search, plus
the first `sinks` keys and a causal sliding window of `window` keys. Cost O(T log T) time and
O(T) memory for prefill; O(K * block_k + window + sinks) attended keys per decoded token.

Prefill (`HiPAttention.__call__`, T >= `dense_below`):
    idx = hip_block_indices(q, k, k_blocks=K, block_q, block_k, window, sinks)    # [B,H,nq,K]
    o   = sparse_attention(q, k, v, block_indices=idx, window, sinks, causal)     # [B,T,H,P]
Below `dense_below` tokens the layer computes exact dense causal attention (the baseline's path).

Decoding with a KV cache (`HiPAttention.decode`): the single query at position t runs the same
hierarchical search over the *valid prefix* of the cache (keys 0..t), with the query block of
size 1; the search range is computed from the traced position t, so shapes stay static and the
step is jittable. The key-block summaries (element-wise min/max of the keys of each block, the
representative scores of HiP's key groups) are computed from the cache, or, in the registered
`hip` model, kept in the cache and updated in O(D) per token. Only the selected K blocks, the
window and the sinks are gathered from the cache and attended. Semantics: decoding token t gives
exactly what prefill gives for query t with `block_q = 1` (per-query search; tested); with a
larger `block_q` prefill shares one search per query block, so prefill and decoding then differ
by the search granularity, as in the paper's serving setup. While the context is shorter than
`dense_below` (t + 1 < dense_below) decoding is dense, matching prefill of a short prompt.

`use_hip(model, settings)` swaps the full-attention layers of any zoo model built from
`zoo.models.transformer.Block`s (the baseline, MASFormer, ...) for HiP, keeping its parameters;
the registered model `hip` is the baseline transformer with HiP in every full-attention layer,
with the same parameter names and shapes, so a trained transformer's checkpoint loads unchanged.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.sparse_attention import hip_block_indices, sparse_attention
from zoo.layers import AttentionSpec, attend
from zoo.models import registry
from zoo.models.transformer import PRESETS as TRANSFORMER_PRESETS
from zoo.models.transformer import Attention, Transformer, TransformerConfig

IMPLEMENTATIONS = ("auto", "reference", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class HiPSettings:
    """The HiP pattern of one attention layer.

    Attributes:
      k_blocks: K, key blocks kept per query block by the search.
      block_q, block_k: query / key block sizes of the search and of the sparse attention.
      window: causal sliding window (always attended, excluded from the search); >= block_k so
        that every searched key block lies in the causal past of the query.
      sinks: the first `sinks` keys are always attended (attention sinks).
      dense_below: sequences (contexts, when decoding) shorter than this use dense attention.
      implementation: the sparse op's implementation; "auto" = Pallas on TPU/GPU, XLA on CPU.
    """

    k_blocks: int = 4
    block_q: int = 32
    block_k: int = 32
    window: int = 64
    sinks: int = 16
    dense_below: int = 0
    implementation: str = "auto"

    def __post_init__(self):
        for name in ("k_blocks", "block_q", "block_k", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"HiP {name}={getattr(self, name)} must be >= 1")
        if self.sinks < 0 or self.dense_below < 0:
            raise ValueError(f"HiP sinks ({self.sinks}) and dense_below ({self.dense_below}) must be >= 0")
        if self.window < self.block_k:
            raise ValueError(f"HiP window={self.window} must be >= block_k={self.block_k}, so that searched "
                             "key blocks never reach past the query; raise window or lower block_k")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"HiP implementation={self.implementation!r} must be one of {IMPLEMENTATIONS}")

    def op_kwargs(self) -> dict:
        """Keyword arguments of `sparse_attention` for this pattern (without block_indices)."""
        impl = None if self.implementation == "auto" else self.implementation
        interpret = impl == "pallas" and jax.default_backend() == "cpu"
        return dict(causal=True, window=self.window, sinks=self.sinks, block_q=self.block_q,
                    block_k=self.block_k, implementation=impl, interpret=interpret)


def block_summaries(k_cache: jax.Array, pos: jax.Array, block_k: int) -> tuple[jax.Array, jax.Array]:
    """Element-wise min / max of the filled keys (slots <= pos) of every key block.

    Args:
      k_cache: [B, S, K, P] keys; pos: the current position (int32 scalar).
    Returns:
      kmin, kmax: fp32 [B, ceil(S / block_k), K, P]; +inf / -inf for blocks with no filled key.
    """
    b, s, kh, p = k_cache.shape
    nkc = math.ceil(s / block_k)
    pad = nkc * block_k - s
    k = jnp.pad(k_cache.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    filled = (jnp.arange(nkc * block_k) <= pos)[None, :, None, None]
    k = k.reshape(b, nkc, block_k, kh, p)
    filled = filled.reshape(1, nkc, block_k, 1, 1)
    return (jnp.min(jnp.where(filled, k, jnp.inf), axis=2), jnp.max(jnp.where(filled, k, -jnp.inf), axis=2))


def decode_block_search(q: jax.Array, kmin: jax.Array, kmax: jax.Array, pos: jax.Array,
                        s: HiPSettings) -> jax.Array:
    """HiP's hierarchical top-K search for one query per head over the valid prefix 0..pos.

    The same algorithm as `hip_block_indices` with a query block of one token (HiP Sec. 3.1): K
    spans evenly tile the searchable key blocks [sinks // bk, ceil((pos - window + 1) / bk)); each
    round splits every span in two, scores a half by its first key block,
    max(q . kmin_j, q . kmax_j), and keeps the best K halves, until spans are single blocks.

    Args:
      q: [B, H, P] the query of each head; kmin, kmax: [B, nkc, K, P] block summaries.
      pos: int32 scalar, the query position.
    Returns:
      int32 [B, H, K] selected key block ids in ascending order, -1 for unused slots.
    """
    b, h, _ = q.shape
    nkc, kh = kmin.shape[1], kmin.shape[2]
    kk, bk = s.k_blocks, s.block_k
    q = q.astype(jnp.float32)
    # Summaries per query head (grouped-query attention: head h reads kv head h // G).
    kv_of_head = jnp.arange(h) // (h // kh)
    kmin_h = jnp.swapaxes(kmin[:, :, kv_of_head], 1, 2)  # [B,H,nkc,P]
    kmax_h = jnp.swapaxes(kmax[:, :, kv_of_head], 1, 2)
    kmin_h = jnp.where(jnp.isfinite(kmin_h), kmin_h, 0.0)  # empty blocks are never scored
    kmax_h = jnp.where(jnp.isfinite(kmax_h), kmax_h, 0.0)
    # Search range [lo, hi): no sink-only blocks, nothing the window covers.
    lo = jnp.int32(s.sinks // bk)
    key_end = jnp.clip(pos - s.window + 1, 0, nkc * bk)
    hi = jnp.maximum((key_end + bk - 1) // bk, lo)
    n = hi - lo
    # Initial spans: K spans evenly tiling [lo, hi).
    i = jnp.arange(kk + 1, dtype=jnp.int32)
    edges = lo + (i * n) // kk  # [K+1]
    start = jnp.broadcast_to(edges[:-1], (b, h, kk))
    end = jnp.broadcast_to(edges[1:], (b, h, kk))
    rounds = math.ceil(math.log2(max(1, math.ceil(nkc / kk))))
    for _ in range(rounds):
        # Split every span in two halves (left gets the extra block).
        mid = start + (end - start + 1) // 2
        c_start = jnp.concatenate([start, mid], axis=-1)  # [B,H,2K]
        c_end = jnp.concatenate([mid, end], axis=-1)
        # Representative score of each half: its first key block.
        rep = jnp.clip(c_start, 0, nkc - 1)
        lo_k = jnp.take_along_axis(kmin_h, rep[..., None], axis=2)  # [B,H,2K,P]
        hi_k = jnp.take_along_axis(kmax_h, rep[..., None], axis=2)
        score = jnp.maximum(jnp.einsum("bhp,bhcp->bhc", q, lo_k), jnp.einsum("bhp,bhcp->bhc", q, hi_k))
        score = jnp.where(c_end > c_start, score, -jnp.inf)
        # Keep the best K halves.
        _, top = jax.lax.top_k(score, kk)
        start = jnp.take_along_axis(c_start, top, axis=-1)
        end = jnp.take_along_axis(c_end, top, axis=-1)
    big = jnp.int32(nkc + 1)
    blocks = jnp.sort(jnp.where(end > start, start, big), axis=-1)
    return jnp.where(blocks < big, blocks, -1).astype(jnp.int32)


def decode_sparse_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos: jax.Array,
                            blocks: jax.Array, s: HiPSettings) -> jax.Array:
    """One query per head over the selected blocks, the window and the sinks of the cache.

    Visible keys j <= pos: the union of the listed blocks, pos - window < j and j < sinks (each key
    counted once). Only these O(K * block_k + window + sinks) keys are gathered.

    Args:
      q: [B, H, P]; k_cache, v_cache: [B, S, K, P]; pos: int32 scalar; blocks: [B, H, K] (-1 unused).
    Returns:
      [B, H, P] in q.dtype.
    """
    b, h, p = q.shape
    slots, kh = k_cache.shape[1], k_cache.shape[2]
    bk = s.block_k
    # Candidate key positions: listed blocks [B,H,K*bk], window [w], sinks [n_sink].
    listed = (blocks[..., None] * bk + jnp.arange(bk)).reshape(b, h, -1)
    listed_ok = jnp.repeat(blocks >= 0, bk, axis=-1) & (listed <= pos) & (listed < slots)
    win = pos - s.window + 1 + jnp.arange(s.window)
    sink = jnp.arange(s.sinks)

    def in_listed(x):  # [N] positions -> [B,H,N] whether their block is listed
        return jnp.any((x // bk)[None, None, :, None] == blocks[:, :, None, :], axis=-1)

    win_ok = (win >= 0)[None, None] & ~in_listed(win)
    sink_ok = ((sink <= pos) & (sink <= pos - s.window))[None, None] & ~in_listed(sink)
    idx = jnp.concatenate([listed, jnp.broadcast_to(win, (b, h, s.window)),
                           jnp.broadcast_to(sink, (b, h, s.sinks))], axis=-1)  # [B,H,N]
    ok = jnp.concatenate([listed_ok, jnp.broadcast_to(win_ok, (b, h, s.window)),
                          jnp.broadcast_to(sink_ok, (b, h, s.sinks))], axis=-1)
    idx = jnp.clip(idx, 0, slots - 1)
    # Gather keys / values: head h reads kv head h // G.
    b_idx = jnp.arange(b)[:, None, None]
    kv_idx = (jnp.arange(h) // (h // kh))[None, :, None]
    k = k_cache[b_idx, idx, kv_idx]  # [B,H,N,P]
    v = v_cache[b_idx, idx, kv_idx]
    scores = jnp.einsum("bhp,bhnp->bhn", q, k, preferred_element_type=jnp.float32) * p ** -0.5
    scores = jnp.where(ok, scores, -jnp.inf)
    m = jnp.max(scores, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(scores - m)
    denom = jnp.sum(w, axis=-1, keepdims=True)
    probs = w / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhn,bhnp->bhp", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


class HiPAttention(Attention):
    """The transformer's attention (same projections and parameters) with HiP's sparse pattern."""

    def __init__(self, cfg: TransformerConfig, spec: AttentionSpec, settings: HiPSettings, *,
                 rngs: nnx.Rngs | None = None, base: Attention | None = None):
        """New projections from `rngs`, or the projections (and parameters) of `base`."""
        if base is None:
            super().__init__(cfg, spec, rngs=rngs)
        else:
            self.cfg, self.spec = cfg, spec
            self.wq, self.wk, self.wv, self.wo = base.wq, base.wk, base.wv, base.wo
        self.settings = settings

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
        s = self.settings
        b, t, _ = x.shape
        if t < s.dense_below:
            return super().__call__(x)
        pos = jnp.arange(t)
        q, k, v = self.qkv(x, pos)  # [B,T,H,P], [B,T,K,P]
        # HiP mask estimation: top-K key blocks per query block (sinks and window excluded).
        idx = hip_block_indices(q, k, k_blocks=s.k_blocks, block_q=s.block_q, block_k=s.block_k,
                                window=s.window, sinks=s.sinks, causal=True)  # [B,H,nq,K]
        # Block-sparse attention over the listed blocks + window + sinks.
        o = sparse_attention(q, k, v, block_indices=idx, **s.op_kwargs())
        return self.wo(o.reshape(b, t, -1))

    def _decode(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos: jax.Array, summarize):
        """One token x [B, 1, D] at `pos`; `summarize(k_new [B,K,P], k_cache)` returns the block
        summaries (kmin, kmax) [B, nkc, K, P] of the cache including this token's key."""
        s = self.settings
        b = x.shape[0]
        q, k, v = self.qkv(x, jnp.full((1,), pos))
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, pos, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, pos, 0, 0))
        kmin, kmax = summarize(k[:, 0].astype(jnp.float32), k_cache)

        def dense(_):
            slots = jnp.arange(k_cache.shape[1])
            o = attend(q, k_cache, v_cache, q_pos=jnp.full((b, 1), pos), k_pos=slots, spec=AttentionSpec("full"),
                       k_valid=jnp.broadcast_to(slots <= pos, (b, slots.shape[0])))
            return o[:, 0]

        def sparse(_):
            # Search the valid prefix for this query, then attend to the selected blocks only.
            blocks = decode_block_search(q[:, 0], kmin, kmax, pos, s)  # [B,H,K]
            return decode_sparse_attention(q[:, 0], k_cache, v_cache, pos, blocks, s)

        o = jax.lax.cond(pos + 1 < s.dense_below, dense, sparse, None)  # [B,H,P]
        return self.wo(o.reshape(b, 1, -1)), k_cache, v_cache, kmin, kmax

    def decode_with_summaries(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos: jax.Array,
                              kmin: jax.Array, kmax: jax.Array):
        """Decoding with incrementally kept block summaries kmin/kmax [B, nkc, K, P] (+inf/-inf when
        empty): the new key is folded into its block in O(D).
        Returns (out [B, 1, D], k_cache, v_cache, kmin, kmax)."""
        blk = pos // self.settings.block_k

        def summarize(k_new, _):
            return kmin.at[:, blk].min(k_new), kmax.at[:, blk].max(k_new)

        return self._decode(x, k_cache, v_cache, pos, summarize)

    def decode(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos: jax.Array):
        """The transformer's decode signature: block summaries recomputed from the cache (O(S D)
        min/max, no matmul), so HiP works inside any model's unchanged `decode_step`."""
        out, k_cache, v_cache, _, _ = self._decode(
            x, k_cache, v_cache, pos, lambda _, kc: block_summaries(kc, pos, self.settings.block_k))
        return out, k_cache, v_cache


def use_hip(model: nnx.Module, settings: HiPSettings) -> nnx.Module:
    """Swaps every full-attention layer of `model` (a model of transformer `Block`s) for HiP, in
    place, keeping its parameters; window / block-local layers are already sparse and stay."""
    for block in model.blocks:
        attn = block.attn
        if type(attn) is Attention and attn.spec.kind == "full":
            block.attn = HiPAttention(attn.cfg, attn.spec, settings, base=attn)
    return model


@dataclasses.dataclass(frozen=True)
class HiPConfig(TransformerConfig):
    """The baseline transformer's fields plus HiP's (see `HiPSettings`). `window` is HiP's sliding
    window (and the window of any "window" layer in `layer_attention`)."""

    window: int = 64
    k_blocks: int = 4
    block_q: int = 32
    block_k: int = 32
    sinks: int = 16
    dense_below: int = 0
    implementation: str = "auto"

    def __post_init__(self):
        super().__post_init__()
        self.hip_settings()  # validates the HiP fields

    def hip_settings(self) -> HiPSettings:
        return HiPSettings(self.k_blocks, self.block_q, self.block_k, self.window, self.sinks,
                           self.dense_below, self.implementation)


def _from_transformer(cfg: TransformerConfig, **hip) -> HiPConfig:
    return HiPConfig(**{**dataclasses.asdict(cfg), **hip})


PRESETS = {
    # The transformer's tiny shape; HiP from 128 tokens on (dense below), 32-token blocks.
    "tiny": _from_transformer(TRANSFORMER_PRESETS["tiny"], window=64, k_blocks=4, block_q=32, block_k=32,
                              sinks=16, dense_below=128),
    "small": _from_transformer(TRANSFORMER_PRESETS["small"], window=128, k_blocks=8, block_q=32, block_k=32,
                               sinks=32, dense_below=256),
    # The 1.3B baseline with HiP v1.2-like serving settings (64-token blocks, 256 sinks, 512 window;
    # 32 blocks = 2048 selected keys, HiP's second-stage k).
    "1.3b": _from_transformer(TRANSFORMER_PRESETS["1.3b"], window=512, k_blocks=32, block_q=64, block_k=64,
                              sinks=256, dense_below=4096),
}


@registry.register("hip", PRESETS)
class HiP(Transformer):
    """The baseline transformer with HiP attention in every full-attention layer (training-free).

    Same parameter tree as `Transformer`; the cache also keeps the key-block min/max summaries so a
    decoded token costs O(D) to summarise and O(K log(S/K)) representative scores to search.
    """

    def __init__(self, cfg: HiPConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        use_hip(self, cfg.hip_settings())

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """The transformer's KV cache plus kmin / kmax [L, B, ceil(S / block_k), K, P] (fp32)."""
        cfg = self.config
        cache = super().init_cache(batch_size, max_length)
        shape = (cfg.n_layers, batch_size, math.ceil(max_length / cfg.block_k), cfg.n_kv_heads, cfg.head_dim)
        cache["kmin"] = jnp.full(shape, jnp.inf, jnp.float32)
        cache["kmax"] = jnp.full(shape, -jnp.inf, jnp.float32)
        return cache

    def decode_step(self, tokens_t: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """tokens_t int32 [B] -> (logits [B, V], updated cache)."""
        pos = cache["pos"]
        x = self.embed(tokens_t[:, None]).astype(jnp.float32)
        out = {"k": [], "v": [], "kmin": [], "kmax": []}
        for i, block in enumerate(self.blocks):
            h_in = block.attn_norm(x)
            kmin, kmax = cache["kmin"][i], cache["kmax"][i]
            if isinstance(block.attn, HiPAttention):
                h, k_i, v_i, kmin, kmax = block.attn.decode_with_summaries(
                    h_in, cache["k"][i], cache["v"][i], pos, kmin, kmax)
            else:
                h, k_i, v_i = block.attn.decode(h_in, cache["k"][i], cache["v"][i], pos)
            x = x + h.astype(jnp.float32)
            x = x + block.mlp(block.mlp_norm(x)).astype(jnp.float32)
            for name, val in (("k", k_i), ("v", v_i), ("kmin", kmin), ("kmax", kmax)):
                out[name].append(val)
        cache = {name: jnp.stack(vals) for name, vals in out.items()}
        cache["pos"] = pos + 1
        return self.logits(x)[:, 0], cache


def from_transformer(model: Transformer, **hip_fields) -> HiP:
    """A `hip` model holding `model`'s parameters (a trained baseline; training-free conversion).

    Args:
      model: a `Transformer` (e.g. from `zoo.train.checkpoint.load_model`).
      **hip_fields: HiPConfig fields (k_blocks, block_q, block_k, window, sinks, dense_below, ...).
    """
    cfg = _from_transformer(model.config, **hip_fields)
    hip = nnx.eval_shape(lambda: HiP(cfg, rngs=nnx.Rngs(0)))
    nnx.update(hip, nnx.state(model, nnx.Param))
    return hip
