"""The benchmark scripts run end to end (tiny shapes, CPU): they print their tables, no timing is asserted.
The experiment scripts' helpers, and the docs rendered from their committed results."""

import argparse
import importlib.util
import os
import subprocess
import sys

import numpy as np
from conftest import ROOT

from zoo.data.synthetic import MQAR


def test_bench_kernels_smoke():
    out = subprocess.run(
        [sys.executable, "bench_kernels.py", "--smoke"],
        cwd=os.path.join(ROOT, "scripts"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = out.stdout
    for case in ("| ssd |", "| attention |", "| cauchy |", "| vandermonde |"):
        assert case in table, case
    assert "error:" not in table, table[-2000:]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mamba2_mqar_parity_doc_matches_results():
    """The Mamba-2 card's MQAR parity tables are the script's rendering of the committed JSONs."""
    parity = _script("mamba2_mqar_parity")
    out = os.path.join(ROOT, "results", "mamba2_mqar")
    rendered = parity.table(out) + "\n\n" + parity.curves(out)
    with open(os.path.join(ROOT, "docs", "models", "mamba2.md")) as f:
        doc = f.read()
    assert rendered in doc, "docs/models/mamba2.md: paste the output of scripts/mamba2_mqar_parity.py --table"


def test_mamba2_mqar_parity_helpers():
    """Both models' schedules are one function, and each query's distance is measured to its own pair."""
    parity = _script("mamba2_mqar_parity")
    args = argparse.Namespace(lr=3e-3, warmup=50, steps=1000)
    for step in (0, 1, 49, 50, 51, 500, 999, 1000):
        np.testing.assert_allclose(float(parity.lr_at_jnp(step, args)), parity.lr_at(step, args), rtol=1e-6)
    task = MQAR(length=64, num_pairs=4, seed=3)
    inputs, _, mask = parity.batch_at(task, 0, 16)
    rows, cols, dist = parity.query_distance(inputs, mask)
    assert len(rows) == 16 * 4
    for r, c, d in zip(rows, cols, dist):
        pair = [j for j in range(4) if inputs[r, 2 * j] == inputs[r, c]]
        assert pair and d == c - 2 * pair[0]
