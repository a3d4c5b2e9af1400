"""Shared layers: the leaves every model in the zoo is built from.

Shape notation used across the zoo (docs/notation.md): B batch, T time (query length), S key length
or cache slots, D model width, H heads, K kv heads, P head dim, F feed-forward width, V vocabulary,
N state size, G groups, Q chunk, L layers.
"""

from zoo.layers.attention import ATTENTION_KINDS, AttentionSpec, attend, attention_mask, self_attention
from zoo.layers.conv import direct_conv, fft_conv
from zoo.layers.linear import Embed, Linear, lm_logits, param
from zoo.layers.mlp import SwiGLU
from zoo.layers.norms import RMSNorm, rms_norm
from zoo.layers.rope import apply_rope

__all__ = [
    "ATTENTION_KINDS",
    "AttentionSpec",
    "attend",
    "attention_mask",
    "self_attention",
    "direct_conv",
    "fft_conv",
    "Embed",
    "Linear",
    "lm_logits",
    "param",
    "SwiGLU",
    "RMSNorm",
    "rms_norm",
    "apply_rope",
]
