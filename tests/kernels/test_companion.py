"""The companion SSM kernel (pallas_kernels.companion): every method against a float64 loop, the
structured powers and closed-loop rows against dense Krylov products, and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.companion import api as companion
from pallas_kernels.companion import reference, xla


def _numpy_kernel(a, b, c, length):
    """float64 oracle: c^T A^l b with A = shift + a e_N^T, one kernel at a time."""
    out = np.zeros(a.shape[:-1] + (length,))
    for idx in np.ndindex(a.shape[:-1]):
        n = a.shape[-1]
        A = np.eye(n, k=-1)
        A[:, -1] = a[idx]
        x = b[idx].astype(np.float64)
        for l in range(length):
            out[idx + (l,)] = c[idx] @ x
            x = A @ x
    return out


def _abc(rng, shape, n, l1=True):
    a = rng.standard_normal(shape + (n,))
    if l1:
        a /= np.abs(a).sum(-1, keepdims=True)
    return [x.astype(np.float32) for x in (a, rng.standard_normal(shape + (n,)), rng.standard_normal(shape + (n,)))]


@pytest.mark.parametrize(
    "n,length,shape", [(1, 5, (2,)), (4, 1, (3,)), (8, 37, (2, 3)), (25, 9, (2,)), (16, 130, (3,))]
)
def test_kernel_methods_match_float64_loop(n, length, shape):
    a, b, c = _abc(np.random.default_rng(n * 1000 + length), shape, n)
    want = _numpy_kernel(a, b, c, length)
    scale = max(1.0, np.abs(want).max())
    for method in companion.KERNEL_METHODS:
        got = companion.companion_kernel(length, a, b, c, method)
        assert got.shape == shape + (length,)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5 * scale, err_msg=method)


def test_fft_kernel_with_eigenvalues_on_the_unit_circle():
    # a = e_1 makes A a cyclic permutation (all eigenvalues are N-th roots of unity, ||a||_1 = 1):
    # the roots-of-unity generating function has poles there; the power-series form does not.
    n, length = 8, 64
    a = np.zeros((1, n), np.float32)
    a[0, 0] = 1.0
    b, c = np.random.default_rng(0).standard_normal((2, 1, n)).astype(np.float32)
    want = _numpy_kernel(a, b, c, length)
    np.testing.assert_allclose(np.asarray(xla.companion_kernel_fft(length, a, b, c)), want, atol=1e-4)
    np.testing.assert_allclose(want[0, :n], want[0, n : 2 * n], atol=1e-9)  # period N, as expected


def test_structured_powers_match_dense_krylov():
    a, b, c = _abc(np.random.default_rng(5), (2,), 6)
    A = reference.companion_matrix(a)
    np.testing.assert_allclose(
        np.asarray(xla.companion_powers(11, a, b)), np.asarray(reference.krylov_sequential(11, A, b)), atol=1e-5
    )
    closed_t = jnp.swapaxes(A + b[:, :, None] * c[:, None, :], -1, -2)  # (A + b k^T)^T with k = c
    np.testing.assert_allclose(
        np.asarray(xla.closed_loop_rows(9, a, b, c, b)),
        np.asarray(reference.krylov_sequential(9, closed_t, b)),
        rtol=2e-5,
        atol=1e-5,
    )


def test_kernel_gradients_agree():
    a, b, c = _abc(np.random.default_rng(1), (3,), 6)
    cot = np.random.default_rng(2).standard_normal((3, 20)).astype(np.float32)
    grads = {}
    for method in companion.KERNEL_METHODS:
        _, vjp = jax.vjp(lambda a, b, c, m=method: companion.companion_kernel(20, a, b, c, m), a, b, c)
        grads[method] = vjp(jnp.asarray(cot))
    for method in ("fft", "squaring"):
        for g, ref in zip(grads[method], grads["sequential"]):
            np.testing.assert_allclose(np.asarray(g), np.asarray(ref), rtol=1e-4, atol=1e-4)
