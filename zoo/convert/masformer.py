"""A trained full-attention transformer run -> a MASFormer model directory (`zoo convert masformer`):
the same parameters under a per-layer attention schedule, to continue training from
(`--config.train.init_from=DIR`, MASFormer's continual-training setting)."""

from __future__ import annotations

from zoo import storage
from zoo.checkpoint import load_model
from zoo.convert import convert_model
from zoo.model_dir import save_pretrained
from zoo.models.masformer import PRESETS, parse_schedule


def from_transformer_run(src, out, schedule: str = "", *, overwrite: bool = False) -> tuple[str, ...]:
    """Writes model directory `out` from the transformer run in work directory `src`; returns the
    schedule (one attention kind per layer).

    Args:
      schedule: e.g. "window,full" or "full@5,11:block" (`zoo.models.masformer.parse_schedule`);
        empty: the tiny preset's.
      overwrite: replace the contents of a non-empty `out`.
    """
    storage.check_out_dir(out, overwrite)
    model, config = load_model(src)
    if config.model_name != "transformer" or any(s.kind != "full" for s in model.config.layer_specs()):
        raise ValueError(f"{src!r} is not a full-attention transformer run (model {config.model_name})")
    n = model.config.n_layers
    layers = parse_schedule(schedule, n) if schedule else PRESETS["tiny"].layer_attention
    if len(layers) != n:
        raise ValueError(f"the schedule has {len(layers)} layers but the source has {n}; pass --schedule")
    mas = convert_model(model, "masformer", layer_attention=tuple(layers), attention="full")
    with storage.replacing_dir(out, overwrite) as tmp:
        save_pretrained(mas, tmp, source={"converted_from": src, "model_name": "transformer"})
    return tuple(layers)
