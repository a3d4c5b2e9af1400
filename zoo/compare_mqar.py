"""The MQAR grid of `zoo compare` (presets `mqar-*`): Zoology's Figure 2 (Arora et al. 2023) at the
zoo's sizes, with the Mamba-2 paper's state-size comparison.

    zoo compare --preset mqar-cpu --out docs/compare/mqar --workdir /tmp/zoo-mqar [--dry-run] [--max-cells N]

Every row (`settings["rows"]`) is trained on multi-query associative recall (`data.source="mqar"`:
pairs first, queries at power-law gaps, loss on the recalled values) at every model dimension x
sequence length x learning rate x seed of `settings["grid"]`; converted rows (HiP) run the trained
transformer's weights of the same cell without training. A cell is one independent run of the
real trainer in `<workdir>/<row>/<cell>`; its result is written to `<out>/mqar.json` as soon as it is
finished, and a rerun skips every cell that file holds. A finished cell's run directory is removed,
except the transformer's, whose weights the converted rows of later sittings read (a converted cell
whose source run is gone trains it again). The report (`zoo.compare_report.write_mqar_report`)
keeps, per (row, d_model, T), the learning rate with the best mean accuracy over seeds, and judges
each claim from the JSON.

Accuracy is measured on held-out examples (the validation split's seed) of the training length:
the fraction of recalled values predicted exactly, also split by the distance from the query back
to its key (below / at least `eval.window`, the window-only rows' window).
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from zoo import storage
from zoo.checkpoint import load_model
from zoo.compare import Row, machine, run_config
from zoo.compare_report import write_mqar_report
from zoo.configs.compare import get_settings
from zoo.convert import convert_model
from zoo.data.pipeline import example_source, to_model_inputs
from zoo.eval.longcontext import token_stats
from zoo.models import registry
from zoo.train.trainer import finished, train

RESULT = "mqar.json"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One independent run: a row at one model dimension, length, learning rate and seed."""

    row: str
    d_model: int
    seq_len: int
    lr: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.row}|d{self.d_model}|T{self.seq_len}|lr{self.lr:g}|s{self.seed}"

    @property
    def run_name(self) -> str:
        return f"d{self.d_model}-T{self.seq_len}-lr{self.lr:g}-s{self.seed}"


def rows(settings: dict) -> dict[str, Row]:
    """The grid's rows: trained rows first, then converted rows (built from a trained row's weights)."""
    out = {name: Row(name, model, dict(fields)) for name, (model, fields) in settings["rows"].items()}
    for name, (source, model, fields) in settings["converted"].items():
        out[name] = Row(name, model, dict(fields), source=source)
    return out


def cells(settings: dict) -> list[Cell]:
    """Every cell in run order: seed by seed (a first sitting gives a whole picture at one seed), then
    length, dimension and learning rate; a converted row right after its source's cell."""
    g, names = settings["grid"], list(rows(settings))
    return [
        Cell(name, d, t, lr, seed)
        for seed in g["seed"]
        for t in g["seq_len"]
        for d in g["d_model"]
        for lr in g["lr"]
        for name in names
    ]


def num_pairs(settings: dict, seq_len: int) -> int:
    """Zoology's number of key-value pairs at length T (T/16 at `pairs_per_token` 1/16)."""
    return max(1, int(seq_len * settings["data"]["pairs_per_token"]))


def cell_config(settings: dict, row: Row, cell: Cell):
    """The trainer's run config of a trained cell (the comparison's `run_config` at this cell)."""
    have = {f.name for f in dataclasses.fields(type(registry.get_model_config(row.model, "tiny")))}
    m = settings["model"]
    fields = {"d_model": cell.d_model, "n_layers": m["n_layers"], "dtype": m["dtype"]}
    if "d_ff" in have:
        fields["d_ff"] = m["ff_mult"] * cell.d_model
    data = {k: v for k, v in settings["data"].items() if k != "pairs_per_token"}
    data.update(seq_len=cell.seq_len, num_pairs=num_pairs(settings, cell.seq_len), seed=cell.seed)
    run = {
        "data": data,
        "train": {**settings["train"], "seed": cell.seed},
        "optim": {**settings["optim"], "lr": cell.lr},
    }
    return run_config(run, Row(row.name, row.model, {**fields, **row.fields}))


