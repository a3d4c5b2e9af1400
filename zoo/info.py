"""`zoo info`: what a config builds, measured rather than guessed.

Parameter count from the abstract model (nothing is allocated), forward FLOPs per token from
XLA's cost analysis of the lowered forward pass at the given length (training is ~3x), the mesh
over the available devices, and the data layout (fixed length or decomposition buckets).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import ml_collections

from zoo import checkpoint
from zoo.config import model_config
from zoo.models import registry
from zoo.models.params import ParamView
from zoo.train import sharding


def abstract_model(config: ml_collections.ConfigDict):
    return checkpoint.abstract_model(config.model_name, model_config(config))


def count_params(config: ml_collections.ConfigDict) -> int:
    return sum(math.prod(s.shape) for s in ParamView(abstract_model(config)).shapes.values())


def forward_flops_per_token(config: ml_collections.ConfigDict, seq_len: int) -> float | None:
    """XLA's FLOP count of one forward pass over [1, seq_len] tokens, divided by seq_len.

    Counted on the looped layout: XLA's cost analysis counts a loop body once, so a scanned layer
    stack would count as one layer (the FLOPs do not depend on the layout)."""
    cfg = model_config(config)
    if getattr(cfg, "scan_layers", False):
        cfg = dataclasses.replace(cfg, scan_layers=False)
    view = ParamView(checkpoint.abstract_model(config.model_name, cfg))
    fn = jax.jit(lambda p, x: view.merge(p)(x))
    lowered = fn.lower(dict(view.shapes), jax.ShapeDtypeStruct((1, seq_len), jax.numpy.int32))
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return None if flops is None else float(flops) / seq_len


def describe(config: ml_collections.ConfigDict, seq_len: int | None = None) -> str:
    if seq_len is not None and seq_len < 1:
        raise ValueError(f"--seq-len {seq_len}: a sequence length must be >= 1")
    seq_len = seq_len or config.data.seq_len
    n = count_params(config)
    lines = [f"model      {config.model_name} (preset {config.preset})", f"params     {n:,} ({n / 1e6:.2f}M)"]
    flops = forward_flops_per_token(config, seq_len)
    if flops is not None:
        lines.append(
            f"FLOPs/tok  {flops / 1e6:,.2f} MFLOP forward, ~{3 * flops / 1e6:,.2f} MFLOP train "
            f"at length {seq_len} (XLA cost analysis; 6N = {6 * n / 1e6:,.2f} MFLOP)"
        )
    lines += registry.model_class(config.model_name).describe(model_config(config), seq_len)
    try:
        shape = sharding.mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, jax.device_count())
        lines.append(
            f"mesh       data={shape[0]} fsdp={shape[1]} tensor={shape[2]} over {jax.device_count()} "
            f"{jax.devices()[0].platform} device(s)"
        )
    except ValueError as e:
        lines.append(f"mesh       invalid on this machine: {e}")
    lines.append(data_stats(config.data, config.train.steps))
    return "\n".join(lines)


def data_stats(d, steps: int = 0) -> str:
    """The corpus, tokenizer and tokens a run uses, then the data layout; for decomposition on
    documents, the bucket table of the training split."""
    from zoo.data.pipeline import describe

    corpus = describe(d, steps)
    if d.mode in ("fixed", "packed"):
        how = "concat-and-chunk with EOS between documents" if d.mode == "fixed" else "packed documents, segment ids"
        return corpus + (
            f"\ndata       {d.source}: {d.mode} length {d.seq_len} x batch {d.batch_size} "
            f"= {d.seq_len * d.batch_size:,} tokens/step ({how} for document sources)"
        )
    from zoo.data import decomposition as dd
    from zoo.data.pipeline import DecompositionBatches

    batches = DecompositionBatches(d, "train")
    head = (
        f"data       {d.source}: decomposition buckets 2^{d.min_log2}..2^{d.max_log2}, "
        f"{d.tokens_per_step:,} tokens/step, curriculum {d.curriculum}; batch per bucket "
        + ", ".join(f"{1 << k}:{b}" for k, b in batches.schedule.batch_sizes.items())
    )
    if batches.index is None:
        return corpus + "\n" + head
    return (
        corpus + "\n" + head + "\n" + dd.format_stats(dd.decomposition_stats(batches.index, schedule=batches.schedule))
    )
