"""The baseline: a decoder-only transformer (pre-norm, RoPE, RMSNorm, SwiGLU, GQA).

Every long-context model in the zoo is compared with this one, and MASFormer and HiP reuse its
layers with other attention patterns (`zoo.layers.attention`). Byte-level vocabulary (256) by default.

Block (pre-norm, residual stream in fp32):
    x = x + Attn(RMSNorm(x))       # causal, RoPE on q and k, pattern from the config
    x = x + SwiGLU(RMSNorm(x))
logits = RMSNorm(x) E^T / sqrt(D) when the embeddings are tied, else RMSNorm(x) W_out.
The options of the Llama-family checkpoints it imports (`zoo.convert.hf`: Llama, Qwen2, Mistral) are
config fields whose defaults keep the zoo's own model: scaled RoPE, q/k/v and output biases, an
explicit head width, unscaled tied logits (`scale_tied_logits=False`), the sliding window.

Training attention goes through `zoo.layers.self_attention` (cuDNN on GPU, splash on TPU, the XLA
oracle on CPU); decoding and prefill attend over a KV cache [B, S, K, P] per layer.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zoo.layers import AttentionSpec, Embed, Linear, RMSNorm, apply_rope, attend, lm_logits, self_attention
from zoo.layers.rope import rope_inv_freq
from zoo.models import registry
from zoo.models.base import Context, LanguageModel, LMConfig, PreNormBlock, make_stack


@dataclasses.dataclass(frozen=True)
class TransformerConfig(LMConfig):
    """The transformer's shape and the options of the Llama-family checkpoints it imports.

    Attributes:
      n_heads, n_kv_heads, d_ff: attention heads, key/value heads (GQA) and SwiGLU width.
      head_dim_override: per-head width when it is not d_model / n_heads (0 = d_model / n_heads).
      rope_theta: RoPE base. rope_scaling: "none" | "linear" | "llama3" | "yarn" (`zoo.layers.rope`),
        with rope_factor, rope_low_freq_factor / rope_high_freq_factor (llama3),
        rope_original_max_position (llama3, yarn), rope_beta_fast / rope_beta_slow / rope_truncate
        (yarn) and rope_attention_factor (multiplies RoPE's cos and sin; yarn's 0.1 ln(factor) + 1).
      qkv_bias, o_bias: biases on the q/k/v projections (Qwen2; Llama's attention_bias sets both)
        and on the output projection.
      tie_embeddings: the output head is the transposed embedding.
      scale_tied_logits: multiply tied logits by d_model^-0.5 (the zoo's own models; Hugging Face
        checkpoints do not scale).
      attention, layer_attention, window, block: the attention pattern of every layer (window: the
        keys i - window < j <= i, Mistral's sliding window).
      norm_eps: RMSNorm epsilon.
    """

    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 384
    head_dim_override: int = 0
    rope_theta: float = 10_000.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    rope_attention_factor: float = 1.0
    qkv_bias: bool = False
    o_bias: bool = False
    tie_embeddings: bool = True
    scale_tied_logits: bool = True
    attention: str = "full"  # pattern of every layer: full | window | block
    layer_attention: tuple[str, ...] = ()  # per-layer patterns (overrides `attention`), len n_layers
    window: int = 256  # sliding-window size for "window" layers
    block: int = 256  # block size for "block" layers
    norm_eps: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        if self.head_dim_override < 0 or self.head_dim_override % 2:
            raise ValueError(
                f"head_dim_override={self.head_dim_override} must be 0 (d_model / n_heads) or a positive even width"
            )
        if not self.head_dim_override and self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads})")
        if self.layer_attention and len(self.layer_attention) != self.n_layers:
            raise ValueError(
                f"layer_attention has {len(self.layer_attention)} entries but n_layers is "
                f"{self.n_layers}; give one pattern per layer or leave it empty"
            )
        if self.rope_theta <= 0 or self.rope_attention_factor <= 0:
            raise ValueError(
                f"rope_theta ({self.rope_theta}) and rope_attention_factor ({self.rope_attention_factor}) must be > 0"
            )
        self.rope_frequencies()  # validates the RoPE scaling
        self.layer_specs()  # validates the kinds, window and block

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.d_model // self.n_heads

    def rope_frequencies(self) -> np.ndarray | None:
        """RoPE's inverse frequencies [P/2] for a scaled RoPE; None for the plain theta^(-2j/P)."""
        if self.rope_scaling == "none":
            if self.head_dim % 2:
                raise ValueError(f"the head dim ({self.head_dim}) must be even for RoPE")
            return None
        return rope_inv_freq(
            self.head_dim,
            self.rope_theta,
            self.rope_scaling,
            factor=self.rope_factor,
            low_freq_factor=self.rope_low_freq_factor,
            high_freq_factor=self.rope_high_freq_factor,
            original_max_position=self.rope_original_max_position,
            beta_fast=self.rope_beta_fast,
            beta_slow=self.rope_beta_slow,
            truncate=self.rope_truncate,
        )

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
        bias = cfg.qkv_bias
        self.wq = Linear(d, h * p, axes=("embed", "heads"), rngs=rngs, dtype=cfg.dtype, use_bias=bias)
        self.wk = Linear(d, kh * p, axes=("embed", "kv_heads"), rngs=rngs, dtype=cfg.dtype, use_bias=bias)
        self.wv = Linear(d, kh * p, axes=("embed", "kv_heads"), rngs=rngs, dtype=cfg.dtype, use_bias=bias)
        self.wo = Linear(
            h * p,
            d,
            axes=("heads", "embed"),
            rngs=rngs,
            dtype=cfg.dtype,
            init_std=(h * p) ** -0.5 / (2 * cfg.n_layers) ** 0.5,
            use_bias=cfg.o_bias,
        )

    def qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] at positions [B, T] -> q [B, T, H, P], k, v [B, T, K, P] (RoPE on q, k)."""
        b, t, _ = x.shape
        cfg = self.cfg
        q = self.wq(x).reshape(b, t, cfg.n_heads, cfg.head_dim)
        k = self.wk(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        v = self.wv(x).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
        rope = dict(inv_freq=cfg.rope_frequencies(), scale=cfg.rope_attention_factor)
        return apply_rope(q, positions, cfg.rope_theta, **rope), apply_rope(k, positions, cfg.rope_theta, **rope), v

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

    paper = (
        "baseline: pre-norm, RoPE, RMSNorm, SwiGLU, GQA; full / window / block attention; Llama, Qwen2, Mistral options"
    )
    numerical_core = "attention dispatch: cuDNN / splash / Pallas / XLA"
    attention = "dispatch"
    convertible_from = "transformer"

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

    def cache_capacity(self, cache: dict) -> int:
        """The KV cache's slots S (k is [B, S, K, P] per layer, [n / p, B, S, K, P] when scanned)."""
        return int(cache["layers"][0]["k"].shape[-3])

    def logits(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        return lm_logits(
            self.final_norm(x), self.embed, self.unembed, cfg.d_model**-0.5 if cfg.scale_tied_logits else 1.0
        )

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
