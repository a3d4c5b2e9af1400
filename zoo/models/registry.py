"""The model registry: `list_models()`, `get_model_config()`, `create_model()`.

Each model file registers its class with its presets, and is found without being listed anywhere:
every module of the `zoo.models` package is imported the first time the registry is asked.

    @registry.register("transformer", PRESETS)
    class Transformer(LanguageModel): ...

A preset is a frozen dataclass config; overrides are checked against its fields. A model's kind
follows from its class: a `LanguageModel` ("lm", trained by `zoo train`), a `Forecaster` or a
`Classifier`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import os
import pkgutil
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flax import nnx

_MODELS: dict[str, tuple[type, dict[str, Any]]] = {}
_NOT_MODELS = {"base", "registry"}
_loaded = False


def register(name: str, presets: dict[str, Any]):
    """Class decorator adding a model class and its named config presets to the registry."""
    if "tiny" not in presets:
        raise ValueError(f"model {name!r} must define a 'tiny' preset for tests")

    def wrap(cls):
        from zoo.models.base import kind_of

        kind_of(cls)  # one of the model base classes
        if name in _MODELS and _MODELS[name][0].__qualname__ != cls.__qualname__:
            raise ValueError(f"model name {name!r} is already registered by {_MODELS[name][0].__name__}")
        _MODELS[name] = (cls, presets)
        cls.model_name = name
        return cls

    return wrap


def _load_all() -> None:
    """Imports every model module of this package once (each registers itself)."""
    global _loaded
    if _loaded:
        return
    import zoo.models as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _NOT_MODELS and not info.name.startswith("_"):
            importlib.import_module(f"zoo.models.{info.name}")
    _loaded = True


def list_models(kind: str | None = None, **declared: Any) -> list[str]:
    """Names of the registered models, sorted.

    Args:
      kind: only models of this kind ("lm", "forecaster", "classifier").
      **declared: only models whose class declares these values (`zoo.models.base.ModelInfo`),
        e.g. `list_models(convertible_from="mamba2")`.
    """
    from zoo.models.base import ModelInfo

    unknown = sorted(set(declared) - set(ModelInfo.__annotations__))
    if unknown:
        raise ValueError(f"unknown declaration(s) {unknown}; models declare {sorted(ModelInfo.__annotations__)}")
    _load_all()
    names = sorted(n for n in _MODELS if kind is None or model_kind(n) == kind)
    return [n for n in names if all(getattr(_MODELS[n][0], k) == v for k, v in declared.items())]


def _entry(name: str) -> tuple[type, dict[str, Any]]:
    _load_all()
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(list_models())}")
    return _MODELS[name]


def model_kind(name: str) -> str:
    """ "lm", "forecaster" or "classifier" (`zoo.models.base.kind_of`)."""
    from zoo.models.base import kind_of

    return kind_of(_entry(name)[0])


def list_presets(name: str) -> list[str]:
    """The preset names of model `name`."""
    return list(_entry(name)[1])


def get_model_config(name: str, preset: str = "tiny", **overrides) -> Any:
    """The preset's config with `overrides` applied (unknown fields raise ValueError)."""
    _, presets = _entry(name)
    if preset not in presets:
        raise ValueError(f"unknown preset {preset!r} for model {name!r}; available: {', '.join(presets)}")
    return config_with_overrides(presets[preset], overrides)


def config_with_overrides(cfg: Any, overrides: dict[str, Any]) -> Any:
    """`cfg` with the fields in `overrides` replaced (ValueError naming unknown fields)."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for {type(cfg).__name__}; valid fields: {sorted(fields)}")
    return dataclasses.replace(cfg, **overrides)


def model_class(name: str) -> type:
    """The registered model class of `name`."""
    return _entry(name)[0]


def config_class(name: str) -> type:
    """The frozen dataclass type of `name`'s configs (the type of its presets)."""
    return type(_entry(name)[1]["tiny"])


def create_model(name: str, preset: str = "tiny", *, seed: int = 0, **overrides) -> nnx.Module:
    """Builds a registered model from a preset (plus field overrides) with fp32 params."""
    from flax import nnx

    cfg = get_model_config(name, preset, **overrides)
    return model_class(name)(cfg, rngs=nnx.Rngs(seed))


def config_from_dict(name: str, values: dict[str, Any]) -> Any:
    """Rebuilds a model config from a plain dict (e.g. a saved run config); lists become tuples.

    Fields missing from `values` (a run saved before the field existed) take the preset defaults.
    """
    cls = config_class(name)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for {cls.__name__}; valid fields: {sorted(fields)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def config_from_run(config) -> Any:
    """The model's frozen dataclass config from a run config (`config.model_name`, `config.model`)."""
    return config_from_dict(config.model_name, config.model.to_dict())


_KIND_BASES = {"LanguageModel": "lm", "Forecaster": "forecaster", "Classifier": "classifier"}


def listing() -> list[tuple[str, str, list[str]]]:
    """``[(name, kind, presets)]`` of every model, sorted by name, read from the model files' source.

    What `zoo models` prints, without importing JAX or a model: each `@registry.register(NAME,
    PRESETS)` class, its kind from its base classes, and the keys of the module's `PRESETS` dict
    literal. Equal to `list_models` / `model_kind` / `list_presets` (tested); a model file this
    reading cannot follow makes it fall back to importing the models.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    bases: dict[str, list[str]] = {}  # class name -> its base class names, over every model file
    found: list[tuple[str, str, list[str]]] = []  # (model name, class name, preset names)
    for info in pkgutil.iter_modules([here]):
        if info.name in _NOT_MODELS or info.name.startswith("_"):
            continue
        with open(os.path.join(here, f"{info.name}.py")) as f:
            tree = ast.parse(f.read())
        dicts = {
            node.targets[0].id: node.value
            for node in tree.body
            if isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Dict)
        }
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            bases[node.name] = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases]
            for d in node.decorator_list:
                if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "register" and len(d.args) == 2:
                    name, presets = d.args
                    keys = dicts[presets.id].keys if isinstance(presets, ast.Name) and presets.id in dicts else None
                    if not isinstance(name, ast.Constant) or keys is None:
                        return _imported_listing()
                    if not all(isinstance(k, ast.Constant) for k in keys):
                        return _imported_listing()
                    found.append((name.value, node.name, [k.value for k in keys]))

    def kind(cls: str) -> str | None:
        if cls in _KIND_BASES:
            return _KIND_BASES[cls]
        return next((k for b in bases.get(cls, []) if (k := kind(b)) is not None), None)

    out = [(name, kind(cls), presets) for name, cls, presets in found]
    if any(k is None for _, k, _ in out):
        return _imported_listing()
    return sorted(out)


def _imported_listing() -> list[tuple[str, str, list[str]]]:
    return [(n, model_kind(n), list_presets(n)) for n in list_models()]
