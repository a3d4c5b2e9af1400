"""The companion SSM's fast pure-JAX paths: the structure of A = S + a e_N^T instead of dense matmuls.

- `companion_kernel_fft`: K_l = c^T A^l b in O((N + L) log(N + L)) (SpaceTime, Zhang et al. 2023,
  sec. 3.3). With M = I - zS, Sherman-Morrison on I - zA = M - z a e_N^T gives the generating function
      sum_l K_l z^l = Q(c,b) + z Q(c,a) Q(e_N,b) / (1 - z Q(e_N,a)),   Q(u,v)(z) = u^T M^{-1} v,
  where Q(u,v) = sum_k z^k u^T S^k v is a degree-(N-1) polynomial whose coefficients are a
  cross-correlation (one FFT). The paper evaluates this at the L-th roots of unity with the
  truncation folded into c~ = (I - A^L)^T c; here the rational function is expanded as a power
  series mod z^L (FFT products and a Newton power-series inverse), which needs neither A^L nor a
  learned c~ and stays exact when eigenvalues sit on the unit circle (||a||_1 = 1 allows that,
  and then 1 - z Q(e_N, a) vanishes at roots of unity).
- `companion_powers`, `closed_loop_rows`: A x = shift(x) + a x_N in O(N) per step, for the states
  [A^l b] and the closed-loop rows r^T (A + b k^T)^h (instead of repeated squaring, O(N^3 log L)).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def companion_powers(length: int, a: jax.Array, b: jax.Array) -> jax.Array:
    """[A^l b]_{l<L} for A = companion(a) in O(L N): A x = S x + a x_{N-1} (shift, then add a column).

    a [..., N], b [..., N] -> [..., N, L]. The structured form of `krylov_sequential` with c = None.
    """
    a, b = jnp.broadcast_arrays(a, b)

    def step(x, _):
        nxt = jnp.concatenate([jnp.zeros_like(x[..., :1]), x[..., :-1]], axis=-1) + a * x[..., -1:]
        return nxt, x

    _, xs = jax.lax.scan(step, b, None, length=length)  # [L, ..., N]
    return jnp.moveaxis(xs, 0, -1)


def closed_loop_rows(length: int, a: jax.Array, b: jax.Array, k: jax.Array, r: jax.Array) -> jax.Array:
    """[r^T (A + b k^T)^h]_{h<H} for A = companion(a) in O(H N): r A = (r_2, .., r_N, r.a), plus (r.b) k.

    a, b, k [..., N], r [..., N] -> [..., N, H].
    """
    a, b, k, r = jnp.broadcast_arrays(a, b, k, r)

    def step(row, _):
        nxt = jnp.concatenate([row[..., 1:], jnp.sum(row * a, -1, keepdims=True)], axis=-1)
        return nxt + jnp.sum(row * b, -1, keepdims=True) * k, row

    _, rows = jax.lax.scan(step, r, None, length=length)  # [H, ..., N]
    return jnp.moveaxis(rows, 0, -1)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _poly_mul(p: jax.Array, q: jax.Array, n: int) -> jax.Array:
    """First n coefficients of the product of polynomials p [..., P] and q [..., Q] (via FFT)."""
    full = p.shape[-1] + q.shape[-1] - 1
    size = _next_pow2(full)
    r = jnp.fft.irfft(jnp.fft.rfft(p, size) * jnp.fft.rfft(q, size), size)[..., : min(n, full)]
    if n > full:
        r = jnp.pad(r, [(0, 0)] * (r.ndim - 1) + [(0, n - full)])
    return r


def _series_inverse(f: jax.Array, n: int) -> jax.Array:
    """g with f g = 1 mod z^n (f [..., F], f_0 != 0) by Newton: g <- g (2 - f g) mod z^{2m}."""
    g = 1.0 / f[..., :1]
    m = 1
    while m < n:
        m = min(2 * m, n)
        fg = _poly_mul(f[..., :m], g, m)  # 1 + O(z^{m/2})
        g = _poly_mul(g, (-fg).at[..., 0].add(2.0), m)
    return g


def _correlate(u: jax.Array, v: jax.Array) -> jax.Array:
    """Q(u, v)_k = u^T S^k v = sum_i u_i v_{i-k}, k = 0..N-1 (one FFT cross-correlation)."""
    n = u.shape[-1]
    size = _next_pow2(2 * n)  # no wrap-around for |lag| < N
    spec = jnp.fft.rfft(u, size) * jnp.conj(jnp.fft.rfft(v, size))
    return jnp.fft.irfft(spec, size)[..., :n]


def companion_kernel_fft(length: int, a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    """K_l = c^T A^l b for A = companion(a), l < L, in O((N + L) log(N + L)) (paper sec. 3.3).

    K(z) = Q(c,b) + z Q(c,a) Q(e_N,b) / D(z),  D(z) = 1 - z Q(e_N,a),  expanded mod z^L.
    a, b, c [..., N] (broadcastable) -> [..., L].
    """
    a, b, c = jnp.broadcast_arrays(a, b, c)
    q_cb = _correlate(c, b)  # [..., N]
    q_ca = _correlate(c, a)  # [..., N]
    q_eb = b[..., ::-1]  # Q(e_N, b)_k = b_{N-1-k}
    denom = jnp.concatenate([jnp.ones_like(a[..., :1]), -a[..., ::-1]], axis=-1)  # D(z), [..., N+1]
    inv = _series_inverse(denom, length)  # 1 / D mod z^L
    numer = _poly_mul(q_ca, q_eb, 2 * a.shape[-1] - 1)  # Q(c,a) Q(e_N,b)
    tail = _poly_mul(numer, inv, max(length - 1, 1))[..., : length - 1]
    n = a.shape[-1]
    head = q_cb[..., :length] if length <= n else jnp.pad(q_cb, [(0, 0)] * (q_cb.ndim - 1) + [(0, length - n)])
    return head.at[..., 1:].add(tail)  # times z: shift by one
