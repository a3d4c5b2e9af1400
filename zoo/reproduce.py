"""The catalogue of experiments behind every published number: `zoo reproduce`.

    zoo reproduce --list
    zoo reproduce NAME [--budget cpu|paper] [--seeds 0,1,2] [--out results] [--workdir runs/reproduce]
    zoo reproduce --render

Each experiment runs one cell at a time (a seed, or a seed of one setting such as an attention
schedule) and writes `results/<name>/<budget>.json` as soon as a cell finishes, with the cell's
wall time and the provenance of the code and machine that produced it; a cell already in the file
with the same parameters is skipped, so a long experiment runs across several sittings. The
figures a cell draws are kept beside the JSON (`results/<name>/figures/`).

The results section of every card and docs page is rendered from these files between
`<!-- results:NAME begin -->` and `<!-- results:NAME end -->`; `render_docs` rewrites them (it runs
after every experiment and for `zoo reproduce --render`) and `tests/test_reproduce.py` fails when a
page differs from what its file renders. An experiment without a result file renders as "not
regenerated", with the command that produces it.

Budgets: `cpu` is sized for a 2-core CPU (minutes per cell), `paper` for an accelerator, `test`
runs every code path in seconds (the tests use it; its numbers mean nothing).

Most experiments run a script of `scripts/` (their `main(argv)`), so `zoo reproduce` runs from a
clone of the repository.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUDGETS = ("test", "cpu", "paper")
RENDER_ORDER = ("paper", "cpu")  # the budget a page shows: the largest one that has a result file
FIGURES = (".png", ".svg")
NOT_CODE = (":!results", ":!docs", ":!README.md", ":!CHANGELOG.md")  # changes that leave the numbers as they are
MARKER = re.compile(r"<!-- results:([\w-]+) begin -->\n(.*?)<!-- results:\1 end -->", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One published result and how to regenerate it.

    Attributes:
      name: the catalogue name (`zoo reproduce NAME`, the results folder, the page marker).
      summary: what it measures, in one line.
      backs: the pages (relative to the repository root) whose results section renders from it.
      budgets: budget name -> parameters (JSON values) handed to `run`.
      run: (parameters, cell, work directory) -> the cell's result (JSON values); figures it writes
        into the work directory are kept.
      metrics: a cell's result -> {measure: number}, the rows of the rendered table.
      axis: (cell field, parameter key) when cells span a setting besides the seed, e.g. the
        attention schedules of MASFormer: one cell per value of `parameters[key]` and seed.
      seeds: the default seeds.
      note: one sentence under the rendered table saying what the numbers are.
    """

    name: str
    summary: str
    backs: tuple[str, ...]
    budgets: Mapping[str, dict]
    run: Callable[[dict, dict, pathlib.Path], dict]
    metrics: Callable[[dict], dict[str, float]]
    axis: tuple[str, str] | None = None
    seeds: tuple[int, ...] = (0, 1, 2)
    note: str = ""

    def cells(self, params: dict, seeds: Sequence[int]) -> list[dict]:
        """Every cell of a run: one per seed, or one per (axis value, seed)."""
        if self.axis is None:
            return [{"seed": s} for s in seeds]
        field, key = self.axis
        return [{field: v, "seed": s} for v in params[key] for s in seeds]


def cell_key(cell: dict) -> str:
    """`model=lact,seed=0`: the cell's name in the result file."""
    return ",".join(f"{k}={v}" for k, v in cell.items())


def cell_dir(cell: dict) -> str:
    """The cell's folder name: its key with anything but letters, digits, `=`, `.` and `-` as `_`."""
    return re.sub(r"[^\w.=-]+", "_", cell_key(cell))


def _jsonable(obj):
    """Numpy scalars and arrays, tuples and paths as plain JSON values."""
    return json.loads(json.dumps(obj, default=lambda x: x.tolist() if hasattr(x, "tolist") else str(x)))


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except OSError:
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance() -> dict:
    """The code and machine a result comes from: zoo version, git commit and whether the tree had
    uncommitted changes (outside the results and the pages rendered from them), date (UTC), CPU model
    and core count, jax version and backend."""
    import jax

    import zoo

    commit = _git("rev-parse", "HEAD")
    return {
        "zoo_version": zoo.__version__,
        "git_commit": commit or "unknown",
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", ".", *NOT_CODE))
        if commit
        else None,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
    }


def result_path(out, name: str, budget: str) -> pathlib.Path:
    """The result file of experiment `name` at `budget` under the results folder `out`."""
    return pathlib.Path(out) / name / f"{budget}.json"


