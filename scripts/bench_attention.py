"""Benchmark sparse attention and HiP against dense attention as the length grows.

    .venv/bin/python scripts/bench_attention.py [--lengths 512 1024 2048 4096 8192] \
        [--out bench.png]

Section 1 (pattern): forward time of `sparse_attention` with a fixed pattern (K listed blocks +
window + sinks) against dense causal `jax.nn.dot_product_attention` measured in the same run, with
their ratio. Section 2 (HiP): forward time of the HiP search (`hip_block_indices`) plus
`sparse_attention` on its blocks against dense, fitted log-log slopes (dense ~2, HiP ~1 plus the
log factor) and the crossover length where HiP becomes faster on this machine. `--out` saves a
log-log plot of both sections. On CPU the default implementation is "xla" (Pallas kernels only run
in interpret mode there and say nothing about accelerator speed).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sparse_attention import common, hip_block_indices, sparse_attention


def _time(fn, args, repeats):
    """Best wall time of `repeats` calls after one compile/warm-up call."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _slope(lengths, times):
    """Least-squares slope and intercept of log(time) against log(length)."""
    return np.polyfit(np.log(lengths), np.log(times), 1)


def _crossover(lengths, dense, other):
    """First measured length where `other` beats dense, else the length where the fits cross."""
    for t, d, o in zip(lengths, dense, other):
        if o < d:
            return float(t), "measured"
    (sd, cd), (so, co) = _slope(lengths, dense), _slope(lengths, other)
    if sd <= so:
        return float("nan"), "fits do not cross"
    return float(np.exp((co - cd) / (sd - so))), "extrapolated from the fits"


def _splash(q, k, v, repeats):
    """JAX's splash attention with a causal mask (TPU kernel; interpreted off TPU): (time, max error)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
    b, t, h, d = q.shape
    g = h // k.shape[2]
    mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(h)])
    kernel = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1,
                                interpret=jax.default_backend() != "tpu")
    kv = lambda x: jnp.repeat(x, g, axis=2).transpose(0, 2, 1, 3)  # noqa: E731  [B, H, T, D]
    fn = jax.jit(lambda q, k, v: jax.vmap(kernel)(q.transpose(0, 2, 1, 3) * d ** -0.5, kv(k), kv(v))
                 .transpose(0, 2, 1, 3))
    dense = jax.nn.dot_product_attention(q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2), is_causal=True)
    return _time(fn, (q, k, v), repeats), float(jnp.abs(fn(q, k, v) - dense).max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--k-blocks", type=int, default=8, help="listed / searched blocks K")
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--sinks", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--implementation", default=None, help="sparse path (default per backend)")
    parser.add_argument("--out", default=None, help="save a log-log plot (png) here")
    parser.add_argument("--splash", action="store_true",
                        help="also time JAX's splash attention (default on TPU; elsewhere it runs "
                             "interpreted, which checks the code path but times the interpreter)")
    args = parser.parse_args()

    bq = bk = args.block
    kw = dict(block_q=bq, block_k=bk, window=args.window, sinks=args.sinks)
    impl = args.implementation
    print(f"backend={jax.default_backend()} batch={args.batch} heads={args.heads}/{args.kv_heads} "
          f"head_dim={args.head_dim} block={bq} K={args.k_blocks} window={args.window} "
          f"sinks={args.sinks} sparse implementation={impl or 'default'}")

    g = args.heads // args.kv_heads
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2), is_causal=True))
    pattern = jax.jit(lambda q, k, v, bi: sparse_attention(q, k, v, block_indices=bi,
                                                           implementation=impl, **kw))
    hip = jax.jit(lambda q, k, v: sparse_attention(
        q, k, v, block_indices=hip_block_indices(q, k, k_blocks=args.k_blocks, **kw),
        implementation=impl, **kw))
    search = jax.jit(lambda q, k: hip_block_indices(q, k, k_blocks=args.k_blocks, **kw))

    use_splash = args.splash or jax.default_backend() == "tpu"
    rows = []
    print(f"\n{'T':>6} {'dense ms':>9} {'pattern ms':>11} {'dense/pattern':>14} {'search ms':>10} "
          f"{'HiP ms':>8} {'dense/HiP':>10}")
    for t in args.lengths:
        rng = np.random.default_rng(t)
        shape_q = (args.batch, t, args.heads, args.head_dim)
        shape_k = (args.batch, t, args.kv_heads, args.head_dim)
        q = jnp.asarray(rng.normal(size=shape_q), jnp.float32)
        k = jnp.asarray(rng.normal(size=shape_k), jnp.float32)
        v = jnp.asarray(rng.normal(size=shape_k), jnp.float32)
        nq = common.cdiv(t, bq)
        # Causal random pattern: K blocks drawn from each query block's past.
        hi = np.arange(nq)[:, None] + 1
        bi = jnp.asarray(np.floor(rng.random((args.batch, args.heads, nq, args.k_blocks)) * hi)
                         .astype(np.int32))
        td = _time(dense, (q, k, v), args.repeats)
        tp = _time(pattern, (q, k, v, bi), args.repeats)
        ts = _time(search, (q, k), args.repeats)
        th = _time(hip, (q, k, v), args.repeats)
        rows.append((t, td, tp, ts, th))
        print(f"{t:>6} {td*1e3:>9.1f} {tp*1e3:>11.1f} {td/tp:>14.2f} {ts*1e3:>10.1f} "
              f"{th*1e3:>8.1f} {td/th:>10.2f}", flush=True)
        if use_splash:
            tsp, err = _splash(q, k, v, args.repeats)
            print(f"{'':>6} splash (causal) {tsp*1e3:.1f} ms, dense/splash {td/tsp:.2f}, "
                  f"max |splash - dense| {err:.1e}", flush=True)

    lengths = np.array([r[0] for r in rows], float)
    td, tp, ts, th = (np.array([r[i] for r in rows]) for i in (1, 2, 3, 4))
    if len(rows) >= 2:
        # Slopes over every length and over the longer half (fixed overheads dominate short T).
        upper = lengths >= np.median(lengths)
        print("\nlog-log slopes of time vs T (2 = quadratic, 1 = linear): all T | T >= "
              f"{lengths[upper][0]:.0f}")
        tlogt = lengths * np.log(lengths)
        for name, tt in (("dense", td), ("pattern", tp), ("HiP search", ts), ("HiP total", th),
                         ("(T log T)", tlogt)):
            print(f"  {name:<11} {_slope(lengths, tt)[0]:5.2f} | "
                  f"{_slope(lengths[upper], tt[upper])[0]:5.2f}")
        cross, how = _crossover(lengths, td, th)
        print(f"HiP (search + sparse attention) faster than dense from T = {cross:.0f} ({how})")
        cross_p, how_p = _crossover(lengths, td, tp)
        print(f"fixed pattern faster than dense from T = {cross_p:.0f} ({how_p})")

    if args.out:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, tt, style in (("dense (jax.nn.dot_product_attention)", td, "o-"),
                                ("sparse pattern", tp, "s-"), ("HiP search", ts, "^--"),
                                ("HiP search + sparse attention", th, "d-")):
            ax.loglog(lengths, tt * 1e3, style, label=name)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("forward time (ms)")
        ax.set_title(f"{jax.default_backend()}: K={args.k_blocks} blocks of {bk}, window "
                     f"{args.window}, sinks {args.sinks}")
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.out, dpi=120)
        print(f"plot saved to {args.out}")


if __name__ == "__main__":
    main()
