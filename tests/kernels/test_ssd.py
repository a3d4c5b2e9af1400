"""Tests of the SSD op (pallas_kernels/ssd): every implementation against the recurrence.

Oracles: a float64 NumPy loop over time (the forward of every implementation, the reference
included) and the float32 `lax.scan` reference (`jax.vjp` gradients of the chunked paths).
Implementations, each at the test dtype: "reference", "xla", "pallas" (the Triton kernel family,
`interpret=True` on CPU) and "pallas_tpu" (the Mosaic kernel family, `interpret=True`). One tiny
forward and one tiny backward run under the TPU interpreter (`pltpu.InterpretParams()`), and every
kernel is lowered (not run: no such device here) to Triton IR and Mosaic with `jax.export`,
forward and backward.
"""

import functools
import re

import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ssd import IMPLEMENTATIONS, pallas_gpu, ssd, ssd_pallas, ssd_step

IMPLS = ("reference", "xla", "pallas", "pallas_tpu")
CHUNKED = ("xla", "pallas", "pallas_tpu")
PALLAS = ("pallas", "pallas_tpu")
# (atol, rtol) of the forward against the float64 oracle, per input dtype; outputs are O(1)-O(10).
TOL = {jnp.float32: (1e-4, 1e-4), jnp.bfloat16: (6e-2, 3e-2)}
# Gradients: max |g - g_ref| / max |g_ref| per input, per input dtype.
GRAD_TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
GRAD_NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


# 16-wide tiles for the Triton family: several row tiles per chunk, several [bp,bn] state tiles and
# several N slices (with P = 24, N = 40 padded to 32, 64), the loops that 64-wide tiles skip.
SMALL_TILES = pallas_gpu.GpuBlockSizes(bq=16, bp=16, bn=16, bm=16, num_warps=4, num_stages=1)


def ssd_impl(impl, block_sizes=None):
    """`ssd`-like callable (returns (y, final)) for an implementation name of this file."""
    if impl == "pallas_tpu":
        return functools.partial(ssd_pallas, backend="tpu", interpret=True)
    if impl == "pallas":
        return functools.partial(ssd_pallas, backend="gpu", interpret=True, block_sizes=block_sizes)
    return functools.partial(ssd, implementation=impl, return_final_states=True)


def make_inputs(
    seed,
    batch=2,
    seqlen=200,
    heads=4,
    head_dim=8,
    groups=2,
    d_state=16,
    *,
    dtype=jnp.float32,
    d_per_p=False,
    init=True,
    gate=True,
    minimal=False,
):
    """Random inputs in the upstream test ranges (dt = softplus(randn - 4) after the bias)."""
    rng = np.random.default_rng(seed)  # NumPy draws: no per-shape jax compiles in the tests

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def uniform(lo, hi, *shape):
        return jnp.asarray(rng.uniform(lo, hi, shape), jnp.float32)

    args = {
        "x": normal(batch, seqlen, heads, head_dim),
        "dt": normal(batch, seqlen, heads) - 2.0,
        "A": -jnp.exp(uniform(-1.0, 1.0, heads)),
        "B": normal(batch, seqlen, groups, d_state) / 2,
        "C": normal(batch, seqlen, groups, d_state),
    }
    kw = {"D": normal(heads, head_dim) if d_per_p else normal(heads), "dt_bias": uniform(-2.0, 0.0, heads)}
    if gate:
        kw["z"] = normal(batch, seqlen, heads, head_dim)
    if init:
        kw["initial_states"] = normal(batch, heads, head_dim, d_state)
    if minimal:  # only x, dt, A, B, C
        kw = {}

    def cast(name, a):  # dt, A, D, dt_bias and the states stay fp32 (the model keeps them so)
        return a.astype(dtype) if name in ("x", "B", "C", "z") else a

    return {k: cast(k, v) for k, v in args.items()}, {k: cast(k, v) for k, v in kw.items()}


@functools.cache
def _compiled(impl, chunk_size):
    return jax.jit(functools.partial(ssd_impl(impl), chunk_size=chunk_size, dt_softplus=True))


def run(impl, chunk_size, **arrays):
    """(y, final) of ssd(..., dt_softplus=True) under jit (one compile per configuration)."""
    return _compiled(impl, chunk_size)(**arrays)


