"""Parity tests for pallas_kernels.cauchy (Cauchy and log-Vandermonde products).

Oracle: the fp32 reference (itself checked against a float64 NumPy evaluation). Every other
implementation runs at complex64; errors are max|out - ref| / max|ref| (relative to the output scale,
since the sums cancel) and must stay below the tolerance table. Pallas runs with interpret=True on CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.cauchy import BlockSizes, cauchy, pallas_cauchy, reference, vandermonde

# relative (to max|ref|) tolerance per dtype; forward and gradient
TOL = {jnp.complex64: {"fwd": 2e-5, "grad": 5e-5}}
DTYPE = jnp.complex64

# sampled sweep over N in 4..256 and L in 1..4096 (odd sizes on purpose), with batch shapes
SWEEP = [
    (4, 1, ()),
    (5, 7, (3,)),
    (16, 129, (2, 3)),
    (37, 300, (1,)),
    (64, 1024, (2,)),
    (256, 4096, ()),
    (100, 2049, (3,)),
]
IMPLS = ["xla", "pallas"]


def _rel_err(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _s4_like(rng, batch, n, length):
    """Operands shaped like S4: poles w = dt*A with Re(A)=-1/2, nodes z on the imaginary axis."""
    c = lambda *s: (rng.normal(size=s) + 1j * rng.normal(size=s)).astype(np.complex64)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=(*batch, 1)))
    a = -0.5 + 1j * np.pi * np.arange(n)
    w = (dt * a).astype(np.complex64)  # [...,N]
    omega = np.exp(-2j * np.pi * np.arange(length) / (2 * length + 1))
    z = (2 * (1 - omega) / (1 + omega)).astype(np.complex64)  # [L], purely imaginary
    v = c(*batch, n) * dt.astype(np.float32)
    return jnp.asarray(v), jnp.asarray(z), jnp.asarray(w)


def _vdm_operands(rng, batch, n):
    c = lambda *s: (rng.normal(size=s) + 1j * rng.normal(size=s)).astype(np.complex64)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=(*batch, 1)))
    x = (dt * (-0.5 + 1j * np.pi * np.arange(n))).astype(np.complex64)  # S4D-Lin, ZOH log-nodes
    return jnp.asarray(c(*batch, n)), jnp.asarray(x)


def _call(fn, impl, *args, **kw):
    return fn(*args, implementation=impl, interpret=True, **kw)


class TestReferenceOracle:
    """The fp32 reference agrees with a float64 NumPy evaluation of the definitions."""

    def test_cauchy_reference_vs_float64(self):
        rng = np.random.default_rng(0)
        v, z, w = _s4_like(rng, (2,), 24, 50)
        vn, zn, wn = (np.asarray(t, np.complex128) for t in (v, z, w))
        want = (vn[..., :, None] / (zn - wn[..., :, None])).sum(-2)
        want += (np.conj(vn)[..., :, None] / (zn - np.conj(wn)[..., :, None])).sum(-2)
        assert _rel_err(reference.cauchy(v, z, w), want) < 1e-6

    def test_vandermonde_reference_vs_float64(self):
        rng = np.random.default_rng(1)
        v, x = _vdm_operands(rng, (3,), 16)
        vn, xn = np.asarray(v, np.complex128), np.asarray(x, np.complex128)
        want = 2 * (vn[..., :, None] * np.exp(xn[..., :, None] * np.arange(200))).sum(-2).real
        assert _rel_err(reference.vandermonde(v, x, 200), want) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
class TestParity:
    """Each implementation matches the reference: forward, gradients, odd shapes, broadcasting."""

    @pytest.mark.parametrize("n,length,batch", SWEEP)
    @pytest.mark.parametrize("conj", [True, False])
    def test_cauchy_forward(self, impl, n, length, batch, conj):
        v, z, w = _s4_like(np.random.default_rng(n + length), batch, n, length)
        got = _call(cauchy, impl, v, z, w, conj=conj)
        want = reference.cauchy(v, z, w, conj=conj)
        assert got.shape == (*batch, length) and got.dtype == DTYPE
        assert _rel_err(got, want) < TOL[DTYPE]["fwd"]

    @pytest.mark.parametrize("n,length,batch", SWEEP)
    @pytest.mark.parametrize("conj", [True, False])
    def test_vandermonde_forward(self, impl, n, length, batch, conj):
        v, x = _vdm_operands(np.random.default_rng(n * length), batch, n)
        got = _call(vandermonde, impl, v, x, length, conj=conj)
        want = reference.vandermonde(v, x, length, conj=conj)
        assert got.shape == (*batch, length) and got.dtype == want.dtype
        assert _rel_err(got, want) < TOL[DTYPE]["fwd"]

    @pytest.mark.parametrize("n,length,batch", [(4, 1, ()), (37, 300, (2,)), (64, 1024, (2, 1))])
    @pytest.mark.parametrize("conj", [True, False])
    def test_cauchy_vjp(self, impl, n, length, batch, conj):
        rng = np.random.default_rng(7 + n)
        v, z, w = _s4_like(rng, batch, n, length)
        g = jnp.asarray(
            (rng.normal(size=(*batch, length)) + 1j * rng.normal(size=(*batch, length))).astype(np.complex64)
        )
        _, vjp_ref = jax.vjp(lambda *a: reference.cauchy(*a, conj=conj), v, z, w)
        _, vjp_got = jax.vjp(lambda *a: _call(cauchy, impl, *a, conj=conj), v, z, w)
        for name, a, b in zip("vzw", vjp_got(g), vjp_ref(g)):
            assert a.shape == b.shape, name
            assert _rel_err(a, b) < TOL[DTYPE]["grad"], name

    @pytest.mark.parametrize("n,length,batch", [(4, 1, ()), (37, 300, (2,)), (64, 1024, (2, 1))])
    @pytest.mark.parametrize("conj", [True, False])
    def test_vandermonde_vjp(self, impl, n, length, batch, conj):
        rng = np.random.default_rng(11 + n)
        v, x = _vdm_operands(rng, batch, n)
        out = reference.vandermonde(v, x, length, conj=conj)
        g = rng.normal(size=out.shape) + (0 if conj else 1j * rng.normal(size=out.shape))
        g = jnp.asarray(g, out.dtype)
        _, vjp_ref = jax.vjp(lambda *a: reference.vandermonde(*a, length, conj=conj), v, x)
        _, vjp_got = jax.vjp(lambda *a: _call(vandermonde, impl, *a, length, conj=conj), v, x)
        for name, a, b in zip("vx", vjp_got(g), vjp_ref(g)):
            assert _rel_err(a, b) < TOL[DTYPE]["grad"], name

    def test_broadcast_poles_and_grad(self, impl):
        """w [H,N] shared across a leading batch of v [4,H,N]: output and grad wrt w (summed)."""
        rng = np.random.default_rng(3)
        v, z, w = _s4_like(rng, (3,), 8, 33)
        v4 = jnp.stack([v * (k + 1) for k in range(4)])  # [4,3,8]
        loss = lambda fn: lambda v_, w_: jnp.sum(jnp.abs(fn(v_, z, w_)) ** 2)
        got = jax.grad(loss(lambda *a: _call(cauchy, impl, *a)), argnums=(0, 1))(v4, w)
        want = jax.grad(loss(reference.cauchy), argnums=(0, 1))(v4, w)
        assert got[1].shape == w.shape
        for a, b in zip(got, want):
            assert _rel_err(a, b) < TOL[DTYPE]["grad"]

    def test_jit_equals_eager(self, impl):
        v, z, w = _s4_like(np.random.default_rng(5), (2,), 19, 77)
        jitted = jax.jit(lambda *a: _call(cauchy, impl, *a))(v, z, w)
        eager = _call(cauchy, impl, v, z, w)
        want = reference.cauchy(v, z, w)
        assert _rel_err(jitted, want) < TOL[DTYPE]["fwd"] and _rel_err(eager, want) < TOL[DTYPE]["fwd"]
        assert _rel_err(jitted, eager) < TOL[DTYPE]["fwd"]


def test_pallas_block_sizes_do_not_change_result():
    v, z, w = _s4_like(np.random.default_rng(9), (5,), 70, 200)
    outs = [
        pallas_cauchy.cauchy_sum(v, jnp.broadcast_to(z, (5, 200)), w, block_sizes=bs, interpret=True)
        for bs in (BlockSizes(8, 32, 128), BlockSizes(1, 8, 32), BlockSizes(2, 128, 256))
    ]
    for o in outs[1:]:
        assert _rel_err(o, outs[0]) < 1e-6


def test_pallas_tpu_interpreter_small():
    """One tiny run under the TPU-semantics interpreter (catches out-of-bounds block reads)."""
    from jax.experimental.pallas import tpu as pltpu

    v, z, w = _s4_like(np.random.default_rng(2), (3,), 20, 100)
    got = cauchy(v, z, w, implementation="pallas", interpret=pltpu.InterpretParams())
    assert _rel_err(got, reference.cauchy(v, z, w)) < TOL[DTYPE]["fwd"]


def test_zero_length_and_empty_batch():
    v, z, w = _s4_like(np.random.default_rng(4), (2,), 4, 3)
    assert cauchy(v, z[:0], w, implementation="xla").shape == (2, 0)
    assert vandermonde(v, w, 0, implementation="xla").shape == (2, 0)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda v, z, w: cauchy(v, z, w[..., :3]), "last"),
        (lambda v, z, w: cauchy(v, z[None], w), "1-D"),
        (lambda v, z, w: cauchy(v, z, w, implementation="cuda"), "implementation"),
        (lambda v, z, w: cauchy(v[None].repeat(2, 0), z, jnp.stack([w] * 3)), "broadcast"),
        (lambda v, z, w: vandermonde(v, w, -1), "length"),
        (lambda v, z, w: cauchy(v.real.astype(jnp.int32), z, w), "dtype"),
    ],
)
def test_errors_name_the_argument(call, match):
    v, z, w = _s4_like(np.random.default_rng(0), (2,), 4, 5)
    with pytest.raises(ValueError, match=match):
        call(v, z, w)


@pytest.mark.parametrize("platform,backend", [("cuda", "gpu"), ("tpu", "tpu")])
def test_pallas_lowers_for_gpu_and_tpu(platform, backend, monkeypatch):
    """The Cauchy and Vandermonde kernels lower to Triton IR (GPU) and Mosaic (TPU) via jax.export (not
    compiled: no such device here). On GPU the Triton compiler parameters pick the Triton lowering."""
    from jax import export
    from jax._src.pallas.mosaic import tpu_info

    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    c = jax.ShapeDtypeStruct((8, 64), jnp.complex64)
    zs = jax.ShapeDtypeStruct((8, 256), jnp.complex64)

    def f(v, z, w):
        return (
            pallas_cauchy.cauchy_sum(v, z, w, backend=backend),
            pallas_cauchy.vandermonde_sum(v, w, 256, backend=backend),
            pallas_cauchy.vandermonde_transpose(z, w, power=1, backend=backend),
        )

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    text = export.export(jax.jit(f), platforms=(platform,), disabled_checks=checks)(c, zs, c).mlir_module()
    marker = "__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
    assert text.count(marker) >= 3, "all three kernels must be lowered"
