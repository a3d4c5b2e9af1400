"""HiP's block search with both scorings on the same inputs: the paper's representative keys
("representative", the default) and the exact tile max ("block_max").

    python scripts/hip_search_quality.py [--out results/hip_search]

Writes results/hip_search/hip_search_quality.json (stamped with the git commit, date, CPU, jax
version, seeds and wall time) and prints the markdown tables that docs/models/hip.md and
docs/kernels/sparse_attention.md show between their `hip_search_quality` markers
(`render_tables`; tests/kernels/test_hip_search_docs.py keeps the docs equal to the JSON).
Measured, for each scoring:
* search quality on queries and keys with attention locality (`hip.locality_inputs`) at the
  benchmark setting (k_blocks = 32 blocks of 64, window 256, sinks 64): the attention mass
  captured by the found blocks relative to the exact top-k blocks by mass, and block recall
  against the exact top-k by block max, over the query blocks where the search has a choice;
* matmul FLOPs of search + attention vs dense causal attention at 8K, 32K and 128K
  (`hip.matmul_flops`, analytic);
* logits of `hip` vs the dense `transformer` it is converted from (the same parameters): the
  largest |logit difference|, top-1 agreement and perplexity, on the converted golden fixtures
  (tests/fixtures/golden, random-weight Llama / Qwen2 checkpoints) and on a small byte-level
  transformer trained here on Python source text.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import zoo
from pallas_kernels.sparse_attention import hip, hip_block_indices
from zoo.convert import convert_model
from zoo.convert.pretrained import import_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "results", "hip_search")
SETTING = {"k_blocks": 32, "block_q": 64, "block_k": 64, "window": 256, "sinks": 64}
LENGTHS = (8192, 16384)
SCALES = (0.0, 256.0, 1024.0)
FLOP_LENGTHS = (8192, 32768, 131072)
GOLDEN = ("llama", "qwen2")
# HiP on the 24-token golden inputs: 6 key blocks of 4, one kept, a 4-token window, one sink.
GOLDEN_HIP = {"k_blocks": 1, "block_q": 4, "block_k": 4, "window": 4, "sinks": 1, "dense_below": 0}
# The trained transformer and HiP on its 256-token windows: 16 key blocks of 16, four kept.
TRAINED = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 192}
TRAIN = {"seq_len": 256, "batch": 8, "steps": 300, "lr": 3e-3, "eval_windows": 16}
TRAINED_HIP = {"k_blocks": 4, "block_q": 16, "block_k": 16, "window": 32, "sinks": 16, "dense_below": 0}
SEED = 0
BEGIN, END = "<!-- hip_search_quality: begin -->", "<!-- hip_search_quality: end -->"


# ----------------------------------------------------------------------------- search quality


def block_mass(q, k, *, block_q: int, block_k: int, chunk: int = 4):
    """Causal softmax attention mass of every (query block, key block): fp32 [B, H, nq, nk], the
    sum over the block's rows and keys of softmax(q . k / sqrt(P)) (each row sums to 1)."""
    b, t, h, p = q.shape
    nq, nk = -(-t // block_q), -(-t // block_k)
    nc = -(-nq // chunk)
    qh = jnp.pad(jnp.swapaxes(q, 1, 2), ((0, 0), (0, 0), (0, nc * chunk * block_q - t), (0, 0)))
    qh = jnp.moveaxis(qh.reshape(b, h, nc, chunk * block_q, p), 2, 0)
    kh = jnp.repeat(jnp.swapaxes(k, 1, 2), h // k.shape[2], axis=1)
    kh = jnp.pad(kh, ((0, 0), (0, 0), (0, nk * block_k - t), (0, 0)))
    kpos = jnp.arange(nk * block_k)

    def one(args):
        c, qc = args
        rows = c * chunk * block_q + jnp.arange(chunk * block_q)
        s = jnp.einsum("bhrp,bhtp->bhrt", qc, kh) * p**-0.5
        s = jnp.where((kpos[None, :] <= rows[:, None]) & (kpos[None, :] < t), s, -jnp.inf)
        w = jax.nn.softmax(s, axis=-1)
        w = jnp.where((rows < t)[:, None], w, 0.0)
        return w.reshape(b, h, chunk, block_q, nk, block_k).sum(axis=(3, 5))

    out = jax.lax.map(one, (jnp.arange(nc), qh))  # [nc, B, H, chunk, nk]
    return jnp.moveaxis(out, 0, 2).reshape(b, h, nc * chunk, nk)[:, :, :nq]


def mass_ratio(found, mass, best, n_search, k_blocks: int) -> float:
    """Mean over query blocks with a choice (more than k_blocks searchable) of the mass in the found
    blocks / the mass in the best k_blocks blocks."""
    found, mass, best = np.asarray(found), np.asarray(mass), np.asarray(best)
    rows = np.asarray(n_search) > k_blocks
    got = np.where(found >= 0, np.take_along_axis(mass, np.maximum(found, 0), axis=-1), 0.0).sum(-1)
    top = np.where(best >= 0, np.take_along_axis(mass, np.maximum(best, 0), axis=-1), 0.0).sum(-1)
    return float(np.mean(got[:, :, rows] / np.maximum(top[:, :, rows], 1e-30)))


def search_quality(lengths=LENGTHS, scales=SCALES, *, heads=2, head_dim=64, seed=SEED) -> list[dict]:
    """Mass captured and block recall of both scorings on the same locality inputs."""
    rows = []
    kk = SETTING["k_blocks"]
    for t in lengths:
        for scale in scales:
            t0 = time.perf_counter()
            q, k = hip.locality_inputs(
                jax.random.key(seed + int(scale)),
                batch=1,
                seq=t,
                heads=heads,
                kv_heads=heads,
                head_dim=head_dim,
                length_scale=scale,
            )
            bq, bk = SETTING["block_q"], SETTING["block_k"]
            scores = jax.jit(lambda q, k: hip.exact_block_scores(q, k, block_q=bq, block_k=bk))(q, k)
            exact, n_search = hip.exact_top_blocks(scores, seq_q=t, seq_k=t, **SETTING)
            mass = jax.jit(lambda q, k: block_mass(q, k, block_q=bq, block_k=bk))(q, k)
            best, _ = hip.exact_top_blocks(mass, seq_q=t, seq_k=t, **SETTING)
            for scoring in hip.SCORINGS:
                found = jax.jit(lambda q, k: hip_block_indices(q, k, scoring=scoring, implementation="xla", **SETTING))(
                    q, k
                )
                rows.append(
                    {
                        "T": t,
                        "length_scale": scale,
                        "scoring": scoring,
                        "mass_vs_exact_top_k": mass_ratio(found, mass, best, n_search, kk),
                        "block_recall": hip.block_recall(found, exact, n_search, kk),
                    }
                )
            print(f"search T={t} scale={scale}: {rows[-2:]} ({time.perf_counter() - t0:.0f}s)", flush=True)
    return rows


def flops() -> list[dict]:
    rows = []
    for t in FLOP_LENGTHS:
        for scoring in hip.SCORINGS:
            f = hip.matmul_flops(t, scoring=scoring, **SETTING)
            rows.append(
                {
                    "T": t,
                    "scoring": scoring,
                    "rounds": hip.search_rounds(-(-t // SETTING["block_k"]), SETTING["k_blocks"]),
                    "search_over_attention": f["search"] / f["attention"],
                    "dense_over_attention": f["dense"] / f["attention"],
                    "dense_over_hip": f["dense"] / (f["search"] + f["attention"]),
                }
            )
    return rows


# ----------------------------------------------------------------------------- models


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def compare_logits(dense, sparse, tokens) -> dict:
    """|logit difference|, top-1 agreement and next-token perplexity of both on tokens [N, T]."""
    a = np.concatenate([np.asarray(_logits(dense, tokens[i : i + 1]), np.float64) for i in range(len(tokens))])
    b = np.concatenate([np.asarray(_logits(sparse, tokens[i : i + 1]), np.float64) for i in range(len(tokens))])
    labels = np.asarray(tokens)[:, 1:]

    def ppl(x):
        lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        nll = lse[:, :-1] - np.take_along_axis(x[:, :-1], labels[..., None], axis=-1)[..., 0]
        return float(np.exp(nll.mean()))

    return {
        "max_abs_logit_diff": float(np.abs(a - b).max()),
        "mean_abs_logit_diff": float(np.abs(a - b).mean()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "ppl_dense": ppl(a),
        "ppl_hip": ppl(b),
    }


def golden_rows() -> list[dict]:
    """HiP converted from the golden Llama-family checkpoints vs the dense conversion."""
    rows = []
    for name in GOLDEN:
        src = os.path.join(ROOT, "tests", "fixtures", "golden", name)
        with np.load(os.path.join(src, "golden.npz")) as z:
            tokens = jnp.asarray(z["input_ids"])
        dense, _ = import_checkpoint(src, "hf", "transformer")
        for scoring in hip.SCORINGS:
            sparse = convert_model(dense, "hip", scoring=scoring, **GOLDEN_HIP)
            rows.append({"model": f"golden {name}", "T": int(tokens.shape[1]), "scoring": scoring})
            rows[-1].update(compare_logits(dense, sparse, tokens))
    return rows


def python_source_bytes(limit: int = 4_000_000) -> np.ndarray:
    """The Python standard library's .py files (sorted, concatenated) as bytes, up to `limit`."""
    out, n = [], 0
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(path, "rb") as f:
            data = f.read()
        out.append(data)
        n += len(data)
        if n >= limit:
            break
    return np.frombuffer(b"".join(out)[:limit], np.uint8).astype(np.int32)


def trained_rows(seed: int = SEED) -> tuple[list[dict], dict]:
    """Trains a small byte-level transformer on Python source, then compares HiP with it."""
    data = python_source_bytes()
    split = int(0.9 * len(data))
    train, held = data[:split], data[split:]
    t, steps = TRAIN["seq_len"], TRAIN["steps"]
    model = zoo.create_model("transformer", seed=seed, **TRAINED)
    opt = nnx.Optimizer(
        model, optax.adamw(optax.cosine_decay_schedule(TRAIN["lr"], steps), weight_decay=0.1), wrt=nnx.Param
    )

    @nnx.jit
    def step(model, opt, tokens):
        def loss_fn(m):
            logits = m(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    loss = float("nan")
    for i in range(steps):
        starts = rng.integers(0, len(train) - t - 1, TRAIN["batch"])
        loss = float(step(model, opt, jnp.asarray(np.stack([train[s : s + t + 1] for s in starts]))))
        if i % 100 == 0 or i == steps - 1:
            print(f"train step {i}: loss {loss:.3f}", flush=True)
    train_s = time.perf_counter() - t0
    starts = rng.integers(0, len(held) - t, TRAIN["eval_windows"])
    tokens = jnp.asarray(np.stack([held[s : s + t] for s in starts]))
    rows = []
    for scoring in hip.SCORINGS:
        sparse = convert_model(model, "hip", scoring=scoring, **TRAINED_HIP)
        rows.append({"model": "trained byte-level transformer", "T": t, "scoring": scoring})
        rows[-1].update(compare_logits(model, sparse, tokens))
    return rows, {"final_train_loss": loss, "train_seconds": train_s}


# ----------------------------------------------------------------------------- output


def provenance(seeds, wall: float) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "zoo_version": zoo.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "jax_version": jax.__version__,
        "python_version": platform.python_version(),
        "backend": jax.default_backend(),
        "seeds": list(seeds),
        "wall_seconds": round(wall, 1),
        "command": "python scripts/hip_search_quality.py",
    }


def run(out_dir: str = OUT) -> dict:
    """Measures everything and writes out_dir/hip_search_quality.json; returns the result."""
    t0 = time.perf_counter()
    models = golden_rows()
    trained, training = trained_rows()
    result = {
        "settings": {
            "search": SETTING,
            "locality_inputs": {"batch": 1, "heads": 2, "head_dim": 64, "lengths": list(LENGTHS)},
            "golden_hip": GOLDEN_HIP,
            "trained_model": TRAINED,
            "training": TRAIN,
            "trained_hip": TRAINED_HIP,
            "scorings": {"representative": {"rep_keys": 2, "query_stride": 2}, "block_max": {}},
        },
        "search_quality": search_quality(),
        "flops": flops(),
        "models": models + trained,
        "training": training,
    }
    result["provenance"] = provenance([SEED], time.perf_counter() - t0)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "hip_search_quality.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return result


def render_tables(result: dict) -> str:
    """The markdown the docs show between the `hip_search_quality` markers."""
    p = result["provenance"]
    s = result["settings"]["search"]
    lines = [
        f"Search quality at k_blocks = {s['k_blocks']} blocks of {s['block_k']}, window {s['window']}, "
        f"sinks {s['sinks']} (`hip.locality_inputs`, B = 1, 2 heads, P = 64, fp32, seed {p['seeds'][0]}; "
        "ℓ = 0 is white noise). Mass: attention mass in the found blocks / in the best k_blocks blocks "
        "by mass; recall: of the exact top-k_blocks by block max.",
        "",
        "| T | ℓ | mass, representative | mass, block_max | recall, representative | recall, block_max |",
        "|---|---|---|---|---|---|",
    ]
    sq = {(r["T"], r["length_scale"], r["scoring"]): r for r in result["search_quality"]}
    for t, scale in dict.fromkeys((r["T"], r["length_scale"]) for r in result["search_quality"]):
        rep, tile = sq[(t, scale, "representative")], sq[(t, scale, "block_max")]
        lines.append(
            f"| {t // 1024}K | {scale:g} | {rep['mass_vs_exact_top_k']:.3f} | {tile['mass_vs_exact_top_k']:.3f} | "
            f"{rep['block_recall']:.3f} | {tile['block_recall']:.3f} |"
        )
    lines += [
        "",
        "Matmul FLOPs, dense causal attention / HiP (`hip.matmul_flops`, analytic, same setting):",
        "",
        "| T | rounds | dense / attention only | search / attention, representative | search / attention, "
        "block_max | **dense / (search + attention), representative** | dense / (search + attention), block_max |",
        "|---|---|---|---|---|---|---|",
    ]
    fl = {(r["T"], r["scoring"]): r for r in result["flops"]}
    for t in dict.fromkeys(r["T"] for r in result["flops"]):
        rep, tile = fl[(t, "representative")], fl[(t, "block_max")]
        lines.append(
            f"| {t // 1024}K | {rep['rounds']} | {rep['dense_over_attention']:.2f} | "
            f"{rep['search_over_attention']:.3f} | {tile['search_over_attention']:.2f} | "
            f"**{rep['dense_over_hip']:.2f}** | {tile['dense_over_hip']:.2f} |"
        )
    g, tr = result["settings"]["golden_hip"], result["settings"]["trained_hip"]
    lines += [
        "",
        f"HiP vs the dense model it is converted from (same parameters): golden fixtures with "
        f"k_blocks = {g['k_blocks']} of {g['block_k']}, window {g['window']}, sinks {g['sinks']}; the trained "
        f"transformer ({result['settings']['training']['steps']} steps, final train loss "
        f"{result['training']['final_train_loss']:.3f} nats/byte) on held-out "
        f"{result['settings']['training']['seq_len']}-byte windows with "
        f"k_blocks = {tr['k_blocks']} of {tr['block_k']}, window {tr['window']}, sinks {tr['sinks']}.",
        "",
        "| model | T | scoring | max abs logit diff | mean abs logit diff | top-1 agreement | ppl dense | ppl HiP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["models"]:
        lines.append(
            f"| {r['model']} | {r['T']} | {r['scoring']} | {r['max_abs_logit_diff']:.3g} | "
            f"{r['mean_abs_logit_diff']:.3g} | {r['top1_agreement']:.3f} | {r['ppl_dense']:.3f} | {r['ppl_hip']:.3f} |"
        )
    lines += [
        "",
        f"(`{p['command']}`: commit {p['git_commit'][:10]}, {p['date'][:10]}, {p['cpu']}, {p['cpu_cores']} "
        f"cores, jax {p['jax_version']}, {p['wall_seconds']:.0f} s.)",
    ]
    return "\n".join(lines)


def docs_block(path: str) -> str:
    """The text between the `hip_search_quality` markers of a docs file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip("\n")


def write_docs(result: dict, paths) -> None:
    """Replaces the text between the markers of every docs file with `render_tables(result)`."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        head, tail = text[: text.index(BEGIN) + len(BEGIN)], text[text.index(END) :]
        with open(path, "w", encoding="utf-8") as f:
            f.write(f"{head}\n{render_tables(result)}\n{tail}")


DOCS = ("docs/models/hip.md", "docs/kernels/sparse_attention.md")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT, help="results folder (default: results/hip_search)")
    parser.add_argument("--docs", action="store_true", help="also rewrite the docs' tables from the new JSON")
    args = parser.parse_args(argv)
    result = run(args.out)
    print(render_tables(result))
    if args.docs:
        write_docs(result, [os.path.join(ROOT, d) for d in DOCS])


if __name__ == "__main__":
    sys.exit(main())