def numpy_oracle(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=True, initial_states=None, seq_idx=None):
    """The recurrence in float64 NumPy, one step at a time: (y [B,T,H,P], h_T [B,H,P,N])."""

    def f(a):
        return None if a is None else np.asarray(jnp.asarray(a, jnp.float32), np.float64)

    x, dt, A, B, C, D, z, dt_bias, h = map(f, (x, dt, A, B, C, D, z, dt_bias, initial_states))
    batch, seqlen, heads, head_dim = x.shape
    rep = heads // B.shape[2]
    B, C = np.repeat(B, rep, axis=2), np.repeat(C, rep, axis=2)  # [B,T,H,N]
    if dt_bias is not None:
        dt = dt + dt_bias
    if dt_softplus:
        dt = np.logaddexp(0.0, dt)
    if h is None:
        h = np.zeros((batch, heads, head_dim, B.shape[-1]))
    seq = None if seq_idx is None else np.asarray(seq_idx)
    y = np.zeros_like(x)
    for t in range(seqlen):
        if seq is not None and t > 0:
            h = h * (seq[:, t] == seq[:, t - 1])[:, None, None, None]
        h = np.exp(dt[:, t] * A)[..., None, None] * h + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        y[:, t] = np.einsum("bhpn,bhn->bhp", h, C[:, t])
    if D is not None:
        y = y + x * (D[:, None] if D.ndim == 1 else D)
    if z is not None:
        y = y * z / (1.0 + np.exp(-z))
    return y, h


def assert_close(actual, expected, dtype, tol=TOL):
    """allclose within the dtype's tolerance; the expected value must be finite and nonzero."""
    expected = np.asarray(expected, np.float32)
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    assert np.all(np.isfinite(expected)) and np.any(expected != 0), "vacuous comparison"
    assert actual.shape == expected.shape
    atol, rtol = tol[dtype]
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=rtol)


def seq_idx_for(batch, lengths, values):
    """[batch, sum(lengths)] int32 sequence indices (the same packing in every row)."""
    ids = np.concatenate([np.full(n, v) for n, v in zip(lengths, values)])
    return jnp.broadcast_to(jnp.asarray(ids, jnp.int32)[None], (batch, len(ids)))


# (seqlen, chunk_size, groups, options): odd T, chunk 16/32/256, G = 1 < H, 1 < G < H, G = H, T = 1,
# head dim 72, N not a power of two, D per head or per (head, p), with and without gate / initial
# state. The chunk-256 case is the released presets' chunk, sized down (T just over Q).
FWD_CASES = [
    pytest.param(200, 16, 2, {}, id="T200-Q16-G2"),
    pytest.param(300, 256, 1, {"heads": 2, "batch": 1}, id="T300-Q256-G1"),
    pytest.param(
        70,
        32,
        4,
        {"head_dim": 72, "d_state": 10, "batch": 1, "d_per_p": True, "gate": False, "init": False},
        id="T70-Q32-GH-P72-N10-Dhp-nogate",
    ),
    pytest.param(1, 16, 4, {}, id="T1-Q16-GH"),
]


@pytest.mark.parametrize("impl", IMPLS)
class TestSSDParity:
    """The shared parity suite: every implementation computes the recurrence."""

    @pytest.mark.parametrize("seqlen,chunk,groups,opts", FWD_CASES)
    def test_forward_fp32(self, impl, seqlen, chunk, groups, opts):
        args, kw = make_inputs(0, seqlen=seqlen, groups=groups, **opts)
        y, h = run(impl, chunk, **args, **kw)
        y_ref, h_ref = numpy_oracle(**args, **kw)
        assert y.dtype == jnp.float32 and h.dtype == jnp.float32
        assert_close(y, y_ref, jnp.float32)
        assert_close(h, h_ref, jnp.float32)


