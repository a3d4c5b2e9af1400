"""Benchmark the SSD op (pallas_kernels/ssd): per-kernel FLOPs/bytes, times, ratios and correctness.

    .venv/bin/python scripts/bench_ssd.py                        # the default case on this backend
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

`--vs-minimal` instead times zoo xla against the SSD minimal algorithm in PyTorch (`torch_ssd_minimal`
below, written from the Mamba-2 paper's Listing 1: four einsums around a segment-sum mask, the
reference the mamba_ssm authors ship as ssd_minimal) on CPU, fp32, in turn per repeat, over the
lengths and chunks of MINIMAL_CASES (torch is optional: without it the script says so), and writes
a JSON report (--out) whose table `--markdown REPORT` prints for docs/kernels/ssd.md:

    .venv/bin/python scripts/bench_ssd.py --vs-minimal --out docs/kernels/results/ssd_vs_minimal_cpu.json

`--short` times what the tiny Mamba-2 trains at on CPU (fp32, short T): the SSD op at its heads
(H 8, P 16, N 32, G 1) for the XLA path against the sequential reference, at chunk 64 and 32 and, for
T below the chunk, the XLA path on the input padded to a whole chunk (dt = 0 on the padding, the
work a padded chunk costs); and the trainer's own step (`zoo.bench.train_step_runner`) of `mamba2:tiny`
at chunk 64 and 32 and of `transformer:tiny` at the same d_model. It writes a JSON report whose
table `--short-markdown REPORT` prints for docs/kernels/ssd.md:

    .venv/bin/python scripts/bench_ssd.py --short --out docs/kernels/results/ssd_short_cpu.json

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
from peer_timing import torch_cuda_time

from pallas_kernels.ssd import common, pallas_gpu, pallas_tpu, ssd
from zoo.bench import matmul_flops, relative_error, time_fn


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


DEFAULT_CASE = Shape(4, 8192, 32, 64, 128, 1, 256)  # Mamba-2-370m-like heads, the released chunk
CPU_CASE = Shape(1, 512, 4, 32, 32, 1, 128)


def algorithm_flops(s: Shape, backward: bool) -> float:
    """Matmul FLOPs of chunked SSD (causal half of each [Q,Q] block; C B^T once per group).

    Forward: C B^T (2 G Q^2/2 N per chunk), (L o CB) dt x (2 H Q^2/2 P), chunk states (2 T H P N),
    state -> output (2 T H P N). Backward: the kernels' matmuls (`pallas_gpu.kernel_costs`) without
    the forward recompute.
    """
    d = common.Dims(s.batch, s.seqlen, s.heads, s.head_dim, s.groups, s.d_state, s.chunk)
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
        d = common.Dims(s.batch, s.seqlen, s.heads, s.head_dim, s.groups, s.d_state, s.chunk)
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
        return torch_cuda_time(f, reps=repeats)

    rows = []
    if "fwd" in modes:
        y = fn(x, dt, A, B, C, s.chunk)
        rows.append(
            dict(
                base,
                mode="fwd",
                seconds=cuda_time(lambda: fn(x, dt, A, B, C, s.chunk)),
                rel_err=relative_error(y.float().cpu().numpy(), ref_y),
            )
        )
    if "fwd+bwd" in modes:
        leaves = [t.detach().requires_grad_() for t in (x, dt, A, B, C)]

        def fb():
            out = fn(*leaves, s.chunk)
            return torch.autograd.grad(out.float(), leaves, gy)

        grads = [g.float().cpu().numpy() for g in fb()]
        rows.append(
            dict(
                base,
                mode="fwd+bwd",
                seconds=cuda_time(fb),
                rel_err=max(relative_error(g, r) for g, r in zip(grads, ref_grads)),
            )
        )
    return rows


# B,T,H,P,N,G,Q of the CPU comparison with the PyTorch SSD minimal algorithm.
MINIMAL_CASES = tuple(Shape(1, t, 8, 64, 64, 1, q) for t in (1024, 4096, 16384) for q in (64, 256))


def torch_ssd_minimal(X, A, B, C, chunk):
    """The SSD minimal algorithm (Mamba-2 paper, Listing 1) in PyTorch, the CPU peer of zoo xla.

    X [b, T, h, p] = x * dt, A [b, T, h] = A * dt, B, C [b, T, h, n] (per head); T a multiple of
    `chunk`. Returns y [b, T, h, p].
    """
    import torch  # pylint: disable=g-import-not-at-top

    def segsum(a):  # [..., Q] -> [..., Q, Q]: sum of a[j+1..i] for i >= j, -inf above the diagonal
        q = a.shape[-1]
        below = torch.tril(torch.ones(q, q, dtype=torch.bool), diagonal=-1)
        sums = torch.cumsum(a[..., :, None].expand(*a.shape, q).masked_fill(~below, 0), dim=-2)
        return sums.masked_fill(~torch.tril(torch.ones(q, q, dtype=torch.bool)), -torch.inf)

    b, t, h, p = X.shape
    c = t // chunk
    X, B, C = (v.reshape(b, c, chunk, h, v.shape[-1]) for v in (X, B, C))
    A = A.reshape(b, c, chunk, h).permute(0, 3, 1, 2)  # [b, h, c, Q]
    a_cum = torch.cumsum(A, dim=-1)
    # 1. diagonal blocks; 2. chunk states; 3. state passing between chunks; 4. state -> output.
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, torch.exp(segsum(A)), X)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, torch.exp(a_cum[..., -1:] - a_cum), X)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    chunk_decay = torch.exp(segsum(torch.nn.functional.pad(a_cum[..., -1], (1, 0))))  # [b, h, c+1, c+1]
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)[:, :-1]
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states, torch.exp(a_cum))
    return (y_diag + y_off).reshape(b, t, h, p)


def minimal_comparison(cases=MINIMAL_CASES, repeats=5) -> dict:
    """zoo xla vs `torch_ssd_minimal` on CPU in fp32, forward and forward+backward, timed in turn."""
    import datetime  # pylint: disable=g-import-not-at-top
    import platform  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top
    import time  # pylint: disable=g-import-not-at-top

    try:
        import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
        torch, torch_version = None, f"torch not importable ({e}); install torch for the peer columns"
    else:
        torch.set_num_threads(os.cpu_count() or 1)
        torch_version = torch.__version__
    print(f"torch: {torch_version}", flush=True)
    rows = []
    for s in cases:
        raw = make_inputs(s, jnp.float32)
        args = [jnp.asarray(raw[k]) for k in "x dt A B C".split()]
        gy = jnp.asarray(raw["gy"])
        fwd, bwd = _zoo_fns("xla", s.chunk)
        fns = {
            ("zoo-xla", "fwd"): lambda: jax.block_until_ready(fwd(*args)),
            ("zoo-xla", "fwd+bwd"): lambda: jax.block_until_ready(bwd(*args, gy)),
        }
        errors = {}
        if torch is not None:
            rep = s.heads // s.groups
            leaves = [torch.tensor(raw[k]) for k in "x dt A B C".split()]
            tgy = torch.tensor(raw["gy"])

            def peer(x, dt, A, B, C, s=s, rep=rep):
                heads = lambda v: v.repeat_interleave(rep, dim=2)  # noqa: E731  groups -> heads
                return torch_ssd_minimal(x * dt[..., None], A * dt, heads(B), heads(C), s.chunk)

            def peer_fwd(leaves=leaves, peer=peer):
                with torch.no_grad():
                    return peer(*leaves)

            def peer_fwd_bwd(leaves=leaves, peer=peer, tgy=tgy):
                grad_leaves = [v.detach().requires_grad_() for v in leaves]
                return torch.autograd.grad(peer(*grad_leaves), grad_leaves, tgy)

            fns[("torch-minimal", "fwd")] = peer_fwd
            fns[("torch-minimal", "fwd+bwd")] = peer_fwd_bwd
            errors["fwd"] = relative_error(peer_fwd().numpy(), np.asarray(fwd(*args)))
            errors["fwd+bwd"] = max(
                relative_error(g.numpy(), np.asarray(r)) for g, r in zip(peer_fwd_bwd(), bwd(*args, gy))
            )
        for f in fns.values():  # warm-up (compilation)
            f()
        times = {key: [] for key in fns}
        for _ in range(repeats):
            for key, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[key].append(time.perf_counter() - t0)
        for mode in ("fwd", "fwd+bwd"):
            ms = {impl: 1e3 * statistics.median(times[(impl, m)]) for impl, m in times if m == mode}
            row = {"shape": str(s), "seqlen": s.seqlen, "chunk": s.chunk, "mode": mode, "ms": ms}
            if "torch-minimal" in ms:
                row["zoo_over_torch"] = ms["zoo-xla"] / ms["torch-minimal"]
                row["peer_rel_err_vs_zoo"] = errors[mode]
            rows.append(row)
            ratio = f"  zoo/torch {row['zoo_over_torch']:.2f}" if "zoo_over_torch" in row else ""
            print(f"{s} {mode:8s} " + "  ".join(f"{k} {v:8.1f} ms" for k, v in ms.items()) + ratio, flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        commit = commit.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "command": "python bench_ssd.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, jax {jax.__version__}",
        "load_average_1min": os.getloadavg()[0],
        "commit": commit,
        "torch": torch_version,
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "dtype": "float32",
        "repeats": repeats,
        "rows": rows,
    }


def minimal_markdown(report: dict) -> str:
    """The table of a `minimal_comparison` report, as docs/kernels/ssd.md shows it."""
    lines = [
        f"Measured {report['date']} on {report['machine']} (load average {report['load_average_1min']:.1f}; "
        f"commit {report['commit']}; torch {report['torch']}, {report['torch_threads']} threads), "
        f"{report['dtype']}, median of {report['repeats']} runs taken in turn:",
        "",
        "| shape | pass | zoo xla (ms) | torch SSD minimal (ms) | zoo / torch |",
        "|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        peer = r["ms"].get("torch-minimal")
        ratio = f"{r['zoo_over_torch']:.2f}" if "zoo_over_torch" in r else "n/a"
        peer = "n/a" if peer is None else f"{peer:.1f}"
        lines.append(f"| {r['shape']} | {r['mode']} | {r['ms']['zoo-xla']:.1f} | {peer} | {ratio} |")
    return "\n".join(lines)


SHORT_SSD_CASES = ((16, 64), (64, 64), (16, 16))  # (B, T) at the tiny Mamba-2's heads
SHORT_STEP_CASES = ((16, 64), (64, 64), (16, 128))  # (B, T) of the training step; 128 = the preset's length
SHORT_STEP_CONFIGS = {  # label -> (run config, overrides)
    "mamba2 Q64": ("mamba2:tiny", ("--config.model.chunk_size=64",)),
    "mamba2 Q32": ("mamba2:tiny", ("--config.model.chunk_size=32",)),
    "transformer D64": ("transformer:tiny", ("--config.model.d_model=64",)),
}


def _median_ms(fns: dict, repeats: int) -> dict:
    """Median milliseconds of each no-argument function, after a warm-up, timed in turn per repeat."""
    import time  # pylint: disable=g-import-not-at-top

    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def _padded_to_chunk(a, name, chunk):
    """Pads time (axis 1) to a whole chunk with zeros: dt = 0 there (no decay, no input), so the real
    steps' outputs are the same."""
    del name
    pad = [(0, 0)] * a.ndim
    pad[1] = (0, chunk - a.shape[1])
    return jnp.pad(a, pad)


