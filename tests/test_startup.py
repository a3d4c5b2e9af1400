"""Start-up: `zoo --help`, `zoo models` and argument errors answer without importing JAX or a model."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from zoo.models import registry

_PROBE = """
import json, sys
from zoo.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
heavy = sorted(m for m in ("jax", "flax", "jaxlib", "optax", "grain", "orbax") if m in sys.modules)
print(json.dumps({"rc": rc, "heavy": heavy}), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "argv, rc",
    [
        (["--help"], 0),
        (["models"], 0),
        (["bench", "train", "--help"], 0),
        (["train"], 2),  # --config and --workdir missing
        (["eval", "--workdir", "w", "--config.x=1"], 2),
    ],
)
def test_cli_answers_without_importing_jax(argv, rc):
    p = subprocess.run([sys.executable, "-c", _PROBE, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    result = json.loads(p.stderr.strip().splitlines()[-1])
    assert result == {"rc": rc, "heavy": []}, p.stderr


def test_import_zoo_is_light_and_lazy():
    code = "import sys, zoo; print('jax' in sys.modules); zoo.list_models(); print('jax' in sys.modules)"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["False", "True"], p.stderr


def test_listing_from_source_equals_the_registry():
    imported = [(n, registry.model_kind(n), registry.list_presets(n)) for n in registry.list_models()]
    assert registry.listing() == imported and len(imported) >= 8