def get(name: str) -> Experiment:
    """The catalogue entry of `name` (ValueError listing the names otherwise)."""
    if name not in CATALOGUE:
        raise ValueError(f"unknown experiment {name!r}; `zoo reproduce --list` lists them: {', '.join(CATALOGUE)}")
    return CATALOGUE[name]


def run_experiment(
    name: str,
    budget: str = "cpu",
    seeds: Sequence[int] | None = None,
    out="results",
    workdir="runs/reproduce",
    render: bool = True,
) -> dict:
    """Runs every cell of an experiment that its result file lacks; returns the file's content.

    Args:
      name: a catalogue name.
      budget: test, cpu or paper.
      seeds: the seeds (default: the experiment's).
      out: the results folder; the file is `out/<name>/<budget>.json`, figures in `out/<name>/figures/`.
      workdir: where cells keep their runs (checkpoints, logs): `workdir/<name>/<budget>/<cell>`.
      render: re-render the repository's pages afterwards (when `out` is the repository's results).
    """
    exp = get(name)
    if budget not in exp.budgets:
        raise ValueError(f"--budget {budget!r}: {name} has budgets {', '.join(exp.budgets)}")
    seeds = list(exp.seeds if seeds is None else seeds)
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"--seeds {seeds!r}: give non-negative integers, e.g. 0,1,2")
    params = _jsonable(exp.budgets[budget])
    path = result_path(out, name, budget)
    doc = json.loads(path.read_text()) if path.exists() else {"experiment": name, "budget": budget, "cells": {}}
    for cell in exp.cells(params, seeds):
        key = cell_key(cell)
        done = doc["cells"].get(key)
        if done is not None and done["params"] == params:
            print(f"{name} {budget} {key}: done ({done['wall_s']:.0f} s), skipped", flush=True)
            continue
        work = pathlib.Path(workdir) / name / budget / cell_dir(cell)
        if work.exists():  # a half-finished cell starts again from nothing
            shutil.rmtree(work)
        work.mkdir(parents=True)
        print(f"{name} {budget} {key}: running in {work}", flush=True)
        t0 = time.perf_counter()
        result = _jsonable(exp.run(params, dict(cell), work))
        wall = time.perf_counter() - t0
        figures = _keep_figures(work, path.parent / "figures" / budget / cell_dir(cell))
        prov = provenance()
        if doc.get("params", params) != params:  # the budget changed: earlier cells are not comparable
            print(f"{name} {budget}: the budget's parameters changed; dropping the cells made with others", flush=True)
            doc["cells"] = {k: c for k, c in doc["cells"].items() if c["params"] == params}
        doc["cells"][key] = {
            "cell": cell,
            "params": params,
            "result": result,
            "figures": figures,
            "wall_s": wall,
            "provenance": prov,
        }
        doc.update(params=params, provenance=prov)
        doc["seeds"] = sorted({c["cell"]["seed"] for c in doc["cells"].values()})
        doc["wall_s"] = sum(c["wall_s"] for c in doc["cells"].values())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, path)  # a finished cell is on disk at once, never half-written
        print(f"{name} {budget} {key}: {wall:.0f} s, written to {path}", flush=True)
    if render and pathlib.Path(out).resolve() == (ROOT / "results").resolve():
        render_docs()
    return doc


def _keep_figures(src: pathlib.Path, dst: pathlib.Path) -> list[str]:
    """Copies the figures a cell drew (anywhere under its work directory) to `dst` (emptied first)."""
    if dst.exists():
        shutil.rmtree(dst)
    kept = []
    for f in sorted(src.rglob("*")):
        if f.suffix in FIGURES and f.is_file():
            target = dst / f.relative_to(src).as_posix().replace("/", "_")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            kept.append(target.name)
    return kept


# --- rendering ---------------------------------------------------------------------------------


def _load_rendered(name: str, results, budgets: Sequence[str] = RENDER_ORDER) -> dict | None:
    for budget in budgets:
        path = result_path(results, name, budget)
        if path.exists():
            return json.loads(path.read_text())
    return None