@pytest.mark.parametrize("impl", CHUNKED)  # the reference computes in fp32 whatever the input dtype
class TestSSDChunked:
    def test_forward_bf16(self, impl):
        args, kw = make_inputs(1, seqlen=100, dtype=jnp.bfloat16)
        y, h = run(impl, 32, **args, **kw)
        y_ref, h_ref = numpy_oracle(**args, **kw)  # the oracle sees the same bf16-rounded inputs
        assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
        assert_close(y, y_ref, jnp.bfloat16)
        assert_close(h, h_ref, jnp.bfloat16)

    def test_final_state_chaining(self, impl):
        """Two halves with the carried state == one pass (split not on a chunk boundary); the reference
        is one lax.scan whose carried state is the scan carry, so only the chunked paths are checked."""
        args, kw = make_inputs(2, seqlen=150, groups=2)
        y_full, h_full = run(impl, 16, **args, **kw)
        split = 75  # two equal halves (one compile), not a multiple of the chunk
        first = {k: (v[:, :split] if v.ndim > 1 else v) for k, v in args.items()}
        second = {k: (v[:, split:] if v.ndim > 1 else v) for k, v in args.items()}
        y1, h1 = run(impl, 16, **first, **dict(kw, z=kw["z"][:, :split]))
        y2, h2 = run(impl, 16, **second, **dict(kw, z=kw["z"][:, split:], initial_states=h1))
        assert_close(jnp.concatenate([y1, y2], axis=1), y_full, jnp.float32)
        assert_close(h2, h_full, jnp.float32)
        assert_close(h2, h_full, jnp.float32)

    def test_seq_idx_packing(self, impl):
        """Packed sequences with seq_idx == each sequence run on its own (initial state -> first).

        The separate runs use the float64 oracle; the packed run also matches the oracle with seq_idx.
        """
        lengths = (37, 1, 50, 8)  # boundaries inside 16-chunks, a length-1 sequence
        assert any(np.cumsum(lengths)[:-1] % 16)
        args, kw = make_inputs(3, batch=1, seqlen=sum(lengths), groups=2)
        seq_idx = seq_idx_for(1, lengths, (4, 9, 2, 7))  # not sorted
        y_packed, h_packed = run(impl, 16, **args, **kw, seq_idx=seq_idx)
        outs, start = [], 0
        for i, n in enumerate(lengths):  # each sequence on its own, the initial state for the first
            part = {k: (v[:, start : start + n] if v.ndim > 1 else v) for k, v in args.items()}
            part_kw = dict(kw, z=kw["z"][:, start : start + n], initial_states=kw["initial_states"] if i == 0 else None)
            y_i, h_i = numpy_oracle(**part, **part_kw)
            outs.append(y_i)
            start += n
        assert_close(y_packed, np.concatenate(outs, axis=1), jnp.float32)
        assert_close(h_packed, h_i, jnp.float32)
        y_ref, h_ref = numpy_oracle(**args, **kw, seq_idx=seq_idx)
        assert_close(y_packed, y_ref, jnp.float32)
        assert_close(h_packed, h_ref, jnp.float32)

    def test_causal_and_row_independent(self, impl):
        """Changing the future (t >= 75, and all of batch row 1) leaves y[0, :75] bit-identical.

        Replaces a self-vs-self determinism check: the same compiled program runs twice on inputs
        that differ only where the outputs compared must not look, so leaks across time (masks,
        padding, chunk boundaries) or across batch rows, and run-to-run nondeterminism, all fail it.
        """
        args, kw = make_inputs(4, seqlen=150, groups=2)
        cut = 75  # inside a chunk
        rng = np.random.default_rng(44)

        def perturb(name, a):
            if a.ndim < 3 or name == "initial_states":
                return a
            noise = jnp.asarray(rng.standard_normal(a.shape), a.dtype)
            t = jnp.arange(a.shape[1]).reshape((1, -1) + (1,) * (a.ndim - 2))
            row = jnp.arange(a.shape[0]).reshape((-1,) + (1,) * (a.ndim - 1))
            return jnp.where((t >= cut) | (row == 1), a + noise, a)

        y_a, _ = run(impl, 16, **args, **kw)
        y_b, _ = run(
            impl, 16, **{k: perturb(k, v) for k, v in args.items()}, **{k: perturb(k, v) for k, v in kw.items()}
        )
        np.testing.assert_array_equal(np.asarray(y_a[0, :cut]), np.asarray(y_b[0, :cut]))
        assert not np.allclose(np.asarray(y_a[0, cut:]), np.asarray(y_b[0, cut:]))  # the change did reach y
        assert not np.allclose(np.asarray(y_a[1]), np.asarray(y_b[1]))


