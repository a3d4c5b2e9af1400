"""Train a tiny S4 classifier on locally generated LRA ListOps and compare with the majority class.

    .venv/bin/python scripts/listops_s4.py [--minutes 2 | --steps N] [--mode dplr|diag] [--seed 0] [--out DIR]

A self-contained loop (optax AdamW; the SSM parameters, tagged `lr_group="ssm"`, get their own
learning rate and no weight decay, as in the S4 papers). Prints the test accuracy and the
majority-class baseline measured on the same test set; with --out, also writes them to DIR/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zoo.data.listops import NUM_CLASSES, VOCAB_SIZE, ListOpsSource
from zoo.models.s4 import S4Classifier, S4Config


def _labels(params) -> object:
    """optax.multi_transform labels from the parameter metadata: ssm | no_wd | default."""

    def label(p):
        meta = p.get_metadata()
        if meta.get("lr_group") == "ssm":
            return "ssm"
        return "no_wd" if meta.get("wd", True) is False or p[...].ndim < 2 else "default"

    return jax.tree.map(label, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--steps", type=int, default=0, help="train this many steps instead of --minutes")
    ap.add_argument("--out", default="", help="write results.json to this directory")
    ap.add_argument("--mode", default="dplr", choices=["dplr", "diag"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--test", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--ssm-lr", type=float, default=1e-3)
    args = ap.parse_args(argv)

    max_len = 128
    train = ListOpsSource(args.train, seed=args.seed, max_length=max_len)
    test = ListOpsSource(args.test, seed=args.seed + 10_000, max_length=max_len)
    t0 = time.time()
    xtr, mtr, ytr = train.arrays()
    xte, mte, yte = test.arrays()
    print(
        f"data: {len(ytr)} train / {len(yte)} test, max_len {max_len}, mean len {mtr.sum(1).mean():.1f} "
        f"({time.time() - t0:.1f}s)"
    )

    cfg = S4Config(
        vocab_size=VOCAB_SIZE,
        d_model=64,
        n_layers=2,
        d_state=16,
        l_max=max_len,
        mode=args.mode,
        init="legs" if args.mode == "dplr" else "lin",
        bidirectional=True,
        n_classes=NUM_CLASSES,
    )
    model = S4Classifier(cfg, rngs=nnx.Rngs(args.seed))
    graphdef, params = nnx.split(model, nnx.Param)
    total_steps = 100_000
    sched = lambda lr: optax.warmup_cosine_decay_schedule(0.0, lr, 100, total_steps, lr * 0.1)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.multi_transform(
            {
                "default": optax.adamw(sched(args.lr), weight_decay=0.05),
                "no_wd": optax.adamw(sched(args.lr), weight_decay=0.0),
                "ssm": optax.adam(sched(args.ssm_lr)),
            },
            _labels(params),
        ),
    )
    pure = lambda p: jax.tree.map(lambda v: v[...], p, is_leaf=lambda x: isinstance(x, nnx.Variable))
    params = pure(params)
    opt_state = tx.init(params)

    def loss_fn(p, x, m, y):
        logits = nnx.merge(graphdef, p)(x, m)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(p, s, x, m, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, m, y)
        upd, s = tx.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    @jax.jit
    def predict(p, x, m):
        return jnp.argmax(nnx.merge(graphdef, p)(x, m), -1)

    def accuracy(p) -> float:
        preds = np.concatenate(
            [np.asarray(predict(p, xte[i : i + 250], mte[i : i + 250])) for i in range(0, len(yte), 250)]
        )
        return float(np.mean(preds == yte))

    rng = np.random.default_rng(args.seed)
    start, step, losses = time.time(), 0, []
    while (step < args.steps) if args.steps else (time.time() - start < args.minutes * 60):
        idx = rng.integers(0, len(ytr), args.batch)
        params, opt_state, loss = train_step(params, opt_state, xtr[idx], mtr[idx], ytr[idx])
        losses.append(float(loss))
        step += 1
        if step % 200 == 0:
            print(f"step {step:5d}  loss {np.mean(losses[-200:]):.3f}  {time.time() - start:.0f}s", flush=True)
    majority = np.bincount(ytr, minlength=NUM_CLASSES).argmax()
    base = float(np.mean(yte == majority))
    acc = accuracy(params)
    print(
        f"S4 ({args.mode}) after {step} steps ({time.time() - start:.0f}s): test accuracy {acc:.3f}; "
        f"majority-class baseline (class {majority}) {base:.3f}; chance 0.100"
    )
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        result = dict(accuracy=acc, majority=base, steps=step, train_seconds=time.time() - start, args=vars(args))
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