def command(name: str, budget: str = "cpu") -> str:
    """The command line that regenerates experiment `name` at `budget`."""
    return f"zoo reproduce {name}" + ("" if budget == "cpu" else f" --budget {budget}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1000 else f"{x:,.0f}"


def render(name: str, page=None, results=None, budget: str | None = None) -> str:
    """The markdown of an experiment's results section, as written between its markers.

    Args:
      name: a catalogue name.
      page: the page it goes into (for the relative links to figures); default the repository root.
      results: the results folder (default: the repository's `results/`).
      budget: the budget to show (default: the largest one with a result file, paper then cpu).
    """
    exp = get(name)
    results = pathlib.Path(results or ROOT / "results")
    doc = _load_rendered(name, results, RENDER_ORDER if budget is None else (budget,))
    if doc is None:
        return (
            f"*Not regenerated on the current code:* no result file exists yet. `{command(name)}` "
            f"({exp.summary}; seeds {', '.join(map(str, exp.seeds))}) writes `results/{name}/cpu.json` "
            "and renders this section from it.\n"
        )
    cells = list(doc["cells"].values())
    seeds = doc["seeds"]
    prov = doc["provenance"]
    dirty = ", uncommitted changes" if prov.get("git_dirty") else ""
    lines = [
        f"`{command(name, doc['budget'])}`: {exp.summary}. Budget `{doc['budget']}`, seeds "
        f"{', '.join(map(str, seeds))}; zoo {prov['zoo_version']} at commit {prov['git_commit'][:10]}{dirty}, "
        f"{prov['date'][:10]}, {prov['cpu_model']} ({prov['cpu_count']} cores), jax {prov['jax_version']} "
        f"({prov['backend']}); {_duration(doc['wall_s'])} in all "
        f"(`results/{name}/{doc['budget']}.json`).",
        "",
    ]
    field = exp.axis[0] if exp.axis else None
    groups: dict[str, list[dict]] = {}
    for c in cells:
        groups.setdefault("" if field is None else str(c["cell"][field]), []).append(c)
    head = ([field] if field else []) + ["measure", "mean", "min - max", "seeds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group, members in groups.items():
        per_seed = [exp.metrics(c["result"]) for c in members]
        for measure in per_seed[0]:
            values = np.asarray([m[measure] for m in per_seed if measure in m], dtype=float)
            row = ([group] if field else []) + [
                measure,
                _fmt(values.mean()),
                f"{_fmt(values.min())} - {_fmt(values.max())}",
                str(len(values)),
            ]
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if len(seeds) < 3:
        lines += [f"Only {len(seeds)} seed(s) so far; `{command(name, doc['budget'])}` adds the rest.", ""]
    if exp.note:
        lines += [exp.note, ""]
    base = pathlib.Path(page).parent if page else ROOT
    for group, members in groups.items():  # the figures of the lowest seed of every group
        first = min(members, key=lambda c: c["cell"]["seed"])
        for fig in first.get("figures", []):
            target = results / name / "figures" / doc["budget"] / cell_dir(first["cell"]) / fig
            label = (
                f"{name} ({group}, seed {first['cell']['seed']})" if group else f"{name} (seed {first['cell']['seed']})"
            )
            lines.append(f"![{label}: {fig}]({os.path.relpath(target, base)})")
        if first.get("figures"):
            lines.append("")
    return "\n".join(lines)


def pages(root=None) -> list[pathlib.Path]:
    """The pages that may hold results sections: README.md and docs/**/*.md."""
    root = pathlib.Path(root or ROOT)
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def render_page(page: pathlib.Path, results=None) -> str:
    """The page's text with every results section rendered from its result file."""
    text = page.read_text()
    return MARKER.sub(
        lambda m: f"<!-- results:{m[1]} begin -->\n{render(m[1], page, results)}<!-- results:{m[1]} end -->", text
    )


def render_docs(root=None, results=None, check: bool = False) -> list[str]:
    """Re-renders every results section; returns the pages that changed (with `check`, that differ,
    and nothing is written)."""
    changed = []
    for page in pages(root):
        text = page.read_text()
        new = render_page(page, results)
        if new != text:
            changed.append(str(page))
            if not check:
                page.write_text(new)
    return changed


def markers(root=None) -> dict[str, list[str]]:
    """experiment name -> the pages (relative to the root) that render it."""
    root = pathlib.Path(root or ROOT)
    found: dict[str, list[str]] = {}
    for page in pages(root):
        for m in MARKER.finditer(page.read_text()):
            found.setdefault(m[1], []).append(page.relative_to(root).as_posix())
    return found


def listing() -> str:
    """`zoo reproduce --list`: every experiment, what it backs, its budgets, seeds and CPU time."""
    lines = []
    for exp in CATALOGUE.values():
        doc = _load_rendered(exp.name, ROOT / "results")
        cpu = result_path(ROOT / "results", exp.name, "cpu")
        took = "not run yet"
        if cpu.exists():
            d = json.loads(cpu.read_text())
            took = f"{_duration(d['wall_s'] / max(1, len(d['cells'])))} per cell ({len(d['cells'])} cells)"
        lines += [
            f"{exp.name}: {exp.summary}",
            f"    backs: {', '.join(exp.backs)}",
            f"    budgets: {', '.join(exp.budgets)}; seeds {','.join(map(str, exp.seeds))}; cpu budget: {took}"
            + ("" if doc else "; no result file"),
        ]
    return "\n".join(lines)


# --- the experiments ---------------------------------------------------------------------------


def script(name: str):
    """Imports `scripts/<name>.py` of the repository (the experiments' code)."""
    path = ROOT / "scripts" / f"{name}.py"
    if not path.exists():
        raise ValueError(f"{path} not found: `zoo reproduce` runs from a clone of the repository")
    spec = importlib.util.spec_from_file_location(f"zoo_scripts_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _script_run(
    name: str, out_flag: str, result_file: str, seed_flag: str = "--seed"
) -> Callable[[dict, dict, pathlib.Path], dict]:
    """A cell that runs `scripts/<name>.py` with the budget's `args` (`repo:PATH` is a path in the
    repository), the cell's seed (and axis value, as `--<field>`) and its work directory, then reads
    the JSON it writes."""

    def run(params: dict, cell: dict, workdir: pathlib.Path) -> dict:
        args = [str(ROOT / a[len("repo:") :]) if a.startswith("repo:") else a for a in params["args"]]
        argv = [*args, out_flag, str(workdir), seed_flag, str(cell["seed"])]
        argv += [a for k, v in cell.items() if k != "seed" for a in (f"--{k}", str(v))]
        script(name).main(argv)
        return json.loads((workdir / result_file).read_text())

    return run


def _train_eval(params: dict, cell: dict, workdir: pathlib.Path) -> dict:
    """`zoo train` + `zoo eval` of one config at one seed (`train.seed` and `data.seed`)."""
    from zoo.config import load_config
    from zoo.eval.evaluate import evaluate_workdir
    from zoo.train.trainer import finished, train

    spec, overrides = params["configs"][cell.get("model", "main")]
    seed = cell["seed"]
    overrides = [*overrides, *params.get("overrides", []), f"--config.train.seed={seed}", f"--config.data.seed={seed}"]
    config = load_config(spec if ".py" not in spec else str(ROOT / spec), overrides)
    run_dir = workdir / "run"
    result = finished(train(config, str(run_dir), progress=False), str(run_dir))
    return {"train": result["train"], "step": result["step"], "eval": evaluate_workdir(str(run_dir))}


def _passkey_metrics(result: dict) -> dict[str, float]:
    r = result["eval"]["by_length"]
    out = {f"exact match at {n}": em for n, em in zip(r["lengths"], r["exact_match"])}
    out.update({f"answer digit accuracy at {n}": a for n, a in zip(r["lengths"], r["token_accuracy"])})
    return out


def _stuffed_metrics(result: dict) -> dict[str, float]:
    out = {}
    for variant, row in result["rows"].items():
        for n, em, last in zip(result["lengths"], row["exact_match"], row["exact_match_recent"]):
            out[f"{variant}: exact match at {n}"] = em
            out[f"{variant}: exact match at {n}, needle last"] = last
    return out


def _memmamba_metrics(result: dict) -> dict[str, float]:
    out = {}
    for model, r in result.items():
        by = r["by_length"]
        out.update({f"{model}: exact match at {n}": em for n, em in zip(by["lengths"], by["exact_match"])})
        out[f"{model}: parameters"] = r["params"]
    return out


def _masformer_metrics(result: dict) -> dict[str, float]:
    (r,) = result["results"].values()
    return {"answer accuracy": r["accuracy"], "attention FLOPs / all-full": r["flops_ratio"]}


def _listops_metrics(result: dict) -> dict[str, float]:
    return {"test accuracy": result["accuracy"], "majority class": result["majority"], "steps": result["steps"]}


def _forecast_metrics(result: dict) -> dict[str, float]:
    out = {}
    for p, by_seed in result["results"].items():
        for r in by_seed.values():
            for model in ("spacetime", "s4d"):
                out[f"AR({p}) {model}: RMSE vs optimal forecast"] = r[model]["vs_oracle"]
            out[f"AR({p}) optimal forecast RMSE"] = r["spacetime"]["oracle"]
    return out


def _lact_bench_metrics(result: dict) -> dict[str, float]:
    return {f"T={r['length']} {r['pass']}: LaCT / transformer tokens/s": r["ratio"] for r in result["rows"]}


def _hip_metrics(result: dict) -> dict[str, float]:
    out = {}
    for r in result["rows"]:
        n = r["length"]
        out[f"T={n}: top-1 agreement"] = r["top1_agreement"]
        out[f"T={n}: perplexity HiP / dense"] = r["ppl_hip"] / r["ppl_dense"]
    return out


def _hip_run(params: dict, cell: dict, workdir: pathlib.Path) -> dict:
    """Trains the main job's transformer at the cell's seed, saves it as a model directory, then
    runs `scripts/hip_eval.py` on it (dense vs HiP on the same parameters)."""
    from zoo.checkpoint import load_model
    from zoo.model_dir import save_pretrained

    _train_eval(params, cell, workdir)
    model, _ = load_model(str(workdir / "run"))
    save_pretrained(model, str(workdir / "model"))
    argv = [*params["args"], "--pretrained", str(workdir / "model"), "--workdir", str(workdir), "--tokenizer", "bytes"]
    script("hip_eval").main(argv)
    return json.loads((workdir / "hip_eval.json").read_text())


def _cauchy_run(params: dict, cell: dict, workdir: pathlib.Path) -> dict:
    """`scripts/bench_cauchy.py`'s rows (times and XLA's temporary memory of every implementation)."""
    rows = script("bench_cauchy").run(shapes=[tuple(s) for s in params["shapes"]], batch=params["batch"])
    return {"rows": rows}


def _cauchy_metrics(result: dict) -> dict[str, float]:
    rows = {(r["op"], r["N"], r["L"], r["impl"]): r for r in result["rows"]}
    out = {}
    for (op, n, length, impl), r in rows.items():
        if impl == "xla":
            ref = rows[(op, n, length, "reference")]
            out[f"{op} N={n} L={length}: xla f+b speed-up over the reference"] = r["fb_speedup"]
            out[f"{op} N={n} L={length}: reference / xla temporary memory"] = ref["temp_mib"] / r["temp_mib"]
    return out


def _ddbench_metrics(result: dict) -> dict[str, float]:
    rows = result["rows"]
    cc = rows[max(rows, key=int)]  # concat-and-chunk has the longest bucket's shape
    out = {}
    for k, r in sorted(rows.items(), key=lambda kr: int(kr[0])):  # buckets short to long
        shape = f"D_{k} [{r['b']}x{r['t']}]"
        out[f"{shape}: total FLOPs / concat-and-chunk"] = r["total"] / cc["total"]
        out[f"{shape}: step time / concat-and-chunk"] = r["time"] / cc["time"]
    for name, mean in result["means"].items():
        out[f"mean step time / concat-and-chunk ({name})"] = mean["time"]
    return out


def _dd_metrics(result: dict) -> dict[str, float]:
    out = {}
    for r in result["rows"]:
        label = f"{r['config']} {'concat-and-chunk' if r['mode'] == 'fixed' else 'decomposition'}"
        out[f"{label}: validation loss"] = r["val_loss"]
        out[f"{label}: tokens/s"] = r["tokens_per_s"]
    return out


def _compare_run(params: dict, cell: dict, workdir: pathlib.Path) -> dict:
    from zoo import compare

    return compare.run(params["preset"], str(workdir), str(workdir / "runs"), params.get("models"), params.get("steps"))


def _compare_metrics(result: dict) -> dict[str, float]:
    from zoo.compare_report import summary

    measures = {"pk_first": "passkey at the training length", "mq_first": "MQAR at the training length"}
    measures.update(loss_in="loss within the training length", loss_out="loss beyond it")
    return {f"{row['model']}: {label}": row[key] for row in summary(result) for key, label in measures.items()}


def _mqar_run(params: dict, cell: dict, workdir: pathlib.Path) -> dict:
    """The MQAR grid of `zoo compare` (resumable on its own, cell by cell, in `params["out"]`)."""
    from zoo import compare

    out = ROOT / params["out"] if "out" in params else workdir
    return compare.run(params["preset"], str(out), str(workdir / "runs"))


def _mqar_metrics(result: dict) -> dict[str, float]:
    from zoo.compare_report import mqar_groups

    return {
        f"{row} d_model={d} T={t}: accuracy at the best lr": g["mean"]
        for (row, d, t), g in sorted(mqar_groups(result).items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0]))
    }


