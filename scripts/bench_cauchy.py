"""Benchmark the Cauchy / log-Vandermonde implementations: time and peak live memory vs N and L.

    .venv/bin/python scripts/bench_cauchy.py [--batch 8] [--repeats 3]

Prints, per (N, L), the forward and forward+backward wall time of each implementation, its ratio to
the reference measured in the same run, and the compiled temporary memory from XLA's memory analysis
(the reference materialises [B, N, L]; the blocked paths keep O(N + L) per row). On CPU the Pallas
kernel runs in interpret mode, so its time there says nothing about accelerator speed.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cauchy import cauchy, vandermonde
from zoo.bench import compiled_memory, time_fn


def _operands(batch, n, length, seed=0):
    rng = np.random.default_rng(seed)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=(batch, 1)))
    w = (dt * (-0.5 + 1j * np.pi * np.arange(n))).astype(np.complex64)
    omega = np.exp(-2j * np.pi * np.arange(length) / (2 * length))
    z = (2 * (1 - omega) / (1 + omega)).astype(np.complex64)
    v = (rng.normal(size=(batch, n)) + 1j * rng.normal(size=(batch, n))).astype(np.complex64)
    return jnp.asarray(v), jnp.asarray(z), jnp.asarray(w)


def run(shapes=((32, 1024), (64, 4096), (256, 4096), (64, 16384)), batch=8, repeats=3, verbose=True):
    """One row per (op, N, L, implementation): fwd and fwd+bwd seconds, the ratio to the reference
    measured in this run, and the compiled temporary memory of fwd+bwd (XLA's memory analysis)."""
    interpret = jax.default_backend() == "cpu"
    rows = []
    for op in ("cauchy", "vandermonde"):
        for n, length in shapes:
            v, z, w = _operands(batch, n, length)
            base = None
            for impl in ("reference", "xla", "pallas"):
                if op == "cauchy":
                    f = lambda v, w, impl=impl: cauchy(v, z, w, implementation=impl, interpret=interpret)
                else:
                    f = lambda v, w, impl=impl: vandermonde(v, w, length, implementation=impl, interpret=interpret)
                fwd = jax.jit(f)
                fb = jax.jit(jax.grad(lambda v, w, f=f: jnp.sum(jnp.abs(f(v, w)) ** 2), argnums=(0, 1)))
                tf, tb = time_fn(fwd, v, w, reps=repeats), time_fn(fb, v, w, reps=repeats)
                mem = compiled_memory(fb.lower(v, w).compile())
                base = base or (tf, tb)
                row = dict(
                    op=op,
                    kind="time",
                    N=n,
                    L=length,
                    batch=batch,
                    impl=impl,
                    fwd_ms=tf * 1e3,
                    fb_ms=tb * 1e3,
                    fwd_speedup=base[0] / tf,
                    fb_speedup=base[1] / tb,
                    temp_mib=mem["temp_size_in_bytes"] / 2**20 if mem else float("nan"),
                )
                rows.append(row)
                if verbose:
                    print(
                        f"{op:<12}{n:>5}{length:>6} {impl:<10} fwd {tf * 1e3:9.2f} ms (x{row['fwd_speedup']:.2f})"
                        f"  f+b {tb * 1e3:9.2f} ms (x{row['fb_speedup']:.2f})  tmp {row['temp_mib']:.1f} MiB",
                        flush=True,
                    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"backend={jax.default_backend()} batch={args.batch} (pallas interpreted on CPU)")
    run(batch=args.batch, repeats=args.repeats)
    print("x = speed-up vs the reference in this run (higher is faster); tmp = XLA temp buffer of fwd+bwd.")


if __name__ == "__main__":
    main()
