"""The baseline: a decoder-only transformer (pre-norm, RoPE, RMSNorm, SwiGLU, GQA).

Every long-context model in the zoo is compared with this one, and MASFormer and HiP reuse its
layers with other attention patterns (`zoo.layers.attention`). Byte-level vocabulary (256) by default.

Block (pre-norm, residual stream in fp32):
    x = x + Attn(RMSNorm(x))       # causal, RoPE on q and k, pattern from the config
    x = x + SwiGLU(RMSNorm(x))
logits = RMSNorm(x) E^T / sqrt(D) when the embeddings are tied, else RMSNorm(x) W_out.

Training attention goes through `zoo.layers.self_attention` (cuDNN on GPU, splash on TPU, the XLA
oracle on CPU); decoding and prefill attend over a KV cache [B, S, K, P] per layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.layers import AttentionSpec, Embed, Linear, RMSNorm, apply_rope, attend, lm_logits, self_attention
from zoo.models import registry
from zoo.models.base import Context, LanguageModel, LMConfig, PreNormBlock, make_stack


@dataclasses.dataclass(frozen=True)
class TransformerConfig(LMConfig):
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 384
    rope_theta: float = 10_000.0
    tie_embeddings: bool = True
    attention: str = "full"  # pattern of every layer: full | window | block
    layer_attention: tuple[str, ...] = ()  # per-layer patterns (overrides `attention`), len n_layers
    window: int = 256  # sliding-window size for "window" layers
    block: int = 256  # block size for "block" layers
    norm_eps: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.layer_attention and len(self.layer_attention) != self.n_layers:
            raise ValueError(
                f"layer_attention has {len(self.layer_attention)} entries but n_layers is "
                f"{self.n_layers}; give one pattern per layer or leave it empty"
            )
        self.layer_specs()  # validates the kinds, window and block

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def layer_specs(self) -> tuple[AttentionSpec, ...]:
        kinds = self.layer_attention or (self.attention,) * self.n_layers
        return tuple(AttentionSpec(kind, self.window, self.block) for kind in kinds)


PRESETS = {
    # ~0.4M parameters: trains in minutes on 2 CPU cores.
    "tiny": TransformerConfig(),
    "small": TransformerConfig(d_model=256, n_layers=4, n_heads=8, n_kv_heads=8, d_ff=768),
    # A 1.3B decoder in the shape of GPT-3 XL / the MASFormer paper's model (24 x 2048, 16 heads),
    # with a GPT-NeoX-sized tied vocabulary and SwiGLU width ~8/3 D (1.32B parameters).
    "1.3b": TransformerConfig(
        vocab_size=50_304, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16, d_ff=5504, dtype="bfloat16"
    ),
}


class Attention(nnx.Module):
    """Multi-head (grouped-query) causal self-attention with RoPE and a configurable pattern.

    Subclasses change the pattern by overriding `attention` (parallel) and `cached_attention`
    (against the KV cache); the projections and the cache layout stay the same.
    """

    def __init__(self, cfg: TransformerConfig, spec: AttentionSpec, *, rngs: nnx.Rngs):
        d, h, kh, p = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cfg, self.spec = cfg, spec
        self.wq = Linear(d, h * p, axes=("embed", "heads"), rngs=rngs, dtype=cfg.dtype)
        self.wk = Linear(d, kh * p, axes=("embed", "kv_heads"), rngs=rngs, dtype=cfg.dtype)
        self.wv = Linear(d, kh * p, axes=("embed", "kv_heads"), rngs=rngs, dtype=cfg.dtype)
        self.wo = Linear(
            h * p,
            d,
            axes=("heads", "embed"),
            rngs=rngs,
            dtype=cfg.dtype,
            init_std=(h * p) ** -0.5 / (2 * cfg.n_layers) ** 0.5,
        )

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] at positions [B, T] -> q [B, T, H, P], k, v [B, T, K, P] (RoPE on q, k)."""
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.wq(x).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = self.wk(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = self.wv(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        return apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta), v

    def attention(self, q: jax.Array, k: jax.Array, v: jax.Array, ctx: Context) -> jax.Array:
        """The parallel pattern: q [B, T, H, P], k, v [B, T, K, P] -> [B, T, H, P]."""
        return self_attention(
            q,
            k,
            v,
            spec=self.spec,
            positions=ctx.positions,
            segment_ids=ctx.segment_ids,
            implementation=self.cfg.implementation,
        )

    def cached_attention(self, q: jax.Array, state: dict, ctx: Context) -> jax.Array:
        """q [B, T, H, P] of the tokens at cache slots index .. index+T-1 against the filled cache."""
        slots = jnp.arange(state["k"].shape[1])
        valid = jnp.broadcast_to(slots < ctx.index + q.shape[1], (q.shape[0], slots.shape[0]))
        return attend(q, state["k"], state["v"], q_pos=ctx.positions, k_pos=slots, spec=self.spec, k_valid=valid)

    def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:  # [B, T, D]
        b, t, _ = x.shape
        q, k, v = self.qkv(x, ctx.positions)
        return self.wo(self.attention(q, k, v, ctx).reshape(b, t, -1))

    def init_state(self, batch_size: int, max_length: int) -> dict:
        """The KV cache [B, S, K, P] in the compute dtype."""
        cfg = self.cfg
        zeros = jnp.zeros((batch_size, max_length, cfg.n_kv_heads, cfg.head_dim), jnp.dtype(cfg.dtype))
        return {"k": zeros, "v": zeros}

    def prefill(self, x: jax.Array, state: dict, ctx: Context) -> tuple[jax.Array, dict]:
        """x [B, T, D] at cache slots ctx.index.. -> (out [B, T, D], cache with their keys and values)."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x, ctx.positions)
        state = {
            name: jax.lax.dynamic_update_slice_in_dim(state[name], new.astype(state[name].dtype), ctx.index, 1)
            for name, new in (("k", k), ("v", v))
        }
        return self.wo(self.cached_attention(q, state, ctx).reshape(b, t, -1)), state


@registry.register("transformer", PRESETS)
class Transformer(LanguageModel):
    """Decoder-only LM; `attention(cfg, spec, layer)` picks each layer's attention module (subclasses)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=cfg.dtype)
        specs = cfg.layer_specs()
        self.blocks = make_stack(
            cfg,
            lambda i: PreNormBlock(lambda: self.attention_module(specs[i])(cfg, specs[i], rngs=rngs), cfg, rngs=rngs),
        )
        self.final_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
        self.unembed = (
            None
            if cfg.tie_embeddings
            else Linear(cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs, dtype=cfg.dtype)
        )

    def attention_module(self, spec: AttentionSpec) -> type[Attention]:
        """The attention class of a layer with pattern `spec` (the baseline: `Attention` everywhere)."""
        del spec
        return Attention

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.embed(tokens).astype(jnp.float32)

    def logits(self, x: jax.Array) -> jax.Array:
        return lm_logits(self.final_norm(x), self.embed, self.unembed, self.config.d_model**-0.5)

    @classmethod
    def describe(cls, cfg: TransformerConfig, seq_len: int) -> list[str]:
        """`zoo info`: the attention cost of the layer schedule vs all-full attention."""
        f = attention_flops(cfg, seq_len)
        n_full = sum(k == "full" for k in f["kinds"])
        return [
            f"attention  {f['total'] / 1e9:,.3f} GFLOP forward at length {seq_len} with {n_full}/"
            f"{len(f['kinds'])} full layers vs {f['all_full'] / 1e9:,.3f} GFLOP all-full "
            f"({100 * f['ratio']:.1f}%)"
        ]


def pairs_per_layer(kind: str, seq_len: int, window: int, block: int) -> int:
    """Causal (query, key) pairs a layer of this kind computes at length T (query sees itself)."""
    t = seq_len
    if kind == "full":
        return t * (t + 1) // 2
    if kind == "window":
        w = min(window, t)
        return w * (w + 1) // 2 + (t - w) * w
    if kind == "block":
        n_full, rest = divmod(t, block)
        return n_full * block * (block + 1) // 2 + rest * (rest + 1) // 2
    raise ValueError(f"unknown attention kind {kind!r}")


def attention_flops(cfg: TransformerConfig, seq_len: int) -> dict:
    """Attention FLOPs of one forward pass over `seq_len` tokens: the schedule vs all-full.

    Counts the score and value matmuls only (2 * 2 * P FLOPs per visible (query, key) pair and
    head: q.k and p.v), i.e. what an exact block-sparse kernel needs; projections and MLPs are the
    same for every schedule and are left out.

    Returns:
      {"seq_len", "per_layer": [FLOPs], "kinds", "total", "all_full", "ratio"} (ratio = total / all_full).
    """
    kinds = cfg.layer_attention or (cfg.attention,) * cfg.n_layers
    per_pair = 4 * cfg.n_heads * cfg.head_dim
    per_layer = [per_pair * pairs_per_layer(k, seq_len, cfg.window, cfg.block) for k in kinds]
    full = per_pair * pairs_per_layer("full", seq_len, cfg.window, cfg.block) * cfg.n_layers
    total = sum(per_layer)
    return {
        "seq_len": int(seq_len),
        "kinds": list(kinds),
        "per_layer": per_layer,
        "total": total,
        "all_full": full,
        "ratio": total / full,
    }
