"""Rotary position embeddings (Su et al., 2021), half-split layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10_000.0) -> jax.Array:
    """Rotates x [B, T, H, P] by angle position * theta^(-2i/P) in fp32.

    positions: [B, T] or [T] integer positions.
    """
    p = x.shape[-1]
    if p % 2:
        raise ValueError(f"RoPE needs an even head dim, got {p}; choose an even head_dim")
    inv_freq = theta ** (-jnp.arange(0, p // 2, dtype=jnp.float32) * 2.0 / p)  # [P/2]
    pos = jnp.asarray(positions, jnp.float32)
    if pos.ndim == 1:
        pos = pos[None]
    angles = pos[..., None] * inv_freq  # [B, T, P/2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]  # [B, T, 1, P/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
