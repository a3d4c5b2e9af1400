"""`zoo compare`: every language model of the zoo at one matched size, trained on the same data and
evaluated the same way, written as one JSON file, one markdown page and one figure per measure.

    zoo compare --preset tiny --out docs/compare --workdir /tmp/zoo-compare [--models transformer,mamba2]

The rows are the registered language models (`zoo.models.registry.list_models("lm")`: forecasters
and classifiers are left out by their kind), the settings' extra rows (a registered model under
other fields, e.g. a window-only transformer) and converted rows (another row's trained weights in
another model, e.g. training-free HiP on the transformer's weights). Settings: `zoo/configs/compare.py`.

Each trained row is a `zoo.train.trainer.train` run in `<workdir>/<row>` (rerunning resumes or, when
finished, reuses it) on the passkey + MQAR mixture in decomposition buckets. Measures, all on the
validation split:
- passkey exact match by length x depth, lengths 1x..8x the training length (`passkey_grid`);
- MQAR answer-token accuracy and exact match by length (`answer_accuracy_by_length`);
- loss by position on full-loss passkey sequences of 8x the training length (`loss_by_position`);
- prefill seconds of T tokens, decode seconds of one token after T, and XLA's compiled peak memory
  of both, at batch 1 (jitted `prefill` / `decode_step`, timed by `zoo.bench.time_fn`);
- parameters and forward FLOPs per token (XLA cost analysis, `zoo.info.forward_flops_per_token`).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shlex
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from zoo import storage
from zoo.bench import time_fn
from zoo.checkpoint import load_model
from zoo.compare_report import markdown, write_figures
from zoo.config import make_config, update, validate
from zoo.configs.compare import get_settings
from zoo.convert import convert_model
from zoo.eval import longcontext
from zoo.info import count_params, forward_flops_per_token
from zoo.models import registry
from zoo.models.params import ParamView
from zoo.train.memory import compiled_memory
from zoo.train.trainer import finished, train


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the comparison: `name` shown, `model` registered, built with `fields`; trained, or
    converted from the trained row `source`."""

    name: str
    model: str
    fields: dict
    source: str = ""


def rows_of(settings: dict, names: list[str] | None = None) -> list[Row]:
    """The rows of the settings (every LM, extra and converted rows), or those named; trained rows
    first, converted rows (which need their source's weights) last.

    Raises:
      ValueError: a name that is no row, or a converted row without its source row.
    """
    rows: dict[str, Row] = {}
    converted = settings.get("converted", {})
    for name in registry.list_models("lm"):
        rows[name] = Row(name, name, _fields(settings, name, name))
    for name, (model, extra) in settings.get("extra_rows", {}).items():
        rows[name] = Row(name, model, {**_fields(settings, model, model), **extra})
    for name, (source, extra) in converted.items():
        if name in rows:
            rows[name] = Row(name, rows[name].model, {**rows[name].fields, **extra}, source=source)
    if names is None:
        names = list(rows)
    unknown = [n for n in names if n not in rows]
    if unknown or not names:
        raise ValueError(f"--models {','.join(names)!r}: unknown row(s) {unknown}; choose from {','.join(rows)}")
    picked = [rows[n] for n in dict.fromkeys(names)]
    for row in picked:
        if row.source and row.source not in names:
            raise ValueError(
                f"--models: {row.name} is converted from the trained {row.source} row; add {row.source} to --models"
            )
    return [r for r in picked if not r.source] + [r for r in picked if r.source]  # sources are trained first


def _fields(settings: dict, model: str, name: str) -> dict:
    """The shared size fields the model's config has, then the row's own adjustments."""
    have = {f.name for f in dataclasses.fields(registry.config_class(model))}
    shared = {k: v for k, v in settings["model"].items() if k in have}
    return {**shared, **settings["per_model"].get(name, {})}


def run_config(settings: dict, row: Row) -> ml_collections.ConfigDict:
    """The full run config of a row: the run defaults (`zoo.config.make_config`, none of the model's own
    run settings, e.g. the SSM presets' answer-only passkey loss) with the comparison's settings, so
    every row trains on the same data with the same optimizer."""
    config = make_config(row.model, "tiny")
    config = update(
        config,
        {
            "model": row.fields,
            "data": settings["data"],
            "train": {**settings["train"], "checkpoint_every": settings["train"]["steps"], "keep_checkpoints": 1},
            "optim": settings["optim"],
        },
    )
    if "l_max" in config.model:  # S4: the kernel length C~ refers to (longer inputs extend it by doubling)
        config.model.l_max = max(config.model.l_max, config.data.seq_len)
    validate(config)
    registry.config_from_run(config)  # the model dataclass checks its fields
    return config


