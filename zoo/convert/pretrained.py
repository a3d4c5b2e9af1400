"""Released checkpoints in and out of the zoo: import into a model directory, export to Hugging Face.

    model, info = import_checkpoint("ckpt/Llama-3.2-1B", "hf", "transformer")
    info = convert_checkpoint("ckpt/mamba2-130m", "models/mamba2-130m", "mamba_ssm")   # + the tokenizer
    export_hf("models/mamba2-130m", "hf/mamba2-130m")                                   # loads in transformers

Sources (`fmt`): "hf" — a Hugging Face directory (config.json + model.safetensors, sharded
safetensors or pytorch_model.bin) of LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM
(-> `transformer`, or training-free `hip` / `masformer`) or Mamba2ForCausalLM (-> `mamba2`, or
`memmamba`); "mamba_ssm" — a state-spaces `mamba2-*` directory (-> `mamba2` / `memmamba`). A target
model with parameters the source lacks (MemMamba's Note Blocks) gets them freshly initialised from
`seed`; every shared parameter is copied. The source's tokenizer (tokenizer.json, else a
SentencePiece tokenizer.model) travels into the model directory.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx

from zoo import storage
from zoo.checkpoint import CONFIG_FILE, load_model
from zoo.convert import hf, mamba_ssm
from zoo.convert.sources import SourceWeights, checkpoint_dir, read_config, read_weights, write_safetensors
from zoo.data.tokenizers import HFTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer, run_tokenizer
from zoo.model_dir import MODEL_FILE, load_pretrained, model_dir_of, save_pretrained, tokenizer_spec
from zoo.models import registry
from zoo.models.params import ParamView, abstract_model, convert_layout, model_with_params

FORMATS = ("hf", "mamba_ssm")
EXPORT_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def _json_safe(obj):
    """A config with non-finite floats as strings (model.json stays strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def _base_config(fmt: str, config: dict, where: str) -> tuple[str, dict[str, Any], str]:
    """(base model, its config fields, the source key of the embedding) of a source config."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}; use one of {FORMATS}")
    if fmt == "mamba_ssm":
        return "mamba2", mamba_ssm.mamba2_config(config, where), mamba_ssm.EMBEDDING_KEY
    kind = config.get("model_type")
    if kind == "mamba2":
        return "mamba2", hf.mamba2_config(config, where), "backbone.embeddings.weight"
    if kind in hf.LLAMA_FAMILY:
        return "transformer", hf.transformer_config(config, where), ""
    if "d_model" in config and "ssm_cfg" in config:
        raise ValueError(f"{where}: this is a mamba_ssm checkpoint; convert it with --from mamba_ssm")
    raise ValueError(
        f"{where}: model_type {kind!r} is not supported; supported: {sorted(hf.LLAMA_FAMILY)} and mamba2 "
        "(Hugging Face), mamba_ssm Mamba-2"
    )


def _target_config(base: str, base_cfg, model_name: str, fields: dict[str, Any]):
    """The target model's config: the base config's fields it has, its own defaults, then `fields`."""
    options = registry.list_models(convertible_from=base)  # the models that declare this base
    if model_name not in options:
        raise ValueError(f"a {base} checkpoint converts to one of {options}, not {model_name!r}")
    cls = registry.config_class(model_name)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown} for {cls.__name__}")
    keep = dataclasses.asdict(base_cfg)
    if base == "transformer" and all(s.kind != "window" for s in base_cfg.layer_specs()):
        keep.pop("window")  # unused by the source: a HiP / MASFormer target keeps its own default
    return cls(**{**{k: v for k, v in keep.items() if k in names}, **fields})


def import_checkpoint(
    src, fmt: str = "hf", model_name: str | None = None, *, dtype: str = "float32", seed: int = 0, **fields
) -> tuple[nnx.Module, dict]:
    """A zoo model holding a released checkpoint's weights, and a description of the conversion.

    Args:
      src: the checkpoint directory (config.json + weights) or one of its weight files.
      fmt: "hf" or "mamba_ssm".
      model_name: the zoo model (default: transformer for Llama-family sources, mamba2 for Mamba-2).
      dtype: the model's compute dtype (parameters are float32).
      seed: initialises the parameters the source lacks (MemMamba's Note Blocks).
      fields: config fields of the target model (e.g. HiP's k_blocks, MASFormer's layer_attention).

    Returns:
      (model, info) with info = {"format", "path", "config" (the source config), "report":
      {"tensors", "used", "ignored": {key: reason}, "initialised": [zoo names]}}.

    Raises:
      ValueError: an unsupported config field, a missing tensor or one of the wrong shape or dtype
        (naming the key), or source tensors no parameter takes.
    """
    where = checkpoint_dir(src)
    config = read_config(src)
    base, base_fields, embedding_key = _base_config(fmt, config, where)
    base_cls = registry.config_class(base)
    base_cfg = base_cls(**base_fields, dtype=dtype)
    model_name = model_name or base
    cfg = _target_config(base, base_cfg, model_name, {"dtype": dtype, **fields})

    weights = SourceWeights(read_weights(src), where)
    if base == "mamba2" and embedding_key not in weights:  # either name, as transformers accepts both
        other = {"backbone.embeddings.weight": mamba_ssm.EMBEDDING_KEY}.get(embedding_key, "backbone.embeddings.weight")
        embedding_key = other if other in weights else embedding_key
    if base == "transformer":
        table = hf.transformer_table(base_cfg)
        for i in range(base_cfg.n_layers):
            weights.ignore(f"model.layers.{i}.self_attn.rotary_emb.inv_freq", "recomputed from the RoPE config")
        embed_key = "model.embed_tokens.weight"
    else:
        table = hf.mamba2_table(base_cfg, embedding_key)
        embed_key = embedding_key
    if base_cfg.tie_embeddings and "lm_head.weight" in weights:
        same = np.array_equal(np.asarray(weights.tensors["lm_head.weight"]), np.asarray(weights.tensors[embed_key]))
        weights.ignore(
            "lm_head.weight",
            f"tied to {embed_key} (the config ties the embeddings; {'equal' if same else 'NOT equal'} to it)",
        )
    shapes = ParamView(abstract_model(base, base_cfg)).shapes
    params = hf.import_table(table, weights, shapes)
    report = weights.finish()
    report["nonfinite"] = sorted(n for n, a in params.items() if not np.all(np.isfinite(np.asarray(a, np.float32))))
    if report["nonfinite"]:
        print(
            f"zoo: warning: {where}: {len(report['nonfinite'])} tensors hold NaN or Inf values (first: zoo "
            f"parameter {report['nonfinite'][0]}); the converted model will compute NaN",
            file=sys.stderr,
        )

    looped = dataclasses.replace(cfg, scan_layers=False)
    target_names = ParamView(abstract_model(model_name, looped)).names
    missing = sorted(set(target_names) - set(params))
    if missing:  # parameters of the target that the source does not have: a fresh init
        fresh_model = registry.model_class(model_name)(looped, rngs=nnx.Rngs(seed))
        fresh = ParamView(fresh_model).flat(fresh_model)
        params.update({n: np.asarray(fresh[n]) for n in missing})
    report["initialised"] = missing
    model = model_with_params(model_name, cfg, params, looped)
    info = {"format": fmt, "path": os.path.abspath(str(src)), "config": _json_safe(config), "report": report}
    return model, info


def find_tokenizer(src, tokenizer: str = "auto", eos_token: str | None = None) -> Tokenizer | None:
    """The tokenizer to ship with a converted checkpoint.

    `tokenizer`: "auto" (the source directory's tokenizer.json, else its tokenizer.model, else
    none), "none", "bytes", or a path (tokenizer.json or a SentencePiece model).
    """
    if tokenizer == "none":
        return None
    if tokenizer != "auto":
        return load_tokenizer(tokenizer, eos_token)
    directory = checkpoint_dir(src)
    if os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return HFTokenizer(os.path.join(directory, "tokenizer.json"), eos_token)
    if os.path.isfile(os.path.join(directory, "tokenizer.model")):
        return SentencePieceTokenizer(os.path.join(directory, "tokenizer.model"))
    return None


def check_tokenizer(tok: Tokenizer | None, vocab_size: int) -> None:
    """Raises ValueError when the tokenizer `tok` has more tokens than the model's `vocab_size`."""
    if tok is not None and tok.vocab_size > vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.vocab_size} tokens but the model only {vocab_size}; give the "
            "checkpoint's own tokenizer (--tokenizer PATH) or --tokenizer none"
        )


