"""Benchmark the zoo's sparse attention op (dense causal and HiP) against the peers, on the current
backend, in one run.

    .venv/bin/python scripts/bench_attention.py [--lengths 8192 32768 131072] [--heads 16]
        [--head-dim 128] [--dtype bfloat16] [--implementation auto] [--json out.jsonl]

Rows printed (and returned by `run(...)` as dicts, for scripts/bench_kernels.py):
  * time, forward and forward+backward, of the sparse op in dense-causal mode ("zoo-dense"),
    JAX's `jax.nn.dot_product_attention` (cuDNN on GPU, XLA elsewhere), splash attention on TPU,
    torch SDPA's flash kernel when torch with CUDA is importable;
  * HiP at K=32 blocks of 64, window 256, sinks 64: the search, the attention on its blocks, both
    ("zoo-hip"), and the speedup of HiP over the fastest dense peer, with the analytic FLOP ratio
    (visited blocks + the search's block scores vs dense causal) beside it;
  * block recall of the HiP search vs the exact top-k (exact block max over the searchable range)
    on inputs with attention locality (hip.locality_inputs, length scales 0 = none, 256, 1024);
  * correctness of every timed path: relative L2 error of the output (and of the gradients at the
    shortest length) against the fp32 oracle on the last `--check-rows` query rows.

Defaults: on GPU/TPU the long-context setting (B=1, H=16, P=128, bf16, T in 8K/32K/128K; a length or
peer that runs out of memory is reported as an error row); on CPU a small setting (H=2, P=64, fp32,
T in 4K/8K), where the numbers say nothing about accelerators (the zoo's default path is "xla"
there; the Pallas kernels only run interpreted).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.sparse_attention import (
    common,
    hip,
    hip_block_indices,
    sparse_attention,
)
from zoo.bench import time_fn

HIP = {"k_blocks": 32, "block_q": 64, "block_k": 64, "window": 256, "sinks": 64}


def _time(fn, args, repeats):
    """Median wall time (s) of `repeats` synchronised calls after two warm-up calls."""
    return time_fn(fn, *args, reps=repeats)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def _fwd_bwd(fn):
    """jit of the gradient of sum(fn(q, k, v)) (cotangent ones, as the GPU harness)."""
    return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2)))


def _peers(backend, heads, head_dim):
    """(name, fn(q, k, v)) of the dense causal peers available on this backend."""
    peers = []
    if backend == "gpu":
        peers.append(
            ("jax-cudnn", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
        )
    else:
        peers.append(
            ("jax-xla", lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))
        )
    if backend == "tpu":
        peers.append(("jax-splash", _splash_fn(heads, head_dim)))
    return peers


def _splash_fn(heads, head_dim):
    """JAX's splash attention (TPU) with a causal mask, in the op's [B, T, H, P] layout."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
        splash_attention_mask as sm,
    )

    kernels = {}

    def fn(q, k, v):
        t = q.shape[1]
        if t not in kernels:
            mask = sm.MultiHeadMask([sm.CausalMask((t, t)) for _ in range(heads)])
            kernels[t] = sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1)
        hm = lambda x: x.transpose(0, 2, 1, 3)
        out = jax.vmap(kernels[t])(hm(q) * head_dim**-0.5, hm(k), hm(v))
        return out.transpose(0, 2, 1, 3)

    return fn


def _torch_rows(t, heads, head_dim, repeats, q, k, v, ref_rows, check_rows):
    """torch SDPA (flash) on the same inputs: time rows and a correctness row, or []."""
    try:
        import torch  # pylint: disable=g-import-not-at-top
        from torch.nn.attention import SDPBackend, sdpa_kernel  # pylint: disable=g-import-not-at-top
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

    def to_torch(x):
        return torch.tensor(np.asarray(x, np.float32)).to("cuda", torch.bfloat16).transpose(1, 2)

    tq, tk, tv = (to_torch(x) for x in (q, k, v))

    def timed(fn):
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(repeats):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            out.append(s.elapsed_time(e))
        return statistics.median(out)

    rows = []
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        o = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        got = o.transpose(1, 2)[:, -check_rows:].float().cpu().numpy()
        rows.append({"kind": "correct", "impl": "torch-sdpa-flash", "T": t, "rel_out": _rel(got, ref_rows)})
        rows.append(
            {
                "kind": "time",
                "impl": "torch-sdpa-flash",
                "mode": "fwd",
                "T": t,
                "ms": timed(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)),
            }
        )
        qs, ks, vs = (x.detach().requires_grad_() for x in (tq, tk, tv))

        def fb():
            out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)
            torch.autograd.grad(out.float().sum(), (qs, ks, vs))

        rows.append({"kind": "time", "impl": "torch-sdpa-flash", "mode": "fwd+bwd", "T": t, "ms": timed(fb)})
    return rows


