"""The package as a user installs it: declared dependencies are what the code imports, and the wheel
works from an empty directory in a fresh virtual environment."""

from __future__ import annotations

import ast
import importlib.metadata as md
import os
import pathlib
import re
import subprocess
import sys
import sysconfig
import zipfile

from conftest import ROOT

DIST = "longcontext-zoo"
PACKAGES = ("zoo", "pallas_kernels")
# declared but never imported by name: used by another dependency at run time
NOT_IMPORTED = {"importlib-resources": "TFDS builders that live in a package", "gcsfs": "epath's gs://"}
NOT_IMPORTED["google-cloud-storage"] = "Orbax's bucket checks"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> tuple[set[str], dict[str, set[str]]]:
    """(base distributions, {extra: distributions}) from the installed metadata of this checkout."""
    base, extras = set(), {}
    for req in md.requires(DIST) or []:
        name = _norm(re.match(r"[A-Za-z0-9_.-]+", req).group(0))
        extra = re.search(r'extra == "([^"]+)"', req)
        if extra:
            extras.setdefault(extra.group(1), set()).add(name)
        else:
            base.add(name)
    return base, extras


def _third_party_imports() -> dict[str, bool]:
    """{top-level module: imported at module level somewhere} over the shipped packages."""
    found: dict[str, bool] = {}
    for pkg in PACKAGES:
        for path in pathlib.Path(ROOT, pkg).rglob("*.py"):
            tree = ast.parse(path.read_text())
            top_level = {id(n) for n in tree.body}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    mod = name.split(".")[0]
                    if mod in sys.stdlib_module_names or mod in PACKAGES or mod == "__future__":
                        continue
                    found[mod] = found.get(mod, False) or id(node) in top_level
    return found


def test_dependencies_are_declared_exactly_as_used():
    base, extras = _requirements()
    optional = set().union(*extras.values())
    dists = md.packages_distributions()
    imported_dists = set()
    for mod, at_module_level in _third_party_imports().items():
        owners = {_norm(d) for d in dists.get(mod, [])}
        if not owners:  # an optional package not installed here (lm_eval): lazy, and an extra of its name
            assert not at_module_level and _norm(mod) in optional, f"{mod} is imported but not installed"
            continue
        imported_dists |= owners
        declared = owners & (base if at_module_level else base | optional)
        where = "at module level (a base dependency)" if at_module_level else "lazily (base or an extra)"
        assert declared, f"{mod} ({sorted(owners)}) is imported {where} but not declared so"
    unused = base - imported_dists - {_norm(d) for d in NOT_IMPORTED}
    assert not unused, f"declared but never imported: {sorted(unused)}"
    for name in optional - imported_dists - {_norm(d) for d in NOT_IMPORTED}:
        # the test extra's own tools are used by the tests, not the package
        assert all(name not in extras[e] for e in ("tfds", "sentencepiece", "hf-datasets")), name


def test_wheel_installs_and_runs_from_an_empty_directory(tmp_path):
    """Build the wheel, install it (no dependencies) into a fresh venv whose only other path is this
    venv's site-packages (so the run needs no download), and run the CLI from an empty directory: the
    configs are package data, found by name, and nothing is imported from the checkout."""
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), ROOT],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("*.whl")
    assert wheel.name.startswith("longcontext_zoo-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "zoo/configs/transformer.py" in names and "pallas_kernels/ssd/__init__.py" in names
    assert not any(n.startswith(("tests/", "scripts/", "docs/")) for n in names)

    venv = tmp_path / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        capture_output=True,
    )
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    # dependencies from this venv, appended after the fresh site-packages (its editable finder is not run)
    pathlib.Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    zoo = venv / "bin" / "zoo"
    where = subprocess.run(
        [py, "-c", "import zoo, pallas_kernels; print(zoo.__file__); print(pallas_kernels.__file__)"],
        cwd=empty,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert all(p.startswith(site) for p in where), where
    models = subprocess.run([zoo, "models"], cwd=empty, env=env, capture_output=True, text=True)
    assert models.returncode == 0, models.stderr
    assert all(name in models.stdout for name in ("transformer", "mamba2", "s4", "hip", "lact"))
    info = subprocess.run(
        [zoo, "info", "--config", "transformer:tiny"], cwd=empty, env=env, capture_output=True, text=True
    )
    assert info.returncode == 0, info.stderr
    assert "transformer (preset tiny)" in info.stdout and re.search(r"^params\s+[\d,]+ ", info.stdout, re.M)
    assert os.listdir(empty) == []  # zoo info writes nothing