# ------------------------------------------------------------------------------------- gradients
def _vjp_case(impl, chunk, args, kw, seq_idx, with_final, cot_seed=7, block_sizes=None):
    """Gradients (by name) of ssd under jax.vjp with seeded random cotangents, jitted."""
    names = tuple(n for n in GRAD_NAMES if n in args or n in kw)
    values = [args.get(n, kw.get(n)) for n in names]

    def f(*vals):
        y, h = ssd_impl(impl, block_sizes)(
            **dict(zip(names, vals)), chunk_size=chunk, dt_softplus=True, seq_idx=seq_idx
        )
        return (y, h) if with_final else (y,)

    @jax.jit
    def fwd_bwd(vals, cots):
        out, vjp = jax.vjp(f, *vals)
        return out, vjp(cots)

    out_shapes = jax.eval_shape(f, *values)
    rng = np.random.default_rng(cot_seed)
    # bf16-representable cotangents, so that a bf16 and an fp32 run pull back the same values.
    cots = tuple(
        jnp.asarray(rng.standard_normal(o.shape), jnp.float32).astype(jnp.bfloat16).astype(o.dtype) for o in out_shapes
    )
    out, grads = fwd_bwd(values, cots)
    return dict(zip(names, grads))


def assert_grads_close(grads, grads_ref, dtype):
    assert set(grads) == set(grads_ref)
    for name, g_ref in grads_ref.items():
        g = np.asarray(jnp.asarray(grads[name], jnp.float32))
        g_ref = np.asarray(g_ref, np.float32)
        assert g.shape == g_ref.shape, name
        scale = float(np.max(np.abs(g_ref)))
        assert scale > 0 and np.all(np.isfinite(g_ref)), f"vacuous gradient check for {name}"
        err = float(np.max(np.abs(g - g_ref))) / scale
        assert err <= GRAD_TOL[dtype], f"d{name}: max error {err:.2e} of max |grad| {scale:.3g}"


@functools.cache
def _reference_grads(case):
    """The fp32 reference's gradients for a GRAD_CASES entry (shared by the implementations)."""
    args, kw, seq_idx, chunk, with_final, dtype = _grad_case(case)
    up = lambda d: {k: v.astype(jnp.float32) for k, v in d.items()}  # noqa: E731 -- bf16-rounded inputs in fp32
    return _vjp_case("reference", chunk, up(args), up(kw), seq_idx, with_final)


def _grad_case(case):
    if case == "fp32-Q32-every-option":  # seq_idx, initial state, gate, D, dt_bias; T = 45; G = 2; odd P, N
        args, kw = make_inputs(6, seqlen=45, groups=2, head_dim=24, d_state=40)
        return args, kw, seq_idx_for(2, (20, 5, 10, 10), (0, 1, 1, 2)), 32, True, jnp.float32
    if case == "bf16-Q256-T300-y-only":  # the presets' chunk in bf16; D per (h, p); only y returned
        args, kw = make_inputs(8, batch=1, seqlen=300, heads=2, groups=1, d_per_p=True, gate=False, init=False)
        args = {k: v.astype(jnp.bfloat16) if k in ("x", "B", "C") else v for k, v in args.items()}
        return args, kw, None, 256, False, jnp.bfloat16
    raise KeyError(case)


GRAD_CASES = ["fp32-Q32-every-option", "bf16-Q256-T300-y-only"]


# The XLA path is plain JAX autodiff: one case covers it; the Pallas backward kernels get both.
@pytest.mark.parametrize("impl,case", [(i, c) for i in CHUNKED for c in GRAD_CASES if i != "xla" or c == GRAD_CASES[0]])
def test_gradients(impl, case):
    """jax.vjp of every input (through y and, where returned, the final state) == the fp32 reference's."""
    args, kw, seq_idx, chunk, with_final, dtype = _grad_case(case)
    # The every-option case runs the Triton family with 16-wide tiles (the bf16 case with the chosen ones).
    tiles = SMALL_TILES if case == GRAD_CASES[0] else None
    grads = _vjp_case(impl, chunk, args, kw, seq_idx, with_final, block_sizes=tiles)
    assert_grads_close(grads, _reference_grads(case), dtype)


