"""Benchmark the Cauchy / log-Vandermonde implementations: time and peak live memory vs N and L.

    .venv/bin/python scripts/bench_cauchy.py [--batch 8] [--repeats 3]

Prints, per (N, L), the forward and forward+backward wall time of each implementation, its ratio to
the reference measured in the same run, and the compiled temporary memory from XLA's memory analysis
(the reference materialises [B, N, L]; the blocked paths keep O(N + L) per row). On CPU the Pallas
kernel runs in interpret mode, so its time there says nothing about accelerator speed.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.cauchy import cauchy, vandermonde


def _operands(batch, n, length, seed=0):
    rng = np.random.default_rng(seed)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), size=(batch, 1)))
    w = (dt * (-0.5 + 1j * np.pi * np.arange(n))).astype(np.complex64)
    omega = np.exp(-2j * np.pi * np.arange(length) / (2 * length))
    z = (2 * (1 - omega) / (1 + omega)).astype(np.complex64)
    v = (rng.normal(size=(batch, n)) + 1j * rng.normal(size=(batch, n))).astype(np.complex64)
    return jnp.asarray(v), jnp.asarray(z), jnp.asarray(w)


def _time(fn, args, repeats):
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _temp_bytes(fn, args):
    try:
        mem = fn.lower(*args).compile().memory_analysis()
        return int(mem.temp_size_in_bytes) if mem is not None else -1
    except Exception:  # memory analysis is backend dependent
        return -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    interpret = jax.default_backend() == "cpu"
    impls = ["reference", "xla", "pallas"]
    print(f"backend={jax.default_backend()} batch={args.batch} (pallas interpret={interpret})")
    header = f"{'op':<12}{'N':>5}{'L':>6}  " + "  ".join(
        f"{i + ' fwd ms':>15}{'x':>6}{i + ' f+b ms':>15}{'x':>6}{'tmp MiB':>9}" for i in impls
    )
    print(header)
    for op in ("cauchy", "vandermonde"):
        for n, length in [(32, 1024), (64, 4096), (256, 4096), (64, 16384)]:
            v, z, w = _operands(args.batch, n, length)
            row = f"{op:<12}{n:>5}{length:>6}  "
            base_f = base_b = None
            for impl in impls:
                if op == "cauchy":
                    f = lambda v, w, impl=impl: cauchy(v, z, w, implementation=impl, interpret=interpret)
                else:
                    f = lambda v, w, impl=impl: vandermonde(v, w, length, implementation=impl, interpret=interpret)
                fwd = jax.jit(f)
                fb = jax.jit(jax.grad(lambda v, w, f=f: jnp.sum(jnp.abs(f(v, w)) ** 2), argnums=(0, 1)))
                tf, tb = _time(fwd, (v, w), args.repeats), _time(fb, (v, w), args.repeats)
                mem = _temp_bytes(fb, (v, w))
                base_f, base_b = base_f or tf, base_b or tb
                row += f"{tf * 1e3:>15.2f}{base_f / tf:>6.2f}{tb * 1e3:>15.2f}{base_b / tb:>6.2f}{mem / 2**20:>9.1f}  "
            print(row, flush=True)
    print("x = speed-up vs reference in this run (higher is faster); tmp = XLA temp buffer of fwd+bwd.")


if __name__ == "__main__":
    main()
