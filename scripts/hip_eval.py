"""HiP attention vs dense attention on a pretrained transformer, training-free (HiP, ICLR 2025, Sec. 5).

    zoo convert --from hf meta-llama/Llama-3.2-1B --out models/llama-1b        # weights downloaded by you
    python scripts/hip_eval.py --pretrained models/llama-1b --workdir runs/hip-llama \
        --lengths 1024,2048,4096,8192 [--k_blocks 32 --block_q 64 --block_k 64 --window 512 --sinks 256]
        [--scoring representative|block_max]

The converted checkpoint runs twice on the same inputs: as the dense `transformer` it was converted
to, and as `hip` (`zoo.convert.convert_model`: the same parameters, HiP's hierarchically pruned
attention in every full-attention layer; `dense_below=0`, so HiP runs at every length). At each
length, on windows of real text (`--text DIR`, default the Python standard library's source, in the
checkpoint's own tokens):
- logits: the largest and mean |HiP - dense| difference, and top-1 agreement;
- perplexity of both (next-token loss over every position), and its relative change;
- passkey retrieval (`zoo.data.synthetic`'s template in the model's tokens, scored by greedy
  generation with `zoo.generate`; needle at random depths) for both.
Writes hip_eval.json and hip_eval.png and prints a markdown table. Sizes of HiP's pattern default to
the paper's serving settings (k = 2048 selected keys as 32 blocks of 64, a 512-token window, 256
sinks), which only prune at lengths well beyond 2.8k tokens; pass smaller ones for short contexts.
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
import optax
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # pretrained_tasks beside this script
from pretrained_tasks import load, passkey_exact_match, text_windows  # noqa: E402

from zoo.convert import convert_model  # noqa: E402
from zoo.eval.plots import plain_log_ticks  # noqa: E402


@nnx.jit
def _compare(dense, hip, tokens):
    """Per-position losses of both models, top-1 agreement and |logit difference| stats (on device)."""
    a, b = dense(tokens[:, :-1]), hip(tokens[:, :-1])  # [B, T, V]
    ce = lambda x: optax.softmax_cross_entropy_with_integer_labels(x, tokens[:, 1:])  # noqa: E731
    diff = jnp.abs(a - b)
    return ce(a), ce(b), a.argmax(-1) == b.argmax(-1), diff.max(-1), diff.mean(-1)


def measure(dense, hip, tokens: np.ndarray) -> dict[str, float]:
    """Logit, agreement and perplexity comparison on tokens [rows, T + 1], one row at a time."""
    parts = [[np.asarray(x) for x in _compare(dense, hip, tokens[i : i + 1])] for i in range(len(tokens))]
    ce_d, ce_h, agree, dmax, dmean = (np.concatenate(p) for p in zip(*parts))
    return {
        "max_abs_logit_diff": float(dmax.max()),
        "mean_abs_logit_diff": float(dmean.mean()),
        "top1_agreement": float(agree.mean()),
        "ppl_dense": float(np.exp(ce_d.mean())),
        "ppl_hip": float(np.exp(ce_h.mean())),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrained", required=True, help="a converted transformer model directory (zoo convert)")
    parser.add_argument("--workdir", default="runs/hip_eval")
    parser.add_argument("--tokenizer", default="", help="a tokenizer instead of the directory's (bytes, a file)")
    parser.add_argument("--text", default="", help="a folder of text files (default: the stdlib source)")
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--samples", type=int, default=4, help="text windows and passkey prompts per length")
    parser.add_argument("--no-passkey", action="store_true", help="skip the passkey retrieval")
    parser.add_argument("--k_blocks", type=int, default=32)
    parser.add_argument("--block_q", type=int, default=64)
    parser.add_argument("--block_k", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--sinks", type=int, default=256)
    parser.add_argument(
        "--scoring", default="representative", help="the search's branch scoring: representative or block_max"
    )
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    t0 = time.perf_counter()
    dense, tok, meta = load(args.pretrained, args.tokenizer)
    if meta["model_name"] != "transformer":
        raise SystemExit(f"error: {args.pretrained} holds a {meta['model_name']} model; give a converted transformer")
    settings = dict(
        k_blocks=args.k_blocks,
        block_q=args.block_q,
        block_k=args.block_k,
        window=args.window,
        sinks=args.sinks,
        dense_below=0,
        scoring=args.scoring,
    )
    if any(s.kind != "full" for s in dense.config.layer_specs()):
        settings.pop("window")  # sliding-window layers keep theirs (HiP's window is the same field)
    hip = convert_model(dense, "hip", **settings)
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for length in lengths:
        t1 = time.perf_counter()
        row = {"length": length, **measure(dense, hip, text_windows(tok, length + 1, args.samples, args.text, seed=7))}
        if not args.no_passkey:
            row["passkey_dense"] = passkey_exact_match(dense, tok, length, None, args.samples, seed=8)
            row["passkey_hip"] = passkey_exact_match(hip, tok, length, None, args.samples, seed=8)
        rows.append(row)
        print(json.dumps(row), f"({time.perf_counter() - t1:.0f}s)", flush=True)
    result = {
        "pretrained": os.path.abspath(args.pretrained),
        "source": meta.get("source", {}).get("path"),
        "hip": settings,
        "samples": args.samples,
        "rows": rows,
    }
    with open(os.path.join(args.workdir, "hip_eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, os.path.join(args.workdir, "hip_eval.png"))
    print(markdown_table(rows))
    print(f"total {time.perf_counter() - t0:.0f}s; results in {args.workdir}")


def markdown_table(rows: list[dict]) -> str:
    passkey = "passkey_dense" in rows[0]
    head = "| length | max abs logit diff | mean abs logit diff | top-1 agreement | ppl dense | ppl HiP | ppl change |"
    head += " passkey dense | passkey HiP |" if passkey else ""
    lines = [head, "|" + "---|" * (9 if passkey else 7)]
    for r in rows:
        line = (
            f"| {r['length']} | {r['max_abs_logit_diff']:.3g} | {r['mean_abs_logit_diff']:.3g} | "
            f"{r['top1_agreement']:.3f} | {r['ppl_dense']:.3f} | {r['ppl_hip']:.3f} | "
            f"{100 * (r['ppl_hip'] / r['ppl_dense'] - 1):+.2f}% |"
        )
        if passkey:
            line += f" {r['passkey_dense']:.2f} | {r['passkey_hip']:.2f} |"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    lengths = [r["length"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(lengths, [r["ppl_dense"] for r in rows], marker="o", label="dense")
    ax1.plot(lengths, [r["ppl_hip"] for r in rows], marker="x", label="HiP")
    ax1.set(xlabel="context length", ylabel="perplexity", xscale="log", title="perplexity on text")
    ax1.legend()
    if "passkey_dense" in rows[0]:
        ax2.plot(lengths, [r["passkey_dense"] for r in rows], marker="o", label="dense")
        ax2.plot(lengths, [r["passkey_hip"] for r in rows], marker="x", label="HiP")
        ax2.set(xlabel="context length", ylabel="passkey exact match", xscale="log", ylim=(-0.05, 1.05))
        ax2.legend()
    ax2.set_title("passkey retrieval")
    fig.suptitle("HiP (training-free) vs dense attention on a pretrained transformer")
    fig.tight_layout()
    plain_log_ticks(fig)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
