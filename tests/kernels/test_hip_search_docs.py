"""The HiP search tables in the docs are rendered from results/hip_search/hip_search_quality.json
(scripts/hip_search_quality.py writes both): a docs table that disagrees with the JSON fails."""

import json
import os
import sys

import pytest
from conftest import ROOT

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
