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

Decoding with a KV cache (`HiPAttention.cached_attention`): the single query at position t runs the
same hierarchical search (`hip_decode_block_indices`, the op's search core) over the *valid prefix*
of the cache (keys 0..t), with the query block of size 1; the search range is computed from the
traced position t, so shapes stay static and the step is jittable. Each branch is scored as in
prefill: by default by its representative, the `rep_keys` keys at its centre (the paper's
Algorithm 1), or with `scoring="block_max"` by the exact maximum of q.k over its first key block.
Only the selected K blocks, the window and the sinks are gathered from the cache and attended.
Semantics: decoding token t gives exactly what prefill gives for query t with `block_q = 1`
(per-query search; tested); with a larger `block_q` prefill shares one search per query block, so
prefill and decoding then differ by the search granularity, as in the paper's serving setup.
While the context is shorter than `dense_below` (t + 1 < dense_below) decoding is dense, matching
prefill of a short prompt.

`use_hip(model, settings)` swaps the full-attention layers of any zoo model built from
`PreNormBlock`s of attention (the baseline, MASFormer, ...) for HiP, keeping its
parameters; the registered model `hip` is the baseline transformer with HiP in every full-attention
layer, with the same parameter names and shapes, so a trained transformer's checkpoint loads
unchanged (`zoo.convert.convert_model(model, "hip", ...)`). A multi-token prefill into an empty
cache runs the parallel (prefill) search; continuing a filled cache decodes token by token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels import dispatch
from pallas_kernels.sparse_attention import hip_block_indices, hip_decode_block_indices, sparse_attention
from pallas_kernels.sparse_attention.hip import SCORINGS
from zoo.layers import AttentionSpec
from zoo.models import registry
from zoo.models.base import Context, scan_over_time
from zoo.models.transformer import PRESETS as TRANSFORMER_PRESETS
from zoo.models.transformer import Attention, Transformer, TransformerConfig


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
      scoring: how the search scores a branch: "representative" (the paper's Algorithm 1: the
        `rep_keys` keys at the branch's centre against every `query_stride`-th query row of the
        block) or "block_max" (the exact max of q.k over the full tile of its first key block).
      rep_keys: the paper's b_k, keys in a representative (<= block_k).
      query_stride: the paper's b_sq, the stride of the query rows scored against it.
    """

    k_blocks: int = 4
    block_q: int = 32
    block_k: int = 32
    window: int = 64
    sinks: int = 16
    dense_below: int = 0
    scoring: str = "representative"
    rep_keys: int = 2
    query_stride: int = 2

    def __post_init__(self):
        for name in ("k_blocks", "block_q", "block_k", "window", "rep_keys", "query_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"HiP {name}={getattr(self, name)} must be >= 1")
        if self.sinks < 0 or self.dense_below < 0:
            raise ValueError(f"HiP sinks ({self.sinks}) and dense_below ({self.dense_below}) must be >= 0")
        if self.window < self.block_k:
            raise ValueError(
                f"HiP window={self.window} must be >= block_k={self.block_k}, so that searched "
                "key blocks never reach past the query; raise window or lower block_k"
            )
        if self.scoring not in SCORINGS:
            raise ValueError(f"HiP scoring={self.scoring!r} must be one of {SCORINGS}")
        if self.rep_keys > self.block_k:
            raise ValueError(f"HiP rep_keys={self.rep_keys} must be <= block_k={self.block_k}; lower rep_keys")

    @classmethod
    def of(cls, cfg) -> HiPSettings:
        """The settings held by a config that has the HiP fields."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def decode_sparse_attention(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos: jax.Array, blocks: jax.Array, s: HiPSettings
) -> jax.Array:
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
    idx = jnp.concatenate(
        [listed, jnp.broadcast_to(win, (b, h, s.window)), jnp.broadcast_to(sink, (b, h, s.sinks))], axis=-1
    )  # [B,H,N]
    ok = jnp.concatenate(
        [listed_ok, jnp.broadcast_to(win_ok, (b, h, s.window)), jnp.broadcast_to(sink_ok, (b, h, s.sinks))], axis=-1
    )
    idx = jnp.clip(idx, 0, slots - 1)
    # Gather keys / values: head h reads kv head h // G.
    b_idx = jnp.arange(b)[:, None, None]
    kv_idx = (jnp.arange(h) // (h // kh))[None, :, None]
    k = k_cache[b_idx, idx, kv_idx]  # [B,H,N,P]
    v = v_cache[b_idx, idx, kv_idx]
    scores = jnp.einsum("bhp,bhnp->bhn", q, k, preferred_element_type=jnp.float32) * p**-0.5
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

    def __init__(
        self,
        cfg: TransformerConfig,
        spec: AttentionSpec,
        *,
        rngs: nnx.Rngs | None = None,
        settings: HiPSettings | None = None,
        base: Attention | None = None,
    ):
        """New projections from `rngs`, or the projections (and parameters) of `base`; the HiP
        pattern from `settings` or, by default, from the config's HiP fields."""
        if base is None:
            super().__init__(cfg, spec, rngs=rngs)
        else:
            self.cfg, self.spec = cfg, spec
            self.wq, self.wk, self.wv, self.wo = base.wq, base.wk, base.wv, base.wo
        self.settings = settings if settings is not None else HiPSettings.of(cfg)

    def attention(self, q: jax.Array, k: jax.Array, v: jax.Array, ctx: Context) -> jax.Array:
        s = self.settings
        if q.shape[1] < s.dense_below:
            return super().attention(q, k, v, ctx)
        # HiP mask estimation: top-K key blocks per query block (sinks and window excluded).
        idx = hip_block_indices(
            q,
            k,
            k_blocks=s.k_blocks,
            block_q=s.block_q,
            block_k=s.block_k,
            window=s.window,
            sinks=s.sinks,
            causal=True,
            scoring=s.scoring,
            rep_keys=s.rep_keys,
            query_stride=s.query_stride,
        )  # [B,H,nq,K]
        # Block-sparse attention over the listed blocks + window + sinks.
        impl = dispatch.resolve(self.cfg.implementation)
        return sparse_attention(
            q,
            k,
            v,
            block_indices=idx,
            causal=True,
            window=s.window,
            sinks=s.sinks,
            block_q=s.block_q,
            block_k=s.block_k,
            segment_ids=ctx.segment_ids,
            implementation=impl,
            interpret=dispatch.resolve_interpret(impl),
        )

    def cached_attention(self, q: jax.Array, state: dict, ctx: Context) -> jax.Array:
        """One query per head (T = 1) at slot ctx.index: HiP's search over the filled prefix."""
        s, pos = self.settings, ctx.index
        k_cache, v_cache = state["k"], state["v"]
        if q.shape[1] != 1:
            raise ValueError("HiP's cached attention takes one token; multi-token prefill goes through prefill()")

        def dense(_):
            return super(HiPAttention, self).cached_attention(q, state, ctx)[:, 0]

        def sparse(_):
            # Search the valid prefix for this query (the op's search, block_q = 1), then attend
            # to the selected blocks, the window and the sinks only.
            blocks = hip_decode_block_indices(
                q[:, 0],
                k_cache,
                pos,
                k_blocks=s.k_blocks,
                block_k=s.block_k,
                window=s.window,
                sinks=s.sinks,
                scoring=s.scoring,
                rep_keys=s.rep_keys,
            )  # [B,H,K]
            return decode_sparse_attention(q[:, 0], k_cache, v_cache, pos, blocks, s)

        return jax.lax.cond(pos + 1 < s.dense_below, dense, sparse, None)[:, None]  # [B,1,H,P]

    def prefill(self, x: jax.Array, state: dict, ctx: Context) -> tuple[jax.Array, dict]:
        """One token: the decode search. Several: the parallel pattern into an empty cache
        (ctx.index == 0, a prompt), else token by token (exactly what decoding them would give)."""
        if x.shape[1] == 1:
            return super().prefill(x, state, ctx)

        def parallel(state):
            b, t, _ = x.shape
            q, k, v = self.qkv(x, ctx.positions)
            state = {
                n: jax.lax.dynamic_update_slice_in_dim(state[n], a.astype(state[n].dtype), 0, 1)
                for n, a in (("k", k), ("v", v))
            }
            return self.wo(self.attention(q, k, v, ctx).reshape(b, t, -1)), state

        def sequential(state):
            return scan_over_time(super(HiPAttention, self).prefill, x, state, ctx)

        return jax.lax.cond(ctx.index == 0, parallel, sequential, state)


def use_hip(model: nnx.Module, settings: HiPSettings) -> nnx.Module:
    """Swaps every full-attention layer of `model` (a model of attention `PreNormBlock`s) for HiP, in
    place, keeping its parameters; window / block-local layers are already sparse and stay."""
    for block in model.blocks.modules():
        attn = block.attn
        if type(attn) is Attention and attn.spec.kind == "full":
            block.attn = HiPAttention(attn.cfg, attn.spec, settings=settings, base=attn)
    return model


@dataclasses.dataclass(frozen=True)
class HiPConfig(TransformerConfig, HiPSettings):
    """The baseline transformer's fields plus HiP's (see `HiPSettings`). `window` is HiP's sliding
    window (and the window of any "window" layer in `layer_attention`)."""

    window: int = 64

    def __post_init__(self):
        super().__post_init__()
        HiPSettings.__post_init__(self)


def _from_transformer(cfg: TransformerConfig, **hip) -> HiPConfig:
    return HiPConfig(**{**dataclasses.asdict(cfg), **hip})


PRESETS = {
    # The transformer's tiny shape; HiP from 128 tokens on (dense below), 32-token blocks.
    "tiny": _from_transformer(
        TRANSFORMER_PRESETS["tiny"], window=64, k_blocks=4, block_q=32, block_k=32, sinks=16, dense_below=128
    ),
    "small": _from_transformer(
        TRANSFORMER_PRESETS["small"], window=128, k_blocks=8, block_q=32, block_k=32, sinks=32, dense_below=256
    ),
    # The 1.3B baseline with HiP v1.2-like serving settings (64-token blocks, 256 sinks, 512 window;
    # 32 blocks = 2048 selected keys, HiP's second-stage k).
    "1.3b": _from_transformer(
        TRANSFORMER_PRESETS["1.3b"], window=512, k_blocks=32, block_q=64, block_k=64, sinks=256, dense_below=4096
    ),
}


@registry.register("hip", PRESETS)
class HiP(Transformer):
    """The baseline transformer with HiP attention in every full-attention layer (training-free);
    the same parameter tree and cache as `Transformer`."""

    paper = "HiP attention (Lee et al., ICLR 2025), training-free"
    numerical_core = "`sparse_attention` + HiP block search"

    def attention_module(self, spec: AttentionSpec) -> type[Attention]:
        return HiPAttention if spec.kind == "full" else Attention