def analytic_flop_ratio(t, hip_cfg=None):
    """Dense-causal matmul FLOPs / HiP's: a visited block costs two bq x bk x P matmuls (QK^T, PV),
    a search score one (QK^T), and the search scores (rounds + 1) * k_blocks blocks per query
    block. From the window / sink slots of the pattern at length t plus min(k_blocks, searchable)
    listed blocks (assumed disjoint from them: an upper bound on HiP's work)."""
    s = dict(HIP, **(hip_cfg or {}))
    bq, bk, kk = s["block_q"], s["block_k"], s["k_blocks"]
    cfg = common.Config(
        seq_q=t,
        seq_k=t,
        block_q=bq,
        block_k=bk,
        causal=True,
        window=s["window"],
        sinks=s["sinks"],
        sm_scale=1.0,
        dense=False,
    )
    _, p_last = common.query_block_positions(cfg)
    lo, hi = hip.search_range(
        p_last, num_blocks=cfg.nk, seq_k=t, block_k=bk, window=s["window"], sinks=s["sinks"], causal=True
    )
    listed = jnp.minimum(hi - lo, kk)
    pattern = common.slot_table(None, cfg, 1, 1).n_valid[0, 0]  # window + sink blocks
    rounds = hip.search_rounds(cfg.nk, kk)
    hip_units = float(jnp.sum((listed + pattern) * 2 + (rounds + 1) * kk))
    dense = dataclasses.replace(cfg, window=None, sinks=0, dense=True)
    return 2.0 * common.visited_pairs(dense, None) / hip_units


