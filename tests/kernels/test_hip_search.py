"""Tests of HiP's hierarchical block search: prefill (`hip_block_indices`), decoding
(`hip_decode_block_indices`), their shared core (`hip_search`), both scorings (the paper's
representative keys and the exact tile max) through every implementation, and the recall of the
search on data with attention locality."""

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


def algorithm1(q, k, *, k_blocks, block_q, block_k, window, sinks, causal, rep_keys, query_stride):
    """The paper's Algorithm 1 in plain Python loops, from its text: for every (batch, head, query
    block), split the searchable key blocks into k chunks; each round split every chunk into two
    branches, score each branch by max over the block's rows 0, b_sq, 2 b_sq, ... and the b_k keys
    centred on the branch's centre of q . k (causally visible, existing pairs only), keep the k
    best branches (ties: the earlier candidate); stop when every branch is one key block.

    Returns int64 [B, H, nq, k_blocks], ascending, -1 padded."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    b, tq, h, _ = q.shape
    tk, kv = k.shape[1], k.shape[2]
    nq, nk = -(-tq // block_q), -(-tk // block_k)
    out = -np.ones((b, h, nq, k_blocks), np.int64)

    def score(bi, hi, i, start, end, p_rows):
        if end <= start:
            return -np.inf
        centre = (start + end) * block_k // 2
        best = -np.inf
        for r in range(0, block_q, query_stride):
            row = i * block_q + r
            if row >= tq:
                continue
            for t in range(centre - rep_keys // 2, centre - rep_keys // 2 + rep_keys):
                if t >= tk or (causal and t > p_rows[r]):
                    continue
                best = max(best, float(np.dot(q[bi, row, hi], k[bi, t, hi // (h // kv)])))
        return best

    for bi in range(b):
        for hi in range(h):
            for i in range(nq):
                p_rows = [i * block_q + r + tk - tq for r in range(block_q)]
                p_last = min(i * block_q + block_q - 1, tq - 1) + tk - tq
                lo = sinks // block_k
                if causal:
                    key_end = min(max(p_last + 1 - (window or 0), 0), tk)
                    hi_ = max(min(-(-key_end // block_k), nk), lo)
                else:
                    hi_ = nk
                n = hi_ - lo
                spans = [(lo + j * n // k_blocks, lo + (j + 1) * n // k_blocks) for j in range(k_blocks)]
                while any(e - s > 1 for s, e in spans):
                    halves = [(s, s + (e - s + 1) // 2) for s, e in spans] + [
                        (s + (e - s + 1) // 2, e) for s, e in spans
                    ]
                    scored = [(score(bi, hi, i, s, e, p_rows), -j) for j, (s, e) in enumerate(halves)]
                    order = sorted(range(len(halves)), key=lambda j: scored[j], reverse=True)[:k_blocks]
                    spans = [halves[j] for j in order]
                found = sorted(s for s, e in spans if e > s)
                out[bi, hi, i, : len(found)] = found
    return out


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
    """The block-max search (scores inherited by left halves) == the search written in numpy,
    scoring both halves, on independently computed exact block scores (T not a multiple of the
    block, GQA)."""
    bq, bk, kk = 16, 16, 4
    q, k = _inputs(1, tq=tq)
    got = np.asarray(
        search(
            q,
            k,
            k_blocks=kk,
            block_q=bq,
            block_k=bk,
            window=window,
            sinks=sinks,
            causal=causal,
            scoring="block_max",
            implementation="xla",
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


REP_CASES = [
    # causal, window, sinks, Tq (None: Tq = Tk), block_q, block_k, rep_keys, query_stride
    (True, 32, 8, None, 16, 16, 2, 2),
    (True, None, 0, 200, 16, 32, 3, 3),
    (False, None, 20, None, 32, 16, 1, 1),
]


@pytest.mark.parametrize("impl", ["reference", "xla", "pallas-tpu", "pallas-gpu"])
@pytest.mark.parametrize("case", REP_CASES, ids=["causal-window", "prefix-odd-bk", "noncausal"])
def test_representative_search_matches_algorithm1(impl, case):
    """The representative search of every implementation == the paper's Algorithm 1 written in
    plain loops (T not a multiple of the block, GQA, Tq < Tk, odd b_k and b_sq)."""
    causal, window, sinks, tq, bq, bk, rep_keys, stride = case
    q, k = _inputs(8, t=150, tq=None if tq is None else 100)
    kw = {"k_blocks": 3, "block_q": bq, "block_k": bk, "window": window, "sinks": sinks, "causal": causal}
    impl_kw = {"implementation": impl}
    if impl.startswith("pallas"):
        impl_kw = {"implementation": "pallas", "interpret": True, "backend": impl.split("-")[1]}
    got = np.asarray(search(q, k, scoring="representative", rep_keys=rep_keys, query_stride=stride, **kw, **impl_kw))
    want = algorithm1(q, k, rep_keys=rep_keys, query_stride=stride, **kw)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_pallas_representative_scores_equal_xla(backend):
    """The representative scoring kernel == the XLA scoring on the same candidates (tails, GQA,
    Tq < Tk, bf16 inputs accumulated in fp32)."""
    bq, bk = 16, 16
    q, k = _inputs(2, t=120, tq=50)
    q, k = q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
    cfg, _, _ = common.validate(
        q, k, k, None, None, causal=True, window=None, sinks=0, block_q=bq, block_k=bk, sm_scale=None
    )
    start = jax.random.randint(jax.random.key(3), (1, 4, cfg.nq, 5), 0, cfg.nk)
    end = jnp.minimum(start + jax.random.randint(jax.random.key(4), start.shape, 1, 4), cfg.nk)
    inputs = hip.representative_inputs(q, k, start, end, cfg, rep_keys=2, query_stride=2)
    kernel = pallas_gpu.score_representatives if backend == "gpu" else pallas_tpu.score_representatives
    got = jax.jit(lambda *a: kernel(*a, interpret=True))(*inputs)
    want = hip.score_representatives_xla(*inputs)
    assert np.isfinite(np.asarray(want)).any()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


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
    kw = {"k_blocks": 3, "block_q": bq, "block_k": bk, "window": 24, "sinks": 4, "scoring": "block_max"}
    np.testing.assert_array_equal(
        search(q, k, implementation="pallas", interpret=True, backend=backend, **kw),
        search(q, k, implementation="xla", **kw),
    )


@pytest.mark.parametrize("scoring", hip.SCORINGS)
def test_tpu_interpreter_scoring(scoring):
    """The TPU scoring kernels under the TPU-semantics interpreter (out-of-bounds checks)."""
    q, k = _inputs(4, t=40, h=2, kv=1, p=8)
    kw = {"k_blocks": 1, "block_q": 8, "block_k": 8, "window": 8, "sinks": 0, "scoring": scoring}
    np.testing.assert_array_equal(
        search(q, k, implementation="pallas", interpret=pltpu.InterpretParams(), backend="tpu", **kw),
        search(q, k, implementation="xla", **kw),
    )


@pytest.mark.parametrize("scoring", hip.SCORINGS)
def test_decode_matches_prefill_with_block_q_1(scoring):
    """Decoding at a traced position over a longer cache (junk past pos) returns the prefill
    search's blocks for that query with block_q = 1; pos may differ per batch row."""
    t, slots = 200, 230
    q, k = _inputs(5, b=2, t=t)
    kw = {"k_blocks": 3, "block_k": 16, "window": 32, "sinks": 8, "scoring": scoring}
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


