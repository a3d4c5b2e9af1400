"""Golden fixtures of Mamba-2: the Hugging Face format (1 and 2 groups) and the state-spaces/mamba
(mamba_ssm) format, each checked against a float64 numpy recurrence."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
from transformers import (
    Mamba2Config,
    Mamba2ForCausalLM,
)

from golden.common import (
    _NPZ_DOC,
    MAMBA_SEQ_LEN,
    NEW_TOKENS,
    NUMPY_REF_ATOL,
    _finish_hf,
    _full_logits,
    _greedy,
    _random_rows,
    _randomize,
    _write_npz,
)

# ----------------------------------------------------------------------------------------------------------
# Independent Mamba-2 reference (float64 numpy, sequential recurrence, state-spaces/mamba semantics)


def _mamba2_numpy_logits(sd: dict[str, np.ndarray], ids: np.ndarray, cfg: dict) -> np.ndarray:
    """Mamba-2 LM logits by the plain recurrence of mamba_ssm's `Mamba2.step`, in float64.

    Written from the equations (state-spaces/mamba: `Mamba2.step`, `RMSNormGated` with
    `norm_before_gate=False`, `Block`/`MixerModel` pre-norm residual), independently of HF's chunked scan.

    Args:
        sd: mamba_ssm state dict as numpy (`backbone.embedding.weight`, `backbone.layers.{i}.mixer.*`, ...).
        ids: int [B, T] token ids.
        cfg: `d_model`, `n_layer`, `d_state`, `d_conv`, `expand`, `headdim`, `ngroups`, `eps`.

    Returns:
        float64 logits [B, T, V].
    """
    d_inner = cfg["expand"] * cfg["d_model"]
    nheads, headdim, ngroups, d_state = d_inner // cfg["headdim"], cfg["headdim"], cfg["ngroups"], cfg["d_state"]
    eps = cfg["eps"]

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    def silu(x):
        return x / (1.0 + np.exp(-x))

    def softplus(x):
        return np.logaddexp(0.0, x)

    get = {k: v.astype(np.float64) for k, v in sd.items()}
    batch, seq_len = ids.shape
    residual = get["backbone.embedding.weight"][ids]  # [B, T, D]
    for layer in range(cfg["n_layer"]):
        p = f"backbone.layers.{layer}."
        h = rms(residual, get[p + "norm.weight"])
        zxbcdt = h @ get[p + "mixer.in_proj.weight"].T
        z = zxbcdt[..., :d_inner]
        xbc = zxbcdt[..., d_inner : 2 * d_inner + 2 * ngroups * d_state]
        dt_raw = zxbcdt[..., 2 * d_inner + 2 * ngroups * d_state :]
        w = get[p + "mixer.conv1d.weight"][:, 0, :]  # [C, K]
        kernel = w.shape[1]
        padded = np.concatenate([np.zeros((batch, kernel - 1, xbc.shape[-1])), xbc], axis=1)
        conv = sum(padded[:, j : j + seq_len] * w[:, j] for j in range(kernel)) + get[p + "mixer.conv1d.bias"]
        xbc = silu(conv)
        x = xbc[..., :d_inner].reshape(batch, seq_len, nheads, headdim)
        bmat = xbc[..., d_inner : d_inner + ngroups * d_state].reshape(batch, seq_len, ngroups, d_state)
        cmat = xbc[..., d_inner + ngroups * d_state :].reshape(batch, seq_len, ngroups, d_state)
        group_of_head = np.arange(nheads) // (nheads // ngroups)
        bmat, cmat = bmat[:, :, group_of_head], cmat[:, :, group_of_head]  # [B, T, H, N]
        dt = softplus(dt_raw + get[p + "mixer.dt_bias"])  # [B, T, H]
        a = -np.exp(get[p + "mixer.A_log"])
        state = np.zeros((batch, nheads, headdim, d_state))
        ys = []
        for t in range(seq_len):
            decay = np.exp(dt[:, t] * a)[:, :, None, None]
            state = state * decay + (dt[:, t, :, None, None] * x[:, t, :, :, None] * bmat[:, t, :, None, :])
            y = np.einsum("bhpn,bhn->bhp", state, cmat[:, t]) + get[p + "mixer.D"][:, None] * x[:, t]
            ys.append(y.reshape(batch, d_inner))
        y = np.stack(ys, axis=1) * silu(z)  # gate before the norm (norm_before_gate=False)
        group = d_inner // ngroups
        yg = y.reshape(batch, seq_len, ngroups, group)
        yg = yg / np.sqrt(np.mean(yg * yg, axis=-1, keepdims=True) + eps)
        y = yg.reshape(batch, seq_len, d_inner) * get[p + "mixer.norm.weight"]
        residual = residual + y @ get[p + "mixer.out_proj.weight"].T
    hidden = rms(residual, get["backbone.norm_f.weight"])
    return hidden @ get["lm_head.weight"].T


_MAMBA2_HF_KEYS = (
    "backbone.embeddings.weight [V,D] (HF's name; mamba_ssm's is backbone.embedding.weight, which HF renames on "
    "load); backbone.layers.{i}.norm.weight [D]; backbone.layers.{i}.mixer.in_proj.weight [2*E + 2*G*N + H, D] "
    "(E = expand*D = H*P; use_bias=false so no in/out_proj bias); mixer.conv1d.weight [E + 2*G*N, 1, K] and "
    "mixer.conv1d.bias [E + 2*G*N]; mixer.dt_bias [H]; mixer.A_log [H]; mixer.D [H]; mixer.norm.weight [E]; "
    "mixer.out_proj.weight [D, E]; backbone.norm_f.weight [D]; lm_head.weight [V,D] (absent when tied)."
)


_MAMBA2_SEMANTICS = (
    "Block: h += mixer(rms(h)) (pre-norm, residual in fp32), logits = rms_f(h) @ lm_head.T; every RMSNorm "
    "and the gated norm use layer_norm_epsilon (1e-5). Mixer: zxbcdt = in_proj(u) split in this order along the "
    "output rows: z [E] (gate), xBC [E + 2*G*N], dt [H]. xBC = silu(causal depthwise conv1d(xBC) + bias), "
    "kernel K, left zero padding K-1: out[t,c] = bias[c] + sum_k w[c,0,k] * xBC[t-K+1+k, c]. Then split xBC "
    "into x [E] -> [H, P] (head-major), B [G*N] -> [G, N], C [G*N] -> [G, N]; head h uses group h // (H/G). "
    "dt = softplus(dt + dt_bias) (clamped to time_step_limit = (0, inf), i.e. no clamp), A = -exp(A_log); "
    "state[h] = exp(dt[h]*A[h]) * state[h] + dt[h] * outer(x[h], B[g(h)]); y[h] = state[h] @ C[g(h)] + "
    "D[h] * x[h]. Gated norm (MambaRMSNormGated, = mamba_ssm RMSNormGated with norm_before_gate=False): "
    "y = y * silu(z) FIRST, then RMS-normalise within G groups of E/G contiguous channels, times norm.weight. "
    "out = out_proj(y). The conv and SSM states start at zero."
)


def _mamba2_config(vocab: int, groups: int, headdim: int, tied: bool) -> Mamba2Config:
    """HF Mamba2Config of the tiny model: D=32, 2 layers, N=16, expand 2, K=4, chunk 8."""
    hidden, expand = 32, 2
    return Mamba2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=2,
        state_size=16,
        expand=expand,
        head_dim=headdim,
        num_heads=expand * hidden // headdim,
        n_groups=groups,
        conv_kernel=4,
        chunk_size=8,
        use_bias=False,
        use_conv_bias=True,
        layer_norm_epsilon=1e-5,
        residual_in_fp32=True,
        tie_word_embeddings=tied,
        time_step_limit=(0.0, float("inf")),
    )


def _mamba2_numpy_check(model: Mamba2ForCausalLM, ids: np.ndarray, logits: np.ndarray) -> float:
    """Max |HF logits - float64 numpy recurrence| for an HF Mamba2 model (keys renamed to mamba_ssm's)."""
    cfg = model.config
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.numpy() for k, v in model.state_dict().items()}
    sd.setdefault("lm_head.weight", sd["backbone.embedding.weight"])
    ref = _mamba2_numpy_logits(
        sd,
        ids,
        {
            "d_model": cfg.hidden_size,
            "n_layer": cfg.num_hidden_layers,
            "d_state": cfg.state_size,
            "expand": cfg.expand,
            "headdim": cfg.head_dim,
            "ngroups": cfg.n_groups,
            "eps": cfg.layer_norm_epsilon,
        },
    )
    diff = float(np.abs(ref - logits).max())
    assert diff < NUMPY_REF_ATOL, f"HF Mamba2 differs from the numpy recurrence by {diff}"
    return diff


