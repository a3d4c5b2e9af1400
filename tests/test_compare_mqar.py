"""The MQAR grid of `zoo compare`: the mqar-test preset end to end (a trained transformer cell and
HiP converted from it), resuming cell by cell, the dry run's estimate, the verdicts on synthetic
result files, the figure writer, and docs/compare.md equal to its result file."""

import copy
import json
import pathlib

import pytest
from conftest import ROOT

import zoo
from zoo import compare_mqar
from zoo.cli import main
from zoo.compare_report import (
    MQAR_BEGIN,
    MQAR_END,
    mqar_groups,
    mqar_section,
    mqar_verdicts,
    write_mqar_figures,
)
from zoo.configs.compare import get_settings

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("mqar")
    out, runs = root / "out", root / "runs"
    assert main(["compare", "--preset", "mqar-test", "--out", str(out), "--workdir", str(runs)]) == 0
    return out, runs


def _argv(out, runs, *extra):
    return ["compare", "--preset", "mqar-test", "--out", str(out), "--workdir", str(runs), *extra]


def test_cells_are_trained_and_converted_and_reported(grid):
    out, runs = grid
    r = json.loads((out / "mqar.json").read_text())
    settings = get_settings("mqar-test")
    assert set(r["cells"]) == {"transformer|d32|T32|lr0.003|s0", "hip|d32|T32|lr0.003|s0"}
    tr, hip = r["cells"]["transformer|d32|T32|lr0.003|s0"], r["cells"]["hip|d32|T32|lr0.003|s0"]
    assert tr["how"] == "trained" and tr["steps"] == settings["train"]["steps"]
    assert hip["how"].startswith("converted from the trained transformer") and hip["steps"] == 0
    assert (runs / "transformer" / "d32-T32-lr0.003-s0").is_dir() and not (runs / "hip").exists()
    for c in (tr, hip):
        assert c["num_pairs"] == 2 and c["window"] == settings["eval"]["window"]
        # every query of every held-out example is counted once, near or far
        assert c["near_queries"] + c["far_queries"] == settings["eval"]["samples"] * c["num_pairs"]
        assert 0.0 <= c["accuracy"] <= 1.0
    p = r["sittings"][0]
    assert p["cells_run"] == 2 and p["jax_version"] and p["git_commit"] and p["cpu_cores"] >= 1
    md = (out / "mqar.md").read_text()
    assert "zoo compare --preset mqar-test" in md and "### Verdicts" in md
    assert "| transformer | " in md and "| hip | " in md
    for family in settings["families"]:
        assert (out / f"mqar_{family}.png").read_bytes()[:8] == PNG
        assert f"(mqar_{family}.png)" in md


def test_a_rerun_skips_finished_cells_and_runs_only_missing_ones(grid, monkeypatch, capsys):
    out, runs = grid
    trained = []
    real_train = compare_mqar.train

    def spy(config, workdir, **kw):
        trained.append(pathlib.Path(workdir).relative_to(runs).as_posix())
        return real_train(config, workdir, **kw)

    monkeypatch.setattr(compare_mqar, "train", spy)
    file = out / "mqar.json"
    before = json.loads(file.read_text())
    assert main(_argv(out, runs)) == 0
    after = json.loads(file.read_text())
    assert trained == [] and after["cells"] == before["cells"]
    assert len(after["sittings"]) == len(before["sittings"]) + 1 and after["sittings"][-1]["cells_run"] == 0
    # a missing converted cell reads its finished source's weights from the work directory, no training
    del after["cells"]["hip|d32|T32|lr0.003|s0"]
    file.write_text(json.dumps(after))
    assert main(_argv(out, runs)) == 0
    again = json.loads(file.read_text())
    assert trained == []
    assert again["cells"]["hip|d32|T32|lr0.003|s0"]["accuracy"] == before["cells"]["hip|d32|T32|lr0.003|s0"]["accuracy"]
    assert again["cells"]["transformer|d32|T32|lr0.003|s0"] == before["cells"]["transformer|d32|T32|lr0.003|s0"]


