"""Model directories: pretrained weights that `zoo convert` writes and `zoo.from_pretrained` reads.

Layout (`save_pretrained` / `load_pretrained`):
    model.json             {"format": "zoo-model", "model_name", "model": config fields, "tokenizer", "source"}
    params.safetensors     the parameters, flat names of the looped layout (`zoo.models.params`)
    tokenizer.json | *.model   the tokenizer (its spec in model.json names the file relative to the directory)

A `zoo train` work directory (a run's Orbax checkpoints) is `zoo.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from etils import epath
from flax import nnx

from zoo import storage
from zoo.checkpoint import CONFIG_FILE
from zoo.models import registry
from zoo.models.params import ParamView, abstract_model, convert_layout, model_with_params

MODEL_FILE = "model.json"
PARAMS_FILE = "params.safetensors"


# Files of a tokenizer that travel with it into a model directory: the model file named by its
# spec, and for a Hugging Face tokenizer.json the configuration files beside it (EOS/BOS tokens).
TOKENIZER_COMPANIONS = ("tokenizer_config.json", "special_tokens_map.json")


def _copy_tokenizer(spec: dict, out) -> dict:
    """Copies the tokenizer's files into model directory `out`; the spec with a relative path."""
    if not spec.get("path"):
        return dict(spec)
    src = storage.path(spec["path"])
    if not src.is_file():
        raise ValueError(f"tokenizer file {spec['path']!r} does not exist; it cannot travel with the model")
    (out / src.name).write_bytes(src.read_bytes())
    if spec.get("kind") == "hf":
        for name in TOKENIZER_COMPANIONS:
            if (src.parent / name).is_file():
                (out / name).write_bytes((src.parent / name).read_bytes())
    return {**spec, "path": src.name}


def save_pretrained(model: nnx.Module, out_dir, *, tokenizer: dict | None = None, source: dict | None = None) -> None:
    """Writes a model directory: model.json and params.safetensors (looped layout, fp32 as held).

    `tokenizer` is a tokenizer spec (`zoo.data.tokenizers.Tokenizer.spec()`): its model file (and a
    tokenizer.json's tokenizer_config.json) is copied into the directory and model.json keeps the
    spec with the file's name relative to the directory, so the directory is self-contained.
    """
    out = storage.path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    looped = dataclasses.replace(cfg, scan_layers=False) if hasattr(cfg, "scan_layers") else cfg
    flat = ParamView(model).flat(model)
    params = convert_layout(flat, model, abstract_model(model.model_name, looped))
    storage.save_flat(out / PARAMS_FILE, {k: np.asarray(v) for k, v in params.items()})
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(looped).items()}
    storage.write_json_atomic(
        out / MODEL_FILE,
        {
            "format": "zoo-model",
            "version": 1,
            "model_name": model.model_name,
            "model": fields,
            "tokenizer": None if tokenizer is None else _copy_tokenizer(tokenizer, out),
            "source": source or {},
        },
    )


def model_dir_of(path) -> epath.Path:
    """The model directory of `path`: the directory itself, or the directory of its model.json /
    params.safetensors."""
    p = storage.path(path)
    if p.is_file() and p.name in (MODEL_FILE, PARAMS_FILE):
        return p.parent
    return p


def read_model_dir(model_dir) -> dict:
    """The model.json of a model directory (one clear error when it is not one)."""
    directory = model_dir_of(model_dir)
    file = directory / MODEL_FILE
    if not file.is_file():
        hint = "write one with `zoo convert` or zoo.model_dir.save_pretrained"
        if (directory / CONFIG_FILE).is_file() and "model_name" in storage.read_json(directory / CONFIG_FILE):
            hint = "it is a `zoo train` work directory: load it with zoo.load or zoo.from_pretrained"
        elif (directory / CONFIG_FILE).is_file():
            hint = (
                "it looks like a Hugging Face / mamba_ssm checkpoint: load it with zoo.from_pretrained "
                f"(converted in memory) or convert it once with `zoo convert --from hf {str(model_dir)} --out DIR`"
            )
        raise ValueError(f"{str(model_dir)!r} is not a zoo model directory (no {MODEL_FILE}); {hint}")
    meta = storage.read_json(file)
    if not isinstance(meta, dict) or meta.get("format") != "zoo-model":
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{str(file)!r} is not a zoo model description (format {got!r})")
    if not isinstance(meta.get("model_name"), str) or not isinstance(meta.get("model"), dict):
        raise ValueError(
            f'{str(file)!r} lacks "model_name" or the "model" fields; write the directory again with `zoo convert`'
        )
    return meta


def tokenizer_spec(model_dir, meta: dict | None = None) -> dict | None:
    """The tokenizer spec of a model directory with its file path resolved (None: no tokenizer)."""
    meta = read_model_dir(model_dir) if meta is None else meta
    spec = meta.get("tokenizer")
    if not spec:
        return None
    spec = dict(spec)
    if spec.get("path") and not (storage.is_remote(spec["path"]) or os.path.isabs(spec["path"])):
        spec["path"] = str(model_dir_of(model_dir) / spec["path"])
    return spec


def load_pretrained(model_dir, **model_overrides):
    """(model, model.json dict) from a model directory (or its model.json / params.safetensors);
    `model_overrides` as in `load_model`."""
    meta = read_model_dir(model_dir)
    saved_cfg = registry.config_from_dict(meta["model_name"], meta["model"])
    cfg = registry.config_with_overrides(saved_cfg, model_overrides)
    params = storage.load_flat(model_dir_of(model_dir) / PARAMS_FILE)
    return model_with_params(meta["model_name"], cfg, params, saved_cfg), meta
