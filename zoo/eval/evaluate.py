"""`zoo eval`: the task's long-context evaluation of a trained run, written to eval.json + plots."""

from __future__ import annotations

import os

import jax
import ml_collections

from zoo import storage
from zoo.checkpoint import load_model
from zoo.eval import longcontext, plots


def evaluate(model, config: ml_collections.ConfigDict) -> dict:
    """Runs the evaluations that fit `config.data.source` and returns them as a dict."""
    data, ev = config.data, config.eval
    lengths = [int(x) for x in ev.lengths]
    out: dict = {}
    if data.source == "passkey":
        out["passkey"] = longcontext.passkey_grid(model, data, lengths, ev.depths, ev.samples, ev.batch_size)
    if data.source in ("passkey", "recall", "selective_copy"):
        out["by_length"] = longcontext.answer_accuracy_by_length(model, data, lengths, ev.samples, ev.batch_size)
    out["loss_by_position"] = longcontext.loss_by_position(model, data, max(lengths), ev.samples, ev.batch_size)
    return out


def evaluate_workdir(workdir: str, model=None, config=None, step: int | None = None, *, shardings=None) -> dict:
    """Evaluates the run in `workdir` (loading its checkpoint unless a model is given) and writes
    eval.json (with "checkpoint_step", the step evaluated, when known), eval.png and training.png there.

    In a job of several processes every process calls this (the evaluation's computations span
    them); `shardings` (see `zoo.checkpoint.load_model`) places the restored parameters, and only
    process 0 writes the files. Every process returns the same result.
    """
    if jax.process_index() == 0:  # check before computing that the results can be written
        storage.check_writable_dir(workdir, "the run's work directory")
        out = storage.path(workdir)
        for name in ("eval.json", "eval.png", "training.png"):
            if (out / name).exists() and not storage.is_remote(out) and not os.access(str(out / name), os.W_OK):
                raise ValueError(f"{str(out / name)!r} is read-only; evaluation results could not be written")
    if model is None:
        model, config, step = load_model(workdir, step, shardings=shardings, return_step=True)
    result = evaluate(model, config)
    if step is not None:
        result["checkpoint_step"] = step
    if jax.process_index() != 0:
        return result
    out = storage.path(workdir)
    storage.write_json_atomic(out / "eval.json", result)
    title = f"{config.model_name} ({config.preset}) on {config.data.source}"
    plots.eval_figure(result, out / "eval.png", config.data.seq_len, title)
    records = storage.read_metrics(workdir)
    if records:
        plots.training_curves(records, out / "training.png", title)
    return result
