"""The companion SSM's kernel by its definition: dense A = S + a e_N^T and Krylov products.

Shapes: N state size, L kernel length; leading dimensions broadcast. Everything is exact and
simple: `krylov_sequential` is the oracle (the loop x <- A x), `krylov_squaring` the same products
by repeated squaring of A (log2 L dense matmuls).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def companion_matrix(a: jax.Array) -> jax.Array:
    """A = S + a e_N^T (paper eq. 3): down-shift plus the last column a. a [..., N] -> A [..., N, N]."""
    n = a.shape[-1]
    shift = jnp.eye(n, k=-1, dtype=a.dtype)  # S[i+1, i] = 1
    last = jnp.zeros((n,), a.dtype).at[n - 1].set(1.0)  # e_N
    return shift + a[..., :, None] * last  # column N-1 holds a


def shift_matrix(n: int, dtype=jnp.float32) -> jax.Array:
    """The shift SSM's A = S (a companion matrix with a = 0)."""
    return jnp.eye(n, k=-1, dtype=dtype)


def krylov_sequential(length: int, A: jax.Array, b: jax.Array, c: jax.Array | None = None) -> jax.Array:
    """The oracle: [c^T A^l b]_{l<L} by the loop x <- A x.

    A [..., N, N], b [..., N], c [..., N] or None. Returns [..., L] (with c) or [..., N, L].
    """

    def step(x, _):
        out = x if c is None else jnp.sum(c * x, axis=-1)
        return jnp.einsum("...ij,...j->...i", A, x), out

    x0 = jnp.broadcast_to(b, jnp.broadcast_shapes(b.shape, A.shape[:-1]))
    _, outs = jax.lax.scan(step, x0, None, length=length)  # [L, ..., (N)]
    return jnp.moveaxis(outs, 0, -1)


def krylov_squaring(length: int, A: jax.Array, b: jax.Array, c: jax.Array | None = None) -> jax.Array:
    """[c^T A^l b]_{l<L} by repeated squaring: X <- [X, A^m X], A^m <- (A^m)^2 (log2 L matmuls).

    Same signature and result as `krylov_sequential`.
    """
    x = jnp.broadcast_to(b, jnp.broadcast_shapes(b.shape, A.shape[:-1]))[..., None]  # [..., N, 1]
    power = A  # A^m with m = x.shape[-1]
    while x.shape[-1] < length:
        m = x.shape[-1]
        take = min(m, length - m)
        x = jnp.concatenate([x, power @ x[..., :take]], axis=-1)  # append A^m [b, .., A^{take-1} b]
        if x.shape[-1] < length:
            power = power @ power
    x = x[..., :length]
    if c is None:
        return x
    return jnp.einsum("...nl,...n->...l", x, c)
