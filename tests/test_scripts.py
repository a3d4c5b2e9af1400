"""The benchmark scripts run end to end (tiny shapes, CPU): they print their tables, no timing is asserted.
The experiment scripts' helpers, and the docs rendered from their committed results."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
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
    """The module of scripts/<name>.py (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(os.path.join(ROOT, "scripts"))
    return module


@pytest.mark.parametrize(
    "script, render, result, doc",
    [
        ("bench_causal_attention", "markdown", "causal_attention_cpu.json", "sparse_attention.md"),
        ("bench_ssd", "minimal_markdown", "ssd_vs_minimal_cpu.json", "ssd.md"),
        ("bench_ssd", "short_markdown", "ssd_short_cpu.json", "ssd.md"),
    ],
)
def test_cpu_speed_tables_in_docs_equal_result_files(script, render, result, doc):
    """The CPU speed tables in docs/kernels are the benchmark scripts' rendering of their JSON reports."""
    kernels = os.path.join(ROOT, "docs", "kernels")
    with open(os.path.join(kernels, "results", result)) as f:
        report = json.load(f)
    with open(os.path.join(kernels, doc)) as f:
        text = f.read()
    assert getattr(_script(script), render)(report) in text


def test_bench_scripts_run_without_torch_and_say_so(tmp_path):
    """torch is optional: a tiny run with torch hidden writes a report whose torch field says why."""
    hide = tmp_path / "torch"
    hide.mkdir()
    (hide / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT, os.environ.get("PYTHONPATH", "")]))
    runs = {
        "attention.json": ["bench_causal_attention.py", "--lengths", "40", "--repeats", "1"],
        "ssd.json": ["bench_ssd.py", "--vs-minimal", "--shape", "1,64,2,8,8,1,32", "--repeats", "1"],
    }
    for out, argv in runs.items():
        proc = subprocess.run(
            [sys.executable, *argv, "--out", str(tmp_path / out)],
            cwd=os.path.join(ROOT, "scripts"),
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((tmp_path / out).read_text())
        assert report["torch"].startswith("torch not importable"), report["torch"]
        assert "torch not importable" in proc.stdout


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