@pytest.mark.parametrize("scoring", hip.SCORINGS)
def test_extra_rounds_change_nothing(scoring):
    """A search with more rounds than needed (a larger num_blocks bound, as decoding over a long
    cache has) returns the same blocks: the premise of decode == prefill."""
    rng = np.random.default_rng(0)
    score = jnp.asarray(rng.normal(size=(6, 40)), jnp.float32)
    lo = jnp.asarray([0, 3, 0, 10, 38, 0], jnp.int32)
    hi = jnp.asarray([40, 40, 7, 25, 40, 0], jnp.int32)
    # A branch's score: the block at its centre (its first block under "block_max").
    centre = (lambda s, e: s) if scoring == "block_max" else (lambda s, e: (s + e - 1) // 2)
    fn = lambda s, e: jnp.take_along_axis(score, jnp.clip(centre(s, e), 0, 39), axis=-1)  # noqa: E731
    run = jax.jit(
        lambda lo, hi, bound: hip_search(fn, lo, hi, k_blocks=5, num_blocks=bound, scoring=scoring), static_argnums=2
    )
    base = run(lo, hi, 40)
    for bound in (80, 1000):
        np.testing.assert_array_equal(run(lo, hi, bound), base)
    assert np.all(np.asarray(base[5]) == -1)  # an empty range selects nothing
    # 7 blocks for 5 spans: one round splits them into single blocks, so the exact top 5.
    np.testing.assert_array_equal(base[2], np.sort(np.argsort(-np.asarray(score[2, :7]))[:5]))


@pytest.mark.parametrize("scoring", hip.SCORINGS)
def test_recall_on_locality_data(scoring):
    """Block recall vs the exact top-k (exact block max over the searchable range) on smooth
    (local) queries and keys: >= 0.9 for the tile max, >= 0.55 for the 2-key representatives
    (random choice recalls about 0.1 here); scripts/hip_search_quality.py reports it at real
    settings."""
    t, bq, bk, kk = 2048, 32, 32, 6
    kw = {"k_blocks": kk, "block_q": bq, "block_k": bk, "window": 64, "sinks": 32}
    recalls = {}
    for ls in (0.0, 256.0):
        q, k = hip.locality_inputs(jax.random.key(7), batch=1, seq=t, heads=2, kv_heads=1, head_dim=32, length_scale=ls)
        found = search(q, k, implementation="xla", scoring=scoring, **kw)
        scores = jax.jit(lambda q, k: hip.exact_block_scores(q, k, block_q=bq, block_k=bk))(q, k)
        exact, n_search = hip.exact_top_blocks(scores, seq_q=t, seq_k=t, **kw)
        recalls[ls] = hip.block_recall(found, exact, n_search, kk)
    assert recalls[256.0] >= {"block_max": 0.9, "representative": 0.55}[scoring], recalls
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


@pytest.mark.parametrize("scoring", hip.SCORINGS)
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_scoring_lowers_for_gpu_and_tpu(platform, scoring, monkeypatch):
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
                scoring=scoring,
                implementation="pallas",
                interpret=False,
                backend=backend,
            )
        ),
        platforms=(platform,),
        disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*structs)
    name = "hip_score_blocks" if scoring == "block_max" else "hip_score_representatives"
    assert f"{name}_{backend}" in exported.mlir_module()


def test_validation():
    q = jnp.zeros((1, 32, 2, 8))
    with pytest.raises(ValueError, match="k_blocks"):
        hip_block_indices(q, q, k_blocks=0)
    with pytest.raises(ValueError, match="window"):
        hip_block_indices(q, q, k_blocks=2, window=-3)
    with pytest.raises(ValueError, match="k_cache"):
        hip_decode_block_indices(q[:, 0], q[:, :, :1, :4], 3, k_blocks=2)
    with pytest.raises(ValueError, match="scoring"):
        hip_block_indices(q, q, k_blocks=2, scoring="tile")
    with pytest.raises(ValueError, match="rep_keys"):
        hip_block_indices(q, q, k_blocks=2, block_q=8, block_k=8, rep_keys=9)
    with pytest.raises(ValueError, match="query_stride"):
        hip_block_indices(q, q, k_blocks=2, query_stride=0)
    with pytest.raises(ValueError, match="rep_keys"):
        hip_decode_block_indices(q[:, 0], q, 3, k_blocks=2, block_k=8, rep_keys=0)