def test_other_settings_cannot_resume_a_result_file(grid, capsys):
    out, runs = grid
    before = (out / "mqar.json").read_text()
    assert main(_argv(out, runs, "--steps", "3")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other settings" in err[0] and "mqar.json" in err[0]
    assert (out / "mqar.json").read_text() == before


def test_dry_run_estimates_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["compare", "--preset", "mqar-cpu", "--out", str(out), "--dry-run"]) == 0
    err = capsys.readouterr().err
    s = get_settings("mqar-cpu")
    g = s["grid"]
    n = (len(s["rows"]) + len(s["converted"])) * len(g["d_model"]) * len(g["seq_len"]) * len(g["lr"]) * len(g["seed"])
    assert f"0 of {n} cells finished" in err and "CPU hours" in err
    assert not out.exists()
    # the estimate: steps x seconds per step at (64, 64) x d/64 x T/64, summed over the pending cells
    per_row = compare_mqar.estimate(s, {"cells": {}}, compare_mqar.cells(s))
    scale = sum(d / 64 * t / 64 for d in g["d_model"] for t in g["seq_len"]) * len(g["lr"]) * len(g["seed"])
    assert per_row["transformer"] == pytest.approx(s["train"]["steps"] * s["cost"]["transformer"] * scale)
    assert main(["compare", "--preset", "tiny", "--out", str(out), "--dry-run"]) == 2


