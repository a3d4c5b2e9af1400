"""Public Cauchy and log-Vandermonde products with three implementations and a custom VJP.

    cauchy(v, z, w)[..., l] = sum_n v_n / (z_l - w_n)  (+ conj(v_n) / (z_l - conj(w_n)) if conj)
    vandermonde(v, x, L)[..., l] = sum_n v_n exp(x_n l)  (2 Re(...) if conj)

The S4 kernel (Gu et al. 2022, Appendix C.3, Lemma C.3 / Eq. (8)) evaluates its generating function
with Cauchy products at the roots of unity; S4D (Gu et al. 2022b, Eq. (6)) computes its kernel as a
Vandermonde product. Both are O(N L) work; the "xla" and "pallas" paths keep memory O(N + L) per batch
row, forward and backward.

Backward (JAX's cotangent convention: holomorphic maps transpose to multiplication by the derivative,
conj to conj). With g = d loss / d out (shape [..., L]) and K_p(a, x, y)[i] = sum_j a_j/(x_i - y_j)^p
(+ conj(a_j)/(x_i - conj(y_j))^p when conj):
    grad v = -K_1(g, w, z),   grad w = v * K_2(g, w, z),   grad z = -sum_batch g * K_2(v, z, w),
i.e. the backward of a Cauchy product is three Cauchy products of the same shape class. For the
Vandermonde product with T_p(g, x)[n] = sum_l g_l l^p exp(x_n l) and c = 2g if conj else g:
    grad v = T_0(c, x),   grad x = v * T_1(c, x).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Complex, Float

from pallas_kernels import dispatch, sharding

from . import pallas_cauchy as pallas_impl
from . import reference, xla

IMPLEMENTATIONS = dispatch.IMPLEMENTATIONS


def _as_complex(name: str, x) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype == jnp.complex128:
        raise ValueError(f"{name} has dtype complex128; the op computes in complex64, pass x.astype(jnp.complex64).")
    if not (jnp.issubdtype(x.dtype, jnp.complexfloating) or jnp.issubdtype(x.dtype, jnp.floating)):
        raise ValueError(f"{name} has dtype {x.dtype}; pass a complex64 (or float) array.")
    return x.astype(jnp.complex64)


def _batch_shape(v: jax.Array, u: jax.Array, name: str) -> tuple[int, ...]:
    """The broadcast batch shape of v [..., N] and the second operand `name` [..., N]."""
    if v.ndim < 1 or u.ndim < 1 or v.shape[-1] != u.shape[-1]:
        raise ValueError(f"v {v.shape} and {name} {u.shape} must share the last (state) dim N; pass both as [..., N].")
    try:
        return jnp.broadcast_shapes(v.shape[:-1], u.shape[:-1])
    except ValueError:
        raise ValueError(
            f"batch dims of v {v.shape[:-1]} and {name} {u.shape[:-1]} do not broadcast; make them equal."
        ) from None


def _flatten(a: jax.Array, batch: tuple[int, ...]) -> jax.Array:
    """[..., N] broadcast to `batch` and flattened to [B, N]."""
    return jnp.broadcast_to(a, (*batch, a.shape[-1])).reshape(-1, a.shape[-1])


def _rows_sharded(fn, impl: str, *operands):
    """fn(*operands) -> [B, L] from [B, N] rows and an optional [L] node vector, with the Pallas
    kernels' rows split over the mesh (every axis whose size divides B) and the [B, L] result
    all-gathered: it is a parameter-sized kernel (S4's), needed whole by the convolution."""
    if impl != "pallas":
        return fn(*operands)
    dims = tuple(("rows", None) if a.ndim == 2 else (None,) for a in operands)
    return sharding.shard_map_kernel(fn, operands, dims, ("rows", None))


def _sum_fn(impl: str, interpret):
    if impl == "xla":
        return xla.cauchy_sum
    return functools.partial(pallas_impl.cauchy_sum, interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _cauchy_flat(v, z, w, conj, impl, interpret):
    # v, w: [B,N]; z: [L]
    zb = jnp.broadcast_to(z, (v.shape[0], z.shape[0]))  # [B,L]
    return _sum_fn(impl, interpret)(v, zb, w, power=1, conj=conj)


def _cauchy_fwd(v, z, w, conj, impl, interpret):
    return _cauchy_flat(v, z, w, conj, impl, interpret), (v, z, w)


def _cauchy_bwd(conj, impl, interpret, res, g):
    v, z, w = res
    fn = _sum_fn(impl, interpret)
    zb = jnp.broadcast_to(z, g.shape)  # [B,L]
    g = g.astype(jnp.complex64)
    # the transposed Cauchy sums: evaluate at the poles w, with the nodes z as poles
    grad_v = -fn(g, w, zb, power=1, conj=conj)  # [B,N]
    grad_w = v * fn(g, w, zb, power=2, conj=conj)  # [B,N]
    grad_z = -jnp.sum(g * fn(v, zb, w, power=2, conj=conj), axis=0)  # [L]
    return grad_v, grad_z, grad_w


_cauchy_flat.defvjp(_cauchy_fwd, _cauchy_bwd)


def cauchy(
    v: Complex[Array, "*batch N"],
    z: Complex[Array, " L"],
    w: Complex[Array, "*batch N"],
    *,
    conj: bool = True,
    implementation: dispatch.Implementation = "auto",
    interpret=None,
) -> Complex[Array, "*batch L"]:
    """Cauchy product out[..., l] = sum_n v_n/(z_l - w_n) (+ conjugate-pair terms).

    Args:
      v: weights [..., N] complex64.
      z: nodes [L] complex64 (for S4: z_k = 2(1 - w_k)/(1 + w_k) at the roots of unity w_k).
      w: poles [..., N] complex64; batch dims broadcast against v.
      conj: add conj(v_n)/(z_l - conj(w_n)) (S4's conjugate-symmetric half storage).
      implementation: "auto" (pallas on TPU/GPU, xla on CPU), "reference", "xla" or "pallas".
      interpret: Pallas interpret mode (True, or a `pltpu.InterpretParams()`); None = on CPU only.

    Returns:
      [..., L] complex64. Differentiable wrt v, z and w.

    Raises:
      ValueError: on mismatched shapes, bad dtypes or an unknown implementation.
    """
    impl = dispatch.resolve(implementation)
    interpret = dispatch.resolve_interpret(impl, interpret)
    v, z, w = _as_complex("v", v), _as_complex("z", z), _as_complex("w", w)
    if z.ndim != 1:
        raise ValueError(f"z must be 1-D [L]; got shape {z.shape}. Flatten or loop over extra node sets.")
    batch = _batch_shape(v, w, "w")
    if impl == "reference":
        return reference.cauchy(v, z, w, conj=conj)
    vb, wb = _flatten(v, batch), _flatten(w, batch)  # [B,N]
    if vb.shape[0] == 0 or z.shape[0] == 0:
        return jnp.zeros((*batch, z.shape[0]), jnp.complex64)
    out = _rows_sharded(lambda v_, z_, w_: _cauchy_flat(v_, z_, w_, conj, impl, interpret), impl, vb, z, wb)  # [B,L]
    return out.reshape(*batch, z.shape[0])


def _vdm_fns(impl: str, interpret):
    if impl == "xla":
        return xla.vandermonde_sum, xla.vandermonde_transpose
    return (
        functools.partial(pallas_impl.vandermonde_sum, interpret=interpret),
        functools.partial(pallas_impl.vandermonde_transpose, interpret=interpret),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _vandermonde_flat(v, x, length, conj, impl, interpret):
    fwd, _ = _vdm_fns(impl, interpret)
    s = fwd(v, x, length)  # [B,L]
    return 2.0 * s.real if conj else s


def _vandermonde_fwd(v, x, length, conj, impl, interpret):
    return _vandermonde_flat(v, x, length, conj, impl, interpret), (v, x)


def _vandermonde_bwd(length, conj, impl, interpret, res, g):
    v, x = res
    _, transpose = _vdm_fns(impl, interpret)
    # cotangent of the complex sum S: 2g for out = 2 Re(S) (g real), g otherwise
    c = (2.0 * g).astype(jnp.complex64) if conj else g.astype(jnp.complex64)
    grad_v = transpose(c, x, power=0)  # [B,N]
    grad_x = v * transpose(c, x, power=1)  # [B,N]
    return grad_v, grad_x


_vandermonde_flat.defvjp(_vandermonde_fwd, _vandermonde_bwd)


def vandermonde(
    v: Complex[Array, "*batch N"],
    x: Complex[Array, "*batch N"],
    length: int,
    *,
    conj: bool = True,
    implementation: dispatch.Implementation = "auto",
    interpret=None,
) -> Float[Array, "*batch L"] | Complex[Array, "*batch L"]:
    """Log-Vandermonde product out[..., l] = sum_n v_n exp(x_n l), l = 0..L-1.

    With conj=True the conjugate-pair completion is returned: 2 Re(sum_n v_n exp(x_n l)), real.
    S4D-ZOH kernel: v = C (exp(dt A) - 1)/A B, x = dt A; S4D-bilinear: v = C dB, x = log(dA).

    Args:
      v: weights [..., N] complex64.
      x: log-nodes [..., N] complex64; batch dims broadcast against v.
      length: L >= 0, static.
      conj: return 2 Re(...) as float32 instead of the complex sum.
      implementation: "auto" (pallas on TPU/GPU, xla on CPU), "reference", "xla" or "pallas".
      interpret: Pallas interpret mode; None = on CPU only.

    Returns:
      [..., L] float32 (conj) or complex64. Differentiable wrt v and x.

    Raises:
      ValueError: on mismatched shapes, a bad length or an unknown implementation.
    """
    impl = dispatch.resolve(implementation)
    interpret = dispatch.resolve_interpret(impl, interpret)
    v, x = _as_complex("v", v), _as_complex("x", x)
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"length={length!r} must be a non-negative Python int (static).")
    batch = _batch_shape(v, x, "x")
    if impl == "reference":
        return reference.vandermonde(v, x, length, conj=conj)
    vb, xb = _flatten(v, batch), _flatten(x, batch)  # [B,N]
    if vb.shape[0] == 0 or length == 0:
        return jnp.zeros((*batch, length), jnp.float32 if conj else jnp.complex64)
    out = _rows_sharded(lambda v_, x_: _vandermonde_flat(v_, x_, length, conj, impl, interpret), impl, vb, xb)  # [B,L]
    return out.reshape(*batch, length)
