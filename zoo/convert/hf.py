"""Hugging Face checkpoints <-> zoo models: Llama-family decoders (LlamaForCausalLM, Qwen2ForCausalLM,
MistralForCausalLM) <-> `transformer`, and Mamba2ForCausalLM <-> `mamba2`.

Configs: `transformer_config` / `mamba2_config` read a config.json (transformers 4 and 5 spellings:
top-level `rope_theta` + `rope_scaling`, or `rope_parameters`; `layer_types` or the older sliding
window fields) into zoo config fields and refuse what the zoo models cannot compute with one
ValueError naming the field. `export_transformer_config` / `export_mamba2_config` write them back.

Weights: one table per architecture (`transformer_table`, `mamba2_table`) lists (source key, zoo
parameter, layout); the same table serves import and export:
    "same"  identical arrays;
    "T"     torch Linear weight [out, in] <-> zoo kernel [in, out] (transpose);
    "conv"  torch depthwise Conv1d weight [C, 1, K] <-> zoo conv_weight [K, C].
Shapes are checked against the shapes the config implies (`zoo.convert.sources.SourceWeights`), every
source tensor is used or reported, and values are copied exactly (fp32; bf16/fp16 sources widen
exactly), so import -> export -> import is bitwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from zoo.convert.sources import SourceWeights

LLAMA_FAMILY = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
# transformers' defaults for keys a config.json may leave out (per model_type).
_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, max_position_embeddings=2048, rope_theta=10_000.0),
    "qwen2": dict(
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        max_position_embeddings=32768,
        rope_theta=10_000.0,
        use_sliding_window=False,
        sliding_window=4096,
        max_window_layers=28,
    ),
    "mistral": dict(
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        max_position_embeddings=4096 * 32,
        rope_theta=10_000.0,
        sliding_window=4096,
        num_key_value_heads=8,
    ),
}
MAMBA2_DEFAULTS = dict(
    num_heads=128,
    head_dim=64,
    state_size=128,
    layer_norm_epsilon=1e-5,
    expand=2,
    conv_kernel=4,
    n_groups=8,
    use_bias=False,
    use_conv_bias=True,
    hidden_act="silu",
    chunk_size=256,
    tie_word_embeddings=False,
    time_step_min=0.001,
    time_step_max=0.1,
    time_step_floor=1e-4,
)


def _need(c: dict, key: str, where: str):
    if key not in c or c[key] is None:
        raise ValueError(f"{where}: config.json has no {key!r}")
    return c[key]


# ------------------------------------------------------------------------------------------ configs


def yarn_attention_factor(factor: float, mscale: float | None = None, mscale_all_dim: float | None = None) -> float:
    """YaRN's default cos/sin multiplier 0.1 ln(factor) + 1 (or the ratio of the mscale variants),
    as transformers infers it when a config gives no attention_factor."""

    def get(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return float(get(factor, mscale) / get(factor, mscale_all_dim))
    return get(factor)


def rope_fields(c: dict, head_dim: int, where: str) -> dict[str, Any]:
    """The transformer's RoPE fields from a config (rope_parameters, or rope_theta + rope_scaling)."""
    params = dict(c.get("rope_parameters") or {})
    if not params:
        params = dict(c.get("rope_scaling") or {})
        params.setdefault("rope_theta", c.get("rope_theta", _DEFAULTS.get(c.get("model_type"), {}).get("rope_theta")))
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"{where}: per-layer-type rope_parameters {sorted(params)} are not supported")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta") or c.get("rope_theta") or 10_000.0)
    if float(params.get("partial_rotary_factor", c.get("partial_rotary_factor") or 1.0)) != 1.0:
        raise ValueError(f"{where}: partial_rotary_factor != 1 (RoPE on part of the head) is not supported")
    out: dict[str, Any] = {"rope_theta": theta}
    if kind == "default":
        return out
    orig = int(params.get("original_max_position_embeddings") or c.get("max_position_embeddings") or 0)
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(_need(params, "factor", where))}
    if kind == "llama3":
        return {
            **out,
            "rope_scaling": "llama3",
            "rope_factor": float(_need(params, "factor", where)),
            "rope_low_freq_factor": float(_need(params, "low_freq_factor", where)),
            "rope_high_freq_factor": float(_need(params, "high_freq_factor", where)),
            "rope_original_max_position": orig,
        }
    if kind == "yarn":
        factor = params.get("factor")
        if factor is None:
            factor = _need(c, "max_position_embeddings", where) / orig
        factor = float(factor)
        attention = params.get("attention_factor")
        if attention is None:
            attention = yarn_attention_factor(factor, params.get("mscale"), params.get("mscale_all_dim"))
        return {
            **out,
            "rope_scaling": "yarn",
            "rope_factor": factor,
            "rope_original_max_position": orig,
            "rope_beta_fast": float(params.get("beta_fast") or 32.0),
            "rope_beta_slow": float(params.get("beta_slow") or 1.0),
            "rope_truncate": bool(params.get("truncate", True)),
            "rope_attention_factor": float(attention),
        }
    raise ValueError(
        f"{where}: rope type {kind!r} is not supported (supported: default, linear, llama3, yarn; "
        "'dynamic' rescales with the current length, which a fixed KV cache cannot follow)"
    )


