"""MASFormer at small scale: long-range recall needs full attention, but only in a few layers.

    python scripts/masformer_recall.py [--schedules "all-full,all-window,1 full (layer 1)"] [--steps 500] [--out DIR]

Trains the same 4-layer model (d=32, 2 heads) from scratch with several attention schedules on multi-query
associative recall (`zoo.data.synthetic.AssociativeRecall`: 4 key-value pairs at the start of a
`seq_len`-token sequence, noise, then the 4 keys queried at the end), where every answer lies
~seq_len tokens back: far outside a `window`-token sliding window, and outside the 4 * window
receptive field of four stacked window layers. Reports the answer accuracy on held-out sequences
and the attention FLOPs of each schedule relative to all-full (`transformer.attention_flops`), and
writes results.json and recall.png to --out. About 4 CPU-minutes per schedule (0.45 s/step);
schedules can run as parallel processes (one --schedules each) and be reported together with --merge.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zoo.data.synthetic import AssociativeRecall
from zoo.models import registry
from zoo.models.masformer import parse_schedule
from zoo.models.transformer import attention_flops

SCHEDULES = {
    "all-full": "full*4",
    "all-window": "window*4",
    "1 full (layer 1)": "window,full,window*2",
    "1 full (layer 0)": "full,window*3",
    "1 full (layer 3)": "window*3,full",
    "2 full (layers 1+3)": "window,full,window,full",
}


def batches(task: AssociativeRecall, batch_size: int, start: int):
    i = start
    while True:
        items = [task[j] for j in range(i, i + batch_size)]
        i += batch_size
        tokens = np.stack([it["tokens"] for it in items])
        yield {
            "inputs": jnp.asarray(tokens[:, :-1]),
            "targets": jnp.asarray(tokens[:, 1:]),
            "mask": jnp.asarray(np.stack([it["answer_mask"] for it in items])),
        }


def run(schedule: str, args) -> dict:
    kinds = parse_schedule(schedule, args.layers)
    cfg = registry.get_model_config(
        "masformer",
        "tiny",
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=2,
        n_kv_heads=2,
        d_ff=2 * args.d_model,
        window=args.window,
        block=args.window,
        layer_attention=kinds,
        sparse_from=10**9,
    )
    model = registry.model_class("masformer")(cfg, rngs=nnx.Rngs(args.seed))
    sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, 50, args.steps, args.lr * 0.1)
    opt = nnx.Optimizer(model, optax.adamw(sched, b2=0.98, weight_decay=0.0), wrt=nnx.Param)

    def loss_fn(m, batch):
        logits = m(batch["inputs"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(ce * batch["mask"]) / jnp.sum(batch["mask"])

    @nnx.jit
    def step(m, opt, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(m, batch)
        opt.update(m, grads)
        return loss

    @nnx.jit
    def correct(m, batch):
        hit = (jnp.argmax(m(batch["inputs"]), -1) == batch["targets"]) * batch["mask"]
        return jnp.sum(hit), jnp.sum(batch["mask"])

    train = AssociativeRecall(args.seq_len, args.pairs, args.pairs, seed=args.seed)
    valid = AssociativeRecall(args.seq_len, args.pairs, args.pairs, seed=args.seed + 1_000_003)
    it = batches(train, args.batch_size, 0)
    t0 = time.perf_counter()
    curve = []
    for s in range(1, args.steps + 1):
        loss = step(model, opt, next(it))
        if s % 100 == 0 or s == args.steps:
            curve.append((s, float(loss)))
            print(f"  {s:5d} steps  loss {curve[-1][1]:.3f}  {time.perf_counter() - t0:.0f}s", flush=True)
    train_s = time.perf_counter() - t0
    hits = total = 0.0
    vit = batches(valid, 64, 0)
    for _ in range(args.eval_examples // 64):
        h, n = correct(model, next(vit))
        hits, total = hits + float(h), total + float(n)
    flops = attention_flops(cfg, args.seq_len)
    return {
        "schedule": list(kinds),
        "accuracy": hits / total,
        "final_loss": curve[-1][1],
        "curve": curve,
        "attention_flops": flops["total"],
        "flops_ratio": flops["ratio"],
        "train_seconds": train_s,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=8e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-examples", type=int, default=512)
    p.add_argument("--schedules", default=",".join(SCHEDULES), help="comma list of names from SCHEDULES")
    p.add_argument("--out", default="runs/masformer_recall")
    p.add_argument("--merge", default="", help="comma list of --out dirs of earlier (parallel) runs to report together")
    args = p.parse_args(argv)
    if args.merge:
        results = {}
        for d in args.merge.split(","):
            with open(os.path.join(d, "results.json")) as f:
                saved = json.load(f)
            results.update(saved["results"])
            for k, v in saved["args"].items():
                if k not in ("merge", "out", "schedules"):
                    setattr(args, k, v)
        os.makedirs(args.out, exist_ok=True)
        return report(results, args)
    names = [n.strip() for n in args.schedules.split(",")] if args.schedules != ",".join(SCHEDULES) else list(SCHEDULES)
    unknown = [n for n in names if n not in SCHEDULES]
    if unknown:
        raise SystemExit(f"unknown schedule(s) {unknown}; choose from {list(SCHEDULES)}")
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for name in names:
        results[name] = run(SCHEDULES[name], args)
        r = results[name]
        print(
            f"{name:22s} acc {r['accuracy']:.3f}  loss {r['final_loss']:.3f}  "
            f"attn FLOPs {100 * r['flops_ratio']:5.1f}% of all-full  ({r['train_seconds']:.0f}s)",
            flush=True,
        )
    report(results, args)


def report(results: dict, args) -> None:
    chance = 1 / 64
    full, local = results.get("all-full"), results.get("all-window")
    print("\n| schedule | layers | answer accuracy | attention FLOPs vs all-full |\n|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {' '.join(k[0].upper() for k in r['schedule'])} | {r['accuracy']:.3f} | "
            f"{100 * r['flops_ratio']:.1f}% |"
        )
    if full and local:
        gap = full["accuracy"] - local["accuracy"]
        for name, r in results.items():
            if name not in ("all-full", "all-window") and gap > 0:
                print(
                    f"{name}: recovers {100 * (r['accuracy'] - local['accuracy']) / gap:.0f}% of the "
                    f"all-window -> all-full gap"
                )
    print(f"(chance = {chance:.3f}; T = {args.seq_len}, window = {args.window}, {args.steps} steps)")
    meta = {k: v for k, v in vars(args).items()}
    order = [n for n in SCHEDULES if n in results]
    results = {n: results[n] for n in order}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": meta, "results": results}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ax.scatter(100 * r["flops_ratio"], r["accuracy"], s=50)
        ax.annotate(
            name, (100 * r["flops_ratio"], r["accuracy"]), textcoords="offset points", xytext=(5, 5), fontsize=8
        )
    ax.axhline(chance, color="gray", ls=":", label="chance")
    ax.set_xlabel("attention FLOPs, % of all-full")
    ax.set_ylabel("recall answer accuracy")
    ax.set_title(f"MASFormer schedules on associative recall (T={args.seq_len}, window {args.window})")
    ax.set_ylim(-0.02, 1.05)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "recall.png"), dpi=120)
    print(f"wrote {args.out}/results.json and recall.png")


if __name__ == "__main__":
    main()