def _data(config: ml_collections.ConfigDict, source: str) -> ml_collections.ConfigDict:
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.source = source
    data.depth = -1.0
    data.answer_only = False
    return data


def bench_inference(model, length: int, reps: int) -> dict:
    """Batch-1 prefill of `length` tokens and decode of one more token: median seconds and XLA's
    compiled memory analysis (peak bytes of arguments + outputs + temporaries - aliased)."""
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(0).integers(32, 128, (1, length)), jnp.int32)  # [1, T]
    cache = model.init_cache(1, length + 1)

    def prefill(state, tokens, cache):
        return nnx.merge(graphdef, state).prefill(tokens, cache)

    def decode(state, token, cache):
        return nnx.merge(graphdef, state).decode_step(token, cache)

    pre = jax.jit(prefill).lower(state, tokens, cache).compile()
    _, filled = pre(state, tokens, cache)
    token = tokens[:, -1]  # [1]
    dec = jax.jit(decode).lower(state, token, filled).compile()
    pre_mem, dec_mem = compiled_memory(pre), compiled_memory(dec)
    return {
        "length": int(length),
        "prefill_s": time_fn(pre, state, tokens, cache, reps=reps, warmup=1),
        "decode_s": time_fn(dec, state, token, filled, reps=max(reps, 5), warmup=1),
        "prefill_peak_bytes": None if pre_mem is None else pre_mem["peak_bytes"],
        "decode_peak_bytes": None if dec_mem is None else dec_mem["peak_bytes"],
    }


def evaluate_row(model, config: ml_collections.ConfigDict, ev: dict) -> dict:
    """Every measure of the comparison for one model (see the module docstring)."""
    train_len = int(config.data.seq_len)
    lengths = [m * train_len for m in ev["length_multiples"]]
    out = {
        "passkey": longcontext.passkey_grid(
            model, _data(config, "passkey"), lengths, ev["depths"], ev["samples"], ev["batch_size"]
        ),
        "mqar": longcontext.answer_accuracy_by_length(
            model, _data(config, "recall"), lengths, ev["samples"], ev["batch_size"]
        ),
        "loss_by_position": longcontext.loss_by_position(
            model, _data(config, "passkey"), max(lengths), ev["loss_samples"], ev["batch_size"]
        ),
    }
    lp = out["loss_by_position"]
    inside = [x for p, x in zip(lp["position"], lp["loss"]) if p < train_len]
    beyond = [x for p, x in zip(lp["position"], lp["loss"]) if p >= train_len]
    lp["mean_within_train_length"] = float(np.mean(inside)) if inside else None
    lp["mean_beyond_train_length"] = float(np.mean(beyond)) if beyond else None
    out["inference"] = [bench_inference(model, t, ev["bench_reps"]) for t in ev["bench_lengths"]]
    return out