def _add_numpy_check(entry: dict, model: Mamba2ForCausalLM, out_dir: str, name: str) -> dict:
    """Adds the numpy-recurrence check (on the saved golden inputs and logits) to a manifest entry."""
    with np.load(os.path.join(out_dir, name, "golden.npz")) as z:
        entry["checks"]["max_abs_hf_vs_float64_numpy_recurrence_logits"] = _mamba2_numpy_check(
            model, z["input_ids"], z["logits"]
        )
    return entry


def make_mamba2_hf(out_dir: str, groups: int) -> dict:
    """HF Mamba2ForCausalLM: n_groups 1 untied (`mamba2_hf`) or n_groups 2 tied (`mamba2_hf_g2`)."""
    name = "mamba2_hf" if groups == 1 else f"mamba2_hf_g{groups}"
    headdim = 16 if groups == 1 else 8
    tied = groups != 1
    config = _mamba2_config(vocab=256, groups=groups, headdim=headdim, tied=tied)
    torch.manual_seed(4 + groups)
    model = Mamba2ForCausalLM(config)
    _randomize(model, seed=104 + groups)
    ids = _random_rows(seed=204 + groups, vocab=config.vocab_size, length=MAMBA_SEQ_LEN)
    notes = {
        "keys": _MAMBA2_HF_KEYS,
        "semantics": _MAMBA2_SEMANTICS,
        "sizes": (
            f"D=32, E=64, H={config.num_heads}, P={headdim}, G={groups}, N=16, K=4, chunk_size=8, "
            f"in_proj rows = 2*64 + 2*{groups}*16 + {config.num_heads} = "
            f"{2 * 64 + 2 * groups * 16 + config.num_heads}, "
            f"conv channels = 64 + 2*{groups}*16 = {64 + 2 * groups * 16}; T = {MAMBA_SEQ_LEN} (not a multiple "
            "of chunk_size)."
        ),
        "tied": "tie_word_embeddings=" + ("true: no lm_head.weight in the file" if tied else "false"),
        "config_quirks": (
            'transformers 5.24 writes time_step_limit as [0.0, {"__float__": "Infinity"}] (its encoding of '
            "float('inf')); older HF Mamba2 config.json files have [0.0, Infinity] (non-standard JSON that "
            "Python's json reads). time_step_rank, time_step_min/max/floor and initializer_range only matter "
            "for initialisation; num_heads must equal expand*hidden_size/head_dim."
        ),
        "hf_cpu_path": (
            "Without mamba_ssm/causal_conv1d installed HF runs its torch fallbacks: prefill = chunked SSD scan "
            "(mamba2_chunk_scan, fp32), decode = one-step recurrence (mamba2_selective_state_update) and "
            "causal_conv1d_update; both checked here against each other and a float64 numpy recurrence."
        ),
    }
    seeds = {"torch.manual_seed": 4 + groups, "parameters": 104 + groups, "input_ids": 204 + groups}
    entry = _finish_hf(name, out_dir, model, Mamba2ForCausalLM, ids, "hf-safetensors", notes, seeds)
    return _add_numpy_check(entry, model, out_dir, name)


