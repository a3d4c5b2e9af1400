"""Benchmarks measured in one run: the timing helpers every benchmark script uses, and the training
step's throughput and model-FLOP utilisation (`zoo bench train`).

    t = time_fn(jitted, *args)                 # median seconds after warm-up, synchronised
    peak = matmul_flops(jnp.bfloat16)          # the device's matmul FLOP/s, measured here
    rows = bench_train(["mamba2:130m"])        # at the preset's own batch x length (data.batch_size, data.seq_len)
    rows = bench_train(["mamba2:130m"], batch_size=16, seq_len=2048)

MFU is model FLOPs per second over the matmul peak measured in the same process: "6N" counts
6 x parameters x tokens (forward + backward of every weight matmul); "attn" adds the attention
score and value matmuls of the layer schedule (12 x layers x heads x head_dim x T / 2 per token for
causal full attention, less for window / block layers). Nothing here asserts a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zoo.config import load_config
from zoo.models import registry
from zoo.train import step as train_step
from zoo.train.memory import compiled_memory


def time_fn(fn: Callable, *args, reps: int = 10, warmup: int = 2) -> float:
    """Median wall time in seconds of `fn(*args)` (synchronised with block_until_ready)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def relative_error(a, b) -> float:
    """||a - b|| / ||b|| in float64 (nan when a has a non-finite entry)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    return float(np.linalg.norm(a - b) / (np.linalg.norm(b) + 1e-30))


def matmul_flops(dtype=jnp.bfloat16, n: int | None = None, reps: int = 10) -> float:
    """FLOP/s of an n x n x n matmul on the default device (n: 8192 on accelerators, 1024 on CPU)."""
    n = n or (8192 if jax.default_backend() in ("gpu", "tpu") else 1024)
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    return 2 * n**3 / time_fn(jax.jit(jnp.matmul), a, b, reps=reps)


def attention_train_flops_per_token(cfg: Any, seq_len: int) -> float:
    """Training FLOPs per token of the attention matmuls (3 x forward; 0 for attention-free models)."""
    if not hasattr(cfg, "layer_specs"):
        return 0.0
    from zoo.models.transformer import attention_flops

    return 3.0 * attention_flops(cfg, seq_len)["total"] / seq_len


def bench_config(spec: str, batch_size: int, seq_len: int, dtype: str, overrides: Sequence[str]):
    """The run config `spec` at this batch, length and dtype on passkey data (then `overrides`)."""
    ov = [
        f"--config.data.batch_size={batch_size}",
        f"--config.data.seq_len={seq_len}",
        "--config.data.mode=fixed",
        f"--config.model.dtype={dtype}",
        "--config.data.source=passkey",
        *overrides,
    ]
    return load_config(spec, ov)


def run_shape(spec: str, overrides: Sequence[str] = ()) -> tuple[int, int]:
    """(global batch, sequence length) a run config trains at: data.batch_size x data.seq_len, or
    for decomposition the longest bucket (2^max_log2) with tokens_per_step of it. A ValueError
    names an unknown model, preset or key."""
    d = load_config(spec, overrides).data
    if d.mode == "decomposition":
        seq_len = 1 << int(d.max_log2)
        return max(1, int(d.tokens_per_step) // seq_len), seq_len
    return int(d.batch_size), int(d.seq_len)


def train_step_runner(config) -> tuple[Callable[[], dict], int, dict | None]:
    """The trainer's own jitted step (`make_setup` + `make_train_step`) on random tokens of the run
    config's data.batch_size x data.seq_len, ready to call: (run() -> metrics, parameters, the
    compiled step's memory analysis). Each call of `run` is one optimizer step."""
    n_rows, length = int(config.data.batch_size), int(config.data.seq_len)
    setup = train_step.make_setup(config)
    params = setup.init_params()
    n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    opt_sh = setup.opt_shardings(jax.eval_shape(setup.tx.init, params))
    opt_state = jax.jit(setup.tx.init, out_shardings=opt_sh)(params)
    step = train_step.make_train_step(setup, opt_sh)
    vocab = registry.config_from_run(config).vocab_size
    toks = np.random.default_rng(0).integers(0, vocab, (n_rows, length + 1)).astype(np.int32)
    batch = train_step.global_batch(
        {
            "inputs": toks[:, :-1],
            "targets": toks[:, 1:],
            "loss_mask": np.ones((n_rows, length), np.float32),
            "answer_mask": np.zeros((n_rows, length), np.float32),
        },
        setup.mesh,
    )
    memory = compiled_memory(step.lower(params, opt_state, batch).compile())
    state = [params, opt_state]

    def run():
        state[0], state[1], metrics = step(state[0], state[1], batch)
        return metrics

    return run, n, memory