def evaluate(model, data, length: int, samples: int, batch_size: int, window: int) -> dict:
    """Accuracy on the recalled values of `samples` held-out examples, also split by the distance
    from each query back to its key: near (< window) and far (>= window)."""
    source = example_source(data, "validation", length)
    n = source.num_pairs
    hits = {"near": [0, 0], "far": [0, 0]}
    for start in range(0, samples, batch_size):
        items = [to_model_inputs(source[i]) for i in range(start, min(start + batch_size, samples))]
        b = {k: np.stack([it[k] for it in items]) for k in items[0]}
        _, pred = token_stats(model, b["inputs"], b["targets"])  # [B, T]
        rows_, at = np.nonzero(b["answer_mask"])  # the query positions
        keys = b["inputs"][:, 0 : 2 * n : 2]  # [B, n]
        j = np.argmax(keys[rows_] == b["inputs"][rows_, at][:, None], axis=1)  # which pair each query asks for
        far = (at - 2 * j) >= window
        ok = pred[rows_, at] == b["targets"][rows_, at]
        for name, sel in (("near", ~far), ("far", far)):
            hits[name][0] += int(ok[sel].sum())
            hits[name][1] += int(sel.sum())
    correct = hits["near"][0] + hits["far"][0]
    total = hits["near"][1] + hits["far"][1]

    def frac(c, t):
        return None if t == 0 else c / t

    return {
        "accuracy": correct / total,
        "near_accuracy": frac(*hits["near"]),
        "far_accuracy": frac(*hits["far"]),
        "near_queries": hits["near"][1],
        "far_queries": hits["far"][1],
        "window": int(window),
    }


def _version() -> str:
    try:
        return importlib.metadata.version("longcontext-zoo")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def provenance() -> dict:
    """Where and with what a sitting ran: zoo version and git commit, date, CPU, jax."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "zoo_version": _version(),
        "git_commit": commit,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "jax_version": jax.__version__,
        "machine": machine(),
    }


def _cell_settings(settings: dict) -> dict:
    """The settings a cell's result depends on (a result file made with others cannot be resumed)."""
    return {k: settings[k] for k in ("model", "rows", "converted", "data", "train", "optim", "eval")}


