"""`zoo reproduce`: the catalogue covers every results section, a finished cell is written at once
and skipped on rerun, every file records its provenance, and every page equals what its result
file renders."""

import json
import pathlib

import pytest
from conftest import ROOT

from zoo import cli, reproduce

PROVENANCE = {"zoo_version", "git_commit", "git_dirty", "date", "cpu_model", "cpu_count", "jax_version", "backend"}


def test_every_results_section_renders_from_its_file():
    """The card-vs-JSON check: a page whose results block differs from its file's rendering fails
    (`zoo reproduce --render` rewrites them)."""
    assert reproduce.render_docs(check=True) == []


def test_every_experiment_has_the_budgets_and_a_section_on_each_page_it_backs():
    found = reproduce.markers()
    for name, exp in reproduce.CATALOGUE.items():
        assert set(reproduce.BUDGETS) <= set(exp.budgets), name
        assert exp.backs and set(exp.backs) <= set(found.get(name, [])), (name, found.get(name))
    assert set(found) <= set(reproduce.CATALOGUE), "a page renders an experiment the catalogue lacks"


def test_no_page_keeps_the_unrerun_note():
    for page in reproduce.pages():
        assert "not rerun since" not in page.read_text(), page


def _fake(calls: list, value=lambda seed: 0.5 + 0.1 * seed) -> reproduce.Experiment:
    def run(params, cell, workdir: pathlib.Path) -> dict:
        calls.append(dict(cell))
        (workdir / "curve.png").write_bytes(b"png")
        return {"accuracy": value(cell["seed"]) * params["scale"]}

    return reproduce.Experiment(
        name="fake",
        summary="a fake experiment",
        backs=("docs/fake.md",),
        budgets={"test": {"scale": 1.0}, "cpu": {"scale": 2.0}, "paper": {"scale": 3.0}},
        run=run,
        metrics=lambda r: {"accuracy": r["accuracy"]},
    )


