"""Shared layers: the leaves every model in the zoo is built from.

Shape notation used across the zoo: B batch, T time (query length), S key length, D model width,
H heads, K kv heads, P head dim, F feed-forward width, V vocabulary, N state size, G groups, Q chunk.
"""
from zoo.layers.attention import ATTENTION_KINDS, AttentionSpec, attend, attention_mask
from zoo.layers.linear import Embed, Linear, param
from zoo.layers.mlp import SwiGLU
from zoo.layers.norms import RMSNorm, rms_norm
from zoo.layers.rope import apply_rope

__all__ = [
    "ATTENTION_KINDS", "AttentionSpec", "attend", "attention_mask", "Embed", "Linear", "param",
    "SwiGLU", "RMSNorm", "rms_norm", "apply_rope",
]
