"""Run configurations (ml_collections): one run = model + data + train + optim + mesh + eval.

A run config file (`zoo/configs/<model>.py`, also reachable as `configs/<model>.py`) defines
`get_config(preset)`; it calls `make_config(model_name, preset, runs=RUNS)`, where `RUNS` maps a
preset of the model to the few settings that differ from the defaults below (recipes shared by
several models, like `pod_pretraining`, are defined here once). `load_config(spec, overrides)`
reads `name[:preset]` (a packaged config, e.g. `mamba2:130m`) or `path/to/config.py[:preset]` and
applies absl-style `--config.a.b=value` overrides, rejecting unknown keys and wrong types.

Layering: run configs sit beside the trainer (they name models through `zoo.models.registry`);
models, layers, kernels and data never import this module.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from zoo.models import registry


def make_config(
    model_name: str, preset: str = "tiny", *, runs: dict[str, dict] | None = None, **model_overrides
) -> ml_collections.ConfigDict:
    """The run config of a model preset: the defaults below, then `runs[preset]` (nested overrides).

    Args:
      model_name, preset: a registered model and one of its presets.
      runs: {preset: {"data": {...}, "train": {...}, ...}} run settings per preset; every key must
        be a preset of the model.
      **model_overrides: model config fields to change.
    """
    model_cfg = registry.get_model_config(model_name, preset, **model_overrides)
    unknown = sorted(set(runs or {}) - set(registry.list_presets(model_name)))
    if unknown:
        raise ValueError(
            f"run settings for unknown preset(s) {unknown} of model {model_name!r}; "
            f"presets: {registry.list_presets(model_name)}"
        )
    c = ml_collections.ConfigDict()
    c.model_name = model_name
    c.preset = preset
    c.model = ml_collections.ConfigDict(
        {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model_cfg).items()}
    )
    c.data = ml_collections.ConfigDict(
        dict(
            source="passkey",  # passkey | recall | mqar | selective_copy | passkey_recall | text | tfds | shards
            seq_len=160,  # training length (fixed-length mode) / 2^max_log2 (decomposition)
            batch_size=16,  # global sequences per step (fixed-length mode)
            seed=0,
            depth=-1.0,  # passkey needle depth in [0, 1]; -1 = uniform at random
            answer_only=False,  # passkey: loss on the answer digits only
            num_pairs=8,  # recall, mqar
            num_queries=4,  # recall
            power_a=0.01,  # mqar: query gaps drawn from p(g) ~ (g + 1)^(power_a - 1) (Zoology's default)
            num_data=8,  # selective_copy
            path="",  # text: directory of text files ('' = this Python's stdlib source); shards: prepared dir
            allow_toy=True,  # False: refuse the embedded stdlib corpus (source=text, path='')
            tfds_name="",
            tfds_split="train",
            tfds_data_dir="",
            tfds_text_key="text",
            tokenizer="",  # text/tfds: bytes | SentencePiece .model | tokenizer.json ('' = sp_model or bytes)
            sp_model="",  # optional SentencePiece model file for text/tfds (default: bytes)
            mode="fixed",  # fixed (concat-and-chunk) | decomposition (length buckets) | packed (segment ids)
            pack_bins=64,  # packed: rows filled at a time by the first-fit packer
            min_log2=6,
            max_log2=8,  # decomposition buckets 2^min .. 2^max
            tokens_per_step=4096,  # decomposition: batch_k * 2^k
            curriculum="pow2",  # uniform | pow2 | cyclic | fixed
        )
    )
    c.train = ml_collections.ConfigDict(
        dict(
            steps=2000,
            seed=0,
            log_every=25,
            checkpoint_every=250,
            keep_checkpoints=2,
            grad_accum=1,
            eval_batches=4,
            init_from="",  # start from these parameters: a model directory (zoo convert) or a work dir
            on_nonfinite="skip",  # a NaN/Inf loss or gradient: skip the update | stop | rollback (last checkpoint)
            max_nonfinite=10,  # consecutive non-finite steps tolerated before the run stops
            profile_steps=[],  # [start, stop]: write a jax.profiler trace of these steps to <workdir>/profile
        )
    )
    c.optim = ml_collections.ConfigDict(
        dict(
            lr=3e-3,
            warmup_steps=100,
            min_lr_ratio=0.1,
            weight_decay=0.1,
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            clip_norm=1.0,
            ssm_lr=1e-3,
        )
    )
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.eval = ml_collections.ConfigDict(
        dict(
            lengths=[160, 320, 640],
            depths=[0.0, 0.25, 0.5, 0.75, 1.0],
            samples=32,
            batch_size=16,
        )
    )
    return update(c, (runs or {}).get(preset, {}))


NONFINITE_POLICIES = ("skip", "stop", "rollback")


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Range checks of every run setting, before anything runs or is written: one ValueError naming the
    key, its value and the fix. (Data sources and the model's own fields are checked where they are
    built: `zoo.data.pipeline`, the model config dataclasses.)"""

    def need(ok: bool, key: str, value: Any, rule: str) -> None:
        if not ok:
            raise ValueError(f"config key {key}={value!r} is invalid: {rule}")

    def positive_int(section: str, key: str, minimum: int = 1) -> None:
        v = config[section][key]
        need(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
            f"{section}.{key}",
            v,
            f"it must be an int >= {minimum}",
        )

    def finite(section: str, key: str, lo: float | None = None, hi: float | None = None, strict: bool = False) -> None:
        v = config[section][key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (lo is None or (v > lo if strict else v >= lo)) and (hi is None or v <= hi)
        bounds = f"{'>' if strict else '>='} {lo}" if lo is not None else ""
        need(
            ok, f"{section}.{key}", v, f"it must be a finite number {bounds}{f' and <= {hi}' if hi is not None else ''}"
        )

    t, o, d = config.train, config.optim, config.data
    for key in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "grad_accum", "max_nonfinite"):
        positive_int("train", key)
    positive_int("train", "seed", 0)
    need(
        t.on_nonfinite in NONFINITE_POLICIES,
        "train.on_nonfinite",
        t.on_nonfinite,
        f"choose one of {NONFINITE_POLICIES}",
    )
    ps = list(t.profile_steps)
    need(
        ps == [] or (len(ps) == 2 and all(isinstance(x, int) for x in ps) and 1 <= ps[0] < ps[1]),
        "train.profile_steps",
        ps,
        "give [] or [start, stop] with 1 <= start < stop",
    )
    finite("optim", "lr", 0.0, strict=True)
    finite("optim", "ssm_lr", 0.0, strict=True)
    finite("optim", "min_lr_ratio", 0.0, 1.0)
    finite("optim", "weight_decay", 0.0)
    finite("optim", "eps", 0.0, strict=True)
    finite("optim", "clip_norm", 0.0, strict=True)
    for key in ("b1", "b2"):
        finite("optim", key, 0.0, 1.0)
        need(o[key] < 1.0, f"optim.{key}", o[key], "it must be < 1")
    positive_int("optim", "warmup_steps", 0)
    for key in ("seq_len", "batch_size", "tokens_per_step"):
        positive_int("data", key)
    need(
        d.batch_size % t.grad_accum == 0,
        "train.grad_accum",
        t.grad_accum,
        f"it must divide data.batch_size={d.batch_size}",
    )
    for key in ("data", "fsdp", "tensor"):
        v = config.mesh[key]
        need(isinstance(v, int) and (v >= 1 or v == -1), f"mesh.{key}", v, "it must be a positive int or -1")
    for key in ("samples", "batch_size"):
        positive_int("eval", key)
    lengths = list(config.eval.lengths)
    need(
        bool(lengths) and all(isinstance(x, int) and x >= 1 for x in lengths),
        "eval.lengths",
        lengths,
        "give a non-empty list of ints >= 1",
    )
    return config


