"""The code is ruff-clean: formatted (`ruff format`) and linted (`ruff check`, rules in pyproject.toml)."""

import subprocess
import sys

from conftest import ROOT

PATHS = ["zoo", "pallas_kernels", "tests", "scripts", "notebooks"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args, *PATHS], cwd=ROOT, capture_output=True, text=True)


def test_ruff_format_is_clean():
    out = _ruff("format", "--check")
    assert out.returncode == 0, "run `ruff format`:\n" + out.stdout[-3000:] + out.stderr[-1000:]


def test_ruff_lint_is_clean():
    out = _ruff("check", "--output-format", "concise")
    assert out.returncode == 0, "run `ruff check --fix`:\n" + out.stdout[-3000:] + out.stderr[-1000:]
