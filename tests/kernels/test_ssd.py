"""Tests of the SSD op (pallas_kernels/ssd): every implementation against the recurrence.

Oracles: a float64 NumPy loop over time (checks the forward of all three implementations, the
reference included) and the float32 `lax.scan` reference (forward + `jax.vjp` gradients of the
chunked paths). On CPU the Pallas kernels run with `interpret=True`; one tiny case runs under the
TPU interpreter, and the kernels are lowered (not run) to Mosaic TPU and Triton IR.
"""

import functools

import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ssd import IMPLEMENTATIONS, ssd, ssd_step
from pallas_kernels.ssd import pallas_ssd

IMPL_KW = {
    "reference": dict(implementation="reference"),
    "xla": dict(implementation="xla"),
    "pallas": dict(implementation="pallas", interpret=True),
}
CHUNKED = ("xla", "pallas")
# (atol, rtol) against the oracle, per input dtype; outputs are O(1)-O(10).
TOL = {jnp.float32: (1e-4, 1e-4), jnp.bfloat16: (6e-2, 3e-2)}
GRAD_TOL = {jnp.float32: (2e-4, 2e-4)}


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
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    uniform = lambda lo, hi, *shape: jnp.asarray(rng.uniform(lo, hi, shape), jnp.float32)
    args = dict(
        x=normal(batch, seqlen, heads, head_dim),
        dt=normal(batch, seqlen, heads) - 2.0,
        A=-jnp.exp(uniform(-1.0, 1.0, heads)),
        B=normal(batch, seqlen, groups, d_state) / 2,
        C=normal(batch, seqlen, groups, d_state),
    )
    kw = dict(
        D=normal(heads, head_dim) if d_per_p else normal(heads),
        dt_bias=uniform(-2.0, 0.0, heads),
    )
    if gate:
        kw["z"] = normal(batch, seqlen, heads, head_dim)
    if init:
        kw["initial_states"] = normal(batch, heads, head_dim, d_state)
    if minimal:  # only x, dt, A, B, C
        kw = {}
    cast = lambda a: a.astype(dtype) if a.dtype == jnp.float32 else a
    return {k: cast(v) for k, v in args.items()}, {k: cast(v) for k, v in kw.items()}


@functools.lru_cache(maxsize=None)
def _compiled(impl, chunk_size, final):
    return jax.jit(
        functools.partial(ssd, chunk_size=chunk_size, dt_softplus=True, return_final_states=final, **IMPL_KW[impl])
    )


def run(impl, chunk_size, *, final=True, **arrays):
    """ssd(..., dt_softplus=True) under jit (one compile per configuration, not per op)."""
    return _compiled(impl, chunk_size, final)(**arrays)


def numpy_oracle(x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=True, initial_states=None, seq_idx=None):
    """The recurrence in float64 NumPy, one step at a time: (y [B,T,H,P], h_T [B,H,P,N])."""
    f = lambda a: None if a is None else np.asarray(jnp.asarray(a, jnp.float32), np.float64)
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
    atol, rtol = tol[dtype]
    np.testing.assert_allclose(
        np.asarray(jnp.asarray(actual, jnp.float32)), np.asarray(expected, np.float32), atol=atol, rtol=rtol
    )