def update(config: ml_collections.ConfigDict, overrides: dict, where: str = "") -> ml_collections.ConfigDict:
    """Applies nested overrides {"section": {"key": value}} with the same checks as the command line."""
    for key, value in overrides.items():
        path = f"{where}.{key}" if where else key
        if isinstance(value, dict):
            if key not in config or not isinstance(config[key], ml_collections.ConfigDict):
                raise ValueError(f"unknown config section {path!r}")
            update(config[key], value, path)
        else:
            _set(config, path, key, value, f"run settings {path}={value!r}")
    return config


def pod_pretraining(
    *,
    seq_len: int,
    batch_size: int,
    lr: float,
    steps: int = 100_000,
    warmup_steps: int = 2000,
    eval_lengths: Sequence[int] = (),
    **optim,
) -> dict:
    """Run settings of a paper-scale pretraining run: prepared token shards (`zoo data prepare`), no
    silent fallback to the embedded toy corpus, checkpoints every 1000 steps, and scanned layers with
    full remat. Remat needs the scan: with looped layers XLA's scheduler can move the recomputation
    forward and keep the activations (docs/guide.md, "Remat needs the scan", has the measurement)."""
    return {
        "model": {"remat": "full", "scan_layers": True},
        "data": {"source": "text", "seq_len": seq_len, "batch_size": batch_size, "allow_toy": False},
        "optim": {"lr": lr, "warmup_steps": warmup_steps, **optim},
        "train": {"steps": steps, "checkpoint_every": 1000},
        **({"eval": {"lengths": list(eval_lengths)}} if eval_lengths else {}),
    }


