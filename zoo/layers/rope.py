"""Rotary position embeddings (Su et al., 2021), half-split layout, with the context-extension
scalings of released checkpoints.

Pair j < P/2 of a head rotates dims (j, j + P/2) by angle pos * inv_freq[j] (Hugging Face's
`rotate_half` layout). Without scaling inv_freq[j] = theta^(-2j/P); `rope_inv_freq` gives the
scaled frequencies of:
- "linear" (position interpolation, Chen et al. 2023): inv_freq / factor;
- "llama3" (Llama 3.1): wavelengths above original/low_freq_factor divided by `factor`, below
  original/high_freq_factor unchanged, a linear blend in 1/wavelength between the two;
- "yarn" (Peng et al. 2023): interpolation and extrapolation blended by a linear ramp over the
  dims whose rotation count at the original length lies between beta_slow and beta_fast (the
  ramp bounds floored/ceiled when `truncate`); its attention factor (`apply_rope(scale=...)`,
  0.1 ln(factor) + 1 by default) multiplies cos and sin, so q.k by its square, as Hugging Face
  applies it.
"Dynamic" NTK scaling is not offered: it changes the frequencies with the current sequence
length, so keys cached at one length would not match queries at another.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

ROPE_SCALINGS = ("none", "linear", "llama3", "yarn")


def rope_inv_freq(
    head_dim: int,
    theta: float = 10_000.0,
    scaling: str = "none",
    *,
    factor: float = 1.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position: int = 0,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> np.ndarray:
    """The inverse frequencies float32 [P/2] of a RoPE scaling (see the module docstring).

    Computed in float64 and rounded once to float32 (the unscaled values equal `apply_rope`'s own
    theta^(-2j/P); Hugging Face's float32 torch arithmetic differs from them by at most 1 ulp).

    Raises:
      ValueError: for an unknown scaling or parameters it cannot use.
    """
    if scaling not in ROPE_SCALINGS:
        raise ValueError(f"rope scaling {scaling!r} is not one of {ROPE_SCALINGS}")
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}; choose an even head_dim")
    dim = head_dim
    pos_freqs = float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # [P/2] theta^(2j/P)
    inv_freq = 1.0 / pos_freqs
    if scaling == "none":
        return inv_freq.astype(np.float32)
    if factor <= 0:
        raise ValueError(f"rope factor={factor} must be > 0")
    if scaling == "linear":
        return (inv_freq / factor).astype(np.float32)
    if original_max_position < 1:
        raise ValueError(f"rope scaling {scaling!r} needs original_max_position >= 1, got {original_max_position}")
    if scaling == "llama3":
        if high_freq_factor <= low_freq_factor:
            raise ValueError(
                f"llama3 rope needs high_freq_factor ({high_freq_factor}) > low_freq_factor ({low_freq_factor})"
            )
        wavelen = 2 * math.pi / inv_freq
        smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = np.where(wavelen > original_max_position / low_freq_factor, inv_freq / factor, blended)
        out = np.where(wavelen < original_max_position / high_freq_factor, inv_freq, out)
        return out.astype(np.float32)

    # yarn: the dims rotating fewer than beta_slow times over the original length are interpolated,
    # those rotating more than beta_fast times extrapolated, a linear ramp in between.
    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a step instead of a ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    return (inv_freq / factor * ramp + inv_freq * (1 - ramp)).astype(np.float32)


def apply_rope(
    x: jax.Array,
    positions: jax.Array,
    theta: float = 10_000.0,
    *,
    inv_freq: np.ndarray | jax.Array | None = None,
    scale: float = 1.0,
) -> jax.Array:
    """Rotates x [B, T, H, P] by angle position * inv_freq in fp32 (half-split layout).

    Args:
      positions: [B, T] or [T] integer positions.
      theta: the base of the unscaled frequencies theta^(-2i/P), used when `inv_freq` is None.
      inv_freq: [P/2] frequencies (e.g. `rope_inv_freq` of a scaled RoPE); overrides theta.
      scale: multiplies cos and sin (YaRN's attention factor); 1 leaves the rotation alone.
    """
    p = x.shape[-1]
    if p % 2:
        raise ValueError(f"RoPE needs an even head dim, got {p}; choose an even head_dim")
    if inv_freq is None:
        inv_freq = theta ** (-jnp.arange(0, p // 2, dtype=jnp.float32) * 2.0 / p)  # [P/2]
    else:
        inv_freq = jnp.asarray(inv_freq, jnp.float32)
        if inv_freq.shape != (p // 2,):
            raise ValueError(f"inv_freq has shape {inv_freq.shape}; expected ({p // 2},) for head dim {p}")
    pos = jnp.asarray(positions, jnp.float32)
    if pos.ndim == 1:
        pos = pos[None]
    angles = pos[..., None] * inv_freq  # [B, T, P/2]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]  # [B, T, 1, P/2]
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