def test_xla_short_sequence_is_one_unpadded_chunk():
    """T < chunk_size runs as one chunk of length T: the compiled graph holds no [64,64] decay
    matrix, and the values, the final state and the gradients (packed documents, initial state)
    still match the float64 oracle and the reference."""
    args, kw = make_inputs(11, seqlen=24, groups=2, head_dim=8, d_state=12)
    seq_idx = seq_idx_for(2, (10, 1, 13), (0, 1, 2))
    y, h = run("xla", 64, **args, **kw, seq_idx=seq_idx)
    y_ref, h_ref = numpy_oracle(**args, **kw, seq_idx=seq_idx)
    assert_close(y, y_ref, jnp.float32)
    assert_close(h, h_ref, jnp.float32)
    grads = _vjp_case("xla", 64, args, kw, seq_idx, True)
    assert_grads_close(grads, _vjp_case("reference", 64, args, kw, seq_idx, True), jnp.float32)
    hlo = _compiled("xla", 64).lower(**args, **kw, seq_idx=seq_idx).as_text()
    assert "x64x64xf32" not in hlo and "x24x24xf32" in hlo


@pytest.mark.parametrize("impl", CHUNKED)
def test_extreme_decay_gradients_finite(impl):
    """Huge dt*|A| (decays underflow to 0 within a chunk) keeps values and gradients finite."""
    args, _ = make_inputs(9, seqlen=40, groups=1)
    args["A"] = jnp.full_like(args["A"], -16.0)
    args["dt"] = args["dt"] + 60.0

    def f(x, dt, A, B, C):
        return jnp.sum(ssd_impl(impl)(x, dt, A, B, C, chunk_size=16, dt_softplus=True)[0] ** 2)

    val, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))(
        args["x"], args["dt"], args["A"], args["B"], args["C"]
    )
    assert np.isfinite(float(val)) and float(val) > 0
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


def test_reference_gradients_x64():
    """The reference's autodiff gradients agree with finite differences (float64)."""
    with jax.enable_x64(True):
        args, kw = make_inputs(12, batch=1, seqlen=6, heads=2, head_dim=3, groups=1, d_state=4)
        args = {k: v.astype(jnp.float64) for k, v in args.items()}
        kw = {k: v.astype(jnp.float64) for k, v in kw.items()}

        def f(x, dt, A, B, C, D, z, dt_bias, h0):
            y, h = ssd(
                x,
                dt,
                A,
                B,
                C,
                D=D,
                z=z,
                dt_bias=dt_bias,
                dt_softplus=True,
                initial_states=h0,
                return_final_states=True,
                implementation="reference",
            )
            return jnp.sum(jnp.sin(y)) + jnp.sum(h**2)

        jax.test_util.check_grads(
            f,
            (*args.values(), kw["D"], kw["z"], kw["dt_bias"], kw["initial_states"]),
            order=1,
            modes=("rev",),
            atol=1e-6,
            rtol=1e-6,
        )


# ------------------------------------------------------------------------------ TPU interpreter
def test_tpu_interpreter_forward_tiny():
    """The fused TPU forward under TPU semantics (block bounds, tiling) with pltpu.InterpretParams()."""
    args, kw = make_inputs(14, batch=1, seqlen=16, heads=2, head_dim=8, groups=1, d_state=8)
    seq_idx = jnp.asarray([[0] * 11 + [1] * 5], jnp.int32)
    y, h = ssd(
        **args,
        **kw,
        chunk_size=8,
        seq_idx=seq_idx,
        dt_softplus=True,
        return_final_states=True,
        implementation="pallas",
        interpret=pltpu.InterpretParams(),
    )
    y_ref, h_ref = numpy_oracle(**args, **kw, seq_idx=seq_idx)
    assert_close(y, y_ref, jnp.float32)
    assert_close(h, h_ref, jnp.float32)


