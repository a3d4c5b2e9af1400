"""state-spaces/mamba (`mamba_ssm`) Mamba-2 checkpoints -> zoo `mamba2`: the released `mamba2-*`
models (config.json with d_model / n_layer / ssm_cfg; `pytorch_model.bin` or safetensors).

The tensors are Hugging Face's Mamba2 tensors under the same names and layouts, except the
embedding (`backbone.embedding.weight`, HF `backbone.embeddings.weight`), and `lm_head.weight` is
saved even when tied (it is the embedding's storage): the table is `zoo.convert.hf.mamba2_table`
with that embedding name. The released configs give only ssm_cfg {"layer": "Mamba2"}; the
Mamba2 module's defaults then apply (`SSM_DEFAULTS`). The vocabulary is padded to a multiple of
`pad_vocab_size_multiple` (the embedding's rows); the zoo model's vocab_size is that padded size,
so its logits have the reference's columns.
"""

from __future__ import annotations

import math
from typing import Any

# mamba_ssm.modules.mamba2.Mamba2 defaults (for the keys a released ssm_cfg leaves out).
SSM_DEFAULTS = dict(
    d_state=128,
    d_conv=4,
    expand=2,
    headdim=64,
    ngroups=1,
    chunk_size=256,
    rmsnorm=True,
    norm_before_gate=False,
    D_has_hdim=False,
    bias=False,
    conv_bias=True,
    d_ssm=None,
    dt_min=0.001,
    dt_max=0.1,
    dt_init_floor=1e-4,
    A_init_range=(1, 16),
    dt_limit=(0.0, math.inf),
    learnable_init_states=False,
)
# mamba_ssm.models.config_mamba.MambaConfig defaults.
MODEL_DEFAULTS = dict(
    d_intermediate=0,
    vocab_size=50277,
    attn_layer_idx=[],
    rms_norm=True,
    residual_in_fp32=True,
    pad_vocab_size_multiple=8,
    tie_embeddings=True,
)
EMBEDDING_KEY = "backbone.embedding.weight"


def mamba2_config(c: dict, where: str = "config.json") -> dict[str, Any]:
    """Mamba2Config fields of a mamba_ssm config.json (MambaLMHeadModel with Mamba2 layers).

    Raises:
      ValueError: naming the field the zoo's Mamba-2 cannot reproduce (Mamba-1 layers, hybrid
        attention layers, an MLP after the mixer, LayerNorm, norm before gate, per-channel D, ...).
    """
    if "d_model" not in c or "n_layer" not in c:
        raise ValueError(
            f"{where}: not a mamba_ssm config (needs d_model and n_layer); Hugging Face configs use --from hf"
        )
    c = {**MODEL_DEFAULTS, **c}
    ssm = {**SSM_DEFAULTS, **(c.get("ssm_cfg") or {})}
    layer = ssm.pop("layer", "Mamba1")
    if layer != "Mamba2":
        raise ValueError(f"{where}: ssm_cfg.layer={layer!r}; only Mamba2 layers convert (the zoo has no Mamba-1)")
    checks = {
        "d_intermediate": (c["d_intermediate"], 0, "an MLP after each mixer"),
        "attn_layer_idx": (list(c["attn_layer_idx"] or []), [], "hybrid attention layers"),
        "rms_norm": (bool(c["rms_norm"]), True, "LayerNorm instead of RMSNorm"),
        "ssm_cfg.rmsnorm": (bool(ssm["rmsnorm"]), True, "no gated norm"),
        "ssm_cfg.norm_before_gate": (bool(ssm["norm_before_gate"]), False, "norm before the gate"),
        "ssm_cfg.D_has_hdim": (bool(ssm["D_has_hdim"]), False, "a D per channel"),
        "ssm_cfg.bias": (bool(ssm["bias"]), False, "in/out projection biases"),
        "ssm_cfg.learnable_init_states": (bool(ssm["learnable_init_states"]), False, "learned initial states"),
        "ssm_cfg.dt_limit": (tuple(float(x) for x in ssm["dt_limit"]), (0.0, math.inf), "a dt clamp"),
    }
    for name, (value, want, what) in checks.items():
        if value != want:
            raise ValueError(f"{where}: {name}={value!r} ({what}) is not supported; the zoo's Mamba-2 needs {want!r}")
    d, expand = int(c["d_model"]), int(ssm["expand"])
    if ssm["d_ssm"] not in (None, expand * d):
        raise ValueError(f"{where}: ssm_cfg.d_ssm={ssm['d_ssm']} < d_inner (a gated-MLP part) is not supported")
    multiple = int(c["pad_vocab_size_multiple"])
    rows = -(-int(c["vocab_size"]) // multiple) * multiple
    return dict(
        vocab_size=rows,
        pad_vocab_size_multiple=1,
        d_model=d,
        n_layers=int(c["n_layer"]),
        d_state=int(ssm["d_state"]),
        d_conv=int(ssm["d_conv"]),
        expand=expand,
        headdim=int(ssm["headdim"]),
        ngroups=int(ssm["ngroups"]),
        chunk_size=int(ssm["chunk_size"]),
        conv_bias=bool(ssm["conv_bias"]),
        norm_eps=1e-5,
        tie_embeddings=bool(c["tie_embeddings"]),
        A_init_range=tuple(float(x) for x in ssm["A_init_range"]),
        dt_min=float(ssm["dt_min"]),
        dt_max=float(ssm["dt_max"]),
        dt_init_floor=float(ssm["dt_init_floor"]),
    )