def run(
    lengths=None,
    *,
    batch=1,
    heads=None,
    head_dim=None,
    dtype=None,
    implementation="auto",
    repeats=10,
    check_rows=512,
    recall_scales=(0.0, 256.0, 1024.0),
    recall_heads=2,
    recall_max_len=32768,
    torch_peer=True,
    recall_only=False,
    verbose=True,
):
    """Runs the benchmark; returns one dict per measurement (kind: time, speedup, recall, correct,
    error). Arguments default to the long-context GPU/TPU setting or a small CPU setting;
    `recall_only` measures only the search's recall (no timing, no dense peers)."""
    backend = jax.default_backend()
    accel = backend in ("gpu", "tpu")
    lengths = lengths or ([8192, 32768, 131072] if accel else [4096, 8192])
    heads = heads or (16 if accel else 2)
    head_dim = head_dim or (128 if accel else 64)
    dtype = jnp.dtype(dtype or (jnp.bfloat16 if accel else jnp.float32))
    rows = []

    def emit(**row):
        row.update(backend=backend, heads=heads, head_dim=head_dim, dtype=str(dtype))
        rows.append(row)
        if verbose:
            print(json.dumps(row, default=str), flush=True)

    def guarded(label, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- an OOM or a failed peer is a finding
            emit(
                kind="error", what=label, error=f"{type(e).__name__}: {str(e)[:400]}", tb=traceback.format_exc()[-800:]
            )

    zoo = {"implementation": implementation}
    dense_zoo = lambda q, k, v: sparse_attention(q, k, v, causal=True, **zoo)
    search = lambda q, k: hip_block_indices(q, k, causal=True, **HIP, **zoo)
    kw_att = {n: HIP[n] for n in ("block_q", "block_k", "window", "sinks")}
    attend = lambda q, k, v, bi: sparse_attention(q, k, v, block_indices=bi, causal=True, **kw_att, **zoo)
    hip_total = lambda q, k, v: attend(q, k, v, search(q, k))
    peers = _peers(backend, heads, head_dim)

    def one_length(t):
        if recall_only:
            for scale in recall_scales:
                guarded(
                    f"recall {t} {scale}",
                    lambda scale=scale: _recall_row(emit, t, scale, recall_heads, head_dim, dtype, implementation),
                )
            return
        flops = 4 * t * t * heads * head_dim / 2 * batch  # causal
        key = jax.random.key(t)
        q, k = hip.locality_inputs(
            key, batch=batch, seq=t, heads=heads, kv_heads=heads, head_dim=head_dim, length_scale=1024.0, dtype=dtype
        )
        v = jax.random.normal(jax.random.fold_in(key, 1), k.shape, jnp.float32).astype(dtype)
        times = {}

        def timed(name, mode, fn, args):
            sec = _time(fn, args, repeats)
            times[(name, mode)] = sec
            factor = 3.5 if mode == "fwd+bwd" else 1.0
            emit(kind="time", impl=name, mode=mode, T=t, ms=sec * 1e3, tflops_dense_equiv=factor * flops / sec / 1e12)

        # The fp32 oracle on the last rows (queries aligned to the end of the keys).
        rq = q[:, -check_rows:]
        f32 = lambda x: x.astype(jnp.float32)
        ref_dense = jax.jit(
            lambda q, k, v: sparse_attention(f32(q), f32(k), f32(v), causal=True, implementation="reference")
        )

        def check(name, out, ref):
            emit(kind="correct", impl=name, T=t, rel_out=_rel(out[:, -check_rows:], ref))

        guarded(
            f"zoo-dense {t}",
            lambda: (
                timed("zoo-dense", "fwd", jax.jit(dense_zoo), (q, k, v)),
                timed("zoo-dense", "fwd+bwd", _fwd_bwd(dense_zoo), (q, k, v)),
                check("zoo-dense", jax.jit(dense_zoo)(q, k, v), ref_dense(rq, k, v)),
            ),
        )
        for name, fn in peers:
            guarded(
                f"{name} {t}",
                lambda name=name, fn=fn: (
                    timed(name, "fwd", jax.jit(fn), (q, k, v)),
                    timed(name, "fwd+bwd", _fwd_bwd(fn), (q, k, v)),
                    check(name, jax.jit(fn)(q, k, v), ref_dense(rq, k, v)),
                ),
            )
        if torch_peer and backend == "gpu":
            guarded(
                f"torch {t}",
                lambda: [
                    emit(**r)
                    for r in _torch_rows(t, heads, head_dim, repeats, q, k, v, ref_dense(rq, k, v), check_rows)
                ],
            )

        def hip_rows():
            bi = jax.jit(search)(q, k)
            timed("zoo-hip-search", "fwd", jax.jit(search), (q, k))
            timed("zoo-hip-attention", "fwd", jax.jit(attend), (q, k, v, bi))
            timed("zoo-hip", "fwd", jax.jit(hip_total), (q, k, v))
            timed("zoo-hip", "fwd+bwd", _fwd_bwd(hip_total), (q, k, v))
            nq_rows = check_rows // HIP["block_q"]
            ref = jax.jit(
                lambda q, k, v, bi: sparse_attention(
                    f32(q), f32(k), f32(v), block_indices=bi, causal=True, implementation="reference", **kw_att
                )
            )(rq, k, v, bi[:, :, -nq_rows:])
            check("zoo-hip", jax.jit(attend)(q, k, v, bi), ref)

        guarded(f"zoo-hip {t}", hip_rows)
        # HiP (search + attention) against the fastest dense peer of this run.
        for mode in ("fwd", "fwd+bwd"):
            dense_t = {n: s for (n, m), s in times.items() if m == mode and not n.startswith("zoo")}
            if ("zoo-hip", mode) in times and dense_t:
                best = min(dense_t, key=dense_t.get)
                emit(
                    kind="speedup",
                    T=t,
                    mode=mode,
                    vs=best,
                    hip_over_dense=dense_t[best] / times[("zoo-hip", mode)],
                    zoo_dense_over_peer=times.get(("zoo-dense", mode), float("nan")) / dense_t[best],
                    analytic_flop_ratio=analytic_flop_ratio(t),
                )

        # Recall of the search on locality data (exact block max over a few heads).
        if t <= recall_max_len:
            for scale in recall_scales:
                guarded(
                    f"recall {t} {scale}",
                    lambda scale=scale: _recall_row(emit, t, scale, recall_heads, head_dim, dtype, implementation),
                )

    for t in lengths:
        one_length(t)

    if recall_only:
        return rows
    # Gradient correctness at the shortest length (the dense oracle's T^2 memory allows it).
    t = min(lengths)
    guarded(
        f"grads {t}",
        lambda: _grad_rows(emit, t, batch, heads, head_dim, dtype, implementation, dense_zoo, attend, search, peers),
    )
    return rows


def _recall_row(emit, t, scale, heads, head_dim, dtype, implementation):
    q, k = hip.locality_inputs(
        jax.random.key(int(scale) + 7),
        batch=1,
        seq=t,
        heads=heads,
        kv_heads=heads,
        head_dim=head_dim,
        length_scale=scale,
        dtype=dtype,
    )
    found = jax.jit(lambda q, k: hip_block_indices(q, k, causal=True, implementation=implementation, **HIP))(q, k)
    scores = jax.jit(lambda q, k: hip.exact_block_scores(q, k, block_q=HIP["block_q"], block_k=HIP["block_k"]))(q, k)
    exact, n_search = hip.exact_top_blocks(scores, seq_q=t, seq_k=t, **HIP)
    emit(
        kind="recall",
        T=t,
        length_scale=scale,
        recall_heads=heads,
        recall=hip.block_recall(found, exact, n_search, HIP["k_blocks"]),
    )


def _grad_rows(emit, t, batch, heads, head_dim, dtype, implementation, dense_zoo, attend, search, peers):
    key = jax.random.key(3)
    q, k = hip.locality_inputs(
        key, batch=batch, seq=t, heads=heads, kv_heads=heads, head_dim=head_dim, length_scale=1024.0, dtype=dtype
    )
    v = jax.random.normal(jax.random.fold_in(key, 1), k.shape, jnp.float32).astype(dtype)
    f32 = lambda x: x.astype(jnp.float32)
    bi = jax.jit(lambda q, k: search(q, k))(q, k)
    kw_att = {n: HIP[n] for n in ("block_q", "block_k", "window", "sinks")}
    ref_dense = lambda q, k, v: sparse_attention(q, k, v, causal=True, implementation="reference")
    ref_hip = lambda q, k, v: sparse_attention(
        q, k, v, block_indices=bi, causal=True, implementation="reference", **kw_att
    )
    cases = [("zoo-dense", dense_zoo, ref_dense), ("zoo-hip", lambda q, k, v: attend(q, k, v, bi), ref_hip)]
    cases += [(name, fn, ref_dense) for name, fn in peers]
    for name, fn, ref in cases:
        got = _fwd_bwd(fn)(q, k, v)
        want = _fwd_bwd(ref)(f32(q), f32(k), f32(v))
        emit(kind="correct", impl=name, T=t, rel_grad=max(_rel(a, b) for a, b in zip(got, want)))
    del implementation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--head-dim", type=int, default=None)
    parser.add_argument("--dtype", default=None, help="default bfloat16 on GPU/TPU, float32 on CPU")
    parser.add_argument("--implementation", default="auto", help="the zoo op's implementation")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--check-rows", type=int, default=512)
    parser.add_argument("--recall-max-len", type=int, default=32768)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument(
        "--recall-only", action="store_true", help="only the search's block recall (e.g. long T on CPU)"
    )
    parser.add_argument("--recall-heads", type=int, default=2)
    parser.add_argument(
        "--recall-scales",
        type=float,
        nargs="+",
        default=[0.0, 256.0, 1024.0],
        help="length scales (tokens) of the locality inputs; 0 = white noise",
    )
    parser.add_argument("--json", default=None, help="also append the rows to this JSONL file")
    args = parser.parse_args()
    rows = run(
        args.lengths,
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        dtype=args.dtype,
        implementation=args.implementation,
        repeats=args.repeats,
        check_rows=args.check_rows,
        recall_max_len=args.recall_max_len,
        recall_heads=args.recall_heads,
        recall_scales=tuple(args.recall_scales),
        torch_peer=not args.no_torch,
        recall_only=args.recall_only,
    )
    print("\nsummary")
    for r in rows:
        if r["kind"] == "time":
            print(f"  T={r['T']:>6} {r['impl']:<20} {r['mode']:<8} {r['ms']:10.2f} ms")
        elif r["kind"] == "speedup":
            print(
                f"  T={r['T']:>6} {r['mode']:<8} HiP / {r['vs']}: {r['hip_over_dense']:.2f}x "
                f"(analytic FLOP ratio {r['analytic_flop_ratio']:.2f}x); zoo dense / "
                f"{r['vs']}: {r['zoo_dense_over_peer']:.2f}x the time"
            )
        elif r["kind"] == "recall":
            print(f"  T={r['T']:>6} recall {r['recall']:.3f} (length scale {r['length_scale']:.0f})")
        elif r["kind"] == "correct":
            errs = ", ".join(f"{n} {r[n]:.1e}" for n in ("rel_out", "rel_grad") if n in r)
            print(f"  T={r['T']:>6} {r['impl']:<20} {errs}")
        elif r["kind"] == "error":
            print(f"  error: {r['what']}: {r['error'][:200]}")
    if args.json:
        with open(args.json, "a") as f:
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")


if __name__ == "__main__":
    main()