def test_tpu_interpreter_backward_tiny():
    """The TPU state recompute + fused backward under pltpu.InterpretParams() == the reference's vjp."""
    args, kw = make_inputs(15, batch=1, seqlen=16, heads=2, head_dim=8, groups=1, d_state=8)
    seq_idx = seq_idx_for(1, (11, 5), (0, 1))
    names = tuple(n for n in GRAD_NAMES if n in args or n in kw)
    values = [args.get(n, kw.get(n)) for n in names]

    def f(implementation, interpret, *vals):
        return ssd(
            **dict(zip(names, vals)),
            chunk_size=8,
            seq_idx=seq_idx,
            dt_softplus=True,
            return_final_states=True,
            implementation=implementation,
            interpret=interpret,
        )

    out, vjp = jax.vjp(functools.partial(f, "pallas", pltpu.InterpretParams()), *values)
    out_r, vjp_r = jax.vjp(functools.partial(f, "reference", None), *values)
    rng = np.random.default_rng(16)
    cots = tuple(jnp.asarray(rng.standard_normal(o.shape), jnp.float32) for o in out)
    assert_grads_close(dict(zip(names, vjp(cots))), dict(zip(names, vjp_r(cots))), jnp.float32)


# ----------------------------------------------------------------------------- export lowering
GPU_KERNELS = {"ssd_bmm", "ssd_state_fwd", "ssd_chunk_fwd", "ssd_state_bwd", "ssd_chunk_bwd_dx", "ssd_chunk_bwd_dc"}
TPU_KERNELS = {"ssd_tpu_fwd", "ssd_tpu_fwd_states", "ssd_tpu_bwd"}


def _export_fwd_bwd(platform, backend, dtype, chunk, monkeypatch, **shape):
    """jax.export of forward and of jax.grad (every differentiable input) for `platform`."""
    from jax import export  # pylint: disable=g-import-not-at-top
    from jax._src.pallas.mosaic import tpu_info  # pylint: disable=g-import-not-at-top

    # Mosaic lowering asks the default device for its TPU generation: pretend a v5e.
    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    b, t, h, p, g, n = (shape[k] for k in ("b", "t", "h", "p", "g", "n"))
    S = jax.ShapeDtypeStruct
    structs = [
        S((b, t, h, p), dtype),
        S((b, t, h), jnp.float32),
        S((h,), jnp.float32),
        S((b, t, g, n), dtype),
        S((b, t, g, n), dtype),
        S((b, t, h, p), dtype),
        S((h,), jnp.float32),
        S((h,), jnp.float32),
        S((b, h, p, n), jnp.float32),
        S((b, t), jnp.int32),
    ]

    def fwd(x, dt, A, B, C, z, D, dt_bias, h0, seq_idx):
        return ssd_pallas(
            x,
            dt,
            A,
            B,
            C,
            z=z,
            D=D,
            dt_bias=dt_bias,
            initial_states=h0,
            seq_idx=seq_idx,
            dt_softplus=True,
            chunk_size=chunk,
            backend=backend,
            interpret=False,
        )

    def loss(*a):
        y, h_final = fwd(*a)
        return jnp.sum(y.astype(jnp.float32) ** 2) + jnp.sum(h_final**2)

    grad = jax.grad(loss, argnums=tuple(range(9)))
    disabled = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    texts = []
    for fn in (fwd, grad):
        exported = export.export(jax.jit(fn), platforms=(platform,), disabled_checks=disabled)(*structs)
        texts.append(exported.mlir_module())
    return texts


