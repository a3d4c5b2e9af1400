"""RMSNorm, computed in fp32 whatever the compute dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.layers.linear import param


def rms_norm(x: jax.Array, scale: jax.Array | None, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, accumulated in fp32."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMS normalisation with a learned scale: x / sqrt(mean(x^2) + eps) * scale."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), wd=False)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.scale[...], self.eps)