def convert_checkpoint(
    src,
    out,
    fmt: str = "hf",
    model_name: str | None = None,
    *,
    tokenizer: str = "auto",
    eos_token: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
    overwrite: bool = False,
    **fields,
) -> dict:
    """`import_checkpoint`, then a model directory at `out` with the tokenizer (`find_tokenizer`).

    `out` must be empty or missing unless `overwrite`; the directory is written under a temporary
    name and renamed into place, so an interrupted conversion leaves `out` as it was.

    Returns the conversion info written into model.json's "source" (plus "model_name")."""
    storage.check_out_dir(out, overwrite)
    tok = find_tokenizer(src, tokenizer, eos_token)
    model, info = import_checkpoint(src, fmt, model_name, dtype=dtype, seed=seed, **fields)
    check_tokenizer(tok, model.config.vocab_size)
    with storage.replacing_dir(out, overwrite) as tmp:
        save_pretrained(model, tmp, tokenizer=None if tok is None else tok.spec(), source=info)
    return {**info, "model_name": model.model_name, "tokenizer": None if tok is None else tok.spec()}


def source_kind(path) -> str:
    """What a directory holds: "model" (a zoo model directory: model.json), "run" (a `zoo train`
    work directory), "hf" (a Hugging Face checkpoint) or "mamba_ssm" (a state-spaces checkpoint)."""
    directory = model_dir_of(path)
    if (directory / MODEL_FILE).is_file():
        return "model"
    if (directory / CONFIG_FILE).is_file():
        config = storage.read_json(directory / CONFIG_FILE)
        if isinstance(config, dict) and "model_name" in config and "train" in config:
            return "run"
        if isinstance(config, dict) and ("model_type" in config or "architectures" in config):
            return "hf"
        if isinstance(config, dict) and "d_model" in config and "ssm_cfg" in config:
            return "mamba_ssm"
    raise ValueError(
        f"{str(path)!r} is neither a zoo model directory (model.json), a `zoo train` work directory, nor a "
        "Hugging Face / mamba_ssm checkpoint (config.json + weights); give one of those"
    )


