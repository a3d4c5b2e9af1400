"""Mamba-2 vs MemMamba of about the same size on passkey retrieval: train short, test long.

    python scripts/memmamba_passkey.py [--steps 3000] [--seq-len 128] [--out runs/memmamba_passkey]

Both models are trained with the zoo trainer (`zoo.train.trainer.train`) on byte-level passkey
retrieval (`zoo.data.synthetic.Passkey`; `--loss answer`, the default, puts the loss on the 5 answer
digits only, without which these tiny SSMs stay at chance; `--loss full` on every target) at
`--seq-len` tokens, then
evaluated with `zoo.eval.longcontext` at 1, 2, 4, 8 and 16 times that length: the passkey grid
(exact match of the 5 digits at several needle depths) and the answer accuracy at random depths.
Model sizes: Mamba-2 `tiny` with 3 layers vs MemMamba `tiny` with 2 layers and a smaller Note Block
(summary_dim 16, 2 note heads, pool 16, layer 1 a cross layer); the parameter counts are printed.
Writes results_<model>.json, then results.json and passkey.png for every finished model, to
--out (so the two models can run as two processes with the same --out).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import numpy as np

from zoo.checkpoint import load_model
from zoo.config import make_config
from zoo.data.pipeline import example_source
from zoo.eval import longcontext
from zoo.eval.memory_fidelity import memory_fidelity
from zoo.eval.plots import plain_log_ticks
from zoo.models.params import ParamView
from zoo.train.trainer import train

MODELS = {
    "mamba2": ("mamba2", {"n_layers": 3}),
    "memmamba": (
        "memmamba",
        {"n_layers": 2, "summary_dim": 16, "note_heads": 2, "pool_size": 16, "cross_layer_interval": 2},
    ),
}


def run(name: str, args) -> dict:
    model_name, overrides = MODELS[name]
    config = make_config(model_name, "tiny", **overrides)
    config.data.seq_len = args.seq_len
    config.data.batch_size = args.batch_size
    config.data.answer_only = args.loss == "answer"
    config.train.steps = args.steps
    config.train.seed = config.data.seed = args.seed
    config.train.log_every = max(1, args.steps // 10)
    config.train.checkpoint_every = args.steps
    config.optim.warmup_steps = max(1, args.steps // 10)
    workdir = os.path.join(args.out, name)
    t0 = time.perf_counter()
    result = train(config, workdir, progress=False)
    train_s = time.perf_counter() - t0
    model, config = load_model(workdir)
    n_params = sum(math.prod(s.shape) for s in ParamView(model).shapes.values())
    lengths = [args.seq_len * m for m in (1, 2, 4, 8, 16)]
    t0 = time.perf_counter()
    grid = longcontext.passkey_grid(model, config.data, lengths, args.depths, args.samples, args.eval_batch)
    by_len = longcontext.answer_accuracy_by_length(model, config.data, lengths, args.samples, args.eval_batch)
    out = {
        "params": n_params,
        "train_seconds": train_s,
        "eval_seconds": time.perf_counter() - t0,
        "final_train": result["train"],
        "passkey": grid,
        "by_length": by_len,
        "fidelity": fidelity(model, config, 4 * args.seq_len),
    }
    print(f"{name}: {n_params} params, trained {train_s:.0f}s, final train {result['train']}", flush=True)
    return out


def fidelity(model, config, length: int, lags=(0, 1, 4, 16, 64, 256)) -> dict:
    """ETMF/ECLMF (zoo.eval.memory_fidelity) on two held-out passkey sequences of `length` tokens."""
    source = example_source(config.data, "validation", length, depth=0.1)
    tokens = np.stack([source[i]["tokens"][:-1] for i in range(2)])
    lags = [k for k in lags if k < length]
    r = memory_fidelity(model, tokens, lags, sources=list(range(0, length - max(lags), 16)), probes=2)
    return {"length": length, "lags": r["lags"], "etmf": r["etmf"].tolist(), "eclmf": r["eclmf"].tolist()}


def table(results: dict) -> str:
    lengths = next(iter(results.values()))["by_length"]["lengths"]
    rows = ["| model | params | " + " | ".join(f"{n} tok" for n in lengths) + " |", "|---|---|" + "---|" * len(lengths)]
    for name, r in results.items():
        em = np.mean(np.asarray(r["passkey"]["exact_match"]), axis=1)
        rows.append(
            f"| {name} passkey exact match (mean over depths) | {r['params']} | "
            + " | ".join(f"{v:.2f}" for v in em)
            + " |"
        )
        rows.append(
            f"| {name} answer-digit accuracy (random depth) | {r['params']} | "
            + " | ".join(f"{v:.2f}" for v in r["by_length"]["token_accuracy"])
            + " |"
        )
    lags = next(iter(results.values()))["fidelity"]["lags"]
    rows += [
        "",
        "| model | layer | " + " | ".join(f"ETMF k={k}" for k in lags) + " |",
        "|---|---|" + "---|" * len(lags),
    ]
    for name, r in results.items():
        for layer, row in enumerate(r["fidelity"]["etmf"]):
            rows.append(f"| {name} | {layer + 1} | " + " | ".join(f"{v:.3g}" for v in row) + " |")
    return "\n".join(rows)


def plot(results: dict, path: str, train_len: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, r in results.items():
        lengths = r["passkey"]["lengths"]
        axes[0].plot(lengths, np.mean(np.asarray(r["passkey"]["exact_match"]), 1), "o-", label=name)
        axes[1].plot(lengths, r["by_length"]["token_accuracy"], "o-", label=name)
    for ax, title in zip(axes, ("passkey exact match (mean over depths)", "answer-digit accuracy")):
        ax.axvline(train_len, color="gray", ls="--", label="train length")
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set(xlabel="context length (tokens)", ylim=(-0.02, 1.02), title=title)
        ax.legend()
    fig.tight_layout()
    plain_log_ticks(fig)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--loss", choices=("answer", "full"), default="answer")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--out", default="runs/memmamba_passkey")
    p.add_argument("--seed", type=int, default=0, help="training and data seed")
    args = p.parse_args(argv)
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    os.makedirs(args.out, exist_ok=True)
    for name in args.models:
        path = os.path.join(args.out, f"results_{name}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(run(name, args), f, indent=1)
        os.replace(path + ".tmp", path)  # atomic: a concurrent process never reads half a file
    # Combine whatever models have finished in --out (two processes may each run one model).
    results = {}
    for name in MODELS:
        path = os.path.join(args.out, f"results_{name}.json")
        if os.path.isfile(path):
            with open(path) as f:
                results[name] = json.load(f)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "passkey.png"), args.seq_len)
    print(table(results))


if __name__ == "__main__":
    main()