def short_comparison(repeats=10, step_reps=10) -> dict:
    """The SSD op and the training step of the tiny Mamba-2 at short T on CPU (see the module docstring)."""
    import datetime  # pylint: disable=g-import-not-at-top
    import platform  # pylint: disable=g-import-not-at-top

    from zoo.bench import bench_config, train_step_runner  # pylint: disable=g-import-not-at-top

    ssd_rows = []
    loads = [os.getloadavg()[0]]
    for batch, seqlen in SHORT_SSD_CASES:
        fns = {}
        for impl, chunk in (("reference", 64), ("xla", 64), ("xla", 32)):
            s = Shape(batch, seqlen, 8, 16, 32, 1, chunk)
            raw = make_inputs(s, jnp.float32)
            args = [jnp.asarray(raw[k]) for k in "x dt A B C".split()]
            gy = jnp.asarray(raw["gy"])
            fwd, bwd = _zoo_fns(impl, chunk)
            label = impl if impl == "reference" else f"xla Q{chunk}"
            fns[(label, "fwd")] = lambda fwd=fwd, args=args: jax.block_until_ready(fwd(*args))
            fns[(label, "fwd+bwd")] = lambda bwd=bwd, args=args, gy=gy: jax.block_until_ready(bwd(*args, gy))
            if impl == "xla" and chunk == 64 and seqlen < chunk:
                pa = [_padded_to_chunk(a, n, chunk) if n != "A" else a for n, a in zip("x dt A B C".split(), args)]
                pgy = _padded_to_chunk(gy, "gy", chunk)
                fns[("xla Q64 padded", "fwd")] = lambda pa=pa: jax.block_until_ready(fwd(*pa))
                fns[("xla Q64 padded", "fwd+bwd")] = lambda pa=pa, pgy=pgy: jax.block_until_ready(bwd(*pa, pgy))
        ms = _median_ms(fns, repeats)
        for mode in ("fwd", "fwd+bwd"):
            row = {
                "batch": batch,
                "seqlen": seqlen,
                "mode": mode,
                "ms": {k: v for (k, m), v in ms.items() if m == mode},
            }
            ssd_rows.append(row)
            print(f"ssd B{batch} T{seqlen} {mode:8s} " + "  ".join(f"{k} {v:7.2f} ms" for k, v in row["ms"].items()))
        loads.append(os.getloadavg()[0])
    step_rows = []
    for batch, seqlen in SHORT_STEP_CASES:
        runs = {}
        for label, (spec, overrides) in SHORT_STEP_CONFIGS.items():
            config = bench_config(spec, batch, seqlen, "float32", overrides)
            runs[label] = lambda run=train_step_runner(config)[0]: jax.block_until_ready(run())
        ms = _median_ms(runs, step_reps)  # the three steps in turn, so that load changes hit them alike
        step_rows.append({"batch": batch, "seqlen": seqlen, "ms": ms})
        print(f"train step B{batch} T{seqlen} " + "  ".join(f"{k} {v:7.1f} ms" for k, v in ms.items()), flush=True)
        loads.append(os.getloadavg()[0])
    return {
        "command": "python bench_ssd.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores, jax {jax.__version__}",
        "load_average_1min": {"min": min(loads), "max": max(loads)},
        "commit": _commit(),
        "dtype": "float32",
        "repeats": repeats,
        "step_reps": step_reps,
        "ssd": ssd_rows,
        "train_step": step_rows,
    }


