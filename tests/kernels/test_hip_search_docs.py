"""The HiP search tables in the docs are rendered from results/hip_search/hip_search_quality.json
(scripts/hip_search_quality.py writes both): a docs table that disagrees with the JSON fails."""

import json
import os
import sys

import jax
import numpy as np
import pytest
from conftest import ROOT

from pallas_kernels.sparse_attention import hip, hip_block_indices

sys.path.insert(0, os.path.join(ROOT, "scripts"))
import hip_search_quality  # noqa: E402

RESULT = os.path.join(ROOT, "results", "hip_search", "hip_search_quality.json")


def _result():
    with open(RESULT, encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.parametrize("doc", hip_search_quality.DOCS)
def test_docs_equal_the_json(doc):
    assert hip_search_quality.docs_block(os.path.join(ROOT, doc)) == hip_search_quality.render_tables(_result())


def test_json_covers_both_scorings_and_records_provenance():
    result = _result()
    for part in ("search_quality", "flops", "models"):
        assert {r["scoring"] for r in result[part]} == {"representative", "block_max"}, part
    prov = result["provenance"]
    for key in ("git_commit", "date", "cpu", "cpu_cores", "jax_version", "seeds", "wall_seconds"):
        assert prov[key] not in (None, "", []), key
    # The paper's scoring makes the search a small part of the work (analytic, at 32K and 128K).
    ratio = {(r["T"], r["scoring"]): r["dense_over_hip"] for r in result["flops"]}
    assert ratio[(32768, "representative")] > 2 * ratio[(32768, "block_max")]
    assert ratio[(131072, "representative")] > 3 * ratio[(131072, "block_max")]


def test_render_changes_with_the_numbers():
    """The check can fail: another number renders another table."""
    result = _result()
    before = hip_search_quality.render_tables(result)
    result["flops"][0]["dense_over_hip"] += 1.0
    assert hip_search_quality.render_tables(result) != before


def test_block_mass_and_mass_ratio():
    """Block masses sum to one per query row and match a dense softmax; the best blocks capture
    a ratio of 1, the search at most 1."""
    t, bq, bk, kk = 200, 16, 16, 3
    q, k = hip.locality_inputs(jax.random.key(0), batch=1, seq=t, heads=2, kv_heads=2, head_dim=8, length_scale=32.0)
    mass = np.asarray(hip_search_quality.block_mass(q, k, block_q=bq, block_k=bk, chunk=3))
    rows = np.minimum(bq, t - np.arange(mass.shape[2]) * bq)
    np.testing.assert_allclose(mass.sum(-1), np.broadcast_to(rows, mass.shape[:3]), rtol=1e-5)
    qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
    s = np.einsum("bqhp,bkhp->bhqk", qn, kn) / np.sqrt(8)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    pad = np.pad(p, ((0, 0), (0, 0), (0, 13 * bq - t), (0, 13 * bk - t)))
    np.testing.assert_allclose(mass, pad.reshape(1, 2, 13, bq, 13, bk).sum(axis=(3, 5)), atol=1e-5)
    kw = {"k_blocks": kk, "block_q": bq, "block_k": bk, "window": 16, "sinks": 0}
    best, n_search = hip.exact_top_blocks(mass, seq_q=t, seq_k=t, **kw)
    assert hip_search_quality.mass_ratio(best, mass, best, n_search, kk) == 1.0
    found = hip_block_indices(q, k, implementation="xla", **kw)
    assert 0.3 < hip_search_quality.mass_ratio(found, mass, best, n_search, kk) <= 1.0 + 1e-6
