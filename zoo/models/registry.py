"""The model registry: `list_models()`, `get_model_config()`, `create_model()`.

Each model file registers its class with its presets:

    @registry.register("transformer", PRESETS)
    class Transformer(nnx.Module): ...

A preset is a frozen dataclass config; overrides are checked against its fields.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

_MODELS: dict[str, tuple[type, dict[str, Any]]] = {}


def register(name: str, presets: dict[str, Any]):
    """Class decorator adding a model class and its named config presets to the registry."""
    if "tiny" not in presets:
        raise ValueError(f"model {name!r} must define a 'tiny' preset for tests")

    def wrap(cls):
        if name in _MODELS and _MODELS[name][0] is not cls:
            raise ValueError(f"model name {name!r} is already registered by {_MODELS[name][0].__name__}")
        _MODELS[name] = (cls, presets)
        cls.model_name = name
        return cls

    return wrap


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODELS)


def _entry(name: str) -> tuple[type, dict[str, Any]]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    return _MODELS[name]


def list_presets(name: str) -> list[str]:
    return list(_entry(name)[1])


def get_model_config(name: str, preset: str = "tiny", **overrides) -> Any:
    """The preset's config with `overrides` applied (unknown fields raise ValueError)."""
    _, presets = _entry(name)
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for model {name!r}; available: {', '.join(presets)}")
    return config_with_overrides(presets[preset], overrides)


def config_with_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for {type(cfg).__name__}; valid fields: {sorted(fields)}")
    return dataclasses.replace(cfg, **overrides)


def model_class(name: str) -> type:
    return _entry(name)[0]


def create_model(name: str, preset: str = "tiny", *, seed: int = 0, **overrides) -> nnx.Module:
    """Builds a registered model from a preset (plus field overrides) with fp32 params."""
    cfg = get_model_config(name, preset, **overrides)
    return model_class(name)(cfg, rngs=nnx.Rngs(seed))


def config_from_dict(name: str, values: dict[str, Any]) -> Any:
    """Rebuilds a model config from a plain dict (e.g. a saved run config); lists become tuples."""
    cls = type(_entry(name)[1]["tiny"])
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for {cls.__name__}; valid fields: {sorted(fields)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