def short_markdown(report: dict) -> str:
    """The tables of a `short_comparison` report, as docs/kernels/ssd.md shows them."""
    load = report["load_average_1min"]
    ssd_labels = ["reference", "xla Q64 padded", "xla Q64", "xla Q32"]
    lines = [
        f"Measured {report['date']} on {report['machine']} (load average {load['min']:.1f}-{load['max']:.1f}; "
        f"commit {report['commit']}), {report['dtype']}; SSD: median of {report['repeats']} runs taken in turn "
        "(H 8, P 16, N 32, G 1; ms):",
        "",
        "| B x T | pass | " + " | ".join(ssd_labels) + " |",
        "|---|---|" + "---|" * len(ssd_labels),
    ]
    for r in report["ssd"]:
        cells = [f"{r['ms'][k]:.2f}" if k in r["ms"] else "–" for k in ssd_labels]
        lines.append(f"| {r['batch']} x {r['seqlen']} | {r['mode']} | " + " | ".join(cells) + " |")
    step_labels = list(report["train_step"][0]["ms"])
    lines += [
        "",
        f"Training step (`zoo.bench.train_step_runner`, the trainer's jitted step: gradient, AdamW "
        f"update, metrics; median of {report['step_reps']} steps taken in turn; ms):",
        "",
        "| B x T | " + " | ".join(step_labels) + " | Q64 / Q32 |",
        "|---|" + "---|" * (len(step_labels) + 1),
    ]
    for r in report["train_step"]:
        ratio = r["ms"]["mamba2 Q64"] / r["ms"]["mamba2 Q32"]
        cells = " | ".join(f"{r['ms'][k]:.1f}" for k in step_labels)
        lines.append(f"| {r['batch']} x {r['seqlen']} | {cells} | {ratio:.2f} |")
    return "\n".join(lines)