@pytest.mark.parametrize(
    "platform,backend,dtype,chunk",
    [
        ("cuda", "gpu", jnp.bfloat16, 64),
        ("cuda", "gpu", jnp.float32, 256),
        ("tpu", "tpu", jnp.bfloat16, 64),
        ("tpu", "tpu", jnp.float32, 256),
    ],
)
def test_pallas_lowers_for_tpu_and_gpu(platform, backend, dtype, chunk, monkeypatch):
    """Every kernel lowers to Triton IR / Mosaic, forward and backward (jax.export; not compiled here).

    fp32 at chunk 256 is the case that exceeded the H200's shared memory before: it lowers with
    the tiles `GpuBlockSizes.choose` picks for the device (a conservative default without one).
    """
    # The presets' P/N (no column masks) for the fp32 chunk-256 case, odd P/N (masked columns) else.
    shape = {"b": 2, "t": 300, "h": 4, "p": 64, "g": 2, "n": 128}
    if chunk != 256:
        shape.update(p=72, n=40)
    fwd_text, grad_text = _export_fwd_bwd(platform, backend, dtype, chunk, monkeypatch, **shape)
    kernels = GPU_KERNELS if backend == "gpu" else TPU_KERNELS
    marker = "__gpu$xla.gpu.triton" if backend == "gpu" else "tpu_custom_call"
    assert marker in fwd_text and marker in grad_text
    fwd_names = set(re.findall(r"ssd_[a-z_]+", fwd_text)) & kernels
    grad_names = set(re.findall(r"ssd_[a-z_]+", grad_text)) & kernels
    assert fwd_names == ({"ssd_bmm", "ssd_state_fwd", "ssd_chunk_fwd"} if backend == "gpu" else {"ssd_tpu_fwd"})
    assert grad_names == kernels


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("smem", [232448, 166912, 101376])
def test_gpu_block_sizes_fit_shared_memory(dtype, smem):
    """At chunk 256 (P 64, N 128) the chosen tiles fit each GPU's shared memory under the estimate,
    and the estimate does reject the whole-chunk tiles that failed on the H200 in fp32."""
    bs = pallas_gpu.GpuBlockSizes.choose(256, 64, 128, dtype, smem_bytes=smem)
    item = jnp.dtype(dtype).itemsize
    assert 1.25 * max(bs.smem_estimate(64, 128, item).values()) <= smem
    assert 256 % bs.bm == 0 and 256 % bs.bq == 0 and bs.bm >= 16
    whole_chunk = pallas_gpu.GpuBlockSizes(bq=256, bp=64, bn=128, bm=256, num_stages=2)
    assert max(whole_chunk.smem_estimate(64, 128, 4).values()) > 232448


# ------------------------------------------------------------------------------------- the rest
def test_step_iterated_matches_sequence():
    """ssd_step applied token by token == ssd over the sequence and the oracle."""
    args, kw = make_inputs(5, seqlen=23, groups=2)
    y_seq, h_seq = run("xla", 16, **args, **kw)
    y_ref, h_ref = numpy_oracle(**args, **kw)
    step = jax.jit(functools.partial(ssd_step, D=kw["D"], dt_bias=kw["dt_bias"], dt_softplus=True))
    h = kw["initial_states"]
    for t in range(args["x"].shape[1]):
        y_t, h = step(
            h, args["x"][:, t], args["dt"][:, t], args["A"], args["B"][:, t], args["C"][:, t], z=kw["z"][:, t]
        )
        assert_close(y_t, y_seq[:, t], jnp.float32)
        assert_close(y_t, y_ref[:, t], jnp.float32)
    assert_close(h, h_seq, jnp.float32)
    assert_close(h, h_ref, jnp.float32)