def transformer_config(c: dict, where: str = "config.json") -> dict[str, Any]:
    """TransformerConfig fields of a Llama / Qwen2 / Mistral config.json.

    Raises:
      ValueError: naming the field the zoo's transformer cannot reproduce (activation, MLP biases,
        per-layer RoPE, dynamic RoPE, partial rotary, ...).
    """
    kind = c.get("model_type")
    if kind not in LLAMA_FAMILY:
        raise ValueError(
            f"{where}: model_type {kind!r} is not a supported Llama-family decoder ({sorted(LLAMA_FAMILY)}); "
            "Mamba-2 checkpoints convert with --model mamba2"
        )
    c = {**_DEFAULTS[kind], **{k: v for k, v in c.items() if v is not None or k == "sliding_window"}}
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={c['hidden_act']!r}; the zoo's SwiGLU uses silu")
    if c.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported (the zoo's SwiGLU has no biases)")
    d = int(_need(c, "hidden_size", where))
    heads = int(_need(c, "num_attention_heads", where))
    head_dim = int(c.get("head_dim") or d // heads)
    n_layers = int(_need(c, "num_hidden_layers", where))
    fields: dict[str, Any] = dict(
        vocab_size=int(_need(c, "vocab_size", where)),
        d_model=d,
        n_layers=n_layers,
        n_heads=heads,
        n_kv_heads=int(c.get("num_key_value_heads") or heads),
        d_ff=int(_need(c, "intermediate_size", where)),
        head_dim_override=0 if head_dim * heads == d else head_dim,
        norm_eps=float(c["rms_norm_eps"]),
        tie_embeddings=bool(c["tie_word_embeddings"]),
        scale_tied_logits=False,
        qkv_bias=kind == "qwen2" or bool(c.get("attention_bias")),
        o_bias=kind == "llama" and bool(c.get("attention_bias")),
    )
    fields.update(rope_fields(c, head_dim, where))
    # Attention pattern: HF's sliding window (query i sees keys i - W < j <= i) is the zoo's "window".
    window = c.get("sliding_window")
    if c.get("layer_types"):
        names = {"full_attention": "full", "sliding_attention": "window"}
        bad = sorted({t for t in c["layer_types"] if t not in names})
        if bad:
            raise ValueError(f"{where}: layer_types {bad} are not supported (full_attention, sliding_attention)")
        kinds = tuple(names[t] for t in c["layer_types"])
        if len(kinds) != n_layers:
            raise ValueError(f"{where}: layer_types has {len(kinds)} entries for {n_layers} layers")
    elif kind == "mistral":
        kinds = ("window" if window else "full",) * n_layers
    elif kind == "qwen2" and c.get("use_sliding_window") and window:
        kinds = tuple("window" if i >= int(c["max_window_layers"]) else "full" for i in range(n_layers))
    else:
        kinds = ("full",) * n_layers
    if "window" in kinds:
        if not window:
            raise ValueError(f"{where}: sliding-window layers without a sliding_window size")
        fields["window"] = int(window)
    if len(set(kinds)) == 1:
        fields["attention"] = kinds[0]
    else:
        fields["layer_attention"] = kinds
    return fields


def mamba2_config(c: dict, where: str = "config.json") -> dict[str, Any]:
    """Mamba2Config fields of a Hugging Face Mamba2ForCausalLM config.json."""
    if c.get("model_type") != "mamba2":
        raise ValueError(f"{where}: model_type {c.get('model_type')!r} is not 'mamba2' (Mamba2ForCausalLM)")
    c = {**MAMBA2_DEFAULTS, **{k: v for k, v in c.items() if v is not None}}
    if c["hidden_act"] != "silu":
        raise ValueError(f"{where}: hidden_act={c['hidden_act']!r}; Mamba-2 uses silu")
    if c["use_bias"]:
        raise ValueError(f"{where}: use_bias=true (in/out projection biases) is not supported")
    limit = tuple(float(x) for x in c.get("time_step_limit", (0.0, math.inf)))
    if limit != (0.0, math.inf):
        raise ValueError(f"{where}: time_step_limit={list(limit)} clamps dt; only (0, inf) (no clamp) is supported")
    d = int(_need(c, "hidden_size", where))
    expand, head_dim = int(c["expand"]), int(c["head_dim"])
    if int(c["num_heads"]) * head_dim != expand * d:
        raise ValueError(
            f"{where}: num_heads ({c['num_heads']}) * head_dim ({head_dim}) != expand ({expand}) * hidden_size ({d})"
        )
    return dict(
        vocab_size=int(_need(c, "vocab_size", where)),
        pad_vocab_size_multiple=1,
        d_model=d,
        n_layers=int(_need(c, "num_hidden_layers", where)),
        d_state=int(c["state_size"]),
        d_conv=int(c["conv_kernel"]),
        expand=expand,
        headdim=head_dim,
        ngroups=int(c["n_groups"]),
        chunk_size=int(c["chunk_size"]),
        norm_eps=float(c["layer_norm_epsilon"]),
        conv_bias=bool(c["use_conv_bias"]),
        tie_embeddings=bool(c["tie_word_embeddings"]),
        dt_min=float(c["time_step_min"]),
        dt_max=float(c["time_step_max"]),
        dt_init_floor=float(c["time_step_floor"]),
    )


def _config_rope(cfg) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "linear":
        out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position,
        }
    elif cfg.rope_scaling == "yarn":
        out["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": cfg.rope_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position,
            "beta_fast": cfg.rope_beta_fast,
            "beta_slow": cfg.rope_beta_slow,
            "truncate": cfg.rope_truncate,
            "attention_factor": cfg.rope_attention_factor,
        }
    elif cfg.rope_attention_factor != 1.0:
        raise ValueError("rope_attention_factor != 1 without yarn scaling has no Hugging Face config field")
    return out


def export_architecture(cfg) -> tuple[str, bool, bool]:
    """(model_type, q/k/v biases, output bias) a transformer config exports as: llama, qwen2 or
    mistral, with the biases that architecture has (zero where the zoo model has none)."""
    kinds = {s.kind for s in cfg.layer_specs()}
    if "block" in kinds:
        raise ValueError("block-local attention layers have no Hugging Face equivalent; export a full/window model")
    if cfg.o_bias:
        if "window" in kinds:
            raise ValueError("an output-projection bias with sliding-window layers has no Hugging Face equivalent")
        return "llama", True, True  # attention_bias=true: biases on q, k, v and o
    if cfg.qkv_bias or kinds == {"window", "full"}:
        return "qwen2", True, False  # q/k/v biases; per-layer sliding windows through layer_types
    if kinds == {"window"}:
        return "mistral", False, False
    return "llama", False, False


def export_transformer_config(cfg, *, max_position_embeddings: int, dtype: str, special: dict) -> dict[str, Any]:
    """config.json of a zoo transformer config as LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM."""
    kind, _, o_bias = export_architecture(cfg)
    kinds = [s.kind for s in cfg.layer_specs()]
    c: dict[str, Any] = {
        "architectures": [LLAMA_FAMILY[kind]],
        "model_type": kind,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(max_position_embeddings),
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": bool(cfg.tie_embeddings and not cfg.scale_tied_logits),
        "attention_dropout": 0.0,
        "torch_dtype": dtype,
        "use_cache": True,
        **_config_rope(cfg),
        **special,
    }
    if kind == "llama":
        c.update(attention_bias=o_bias, mlp_bias=False)
    elif kind == "mistral":
        c["sliding_window"] = cfg.window
    else:
        has_window = "window" in kinds
        c.update(
            use_sliding_window=has_window,
            sliding_window=cfg.window if has_window else None,
            max_window_layers=cfg.n_layers,
            layer_types=["sliding_attention" if k == "window" else "full_attention" for k in kinds],
        )
    return c


def export_mamba2_config(cfg, *, dtype: str, special: dict) -> dict[str, Any]:
    """config.json of a zoo Mamba2Config as Mamba2ForCausalLM (the vocabulary is the embedding's rows)."""
    defaults = {
        "b_scale": 1.0,
        "b_clip": 0.0,
        "dt_scale": 1.0,
        "dt_offset": 0.0,
        "a_scale": 1.0,
        "a_offset": 0.0,
        "state_norm_thresholds": (),
        "window": 0,
    }
    changed = sorted(k for k, v in defaults.items() if getattr(cfg, k) != v)
    if changed:
        raise ValueError(f"the Stuffed-Mamba inference options {changed} have no Hugging Face equivalent; reset them")
    return {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": "mamba2",
        "vocab_size": cfg.padded_vocab,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "state_size": cfg.d_state,
        "conv_kernel": cfg.d_conv,
        "expand": cfg.expand,
        "head_dim": cfg.headdim,
        "num_heads": cfg.n_heads,
        "n_groups": cfg.ngroups,
        "chunk_size": cfg.chunk_size,
        "layer_norm_epsilon": cfg.norm_eps,
        "use_bias": False,
        "use_conv_bias": cfg.conv_bias,
        "hidden_act": "silu",
        "residual_in_fp32": True,
        "rescale_prenorm_residual": False,
        "time_step_min": cfg.dt_min,
        "time_step_max": cfg.dt_max,
        "time_step_floor": cfg.dt_init_floor,
        "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": dtype,
        "use_cache": True,
        **special,
    }


# ------------------------------------------------------------------------------------------- tables

Table = list[tuple[str, str, str]]  # (source key, zoo parameter name, layout)


def transformer_table(cfg) -> Table:
    """(HF key, zoo name, layout) of every tensor of a Llama-family checkpoint of this config."""
    rows: Table = [("model.embed_tokens.weight", "embed/embedding", "same")]
    for i in range(cfg.n_layers):
        hf, zoo = f"model.layers.{i}.", f"blocks/layers/{i}/"
        rows += [
            (hf + "input_layernorm.weight", zoo + "attn_norm/scale", "same"),
            (hf + "self_attn.q_proj.weight", zoo + "attn/wq/kernel", "T"),
            (hf + "self_attn.k_proj.weight", zoo + "attn/wk/kernel", "T"),
            (hf + "self_attn.v_proj.weight", zoo + "attn/wv/kernel", "T"),
            (hf + "self_attn.o_proj.weight", zoo + "attn/wo/kernel", "T"),
            (hf + "post_attention_layernorm.weight", zoo + "mlp_norm/scale", "same"),
            (hf + "mlp.gate_proj.weight", zoo + "mlp/gate/kernel", "T"),
            (hf + "mlp.up_proj.weight", zoo + "mlp/up/kernel", "T"),
            (hf + "mlp.down_proj.weight", zoo + "mlp/down/kernel", "T"),
        ]
        if cfg.qkv_bias:
            rows += [(hf + f"self_attn.{n}_proj.bias", zoo + f"attn/w{n}/bias", "same") for n in "qkv"]
        if cfg.o_bias:
            rows.append((hf + "self_attn.o_proj.bias", zoo + "attn/wo/bias", "same"))
    rows.append(("model.norm.weight", "final_norm/scale", "same"))
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", "unembed/kernel", "T"))
    return rows


def mamba2_table(cfg, embedding_key: str = "backbone.embeddings.weight") -> Table:
    """(source key, zoo name, layout) of a Mamba-2 checkpoint; mamba_ssm names the embedding
    `backbone.embedding.weight`, Hugging Face `backbone.embeddings.weight`."""
    rows: Table = [(embedding_key, "embedding", "same")]
    for i in range(cfg.n_layers):
        src, zoo = f"backbone.layers.{i}.", f"blocks/layers/{i}/"
        rows += [
            (src + "norm.weight", zoo + "norm/scale", "same"),
            (src + "mixer.in_proj.weight", zoo + "mixer/in_proj/kernel", "T"),
            (src + "mixer.conv1d.weight", zoo + "mixer/conv_weight", "conv"),
            (src + "mixer.dt_bias", zoo + "mixer/dt_bias", "same"),
            (src + "mixer.A_log", zoo + "mixer/A_log", "same"),
            (src + "mixer.D", zoo + "mixer/D", "same"),
            (src + "mixer.norm.weight", zoo + "mixer/norm_weight", "same"),
            (src + "mixer.out_proj.weight", zoo + "mixer/out_proj/kernel", "T"),
        ]
        if cfg.conv_bias:
            rows.append((src + "mixer.conv1d.bias", zoo + "mixer/conv_bias", "same"))
    rows.append(("backbone.norm_f.weight", "final_norm/scale", "same"))
    if not cfg.tie_embeddings:
        rows.append(("lm_head.weight", "lm_head", "same"))
    return rows


def source_shape(zoo_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The source tensor's shape for a zoo parameter of `zoo_shape` in `layout`."""
    if layout == "same":
        return tuple(zoo_shape)
    if layout == "T":
        return tuple(reversed(zoo_shape))
    if layout == "conv":  # zoo [K, C] <- torch [C, 1, K]
        return (zoo_shape[1], 1, zoo_shape[0])
    raise ValueError(f"unknown layout {layout!r}")


def to_zoo(a: np.ndarray, layout: str) -> np.ndarray:
    """A source tensor in the zoo's layout: `layout` "same", "T" (transposed) or a conv [C, 1, K] -> [K, C]."""
    if layout == "same":
        return a
    if layout == "T":
        return np.ascontiguousarray(a.T)
    return np.ascontiguousarray(a[:, 0, :].T)  # conv: [C, 1, K] -> [K, C]


def from_zoo(a: np.ndarray, layout: str) -> np.ndarray:
    """The inverse of `to_zoo`: a zoo tensor in the source's layout."""
    if layout == "same":
        return a
    if layout == "T":
        return np.ascontiguousarray(a.T)
    return np.ascontiguousarray(a.T[:, None, :])  # conv: [K, C] -> [C, 1, K]


def import_table(table: Table, weights: SourceWeights, shapes: dict[str, Any]) -> dict[str, np.ndarray]:
    """{zoo name: float32 array} of every row, each source tensor checked against the zoo shape."""
    out = {}
    for key, name, layout in table:
        if name not in shapes:
            raise ValueError(f"internal mapping error: the zoo model has no parameter {name!r} (for {key!r})")
        out[name] = to_zoo(weights.take(key, source_shape(shapes[name].shape, layout)), layout)
    return out


def export_table(table: Table, params: dict[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
    """{source key: array in `dtype`} of every row from flat zoo parameters."""
    return {key: from_zoo(np.asarray(params[name]), layout).astype(dtype) for key, name, layout in table}
