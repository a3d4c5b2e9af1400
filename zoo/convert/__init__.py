"""Checkpoint conversion: between zoo models that share a parameter tree, and (in the submodules)
from and to the formats of other codebases.

    hip = convert_model(transformer, "hip", k_blocks=8, window=128)           # training-free HiP
    mas = convert_model(transformer, "masformer", layer_attention=("window", "full"))

A converted model keeps every parameter of the source; only the config (the attention pattern)
changes. Write it with `zoo.model_dir.save_pretrained` and train from it with
`--config.train.init_from=DIR` (MASFormer's continual-training setting).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from zoo.models import registry
from zoo.models.params import ParamView, abstract_model, check_same_tree


def convert_model(model: nnx.Module, model_name: str, **fields) -> nnx.Module:
    """A `model_name` model holding `model`'s parameters.

    Its config keeps every field of `model.config` that the target config has, then applies `fields`
    (target fields the source lacks take the target config's dataclass defaults).

    Raises:
      ValueError: when the parameter trees differ (names or shapes), naming the first differences.
    """
    target_cls = registry.config_class(model_name)
    names = {f.name for f in dataclasses.fields(target_cls)}
    source = {k: v for k, v in dataclasses.asdict(model.config).items() if k in names}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for {target_cls.__name__}")
    cfg = target_cls(**{**source, **fields})
    target = abstract_model(model_name, cfg)
    params = ParamView(model).flat(model)
    view = ParamView(target)
    check_same_tree(params, view.shapes, f"{type(model).__name__} -> {model_name}")
    nnx.update(target, nnx.state(model, nnx.Param))
    return target
