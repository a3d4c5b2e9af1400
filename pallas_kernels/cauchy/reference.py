"""Reference (obvious, slow, exact) Cauchy and log-Vandermonde products.

These materialise the full [..., N, L] interaction matrix and are the numerical oracle for the
"xla" and "pallas" implementations. Definitions (Gu et al. 2022, S4, Sec. 3.3 and Appendix C.3;
Gu et al. 2022, S4D, Sec. 3.1 / Eq. (6)):

    cauchy(v, z, w)[..., l]   = sum_n v[..., n] / (z[l] - w[..., n])
                                (+ conj(v[..., n]) / (z[l] - conj(w[..., n]))  when conj=True)
    vandermonde(v, x, L)[..., l] = sum_n v[..., n] * exp(x[..., n] * l),  l = 0..L-1
                                (2 * Re(...) when conj=True)

conj=True is S4's conjugate-symmetric half storage: N complex modes stand for 2N modes that come in
conjugate pairs.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Complex, Float


def cauchy(
    v: Complex[Array, "*batch N"],
    z: Complex[Array, " L"],
    w: Complex[Array, "*batch N"],
    *,
    conj: bool = True,
) -> Complex[Array, "*batch L"]:
    """Cauchy matrix-vector product, materialising the [..., N, L] matrix.

    Args:
      v: weights [..., N] complex.
      z: evaluation nodes [L] complex.
      w: poles [..., N] complex (broadcastable against v).
      conj: add the conjugate-pair terms (S4 half storage).

    Returns:
      [..., L] complex64.
    """
    v = jnp.asarray(v, jnp.complex64)[..., :, None]  # [...,N,1]
    w = jnp.asarray(w, jnp.complex64)[..., :, None]  # [...,N,1]
    z = jnp.asarray(z, jnp.complex64)  # [L]
    out = jnp.sum(v / (z - w), axis=-2)  # [...,L]
    if conj:
        out = out + jnp.sum(jnp.conj(v) / (z - jnp.conj(w)), axis=-2)
    return out


def vandermonde(
    v: Complex[Array, "*batch N"],
    x: Complex[Array, "*batch N"],
    length: int,
    *,
    conj: bool = True,
) -> Complex[Array, "*batch L"] | Float[Array, "*batch L"]:
    """Log-Vandermonde product sum_n v_n exp(x_n l), materialising [..., N, L].

    Args:
      v: weights [..., N] complex.
      x: log-nodes [..., N] complex (e.g. dt*A for ZOH, log(dA) for bilinear).
      length: L, the number of output positions l = 0..L-1.
      conj: return 2*Re(sum) (real float32), the conjugate-pair completion.

    Returns:
      [..., L]: float32 when conj, else complex64.
    """
    v = jnp.asarray(v, jnp.complex64)[..., :, None]  # [...,N,1]
    x = jnp.asarray(x, jnp.complex64)[..., :, None]  # [...,N,1]
    ell = jnp.arange(length, dtype=jnp.float32)  # [L]
    out = jnp.sum(v * jnp.exp(x * ell), axis=-2)  # [...,L]
    return 2.0 * out.real if conj else out