def test_auto_implementation():
    """ "auto" is the xla path on CPU (bit-identical), and "pallas" without `interpret` interprets on CPU."""
    assert IMPLEMENTATIONS == ("auto", "reference", "xla", "pallas")
    args, kw = make_inputs(13, seqlen=20)
    f = jax.jit(functools.partial(ssd, chunk_size=16, dt_softplus=True))
    y_x = jax.jit(functools.partial(ssd, chunk_size=16, dt_softplus=True, implementation="xla"))(**args, **kw)
    np.testing.assert_array_equal(np.asarray(f(**args, **kw)), np.asarray(y_x))
    pallas = functools.partial(ssd, chunk_size=16, dt_softplus=True, implementation="pallas")
    assert "ssd_tpu_fwd" in str(jax.make_jaxpr(pallas)(**args, **kw))
    assert_close(jax.jit(pallas)(**args, **kw), y_x, jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("impl", CHUNKED)
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_chunk_256_long(impl, groups):
    args, kw = make_inputs(11, seqlen=600, groups=groups, head_dim=16, d_state=32)
    y, h = run(impl, 256, **args, **kw)
    y_ref, h_ref = numpy_oracle(**args, **kw)
    assert_close(y, y_ref, jnp.float32)
    assert_close(h, h_ref, jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("impl", PALLAS)
def test_gradients_chunk_256_every_option(impl):
    """Chunk 256 over three chunks with every option (seq_idx, initial state, gate, D, dt_bias), G = 4."""
    args, kw = make_inputs(17, batch=1, seqlen=600, heads=4, groups=4, head_dim=16, d_state=32)
    seq_idx = seq_idx_for(1, (100, 300, 200), (0, 1, 2))
    grads = _vjp_case(impl, 256, args, kw, seq_idx, True)
    assert_grads_close(grads, _vjp_case("reference", 256, args, kw, seq_idx, True), jnp.float32)


class TestErrors:
    """Bad shapes and configs raise ValueError naming the argument."""

    def _args(self):
        return make_inputs(15, seqlen=10, init=True)

    @pytest.mark.parametrize(
        "name,bad,match",
        [
            ("x", lambda a: a[..., 0], "x has shape"),
            ("dt", lambda a: a[..., :3], "dt has shape"),
            ("A", lambda a: a[:2], "A has shape"),
            ("B", lambda a: a[:, :, :, :5], "C must have the same shape"),
            ("C", lambda a: a[:, :5], "C has shape"),
        ],
    )
    def test_bad_positional(self, name, bad, match):
        args, _ = self._args()
        args[name] = bad(args[name])
        with pytest.raises(ValueError, match=match):
            ssd(**args)

    @pytest.mark.parametrize(
        "name,bad,match",
        [
            ("D", jnp.ones((3,)), "D has shape"),
            ("z", jnp.ones((2, 10, 4)), "z"),
            ("dt_bias", jnp.ones((4, 1)), "dt_bias"),
            ("initial_states", jnp.ones((2, 4, 8, 3)), "initial_states"),
            ("seq_idx", jnp.zeros((2, 9), jnp.int32), "seq_idx has shape"),
            ("seq_idx", jnp.zeros((2, 10), jnp.float32), "integer dtype"),
        ],
    )
    def test_bad_keyword(self, name, bad, match):
        args, _ = self._args()
        with pytest.raises(ValueError, match=match):
            ssd(**args, **{name: bad})

    def test_groups_must_divide_heads(self):
        args, _ = make_inputs(16, seqlen=10, heads=4, groups=3)
        with pytest.raises(ValueError, match="not a multiple of ngroups"):
            ssd(**args)

    @pytest.mark.parametrize(
        "kw,match",
        [
            ({"chunk_size": 0}, "chunk_size"),
            ({"implementation": "triton"}, "implementation='triton' is not one of"),
            ({"implementation": None}, "implementation=None is not one of"),
            ({"implementation": "pallas", "interpret": False}, "needs interpret=True"),
            ({"implementation": "pallas", "chunk_size": 12}, "multiple of 8"),
            ({"implementation": "pallas", "interpret": pltpu.InterpretParams(), "chunk_size": 12}, "multiple of 8"),
        ],
    )
    def test_bad_config(self, kw, match):
        args, _ = self._args()
        with pytest.raises(ValueError, match=match):
            ssd(**args, **kw)

    @pytest.mark.parametrize(
        "kw,match",
        [
            ({"backend": "gpu", "chunk_size": 24}, "power of two >= 16"),
            ({"backend": "gpu", "chunk_size": 8}, "power of two >= 16"),
            ({"backend": "cuda"}, "backend='cuda' must be 'gpu'"),
            (
                {
                    "backend": "gpu",
                    "chunk_size": 32,
                    "block_sizes": pallas_gpu.GpuBlockSizes(bq=32, bp=16, bn=16, bm=24),
                },
                "GpuBlockSizes.bm=24 must be a power of two >= 16 dividing 32",
            ),
        ],
    )
    def test_bad_pallas_config(self, kw, match):
        args, _ = self._args()
        with pytest.raises(ValueError, match=match):
            ssd_pallas(**args, **kw)

    def test_step_shapes(self):
        args, kw = self._args()
        state = kw["initial_states"]
        x_t, dt_t, b_t, c_t = args["x"][:, 0], args["dt"][:, 0], args["B"][:, 0], args["C"][:, 0]
        with pytest.raises(ValueError, match="x_t has shape"):
            ssd_step(state, args["x"], dt_t, args["A"], b_t, c_t)
        with pytest.raises(ValueError, match="state has shape"):
            ssd_step(state[..., :3], x_t, dt_t, args["A"], b_t, c_t)
        with pytest.raises(ValueError, match="dt has shape"):
            ssd_step(state, x_t, dt_t[:, :2], args["A"], b_t, c_t)
