"""Long causal convolutions by FFT (S4's and SpaceTime's SSM kernels), and the direct oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _taps(k: jax.Array, t: int) -> jax.Array:
    """The first t taps of k [..., L] (zero-padded when L < t)."""
    if k.shape[-1] >= t:
        return k[..., :t]
    return jnp.pad(k, [(0, 0)] * (k.ndim - 1) + [(0, t - k.shape[-1])])


def fft_conv(u: jax.Array, k: jax.Array) -> jax.Array:
    """Causal convolution y_t = sum_{s <= t} k_{t-s} u_s along the last axis, by FFT, in fp32.

    Args:
      u: [..., T] the signal; k: [..., L] the kernel, broadcastable against u (L >= T uses the first
        T taps, L < T is zero-padded).

    Returns:
      [..., T] float32.
    """
    t = u.shape[-1]
    n = 1 << (2 * t - 1).bit_length()  # a power of two >= 2T: no wrap-around
    u_f = jnp.fft.rfft(u.astype(jnp.float32), n)
    k_f = jnp.fft.rfft(_taps(k, t).astype(jnp.float32), n)
    return jnp.fft.irfft(u_f * k_f, n)[..., :t]


def direct_conv(u: jax.Array, k: jax.Array) -> jax.Array:
    """The O(T^2) oracle of `fft_conv` (same arguments)."""
    t = u.shape[-1]
    lag = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]  # [T, T] = t - s
    taps = _taps(k, t).astype(jnp.float32)
    toeplitz = jnp.where(lag >= 0, taps[..., jnp.clip(lag, 0, t - 1)], 0.0)  # [..., T, T]
    return jnp.einsum("...ts,...s->...t", toeplitz, u.astype(jnp.float32))
