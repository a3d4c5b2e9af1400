"""The code is ruff-clean: formatted (`ruff format`) and linted (`ruff check`, rules in pyproject.toml)."""

import pathlib
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


def test_test_module_names_are_unique():
    """pytest imports test files by basename (rootdir-relative, no packages): two files of one name in
    different folders fail collection ("import file mismatch") depending on what was collected first."""
    names = [p.name for p in pathlib.Path(ROOT, "tests").rglob("*.py") if p.name not in {"__init__.py", "conftest.py"}]
    assert sorted({n for n in names if names.count(n) > 1}) == []
