"""The benchmark scripts run end to end (tiny shapes, CPU): they print their tables, no timing is asserted."""

import os
import subprocess
import sys

from conftest import ROOT


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
