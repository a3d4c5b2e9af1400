"""Run configurations (ml_collections) shared by every model's config file.

A config file `configs/<model>.py` defines `get_config(preset)` that calls `make_config` and adjusts
what its model needs; `load_config("configs/x.py:preset", ["--config.a.b=1", ...])` reads it and
applies absl-style overrides, rejecting unknown keys and wrong types with a clear message.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
from typing import Any, Sequence

import ml_collections

from zoo.models import registry


def make_config(model_name: str, preset: str = "tiny", **model_overrides) -> ml_collections.ConfigDict:
    """The default run config: model fields from the preset, then data, train, optim, mesh, eval."""
    model_cfg = registry.get_model_config(model_name, preset, **model_overrides)
    c = ml_collections.ConfigDict()
    c.model_name = model_name
    c.preset = preset
    c.model = ml_collections.ConfigDict({k: list(v) if isinstance(v, tuple) else v
                                         for k, v in dataclasses.asdict(model_cfg).items()})
    c.data = ml_collections.ConfigDict(dict(
        source="passkey",      # passkey | recall | selective_copy | text | tfds | shards (zoo data prepare)
        seq_len=160,           # training length (fixed-length mode) / 2^max_log2 (decomposition)
        batch_size=16,         # global sequences per step (fixed-length mode)
        seed=0,
        depth=-1.0,            # passkey needle depth in [0, 1]; -1 = uniform at random
        answer_only=False,     # passkey: loss on the answer digits only
        num_pairs=8, num_queries=4,   # recall
        num_data=8,                   # selective_copy
        path="",               # text: directory of text files ('' = this Python's stdlib source); shards: prepared dir
        allow_toy=True,        # False: refuse the embedded stdlib corpus (source=text, path='')
        tfds_name="", tfds_split="train", tfds_data_dir="", tfds_text_key="text",
        tokenizer="",          # text/tfds: bytes | SentencePiece .model | tokenizer.json ('' = sp_model or bytes)
        sp_model="",           # optional SentencePiece model file for text/tfds (default: bytes)
        mode="fixed",          # fixed (concat-and-chunk) | decomposition (length buckets) | packed (segment ids)
        pack_bins=64,                   # packed: rows filled at a time by the first-fit packer
        min_log2=6, max_log2=8,         # decomposition buckets 2^min .. 2^max
        tokens_per_step=4096,           # decomposition: batch_k * 2^k
        curriculum="pow2",              # uniform | pow2 | cyclic | fixed
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=2000, seed=0, log_every=25, checkpoint_every=250, keep_checkpoints=2,
        grad_accum=1, eval_batches=4,
    ))
    c.optim = ml_collections.ConfigDict(dict(
        lr=3e-3, warmup_steps=100, min_lr_ratio=0.1, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8,
        clip_norm=1.0, ssm_lr=1e-3,
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.eval = ml_collections.ConfigDict(dict(
        lengths=[160, 320, 640], depths=[0.0, 0.25, 0.5, 0.75, 1.0], samples=32, batch_size=16,
    ))
    return c


def answer_only_passkey(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The tiny SSM presets' passkey recipe (configs/mamba2.py, configs/memmamba.py): 128-token
    sequences, 3000 steps, and the loss on the 5 answer digits only. With the loss on every token the
    tiny SSM spends its capacity on the filler and stayed at chance on the key for 1,400 steps, where
    answer-only training reached 0.8 digit accuracy (README, Mamba-2)."""
    config.data.seq_len = 128
    config.data.answer_only = True
    config.train.steps = 3000
    config.eval.lengths = [128, 512, 2048]
    return config


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` overrides; unknown keys and type mismatches raise ValueError."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"cannot parse override {item!r}; write it as --config.section.key=value")
        path, text = item[len("--config."):].split("=", 1)
        *parents, leaf = path.split(".")
        node = config
        for i, name in enumerate(parents):
            if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
                raise ValueError(f"unknown config key {'.'.join(parents[:i + 1])!r} in {item!r}")
            node = node[name]
        if leaf not in node:
            hint = ", ".join(sorted(node.keys()))
            raise ValueError(f"unknown config key {path!r} in {item!r}; keys there: {hint}")
        value, old = _parse_value(text), node[leaf]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, list) and isinstance(value, tuple):
            value = list(value)
        if old is not None and type(value) is not type(old):
            raise ValueError(f"config key {path!r} expects {type(old).__name__} (now {old!r}), "
                             f"got {value!r} from {item!r}")
        node[leaf] = value
    return config


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:preset]` and applies overrides, then validates the model part."""
    path, _, preset = spec.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist; pass --config configs/<model>.py:<preset>")
    module_spec = importlib.util.spec_from_file_location("zoo_run_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path!r} has no get_config(preset) function")
    config = module.get_config(preset) if preset else module.get_config()
    config = apply_overrides(config, overrides)
    model_config(config)  # validates the model fields early
    return config


def model_config(config: ml_collections.ConfigDict) -> Any:
    """The model's frozen dataclass config from a run config."""
    return registry.config_from_dict(config.model_name, config.model.to_dict())
