"""Memory checks of a training step: XLA's analysis of the compiled step, a lower bound before
compiling, and a device's memory."""

from __future__ import annotations

import jax

from zoo.data.pipeline import tokens_per_step as data_tokens_per_step
from zoo.models import registry


def compiled_memory(compiled) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled function (bytes), where the backend offers one."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- some backends do not implement it
        return None
    if m is None:
        return None
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    out = {f: int(getattr(m, f, 0) or 0) for f in fields}
    out["peak_bytes"] = (
        out["argument_size_in_bytes"]
        + out["output_size_in_bytes"]
        + out["temp_size_in_bytes"]
        - out["alias_size_in_bytes"]
    )
    return out


def check_memory(compiled, config) -> None:
    """One clear error when the compiled step needs more memory than a device has (where known)."""
    need = (compiled_memory(compiled) or {}).get("peak_bytes")
    have = device_memory_bytes()
    if need is not None and have is not None and need > have:
        raise ValueError(
            f"the training step needs {need / 2**30:.1f} GiB per device but a device has {have / 2**30:.1f} GiB; "
            f"lower data.batch_size or data.seq_len (now {config.data.batch_size} x {config.data.seq_len}), set "
            "--config.model.remat=full, or add devices to the mesh"
        )


def check_memory_estimate(config) -> None:
    """One clear error, before anything is allocated or compiled, when a step's batch cannot fit: its
    fp32 logits and residual stream alone (B x T x (vocab + d_model) x 4 bytes per micro-batch of
    `train.grad_accum`, split over the devices) are a lower bound of the step's memory.
    `check_memory` compares the compiled step."""
    cfg = registry.config_from_run(config)
    tokens = data_tokens_per_step(config.data) // max(int(config.train.grad_accum), 1)
    devices = (
        config.mesh.data * config.mesh.fsdp if config.mesh.data > 0 and config.mesh.fsdp > 0 else jax.device_count()
    )
    need = tokens * (cfg.vocab_size + getattr(cfg, "d_model", 0)) * 4 // max(devices, 1)
    have = device_memory_bytes()
    if have is not None and need > have:
        raise ValueError(
            f"a (micro-)batch of {tokens:,} tokens needs at least {need / 2**30:.1f} GiB per device (its logits "
            f"alone) but a device has {have / 2**30:.1f} GiB; lower data.batch_size or data.seq_len (now "
            f"{config.data.batch_size} x {config.data.seq_len}), raise train.grad_accum or add devices to the mesh"
        )


def device_memory_bytes() -> int | None:
    """Memory of one local device: the accelerator's limit, or the available host RAM on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if jax.default_backend() == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return None
