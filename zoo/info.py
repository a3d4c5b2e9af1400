"""`zoo info`: what a config builds, measured rather than guessed; and the README's model table.

Parameter count from the abstract model (nothing is allocated), forward FLOPs per token from
XLA's cost analysis of the lowered forward pass at the given length (training is ~3x), the mesh
over the available devices, and the data layout (fixed length or decomposition buckets).

The README's model table is generated from the registry (names, presets, each class's declared
`paper` and `numerical_core`) and the model cards in docs/models/ (the card that says "registered
as `name`"):

    python -m zoo.info --write-readme        # rewrites the table between its markers in README.md
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import re

import jax
import ml_collections

from zoo.models import registry
from zoo.models.params import ParamView, abstract_model
from zoo.train import sharding


def abstract_run_model(config: ml_collections.ConfigDict):
    """The run's model with abstract (shape-only) parameters."""
    return abstract_model(config.model_name, registry.config_from_run(config))


def count_params(config: ml_collections.ConfigDict) -> int:
    """The number of parameters of the run's model."""
    return sum(math.prod(s.shape) for s in ParamView(abstract_run_model(config)).shapes.values())


def forward_flops_per_token(config: ml_collections.ConfigDict, seq_len: int) -> float | None:
    """XLA's FLOP count of one forward pass over [1, seq_len] tokens, divided by seq_len.

    Counted on the looped layout: XLA's cost analysis counts a loop body once, so a scanned layer
    stack would count as one layer (the FLOPs do not depend on the layout)."""
    cfg = registry.config_from_run(config)
    if getattr(cfg, "scan_layers", False):
        cfg = dataclasses.replace(cfg, scan_layers=False)
    view = ParamView(abstract_model(config.model_name, cfg))
    fn = jax.jit(lambda p, x: view.merge(p)(x))
    lowered = fn.lower(dict(view.shapes), jax.ShapeDtypeStruct((1, seq_len), jax.numpy.int32))
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    return None if flops is None else float(flops) / seq_len


def describe(config: ml_collections.ConfigDict, seq_len: int | None = None) -> str:
    """A text summary of the run config: model, parameters, FLOPs per token and the model's own lines at `seq_len`."""
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
    lines += registry.model_class(config.model_name).describe(registry.config_from_run(config), seq_len)
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


TABLE_BEGIN = "<!-- model table: generated by `python -m zoo.info --write-readme`; edit the models, not this -->"
TABLE_END = "<!-- end of model table -->"


def model_card(name: str, root: pathlib.Path) -> pathlib.Path:
    """The card in `root`/docs/models that says "registered as `name`" (ValueError when none does)."""
    for card in sorted((root / "docs" / "models").glob("*.md")):
        if re.search(rf"registered\s+as\s+`{re.escape(name)}`", card.read_text()):
            return card
    raise ValueError(f"no model card in docs/models/ says 'registered as `{name}`'; write the card of {name!r}")


def model_table(root: pathlib.Path) -> str:
    """The README's model table: one row per registered model, from the registry and the cards."""
    rows = ["| model | paper | presets | numerical core | card |", "|---|---|---|---|---|"]
    for name in registry.list_models():
        cls = registry.model_class(name)
        card = model_card(name, root).relative_to(root).as_posix()
        presets = ", ".join(registry.list_presets(name))
        rows.append(f"| `{name}` | {cls.paper} | {presets} | {cls.numerical_core} | [card]({card}) |")
    return "\n".join(rows)


def readme_with_model_table(text: str, root: pathlib.Path) -> str:
    """`text` (the README) with the block between the table markers replaced by `model_table`."""
    if text.count(TABLE_BEGIN) != 1 or text.count(TABLE_END) != 1:
        raise ValueError(f"README.md must hold the markers {TABLE_BEGIN!r} and {TABLE_END!r} once each")
    head, rest = text.split(TABLE_BEGIN)
    _, tail = rest.split(TABLE_END)
    return f"{head}{TABLE_BEGIN}\n{model_table(root)}\n{TABLE_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    """`python -m zoo.info --write-readme [--root DIR]`: regenerates the README's model table."""
    parser = argparse.ArgumentParser(prog="python -m zoo.info", description="Regenerates the README's model table.")
    parser.add_argument("--write-readme", action="store_true", help="rewrite the table in README.md")
    parser.add_argument("--root", default=".", help="the repository root (default: the current directory)")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.root)
    readme = root / "README.md"
    if not readme.is_file():
        parser.error(f"--root {args.root}: no README.md there; run from the repository root or pass --root")
    try:
        text = readme_with_model_table(readme.read_text(), root)
    except ValueError as e:
        parser.error(str(e))
    if args.write_readme:
        readme.write_text(text)
    else:
        print(model_table(root))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
