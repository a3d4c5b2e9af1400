"""Dataset decomposition vs concat-and-chunk on prepared shards, at the same tokens: step time,
tokens/s and loss curves for the transformer and Mamba-2.

    .venv/bin/python scripts/decomposition_vs_concat.py [--steps 300] [--corpus DIR] [--out runs/dd-vs-cc]

1. `zoo data prepare` (bytes, EOS between documents) on a text corpus (default: this Python's
   standard library sources) into ArrayRecord shards, once.
2. For each model, two runs of the real trainer with the same optimizer, steps and tokens per step:
   concat-and-chunk (`data.mode=fixed`, rows of 2^max_log2 crossing document boundaries) and dataset
   decomposition (`data.mode=decomposition`, buckets 2^min_log2 .. 2^max_log2, one bucket per step,
   pieces never crossing a document boundary).
3. Both are evaluated the same way: the mean loss on held-out concat-and-chunk rows of the
   validation split at length 2^max_log2 (what each model will meet at inference), plus the curves.

Prints one table (step time, tokens/s, final training loss, validation loss) and writes
`dd_vs_cc.json` and `dd_vs_cc.png` to --out. CPU-sized by default; the same command with
`--models transformer:1.3b mamba2:1.3b --max-log2 13 --tokens-per-step 524288` is the paper-scale run
on a GPU/TPU (not run here).
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zoo.checkpoint import load_model
from zoo.config import load_config
from zoo.data.pipeline import make_batches
from zoo.data.prepare import prepare
from zoo.eval.plots import plain_log_ticks
from zoo.storage import read_metrics
from zoo.train.trainer import train


def _corpus_dir(path: str) -> str:
    return path or sysconfig.get_paths()["stdlib"]


def validation_loss(workdir: str, shards: str, seq_len: int, batches: int = 8) -> float:
    """Mean next-token loss of the run's final model on validation concat-and-chunk rows."""
    model, config = load_model(workdir)
    config.data.source, config.data.path, config.data.mode = "shards", shards, "fixed"
    config.data.seq_len, config.data.batch_size = seq_len, 8
    it = make_batches(config.data, "validation")
    fwd = jax.jit(lambda toks: model(toks))
    total = weight = 0.0
    for _ in range(batches):
        b = next(it)
        ce = optax.softmax_cross_entropy_with_integer_labels(fwd(jnp.asarray(b["inputs"])), jnp.asarray(b["targets"]))
        total += float(jnp.sum(ce * b["loss_mask"]))
        weight += float(np.sum(b["loss_mask"]))
    return total / weight


def run_one(spec: str, mode: str, shards: str, out: str, args) -> dict:
    t = 1 << args.max_log2
    overrides = [
        "--config.data.source=shards",
        f"--config.data.path={shards}",
        f"--config.data.mode={mode}",
        f"--config.data.seq_len={t}",
        f"--config.data.batch_size={args.tokens_per_step // t}",
        f"--config.data.min_log2={args.min_log2}",
        f"--config.data.max_log2={args.max_log2}",
        f"--config.data.tokens_per_step={args.tokens_per_step}",
        "--config.data.curriculum=pow2",
        f"--config.train.steps={args.steps}",
        f"--config.train.checkpoint_every={args.steps}",
        "--config.train.log_every=10",
        f"--config.train.seed={args.seed}",
        f"--config.data.seed={args.seed}",
        f"--config.optim.lr={args.lr}",
        "--config.optim.warmup_steps=20",
        "--config.data.answer_only=False",
        "--config.data.allow_toy=True",
    ]
    workdir = os.path.join(out, f"{spec.replace(':', '-')}-{mode}")
    t0 = time.perf_counter()
    train(load_config(spec, overrides), workdir, progress=False)
    wall = time.perf_counter() - t0
    records = read_metrics(workdir)
    steady = [r for r in records if r["step"] > 10]  # leave out the compile-dominated first logs
    return {
        "config": spec,
        "mode": mode,
        "steps": args.steps,
        "tokens_per_step": args.tokens_per_step,
        "wall_s": wall,
        "tokens_per_s": float(np.mean([r["tokens_per_sec"] for r in steady])),
        "train_loss_final": float(np.mean([r["loss"] for r in records[-3:]])),
        "val_loss": validation_loss(workdir, shards, t),
        "curve": [(r["step"], r["loss"], r["seq_len"]) for r in records],
    }


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = sorted({r["config"] for r in rows})
    fig, axes = plt.subplots(1, len(specs), figsize=(5.5 * len(specs), 3.8), squeeze=False)
    for ax, spec in zip(axes[0], specs):
        for r in (r for r in rows if r["config"] == spec):
            steps, loss, _ = zip(*r["curve"])
            label = f"{r['mode']} (val {r['val_loss']:.3f}, {r['tokens_per_s']:,.0f} tok/s)"
            ax.plot(np.asarray(steps) * r["tokens_per_step"], loss, label=label)
        ax.set(xlabel="training tokens", ylabel="training loss", yscale="log", title=spec)
        ax.legend()
    fig.tight_layout()
    plain_log_ticks(fig)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="", help="directory of text files (default: the stdlib sources)")
    p.add_argument("--out", default="runs/dd-vs-cc")
    p.add_argument("--models", nargs="+", default=["transformer:tiny", "mamba2:tiny"])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--min-log2", type=int, default=6)
    p.add_argument("--max-log2", type=int, default=9)
    p.add_argument("--tokens-per-step", type=int, default=4096)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="training and data seed of every run")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    shards = os.path.join(args.out, "shards")
    t0 = time.perf_counter()
    manifest = prepare("text", _corpus_dir(args.corpus), shards, workers=args.workers)
    print(
        f"prepared {shards} in {time.perf_counter() - t0:.0f} s: "
        + ", ".join(f"{s}: {v['documents']:,} docs / {v['tokens']:,} tokens" for s, v in manifest["splits"].items())
    )
    rows = [run_one(spec, mode, shards, args.out, args) for spec in args.models for mode in ("fixed", "decomposition")]
    print(f"| model | mode | steps x tokens | wall s | tokens/s | final train loss | val loss @ {1 << args.max_log2} |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['config']} | {'concat-and-chunk' if r['mode'] == 'fixed' else 'decomposition'} | "
            f"{r['steps']} x {r['tokens_per_step']:,} | {r['wall_s']:.0f} | {r['tokens_per_s']:,.0f} | "
            f"{r['train_loss_final']:.3f} | {r['val_loss']:.3f} |"
        )
    with open(os.path.join(args.out, "dd_vs_cc.json"), "w") as f:
        json.dump({"args": vars(args), "backend": jax.default_backend(), "rows": rows}, f, indent=1)
    plot(rows, os.path.join(args.out, "dd_vs_cc.png"))


if __name__ == "__main__":
    main()