def run(
    preset: str = "tiny",
    out: str = "docs/compare",
    workdir: str | None = None,
    models: list[str] | None = None,
    steps: int | None = None,
    command: str = "",
    dry_run: bool = False,
    max_cells: int | None = None,
) -> dict:
    """Trains and evaluates every row; writes compare.json, compare.md and the figures to `out`.

    The `mqar-*` presets run the MQAR grid instead (`zoo.compare_mqar.run`: mqar.json, mqar.md and
    its figures; resumable cell by cell).

    Args:
      preset: a preset of `zoo/configs/compare.py` (tiny, paper, test, mqar-cpu, mqar-paper, mqar-test).
      out: the output directory (created).
      workdir: where the training runs live, one directory per row (default: a new temporary
        directory). A finished run there is reused, an unfinished one resumed.
      models: the rows to run (default: all).
      steps: training steps (default: the preset's).
      command: the command line to print in compare.md (default: the `zoo compare` of these arguments).
      dry_run: (`mqar-*` presets) print the pending cells and their estimated CPU time, run nothing.
      max_cells: (`mqar-*` presets) run at most this many pending cells.

    Returns:
      The dict written to compare.json (mqar.json for the MQAR grid).
    """
    settings = get_settings(preset)
    if settings.get("kind") == "mqar":
        from zoo import compare_mqar

        command = command or command_line(preset, out, workdir, models, steps)
        return compare_mqar.run(preset, out, workdir, models, steps, command, settings, dry_run, max_cells)
    if dry_run or max_cells is not None:
        raise ValueError(f"--dry-run and --max-cells apply to the mqar-* presets, not to {preset!r}")
    if steps is not None:
        if steps < 1:
            raise ValueError(f"--steps {steps}: give a positive number of training steps")
        settings["train"]["steps"] = int(steps)
    rows = rows_of(settings, models)
    configs = {row.name: run_config(settings, row) for row in rows}  # every config checked before training
    storage.check_writable_dir(out, "--out")
    workdir_arg, workdir = workdir, workdir or tempfile.mkdtemp(prefix="zoo-compare-")
    started = time.perf_counter()
    results: dict[str, dict] = {}
    trained: dict[str, object] = {}
    for row in rows:
        config = configs[row.name]
        t0 = time.perf_counter()
        entry: dict = {"model": row.model, "fields": row.fields}
        if row.source:
            model = convert_model(trained[row.source], row.model, **row.fields)
            entry.update(how=f"converted from the trained {row.source} (training-free)", train={}, step=0)
        else:
            run_dir = os.path.join(workdir, row.name)
            result = finished(train(config, run_dir, progress=False), run_dir)
            model, _ = load_model(run_dir)
            trained[row.name] = model
            records = storage.read_metrics(run_dir)  # the last logged metrics, also of a finished run reused
            entry.update(how="trained", train=records[-1] if records else result["train"], step=result["step"])
        entry["train_s"] = time.perf_counter() - t0
        n_model = sum(int(np.prod(p.shape)) for p in ParamView(model).flat(model).values())
        n_config = count_params(config)
        if n_model != n_config:
            raise ValueError(f"{row.name}: the model has {n_model} parameters but its config builds {n_config}")
        train_len = int(config.data.seq_len)
        entry["params"] = n_model
        entry["flops_per_token"] = {
            str(t): forward_flops_per_token(config, t) for t in (train_len, max(settings["eval"]["bench_lengths"]))
        }
        t0 = time.perf_counter()
        entry.update(evaluate_row(model, config, settings["eval"]))
        entry["eval_s"] = time.perf_counter() - t0
        results[row.name] = entry
        print(
            f"zoo compare: {row.name}: {n_model:,} params, {entry['how']}, "
            f"train {entry['train_s']:.0f} s, eval {entry['eval_s']:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    any_config = next(iter(configs.values()))
    report = {
        "preset": preset,
        "command": command or command_line(preset, out, workdir_arg, models, steps),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "wall_s": time.perf_counter() - started,
        "settings": {
            k: v for k, v in settings.items() if k in ("model", "per_model", "data", "train", "optim", "eval")
        },
        "train_length": int(any_config.data.seq_len),
        "order": list(results),  # the rows' order (JSON objects are written with sorted keys)
        "rows": results,
    }
    outdir = storage.path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    storage.write_json_atomic(outdir / "compare.json", report)
    figures = write_figures(report, outdir)
    (outdir / "compare.md").write_text(markdown(report, figures))
    return report


def machine() -> str:
    """The backend, device and host this ran on, in words."""
    dev = jax.devices()[0]
    return (
        f"{jax.default_backend()} ({dev.device_kind}, {jax.device_count()} device(s)), "
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores visible, "
        f"Python {platform.python_version()}, jax {jax.__version__}"
    )


def command_line(preset: str, out: str, workdir: str | None, models: list[str] | None, steps: int | None) -> str:
    """The `zoo compare` command that makes this report (for compare.md)."""
    args = ["zoo", "compare", "--preset", preset, "--out", str(out)]
    args += ["--workdir", str(workdir)] if workdir else []
    args += ["--models", ",".join(models)] if models else []
    args += ["--steps", str(steps)] if steps is not None else []
    return " ".join(shlex.quote(a) for a in args)
