"""Throughput of LaCT vs the baseline transformer vs sequence length, with FLOP utilisation.

    python scripts/bench_lact.py [--lengths 512 1024 2048 4096] [--d-model 256] [--layers 2]

Both LMs have the same width, depth, heads and MLP; LaCT uses a window and chunk of `--chunk`
tokens (the released configs use window = chunk = 2048). For each length it times the jitted
forward and forward+backward (loss = mean log-softmax of the logits, gradient wrt all parameters),
counts the model FLOPs with XLA's cost analysis (the LaCT chunk scan is lowered unrolled for the
count, because a rolled loop body is counted once) and divides the achieved FLOP/s by that of a
large matmul measured in the same process. Everything printed is a ratio or a measurement from
this run; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.bench import matmul_flops, time_fn
from zoo.models import registry


def _functions(model: nnx.Module):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def forward(params, tokens):
        return nnx.merge(graphdef, params, rest)(tokens)

    def loss(params, tokens):
        return -jnp.mean(jax.nn.log_softmax(forward(params, tokens)))

    return params, forward, jax.grad(loss)


def _flops(fn, *args) -> float:
    return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])


def bench(name: str, overrides: dict, count_overrides: dict, t: int, batch: int, reps: int) -> dict:
    model = registry.create_model(name, "tiny", **overrides)
    params, fwd, grad = _functions(model)
    tokens = jax.random.randint(jax.random.key(0), (batch, t), 0, model.config.vocab_size)
    counted = registry.create_model(name, "tiny", **overrides, **count_overrides)
    cparams, cfwd, cgrad = _functions(counted)
    out = {}
    for mode, fn, cfn in (("fwd", fwd, cfwd), ("fwd+bwd", grad, cgrad)):
        seconds = time_fn(jax.jit(fn), params, tokens, reps=reps, warmup=1)
        out[mode] = dict(seconds=seconds, tokens_per_s=batch * t / seconds, flops=_flops(cfn, cparams, tokens))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lact-heads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--matmul", type=int, default=1024, help="size of the reference square matmul")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="", help="also write the rows to DIR/results.json")
    ap.add_argument("--seed", type=int, default=0, help="parameter seed (the timing does not depend on it)")
    args = ap.parse_args(argv)

    shared = dict(
        d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, d_ff=3 * args.d_model, dtype=args.dtype
    )
    models = {
        "transformer": (dict(shared, n_kv_heads=args.heads, seed=args.seed), {}),
        "lact": (
            dict(shared, n_lact_heads=args.lact_heads, window=args.chunk, chunk_size=args.chunk, seed=args.seed),
            dict(scan_unroll=True),
        ),
    }
    peak = matmul_flops(jnp.float32, n=args.matmul, reps=args.reps)
    print(f"backend {jax.default_backend()}; reference matmul {args.matmul}^3 fp32: {peak / 1e9:.1f} GFLOP/s")
    print(
        f"models: d_model {args.d_model}, {args.layers} layers, {args.heads} heads, d_ff {3 * args.d_model}, "
        f"batch {args.batch}, {args.dtype}; LaCT: {args.lact_heads} fast-weight heads, window = chunk = "
        f"{args.chunk}, Muon + momentum\n"
    )
    rows = []
    for t in args.lengths:
        res = {name: bench(name, o, c, t, args.batch, args.reps) for name, (o, c) in models.items()}
        for mode in ("fwd", "fwd+bwd"):
            tr, la = res["transformer"][mode], res["lact"][mode]
            util = {k: r["flops"] / r["seconds"] / peak for k, r in (("transformer", tr), ("lact", la))}
            rows.append(
                (
                    t,
                    mode,
                    tr["tokens_per_s"],
                    la["tokens_per_s"],
                    la["tokens_per_s"] / tr["tokens_per_s"],
                    tr["flops"] / (args.batch * t) / 1e6,
                    la["flops"] / (args.batch * t) / 1e6,
                    util["transformer"],
                    util["lact"],
                )
            )
            print(f"T={t:6d} {mode:8s} done", flush=True)
    print()
    print(
        "| T | pass | transformer tok/s | LaCT tok/s | LaCT / transformer | transformer MFLOP/tok | "
        "LaCT MFLOP/tok | transformer util | LaCT util |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for t, mode, tt, lt, ratio, tf, lf, tu, lu in rows:
        print(f"| {t} | {mode} | {tt:,.0f} | {lt:,.0f} | {ratio:.2f} | {tf:.1f} | {lf:.1f} | {tu:.2f} | {lu:.2f} |")
    print("\nutil = (XLA-counted model FLOPs / time) / (reference matmul FLOP/s measured above)")
    if args.out:
        keys = ("length", "pass", "transformer_tok_s", "lact_tok_s", "ratio", "transformer_mflop_per_tok")
        keys += ("lact_mflop_per_tok", "transformer_util", "lact_util")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"args": vars(args), "matmul_flops_per_s": peak, "rows": [dict(zip(keys, r)) for r in rows]}, f)


if __name__ == "__main__":
    main()
