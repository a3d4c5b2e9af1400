"""State collapse of Mamba-2 beyond its training length, and the training-free Stuffed-Mamba fixes.

    python scripts/stuffed_mamba.py --workdir runs/stuffed_mamba [--steps 3000 --train_len 128 --loss answer]
    python scripts/stuffed_mamba.py --workdir runs/stuffed_mamba --run runs/mamba2   # a `zoo train` run
    python scripts/stuffed_mamba.py --workdir runs/sm-130m --pretrained models/mamba2-130m --train_len 2048

1. Trains the tiny Mamba-2 (`mamba2:tiny`) on passkey retrieval at a short length with
   the zoo's trainer (reuses the checkpoint when the work directory already has one). `--loss answer`
   (default) puts the loss on the 5 answer digits only: this is what makes the tiny model learn
   retrieval (with the loss on every token it stays at chance). `--loss full` trains on every token,
   so that the next-token loss by position is meaningful.
2. Evaluates it at 1, 4, 8 and 16x the training length, without and with each mitigation of
   `zoo/models/mamba2.py` (set on the trained model with `set_inference_options`): passkey exact
   match and answer loss (random depths) and exact match with the needle as the last sentence
   before the question (depth 1) at every length, and with `--loss full` also the
   next-token loss by position at the longest length. `--run DIR` skips training and evaluates the
   Mamba-2 checkpoint of an existing `zoo train` work directory (its training length and loss).
3. Writes `stuffed_mamba.png` (passkey accuracy vs length, and loss by position or answer loss vs
   length), `state_norms.png` (the diagnostic: per-layer, per-head state norm vs position) and
   `stuffed_mamba.json`, and prints a markdown table.
Runtime on 2 idle CPU cores: ~8 min of training (3000 steps), ~3 min of evaluation.

`--pretrained DIR` runs the paper's measurement on a released checkpoint converted into a model
directory (`zoo convert --from mamba_ssm state-spaces/mamba2-130m --out DIR`; its tokenizer travels
with it, or give `--tokenizer`): `--train_len` is the checkpoint's training length (2048 for the
state-spaces mamba2 models). On real text (`--text DIR`, default the Python standard library's
source) it records the state norms up to the longest length and, for the original model and each
mitigation (`--mitigations` picks some by name), the next-token loss by position at the longest
length, the loss within the training length, and passkey retrieval (the same template in the
model's tokens, scored by greedy generation) at every length, with the needle at a random depth and
as the last sentence. The state-norm caps and windows are calibrated at the training length.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from zoo.checkpoint import load_model  # noqa: E402
from zoo.config import apply_overrides, load_config  # noqa: E402
from zoo.data.pipeline import example_source  # noqa: E402
from zoo.eval import longcontext  # noqa: E402
from zoo.eval.plots import plain_log_ticks  # noqa: E402
from zoo.models.mamba2 import calibrate_state_norm, state_norm_trace  # noqa: E402
from zoo.train.trainer import train  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # pretrained_tasks beside this script
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = dict(
    b_scale=1.0, b_clip=0.0, dt_scale=1.0, dt_offset=0.0, a_scale=1.0, a_offset=0.0, state_norm_thresholds=(), window=0
)


def run_config(args):
    overrides = [
        f"--config.data.seq_len={args.train_len}",
        f"--config.data.batch_size={args.batch}",
        f"--config.train.steps={args.steps}",
        "--config.train.log_every=50",
        f"--config.train.checkpoint_every={args.steps}",
        "--config.optim.warmup_steps=50",
        f"--config.data.answer_only={args.loss == 'answer'}",
        f"--config.train.seed={args.seed}",
        f"--config.data.seed={args.seed}",
    ]
    return apply_overrides(load_config("mamba2:tiny"), overrides)


def mitigations(model, calib_tokens, train_len: int, chunk: int) -> dict[str, dict]:
    """The inference options compared, name -> config fields (state-norm thresholds calibrated on
    `calib_tokens` [B, train_len])."""
    model.set_inference_options(**DEFAULTS, state_norm_chunk=chunk)
    thr = calibrate_state_norm(model, jnp.asarray(calib_tokens), multiplier=1.0)
    return {
        "original": {},
        "M1: B x0.5 (remember less)": dict(b_scale=0.5),
        "M1: A x2 (forget more)": dict(a_scale=2.0),
        "M1: A x4, B x0.7": dict(a_scale=4.0, b_scale=0.7),
        f"M2: state-norm cap (chunk {chunk})": dict(state_norm_thresholds=thr),
        f"M3: window {train_len}": dict(window=train_len),
        f"M3: window {train_len // 2}": dict(window=train_len // 2),
    }


def select(variants: dict, names: str) -> dict:
    """The variants whose names start with one of the comma-separated `names` (all when empty)."""
    if not names:
        return variants
    wanted = [n.strip() for n in names.split(",")]
    chosen = {k: v for k, v in variants.items() if any(k.startswith(w) for w in wanted)}
    if not chosen:
        raise SystemExit(f"error: --mitigations {names!r} matches none of {list(variants)}")
    return chosen


def run_pretrained(args) -> None:
    """The measurement on a converted checkpoint with its tokenizer (see the module docstring)."""
    from pretrained_tasks import load, passkey_exact_match, text_windows, token_losses

    t0 = time.perf_counter()
    model, tok, meta = load(args.pretrained, args.tokenizer)
    if meta["model_name"] not in ("mamba2", "memmamba"):
        raise SystemExit(f"error: {args.pretrained} holds a {meta['model_name']} model; give a Mamba-2 checkpoint")
    train_len = args.train_len
    lengths = [train_len * int(f) for f in args.factors.split(",")]
    longest = lengths[-1]
    model.set_inference_options(**DEFAULTS)
    probe = text_windows(tok, longest, 2, args.text, seed=1)
    pos, norms = state_norm_trace(model, probe, every=max(1, train_len // 8))
    plot_state_norms(pos, norms, train_len, os.path.join(args.workdir, "state_norms.png"))
    calib = text_windows(tok, train_len, 4, args.text, seed=2)
    variants = select(mitigations(model, calib, train_len, chunk=max(1, train_len // 2)), args.mitigations)
    text = text_windows(tok, longest + 1, args.samples, args.text, seed=3)
    rows = {}
    for name, opts in variants.items():
        t1 = time.perf_counter()
        model.set_inference_options(**{**DEFAULTS, **opts})
        losses = token_losses(model, text)  # [samples, longest]
        edges = np.linspace(0, longest, min(32, longest) + 1).astype(int)
        rows[name] = {
            "exact_match": [passkey_exact_match(model, tok, n, None, args.samples, seed=4) for n in lengths],
            "exact_match_recent": [passkey_exact_match(model, tok, n, 1.0, args.samples, seed=5) for n in lengths],
            "position": [float((lo + hi - 1) / 2) for lo, hi in zip(edges[:-1], edges[1:])],
            "loss": [float(losses[:, lo:hi].mean()) for lo, hi in zip(edges[:-1], edges[1:])],
            "loss_train_len": float(losses[:, :train_len].mean()),
        }
        print(f"{name}: exact match {rows[name]['exact_match']} ({time.perf_counter() - t1:.0f}s)", flush=True)
    with open(os.path.join(args.workdir, "stuffed_mamba.json"), "w") as f:
        json.dump(
            {
                "pretrained": os.path.abspath(args.pretrained),
                "source": meta.get("source", {}).get("path"),
                "tokenizer": tok.spec(),
                "lengths": lengths,
                "train_len": train_len,
                "rows": rows,
                "options": {
                    k: {a: list(b) if isinstance(b, tuple) else b for a, b in v.items()} for k, v in variants.items()
                },
            },
            f,
            indent=1,
        )
    plot_results(rows, lengths, train_len, os.path.join(args.workdir, "stuffed_mamba.png"))
    print(markdown_table(rows, lengths, train_len))
    print(f"total {time.perf_counter() - t0:.0f}s; figures in {args.workdir}")


def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="runs/stuffed_mamba")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument(
        "--loss",
        choices=("answer", "full"),
        default="answer",
        help="train on the answer digits only, or on every next token",
    )
    parser.add_argument("--train_len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--factors", default="1,4,8,16")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="training and data seed of the trained model")
    parser.add_argument("--run", default="", help="evaluate this `zoo train` work directory instead of training")
    parser.add_argument("--pretrained", default="", help="a converted Mamba-2 model directory (zoo convert)")
    parser.add_argument("--tokenizer", default="", help="--pretrained: a tokenizer instead of the directory's")
    parser.add_argument("--text", default="", help="--pretrained: a folder of text files (default: the stdlib)")
    parser.add_argument("--mitigations", default="", help="only these variants, by name prefix: original,M1,M3")
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    if args.pretrained:
        return run_pretrained(args)

    t0 = time.perf_counter()
    if args.run:
        model, config = load_model(args.run)
        if config.model_name != "mamba2" or config.data.source != "passkey":
            raise SystemExit(
                f"error: --run {args.run} holds a {config.model_name!r} model trained on "
                f"{config.data.source!r}; give a mamba2 run trained on passkey"
            )
    else:
        ckpt_dir = os.path.join(args.workdir, "run")
        result = train(run_config(args), ckpt_dir, progress=False)
        print(
            f"trained {result['step']} steps at length {args.train_len} in {time.perf_counter() - t0:.0f}s: "
            f"{result.get('train', {})}",
            flush=True,
        )
        model, config = load_model(ckpt_dir)
    data = config.data
    args.train_len, args.loss = data.seq_len, "answer" if data.answer_only else "full"
    lengths = [args.train_len * int(f) for f in args.factors.split(",")]
    longest = lengths[-1]

    # The diagnostic on the original model: state norm vs position at the longest length.
    probe = jnp.asarray(next(longcontext._batches(example_source(data, "validation", longest), 4, 4))["inputs"])
    model.set_inference_options(**DEFAULTS)
    pos, norms = state_norm_trace(model, probe, every=max(1, args.train_len // 8))
    plot_state_norms(pos, norms, args.train_len, os.path.join(args.workdir, "state_norms.png"))

    calib = next(longcontext._batches(example_source(data, "train", args.train_len), 16, 16))["inputs"]
    variants = select(mitigations(model, calib, args.train_len, max(1, args.train_len // 2)), args.mitigations)
    rows = {}
    for name, opts in variants.items():
        t1 = time.perf_counter()
        model.set_inference_options(**{**DEFAULTS, **opts})
        acc = longcontext.answer_accuracy_by_length(model, data, lengths, args.samples, 16)
        # The needle as the last sentence before the question: retrieval over the training-length
        # distance, so a failure here is the long prefix spoiling the state, not forgetting.
        recent = longcontext.passkey_grid(model, data, lengths, [1.0], args.samples, 16)
        rows[name] = {
            "exact_match": acc["exact_match"],
            "answer_loss": acc["answer_loss"],
            "exact_match_recent": [float(v) for v in np.asarray(recent["exact_match"])[:, 0]],
        }
        if args.loss == "full":
            lbp = longcontext.loss_by_position(model, data, longest, 16, 16, bins=32)
            short = longcontext.loss_by_position(model, data, args.train_len, 16, 16, bins=1)
            rows[name].update(position=lbp["position"], loss=lbp["loss"], loss_train_len=short["loss"][0])
        print(f"{name}: exact match {acc['exact_match']} ({time.perf_counter() - t1:.0f}s)", flush=True)

    with open(os.path.join(args.workdir, "stuffed_mamba.json"), "w") as f:
        json.dump(
            {
                "lengths": lengths,
                "train_len": args.train_len,
                "loss": args.loss,
                "rows": rows,
                "options": {
                    k: {a: list(b) if isinstance(b, tuple) else b for a, b in v.items()} for k, v in variants.items()
                },
            },
            f,
            indent=1,
        )
    plot_results(rows, lengths, args.train_len, os.path.join(args.workdir, "stuffed_mamba.png"))
    print(markdown_table(rows, lengths, args.train_len))
    print(f"total {time.perf_counter() - t0:.0f}s; figures in {args.workdir}")


def _loss_in(row, lo, hi):
    vals = [l for p, l in zip(row["position"], row["loss"]) if lo <= p < hi]
    return float(np.mean(vals)) if vals else float("nan")


def markdown_table(rows: dict, lengths: list[int], train_len: int) -> str:
    longest = lengths[-1]
    full = "loss" in next(iter(rows.values()))
    head = (
        "| inference option | "
        + " | ".join(f"EM @{n} ({n // train_len}x)" for n in lengths)
        + " | "
        + " | ".join(f"EM needle last @{n}" for n in lengths)
        + f" | answer loss @{longest}"
    )
    if full:
        head += (
            f" | loss @{train_len} (1x) | loss @{longest}, pos < {train_len}"
            f" | loss @{longest}, pos {longest // 2}-{longest}"
        )
    lines = [head + " |", "|" + "---|" * (2 * len(lengths) + (5 if full else 2))]
    for name, r in rows.items():
        em = " | ".join(f"{v:.2f}" for v in r["exact_match"] + r["exact_match_recent"])
        line = f"| {name} | {em} | {r['answer_loss'][-1]:.2f}" if "answer_loss" in r else f"| {name} | {em} | -"
        if full:
            line += (
                f" | {r['loss_train_len']:.3f} | {_loss_in(r, 0, train_len):.3f} | "
                f"{_loss_in(r, longest // 2, longest):.3f}"
            )
        lines.append(line + " |")
    return "\n".join(lines)


def plot_results(rows: dict, lengths: list[int], train_len: int, path: str) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    full = "loss" in next(iter(rows.values()))
    for name, r in rows.items():
        if full:
            ax1.plot(r["position"], r["loss"], label=name)
        else:
            ax1.plot(lengths, r["answer_loss"], marker="o", label=name)
        (line,) = ax2.plot(lengths, r["exact_match"], marker="o", label=name)
        ax2.plot(lengths, r["exact_match_recent"], marker="x", ls="--", color=line.get_color())
    for ax in (ax1, ax2):
        ax.axvline(train_len, color="k", ls=":", lw=1)
    if full:
        ax1.set(
            xlabel="position", ylabel="next-token loss (nats)", title=f"loss by position at {lengths[-1]}", yscale="log"
        )
    else:
        ax1.axhline(np.log(10), color="gray", ls="--", lw=1, label="chance (ln 10)")
        ax1.set(
            xlabel="sequence length", ylabel="answer-digit loss (nats)", xscale="log", title="answer loss vs length"
        )
    ax2.set(
        xlabel="sequence length",
        ylabel="passkey exact match",
        xscale="log",
        title="passkey retrieval (solid: random depth, dashed: needle last)",
    )
    ax2.legend(fontsize=7)
    fig.suptitle(f"tiny Mamba-2 trained at {train_len} tokens: state collapse and training-free fixes")
    fig.tight_layout()
    plain_log_ticks(fig)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_state_norms(pos, norms, train_len: int, path: str) -> None:
    """norms [L, B, H, S]: one panel per layer, one line per head (mean over the batch)."""
    n_layers = norms.shape[0]
    fig, axes = plt.subplots(1, n_layers, figsize=(5 * n_layers, 3.8), squeeze=False)
    for i, ax in enumerate(axes[0]):
        for h in range(norms.shape[2]):
            ax.plot(pos, norms[i, :, h].mean(0), lw=1, label=f"head {h}")
        ax.axvline(train_len, color="k", ls=":", lw=1)
        ax.set(xlabel="position", ylabel="||h||_F", title=f"layer {i}", yscale="log")
    axes[0][-1].legend(fontsize=6, ncol=2)
    fig.suptitle("state norm per head vs position (original model)")
    fig.tight_layout()
    plain_log_ticks(fig)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
