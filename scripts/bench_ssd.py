"""Benchmark the SSD op (pallas_kernels/ssd): time and memory of each implementation vs seqlen.

    .venv/bin/python scripts/bench_ssd.py --out runs/bench_ssd.png            # quick CPU sweep
    .venv/bin/python scripts/bench_ssd.py --seqlens 1024,4096,16384,65536 \\
        --impls reference,xla,pallas --out runs/bench_ssd.png               # accelerator sweep

For each seqlen and implementation it compiles the forward (`ssd`) and the forward+backward
(`jax.value_and_grad` of sum(y * g) w.r.t. x, dt, A, B, C), reads the compiled program's memory
(`compiled.memory_analysis()`: temporaries + outputs), times the median of --repeats runs, and
prints one markdown table with the ratios to the reference measured in this run, then a plot of
time and memory vs seqlen to --out. Configurations whose compiled temporaries exceed --max-mem-gb
are reported as skipped instead of run. On CPU the pallas kernels can only run interpreted
(`interpret=True`), which measures the interpreter, not the kernels: they are left out of the
default CPU sweep.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ssd import ssd


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--seqlens", default="1024,2048,4096", help="comma-separated sequence lengths (e.g. 1024,4096,16384,65536)"
    )
    p.add_argument(
        "--impls",
        default=None,
        help="comma-separated implementations; default reference,xla on CPU, reference,xla,pallas elsewhere",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--dstate", type=int, default=64)
    p.add_argument("--ngroups", type=int, default=1)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument(
        "--max-mem-gb", type=float, default=6.0, help="skip running a compiled program whose temporaries exceed this"
    )
    p.add_argument("--out", default="runs/bench_ssd.png", help="path of the plot (PNG)")
    return p.parse_args(argv)


def make_inputs(args, seqlen):
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)
    b, h, p, g, n = args.batch, args.heads, args.headdim, args.ngroups, args.dstate
    arr = lambda *shape, scale=1.0: jnp.asarray(rng.standard_normal(shape) * scale, dtype)
    return dict(
        x=arr(b, seqlen, h, p),
        dt=arr(b, seqlen, h) - 3.0,
        A=-jnp.asarray(rng.uniform(1, 16, h), jnp.float32),
        B=arr(b, seqlen, g, n, scale=0.2),
        C=arr(b, seqlen, g, n),
    )


def build(impl, mode, args):
    kw = dict(chunk_size=args.chunk, dt_softplus=True, implementation=impl)
    if impl == "pallas" and jax.default_backend() == "cpu":
        kw["interpret"] = True
    fwd = functools.partial(ssd, **kw)
    if mode == "fwd":
        return jax.jit(fwd)

    def loss(x, dt, A, B, C, g):
        return jnp.sum(fwd(x, dt, A, B, C).astype(jnp.float32) * g)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))


def measure(fn, inputs, args):
    """(median seconds, temp+output bytes or None, skipped reason or None)."""
    compiled = fn.lower(*inputs).compile()
    mem = None
    try:
        analysis = compiled.memory_analysis()
        if analysis is not None:
            mem = int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)
    except (NotImplementedError, AttributeError):
        mem = None
    if mem is not None and mem > args.max_mem_gb * 2**30:
        return None, mem, f"temporaries {mem / 2**30:.1f} GiB > --max-mem-gb"
    jax.block_until_ready(compiled(*inputs))
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), mem, None


def main(argv=None):
    args = parse_args(argv)
    seqlens = [int(s) for s in args.seqlens.split(",")]
    default_impls = "reference,xla" if jax.default_backend() == "cpu" else "reference,xla,pallas"
    impls = (args.impls or default_impls).split(",")
    modes = args.modes.split(",")
    print(
        f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} "
        f"B={args.batch} H={args.heads} P={args.headdim} N={args.dstate} G={args.ngroups} "
        f"Q={args.chunk} dtype={args.dtype} repeats={args.repeats}"
    )
    results = {}  # (mode, impl, seqlen) -> (seconds, bytes, skipped)
    for seqlen in seqlens:
        base = make_inputs(args, seqlen)
        for mode in modes:
            inputs = [base[k] for k in ("x", "dt", "A", "B", "C")]
            if mode == "fwd+bwd":
                inputs.append(jnp.ones(base["x"].shape, jnp.float32))
            for impl in impls:
                results[(mode, impl, seqlen)] = measure(build(impl, mode, args), inputs, args)
                sec, mem, why = results[(mode, impl, seqlen)]
                print(
                    f"  T={seqlen:>6} {mode:>7} {impl:>9}: "
                    + (f"skipped ({why})" if why else f"{sec * 1e3:9.2f} ms")
                    + ("" if mem is None else f", {mem / 2**20:9.1f} MiB"),
                    flush=True,
                )

    # Markdown table of times, memory and ratios to the reference of this run.
    print("\n| T | mode | impl | time (ms) | time / reference | memory (MiB) | memory / reference |")
    print("|---|---|---|---|---|---|---|")
    for seqlen in seqlens:
        for mode in modes:
            ref_sec, ref_mem, _ = results.get((mode, "reference", seqlen), (None, None, None))
            for impl in impls:
                sec, mem, why = results[(mode, impl, seqlen)]
                t = "skipped" if why else f"{sec * 1e3:.2f}"
                tr = f"{sec / ref_sec:.3f}" if sec and ref_sec else "-"
                m = "-" if mem is None else f"{mem / 2**20:.1f}"
                mr = f"{mem / ref_mem:.3f}" if mem and ref_mem else "-"
                print(f"| {seqlen} | {mode} | {impl} | {t} | {tr} | {m} | {mr} |")

    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in modes:
        for impl in impls:
            pts = [(s, *results[(mode, impl, s)][:2]) for s in seqlens]
            style = "-" if mode == "fwd" else "--"
            ts = [(s, sec * 1e3) for s, sec, _ in pts if sec]
            ms = [(s, mem / 2**20) for s, _, mem in pts if mem]
            if ts:
                ax_t.plot(*zip(*ts), style, marker="o", label=f"{impl} {mode}")
            if ms:
                ax_m.plot(*zip(*ms), style, marker="o", label=f"{impl} {mode}")
    for ax, label in ((ax_t, "time (ms)"), (ax_m, "compiled temp + output (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("seqlen")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(
        f"SSD on {jax.default_backend()}: B={args.batch} H={args.heads} P={args.headdim} "
        f"N={args.dstate} Q={args.chunk} {args.dtype}"
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"\nplot written to {args.out}")


if __name__ == "__main__":
    main()
