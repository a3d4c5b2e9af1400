"""The code is ruff-clean: formatted (`ruff format`) and linted (`ruff check`, rules in pyproject.toml)."""

import pathlib
import re
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


def test_relative_links_in_the_docs_resolve():
    """Every relative markdown link in README.md, CHANGELOG.md, docs/ and notebooks/ names a file that exists."""
    pages = [pathlib.Path(ROOT, "README.md"), pathlib.Path(ROOT, "CHANGELOG.md")]
    pages += sorted(pathlib.Path(ROOT, "docs").rglob("*.md")) + sorted(pathlib.Path(ROOT, "notebooks").glob("*.md"))
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if not (page.parent / target.split("#")[0]).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_code_speaks_of_the_project_only():
    """Code, tests, scripts, configs and notebooks name no issue numbers, no "this round" and no paths
    of a machine outside the repository (history lives in git and CHANGELOG.md)."""
    pattern = re.compile(r"\bissues? \d|\bthis round\b|/work/|/scratch/", re.IGNORECASE)
    found = []
    for folder in PATHS + ["configs"]:
        for path in sorted(pathlib.Path(ROOT, folder).rglob("*.py")):
            if path.name == "test_style.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []
