"""Benchmark full causal self-attention on this backend: the zoo's blocked causal path, the dense
oracle and torch's `scaled_dot_product_attention`, timed in turn in one run.

    .venv/bin/python scripts/bench_causal_attention.py [--lengths 1024 2048 4096] [--heads 4]
        [--kv-heads 4] [--head-dim 32] [--repeats 7] [--out docs/kernels/results/causal_attention_cpu.json]

Defaults: the tiny transformer's attention (B = 1, 4 heads of 32, fp32). For each length it times
the forward and the forward+backward (gradients of q, k, v of the sum of the output) of
  * "zoo-blocked": `zoo.layers.self_attention` with implementation "auto" (on CPU the blocked
    causal path, `blocked_attention`);
  * "zoo-dense": the same call with implementation "reference" (the dense masked oracle, `attend`);
  * "torch-sdpa": `torch.nn.functional.scaled_dot_product_attention(is_causal=True)` on CPU, when
    torch imports (it is not a dependency of the package; without it the rows say so);
each repeat runs every implementation once, in turn, so that load on the machine hits all alike;
the median is reported. Every output is checked against the fp32 dense oracle (relative L2 error).
The JSON written to --out holds the rows with the date, machine, commit and thread counts;
`--markdown` prints the table that docs/kernels/sparse_attention.md shows (a test keeps the two
equal).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from zoo.layers.attention import AttentionSpec, attention_kernel, self_attention

IMPLS = ("zoo-blocked", "zoo-dense", "torch-sdpa")


def _zoo(implementation):
    def fwd(q, k, v):
        pos = jnp.arange(q.shape[1], dtype=jnp.int32)[None]
        return self_attention(q, k, v, spec=AttentionSpec("full"), positions=pos, implementation=implementation)

    def grads(q, k, v):
        return jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    fwd_j, grads_j = jax.jit(fwd), jax.jit(grads)
    return {
        "fwd": lambda q, k, v: jax.block_until_ready(fwd_j(q, k, v)),
        "fwd+bwd": lambda q, k, v: jax.block_until_ready(grads_j(q, k, v)),
    }


def _torch():
    """(torch module, its version) or (None, the reason it is missing)."""
    try:
        import torch
    except ImportError as e:
        return None, f"torch not importable ({e}); install torch to add the torch-sdpa rows"
    torch.set_num_threads(os.cpu_count() or 1)
    return torch, torch.__version__


def _torch_fns(torch, q, k, v):
    """Forward / forward+backward of torch SDPA on [B, H, T, P] copies of q, k, v; output [B, T, H, P]."""
    import torch.nn.functional as F

    gqa = q.shape[2] != k.shape[2]
    tq, tk, tv = (torch.from_numpy(np.array(x, np.float32)).transpose(1, 2).contiguous() for x in (q, k, v))

    def fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True, enable_gqa=gqa)

    def fwd_bwd():
        a, b, c = (x.detach().requires_grad_() for x in (tq, tk, tv))
        F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=gqa).sum().backward()
        return a.grad

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}, lambda: fwd().transpose(1, 2).numpy()


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    return (
        f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {platform.machine()} {platform.system()}, "
        f"{os.cpu_count()} CPU cores visible, jax {jax.__version__}"
    )


def run(lengths, batch=1, heads=4, kv_heads=4, head_dim=32, repeats=7, torch_peer=True) -> dict:
    """Times every implementation at every length; returns the report (see the module docstring)."""
    torch, torch_version = _torch() if torch_peer else (None, "torch not asked for (--no-torch)")
    rows = []
    for t in lengths:
        rng = np.random.default_rng(t)
        q, k, v = (
            jnp.asarray(rng.standard_normal((batch, t, n, head_dim)), jnp.float32) for n in (heads, kv_heads, kv_heads)
        )
        fns = {"zoo-blocked": _zoo("auto"), "zoo-dense": _zoo("reference")}
        want = np.asarray(_zoo("reference")["fwd"](q, k, v))
        errors = {name: _rel(f["fwd"](q, k, v), want) for name, f in fns.items()}
        if torch is not None:
            fns["torch-sdpa"], torch_out = _torch_fns(torch, q, k, v)
            errors["torch-sdpa"] = _rel(torch_out(), want)
        kernel = attention_kernel(q, AttentionSpec("full"))
        for mode in ("fwd", "fwd+bwd"):
            times = {name: [] for name in fns}
            args = {name: () if name == "torch-sdpa" else (q, k, v) for name in fns}
            for name, f in fns.items():  # warm-up (compilation)
                f[mode](*args[name])
            for _ in range(repeats):
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    f[mode](*args[name])
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            row = {"T": t, "mode": mode, "zoo_kernel": kernel, "ms": {n: 1e3 * s for n, s in med.items()}}
            row["dense_over_blocked"] = med["zoo-dense"] / med["zoo-blocked"]
            if "torch-sdpa" in med:
                row["blocked_over_torch"] = med["zoo-blocked"] / med["torch-sdpa"]
            if mode == "fwd":
                row["rel_err_vs_dense_fp32"] = errors
            rows.append(row)
            print(_row_line(row), flush=True)
    return {
        "command": "python "
        + " ".join([Path(sys.argv[0]).name if sys.argv[0] else "bench_causal_attention.py"] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "commit": _commit(),
        "torch": torch_version,
        "threads": {"xla": "all visible cores", "torch": torch.get_num_threads() if torch is not None else None},
        "shape": {"batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "dtype": "float32"},
        "repeats": repeats,
        "rows": rows,
    }


def _row_line(row) -> str:
    times = "  ".join(f"{n} {ms:8.1f} ms" for n, ms in row["ms"].items())
    torch_ratio = f"  blocked/torch {row['blocked_over_torch']:.2f}" if "blocked_over_torch" in row else ""
    return f"T={row['T']:6d} {row['mode']:8s} {times}  dense/blocked {row['dense_over_blocked']:.2f}{torch_ratio}"


def markdown(report: dict) -> str:
    """The table of the report as docs/kernels/sparse_attention.md shows it."""
    s = report["shape"]
    lines = [
        f"Measured {report['date']} on {report['machine']} (commit {report['commit']}; torch {report['torch']}, "
        f"{report['threads']['torch']} threads); B = {s['batch']}, {s['heads']} heads ({s['kv_heads']} kv) of "
        f"{s['head_dim']}, {s['dtype']}, median of {report['repeats']} runs taken in turn:",
        "",
        "| T | pass | zoo blocked (ms) | zoo dense (ms) | torch SDPA (ms) | dense / blocked | blocked / torch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        ms = r["ms"]
        torch_ms = f"{ms['torch-sdpa']:.1f}" if "torch-sdpa" in ms else "n/a"
        ratio = f"{r['blocked_over_torch']:.2f}" if "blocked_over_torch" in r else "n/a"
        lines.append(
            f"| {r['T']} | {r['mode']} | {ms['zoo-blocked']:.1f} | {ms['zoo-dense']:.1f} | {torch_ms} | "
            f"{r['dense_over_blocked']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-torch", action="store_true", help="leave out the torch-sdpa rows")
    p.add_argument("--out", default=None, help="write the report as JSON to this file")
    p.add_argument("--markdown", default=None, metavar="JSON", help="print the docs table of a report and exit")
    args = p.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    report = run(args.lengths, args.batch, args.heads, args.kv_heads, args.head_dim, args.repeats, not args.no_torch)
    print(f"torch: {report['torch']}")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