def make_mamba2_ss(out_dir: str) -> dict:
    """The same kind of Mamba-2 in the state-spaces/mamba (mamba_ssm) release format; logits from HF's Mamba2."""
    name = "mamba2_ss"
    d_model, n_layer, vocab, pad_multiple = 32, 2, 250, 16
    padded_vocab = vocab + (-vocab) % pad_multiple
    ssm_cfg = {
        "layer": "Mamba2",
        "d_state": 16,
        "d_conv": 4,
        "expand": 2,
        "headdim": 16,
        "ngroups": 1,
        "chunk_size": 8,
        "rmsnorm": True,
        "norm_before_gate": False,
        "D_has_hdim": False,
        "bias": False,
        "conv_bias": True,
    }
    ss_config = {
        "d_model": d_model,
        "d_intermediate": 0,
        "n_layer": n_layer,
        "vocab_size": vocab,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": pad_multiple,
        "tie_embeddings": True,
    }
    hf_config = _mamba2_config(vocab=padded_vocab, groups=1, headdim=16, tied=True)
    torch.manual_seed(7)
    model = Mamba2ForCausalLM(hf_config).eval()
    _randomize(model, seed=107)
    ids = _random_rows(seed=207, vocab=vocab, length=MAMBA_SEQ_LEN)

    # mamba_ssm state dict: HF names with 'embeddings.' -> 'embedding.', and lm_head.weight present and tied
    # (MambaLMHeadModel.save_pretrained is torch.save(self.state_dict()) of a model whose lm_head shares the
    # embedding's storage).
    state = {}
    for key, value in model.state_dict().items():
        state[key.replace("backbone.embeddings.", "backbone.embedding.")] = value.detach().clone()
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    order = ["backbone.embedding.weight"]
    for i in range(n_layer):
        p = f"backbone.layers.{i}."
        order += [p + "mixer." + k for k in ("dt_bias", "A_log", "D", "in_proj.weight", "conv1d.weight")]
        order += [p + "mixer." + k for k in ("conv1d.bias", "norm.weight", "out_proj.weight")]
        order += [p + "norm.weight"]
    order += ["backbone.norm_f.weight", "lm_head.weight"]
    assert sorted(order) == sorted(state), sorted(set(order) ^ set(state))
    ordered = {k: state[k] for k in order}  # mamba_ssm's module registration order

    logits = _full_logits(model, ids)
    greedy, decode_logits, checks = _greedy(model, ids, NEW_TOKENS)
    directory = os.path.join(out_dir, name)
    os.makedirs(directory)
    torch.save(ordered, os.path.join(directory, "pytorch_model.bin"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(ss_config, f, indent=4)
        f.write("\n")

    # Reload the file the way a converter would and run it through HF again.
    loaded = torch.load(os.path.join(directory, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    assert list(loaded) == order
    assert loaded["lm_head.weight"].data_ptr() == loaded["backbone.embedding.weight"].data_ptr()
    hf_state = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in loaded.items()}
    again = Mamba2ForCausalLM(hf_config).eval()
    missing, unexpected = again.load_state_dict(hf_state, strict=False)
    assert not missing and unexpected == [], (missing, unexpected)
    again.tie_weights()
    checks["max_abs_reloaded_vs_saved_logits"] = float(np.abs(_full_logits(again, ids) - logits).max())
    assert checks["max_abs_reloaded_vs_saved_logits"] == 0.0, checks
    numpy_sd = {k: v.numpy() for k, v in loaded.items()}
    ref = _mamba2_numpy_logits(
        numpy_sd,
        ids,
        {"d_model": d_model, "n_layer": n_layer, "d_state": 16, "expand": 2, "headdim": 16, "ngroups": 1, "eps": 1e-5},
    )
    checks["max_abs_hf_vs_float64_numpy_recurrence_logits"] = float(np.abs(ref - logits).max())
    assert checks["max_abs_hf_vs_float64_numpy_recurrence_logits"] < NUMPY_REF_ATOL, checks

    arrays = {"input_ids": ids, "logits": logits, "greedy_ids": greedy, "decode_logits": decode_logits}
    _write_npz(os.path.join(directory, "golden.npz"), arrays)
    notes = {
        "logits_source": (
            "golden.npz comes from transformers' Mamba2ForCausalLM (torch fallback path, fp32) loaded with these "
            "exact weights (config below as hf_equivalent_config), not from mamba_ssm (needs CUDA); checked "
            "against a float64 numpy recurrence of mamba_ssm's Mamba2.step equations."
        ),
        "key_map_mamba_ssm_to_hf": {
            "backbone.embedding.weight": "backbone.embeddings.weight",
            "lm_head.weight": "lm_head.weight (tied: same storage as backbone.embedding.weight in the file)",
            "backbone.layers.{i}.norm.weight": "same",
            "backbone.layers.{i}.mixer.{in_proj.weight, conv1d.weight, conv1d.bias, dt_bias, A_log, D, "
            "norm.weight, out_proj.weight}": "same names, same shapes, same layouts",
            "backbone.norm_f.weight": "same",
        },
        "config_map_mamba_ssm_to_hf": {
            "d_model": "hidden_size",
            "n_layer": "num_hidden_layers",
            "vocab_size (padded up to a multiple of pad_vocab_size_multiple)": "vocab_size",
            "ssm_cfg.d_state": "state_size",
            "ssm_cfg.d_conv": "conv_kernel",
            "ssm_cfg.expand": "expand",
            "ssm_cfg.headdim": "head_dim (num_heads = expand*d_model/headdim)",
            "ssm_cfg.ngroups": "n_groups",
            "ssm_cfg.chunk_size": "chunk_size",
            "tie_embeddings": "tie_word_embeddings",
            "(implicit) norm eps 1e-5 everywhere": "layer_norm_epsilon",
        },
        "vocab_padding": (
            f"config vocab_size = {vocab}; mamba_ssm pads to a multiple of {pad_multiple}: the embedding and "
            f"lm_head have {padded_vocab} rows and the logits {padded_vocab} columns; input_ids < {vocab}, the "
            "greedy tokens may be >= vocab_size (random weights)."
        ),
        "ssm_cfg_defaults": (
            "released checkpoints (e.g. state-spaces/mamba2-130m) give only ssm_cfg {'layer': 'Mamba2'}; the "
            "mamba_ssm Mamba2 defaults then apply: d_state 128, d_conv 4, expand 2, headdim 64, ngroups 1, "
            "chunk_size 256, rmsnorm true, norm_before_gate false, D_has_hdim false, bias false, conv_bias true. "
            "This fixture spells every key out."
        ),
        "file_order": "state dict in mamba_ssm's parameter registration order (key order does not matter).",
        "keys": (
            "backbone.embedding.weight [V_padded, D]; backbone.layers.{i}.norm.weight [D]; "
            "backbone.layers.{i}.mixer.{dt_bias [H], A_log [H], D [H], in_proj.weight [2*E + 2*G*N + H, D], "
            "conv1d.weight [E + 2*G*N, 1, K], conv1d.bias [E + 2*G*N], norm.weight [E], out_proj.weight [D, E]}; "
            "backbone.norm_f.weight [D]; lm_head.weight [V_padded, D] (= the embedding). Shapes and layouts "
            "as in HF's Mamba2 (see semantics)."
        ),
        "semantics": _MAMBA2_SEMANTICS,
    }
    return {
        "hf_class": "Mamba2ForCausalLM (for the expected outputs only)",
        "format": "mamba_ssm-pytorch-bin",
        "config": ss_config,
        "hf_equivalent_config": {
            k: [str(x) if math.isinf(x) else x for x in v] if k == "time_step_limit" else v
            for k, v in hf_config.to_diff_dict().items()
        },
        "seeds": {"torch.manual_seed": 7, "parameters": 107, "input_ids": 207},
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "golden_npz": _NPZ_DOC,
        "notes": notes,
        "checks": checks,
    }