def load_any(path, step: int | None = None, *, dtype: str = "float32", **model_overrides) -> tuple[nnx.Module, dict]:
    """(model, meta) of a zoo model directory, a `zoo train` work directory (checkpoint `step`,
    default the latest) or a Hugging Face / mamba_ssm checkpoint converted in memory.

    `meta` has a model.json's fields: "model_name", "model" (the config's fields), "tokenizer" (the
    spec: the model directory's, the run's data tokenizer, or the checkpoint's own as `zoo convert
    --from` finds it) and "source". `dtype` is the compute dtype of a converted checkpoint.
    """
    kind = source_kind(path)
    if step is not None and kind != "run":
        raise ValueError(f"a checkpoint step applies to a `zoo train` work directory; {str(path)!r} is a {kind} one")
    if kind == "model":
        return load_pretrained(path, **model_overrides)
    if kind == "run":
        model, config = load_model(path, step, **model_overrides)
        source = {"workdir": str(storage.path(path)), "step": step}
        tok = run_tokenizer(config.data)
    else:
        tok = find_tokenizer(path)
        model, source = import_checkpoint(path, kind, dtype=dtype, **model_overrides)
        check_tokenizer(tok, model.config.vocab_size)
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(model.config).items()}
    meta = {
        "format": "zoo-model",
        "model_name": model.model_name,
        "model": fields,
        "tokenizer": None if tok is None else tok.spec(),
        "source": source,
    }
    return model, meta


def _flat_numpy(model: nnx.Module) -> dict[str, np.ndarray]:
    cfg = model.config
    params = ParamView(model).flat(model)
    if getattr(cfg, "scan_layers", False):
        params = convert_layout(
            params, model, abstract_model(model.model_name, dataclasses.replace(cfg, scan_layers=False))
        )
    return {k: np.asarray(v, np.float32) for k, v in params.items()}


def export_tensors(model: nnx.Module, dtype: str = "float32") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """({Hugging Face key: array}, config fields) of a zoo `transformer` or `mamba2` model.

    A transformer whose tied logits the zoo scales by d_model^-0.5 exports with an untied head
    holding the scaled embedding (Hugging Face does not scale); biases an architecture has but the
    model lacks export as zeros (the same function).
    """
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {sorted(EXPORT_DTYPES)}")
    np_dtype = EXPORT_DTYPES[dtype]
    name, cfg = model.model_name, model.config
    params = _flat_numpy(model)
    if name == "transformer":
        _, qkv, o = hf.export_architecture(cfg)
        tied = cfg.tie_embeddings and not cfg.scale_tied_logits
        ecfg = dataclasses.replace(cfg, qkv_bias=qkv, o_bias=o, tie_embeddings=tied, scale_tied_logits=False)
        for i in range(cfg.n_layers):
            for proj, on in (("wq", qkv), ("wk", qkv), ("wv", qkv), ("wo", o)):
                bias = f"blocks/layers/{i}/attn/{proj}/bias"
                if on and bias not in params:
                    params[bias] = np.zeros(params[f"blocks/layers/{i}/attn/{proj}/kernel"].shape[1], np.float32)
        if cfg.tie_embeddings and not tied:
            params["unembed/kernel"] = (params["embed/embedding"] * np.float32(cfg.d_model**-0.5)).T
        return hf.export_table(hf.transformer_table(ecfg), params, np_dtype), {"cfg": ecfg}
    if name == "mamba2":
        return hf.export_table(hf.mamba2_table(cfg), params, np_dtype), {"cfg": cfg}
    raise ValueError(
        f"a {name} model has no Hugging Face architecture; export transformer or mamba2 models (HiP and "
        "MASFormer run the transformer's weights: export the transformer they were converted from)"
    )


