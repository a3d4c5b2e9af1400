"""Benchmark the SSD op (pallas_kernels/ssd): per-kernel FLOPs/bytes, times, ratios and correctness.

    .venv/bin/python scripts/bench_ssd.py                        # the accelerator case on this backend
    .venv/bin/python scripts/bench_ssd.py --shape 1,65536,32,64,128,1,256 --dtypes bfloat16,float32
    MAMBA_VENDOR=/path/to/dir/with/mamba_ssm python scripts/bench_ssd.py   # with the Triton peer

For each shape (B,T,H,P,N,G,Q) and dtype it prints
  1. the cost model of every kernel of both Pallas families (`pl.CostEstimate`: FLOPs, exps, HBM
     bytes; the same numbers the kernels hand to XLA), and the arithmetic intensity;
  2. for each implementation on the current backend (zoo pallas, zoo xla, and state-spaces/mamba's
     Triton `mamba_chunk_scan_combined` when torch + CUDA + mamba_ssm import), the median time of
     the forward and of forward+backward, the achieved TFLOP/s of the algorithm's matmul FLOPs,
     the ratios to zoo xla and to the peer measured in this run, and the error of the output (and of
     the gradients of x, dt, A, B, C) relative to zoo xla in fp32 on the same inputs;
  3. a bf16 (or the dtype's) matmul measured in the same process, as the ceiling.
On CPU the pallas kernels can only run interpreted, which measures the interpreter, not the kernels
(the times are printed but mean nothing); the correctness columns still hold.

`run(shapes, dtypes)` returns the rows as dicts for `scripts/bench_kernels.py`. The peer is imported
here only (never by the package).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ssd import pallas_gpu, pallas_tpu, ssd
from zoo.bench import matmul_flops, time_fn


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    seqlen: int
    heads: int
    head_dim: int
    d_state: int
    groups: int
    chunk: int

    @classmethod
    def parse(cls, text):
        return cls(*(int(v) for v in text.split(",")))

    def __str__(self):
        return (
            f"B{self.batch} T{self.seqlen} H{self.heads} P{self.head_dim} N{self.d_state} G{self.groups} Q{self.chunk}"
        )


ACCELERATOR_CASE = Shape(4, 8192, 32, 64, 128, 1, 256)  # Mamba-2-370m-like heads, the released chunk
CPU_CASE = Shape(1, 512, 4, 32, 32, 1, 128)


def algorithm_flops(s: Shape, backward: bool) -> float:
    """Matmul FLOPs of chunked SSD (causal half of each [Q,Q] block; C B^T once per group).

    Forward: C B^T (2 G Q^2/2 N per chunk), (L o CB) dt x (2 H Q^2/2 P), chunk states (2 T H P N),
    state -> output (2 T H P N). Backward: the kernels' matmuls (`pallas_gpu.kernel_costs`) without
    the forward recompute.
    """
    d = pallas_gpu._Dims(s.batch, s.seqlen, s.heads, s.head_dim, s.groups, s.d_state, s.chunk)
    costs = pallas_gpu.kernel_costs(d, 2)
    fwd = sum(costs[k].flops for k in ("ssd_bmm", "ssd_state_fwd", "ssd_chunk_fwd"))
    if not backward:
        return fwd
    return fwd + sum(costs[k].flops for k in ("ssd_state_bwd", "ssd_chunk_bwd_dx", "ssd_chunk_bwd_dc"))


def kernel_table(s: Shape, dtype) -> list[dict]:
    """One row per kernel of both families: flops, transcendentals, bytes, flops/byte."""
    itemsize = jnp.dtype(dtype).itemsize
    rows = []
    for family, module in (("gpu", pallas_gpu), ("tpu", pallas_tpu)):
        d = module._Dims(s.batch, s.seqlen, s.heads, s.head_dim, s.groups, s.d_state, s.chunk)
        for name, c in module.kernel_costs(d, itemsize).items():
            rows.append(
                {
                    "op": "ssd",
                    "kind": "kernel_cost",
                    "shape": str(s),
                    "dtype": jnp.dtype(dtype).name,
                    "family": family,
                    "kernel": name,
                    "gflop": c.flops / 1e9,
                    "gtrans": c.transcendentals / 1e9,
                    "mbytes": c.bytes_accessed / 1e6,
                    "flop_per_byte": c.flops / max(c.bytes_accessed, 1),
                }
            )
    return rows


def make_inputs(s: Shape, dtype, seed=0):
    """NumPy-drawn inputs in the ranges of the GPU harness (dt = softplus(randn - 4), A = -exp(U[0,2]))."""
    rng = np.random.default_rng(seed)
    b, t, h, p, n, g = s.batch, s.seqlen, s.heads, s.head_dim, s.d_state, s.groups
    x = rng.standard_normal((b, t, h, p), np.float32)
    dt = np.log1p(np.exp(rng.standard_normal((b, t, h), np.float32) - 4.0))
    A = -np.exp(rng.uniform(0.0, 2.0, h)).astype(np.float32)
    B = (rng.standard_normal((b, t, g, n), np.float32) / np.sqrt(n)).astype(np.float32)
    C = rng.standard_normal((b, t, g, n), np.float32)
    gy = rng.standard_normal((b, t, h, p), np.float32)
    return {"x": x, "dt": dt, "A": A, "B": B, "C": C, "gy": gy}


def _median_time(fn, *args, repeats):
    return time_fn(fn, *args, reps=repeats)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def _zoo_fns(impl, chunk):
    kw = {"chunk_size": chunk, "implementation": impl}

    def fwd(x, dt, A, B, C):
        return ssd(x, dt, A, B, C, **kw)

    def loss(x, dt, A, B, C, gy):
        return jnp.sum(fwd(x, dt, A, B, C).astype(jnp.float32) * gy)

    return jax.jit(fwd), jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))


def _peer():
    """mamba_chunk_scan_combined, or (None, reason)."""
    vendor = os.environ.get("MAMBA_VENDOR")
    if vendor and vendor not in sys.path:
        sys.path.insert(0, vendor)
    try:
        import torch  # pylint: disable=g-import-not-at-top

        if not torch.cuda.is_available():
            return None, "torch sees no CUDA device"
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        return None, f"not importable ({e})"
    return mamba_chunk_scan_combined, None


def _peer_rows(s: Shape, dtype, inputs, ref_y, ref_grads, repeats, modes):
    fn, why = _peer()
    base = {"op": "ssd", "kind": "time", "shape": str(s), "dtype": jnp.dtype(dtype).name, "impl": "mamba_ssm-triton"}
    if fn is None:
        return [dict(base, mode=m, skipped=why) for m in modes]
    import torch  # pylint: disable=g-import-not-at-top

    tdt = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[jnp.dtype(dtype).name]
    dev = "cuda"
    x = torch.tensor(inputs["x"], device=dev).to(tdt)
    dt = torch.tensor(inputs["dt"], device=dev)
    A = torch.tensor(inputs["A"], device=dev)
    B = torch.tensor(inputs["B"], device=dev).to(tdt)
    C = torch.tensor(inputs["C"], device=dev).to(tdt)
    gy = torch.tensor(inputs["gy"], device=dev)

    def cuda_time(f):
        for _ in range(2):
            f()
        torch.cuda.synchronize()
        ts = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            f()
            end.record()
            torch.cuda.synchronize()
            ts.append(start.elapsed_time(end) / 1e3)
        return statistics.median(ts)

    rows = []
    if "fwd" in modes:
        y = fn(x, dt, A, B, C, s.chunk)
        rows.append(
            dict(
                base,
                mode="fwd",
                seconds=cuda_time(lambda: fn(x, dt, A, B, C, s.chunk)),
                rel_err=_rel(y.float().cpu().numpy(), ref_y),
            )
        )
    if "fwd+bwd" in modes:
        leaves = [t.detach().requires_grad_() for t in (x, dt, A, B, C)]

        def fb():
            out = fn(*leaves, s.chunk)
            return torch.autograd.grad(out.float(), leaves, gy)

        grads = [g.float().cpu().numpy() for g in fb()]
        rows.append(
            dict(base, mode="fwd+bwd", seconds=cuda_time(fb), rel_err=max(_rel(g, r) for g, r in zip(grads, ref_grads)))
        )
    return rows


def matmul_ceiling(dtype, repeats=5) -> float:
    """FLOP/s of one square matmul in `dtype` on this backend (n = 8192 on accelerators, 1024 on CPU)."""
    return matmul_flops(dtype, reps=repeats)


def run(shapes=None, dtypes=("bfloat16",), impls=("pallas", "xla"), modes=("fwd", "fwd+bwd"), repeats=5, peer=True):
    """Benchmark rows (dicts): kernel costs, then one timing row per (shape, dtype, impl, mode).

    Timing rows carry seconds, tflops (algorithm matmul FLOPs / time), rel_err (vs zoo xla in fp32
    on the same inputs: y for fwd, the largest over dx, ddt, dA, dB, dC for fwd+bwd), and ratios to
    zoo xla and to the peer from this run.
    """
    shapes = shapes or [CPU_CASE if jax.default_backend() == "cpu" else ACCELERATOR_CASE]
    rows = []
    for s in shapes:
        for dtype_name in dtypes:
            dtype = jnp.dtype(dtype_name)
            rows += kernel_table(s, dtype)
            raw = make_inputs(s, dtype)
            args = [jnp.asarray(raw[k], dtype if k in ("x", "B", "C") else jnp.float32) for k in "x dt A B C".split()]
            gy = jnp.asarray(raw["gy"])
            # The yardstick: zoo xla in fp32 on the same (dtype-rounded) inputs.
            args32 = [a.astype(jnp.float32) for a in args]
            ref_fwd, ref_bwd = _zoo_fns("xla", s.chunk)
            ref_y = np.asarray(ref_fwd(*args32))
            ref_grads = [np.asarray(g) for g in ref_bwd(*args32, gy)] if "fwd+bwd" in modes else None
            base = {"op": "ssd", "kind": "time", "shape": str(s), "dtype": dtype.name}
            for impl in impls:
                fwd, bwd = _zoo_fns(impl, s.chunk)
                label = f"zoo-{impl}" + ("(interpreted)" if impl == "pallas" and jax.default_backend() == "cpu" else "")
                if "fwd" in modes:
                    sec = _median_time(fwd, *args, repeats=repeats)
                    err = _rel(np.asarray(fwd(*args), np.float32), ref_y)
                    rows.append(
                        dict(
                            base,
                            impl=label,
                            mode="fwd",
                            seconds=sec,
                            rel_err=err,
                            tflops=algorithm_flops(s, False) / sec / 1e12,
                        )
                    )
                if "fwd+bwd" in modes:
                    sec = _median_time(bwd, *args, gy, repeats=repeats)
                    grads = [np.asarray(g, np.float32) for g in bwd(*args, gy)]
                    err = max(_rel(g, r) for g, r in zip(grads, ref_grads))
                    rows.append(
                        dict(
                            base,
                            impl=label,
                            mode="fwd+bwd",
                            seconds=sec,
                            rel_err=err,
                            tflops=algorithm_flops(s, True) / sec / 1e12,
                        )
                    )
            if peer:
                rows += _peer_rows(s, dtype, raw, ref_y, ref_grads, repeats, modes)
            ceiling = matmul_ceiling(dtype, repeats)
            rows.append(dict(base, kind="matmul_ceiling", impl=f"jnp.matmul {dtype.name}", tflops=ceiling / 1e12))
            # Ratios within this (shape, dtype): time / zoo-xla time, time / peer time.
            timed = [r for r in rows if r.get("kind") == "time" and r["shape"] == str(s) and r["dtype"] == dtype.name]
            for r in timed:
                for other, key in (("zoo-xla", "vs_xla"), ("mamba_ssm-triton", "vs_peer")):
                    o = next(
                        (q for q in timed if q["impl"] == other and q["mode"] == r["mode"] and "seconds" in q), None
                    )
                    if o and "seconds" in r:
                        r[key] = r["seconds"] / o["seconds"]
                if "tflops" in r:
                    r["of_matmul"] = r["tflops"] * 1e12 / ceiling
    return rows


def print_rows(rows):
    costs = [r for r in rows if r["kind"] == "kernel_cost"]
    if costs:
        print("| shape | dtype | family | kernel | GFLOP | G exp | MB (HBM) | FLOP/byte |")
        print("|---|---|---|---|---|---|---|---|")
        for r in costs:
            print(
                f"| {r['shape']} | {r['dtype']} | {r['family']} | {r['kernel']} | {r['gflop']:.2f} | "
                f"{r['gtrans']:.3f} | {r['mbytes']:.1f} | {r['flop_per_byte']:.1f} |"
            )
    timed = [r for r in rows if r["kind"] in ("time", "matmul_ceiling")]
    if timed:
        print("\n| shape | dtype | impl | mode | ms | TFLOP/s | of matmul | / zoo-xla | / peer | rel err vs xla fp32 |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        for r in timed:
            if "skipped" in r:
                print(f"| {r['shape']} | {r['dtype']} | {r['impl']} | {r['mode']} | skipped: {r['skipped']} |||||")
                continue
            ms = fmt(r["seconds"] * 1e3 if "seconds" in r else None, ".3f")
            print(
                f"| {r['shape']} | {r['dtype']} | {r['impl']} | {r.get('mode', '-')} | {ms} | "
                f"{fmt(r.get('tflops'), '.2f')} | {fmt(r.get('of_matmul'), '.3f')} | {fmt(r.get('vs_xla'), '.3f')} | "
                f"{fmt(r.get('vs_peer'), '.3f')} | {fmt(r.get('rel_err'), '.2e')} |"
            )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--shape",
        action="append",
        type=Shape.parse,
        help="B,T,H,P,N,G,Q (repeatable); default the accelerator case 4,8192,32,64,128,1,256 "
        "(on CPU a small 1,512,4,32,32,1,128)",
    )
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--impls", default="pallas,xla")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-peer", action="store_true", help="skip mamba_ssm's Triton kernels")
    p.add_argument("--costs-only", action="store_true", help="print the kernels' cost model and exit")
    p.add_argument("--json", help="also write the rows to this JSON-lines file")
    args = p.parse_args(argv)
    shapes = args.shape or [CPU_CASE if jax.default_backend() == "cpu" else ACCELERATOR_CASE]
    dtypes = args.dtypes.split(",")
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} jax={jax.__version__}")
    if args.costs_only:
        rows = [r for s in shapes for d in dtypes for r in kernel_table(s, jnp.dtype(d))]
    else:
        rows = run(
            shapes,
            dtypes,
            tuple(args.impls.split(",")),
            tuple(args.modes.split(",")),
            args.repeats,
            peer=not args.no_peer,
        )
    print_rows(rows)
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
