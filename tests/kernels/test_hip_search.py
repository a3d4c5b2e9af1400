"""Tests of HiP's hierarchical block search: prefill (`hip_block_indices`), decoding
(`hip_decode_block_indices`), their shared core (`hip_search`), the block-max scoring kernels and
the recall of the search on data with attention locality."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_attention import (
    common,
    hip,
    hip_block_indices,
    hip_decode_block_indices,
    hip_search,
    pallas_gpu,
    pallas_tpu,
    sparse_attention,
)


def numpy_block_scores(q, k, bq, bk, causal):
    """Independent numpy exact block max of q.k: [B, H, nq, nk] (-inf where nothing visible)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, tq, h, _ = q.shape
    tk = k.shape[1]
    k = np.repeat(k, h // k.shape[2], axis=2)
    s = np.einsum("bqhp,bkhp->bhqk", q, k)
    if causal:
        s = np.where((np.arange(tq)[:, None] + tk - tq) >= np.arange(tk)[None, :], s, -np.inf)
    nq, nk = -(-tq // bq), -(-tk // bk)
    s = np.pad(s, ((0, 0), (0, 0), (0, nq * bq - tq), (0, nk * bk - tk)), constant_values=-np.inf)
    return s.reshape(b, h, nq, bq, nk, bk).max(axis=(3, 5))


def numpy_search(score, lo, hi, k_blocks, nk):
    """The paper's search for one row, scoring both halves of every span each round."""
    n = hi - lo
    edges = np.array([lo + (i * n) // k_blocks for i in range(k_blocks + 1)])
    start, end = edges[:-1], edges[1:]
    for _ in range(math.ceil(math.log2(max(1, -(-nk // k_blocks))))):
        mid = start + (end - start + 1) // 2
        cs, ce = np.concatenate([start, mid]), np.concatenate([mid, end])
        sc = np.where(ce > cs, score[np.clip(cs, 0, nk - 1)], -np.inf)
        top = np.argsort(-sc, kind="stable")[:k_blocks]
        start, end = cs[top], ce[top]
    return np.sort(start[end > start])


def search(q, k, **kw):
    """Jitted hip_block_indices (op-by-op dispatch is much slower on CPU)."""
    return jax.jit(lambda q, k: hip_block_indices(q, k, **kw))(q, k)


def _inputs(seed=0, b=1, t=300, h=4, kv=2, p=16, length_scale=48.0, tq=None):
    q, k = hip.locality_inputs(
        jax.random.key(seed), batch=b, seq=t, heads=h, kv_heads=kv, head_dim=p, length_scale=length_scale
    )
    return (q if tq is None else q[:, -tq:]), k


@pytest.mark.parametrize(
    "causal, window, sinks, tq", [(True, 32, 8, None), (True, None, 0, 200), (False, None, 20, None)]
)
def test_search_matches_numpy_replica(causal, window, sinks, tq):
    """The jax search (scores inherited by left halves) == the paper's search written in numpy
    on independently computed exact block scores (T not a multiple of the block, GQA)."""
    bq, bk, kk = 16, 16, 4
    q, k = _inputs(1, tq=tq)
    got = np.asarray(
        search(
            q, k, k_blocks=kk, block_q=bq, block_k=bk, window=window, sinks=sinks, causal=causal, implementation="xla"
        )
    )
    tq_, tk = q.shape[1], k.shape[1]
    score = numpy_block_scores(q, k, bq, bk, causal)
    nq, nk = score.shape[2:]
    for h in range(q.shape[2]):
        for i in range(nq):
            p_last = min(i * bq + bq - 1, tq_ - 1) + tk - tq_
            lo = sinks // bk
            if causal:
                key_end = min(max(p_last + 1 - (window or 0), 0), tk)
                hi = max(min(-(-key_end // bk), nk), lo)
            else:
                hi = nk
            want = numpy_search(score[0, h, i], lo, hi, kk, nk)
            row = got[0, h, i]
            np.testing.assert_array_equal(row[row >= 0], want, err_msg=f"head {h} block {i}")


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_pallas_scores_equal_xla(backend):
    """The block-max scoring kernel == the XLA gather (Tq < Tk, tails, GQA), and the search on it
    returns the same blocks."""
    bq, bk = 16, 16
    q, k = _inputs(2, t=120, tq=50)
    cfg, _, _ = common.validate(
        q, k, k, None, None, causal=True, window=None, sinks=0, block_q=bq, block_k=bk, sm_scale=None
    )
    cand = jax.random.randint(jax.random.key(3), (1, 4, cfg.nq, 5), 0, cfg.nk)
    kernel = pallas_gpu.score_blocks if backend == "gpu" else pallas_tpu.score_blocks
    got = jax.jit(lambda q, k, c: kernel(q, k, c, cfg, interpret=True))(q, k, cand)
    want = hip.score_blocks_xla(q, k, cand, cfg)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    kw = {"k_blocks": 3, "block_q": bq, "block_k": bk, "window": 24, "sinks": 4}
    np.testing.assert_array_equal(
        search(q, k, implementation="pallas", interpret=True, backend=backend, **kw),
        search(q, k, implementation="xla", **kw),
    )


def test_tpu_interpreter_scoring():
    """The TPU scoring kernel under the TPU-semantics interpreter (out-of-bounds checks)."""
    q, k = _inputs(4, t=16, h=2, kv=1, p=8)
    kw = {"k_blocks": 1, "block_q": 8, "block_k": 8, "window": 8, "sinks": 0}
    np.testing.assert_array_equal(
        search(q, k, implementation="pallas", interpret=pltpu.InterpretParams(), backend="tpu", **kw),
        search(q, k, implementation="xla", **kw),
    )


def test_decode_matches_prefill_with_block_q_1():
    """Decoding at a traced position over a longer cache (junk past pos) returns the prefill
    search's blocks for that query with block_q = 1; pos may differ per batch row."""
    t, slots = 200, 230
    q, k = _inputs(5, b=2, t=t)
    kw = {"k_blocks": 3, "block_k": 16, "window": 32, "sinks": 8}
    pre = np.asarray(search(q, k, block_q=1, implementation="xla", **kw))  # [B, H, T, 3]
    cache = jnp.pad(k, ((0, 0), (0, slots - t), (0, 0), (0, 0)), constant_values=5.0)
    dec = jax.jit(lambda qq, pos: hip_decode_block_indices(qq, cache, pos, **kw))
    for pos in (0, 40, 41, 199):
        got = dec(q[:, pos], jnp.int32(pos))
        np.testing.assert_array_equal(got, pre[:, :, pos], err_msg=f"pos {pos}")
    pos = jnp.asarray([57, 170], jnp.int32)
    got = dec(q[jnp.arange(2), pos], pos)
    np.testing.assert_array_equal(got[0], pre[0, :, 57])
    np.testing.assert_array_equal(got[1], pre[1, :, 170])


def test_extra_rounds_change_nothing():
    """A search with more rounds than needed (a larger num_blocks bound, as decoding over a long
    cache has) returns the same blocks: the premise of decode == prefill."""
    rng = np.random.default_rng(0)
    score = jnp.asarray(rng.normal(size=(6, 40)), jnp.float32)
    lo = jnp.asarray([0, 3, 0, 10, 38, 0], jnp.int32)
    hi = jnp.asarray([40, 40, 7, 25, 40, 0], jnp.int32)
    fn = lambda cand: jnp.take_along_axis(score, jnp.clip(cand, 0, 39), axis=-1)
    run = jax.jit(lambda lo, hi, bound: hip_search(fn, lo, hi, k_blocks=5, num_blocks=bound), static_argnums=2)
    base = run(lo, hi, 40)
    for bound in (80, 1000):
        np.testing.assert_array_equal(run(lo, hi, bound), base)
    assert np.all(np.asarray(base[5]) == -1)  # an empty range selects nothing
    # 7 blocks for 5 spans: one round splits them into single blocks, so the exact top 5.
    np.testing.assert_array_equal(base[2], np.sort(np.argsort(-np.asarray(score[2, :7]))[:5]))


def test_recall_on_locality_data():
    """Block recall vs the exact top-k (exact block max over the searchable range) >= 0.9 on
    smooth (local) queries and keys; the benchmark script reports it at its real settings."""
    t, bq, bk, kk = 2048, 32, 32, 6
    kw = {"k_blocks": kk, "block_q": bq, "block_k": bk, "window": 64, "sinks": 32}
    recalls = {}
    for ls in (0.0, 256.0):
        q, k = hip.locality_inputs(jax.random.key(7), batch=1, seq=t, heads=2, kv_heads=1, head_dim=32, length_scale=ls)
        found = search(q, k, implementation="xla", **kw)
        scores = jax.jit(lambda q, k: hip.exact_block_scores(q, k, block_q=bq, block_k=bk))(q, k)
        exact, n_search = hip.exact_top_blocks(scores, seq_q=t, seq_k=t, **kw)
        recalls[ls] = hip.block_recall(found, exact, n_search, kk)
    assert recalls[256.0] >= 0.9, recalls
    # Without locality the hierarchical pruning loses blocks: the measurement can tell.
    assert recalls[0.0] < recalls[256.0], recalls


@pytest.mark.parametrize("window, sinks", [(None, 0), (20, 5)])
def test_full_budget_equals_dense(window, sinks):
    """When k_blocks covers every key block the sparse output is exactly dense causal attention."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 70, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 70, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 70, 2, 16)), jnp.float32)
    kw = {"block_q": 16, "block_k": 16, "window": window, "sinks": sinks}
    idx = search(q, k, k_blocks=5, implementation="xla", **kw)
    dense = sparse_attention(q, k, v, implementation="reference", block_q=16, block_k=16)
    out = sparse_attention(q, k, v, block_indices=idx, implementation="reference", **kw)
    np.testing.assert_array_equal(out, dense)


def test_search_range_jit_and_shapes():
    """Jittable; ids sorted, unique, causally visible, outside the sink and window ranges, and
    exactly min(k_blocks, searchable) of them."""
    rng = np.random.default_rng(1)
    t, bq, bk, kk, window, sinks = 300, 16, 8, 3, 24, 16
    q = jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(2, t, 1, 8)), jnp.bfloat16)
    f = jax.jit(
        hip_block_indices,
        static_argnames=("k_blocks", "block_q", "block_k", "window", "sinks", "causal", "implementation"),
    )
    idx = np.asarray(f(q, k, k_blocks=kk, block_q=bq, block_k=bk, window=window, sinks=sinks, implementation="xla"))
    nq = common.cdiv(t, bq)
    assert idx.shape == (2, 2, nq, kk) and idx.dtype == np.int32
    for i in range(nq):
        p_last = min(i * bq + bq - 1, t - 1)
        hi = -(-(p_last - window + 1) // bk)
        row = idx[:, :, i]
        valid = row[row >= 0]
        assert np.all((valid >= sinks // bk) & (valid < max(hi, sinks // bk)))
        n_search = max(hi - sinks // bk, 0)
        assert np.all((row >= 0).sum(-1) == min(n_search, kk))
        for r in row.reshape(-1, kk):
            v = r[r >= 0]
            assert np.all(np.diff(v) > 0)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_scoring_lowers_for_gpu_and_tpu(platform, monkeypatch):
    """The scoring kernels lower to Triton / Mosaic (jax.export)."""
    from jax import export  # pylint: disable=g-import-not-at-top
    from jax._src.pallas.mosaic import tpu_info  # pylint: disable=g-import-not-at-top

    monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5 lite")
    monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    backend = {"tpu": "tpu", "cuda": "gpu"}[platform]
    blk = 64 if backend == "gpu" else 128
    structs = [
        jax.ShapeDtypeStruct((1, 1000, 4, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((1, 1000, 2, 128), jnp.bfloat16),
    ]
    exported = export.export(
        jax.jit(
            lambda q, k: hip_block_indices(
                q,
                k,
                k_blocks=2,
                block_q=blk,
                block_k=blk,
                window=128,
                sinks=16,
                implementation="pallas",
                interpret=False,
                backend=backend,
            )
        ),
        platforms=(platform,),
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*structs)
    assert f"hip_score_blocks_{backend}" in exported.mlir_module()


def test_validation():
    q = jnp.zeros((1, 32, 2, 8))
    with pytest.raises(ValueError, match="k_blocks"):
        hip_block_indices(q, q, k_blocks=0)
    with pytest.raises(ValueError, match="window"):
        hip_block_indices(q, q, k_blocks=2, window=-3)
    with pytest.raises(ValueError, match="k_cache"):
        hip_decode_block_indices(q[:, 0], q[:, :, :1, :4], 3, k_blocks=2)
