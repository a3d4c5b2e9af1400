"""The quickstart notebook runs end to end on a tiny run it makes itself, and its pair is in sync."""

import os

import jupytext
import nbformat
from nbclient import NotebookClient

from zoo.train.trainer import train

NB = os.path.join(os.path.dirname(__file__), "..", "..", "notebooks")


def test_pair_in_sync():
    py = jupytext.read(os.path.join(NB, "quickstart.py"))
    ipynb = jupytext.read(os.path.join(NB, "quickstart.ipynb"))
    assert [c.source for c in py.cells] == [c.source for c in ipynb.cells]


def test_quickstart_executes(tmp_path, tiny, monkeypatch):
    workdir = tmp_path / "run"
    train(tiny(steps=3), str(workdir), progress=False)
    nb = nbformat.read(os.path.join(NB, "quickstart.ipynb"), as_version=4)
    monkeypatch.setenv("ZOO_WORKDIR", str(workdir))
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "true key:" in outputs and "exact match" in outputs
