"""The companion SSM kernel K_l = c^T A^l b, A = S + a e_N^T (SpaceTime, Zhang et al. 2023, eq. 2-3).

    K = companion_kernel(L, a, b, c, method="fft")       # a, b, c [..., N] -> [..., L]
    X = companion_powers(L, a, b)                        # [A^l b]_{l<L}: [..., N, L]
    R = closed_loop_rows(H, a, b, k, r)                  # [r^T (A + b k^T)^h]_{h<H}: [..., N, H]

`method` picks the path: "fft" (`xla.companion_kernel_fft`, the default), "squaring" or
"sequential" (`reference`, dense A). All are differentiable by JAX's own rules (no custom VJP: the
paths are FFTs, scans and matmuls) and run on every backend; the op has no Pallas kernel.
"""

from __future__ import annotations

import jax

from .reference import companion_matrix, krylov_sequential, krylov_squaring, shift_matrix
from .xla import closed_loop_rows, companion_kernel_fft, companion_powers

KERNEL_METHODS = ("fft", "squaring", "sequential")


def companion_kernel(length: int, a: jax.Array, b: jax.Array, c: jax.Array, method: str = "fft") -> jax.Array:
    """K_l = c^T companion(a)^l b, l < L, by `method` in {"fft", "squaring", "sequential"}."""
    if method == "fft":
        return companion_kernel_fft(length, a, b, c)
    if method == "squaring":
        return krylov_squaring(length, companion_matrix(a), b, c)
    if method == "sequential":
        return krylov_sequential(length, companion_matrix(a), b, c)
    raise ValueError(f"kernel method {method!r} is not one of {KERNEL_METHODS}")


__all__ = [
    "KERNEL_METHODS",
    "closed_loop_rows",
    "companion_kernel",
    "companion_kernel_fft",
    "companion_matrix",
    "companion_powers",
    "krylov_sequential",
    "krylov_squaring",
    "shift_matrix",
]