def bench_train(
    specs: Sequence[str],
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    overrides: Sequence[str] = (),
    reps: int = 5,
    peak: float | None = None,
    dtype: str | None = None,
) -> list[dict]:
    """Times the trainer's own jitted step (`make_setup` + `make_train_step`) on random tokens.

    Args:
      specs: run configs, e.g. ["mamba2:130m", "transformer:1.3b"].
      batch_size, seq_len: the step's global batch (None: each preset's own, `run_shape`).
      overrides: extra --config.* overrides (e.g. "--config.model.remat=full").
      peak: matmul FLOP/s to compare with (measured here when None).
      dtype: compute dtype override ("bfloat16" on accelerators by default).

    Returns:
      One dict per spec: step seconds, tokens/s, parameters, 6N and attention-inclusive MFU, the
      compiled peak memory, the loss, or {"error": ...} when it failed (e.g. out of memory).
    """
    shapes = {spec: run_shape(spec, overrides) for spec in specs}  # a bad name fails before any timing
    dtype = dtype or ("bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32")
    peak = peak or matmul_flops(jnp.dtype(dtype))
    rows = []
    for spec in specs:
        n_rows, length = batch_size or shapes[spec][0], seq_len or shapes[spec][1]
        row: dict[str, Any] = {
            "config": spec,
            "batch": n_rows,
            "seq_len": length,
            "dtype": dtype,
            "backend": jax.default_backend(),
            "matmul_tflops": peak / 1e12,
        }
        try:
            config = bench_config(spec, n_rows, length, dtype, overrides)
            run, n, memory = train_step_runner(config)
            t = time_fn(run, reps=reps, warmup=1)
            tokens = n_rows * length / t
            attn = attention_train_flops_per_token(registry.config_from_run(config), length)
            row.update(
                params=n,
                step_ms=t * 1e3,
                tokens_per_s=tokens,
                mfu_6n=6 * n * tokens / peak,
                mfu_attn=(6 * n + attn) * tokens / peak,
                memory=memory,
                loss=float(jax.device_get(run()["loss"])),
            )
        except Exception as e:  # noqa: BLE001 -- a failing config is a finding, the others still run
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        rows.append(row)
    return rows


def compile_train_memory(
    spec: str,
    *,
    batch_size: int | None = None,
    seq_len: int | None = None,
    overrides: Sequence[str] = (),
    dtype: str = "bfloat16",
) -> dict:
    """XLA's memory analysis of the compiled training step, without allocating anything: the step is
    lowered on abstract parameters, optimizer state and batch (what `zoo bench train --compile-only`
    prints; on CPU the numbers are the CPU compiler's, indicative of, not equal to, a GPU's).
    `batch_size`, `seq_len`: None for the preset's own (`run_shape`)."""
    own = run_shape(spec, overrides)
    batch_size, seq_len = batch_size or own[0], seq_len or own[1]
    config = bench_config(spec, batch_size, seq_len, dtype, overrides)
    setup = train_step.make_setup(config)
    # The abstract state and batch the trainer's preflight compiles its memory check on.
    abstract, abstract_opt, opt_sh = setup.abstract_state()
    batch = setup.abstract_batch((batch_size, seq_len))
    t0 = time.perf_counter()
    compiled = train_step.make_train_step(setup, opt_sh).lower(abstract, abstract_opt, batch).compile()
    n = sum(int(np.prod(s.shape)) for s in setup.view.shapes.values())
    return {
        "config": spec,
        "batch": batch_size,
        "seq_len": seq_len,
        "params": n,
        "dtype": dtype,
        "overrides": list(overrides),
        "backend": jax.default_backend(),
        "compile_s": time.perf_counter() - t0,
        "memory": compiled_memory(compiled),
    }


def lm_presets() -> list[str]:
    """Every language-model preset, as `name:preset` specs."""
    return [f"{n}:{p}" for n in registry.list_models("lm") for p in registry.list_presets(n)]


def tiny_presets() -> list[str]:
    """The `tiny` preset of every language model (what `zoo bench train` runs without arguments)."""
    return [f"{n}:tiny" for n in registry.list_models("lm")]


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of `bench_train` rows."""
    lines = [
        f"{'config':22s} {'batch x len':>12s} {'params':>12s} {'step ms':>9s} {'tok/s':>10s} {'MFU 6N':>7s} "
        f"{'MFU+attn':>8s} {'peak GiB':>9s}"
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['config']:22s} {r['batch']:>5d} x {r['seq_len']:<5d} error: {r['error']}")
            continue
        mem = r["memory"]["peak_bytes"] / 2**30 if r.get("memory") else float("nan")
        lines.append(
            f"{r['config']:22s} {r['batch']:>5d} x {r['seq_len']:<5d} {r['params']:>12,d} {r['step_ms']:>9.1f} "
            f"{r['tokens_per_s']:>10.0f} {100 * r['mfu_6n']:>6.1f}% {100 * r['mfu_attn']:>7.1f}% {mem:>9.2f}"
        )
    return "\n".join(lines)