def _hip_search_run(params: dict, cell: dict, workdir: pathlib.Path) -> dict:
    """`scripts/hip_search_quality.py`: its JSON (in `params["out"]`, whose tables the docs show)."""
    module = script("hip_search_quality")
    out = ROOT / params["out"] if "out" in params else workdir
    result = module.run(str(out))
    if "out" in params:
        module.write_docs(result, [ROOT / d for d in module.DOCS])
    return result


def _hip_search_metrics(result: dict) -> dict[str, float]:
    out = {}
    for r in result["flops"]:
        out[f"T={r['T'] // 1024}K {r['scoring']}: dense / (search + attention) FLOPs"] = r["dense_over_hip"]
    for scoring in ("representative", "block_max"):
        rows = [r for r in result["search_quality"] if r["scoring"] == scoring]
        out[f"{scoring}: attention mass vs exact top-K (mean over inputs)"] = float(
            np.mean([r["mass_vs_exact_top_k"] for r in rows])
        )
        out[f"{scoring}: block recall (mean over inputs)"] = float(np.mean([r["block_recall"] for r in rows]))
    return out


MAIN_JOB = ["configs/transformer.py:tiny", []]
TINY_TRAIN = ["--config.train.steps=4", "--config.train.log_every=2", "--config.train.checkpoint_every=4"]
PAPER_PASSKEY = ["--config.data.seq_len=2048", "--config.eval.lengths=[2048,4096,8192]"]
TINY_EVAL = ["--config.eval.lengths=[128]", "--config.eval.samples=2", "--config.data.seq_len=128"]

