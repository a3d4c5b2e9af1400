"""Dataset decomposition vs concat-and-chunk at equal tokens per step: attention FLOPs and step time.

    .venv/bin/python scripts/bench_decomposition.py [--out DIR]   # CPU defaults, ~1 min
    .venv/bin/python scripts/bench_decomposition.py --max-log2 11 --tokens-per-step 8192

A tiny pre-norm causal self-attention block (pure JAX: LayerNorm, QKV, dense causal softmax
attention in fp32, output projection, GELU MLP) is trained for one step (loss + gradients) on
batches of shape ``[B_k, 2^k]`` with ``B_k 2^k = tokens_per_step`` for every bucket ``k``; the
concat-and-chunk (C&C) baseline at the same maximum length is the shape ``[B_max, 2^max]``. Each
shape is compiled once (``jit(...).lower(...).compile()``); step times are medians of ``--repeats``
runs measured in this process and printed as ratios to C&C. Per-step costs are averaged over
buckets with the step shares of a synthetic corpus (log-normal document lengths) decomposed by
:mod:`zoo.data.decomposition`: once for one pass over the data (also the composition of every
cycle of the original pow-2 curriculum, whose odds only order the steps within a cycle) and once
for pow-2 odds that also scale the mix (``exhaust=False``, short buckets 2^(max-k) times as often).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from zoo.bench import time_fn
from zoo.data.decomposition import BucketIndex, decomposition_stats, format_stats
from zoo.data.schedule import BucketSchedule


def init_block(key: jax.Array, d_model: int) -> dict[str, jax.Array]:
    """Parameters of one pre-norm attention + MLP block (fp32)."""
    k1, k2, k3, k4 = jax.random.split(key, 4)
    s = 1.0 / math.sqrt(d_model)
    return {
        "ln1": jnp.ones(d_model),
        "wqkv": jax.random.normal(k1, (d_model, 3 * d_model)) * s,
        "wo": jax.random.normal(k2, (d_model, d_model)) * s,
        "ln2": jnp.ones(d_model),
        "w1": jax.random.normal(k3, (d_model, 4 * d_model)) * s,
        "w2": jax.random.normal(k4, (4 * d_model, d_model)) * s / 2,
    }


def _norm(x: jax.Array, g: jax.Array) -> jax.Array:
    x = x - x.mean(-1, keepdims=True)
    return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-6) * g


def block(params: dict[str, jax.Array], x_BxTxD: jax.Array, num_heads: int) -> jax.Array:
    """x + Attn(LN(x)) then + MLP(LN(.)); dense causal attention within each row (one document)."""
    b, t, d = x_BxTxD.shape
    p = d // num_heads
    qkv = _norm(x_BxTxD, params["ln1"]) @ params["wqkv"]  # [B,T,3D]
    q, k, v = jnp.split(qkv.reshape(b, t, 3, num_heads, p), 3, axis=2)
    q, k, v = (a[:, :, 0] for a in (q, k, v))  # [B,T,H,P]
    s_BxHxTxT = jnp.einsum("bqhp,bkhp->bhqk", q, k) / math.sqrt(p)
    causal = jnp.tril(jnp.ones((t, t), bool))
    s_BxHxTxT = jnp.where(causal, s_BxHxTxT, -1e30)
    o = jnp.einsum("bhqk,bkhp->bqhp", jax.nn.softmax(s_BxHxTxT, axis=-1), v).reshape(b, t, d)  # [B,T,D]
    x_BxTxD = x_BxTxD + o @ params["wo"]
    h = jax.nn.gelu(_norm(x_BxTxD, params["ln2"]) @ params["w1"])  # [B,T,4D]
    return x_BxTxD + h @ params["w2"]


def analytic_flops(batch: int, length: int, d_model: int) -> tuple[float, float]:
    """(attention, total) FLOPs of one training step (forward + backward = 3x forward).

    Attention: QK^T and PV, 2 B T^2 D each (dense, as computed). Projections + MLP: 24 D^2 per token.
    """
    attn = 3 * 4.0 * batch * length**2 * d_model
    dense = 3 * 24.0 * batch * length * d_model**2
    return attn, attn + dense


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--min-log2", type=int, default=5)
    ap.add_argument("--max-log2", type=int, default=10)
    ap.add_argument("--tokens-per-step", type=int, default=4096)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--documents", type=int, default=20000)
    ap.add_argument("--mean-log-length", type=float, default=6.0, help="mu of log-normal doc lengths")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="also write the rows and means to DIR/results.json")
    args = ap.parse_args(argv)

    # Synthetic corpus: log-normal document lengths (many short documents, a long tail).
    rng = np.random.default_rng(args.seed)
    lengths = np.maximum(1, rng.lognormal(args.mean_log_length, 1.2, args.documents).astype(np.int64))
    index = BucketIndex.from_lengths(lengths, min_log2=args.min_log2, max_log2=args.max_log2, seed=args.seed)
    sched = BucketSchedule(index.ks, args.tokens_per_step, "pow2", args.seed, availability=index.tokens_per_bucket())
    iid = BucketSchedule(
        index.ks, args.tokens_per_step, "pow2", args.seed, availability=index.tokens_per_bucket(), exhaust=False
    )
    data_stats = decomposition_stats(index, tokens_per_step=args.tokens_per_step)
    iid_stats = decomposition_stats(index, schedule=iid)
    print(format_stats(data_stats))
    print()

    params = init_block(jax.random.key(args.seed), args.d_model)

    def loss(p, x):
        return jnp.mean(block(p, x, args.heads) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    rows = {}
    for k in index.ks:
        b, t = sched.batch_size(k), 1 << k
        x = jax.random.normal(jax.random.key(k), (b, t, args.d_model))
        t0 = time.perf_counter()
        compiled = step.lower(params, x).compile()  # one compile per bucket shape
        compile_s = time.perf_counter() - t0
        seconds = time_fn(compiled, params, x, reps=args.repeats, warmup=1)
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla_flops = float(cost.get("flops", float("nan"))) if cost else float("nan")
        attn, total = analytic_flops(b, t, args.d_model)
        rows[k] = dict(b=b, t=t, time=seconds, attn=attn, total=total, xla=xla_flops, compile=compile_s)

    cc = rows[index.max_log2]  # concat-and-chunk at the same max length has the longest bucket's shape
    print(
        f"per-step ratios to concat-and-chunk [B={cc['b']}, T={cc['t']}] at {args.tokens_per_step} tokens/step "
        f"(d_model={args.d_model}, heads={args.heads}, fwd+bwd, median of {args.repeats}, "
        f"{jax.devices()[0].platform})"
    )
    print(
        f"{'bucket':>7} {'shape':>12} {'attn GFLOP':>11} {'attn/C&C':>9} {'total/C&C':>10} {'XLA/C&C':>8} "
        f"{'step ms':>8} {'time/C&C':>9} {'compile s':>10}"
    )
    for k, r in rows.items():
        print(
            f"{'D_' + str(k):>7} {str((r['b'], r['t'])):>12} {r['attn'] / 1e9:>11.3f} {r['attn'] / cc['attn']:>9.4f} "
            f"{r['total'] / cc['total']:>10.4f} {r['xla'] / cc['xla']:>8.4f} {1e3 * r['time']:>8.2f} "
            f"{r['time'] / cc['time']:>9.3f} {r['compile']:>10.2f}"
        )

    passes = (
        ("one pass over the data = pow2 cycle with exhaustion", data_stats),
        ("pow2 odds scaling the mix, exhaust=False", iid_stats),
    )
    means = {}
    for name, st in passes:
        shares = {b.k: b.step_share for b in st.buckets}
        mean = {f: sum(shares[k] * rows[k][f] for k in rows) / cc[f] for f in ("attn", "total", "time")}
        means[name] = mean
        print(
            f"mean step vs C&C ({name}): attention FLOPs {mean['attn']:.4f}, total FLOPs {mean['total']:.4f}, "
            f"step time {mean['time']:.3f} (speed-up {1 / mean['time']:.2f}x)"
        )

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"args": vars(args), "rows": {str(k): r for k, r in rows.items()}, "means": means}, f, indent=1)


if __name__ == "__main__":
    main()
