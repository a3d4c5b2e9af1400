"""The six family notebooks: each .ipynb is in sync with its .py, and each runs end to end in its fast
setting (`ZOO_NOTEBOOK_FAST=1`) with sane numbers and its figures drawn.

The notebooks are executed as plain scripts (the percent-format .py; the pair check guarantees the
.ipynb holds the same code) in this process with `runpy`, so the imports and JAX's first compiles
are paid once, and the test can read the notebook's variables. The code never uses `__file__` or
the working directory, so it runs the same in a Jupyter kernel.
"""

import os
import runpy

import jupytext
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

NB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "notebooks")
NOTEBOOKS = ["s4_kernels", "spacetime_forecast", "mamba2_state", "hip_blocks", "lact_loss", "masformer_schedule"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_pair_in_sync(name):
    py = jupytext.read(os.path.join(NB, f"{name}.py"))
    ipynb = jupytext.read(os.path.join(NB, f"{name}.ipynb"))
    assert [(c.cell_type, c.source) for c in py.cells] == [(c.cell_type, c.source) for c in ipynb.cells]
    assert all(not c.get("outputs") for c in ipynb.cells if c.cell_type == "code"), "clear the outputs"


@pytest.fixture
def run_notebook(monkeypatch):
    """Runs notebooks/<name>.py in the fast setting; returns its global variables."""
    monkeypatch.setenv("ZOO_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    plt.close("all")

    def run(name: str) -> dict:
        return runpy.run_path(os.path.join(NB, f"{name}.py"), run_name=f"notebook_{name}")

    yield run
    plt.close("all")


def assert_drawn(*figures) -> None:
    """Every figure has axes with something plotted on them."""
    for fig in figures:
        assert isinstance(fig, Figure)
        assert fig.axes and all(ax.lines or ax.images or ax.patches or ax.collections for ax in fig.axes)


def test_s4_kernels(run_notebook):
    g = run_notebook("s4_kernels")
    assert_drawn(g["fig_kernels"], g["fig_decay"])
    for k in g["kernels"].values():
        assert k.shape == (64, g["LENGTH"]) and np.isfinite(k).all() and np.abs(k).max() > 0
    short, long = g["DT_RANGES"]
    for mode in g["MODES"]:
        r_short, r_long = g["tail_ratio"][mode, short], g["tail_ratio"][mode, long]
        # exp(-dt l / 2) with dt >= 0.1 has decayed by e^-10 after 3/4 of 256 lags
        assert r_short < 1e-3 and r_short < r_long, (mode, r_short, r_long)


def test_spacetime_forecast(run_notebook):
    g = run_notebook("spacetime_forecast")
    assert_drawn(g["fig_forecast"])
    rmse = g["rmse"]
    assert all(np.isfinite(v) and v > 0 for v in rmse.values()), rmse
    assert rmse["optimal (true AR)"] < rmse["zero (the mean)"]
    assert rmse["SpaceTime"] < rmse["zero (the mean)"], rmse  # better than predicting the mean
    assert len(g["result"]["example"]["pred"]) == g["task"].horizon


def test_mamba2_state(run_notebook):
    g = run_notebook("mamba2_state")
    assert_drawn(g["fig_decay"], g["fig_norms"])
    alpha = g["alpha"]
    assert ((alpha[1.0] > 0) & (alpha[1.0] < 1)).all()
    assert (alpha[4.0] < alpha[2.0]).all() and (alpha[2.0] < alpha[1.0]).all()  # a_scale forgets more
    norms, positions = g["norms"], g["positions"]
    original = norms["original"]  # [L, B, H, S]
    assert np.isfinite(original).all() and (original > 0).all()
    # the state is linear in B: b_scale halves the first layer's state exactly
    np.testing.assert_allclose(norms["b_scale 0.5 (write less)"][0], 0.5 * original[0], rtol=1e-3)
    # the window changes nothing before the first R tokens have passed
    early = positions <= g["WINDOW"]
    np.testing.assert_allclose(norms[f"window {g['WINDOW']}"][..., early], original[..., early], rtol=1e-3, atol=1e-6)
    assert not np.allclose(norms[f"window {g['WINDOW']}"][..., -1], original[..., -1], rtol=1e-3)
    assert norms["a_scale 2 (forget more)"][0, ..., -1].mean() < original[0, ..., -1].mean()


def test_hip_blocks(run_notebook):
    g = run_notebook("hip_blocks")
    assert_drawn(g["fig_blocks"])
    idx, n_blocks, k_blocks = g["idx"], g["n_blocks"], g["K_BLOCKS"]
    assert idx.shape == (n_blocks, k_blocks) and idx.dtype == np.int32
    assert ((idx >= -1) & (idx < n_blocks)).all()
    for qb, row in enumerate(idx):
        chosen = row[row >= 0]
        assert (chosen <= qb).all() and len(set(chosen.tolist())) == len(chosen)  # causal, no repeats
    assert (idx[n_blocks // 2 :] >= 0).all()  # late query blocks have enough searchable blocks
    assert g["mass_hip"] > g["mass_random"] > g["mass_window"]
    assert g["rel_error"]["HiP blocks"] < g["rel_error"]["random blocks"]


def test_lact_loss(run_notebook):
    g = run_notebook("lact_loss")
    assert_drawn(g["fig_loss"])
    assert set(g["by_position"]) == set(g["models"])
    for name, r in g["by_position"].items():
        assert len(r["loss"]) == 16 and max(r["position"]) > g["SEQ_LEN"]  # beyond the training length
        assert all(0 < v < 10 for v in r["loss"]), (name, r["loss"])  # ln 256 = 5.5 at chance
        assert len(g["curves"][name]) == g["STEPS"] and all(np.isfinite(g["curves"][name]))


def test_masformer_schedule(run_notebook):
    g = run_notebook("masformer_schedule")
    assert_drawn(g["fig_schedule"])
    results = g["results"]
    n_full = [sum(k == "full" for k in r["schedule"]) for r in results.values()]
    assert n_full == [0, 1, g["L"]]
    ratios = [r["flops_ratio"] for r in results.values()]
    assert ratios[0] < ratios[1] < ratios[2] == pytest.approx(1.0)
    assert all(0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["final_loss"]) for r in results.values())