# The tiny SSM presets' passkey recipe (mamba2, memmamba): 128-token sequences, 3000 steps, and the
# loss on the 5 answer digits only. With the loss on every token the tiny SSM spends its capacity on
# the filler and stayed at chance on the key for 1,400 steps, where answer-only training reached 0.8
# digit accuracy (Mamba-2 model card).
ANSWER_ONLY_PASSKEY = {
    "data": {"seq_len": 128, "answer_only": True},
    "train": {"steps": 3000},
    "eval": {"lengths": [128, 512, 2048]},
}


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string


def _set(node: ml_collections.ConfigDict, path: str, leaf: str, value: Any, source: str) -> None:
    """Sets node[leaf] = value if the key exists and the type matches (ints widen to floats)."""
    if leaf not in node:
        raise ValueError(f"unknown config key {path!r} in {source}; keys there: {', '.join(sorted(node.keys()))}")
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, list) and isinstance(value, tuple):
        value = list(value)
    if old is not None and type(value) is not type(old):
        raise ValueError(f"config key {path!r} expects {type(old).__name__} (now {old!r}), got {value!r} from {source}")
    node[leaf] = value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies `--config.a.b=value` overrides; unknown keys and type mismatches raise ValueError."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"cannot parse override {item!r}; write it as --config.section.key=value")
        path, text = item[len("--config.") :].split("=", 1)
        *parents, leaf = path.split(".")
        node = config
        for i, name in enumerate(parents):
            if name not in node or not isinstance(node[name], ml_collections.ConfigDict):
                raise ValueError(f"unknown config key {'.'.join(parents[: i + 1])!r} in {item!r}")
            node = node[name]
        _set(node, path, leaf, _parse_value(text), repr(item))
    return config


def _config_module(path: str):
    """The config module a spec names: a file path, or the name of a packaged config."""
    if path.endswith(".py") or os.sep in path:
        if not os.path.isfile(path):
            raise ValueError(
                f"config file {path!r} does not exist; pass --config <model>[:preset] (e.g. "
                f"transformer:tiny) or a path to a config file"
            )
        module_spec = importlib.util.spec_from_file_location("zoo_run_config", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except SyntaxError as e:
            raise ValueError(
                f"config file {path!r} is not valid Python (line {e.lineno}: {e.msg}); fix the file"
            ) from None
        return module
    available = packaged_configs()
    if path not in available:
        raise ValueError(f"no packaged config {path!r}; available: {', '.join(available)} (or give a path)")
    return importlib.import_module(f"zoo.configs.{path}")


def packaged_configs() -> list[str]:
    """Names of the run configs shipped in the `zoo.configs` package (loaded by name, like plugins)."""
    (here,) = importlib.util.find_spec("zoo.configs").submodule_search_locations
    names = sorted(f[:-3] for f in os.listdir(here) if f.endswith(".py") and not f.startswith("_"))
    # a run config defines get_config(preset); other settings files there (compare.py) are not one
    return [n for n in names if hasattr(importlib.import_module(f"zoo.configs.{n}"), "get_config")]


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads `name[:preset]` or `path/to/config.py[:preset]` and applies overrides, then validates the
    model part."""
    path, _, preset = spec.partition(":")
    module = _config_module(path)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config {path!r} has no get_config(preset) function")
    config = module.get_config(preset) if preset else module.get_config()
    config = apply_overrides(config, overrides)
    validate(config)
    registry.config_from_run(config)  # validates the model fields early
    return config
