"""Every kernel beside its peers, in one run on the current backend: the GPU/TPU benchmark of the kernels.

    .venv/bin/python scripts/bench_kernels.py [--smoke] [--json rows.jsonl]

Runs `bench_ssd.run` (zoo pallas / xla vs mamba_ssm's Triton SSD when importable), `bench_attention.run`
(the sparse op in dense-causal mode and HiP search + attention vs JAX's cuDNN / XLA attention, splash
on TPU, torch SDPA when importable, and HiP's block recall) and `bench_cauchy.run` (the Cauchy and
Vandermonde paths), each with the correctness of every path measured on the same inputs, then prints
one summary: zoo time / best peer time per case. Peers are imported here only, never by the package.
`--smoke` uses tiny shapes (the CPU check of this script; Pallas runs interpreted, so CPU times say
nothing about accelerators). Record the device, versions and date with the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import bench_attention
import bench_cauchy
import bench_ssd
import jax


def summary(rows: list[dict]) -> list[str]:
    """Lines `op | case | mode | zoo ms | best peer | ms | zoo / peer` from the timing rows."""
    lines = ["| op | case | mode | zoo | ms | best peer | ms | zoo / peer |", "|---|---|---|---|---|---|---|---|"]
    timed = [r for r in rows if r.get("kind") == "time" and ("seconds" in r or "ms" in r)]
    ms = lambda r: r["seconds"] * 1e3 if "seconds" in r else r["ms"]  # noqa: E731
    cases = {}
    for r in timed:
        case = (r.get("op", "attention"), str(r.get("shape", r.get("T", ""))), r.get("mode", "fwd"))
        cases.setdefault(case, []).append(r)
    for (op, case, mode), rs in cases.items():
        zoo = [r for r in rs if str(r["impl"]).startswith("zoo")]
        peers = [r for r in rs if not str(r["impl"]).startswith("zoo")]
        for z in zoo:
            best = min(peers, key=ms) if peers else None
            ratio = f"{ms(z) / ms(best):.2f}" if best else "-"
            lines.append(
                f"| {op} | {case} | {mode} | {z['impl']} | {ms(z):.3f} | {best['impl'] if best else '-'} | "
                f"{ms(best) if best else float('nan'):.3f} | {ratio} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (tests this script on CPU)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="", help="also write every row to this JSON-lines file")
    args = parser.parse_args()
    head = {
        "date": datetime.date.today().isoformat(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [d.device_kind for d in jax.devices()][:1],
        "python": platform.python_version(),
    }
    print(json.dumps(head))
    reps = 2 if args.smoke else args.repeats
    ssd_shapes = [bench_ssd.Shape(1, 64, 2, 16, 16, 1, 32)] if args.smoke else None
    rows = bench_ssd.run(shapes=ssd_shapes, dtypes=("float32",) if args.smoke else ("bfloat16",), repeats=reps)
    rows += bench_attention.run(
        [256] if args.smoke else None,
        heads=2 if args.smoke else None,
        head_dim=32 if args.smoke else None,
        repeats=reps,
        recall_max_len=256 if args.smoke else 32768,
        torch_peer=not args.smoke,
        verbose=False,
    )
    rows += [
        dict(r, impl=f"zoo-{r['impl']}", mode="fwd+bwd", ms=r["fb_ms"], shape=f"B{r['batch']} N{r['N']} L{r['L']}")
        for r in bench_cauchy.run(
            shapes=((8, 64),) if args.smoke else ((64, 4096), (64, 16384)),
            batch=2 if args.smoke else 256,
            repeats=reps,
            verbose=False,
        )
    ]
    bench_ssd.print_rows([r for r in rows if r.get("op") == "ssd"])
    print()
    print("\n".join(summary(rows)))
    errors = [r for r in rows if r.get("kind") == "error"]
    for r in errors:
        print(f"error: {r.get('what')}: {r.get('error')}")
    if args.json:
        with open(args.json, "w") as f:
            for r in [head, *rows]:
                f.write(json.dumps(r, default=str) + "\n")


if __name__ == "__main__":
    main()