def _commit() -> str:
    import subprocess  # pylint: disable=g-import-not-at-top

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def matmul_ceiling(dtype, repeats=5) -> float:
    """FLOP/s of one square matmul in `dtype` on this backend (n = 8192 on accelerators, 1024 on CPU)."""
    return matmul_flops(dtype, reps=repeats)


def run(shapes=None, dtypes=("bfloat16",), impls=("pallas", "xla"), modes=("fwd", "fwd+bwd"), repeats=5, peer=True):
    """Benchmark rows (dicts): kernel costs, then one timing row per (shape, dtype, impl, mode).

    Timing rows carry seconds, tflops (algorithm matmul FLOPs / time), rel_err (vs zoo xla in fp32
    on the same inputs: y for fwd, the largest over dx, ddt, dA, dB, dC for fwd+bwd), and ratios to
    zoo xla and to the peer from this run.
    """
    shapes = shapes or [CPU_CASE if jax.default_backend() == "cpu" else DEFAULT_CASE]
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

                def row(mode, sec, err, label=label):
                    tflops = algorithm_flops(s, mode == "fwd+bwd") / sec / 1e12
                    return dict(base, impl=label, mode=mode, seconds=sec, rel_err=err, tflops=tflops)

                if "fwd" in modes:
                    sec = time_fn(fwd, *args, reps=repeats)
                    rows.append(row("fwd", sec, relative_error(np.asarray(fwd(*args), np.float32), ref_y)))
                if "fwd+bwd" in modes:
                    sec = time_fn(bwd, *args, gy, reps=repeats)
                    grads = [np.asarray(g, np.float32) for g in bwd(*args, gy)]
                    rows.append(row("fwd+bwd", sec, max(relative_error(g, r) for g, r in zip(grads, ref_grads))))
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
        help="B,T,H,P,N,G,Q (repeatable); default 4,8192,32,64,128,1,256 (on CPU a small 1,512,4,32,32,1,128)",
    )
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--impls", default="pallas,xla")
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-peer", action="store_true", help="skip mamba_ssm's Triton kernels")
    p.add_argument("--costs-only", action="store_true", help="print the kernels' cost model and exit")
    p.add_argument("--json", help="also write the rows to this JSON-lines file")
    p.add_argument("--vs-minimal", action="store_true", help="zoo xla vs the PyTorch SSD minimal algorithm (CPU)")
    p.add_argument("--out", help="with --vs-minimal or --short: write the report as JSON to this file")
    p.add_argument("--markdown", metavar="REPORT", help="print the docs table of a --vs-minimal report and exit")
    p.add_argument("--short", action="store_true", help="the tiny Mamba-2's SSD and training step at short T (CPU)")
    p.add_argument("--short-markdown", metavar="REPORT", help="print the docs tables of a --short report and exit")
    args = p.parse_args(argv)
    if args.short_markdown:
        with open(args.short_markdown) as f:
            print(short_markdown(json.load(f)))
        return
    if args.short:
        report = short_comparison(args.repeats)
        if args.out:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                f.write(json.dumps(report, indent=1) + "\n")
            print(f"wrote {args.out}")
        return
    if args.markdown:
        with open(args.markdown) as f:
            print(minimal_markdown(json.load(f)))
        return
    if args.vs_minimal:
        cases = args.shape or MINIMAL_CASES
        report = minimal_comparison(cases, args.repeats)
        if args.out:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                f.write(json.dumps(report, indent=1) + "\n")
            print(f"wrote {args.out}")
        return
    shapes = args.shape or [CPU_CASE if jax.default_backend() == "cpu" else DEFAULT_CASE]
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