def export_hf(
    model_dir,
    out,
    *,
    dtype: str = "float32",
    max_position_embeddings: int | None = None,
    model=None,
    meta=None,
    step: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Writes a Hugging Face checkpoint (config.json, model.safetensors, generation_config.json and
    the tokenizer files) of a zoo model directory or a `zoo train` work directory (checkpoint
    `step`, default the latest), or of `model` with its model.json `meta`. A byte-level tokenizer
    is written as an equivalent tokenizer.json (`byte_tokenizer_json`).

    `out` must be empty or missing unless `overwrite`; the files are written under a temporary
    directory renamed into place, so an interrupted export leaves `out` as it was.

    Returns {"path", "config", "tensors"}."""
    storage.check_out_dir(out, overwrite)
    if model is None:
        model, meta = load_any(model_dir, step)
    meta = meta or {}
    tensors, extra = export_tensors(model, dtype)
    source = (meta.get("source") or {}).get("config") or {}
    spec = tokenizer_spec(model_dir, meta) if model_dir is not None else None
    special = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(source.get(key), (int, list)):
            special[key] = source[key]
    if spec is not None and "eos_token_id" not in special:
        special["eos_token_id"] = spec["eos_id"]
    if model.model_name == "transformer":
        cfg = extra["cfg"]
        if max_position_embeddings is None:
            scaled = int(cfg.rope_original_max_position * cfg.rope_factor) if cfg.rope_scaling != "none" else 0
            max_position_embeddings = int(source.get("max_position_embeddings") or 0) or scaled or 2048
        config = hf.export_transformer_config(
            cfg, max_position_embeddings=max_position_embeddings, dtype=dtype, special=special
        )
    else:
        config = hf.export_mamba2_config(model.config, dtype=dtype, special=special)
    with storage.replacing_dir(out, overwrite) as tmp:
        write_safetensors(os.path.join(tmp, "model.safetensors"), tensors, metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({k: v for k, v in special.items() if k != "pad_token_id"}, f, indent=2)
        if spec is not None and spec.get("kind") in ("hf", "sentencepiece"):
            folder = os.path.dirname(spec["path"])
            for name in (os.path.basename(spec["path"]), "tokenizer_config.json", "special_tokens_map.json"):
                if os.path.isfile(os.path.join(folder, name)):
                    shutil.copyfile(os.path.join(folder, name), os.path.join(tmp, name))
        elif spec is not None and spec.get("kind") == "bytes":
            byte_tokenizer_json(tmp)
    return {"path": os.path.abspath(str(out)), "config": config, "tensors": len(tensors)}


def byte_tokenizer_json(out) -> str:
    """Writes tokenizer.json and tokenizer_config.json of a Hugging Face tokenizer equal to the zoo's
    byte tokenizer (id = UTF-8 byte, EOS 0): byte-level pieces without merges. Returns the path."""
    from tokenizers import Tokenizer as HFTokenizerModel
    from tokenizers import decoders, models, pre_tokenizers

    byte_to_char = dict(enumerate(_bytes_to_unicode()))
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = HFTokenizerModel(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    path = os.path.join(out, "tokenizer.json")
    tok.save(path)
    eos = byte_to_char[0]
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "model_max_length": 10**9}, f)
    return path


def _bytes_to_unicode() -> list[str]:
    """The printable character GPT-2's byte-level pre-tokenizer uses for each byte 0..255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def describe(info: dict) -> str:
    """A few lines for the CLI: what was converted and what happened to every source tensor."""
    r = info["report"]
    lines = [
        f"{info['format']} checkpoint {info['path']} -> {info.get('model_name', '?')}: "
        f"{r['used']} of {r['tensors']} tensors mapped"
    ]
    lines += [f"  ignored {k}: {why}" for k, why in r["ignored"].items()]
    if r["initialised"]:
        lines.append(f"  initialised fresh ({len(r['initialised'])}): {', '.join(r['initialised'][:6])}...")
    tok = info.get("tokenizer")
    lines.append(
        f"  tokenizer: {'none' if tok is None else tok['kind']} {os.path.basename(tok.get('path', '')) if tok else ''}"
    )
    return "\n".join(lines)


__all__ = [
    "FORMATS",
    "check_tokenizer",
    "convert_checkpoint",
    "describe",
    "export_hf",
    "export_tensors",
    "find_tokenizer",
    "import_checkpoint",
    "load_any",
    "source_kind",
]
