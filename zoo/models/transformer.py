"""The baseline: a decoder-only transformer (pre-norm, RoPE, RMSNorm, SwiGLU, GQA).

Every long-context model in the zoo is compared with this one, and MASFormer and HiP reuse its
layers with other attention patterns (`zoo.layers.attention`). Byte-level vocabulary (256) by default.

Block (pre-norm, residual stream in fp32):
    x = x + Attn(RMSNorm(x))       # causal, RoPE on q and k, pattern from the config
    x = x + SwiGLU(RMSNorm(x))
logits = RMSNorm(x) E^T / sqrt(D) when the embeddings are tied, else RMSNorm(x) W_out.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.layers import AttentionSpec, Embed, Linear, RMSNorm, SwiGLU, apply_rope, attend
from zoo.models import registry


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    vocab_size: int = 256
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 384
    rope_theta: float = 10_000.0
    tie_embeddings: bool = True
    attention: str = "full"                # pattern of every layer: full | window | block
    layer_attention: tuple[str, ...] = ()  # per-layer patterns (overrides `attention`), len n_layers
    window: int = 256                      # sliding-window size for "window" layers
    block: int = 256                       # block size for "block" layers
    norm_eps: float = 1e-6
    dtype: str = "float32"                 # compute dtype; params stay fp32

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.layer_attention and len(self.layer_attention) != self.n_layers:
            raise ValueError(f"layer_attention has {len(self.layer_attention)} entries but n_layers is "
                             f"{self.n_layers}; give one pattern per layer or leave it empty")

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
    "1.3b": TransformerConfig(vocab_size=50_304, d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16,
                              d_ff=5504, dtype="bfloat16"),
}


class Attention(nnx.Module):
    """Multi-head (grouped-query) causal self-attention with RoPE and a configurable pattern."""

    def __init__(self, cfg: TransformerConfig, spec: AttentionSpec, *, rngs: nnx.Rngs):
        d, h, kh, p = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.cfg, self.spec = cfg, spec
        self.wq = Linear(d, h * p, axes=("embed", "heads"), rngs=rngs, dtype=cfg.dtype)
        self.wk = Linear(d, kh * p, axes=("embed", "kv_heads"), rngs=rngs, dtype=cfg.dtype)
        self.wv = Linear(d, kh * p, axes=("embed", "kv_heads"), rngs=rngs, dtype=cfg.dtype)
        self.wo = Linear(h * p, d, axes=("heads", "embed"), rngs=rngs, dtype=cfg.dtype,
                         init_std=(h * p) ** -0.5 / (2 * cfg.n_layers) ** 0.5)

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.wq(x).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = self.wk(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = self.wv(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        return apply_rope(q, positions, cfg.rope_theta), apply_rope(k, positions, cfg.rope_theta), v

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, T, D]
        b, t, _ = x.shape
        pos = jnp.arange(t)
        q, k, v = self.qkv(x, pos)
        o = attend(q, k, v, q_pos=pos, k_pos=pos, spec=self.spec)
        return self.wo(o.reshape(b, t, -1))

    def decode(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, pos: jax.Array):
        """One token x [B, 1, D] at position `pos` against the cache [B, S, K, P]."""
        b = x.shape[0]
        q, k, v = self.qkv(x, jnp.full((1,), pos))
        k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, pos, 0, 0))
        v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, pos, 0, 0))
        slots = jnp.arange(k_cache.shape[1])
        o = attend(q, k_cache, v_cache, q_pos=jnp.full((b, 1), pos), k_pos=slots, spec=self.spec,
                   k_valid=jnp.broadcast_to(slots <= pos, (b, slots.shape[0])))
        return self.wo(o.reshape(b, 1, -1)), k_cache, v_cache


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, spec: AttentionSpec, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
        self.attn = Attention(cfg, spec, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff, rngs=rngs, dtype=cfg.dtype,
                          out_init_std=cfg.d_ff ** -0.5 / (2 * cfg.n_layers) ** 0.5)

    def __call__(self, x: jax.Array) -> jax.Array:  # x [B, T, D] fp32 residual stream
        x = x + self.attn(self.attn_norm(x)).astype(jnp.float32)
        return x + self.mlp(self.mlp_norm(x)).astype(jnp.float32)


@registry.register("transformer", PRESETS)
class Transformer(nnx.Module):
    """Decoder-only LM following the zoo's model protocol (`__call__`, `init_cache`, `decode_step`)."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=cfg.dtype)
        self.blocks = nnx.List([Block(cfg, spec, rngs=rngs) for spec in cfg.layer_specs()])
        self.final_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
        self.unembed = None if cfg.tie_embeddings else Linear(
            cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs, dtype=cfg.dtype)

    def logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        if self.unembed is None:
            return self.embed.attend(x) * self.config.d_model ** -0.5
        return self.unembed(x).astype(jnp.float32)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens int32 [B, T] -> logits float32 [B, T, V]."""
        x = self.embed(tokens).astype(jnp.float32)
        for block in self.blocks:
            x = block(x)
        return self.logits(x)

    def init_cache(self, batch_size: int, max_length: int) -> dict:
        """KV cache: k, v [L, B, S, K, P] in the compute dtype and the next position."""
        cfg = self.config
        shape = (cfg.n_layers, batch_size, max_length, cfg.n_kv_heads, cfg.head_dim)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        return {"k": zeros, "v": zeros, "pos": jnp.zeros((), jnp.int32)}

    def decode_step(self, tokens_t: jax.Array, cache: dict) -> tuple[jax.Array, dict]:
        """tokens_t int32 [B] -> (logits [B, V], updated cache)."""
        pos = cache["pos"]
        x = self.embed(tokens_t[:, None]).astype(jnp.float32)
        ks, vs = [], []
        for i, block in enumerate(self.blocks):
            h, k_i, v_i = block.attn.decode(block.attn_norm(x), cache["k"][i], cache["v"][i], pos)
            x = x + h.astype(jnp.float32)
            x = x + block.mlp(block.mlp_norm(x)).astype(jnp.float32)
            ks.append(k_i)
            vs.append(v_i)
        cache = {"k": jnp.stack(ks), "v": jnp.stack(vs), "pos": pos + 1}
        return self.logits(x)[:, 0], cache