CATALOGUE: dict[str, Experiment] = {
    e.name: e
    for e in [
        Experiment(
            name="main_job",
            summary="the README's main job (transformer tiny on passkey) trained and evaluated",
            backs=("README.md", "docs/models/transformer.md"),
            budgets={
                "test": {"configs": {"main": MAIN_JOB}, "overrides": TINY_TRAIN + TINY_EVAL},
                "cpu": {"configs": {"main": MAIN_JOB}},
                "paper": {"configs": {"main": ["configs/transformer.py:small", PAPER_PASSKEY]}},
            },
            run=_train_eval,
            metrics=_passkey_metrics,
            note="Passkey: 5 digits hidden in filler (chance 0.1 per digit, 1e-5 for the key); the first "
            "length is the training length, longer ones measure extrapolation.",
        ),
        Experiment(
            name="stuffed_mamba",
            summary="Mamba-2 state collapse beyond the training length and the three Stuffed-Mamba mitigations",
            backs=("docs/models/mamba2.md",),
            budgets={
                "test": {
                    "args": [
                        "--steps",
                        "60",
                        "--train_len",
                        "128",
                        "--batch",
                        "4",
                        "--factors",
                        "1,2",
                        "--samples",
                        "2",
                    ]
                },
                "cpu": {"args": ["--steps", "3000", "--train_len", "128", "--factors", "1,4,8,16"]},
                "paper": {"args": ["--steps", "20000", "--train_len", "512", "--factors", "1,4,8,16,32"]},
            },
            run=_script_run("stuffed_mamba", "--workdir", "stuffed_mamba.json"),
            metrics=_stuffed_metrics,
        ),
        Experiment(
            name="memmamba_passkey",
            summary="MemMamba vs Mamba-2 of about the same size on passkey, trained short and tested long",
            backs=("docs/models/memmamba.md",),
            budgets={
                "test": {
                    "args": [
                        "--steps",
                        "4",
                        "--seq-len",
                        "128",
                        "--batch-size",
                        "4",
                        "--samples",
                        "2",
                        "--eval-batch",
                        "2",
                    ]
                },
                "cpu": {"args": ["--steps", "3000", "--seq-len", "128"]},
                "paper": {"args": ["--steps", "20000", "--seq-len", "512", "--samples", "64"]},
            },
            run=_script_run("memmamba_passkey", "--out", "results.json"),
            metrics=_memmamba_metrics,
        ),
        Experiment(
            name="masformer_recall",
            summary="MASFormer: associative recall vs the number of full-attention layers",
            backs=("docs/models/masformer.md",),
            budgets={
                "test": {
                    "args": ["--steps", "55", "--seq-len", "64", "--window", "16", "--eval-examples", "64"],
                    "schedules": ["all-full", "all-window"],
                },
                "cpu": {
                    "args": ["--steps", "500"],
                    "schedules": ["all-full", "all-window", "1 full (layer 1)", "2 full (layers 1+3)"],
                },
                "paper": {
                    "args": ["--steps", "5000", "--seq-len", "1024", "--window", "128", "--d-model", "128"],
                    "schedules": ["all-full", "all-window", "1 full (layer 1)", "2 full (layers 1+3)"],
                },
            },
            run=_script_run("masformer_recall", "--out", "results.json"),
            metrics=_masformer_metrics,
            axis=("schedules", "schedules"),
        ),
        Experiment(
            name="listops_s4",
            summary="S4 classifier on locally generated LRA ListOps vs the majority class",
            backs=("docs/models/s4.md",),
            budgets={
                "test": {"args": ["--steps", "3", "--train", "64", "--test", "32", "--batch", "8"]},
                "cpu": {"args": ["--steps", "1500"]},
                "paper": {"args": ["--steps", "50000", "--train", "96000", "--test", "2000"]},
            },
            run=_script_run("listops_s4", "--out", "results.json"),
            metrics=_listops_metrics,
        ),
        Experiment(
            name="forecast_ar",
            summary="SpaceTime vs S4D on synthetic AR(p) forecasting, error against the optimal forecast",
            backs=("docs/models/spacetime.md",),
            budgets={
                "test": {
                    "args": ["--orders", "2", "--steps", "3", "--batch-size", "4", "--lag", "16", "--horizon", "4"]
                    + ["--train-length", "512", "--d-model", "8", "--kernel-dim", "8", "--s4d-d-model", "8"]
                    + ["--s4d-layers", "1", "--s4d-state", "8"]
                },
                "cpu": {"args": ["--orders", "4", "8", "16", "32"]},
                "paper": {"args": ["--orders", "4", "8", "16", "32", "64", "--steps", "8000"]},
            },
            run=_script_run("forecast_ar", "--out", "results.json", seed_flag="--seeds"),
            metrics=_forecast_metrics,
        ),
        Experiment(
            name="lact_vs_window",
            summary="LaCT vs a window-only transformer of the same window on passkey beyond the window",
            backs=("docs/models/lact.md",),
            budgets={
                "test": {
                    "configs": {
                        "lact": ["lact:tiny", []],
                        "window": ["transformer:tiny", ["--config.model.attention=window", "--config.model.window=64"]],
                    },
                    "models": ["lact", "window"],
                    "overrides": TINY_TRAIN + TINY_EVAL,
                },
                "cpu": {
                    "configs": {
                        "lact": ["lact:tiny", []],
                        "window": ["transformer:tiny", ["--config.model.attention=window", "--config.model.window=64"]],
                    },
                    "models": ["lact", "window"],
                },
                "paper": {
                    "configs": {
                        "lact": ["lact:tiny", ["--config.train.steps=20000"]],
                        "window": [
                            "transformer:tiny",
                            [
                                "--config.model.attention=window",
                                "--config.model.window=64",
                                "--config.train.steps=20000",
                            ],
                        ],
                    },
                    "models": ["lact", "window"],
                },
            },
            run=_train_eval,
            metrics=_passkey_metrics,
            axis=("model", "models"),
            note="Both see 64 keys through attention; LaCT adds its chunk-wise fast weights, so a needle "
            "more than 64 tokens back is reachable only through them.",
        ),
        Experiment(
            name="lact_throughput",
            summary="LaCT vs transformer tokens/s by sequence length (scripts/bench_lact.py)",
            backs=("docs/models/lact.md",),
            budgets={
                "test": {"args": ["--lengths", "64", "--d-model", "32", "--chunk", "32", "--reps", "1"]},
                "cpu": {"args": []},
                "paper": {"args": ["--lengths", "2048", "8192", "32768", "--d-model", "1024", "--chunk", "2048"]},
            },
            run=_script_run("bench_lact", "--out", "results.json"),
            metrics=_lact_bench_metrics,
            note="Seeds are repeats of the timing; only the ratios measured in one process mean anything.",
        ),
        Experiment(
            name="hip_vs_dense",
            summary="HiP vs dense attention on the same trained transformer, training-free",
            backs=("docs/models/hip.md",),
            budgets={
                "test": {
                    "configs": {"main": MAIN_JOB},
                    "overrides": TINY_TRAIN + TINY_EVAL,
                    "args": ["--lengths", "64", "--samples", "1", "--no-passkey"]
                    + ["--k_blocks", "1", "--block_q", "16", "--block_k", "16", "--window", "16", "--sinks", "16"],
                },
                "cpu": {
                    "configs": {"main": MAIN_JOB},
                    "args": ["--lengths", "160,320,640", "--samples", "8"]
                    + ["--k_blocks", "2", "--block_q", "16", "--block_k", "16", "--window", "32", "--sinks", "16"],
                },
                "paper": {
                    "configs": {"main": ["configs/transformer.py:small", PAPER_PASSKEY]},
                    "args": ["--lengths", "2048,4096,8192,16384", "--samples", "16"],
                },
            },
            run=_hip_run,
            metrics=_hip_metrics,
        ),
        Experiment(
            name="cauchy_bench",
            summary="Cauchy and Vandermonde kernels: the blocked XLA path vs the reference, time and memory",
            backs=("docs/kernels/cauchy.md",),
            budgets={
                "test": {"shapes": [[8, 64]], "batch": 1},
                "cpu": {"shapes": [[64, 4096], [256, 4096], [64, 16384]], "batch": 4},
                "paper": {"shapes": [[64, 4096], [256, 4096], [64, 16384], [256, 65536]], "batch": 8},
            },
            run=_cauchy_run,
            metrics=_cauchy_metrics,
            note="Seeds are repeats of the timing (the operands are fixed); the Pallas kernel runs "
            "interpreted on CPU, so its times are in the JSON but not here.",
        ),
        Experiment(
            name="decomposition_bench",
            summary="step FLOPs and time of each decomposition bucket vs concat-and-chunk at equal tokens",
            backs=("docs/data.md",),
            budgets={
                "test": {
                    "args": ["--max-log2", "7", "--tokens-per-step", "512", "--documents", "500", "--repeats", "1"]
                },
                "cpu": {"args": []},
                "paper": {"args": ["--max-log2", "13", "--tokens-per-step", "524288", "--d-model", "1024"]},
            },
            run=_script_run("bench_decomposition", "--out", "results.json"),
            metrics=_ddbench_metrics,
            note="Seeds draw other synthetic corpora (log-normal document lengths); one pre-norm "
            "attention + MLP block, forward and backward, jitted once per bucket shape.",
        ),
        Experiment(
            name="decomposition_vs_concat",
            summary="dataset decomposition vs concat-and-chunk at the same tokens, transformer and Mamba-2",
            backs=("docs/data.md",),
            budgets={
                "test": {
                    "args": ["--steps", "3", "--max-log2", "7", "--tokens-per-step", "512", "--corpus", "repo:docs"]
                },
                "cpu": {"args": ["--steps", "300"]},
                "paper": {
                    "args": ["--models", "transformer:1.3b", "mamba2:1.3b", "--max-log2", "13"]
                    + ["--tokens-per-step", "524288", "--steps", "20000"]
                },
            },
            run=_script_run("decomposition_vs_concat", "--out", "dd_vs_cc.json"),
            metrics=_dd_metrics,
        ),
        Experiment(
            name="compare",
            summary="every language model at one size on the same data (`zoo compare`)",
            backs=("docs/compare.md",),
            budgets={
                "test": {"preset": "test", "models": ["transformer", "mamba2"]},
                "cpu": {"preset": "tiny"},
                "paper": {"preset": "paper"},
            },
            run=_compare_run,
            metrics=_compare_metrics,
            seeds=(0,),
            note="`zoo compare` trains every model at one seed; its own page holds the full tables.",
        ),
        Experiment(
            name="mqar_grid",
            summary="Zoology's MQAR grid: every LM by model dimension x length, best of 3 lrs, 3 seeds",
            backs=("docs/compare.md",),
            budgets={
                "test": {"preset": "mqar-test"},
                "cpu": {"preset": "mqar-cpu", "out": "docs/compare/mqar"},
                "paper": {"preset": "mqar-paper", "out": "docs/compare/mqar-paper"},
            },
            run=_mqar_run,
            metrics=_mqar_metrics,
            seeds=(0,),
            note="One cell of this catalogue is the whole grid, which keeps its own seeds and resumes cell "
            "by cell in its folder; the page's MQAR section has the figures and the verdicts.",
        ),
        Experiment(
            name="hip_search_quality",
            summary="HiP's search, representative vs block-max scoring: attention mass, recall, FLOPs, vs dense",
            backs=("docs/kernels/sparse_attention.md",),
            budgets={"test": {}, "cpu": {"out": "results/hip_search"}, "paper": {"out": "results/hip_search"}},
            run=_hip_search_run,
            metrics=_hip_search_metrics,
            seeds=(0,),
            note="The measurement is deterministic (seed 0 of the script); its full tables are on the page.",
        ),
    ]
}
