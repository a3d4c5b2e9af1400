"""Tests of pallas_kernels.sparse_attention.hip_block_indices (HiP hierarchical block search)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.sparse_attention import common, hip_block_indices, sparse_attention


def beam_search_numpy(score, lo, hi, k_blocks, nk):
    """Independent numpy replica of the described search for one row of representative scores."""
    n = hi - lo
    edges = [lo + (i * n) // k_blocks for i in range(k_blocks + 1)]
    start, end = np.array(edges[:-1]), np.array(edges[1:])
    for _ in range(math.ceil(math.log2(max(1, -(-nk // k_blocks))))):
        mid = start + (end - start + 1) // 2
        cs, ce = np.concatenate([start, mid]), np.concatenate([mid, end])
        sc = np.where(ce > cs, score[np.clip(cs, 0, nk - 1)], -np.inf)
        top = np.argsort(-sc, kind="stable")[:k_blocks]
        start, end = cs[top], ce[top]
    return np.sort(start[end > start])


def planted(seed, t=1024, h=2, d=32, bk=16, n_hot=3, lam=150.0):
    """Queries share a per-head direction u; n_hot key blocks are strongly aligned with u and
    their neighbourhood decays like exp(-distance / lam) (HiP's attention-locality premise)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(h, d))
    u /= np.linalg.norm(u, axis=-1, keepdims=True)
    q = rng.normal(size=(1, t, h, d)) * 0.3 + 2.0 * u
    k = rng.normal(size=(1, t, h, d)) * 0.3
    nk, pos = t // bk, np.arange(t)
    hot = np.zeros((h, n_hot), int)
    for hh in range(h):
        hot[hh] = np.sort(rng.choice(np.arange(1, nk - 1, 3), n_hot, replace=False))
        prof = np.zeros(t)
        for j in hot[hh]:
            dist = np.maximum(np.maximum(j * bk - pos, pos - ((j + 1) * bk - 1)), 0)
            prof = np.maximum(prof, np.where(dist == 0, 3.0, 1.8 * np.exp(-dist / lam)))
        k[0, :, hh] += prof[:, None] * u[hh]
    return jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), hot


def exact_block_scores(q, k, bq, bk, causal):
    """Exact block-max of q.k per (query block, key block): [B, H, nq, nk] (-inf if invisible)."""
    b, t, h, _ = q.shape
    s = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, h // k.shape[2], axis=2))
    if causal:
        s = jnp.where(jnp.arange(t)[:, None] >= jnp.arange(t)[None, :], s, -jnp.inf)
    return s.reshape(b, h, t // bq, bq, t // bk, bk).max(axis=(3, 5))


@pytest.mark.parametrize("causal", [True, False])
def test_recall_on_planted_keys(causal):
    """Recall of the exact block top-k (k = planted blocks, verified) by a K = 4k search >= 0.9."""
    bq = bk = 16
    recalls = []
    for seed in range(2):
        q, k, hot = planted(seed)
        n_hot = hot.shape[1]
        idx = hip_block_indices(q, k, k_blocks=4 * n_hot, block_q=bq, block_k=bk, causal=causal)
        exact = jax.lax.top_k(exact_block_scores(q, k, bq, bk, causal), n_hot)[1]  # [1,H,nq,k]
        nq = q.shape[1] // bq
        # Rows whose queries come after every planted block (all of them visible).
        rows = np.arange(nq) * bq >= (hot.max() + 1) * bk if causal else np.ones(nq, bool)
        # The planted blocks are the exact top-k on those rows.
        np.testing.assert_array_equal(np.sort(np.asarray(exact), -1)[0][:, rows],
                                      np.broadcast_to(hot[:, None],
                                                      (hot.shape[0], rows.sum(), n_hot)))
        hit = (idx[..., :, None] == exact[..., None, :]).any(-2)  # [1,H,nq,k]
        recalls.append(float(hit[:, :, rows].mean()))
    assert min(recalls) >= 0.9, recalls


def test_matches_numpy_replica():
    """jax search == a numpy replica of the algorithm on the min/max representative scores."""
    bq, bk, kk = 16, 16, 4
    q, k, _ = planted(3, t=512)
    idx = np.asarray(hip_block_indices(q, k, k_blocks=kk, block_q=bq, block_k=bk, causal=True))
    nq, nk = 512 // bq, 512 // bk
    kr = np.asarray(k).reshape(1, nk, bk, 2, 32)
    qr = np.asarray(q).reshape(1, nq, bq, 2, 32)
    rep = np.maximum(np.einsum("bqrhd,bkhd->bhqrk", qr, kr.min(2)),
                     np.einsum("bqrhd,bkhd->bhqrk", qr, kr.max(2))).max(3)  # [1,H,nq,nk]
    for hh in range(2):
        for i in range(nq):
            hi = -(-(i * bq + bq) // bk)
            want = beam_search_numpy(rep[0, hh, i], 0, hi, kk, nk)
            got = idx[0, hh, i][idx[0, hh, i] >= 0]
            np.testing.assert_array_equal(got, want, err_msg=f"head {hh} block {i}")


@pytest.mark.parametrize("window, sinks", [(None, 0), (20, 5)])
def test_full_budget_equals_dense(window, sinks):
    """When K covers every key block the sparse output is exactly dense causal attention."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 70, 4, 16)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 70, 2, 16)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, 70, 2, 16)), jnp.float32)
    kw = dict(block_q=16, block_k=16, window=window, sinks=sinks)
    idx = hip_block_indices(q, k, k_blocks=5, **kw)
    dense = sparse_attention(q, k, v, implementation="reference", block_q=16, block_k=16)
    for impl in ("reference", "xla"):
        out = sparse_attention(q, k, v, block_indices=idx, implementation=impl, **kw)
        np.testing.assert_allclose(out, dense, atol=1e-6 if impl == "xla" else 0, rtol=0)


def test_search_range_jit_and_shapes():
    """Jittable; ids sorted, unique, causally visible, outside the sink and window ranges."""
    rng = np.random.default_rng(1)
    t, bq, bk, kk, window, sinks = 300, 16, 8, 3, 24, 16
    q = jnp.asarray(rng.normal(size=(2, t, 2, 8)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(2, t, 1, 8)), jnp.bfloat16)
    f = jax.jit(hip_block_indices, static_argnames=("k_blocks", "block_q", "block_k", "window",
                                                    "sinks", "causal"))
    idx = np.asarray(f(q, k, k_blocks=kk, block_q=bq, block_k=bk, window=window, sinks=sinks))
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


def test_validation():
    q = jnp.zeros((1, 32, 2, 8))
    with pytest.raises(ValueError, match="k_blocks"):
        hip_block_indices(q, q, k_blocks=0)
    with pytest.raises(ValueError, match="window"):
        hip_block_indices(q, q, k_blocks=2, window=-3)