# (seqlen, chunk_size, groups, options) covering chunk 16/64, ngroups 1/2/H, T = 1, 7, 200, 64.
FWD_CASES = [
    pytest.param(200, 16, 1, dict(), id="T200-Q16-G1"),
    pytest.param(200, 64, 2, dict(d_per_p=True, gate=False), id="T200-Q64-G2-Dhp-nogate"),
    pytest.param(200, 64, 4, dict(minimal=True, head_dim=6, d_state=10), id="T200-Q64-GH-P6N10-min"),
    pytest.param(7, 16, 2, dict(), id="T7-Q16-G2"),
    pytest.param(1, 16, 4, dict(), id="T1-Q16-GH"),
]


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
class TestSSDParity:
    """The shared parity suite: every implementation computes the recurrence."""

    @pytest.mark.parametrize("seqlen,chunk,groups,opts", FWD_CASES)
    def test_forward_fp32(self, impl, seqlen, chunk, groups, opts):
        args, kw = make_inputs(0, seqlen=seqlen, groups=groups, **opts)
        y, h = run(impl, chunk, **args, **kw)
        y_ref, h_ref = numpy_oracle(**args, **kw)
        assert y.shape == args["x"].shape and y.dtype == jnp.float32
        assert h.shape == h_ref.shape and h.dtype == jnp.float32
        assert_close(y, y_ref, jnp.float32)
        assert_close(h, h_ref, jnp.float32)

    @pytest.mark.parametrize("chunk", [16])
    def test_forward_bf16(self, impl, chunk):
        args, kw = make_inputs(1, seqlen=100, dtype=jnp.bfloat16)
        y, h = run(impl, chunk, **args, **kw)
        y_ref, h_ref = numpy_oracle(**args, **kw)  # the oracle sees the same bf16-rounded inputs
        assert y.dtype == jnp.bfloat16 and h.dtype == jnp.float32
        assert_close(y, y_ref, jnp.bfloat16)
        assert_close(h, h_ref, jnp.bfloat16)

    def test_final_state_chaining(self, impl):
        """Two halves with the carried state == one pass (split not on a chunk boundary)."""
        args, kw = make_inputs(2, seqlen=150, groups=2)
        y_full, h_full = run(impl, 16, **args, **kw)
        split = 75  # two equal halves (one compile), not a multiple of the chunk
        first = {k: (v[:, :split] if v.ndim > 1 else v) for k, v in args.items()}
        second = {k: (v[:, split:] if v.ndim > 1 else v) for k, v in args.items()}
        y1, h1 = run(impl, 16, **first, **dict(kw, z=kw["z"][:, :split]))
        y2, h2 = run(impl, 16, **second, **dict(kw, z=kw["z"][:, split:], initial_states=h1))
        assert_close(jnp.concatenate([y1, y2], axis=1), y_full, jnp.float32)
        assert_close(h2, h_full, jnp.float32)

    def test_seq_idx_packing(self, impl):
        """Packed sequences with seq_idx == each sequence run on its own (initial state -> first).

        The separate runs use the float64 oracle; the packed run also matches the oracle with seq_idx.
        """
        lengths = (37, 1, 50, 8)  # boundaries inside chunks, a length-1 sequence
        total = sum(lengths)
        args, kw = make_inputs(3, batch=1, seqlen=total, groups=2)
        ids = np.concatenate([np.full(n, v) for n, v in zip(lengths, (4, 9, 2, 7))])  # not sorted
        seq_idx = jnp.asarray(ids, jnp.int32)[None]
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

    def test_deterministic(self, impl):
        args, kw = make_inputs(4, seqlen=150, groups=2)  # the shapes of the chaining test
        a, b = run(impl, 16, **args, **kw), run(impl, 16, **args, **kw)
        for u, v in zip(a, b):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


class TestSSDGradients:
    """Gradients of the chunked paths (the reference is checked by finite differences below)."""

    @pytest.mark.parametrize(
        "impl,with_seq_idx",
        [("xla", False), ("xla", True), ("pallas", True), pytest.param("pallas", False, marks=pytest.mark.slow)],
    )
    def test_gradients(self, impl, with_seq_idx):
        """jax.vjp of every input (through y and the final state) == the fp32 reference's."""
        args, kw = make_inputs(6, seqlen=45, groups=2)
        seq_idx = None
        if with_seq_idx:
            seq_idx = jnp.asarray(np.repeat([[0, 1, 1, 2]], [20, 5, 10, 10], axis=1), jnp.int32)
            seq_idx = jnp.broadcast_to(seq_idx, (2, 45))
        names = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")
        values = [args.get(n, kw.get(n)) for n in names]

        def loss_fn(implementation_kw, *vals):
            inputs = dict(zip(names, vals))
            return ssd(
                **inputs,
                chunk_size=16,
                dt_softplus=True,
                seq_idx=seq_idx,
                return_final_states=True,
                **implementation_kw,
            )

        out, vjp = jax.vjp(jax.jit(functools.partial(loss_fn, IMPL_KW[impl])), *values)
        out_r, vjp_r = jax.vjp(jax.jit(functools.partial(loss_fn, IMPL_KW["reference"])), *values)
        rng = np.random.default_rng(7)
        cot = tuple(jnp.asarray(rng.standard_normal(o.shape), jnp.float32) for o in out)
        for name, g, g_r in zip(names, vjp(cot), vjp_r(cot)):
            assert g.shape == g_r.shape, name
            scale = float(jnp.max(jnp.abs(g_r))) + 1e-6
            atol, rtol = GRAD_TOL[jnp.float32]
            np.testing.assert_allclose(
                np.asarray(g) / scale, np.asarray(g_r) / scale, atol=atol, rtol=rtol, err_msg=name
            )

    @pytest.mark.parametrize("impl", CHUNKED)
    def test_extreme_decay_gradients_finite(self, impl):
        """Huge dt*|A| (decays underflow to 0 within a chunk) keeps values and gradients finite."""
        args, kw = make_inputs(9, seqlen=40, groups=1)
        args["A"] = jnp.full_like(args["A"], -16.0)
        args["dt"] = args["dt"] + 60.0

        def f(x, dt, A, B, C):
            return jnp.sum(ssd(x, dt, A, B, C, chunk_size=16, dt_softplus=True, **IMPL_KW[impl]) ** 2)

        val, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3, 4)))(
            args["x"], args["dt"], args["A"], args["B"], args["C"]
        )
        assert np.isfinite(float(val))
        for g in grads:
            assert np.all(np.isfinite(np.asarray(g)))


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


