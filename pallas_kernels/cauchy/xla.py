"""Blocked pure-JAX Cauchy / log-Vandermonde sums (memory O(N + L) per batch row).

All functions work on flattened, already broadcast operands with one leading batch axis B and are
the building blocks of `api.py` (forward and the custom backward, which is itself made of the same
Cauchy-like sums). They loop (`lax.map` / `lax.scan`) over blocks of the long axis so that only a
[B, N, block] tile is live at any time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

DEFAULT_BLOCK = 256


def _pad_last(x: jax.Array, multiple: int, value=0) -> jax.Array:
    pad = (-x.shape[-1]) % multiple
    if pad == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=value)


# Same signature as pallas_cauchy.cauchy_sum: one signature, one implementation per path.
def cauchy_sum(
    a: jax.Array,  # [B,J] complex64 weights
    x: jax.Array,  # [B,I] complex64 evaluation points
    y: jax.Array,  # [B,J] complex64 poles
    *,
    power: int = 1,
    conj: bool = True,
    block: int = DEFAULT_BLOCK,
) -> jax.Array:  # [B,I] complex64
    """out[b,i] = sum_j a[b,j]/(x[b,i]-y[b,j])^p (+ conj(a)/(x - conj(y))^p when conj).

    Blocked over both axes (map over output blocks, scan-accumulate over summed blocks), so only a
    [B, block, block] tile is live: the forward (sum over N) and the backward (sum over L) alike.
    """
    n_b, n_i, n_j = x.shape[0], x.shape[-1], a.shape[-1]
    bi, bj = max(1, min(block, n_i)), max(1, min(block, n_j))
    xb = jnp.moveaxis(_pad_last(x, bi).reshape(n_b, -1, bi), 1, 0)  # [nI,B,bi]
    # split both axes into blocks; padded summed entries are masked out in `step`
    ab = jnp.moveaxis(_pad_last(a, bj).reshape(n_b, -1, bj), 1, 0)  # [nJ,B,bj]
    yb = jnp.moveaxis(_pad_last(y, bj).reshape(n_b, -1, bj), 1, 0)  # [nJ,B,bj]
    valid = jnp.arange(ab.shape[0] * bj).reshape(-1, 1, bj) < n_j  # [nJ,1,bj]

    def one_block(xc):  # xc [B,bi]
        def step(acc, inputs):
            ac, yc, ok = inputs  # [B,bj], [B,bj], [1,bj]
            a3, y3, ok3 = ac[:, :, None], yc[:, :, None], ok[:, :, None]
            # the Cauchy tile for this pair of blocks: [B,bj,bi]
            t = a3 / (xc[:, None, :] - y3) ** power
            if conj:
                t = t + jnp.conj(a3) / (xc[:, None, :] - jnp.conj(y3)) ** power
            return acc + jnp.sum(jnp.where(ok3, t, 0.0), axis=1), None

        out, _ = lax.scan(step, jnp.zeros(xc.shape, jnp.complex64), (ab, yb, valid))
        return out  # [B,bi]

    out = lax.map(one_block, xb)  # [nI,B,bi]
    return jnp.moveaxis(out, 0, 1).reshape(n_b, -1)[:, :n_i]


def vandermonde_sum(
    v: jax.Array,  # [B,N] complex64
    x: jax.Array,  # [B,N] complex64
    length: int,
    *,
    block: int = DEFAULT_BLOCK,
) -> jax.Array:  # [B,L] complex64
    """out[b,l] = sum_n v[b,n] exp(x[b,n] l), blocked over l."""
    block = max(1, min(block, length))
    n_blocks = -(-length // block)
    ells = jnp.arange(n_blocks * block, dtype=jnp.float32).reshape(n_blocks, block)  # [nL,bl]
    v3, x3 = v[:, :, None], x[:, :, None]  # [B,N,1]

    def one_block(ell):  # ell [bl]
        return jnp.sum(v3 * jnp.exp(x3 * ell), axis=1)  # [B,bl]

    out = lax.map(one_block, ells)  # [nL,B,bl]
    return jnp.moveaxis(out, 0, 1).reshape(v.shape[0], -1)[:, :length]


def vandermonde_transpose(
    g: jax.Array,  # [B,L] complex64
    x: jax.Array,  # [B,N] complex64
    *,
    power: int = 0,
    block: int = DEFAULT_BLOCK,
) -> jax.Array:  # [B,N] complex64
    """out[b,n] = sum_l g[b,l] l^p exp(x[b,n] l) (the Vandermonde transpose), blocked over l."""
    length = g.shape[-1]
    block = max(1, min(block, length))
    gp = _pad_last(g, block)  # [B,Lp]
    n_blocks = gp.shape[-1] // block
    gb = jnp.moveaxis(gp.reshape(g.shape[0], n_blocks, block), 1, 0)  # [nL,B,bl]
    ells = jnp.arange(n_blocks * block, dtype=jnp.float32).reshape(n_blocks, block)  # [nL,bl]
    x3 = x[:, :, None]  # [B,N,1]

    def step(acc, inputs):
        gc, ell = inputs  # [B,bl], [bl]
        # padded positions (l >= L) carry g = 0; mask them so exp overflow cannot make 0*inf
        e = jnp.where(ell < length, jnp.exp(x3 * ell), 0.0)  # [B,N,bl]
        w = gc[:, None, :] * (ell**power if power else 1.0)  # [B,1,bl]
        return acc + jnp.sum(w * e, axis=-1), None

    acc0 = jnp.zeros(x.shape, jnp.complex64)
    out, _ = lax.scan(step, acc0, (gb, ells))
    return out