def test_cells_are_written_with_provenance_and_skipped_on_rerun(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(reproduce.CATALOGUE, "fake", _fake(calls))
    out, work = tmp_path / "results", tmp_path / "runs"
    doc = reproduce.run_experiment("fake", "test", [0, 1], out, work)
    assert [c["seed"] for c in calls] == [0, 1]
    on_disk = json.loads((out / "fake" / "test.json").read_text())
    assert on_disk == doc and on_disk["seeds"] == [0, 1] and on_disk["budget"] == "test"
    assert PROVENANCE <= set(on_disk["provenance"])
    for key, cell in on_disk["cells"].items():
        assert PROVENANCE <= set(cell["provenance"]) and cell["wall_s"] >= 0, key
        assert cell["figures"] == ["curve.png"]
        assert (out / "fake" / "figures" / "test" / key / "curve.png").exists()
    assert on_disk["provenance"]["cpu_count"] >= 1 and len(on_disk["provenance"]["git_commit"]) >= 7

    doc = reproduce.run_experiment("fake", "test", [0, 1, 2], out, work)  # resumes: only seed 2 runs
    assert [c["seed"] for c in calls] == [0, 1, 2] and doc["seeds"] == [0, 1, 2]
    reproduce.run_experiment("fake", "cpu", [0], out, work)  # another budget: its own file
    assert (out / "fake" / "cpu.json").exists() and len(calls) == 4


def test_a_cell_made_with_other_parameters_runs_again(tmp_path, monkeypatch):
    calls = []
    exp = _fake(calls)
    monkeypatch.setitem(reproduce.CATALOGUE, "fake", exp)
    reproduce.run_experiment("fake", "test", [0], tmp_path, tmp_path / "runs")
    reproduce.run_experiment("fake", "test", [1], tmp_path, tmp_path / "runs")
    changed = reproduce.Experiment(**{**exp.__dict__, "budgets": {**exp.budgets, "test": {"scale": 5.0}}})
    monkeypatch.setitem(reproduce.CATALOGUE, "fake", changed)
    doc = reproduce.run_experiment("fake", "test", [0], tmp_path, tmp_path / "runs")
    assert len(calls) == 3 and doc["cells"]["seed=0"]["result"]["accuracy"] == pytest.approx(2.5)
    assert list(doc["cells"]) == ["seed=0"] and doc["seeds"] == [0]  # seed 1 had the old budget: dropped


def test_a_failing_cell_leaves_the_finished_ones(tmp_path, monkeypatch):
    calls = []

    def value(seed):
        if seed == 1:
            raise RuntimeError("the cell failed")
        return 0.5

    monkeypatch.setitem(reproduce.CATALOGUE, "fake", _fake(calls, value))
    with pytest.raises(RuntimeError):
        reproduce.run_experiment("fake", "test", [0, 1], tmp_path, tmp_path / "runs")
    doc = json.loads((tmp_path / "fake" / "test.json").read_text())
    assert list(doc["cells"]) == ["seed=0"]


def test_render_shows_mean_spread_seeds_and_the_command(tmp_path, monkeypatch):
    monkeypatch.setitem(reproduce.CATALOGUE, "fake", _fake([]))
    assert "Not regenerated" in reproduce.render("fake", results=tmp_path)
    assert "`zoo reproduce fake`" in reproduce.render("fake", results=tmp_path)
    reproduce.run_experiment("fake", "cpu", [0, 1], tmp_path, tmp_path / "runs")
    text = reproduce.render("fake", page=tmp_path / "docs" / "fake.md", results=tmp_path)
    assert "| accuracy | 1.1 | 1 - 1.2 | 2 |" in text  # mean, min - max, number of seeds
    assert "Only 2 seed(s) so far" in text
    assert "](../fake/figures/cpu/seed=0/curve.png)" in text
    reproduce.run_experiment("fake", "cpu", [2], tmp_path, tmp_path / "runs")
    assert "so far" not in reproduce.render("fake", results=tmp_path)
    reproduce.run_experiment("fake", "paper", [0], tmp_path, tmp_path / "runs")
    assert "Budget `paper`" in reproduce.render("fake", results=tmp_path)  # the largest budget is shown


def test_render_docs_rewrites_a_stale_section_and_check_reports_it(tmp_path, monkeypatch):
    monkeypatch.setitem(reproduce.CATALOGUE, "fake", _fake([]))
    page = tmp_path / "docs" / "fake.md"
    page.parent.mkdir()
    (tmp_path / "README.md").write_text("# readme\n")
    page.write_text("# fake\n<!-- results:fake begin -->\n| accuracy | 0.99 |\n<!-- results:fake end -->\nafter\n")
    results = tmp_path / "results"
    assert reproduce.render_docs(tmp_path, results, check=True) == [str(page)]
    assert "0.99" in page.read_text()  # check writes nothing
    assert reproduce.render_docs(tmp_path, results) == [str(page)]
    text = page.read_text()
    assert "0.99" not in text and "Not regenerated" in text and text.endswith("end -->\nafter\n")
    assert reproduce.render_docs(tmp_path, results, check=True) == []


def test_listed_and_bad_arguments_are_one_line(capsys):
    assert cli.main(["reproduce", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in reproduce.CATALOGUE:
        assert f"\n{name}: " in "\n" + listed
    for argv, words in [
        (["reproduce", "nope"], "unknown experiment 'nope'"),
        (["reproduce", "main_job", "--budget", "huge"], "--budget 'huge'"),
        (["reproduce", "main_job", "--seeds", "a,b"], "--seeds 'a,b'"),
        (["reproduce"], "needs an experiment name"),
    ]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err


def test_the_catalogue_runs_the_scripts_of_the_repository():
    for name in ("stuffed_mamba", "memmamba_passkey", "masformer_recall", "listops_s4", "forecast_ar", "hip_eval"):
        assert callable(reproduce.script(name).main), name
    assert reproduce.ROOT == pathlib.Path(ROOT).resolve()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(reproduce.CATALOGUE))
def test_every_experiment_runs_at_the_test_budget(name, tmp_path):
    """Each experiment end to end at the `test` budget (seconds to minutes each): its cell runs, its
    file is written and its metrics render into a table."""
    doc = reproduce.run_experiment(name, "test", [0], tmp_path / "results", tmp_path / "runs", render=False)
    (cell,) = [c for c in doc["cells"].values() if c["cell"]["seed"] == 0][:1]
    assert reproduce.CATALOGUE[name].metrics(cell["result"])
    text = reproduce.render(name, results=tmp_path / "results", budget="test")
    assert "| measure |" in text or "| model |" in text or "| schedules |" in text