def test_the_cpu_grid_meets_the_protocol():
    s = get_settings("mqar-cpu")
    g = s["grid"]
    assert len(g["d_model"]) >= 2 and len(g["seq_len"]) >= 2 and len(g["lr"]) >= 3 and len(g["seed"]) >= 3
    assert s["model"]["n_layers"] == 2 and s["data"]["source"] == "mqar"
    assert [compare_mqar.num_pairs(s, t) for t in g["seq_len"]] == [t // 16 for t in g["seq_len"]]
    rows = compare_mqar.rows(s)
    assert {"transformer", "transformer-window", "hip", "masformer", "lact", "memmamba", "s4"} <= set(rows)
    assert sorted(r.fields["d_state"] for r in rows.values() if r.model == "mamba2") == [16, 64]
    assert rows["hip"].source == "transformer"
    assert rows["transformer-window"].fields["window"] == s["eval"]["window"] < min(g["seq_len"])
    for c in compare_mqar.cells(s):  # every cell builds a valid run config with its own lr and seed
        if not rows[c.row].source:
            config = compare_mqar.cell_config(s, rows[c.row], c)
            assert (config.optim.lr, config.train.seed, config.data.seed) == (c.lr, c.seed, c.seed)
            assert config.model.d_model == c.d_model and config.data.num_pairs == c.seq_len // 16


# ------------------------------------------------------------------------------- verdicts on synthetic files


def _results(acc, far=None, seeds=None, preset="mqar-cpu"):
    """A result file of `preset` whose cell (row, d, T, lr, seed) has accuracy acc(row, d, T, lr, seed)."""
    s = get_settings(preset)
    g = s["grid"]
    cells = {}
    for c in compare_mqar.cells(s):
        if seeds is not None and c.seed not in seeds:
            continue
        a = acc(c.row, c.d_model, c.seq_len, c.lr, c.seed)
        f = a if far is None else far(c.row, c.d_model, c.seq_len, c.lr, c.seed)
        cells[c.key] = {
            "row": c.row,
            "d_model": c.d_model,
            "seq_len": c.seq_len,
            "lr": c.lr,
            "seed": c.seed,
            "accuracy": a,
            "far_accuracy": f,
        }
    assert len(g["seed"]) == 3
    return {"preset": preset, "settings": s, "cells": cells, "sittings": [], "command": "zoo compare"}


def _paper_like(row, d, t, lr, seed):
    """Zoology's picture: attention solves, fixed state falls with T and recovers with d, S4 first."""
    if row in ("transformer", "hip", "masformer", "lact", "transformer-window"):
        return 0.99 - 0.01 * seed if lr == 3e-3 else 0.5
    base = {"mamba2-n64": 0.9, "memmamba": 0.8, "mamba2-n16": 0.75, "s4": 0.4}[row]
    return base - 0.2 * (t > 32) + 0.15 * (d > 64) * (t > 32) + 0.01 * seed  # the grid's T: 32, 64


def _far(row, d, t, lr, seed):
    return 0.1 if row == "transformer-window" else _paper_like(row, d, t, lr, seed)


def _verdicts(results):
    return {v["claim"]: v for v in mqar_verdicts(results)}


def test_verdicts_reproduced_when_the_numbers_show_the_papers_picture():
    v = _verdicts(_results(_paper_like, _far))
    assert [x["verdict"] for x in v.values()] == ["reproduced"] * 7, v
    assert "0.98 (seeds 0.97-0.99" in v["Attention solves MQAR at every size"]["evidence"]
    assert "spread over 3 seeds" in v["Attention solves MQAR at every size"]["evidence"]


def test_best_learning_rate_is_the_best_mean_over_seeds():
    groups = mqar_groups(_results(_paper_like, _far))
    x = groups[("transformer", 64, 64)]
    assert x["lr"] == 3e-3 and x["mean"] == pytest.approx(0.98) and (x["min"], x["max"]) == (0.97, 0.99)
    assert x["seeds"] == 3 and x["complete"]


@pytest.mark.parametrize(
    "change,claim,verdict",
    [
        (lambda r, d, t: 0.9 if r == "transformer" and t == 64 else None, "Attention solves", "not reproduced"),
        (lambda r, d, t: 0.9 if r == "hip" else None, "HiP is close", "not reproduced"),
        (lambda r, d, t: 0.9 if r == "masformer" else None, "MASFormer", "not reproduced"),
        (lambda r, d, t: 0.95 if r == "s4" else None, "S4 (time-invariant)", "not reproduced"),
        (lambda r, d, t: 0.3 if r == "mamba2-n64" else None, "Mamba-2 improves", "not reproduced"),
        (
            lambda r, d, t: 1.0 if r.startswith(("mamba2", "s4", "memmamba")) else None,
            "S4 (time",
            "not testable at this size",
        ),
        (
            lambda r, d, t: 1.0 if r.startswith(("mamba2", "s4", "memmamba")) else None,
            "Fixed-state",
            "not testable at this size",
        ),
        (lambda r, d, t: 1.0 if r.startswith("mamba2") else None, "Mamba-2 improves", "not testable at this size"),
        (lambda r, d, t: 0.5 if r == "s4" else None, "Fixed-state", "not reproduced"),  # flat in T and d
    ],
)
def test_verdicts_follow_the_numbers(change, claim, verdict):
    def acc(row, d, t, lr, seed):
        new = change(row, d, t)
        return _paper_like(row, d, t, lr, seed) if new is None else new

    def far(row, d, t, lr, seed):
        return 0.1 if row == "transformer-window" else acc(row, d, t, lr, seed)

    v = [x for x in mqar_verdicts(_results(acc, far)) if x["claim"].startswith(claim)]
    assert len(v) == 1 and v[0]["verdict"] == verdict, v


def test_window_claim_needs_far_queries_to_fail_for_window_only_and_not_for_lact():
    v = _verdicts(_results(_paper_like, lambda r, d, t, lr, s: 0.9 if r == "transformer-window" else 0.99))
    assert (
        v["Window-only attention fails once keys fall outside the window, LaCT does not"]["verdict"] == "not reproduced"
    )
    v = _verdicts(_results(_paper_like, lambda r, d, t, lr, s: 0.1 if r in ("transformer-window", "lact") else 0.99))
    assert (
        v["Window-only attention fails once keys fall outside the window, LaCT does not"]["verdict"] == "not reproduced"
    )


def test_missing_cells_are_not_yet_run():
    v = _verdicts(_results(_paper_like, _far, seeds=[0, 1]))
    assert {x["verdict"] for x in v.values()} == {"not yet run"}
    empty = _results(_paper_like, _far)
    empty["cells"] = {}
    assert {x["verdict"] for x in mqar_verdicts(empty)} == {"not yet run"}
    one_row = _results(_paper_like, _far)
    one_row["cells"] = {k: c for k, c in one_row["cells"].items() if c["row"] == "transformer"}
    v = _verdicts(one_row)
    assert v["Attention solves MQAR at every size"]["verdict"] == "reproduced"
    assert v["HiP is close to dense attention within the training length"]["verdict"] == "not yet run"


def test_figure_writer_draws_one_figure_per_family(tmp_path):
    results = _results(_paper_like, _far)
    files = write_mqar_figures(results, tmp_path)
    assert set(files) == set(results["settings"]["families"])
    for name in files.values():
        assert (tmp_path / name).read_bytes()[:8] == PNG
    empty = copy.deepcopy(results)
    empty["cells"] = {}
    other = tmp_path / "empty"
    other.mkdir()
    write_mqar_figures(empty, other)  # "not yet run" panels, no error
    assert (other / files["attention"]).read_bytes() != (tmp_path / files["attention"]).read_bytes()


def test_docs_section_is_rendered_from_the_result_file():
    docs = (pathlib.Path(ROOT) / "docs" / "compare.md").read_text()
    assert docs.count(MQAR_BEGIN) == 1 and docs.count(MQAR_END) == 1
    section = docs[docs.index(MQAR_BEGIN) : docs.index(MQAR_END) + len(MQAR_END)]
    results = json.loads((pathlib.Path(ROOT) / "docs" / "compare" / "mqar" / "mqar.json").read_text())
    assert section == mqar_section(results), "regenerate with: python -m zoo.compare_report docs"
    for family in results["settings"]["families"]:
        assert (pathlib.Path(ROOT) / "docs" / "compare" / "mqar" / f"mqar_{family}.png").read_bytes()[:8] == PNG


def test_finished_cells_keep_only_the_weights_a_converted_row_needs(tmp_path, monkeypatch):
    settings = get_settings("mqar-test")
    settings["rows"]["s4"] = ("s4", {})
    model = zoo.create_model("transformer", "tiny", seed=0, d_model=32, d_ff=64, n_layers=1)

    def fake_train(config, run_dir, **kw):  # a finished run directory, no training
        pathlib.Path(run_dir).mkdir(parents=True)
        return {"step": config.train.steps, "train": {"loss": 1.0}}

    monkeypatch.setattr(compare_mqar, "train", fake_train)
    monkeypatch.setattr(compare_mqar, "load_model", lambda run_dir: (model, None))
    monkeypatch.setattr(compare_mqar.storage, "read_metrics", lambda run_dir: [])
    out, runs = tmp_path / "out", tmp_path / "runs"
    r = compare_mqar.run("mqar-test", str(out), str(runs), settings=settings)
    assert set(c["row"] for c in r["cells"].values()) == {"transformer", "s4", "hip"}
    assert (runs / "transformer" / "d32-T32-lr0.003-s0").is_dir()  # HiP's source, kept
    assert not (runs / "s4" / "d32-T32-lr0.003-s0").exists()  # recorded in mqar.json, removed


def test_a_cell_stopped_by_sigterm_is_not_recorded(tmp_path, monkeypatch, capsys):
    """A SIGTERM stops the trainer after a checkpoint; the cell cut short is not written as finished,
    and the whole sitting stops (exit 0) instead of going on to the next cell."""
    from zoo.train import trainer

    monkeypatch.setattr(compare_mqar, "train", lambda config, run_dir, progress: {"step": 1, "preempted": True})
    out = tmp_path / "out"
    with pytest.raises(trainer.Preempted) as stop:
        compare_mqar.run("mqar-test", str(out), str(tmp_path / "runs"))
    assert stop.value.code == 0
    assert "stopped by SIGTERM at step 1" in capsys.readouterr().err
    file = out / "mqar.json"
    assert not file.exists() or json.loads(file.read_text())["cells"] == {}
    assert trainer.finished({"step": 4, "train": {}}, "run") == {"step": 4, "train": {}}
