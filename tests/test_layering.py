"""Imports point down: every import between the project's packages (also those inside functions)
follows the layer table below. Kernels never import zoo; models never import train, data or eval;
train never imports eval (the CLI runs training, then evaluation)."""

import ast
import pathlib

import pytest
from conftest import ROOT

# layer -> the layers it may import (besides itself). The floors, bottom up:
# kernels; layers; models, data, storage; config, checkpoint; model_dir; convert, train, eval, generate; info; compare;
# reproduce; cli. (compare_report is a leaf: it reads the comparison's JSON only.)
ALLOWED = {
    "pallas_kernels": set(),
    "zoo.storage": set(),
    "zoo.data": set(),
    "zoo.layers": {"pallas_kernels"},
    "zoo.models": {"zoo.layers", "pallas_kernels"},
    "zoo.config": {"zoo.models"},
    "zoo.configs": {"zoo.config"},
    "zoo.checkpoint": {"zoo.models", "zoo.storage"},
    "zoo.model_dir": {"zoo.checkpoint", "zoo.models", "zoo.storage"},
    "zoo.convert": {"zoo.checkpoint", "zoo.model_dir", "zoo.models", "zoo.storage", "zoo.data"},
    "zoo.generate": {"zoo.models", "zoo.data"},
    "zoo.train": {
        "zoo.models",
        "zoo.data",
        "zoo.config",
        "zoo.checkpoint",
        "zoo.model_dir",
        "zoo.storage",
        "zoo.layers",
        "pallas_kernels",
    },
    "zoo.eval": {
        "zoo.models",
        "zoo.data",
        "zoo.config",
        "zoo.checkpoint",
        "zoo.model_dir",
        "zoo.convert",
        "zoo.storage",
        "zoo.layers",
        "zoo.generate",
    },
    "zoo.bench": {"zoo.models", "zoo.config", "zoo.train", "zoo.checkpoint", "zoo.model_dir", "zoo.storage"},
    "zoo.info": {"zoo.models", "zoo.data", "zoo.config", "zoo.checkpoint", "zoo.model_dir", "zoo.train"},
    # `zoo compare`: the top floor beside the CLI (trains, converts, evaluates and benchmarks every model)
    "zoo.compare": {
        "zoo.models",
        "zoo.data",
        "zoo.config",
        "zoo.configs",
        "zoo.checkpoint",
        "zoo.model_dir",
        "zoo.convert",
        "zoo.train",
        "zoo.eval",
        "zoo.bench",
        "zoo.info",
        "zoo.storage",
        "zoo.compare_report",
        "zoo.compare_mqar",
    },
    # the MQAR grid of `zoo compare`: trains and converts like the comparison, shares its rows and report
    "zoo.compare_mqar": {
        "zoo.compare",
        "zoo.compare_report",
        "zoo.models",
        "zoo.data",
        "zoo.config",
        "zoo.configs",
        "zoo.checkpoint",
        "zoo.model_dir",
        "zoo.convert",
        "zoo.train",
        "zoo.eval",
        "zoo.storage",
    },
    # the comparison's markdown and figures, written from its JSON alone (with the shared plot helpers)
    "zoo.compare_report": {"zoo.eval"},
    # `zoo reproduce`: the catalogue of experiments, above compare (it runs the comparison among others)
    "zoo.reproduce": {
        "zoo",
        "zoo.config",
        "zoo.checkpoint",
        "zoo.model_dir",
        "zoo.train",
        "zoo.eval",
        "zoo.compare",
        "zoo.compare_report",
    },
    "zoo": {
        "zoo.models",
        "zoo.checkpoint",
        "zoo.model_dir",
        "zoo.generate",
        "zoo.convert",
        "zoo.data",
    },
}
LAYERS = sorted(ALLOWED, key=len, reverse=True)


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to (None outside the project; cli may import anything)."""
    if module == "zoo.cli":
        return "zoo.cli"
    for layer in LAYERS:
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module
            out += [(node.lineno, f"{name}.{a.name}") for a in node.names]
    return out


SOURCES = sorted(p for d in ("zoo", "pallas_kernels") for p in (pathlib.Path(ROOT) / d).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    here = layer_of(_module_name(path))
    assert here is not None, f"{path}: add its layer to ALLOWED in tests/test_layering.py"
    if here == "zoo.cli":
        return
    bad = []
    for line, name in _imports(path):
        there = layer_of(name)
        if there is not None and there != here and there not in ALLOWED[here]:
            bad.append(f"line {line}: {name} ({here} -> {there})")
    assert not bad, f"{path.relative_to(ROOT)} imports upward: " + "; ".join(bad)


def test_the_rules_of_the_issue_hold_in_the_table():
    assert not ALLOWED["pallas_kernels"]
    assert not {"zoo.train", "zoo.data", "zoo.eval"} & ALLOWED["zoo.models"]
    assert "zoo.eval" not in ALLOWED["zoo.train"]