def load_results(file, settings: dict, preset: str) -> dict:
    """The result file of an earlier sitting, or a new one; one clear error when its settings differ."""
    if not file.exists():
        return {"preset": preset, "settings": settings, "sittings": [], "cells": {}}
    try:
        report = storage.read_json(file)
        old, _, _ = report["settings"], report["cells"], report["sittings"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--out: {file} is not an MQAR result file ({e!r}); move it away to start anew") from e
    now = json.loads(json.dumps(_cell_settings(settings)))  # as read back: tuples become lists
    if any(old.get(k) != v for k, v in now.items()):
        raise ValueError(
            f"--out: {file} holds cells of other settings than preset {preset!r} (--steps or the preset "
            "changed); give another --out, or move that file away to start anew"
        )
    report["settings"] = settings  # the grid may grow (more seeds, lengths): finished cells stay valid
    return report


def estimate(settings: dict, results: dict, pending: list[Cell]) -> dict[str, float]:
    """Estimated CPU seconds of the pending cells per row: seconds per step at d_model 64, T=64 (the
    median over the row's finished cells, else the preset's `cost`), scaled by d/64 x T/64."""
    steps = settings["train"]["steps"]
    per_row: dict[str, list[float]] = {}
    for r in results["cells"].values():
        if r.get("train_s") and r.get("steps"):
            per_row.setdefault(r["row"], []).append(r["train_s"] / r["steps"] / (r["d_model"] / 64 * r["seq_len"] / 64))
    out: dict[str, float] = {}
    for c in pending:
        rate = float(np.median(per_row[c.row])) if c.row in per_row else settings["cost"].get(c.row, 0.0)
        out[c.row] = out.get(c.row, 0.0) + steps * rate * c.d_model / 64 * c.seq_len / 64
    return out


def run(
    preset: str,
    out: str,
    workdir: str | None = None,
    models: list[str] | None = None,
    steps: int | None = None,
    command: str = "",
    settings: dict | None = None,
    dry_run: bool = False,
    max_cells: int | None = None,
) -> dict:
    """Runs the pending cells of the grid (all, or `max_cells` of them) and writes the report.

    Args:
      preset: an `mqar-*` preset of `zoo/configs/compare.py` (its settings unless `settings` is given).
      out: the output directory: mqar.json (every finished cell), mqar.md and one figure per family.
      workdir: where the cells' training runs live (default: a new temporary directory).
      models: the rows to run (default: all); a converted row needs its source row.
      steps: training steps per cell (default: the preset's).
      command: the command line shown in mqar.md.
      dry_run: print the pending cells and their estimated CPU time; train and write nothing.
      max_cells: stop after this many cells (a sitting); the rest run on a later call.

    Returns:
      The dict written to mqar.json.
    """
    settings = settings or get_settings(preset)
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps {steps}: give a positive number of training steps")
        settings["train"]["steps"] = int(steps)
    if max_cells is not None and max_cells < 0:
        raise ValueError(f"--max-cells {max_cells}: give a number of cells >= 0")
    all_rows = rows(settings)
    names = list(all_rows) if models is None else list(dict.fromkeys(models))
    unknown = [n for n in names if n not in all_rows]
    if unknown or not names:
        raise ValueError(f"--models {','.join(names)!r}: unknown row(s) {unknown}; choose from {','.join(all_rows)}")
    for n in names:
        if all_rows[n].source and all_rows[n].source not in names:
            raise ValueError(
                f"--models: {n} is converted from the trained {all_rows[n].source} row; add it to --models"
            )
    todo = [c for c in cells(settings) if c.row in names]
    for c in todo:  # every config checked before anything runs
        if not all_rows[c.row].source:
            cell_config(settings, all_rows[c.row], c)
    outdir = storage.path(out)
    file = outdir / RESULT
    results = load_results(file, settings, preset)
    pending = [c for c in todo if c.key not in results["cells"]]
    if dry_run:
        per_row = estimate(settings, results, pending)
        print(
            f"zoo compare --preset {preset}: {len(todo) - len(pending)} of {len(todo)} cells finished in {file}; "
            f"{len(pending)} to run, estimated {sum(per_row.values()) / 3600:.1f} CPU hours "
            f"({settings['train']['steps']} steps each):",
            file=sys.stderr,
        )
        for name, s in per_row.items():
            n = sum(c.row == name for c in pending)
            print(f"  {name:20s} {n:4d} cells  {s / 3600:6.1f} h", file=sys.stderr)
        return results
    storage.check_writable_dir(out, "--out")
    outdir.mkdir(parents=True, exist_ok=True)
    workdir = workdir or tempfile.mkdtemp(prefix="zoo-mqar-")
    started, ran = time.perf_counter(), 0
    sources = {r.source for r in all_rows.values() if r.source}
    for c in pending:
        if max_cells is not None and ran >= max_cells:
            break
        row = all_rows[c.row]
        t0 = time.perf_counter()
        if row.source:
            source = all_rows[row.source]
            config = cell_config(settings, source, c)
            run_dir = os.path.join(workdir, source.name, c.run_name)
            if dataclasses.replace(c, row=source.name).key not in results["cells"] or not os.path.isdir(run_dir):
                # the source row's run is missing (another workdir): train it again
                finished(train(config, run_dir, progress=False), run_dir)
            trained, _ = load_model(run_dir)
            model = convert_model(trained, row.model, **row.fields)
            entry = {"how": f"converted from the trained {source.name} (training-free)", "steps": 0, "train_s": 0.0}
        else:
            config = cell_config(settings, row, c)
            run_dir = os.path.join(workdir, row.name, c.run_name)
            result = finished(train(config, run_dir, progress=False), run_dir)
            model, _ = load_model(run_dir)
            records = storage.read_metrics(run_dir)
            last = records[-1] if records else result["train"]
            entry = {
                "how": "trained",
                "steps": int(result["step"]),
                "train_s": time.perf_counter() - t0,
                "train_loss": last.get("loss"),
            }
        t1 = time.perf_counter()
        ev = settings["eval"]
        entry.update(evaluate(model, config.data, c.seq_len, ev["samples"], ev["batch_size"], ev["window"]))
        entry.update(
            row=c.row,
            model=row.model,
            d_model=c.d_model,
            seq_len=c.seq_len,
            num_pairs=num_pairs(settings, c.seq_len),
            lr=c.lr,
            seed=c.seed,
            eval_s=time.perf_counter() - t1,
        )
        results["cells"][c.key] = entry
        storage.write_json_atomic(file, results)  # at once: a later sitting skips this cell
        if not row.source and row.name not in sources:  # only a converted row's source needs its weights kept
            shutil.rmtree(run_dir, ignore_errors=True)
        ran += 1
        print(
            f"zoo compare: {c.key}: accuracy {entry['accuracy']:.3f}, train {entry['train_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    results["command"] = command
    results["order"] = list(all_rows)  # the rows' order (JSON objects are written with sorted keys)
    results["sittings"].append({**provenance(), "cells_run": ran, "wall_s": time.perf_counter() - started})
    storage.write_json_atomic(file, results)
    write_mqar_report(results, outdir)
    return results