@pytest.mark.slow
@pytest.mark.parametrize("impl", CHUNKED)
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_chunk_256_long(impl, groups):
    args, kw = make_inputs(11, seqlen=600, groups=groups, head_dim=16, d_state=32)
    y, h = run(impl, 256, **args, **kw)
    y_ref, h_ref = numpy_oracle(**args, **kw)
    assert_close(y, y_ref, jnp.float32)
    assert_close(h, h_ref, jnp.float32)


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


def test_default_implementation_on_cpu_is_xla():
    args, kw = make_inputs(13, seqlen=20)
    y = jax.jit(functools.partial(ssd, chunk_size=16, dt_softplus=True))(**args, **kw)
    y_x = run("xla", 16, final=False, **args, **kw)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_x))


def test_pallas_tpu_interpreter_tiny():
    """The kernels under TPU semantics (block bounds, tiling) with pltpu.InterpretParams()."""
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


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_pallas_lowers_for_tpu_and_gpu(platform, monkeypatch):
    """The kernels lower to Mosaic TPU / Triton IR (jax.export; not compiled: no such device here)."""
    from jax import export  # pylint: disable=g-import-not-at-top
    from jax._src.pallas.mosaic import tpu_info  # pylint: disable=g-import-not-at-top

    # Mosaic lowering asks the default device for its TPU generation: pretend a v5e.
    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    backend = {"tpu": "tpu", "cuda": "gpu"}[platform]
    b, t, h, p, g, n = 2, 200, 4, 64, 2, 128
    shapes = [
        ((b, t, h, p), jnp.bfloat16),
        ((b, t, h), jnp.float32),
        ((h,), jnp.float32),
        ((b, t, g, n), jnp.bfloat16),
        ((b, t, g, n), jnp.bfloat16),
        ((b, t), jnp.int32),
    ]
    structs = [jax.ShapeDtypeStruct(s, d) for s, d in shapes]

    def f(x, dt, A, B, C, seq_idx):
        return pallas_ssd.ssd_pallas(x, dt, A, B, C, chunk_size=64, seq_idx=seq_idx, backend=backend)

    exported = export.export(
        jax.jit(f),
        platforms=(platform,),
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*structs)
    text = exported.mlir_module()
    marker = "tpu_custom_call" if platform == "tpu" else "__gpu$xla.gpu.triton"
    assert text.count(marker) >= 2, "both kernels must be lowered"


class TestErrors:
    """Bad shapes and configs raise ValueError naming the argument."""

    def _args(self):
        args, kw = make_inputs(15, seqlen=10, init=True)
        return args, kw

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
            (dict(chunk_size=0), "chunk_size"),
            (dict(implementation="triton"), "implementation='triton' is unknown"),
            (dict(implementation="pallas"), "needs interpret=True"),
            (dict(implementation="pallas", interpret=True, chunk_size=12), "multiple of 8"),
        ],
    )
    def test_bad_config(self, kw, match):
        args, _ = self._args()
        with pytest.raises(ValueError, match=match):
            ssd(**args, **kw)

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
