"""Parity suite for pallas_kernels.sparse_attention: every implementation vs the fp32 reference.

The reference (dense scores + the mask expanded from its definition, fp32 softmax) is the oracle.
Each implementation runs at the test dtype; gradients are compared through jax.vjp.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_attention import api, common, pallas_attention, sparse_attention

# Max abs error of the output / gradients vs the fp32 reference, per test dtype.
TOL = {jnp.float32: dict(out=2e-5, grad=5e-5), jnp.bfloat16: dict(out=3e-2, grad=8e-2)}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    b: int = 1
    tq: int = 40
    tk: int = 40
    h: int = 4
    hk: int = 2
    d: int = 16
    bq: int = 16
    bk: int = 16
    causal: bool = True
    window: int | None = None
    sinks: int = 0
    n_listed: int = 0  # K random listed blocks (with duplicates and -1 padding) when > 0
    segments: bool = False
    empty_listed: bool = False  # all slots -1: with no window every row sees nothing


CASES = [
    Case("dense_causal"),
    Case("dense_noncausal", causal=False),
    Case("window_only", window=9),
    Case("window_sinks", window=5, sinks=3, tq=24, tk=56),
    Case("sinks_only_noncausal", n_listed=2, sinks=5, causal=False),
    Case("random_blocks", n_listed=4, tq=48, tk=64),
    Case("random_blocks_window_sinks_noncausal", n_listed=3, window=6, sinks=2, causal=False,
         tq=24, tk=50),
    Case("seq_q_lt_seq_k_decode", tq=5, tk=45, n_listed=2, window=7, bq=8),
    Case("seq_q_gt_seq_k", tq=48, tk=20),  # first queries sit before every key: zero rows
    Case("mha_head_dim_72", h=2, hk=2, d=72, n_listed=2, window=4),
    Case("mqa", h=4, hk=1, window=12, sinks=1),
    Case("segments", segments=True, window=20, sinks=2),
    Case("nothing_visible", n_listed=2, empty_listed=True),
]


def make_inputs(case: Case, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(case.b, case.tq, case.h, case.d)), dtype)
    k = jnp.asarray(rng.normal(size=(case.b, case.tk, case.hk, case.d)), dtype)
    v = jnp.asarray(rng.normal(size=(case.b, case.tk, case.hk, case.d)), dtype)
    kw = dict(causal=case.causal, window=case.window, sinks=case.sinks, block_q=case.bq,
              block_k=case.bk)
    if case.n_listed:
        nq, nk = common.cdiv(case.tq, case.bq), common.cdiv(case.tk, case.bk)
        bi = rng.integers(-1, nk, size=(case.b, case.h, nq, case.n_listed))
        bi[..., -1] = bi[..., 0]  # a duplicate in every row (must be counted once)
        if case.empty_listed:
            bi[...] = -1
        kw["block_indices"] = jnp.asarray(bi, jnp.int32)
    if case.segments:
        seg = np.cumsum(rng.random((case.b, case.tq)) < 0.1, axis=1)
        kw["segment_ids"] = jnp.asarray(seg, jnp.int32)
    return q, k, v, kw


@functools.lru_cache(maxsize=None)
def _jitted(impl, static):
    static = dict(static)
    return jax.jit(lambda q, k, v, arrays: sparse_attention(
        q, k, v, implementation=impl, interpret=True, **static, **arrays))


def run(impl, q, k, v, kw):
    """Jitted call (one compile per case; eager op-by-op dispatch is slower on CPU)."""
    arrays = {n: x for n, x in kw.items() if isinstance(x, jax.Array)}
    static = tuple(sorted((n, x) for n, x in kw.items() if n not in arrays))
    return _jitted(impl, static)(q, k, v, arrays)


FAST_BF16 = ("dense_causal", "random_blocks", "mha_head_dim_72")
GRAD_CASES = ("dense_causal", "window_sinks", "random_blocks",
              "random_blocks_window_sinks_noncausal", "seq_q_lt_seq_k_decode", "seq_q_gt_seq_k",
              "mha_head_dim_72", "mqa", "segments", "nothing_visible")
FAST_XLA_GRAD = ("dense_causal", "random_blocks_window_sinks_noncausal", "seq_q_lt_seq_k_decode",
                 "seq_q_gt_seq_k", "segments", "mqa")
FAST_PALLAS_GRAD = ("random_blocks_window_sinks_noncausal", "mha_head_dim_72", "nothing_visible")


def _forward_params():
    """(case, dtype) grid; bf16 beyond a representative subset runs only with -m slow."""
    out = []
    for c in CASES:
        out.append(pytest.param(c, jnp.float32, id=f"{c.name}-f32"))
        marks = () if c.name in FAST_BF16 else (pytest.mark.slow,)
        out.append(pytest.param(c, jnp.bfloat16, id=f"{c.name}-bf16", marks=marks))
    return out


def f32(x):
    return x.astype(jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
class TestParity:
    """Shared parity suite: one class, parametrised over implementations."""

    @pytest.mark.parametrize("case, dtype", _forward_params())
    def test_forward(self, impl, case, dtype):
        q, k, v, kw = make_inputs(case, dtype)
        ref = run("reference", f32(q), f32(k), f32(v), kw)
        out = run(impl, q, k, v, kw)
        assert out.dtype == dtype and out.shape == q.shape
        assert bool(jnp.all(jnp.isfinite(f32(out))))
        np.testing.assert_allclose(f32(out), ref, atol=TOL[dtype]["out"], rtol=0)

    def test_gradients_bf16(self, impl):
        case = CASES[5]
        q, k, v, kw = make_inputs(case, jnp.bfloat16, seed=3)
        do = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.bfloat16)
        _, vjp_ref = jax.vjp(lambda *a: run("reference", *a, kw), f32(q), f32(k), f32(v))
        _, vjp = jax.vjp(lambda *a: run(impl, *a, kw), q, k, v)
        for name, g_ref, g in zip("qkv", vjp_ref(f32(do)), vjp(do)):
            assert g.dtype == jnp.bfloat16
            np.testing.assert_allclose(f32(g), g_ref, atol=TOL[jnp.bfloat16]["grad"], rtol=0,
                                       err_msg=name)

    def test_duplicates_count_once(self, impl):
        case = Case("dup", n_listed=1, tq=32, tk=64)
        q, k, v, kw = make_inputs(case, jnp.float32)
        single = kw["block_indices"]
        one = run(impl, q, k, v, kw)
        pad = jnp.full_like(single, -1)
        kw["block_indices"] = jnp.concatenate([single, single, single, pad], -1)
        np.testing.assert_allclose(run(impl, q, k, v, kw), one, atol=1e-6, rtol=0)

    def test_empty_rows_are_zero(self, impl):
        q, k, v, kw = make_inputs(CASES[-1], jnp.float32)
        out = run(impl, q, k, v, kw)
        np.testing.assert_array_equal(out, jnp.zeros_like(out))

    def test_jit_and_determinism(self, impl):
        q, k, v, kw = make_inputs(CASES[6], jnp.float32)
        bi = kw.pop("block_indices")
        f = jax.jit(lambda q, k, v, bi: sparse_attention(
            q, k, v, block_indices=bi, implementation=impl, interpret=True, **kw))
        a, b = f(q, k, v, bi), f(q, k, v, bi)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(a, run("reference", q, k, v, dict(kw, block_indices=bi)),
                                   atol=2e-5, rtol=0)


def _grad_params():
    """(impl, case); pallas shares the xla backward, so its full grid runs only with -m slow."""
    out = []
    for c in CASES:
        if c.name not in GRAD_CASES:
            continue
        marks = () if c.name in FAST_XLA_GRAD else (pytest.mark.slow,)
        out.append(pytest.param("xla", c, id=f"xla-{c.name}", marks=marks))
        marks = () if c.name in FAST_PALLAS_GRAD else (pytest.mark.slow,)
        out.append(pytest.param("pallas", c, id=f"pallas-{c.name}", marks=marks))
    return out


@pytest.mark.parametrize("impl, case", _grad_params())
def test_gradients(impl, case):
    """dq, dk, dv of each implementation vs jax.vjp of the fp32 reference."""
    q, k, v, kw = make_inputs(case, jnp.float32, seed=1)
    do = jnp.asarray(np.random.default_rng(2).normal(size=q.shape), jnp.float32)
    _, vjp_ref = jax.vjp(lambda *a: run("reference", *a, kw), q, k, v)
    _, vjp = jax.vjp(lambda *a: run(impl, *a, kw), q, k, v)
    for name, g_ref, g in zip("qkv", vjp_ref(do), vjp(do)):
        assert bool(jnp.all(jnp.isfinite(g))), name
        np.testing.assert_allclose(g, g_ref, atol=TOL[jnp.float32]["grad"], rtol=0, err_msg=name)


def test_reference_is_dense_attention():
    """The oracle itself: with no pattern it equals jax.nn.dot_product_attention."""
    q, k, v, kw = make_inputs(Case("d", tq=33, tk=33), jnp.float32)
    for causal in (True, False):
        kw["causal"] = causal
        expect = jax.nn.dot_product_attention(q, jnp.repeat(k, 2, 2), jnp.repeat(v, 2, 2),
                                              is_causal=causal)
        np.testing.assert_allclose(run("reference", q, k, v, kw), expect, atol=2e-6, rtol=0)


def test_reference_window_matches_explicit_mask():
    """Window + sinks mask of the oracle against a hand-written numpy loop."""
    case = Case("w", tq=12, tk=20, h=1, hk=1, window=3, sinks=2, bq=4, bk=4)
    q, k, v, kw = make_inputs(case, jnp.float32)
    off = case.tk - case.tq
    s = np.einsum("qd,kd->qk", np.asarray(q[0, :, 0]), np.asarray(k[0, :, 0])) / 4.0
    out = np.zeros((case.tq, case.d))
    for i in range(case.tq):
        p = i + off
        vis = [j for j in range(case.tk) if (p - 3 < j <= p or j < 2) and j <= p]
        w = np.exp(s[i, vis] - s[i, vis].max())
        out[i] = (w / w.sum()) @ np.asarray(v[0, vis, 0])
    np.testing.assert_allclose(run("reference", q, k, v, kw)[0, :, 0], out, atol=1e-5)


def _gpu_params():
    fast = ("window_sinks", "random_blocks_window_sinks_noncausal", "mha_head_dim_72")
    return [pytest.param(c, id=c.name, marks=() if c.name in fast else (pytest.mark.slow,))
            for c in CASES]


@pytest.mark.parametrize("case", _gpu_params())
def test_gpu_kernel_forward(case):
    """The Triton-style kernel (fori_loop over int-input slot tables) in interpret mode."""
    q, k, v, kw = make_inputs(case, jnp.float32)
    forward_gpu = jax.jit(pallas_attention.forward_gpu, static_argnames=("cfg", "interpret"))
    cfg, q_seg, k_seg = common.validate(q, k, v, kw.get("block_indices"), kw.get("segment_ids"),
                                        causal=case.causal, window=case.window, sinks=case.sinks,
                                        block_q=case.bq, block_k=case.bk, sm_scale=None)
    fetch, code, n_valid = common.slot_table(kw.get("block_indices"), cfg, case.b, case.h)
    tq, tk = cfg.nq * cfg.block_q, cfg.nk * cfg.block_k
    o, lse = forward_gpu(
        common.to_head_major(q, tq), common.to_head_major(k, tk), common.to_head_major(v, tk),
        common.pad_seg(q_seg, tq), common.pad_seg(k_seg, tk), fetch, code, n_valid, cfg,
        interpret=True)
    out = jnp.swapaxes(o[:, :, :case.tq], 1, 2)
    np.testing.assert_allclose(out, run("reference", q, k, v, kw), atol=2e-5, rtol=0)
    assert lse.shape == (case.b, case.h, tq)


def test_tpu_interpreter_small():
    """One tiny run under the TPU-semantics interpreter (checks out-of-bounds block reads)."""
    case = Case("tpu", tq=8, tk=24, h=2, hk=1, d=16, bq=8, bk=8, n_listed=2, window=3, sinks=1)
    q, k, v, kw = make_inputs(case, jnp.float32)
    out = sparse_attention(q, k, v, implementation="pallas",
                           interpret=pltpu.InterpretParams(), **kw)
    np.testing.assert_allclose(out, run("reference", q, k, v, kw), atol=2e-5, rtol=0)


def test_slot_table_dedups_and_packs():
    cfg = common.Config(seq_q=8, seq_k=32, block_q=8, block_k=8, causal=True, window=3, sinks=1,
                        sm_scale=1.0, dense=False)
    bi = jnp.asarray([[[[2, -1, 2, 0, 9]]]], jnp.int32)  # dup, padding, out of range
    fetch, code, n_valid = common.slot_table(bi, cfg, 1, 1)
    n = int(n_valid[0, 0, 0])
    # Listed {0, 2}; window of queries 24..31 touches blocks 2, 3; sink block 0.
    assert n == 3
    np.testing.assert_array_equal(fetch[0, 0, 0, :n], [0, 2, 3])
    np.testing.assert_array_equal(code[0, 0, 0, :n], [1, 1, 0])
    assert bool(jnp.all(code[0, 0, 0, n:] == -1)) and bool(jnp.all(fetch[0, 0, 0, n:] == 3))


@pytest.mark.parametrize("bad, match", [
    (dict(window=0), "window"),
    (dict(sinks=-1), "sinks"),
    (dict(block_q=0), "block_q"),
    (dict(implementation="cuda"), "implementation"),
    (dict(block_indices=jnp.zeros((1, 4, 2, 3), jnp.int32)), "block_indices"),
    (dict(segment_ids=jnp.zeros((1, 7), jnp.int32)), "segment_ids"),
])
def test_validation_errors(bad, match):
    q, k, v, _ = make_inputs(Case("e"), jnp.float32)
    with pytest.raises(ValueError, match=match):
        sparse_attention(q, k, v, **bad)


def test_validation_gqa_and_pallas_on_cpu():
    q, k, v, _ = make_inputs(Case("e", h=4, hk=3), jnp.float32)
    with pytest.raises(ValueError, match="kv_heads"):
        sparse_attention(q, k, v)
    if jax.default_backend() == "cpu":
        q, k, v, _ = make_inputs(Case("e"), jnp.float32)
        with pytest.raises(ValueError, match="interpret"):
            sparse_attention(q, k, v, implementation="pallas")
    assert api.default_implementation() in ("xla", "pallas")
