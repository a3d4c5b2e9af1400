"""Run `python scripts/make_golden.py` in a scratch venv with torch and transformers to write the golden fixtures.

    python3 -m venv /tmp/golden-venv
    /tmp/golden-venv/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors==0.8.0 \
        tokenizers==0.23.3 numpy==2.4.6
    /tmp/golden-venv/bin/python scripts/make_golden.py [--out tests/fixtures/golden]

Golden reference fixtures for the checkpoint converters. The reference implementations
(PyTorch + Hugging Face transformers) are *not* dependencies of the zoo: this script runs once, outside the
project's venv, and its outputs are committed; the zoo's tests only read them (numpy, safetensors files, a
torch-free reader for `pytorch_model.bin`). It never imports the `zoo` package.

For each model it builds a tiny fp32 model with fixed seeds, overwrites every parameter with seeded random
values at unit-preserving scales (HF's own init leaves biases at 0 and norm weights at 1, which would let a
converter that drops them pass), saves the checkpoint in the format of the real releases, and writes
`golden.npz` next to it:

- `input_ids` [2, T] int32: two different random rows,
- `logits` [2, T, V] float32: the model's full forward in eval mode (eager attention),
- `greedy_ids` [2, N] int32: the greedy continuation of each full row, by `model.generate` with the
  model's own cache (KV cache, or Mamba-2's conv + SSM state),
- `decode_logits` [2, N, V] float32: the logits of each generation step from that cached path, so that
  `argmax(decode_logits[:, k]) == greedy_ids[:, k]`; step k has seen `input_ids` + `greedy_ids[:, :k]`.

Every fixture is checked before it is written: the cached decode against a loop of full forwards (same
tokens, logits within 1e-4), the reloaded checkpoint against the in-memory model (same logits), the greedy
margin (top-1 minus top-2 logit) against 1e-3 so that a converter within fp32 round-off cannot flip a token;
for the Mamba-2 fixtures the HF logits against a float64 numpy recurrence written from the state-spaces/mamba
equations (`_mamba2_numpy_logits`), and the same weights without Llama's RoPE scaling or Mistral's sliding
window must give different logits (so a converter that ignores either fails). `MANIFEST.json` records
files, sizes, hashes,
configs, seeds, key-name conventions, the check results and the versions. The outputs are byte-identical
from run to run (fixed zip timestamps in `golden.npz`; `torch.save` is deterministic for a fixed file
name).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import copy
import datetime
import hashlib
import io
import json
import math
import os
import platform
import random
import shutil
import sys
import zipfile

import numpy as np
import safetensors
import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

COMMAND = "python scripts/make_golden.py --out tests/fixtures/golden"
SEQ_LEN = 24  # T of the attention models
MAMBA_SEQ_LEN = 20  # T of the Mamba-2 models: 2.5 chunks of 8, so the chunked scan pads a partial chunk
NEW_TOKENS = 8  # N
MIN_GREEDY_MARGIN = 1e-3
DECODE_ATOL = 1e-4
NUMPY_REF_ATOL = 1e-4
ZIP_DATE = (2020, 1, 1, 0, 0, 0)


# ----------------------------------------------------------------------------------------------------------
# Random parameters


def _init_value(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Seeded random value for one parameter, by its role (read from its name).

    Scales keep activations near unit size so that logits are well separated: matrices N(0, 1/fan_in),
    an untied lm_head N(0, 4/fan_in), embeddings N(0, 0.25) (with N(0, 1), tied models mostly
    predicted their current token, as the residual stream stayed close to its embedding), norm weights
    and Mamba's D U(0.5, 1.5), biases N(0, 0.3), Mamba's A_log = log U(1, 16)
    and dt_bias = softplus^-1(dt) with log dt ~ U(log 0.01, log 0.5).

    Args:
        name: Parameter name as in `named_parameters()`.
        shape: Parameter shape.
        gen: The fixture's generator (parameters are drawn in `named_parameters()` order).

    Returns:
        A float32 tensor of `shape`.
    """

    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float32)

    leaf = name.rsplit(".", 1)[-1]
    if "embed" in name:
        return normal(0.5)
    if name.endswith(("norm.weight", "layernorm.weight", "norm_f.weight")):
        return uniform(0.5, 1.5)
    if name.endswith("A_log"):
        return torch.log(uniform(1.0, 16.0))
    if name.endswith("dt_bias"):
        dt = torch.exp(uniform(math.log(0.01), math.log(0.5)))
        return dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
    if leaf == "D":
        return uniform(0.5, 1.5)
    if name.endswith("conv1d.weight"):  # [C, 1, K]
        return normal(1.0 / math.sqrt(shape[-1]))
    if leaf == "bias":
        return normal(0.3)
    if name == "lm_head.weight":  # untied head: logits of std ~2, like a trained LM's
        return normal(2.0 / math.sqrt(shape[1]))
    if leaf == "weight" and len(shape) == 2:  # torch Linear: [out, in]
        return normal(1.0 / math.sqrt(shape[1]))
    raise ValueError(f"no init rule for parameter {name} {shape}")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Overwrites every parameter of `model` (tied ones once) with `_init_value` draws from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_init_value(name, tuple(param.shape), gen))


def _random_rows(seed: int, vocab: int, length: int) -> np.ndarray:
    """Two different rows of uniform random token ids in [0, vocab), int32 [2, length]."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, vocab, (2, length), generator=gen, dtype=torch.int64)
    assert not torch.equal(rows[0], rows[1])
    return rows.numpy().astype(np.int32)


# ----------------------------------------------------------------------------------------------------------
# Reference outputs


@torch.no_grad()
def _full_logits(model: torch.nn.Module, ids: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] of one full forward without cache."""
    out = model(input_ids=torch.from_numpy(ids.astype(np.int64)), use_cache=False)
    return out.logits.float().numpy()


@torch.no_grad()
def _greedy(model: torch.nn.Module, ids: np.ndarray, new_tokens: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Greedy continuation by `model.generate` (the model's cache path), checked against full forwards.

    Args:
        model: The HF model, eval mode.
        ids: int32 [B, T] prompts (no padding).
        new_tokens: N, the number of generated tokens (no early stop: EOS is disabled).

    Returns:
        greedy_ids int32 [B, N], decode_logits float32 [B, N, V] (raw logits of each step) and a dict of check
        results (max |cached - full forward| logits, the smallest top-1 minus top-2 margin).
    """
    prompt = torch.from_numpy(ids.astype(np.int64))
    gen_cfg = GenerationConfig(
        do_sample=False,
        max_new_tokens=new_tokens,
        min_new_tokens=0,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=None,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
    )
    # An eos_token_id=None in `gen_cfg` does not override the model's default generation config (its EOS
    # would stop a row and pad the rest), so clear it there for the call.
    saved_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=gen_cfg)
    finally:
        model.generation_config.eos_token_id = saved_eos
    seqs = out.sequences.numpy()
    assert seqs.shape == (ids.shape[0], ids.shape[1] + new_tokens), seqs.shape
    assert np.array_equal(seqs[:, : ids.shape[1]], ids)
    greedy = seqs[:, ids.shape[1] :].astype(np.int32)
    decode_logits = np.stack([step.float().numpy() for step in out.logits], axis=1)
    assert np.array_equal(decode_logits.argmax(-1), greedy), "generate's tokens are not the argmax of its logits"

    # The same steps by full forwards over the growing prefix, without cache.
    max_diff = 0.0
    for k in range(new_tokens):
        prefix = np.concatenate([ids, greedy[:, :k]], axis=1)
        full = _full_logits(model, prefix)[:, -1]
        assert np.array_equal(full.argmax(-1), greedy[:, k]), f"full-forward argmax differs at step {k}"
        max_diff = max(max_diff, float(np.abs(full - decode_logits[:, k]).max()))
    assert max_diff < DECODE_ATOL, f"cached decode differs from full forwards by {max_diff}"
    top2 = np.sort(decode_logits, axis=-1)[..., -2:]
    margin = float((top2[..., 1] - top2[..., 0]).min())
    assert margin > MIN_GREEDY_MARGIN, f"greedy margin {margin} too small: pick another seed"
    checks = {"max_abs_cached_vs_full_forward_decode_logits": max_diff, "min_greedy_top1_minus_top2": margin}
    return greedy, decode_logits.astype(np.float32), checks


@torch.no_grad()
def _effect(model: torch.nn.Module, ids: np.ndarray, **changes) -> np.ndarray:
    """Max |logits| change per position when the same weights run under a config with `changes` applied.

    Shows that a feature of the fixture (RoPE scaling, the sliding window) changes the golden logits, so a
    converter that ignores it fails.

    Args:
        model: The fixture's HF model.
        ids: int32 [B, T] inputs.
        **changes: Config attributes to override.

    Returns:
        float32 [T]: max over batch and vocabulary of |logits(changed) - logits(model)|.
    """
    config = copy.deepcopy(model.config)
    for key, value in changes.items():
        setattr(config, key, value)
    other = type(model)(config).eval()
    other.load_state_dict(model.state_dict())
    return np.abs(_full_logits(other, ids) - _full_logits(model, ids)).max(axis=(0, 2))


def _write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez` with fixed zip timestamps (np.savez stamps the current time, so reruns would differ)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(value), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE), buf.getvalue())


def _file_table(directory: str) -> dict[str, dict]:
    """Bytes and sha256 of every file in `directory`."""
    table = {}
    for fname in sorted(os.listdir(directory)):
        with open(os.path.join(directory, fname), "rb") as f:
            data = f.read()
        table[fname] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return table


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


# ----------------------------------------------------------------------------------------------------------
# Fixtures


def _finish_hf(
    name: str,
    out_dir: str,
    model: torch.nn.Module,
    model_cls: type,
    ids: np.ndarray,
    fmt: str,
    notes: dict,
    seeds: dict,
) -> dict:
    """Saves an HF model and its golden outputs, reloads it and checks the reload; returns its manifest entry."""
    model.eval()
    directory = os.path.join(out_dir, name)
    os.makedirs(directory)
    logits = _full_logits(model, ids)
    greedy, decode_logits, checks = _greedy(model, ids, NEW_TOKENS)
    model.save_pretrained(directory)  # transformers 5 always writes model.safetensors here
    if fmt == "hf-pytorch-bin":
        # transformers 5 no longer writes pytorch_model.bin (`safe_serialization=False` is ignored); write the
        # state dict the way transformers 4 did: torch.save of model.state_dict(), tied entries included.
        os.remove(os.path.join(directory, "model.safetensors"))
        torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))
    reloaded = model_cls.from_pretrained(directory, attn_implementation="eager", dtype=torch.float32).eval()
    checks["max_abs_reloaded_vs_saved_logits"] = float(np.abs(_full_logits(reloaded, ids) - logits).max())
    assert checks["max_abs_reloaded_vs_saved_logits"] == 0.0, checks
    arrays = {"input_ids": ids, "logits": logits, "greedy_ids": greedy, "decode_logits": decode_logits}
    _write_npz(os.path.join(directory, "golden.npz"), arrays)
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    return {
        "hf_class": model_cls.__name__,
        "format": fmt,
        "config": config,
        "seeds": seeds,
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "golden_npz": _NPZ_DOC,
        "notes": notes,
        "checks": checks,
    }


_NPZ_DOC = (
    "input_ids int32 [2,T]; logits float32 [2,T,V] (full forward, eval, no cache); greedy_ids int32 [2,N] "
    "(model.generate, do_sample=False, EOS disabled, model's own cache); decode_logits float32 [2,N,V]: step k "
    "has seen input_ids + greedy_ids[:, :k], argmax(decode_logits[:, k]) == greedy_ids[:, k], and "
    "decode_logits[:, 0] is the prefill's last position (= logits[:, T-1] up to round-off)"
)

_LLAMA_KEYS = (
    "model.embed_tokens.weight [V,D]; model.layers.{i}.input_layernorm.weight [D]; "
    "model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (q [H*hd,D], k/v [KV*hd,D], o [D,H*hd]); "
    "model.layers.{i}.post_attention_layernorm.weight [D]; model.layers.{i}.mlp.{gate,up,down}_proj.weight "
    "(gate/up [F,D], down [D,F]); model.norm.weight [D]; lm_head.weight [V,D] (absent when tied). "
    "All Linear weights are torch [out, in]: y = x @ W.T (transpose for a JAX [in, out] kernel)."
)
_ATTENTION_SEMANTICS = (
    "pre-norm blocks: h += attn(rms(h)); h += mlp(rms(h)); logits = rms_f(h) @ lm_head.T. "
    "RMSNorm: x * rsqrt(mean(x^2) + eps) * w (weight multiplies after normalising, no 1+w offset). "
    "MLP: down(silu(gate(x)) * up(x)). Attention: q/k/v reshaped [T, heads, hd] head-major (head h = output "
    "rows h*hd:(h+1)*hd); GQA: query head h uses kv head h // (H/KV); scores scaled by hd**-0.5; causal. "
    "RoPE is HF's rotate_half (non-interleaved) layout: for pair index j < hd/2, dims (j, j + hd/2) rotate by "
    "angle pos * inv_freq[j]; inv_freq[j] = theta ** (-2j/hd); positions start at 0 for the first input token."
)


def make_llama(out_dir: str) -> dict:
    """Llama with GQA, untied embeddings and llama3 RoPE scaling whose three frequency bands all occur."""
    rope = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_parameters=rope,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(1)
    model = LlamaForCausalLM(config)
    _randomize(model, seed=101)
    ids = _random_rows(seed=201, vocab=config.vocab_size, length=SEQ_LEN)
    head_dim = config.hidden_size // config.num_attention_heads
    inv = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * math.pi / inv
    notes = {
        "keys": _LLAMA_KEYS,
        "semantics": _ATTENTION_SEMANTICS,
        "rope_llama3": (
            "HF 5.x writes the RoPE settings as config['rope_parameters'] (with rope_theta inside); released "
            "Llama 3.x config.json files have the legacy top-level 'rope_theta' and 'rope_scaling' "
            "{'rope_type': 'llama3', 'factor', 'low_freq_factor', 'high_freq_factor', "
            "'original_max_position_embeddings'} instead. inv_freq = theta**(-2j/hd); wavelen = 2*pi/inv_freq; "
            "low = orig/low_freq_factor, high = orig/high_freq_factor; wavelen < high: unchanged; wavelen > low: "
            "inv_freq/factor; otherwise s = (orig/wavelen - low_freq_factor)/(high_freq_factor - low_freq_factor), "
            "inv_freq = (1-s)*inv_freq/factor + s*inv_freq. No attention scaling factor."
        ),
        "rope_bands_here": {
            "wavelengths": [round(float(x), 3) for x in wavelen],
            "high_freq_wavelen": 128 / 4.0,
            "low_freq_wavelen": 128 / 1.0,
            "bands": ["unchanged" if x < 32 else "divided by factor" if x > 128 else "smoothed" for x in wavelen],
        },
    }
    seeds = {"torch.manual_seed": 1, "parameters": 101, "input_ids": 201}
    effect = _effect(model, ids, rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"]})
    assert effect[0] == 0.0 and effect[1:].min() > 1e-2, effect
    notes["check_rope_scaling_matters"] = (
        f"the same weights with plain RoPE change the logits by up to {effect.max():.3g} (>= {effect[1:].min():.3g} "
        "at every position > 0; position 0 is unrotated)"
    )
    return _finish_hf("llama", out_dir, model, LlamaForCausalLM, ids, "hf-safetensors", notes, seeds)


def make_qwen2(out_dir: str) -> dict:
    """Qwen2: q/k/v biases, tied embeddings, rope_theta 1e6; saved as pytorch_model.bin."""
    config = Qwen2Config(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
        use_sliding_window=False,
        attn_implementation="eager",
    )
    torch.manual_seed(2)
    model = Qwen2ForCausalLM(config)
    _randomize(model, seed=102)
    ids = _random_rows(seed=202, vocab=config.vocab_size, length=SEQ_LEN)
    notes = {
        "keys": _LLAMA_KEYS
        + " Qwen2 adds model.layers.{i}.self_attn.{q,k,v}_proj.bias ([H*hd], [KV*hd], [KV*hd]); o_proj has no bias.",
        "semantics": _ATTENTION_SEMANTICS,
        "tied": (
            "tie_word_embeddings=true: logits = h @ model.embed_tokens.weight.T. This .bin is torch.save("
            "model.state_dict()), which keeps both 'model.embed_tokens.weight' and 'lm_head.weight' (one shared "
            "storage in the zip); HF safetensors files of tied models omit lm_head.weight."
        ),
        "bin_format": (
            "pytorch_model.bin is a torch zip archive: '<stem>/data.pkl' (pickle protocol 2 of an OrderedDict; "
            "tensors are persistent ids ('storage', torch.FloatStorage, '<key>', 'cpu', numel) rebuilt by "
            "torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)), raw "
            "little-endian data in '<stem>/data/<key>', '<stem>/byteorder'; <stem> = 'pytorch_model'."
        ),
    }
    seeds = {"torch.manual_seed": 2, "parameters": 102, "input_ids": 202}
    return _finish_hf("qwen2", out_dir, model, Qwen2ForCausalLM, ids, "hf-pytorch-bin", notes, seeds)


def make_mistral(out_dir: str) -> dict:
    """Mistral with a sliding window of 8 on a 24-token input (and 8 decoded tokens), MQA (1 kv head)."""
    config = MistralConfig(
        vocab_size=288,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        sliding_window=8,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    torch.manual_seed(3)
    model = MistralForCausalLM(config)
    _randomize(model, seed=103)
    ids = _random_rows(seed=203, vocab=config.vocab_size, length=SEQ_LEN)
    notes = {
        "keys": _LLAMA_KEYS,
        "semantics": _ATTENTION_SEMANTICS,
        "sliding_window": (
            "HF mask: query i sees key j iff j <= i and j > i - W (masking_utils.sliding_window_overlay), i.e. "
            "the W most recent keys including the query's own: positions i-W+1 .. i. W = 8 here, so from "
            "position 7 on each query sees exactly 8 keys. Every layer uses the window. The decode cache "
            "(DynamicSlidingWindowLayer) keeps the last W-1 keys and appends the new one: same semantics."
        ),
    }
    seeds = {"torch.manual_seed": 3, "parameters": 103, "input_ids": 203}
    effect = _effect(model, ids, sliding_window=None)
    window = config.sliding_window
    assert effect[:window].max() == 0.0 and effect[window:].min() > 1e-2, effect
    notes["check_window_matters"] = (
        f"the same weights with full causal attention give identical logits at positions 0..{window - 1} and "
        f"differ by >= {effect[window:].min():.3g} at every position >= {window}"
    )
    return _finish_hf("mistral", out_dir, model, MistralForCausalLM, ids, "hf-safetensors", notes, seeds)


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


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


_UNICODE_LINES = [
    "Naïve café owners say déjà vu: “façade” — résumé, coöperate, Ærøskøbing.",
    "Größe, Straße, Übermaß; ça va? Ñandú y pingüino.",
    "Ελληνικά γράμματα: αβγδε, Καλημέρα κόσμε.",
    "Русский текст: привет, мир; съешь ещё этих мягких булок.",
    "日本語のテキスト、東京と京都。中文：你好，世界。한국어: 안녕하세요.",
    "Emoji 🙂🚀✨ and symbols ∑∫√∞ ≤ ≥ ≠ ± × ÷ € £ ¥.",
    "Tabs\tand  double  spaces,\nnew lines\r\nand trailing space \n",
]

_TEST_STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Beautiful is better than ugly.",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n  indented",
    "naïve café — 日本語 🙂 Ελληνικά",
    "1234567890 3.14159 -42",
    "a </s> literal eos and <s> bos inside text",
    " ",
    "",
]


def _tokenizer_corpus() -> list[str]:
    """A few KB of deterministic text: the Zen of Python (stable across versions), unicode lines, shuffles."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this  # noqa: F401  (the text is its attribute `s`, rot13-encoded)

    zen = codecs.decode(sys.modules["this"].s, "rot13").splitlines()
    lines = [line for line in zen if line] + _UNICODE_LINES
    rng = random.Random(1234)
    corpus = list(lines)
    while sum(len(x.encode()) for x in corpus) < 6000:
        corpus.append(" ".join(rng.sample(lines, 3)))
    return corpus


def make_tokenizer(out_dir: str) -> dict:
    """Byte-level BPE (vocab 320, `<s>` = 0 BOS, `</s>` = 1 EOS) trained with `tokenizers`, plus encodings."""
    directory = os.path.join(out_dir, "tokenizer")
    os.makedirs(directory)
    corpus = _tokenizer_corpus()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        min_frequency=2,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]),
        ]
    )
    tok.save(os.path.join(directory, "tokenizer.json"), pretty=True)
    reloaded = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    cases = []
    for text in _TEST_STRINGS:
        enc = reloaded.encode(text)
        plain = reloaded.encode(text, add_special_tokens=False)
        assert enc.ids == tok.encode(text).ids
        decoded = reloaded.decode(plain.ids, skip_special_tokens=False)
        cases.append(
            {
                "text": text,
                "ids": enc.ids,
                "ids_without_special_tokens": plain.ids,
                "tokens": plain.tokens,
                "offsets": [list(o) for o in plain.offsets],
                "decoded": decoded,
                "decoded_skip_special_tokens": reloaded.decode(enc.ids, skip_special_tokens=True),
                "round_trip": decoded == text,
            }
        )
    encodings = {
        "tokenizer": "tokenizer.json",
        "vocab_size": reloaded.get_vocab_size(),
        "bos_token": "<s>",
        "bos_id": bos,
        "eos_token": "</s>",
        "eos_id": eos,
        "notes": (
            "ids: encode(text) (add_special_tokens=True: the TemplateProcessing post-processor prepends <s>); "
            "ids_without_special_tokens: encode(text, add_special_tokens=False); tokens/offsets of the latter; "
            "decoded: decode(ids_without_special_tokens, skip_special_tokens=False); "
            "decoded_skip_special_tokens: decode(ids, skip_special_tokens=True). Special tokens written in the "
            "text ('<s>', '</s>') are matched as special tokens before pre-tokenization; "
            "decode(skip_special_tokens=True) drops them."
        ),
        "cases": cases,
    }
    with open(os.path.join(directory, "encodings.json"), "w", encoding="utf-8") as f:
        json.dump(encodings, f, indent=1, ensure_ascii=False)
        f.write("\n")
    vocab = reloaded.get_vocab()
    return {
        "format": "tokenizers tokenizer.json (byte-level BPE)",
        "config": {
            "model": "BPE (no unk token, no dropout, no continuing_subword_prefix)",
            "pre_tokenizer": "ByteLevel(add_prefix_space=False, use_regex=True): GPT-2 regex split, bytes -> "
            "GPT-2 byte-to-unicode alphabet",
            "decoder": "ByteLevel",
            "post_processor": "Sequence[ByteLevel(trim_offsets=False), TemplateProcessing('<s> $A')]",
            "trainer": "BpeTrainer(vocab_size=320, min_frequency=2, special_tokens=['<s>', '</s>'], "
            "initial_alphabet=ByteLevel.alphabet())",
            "special_ids": {"<s>": bos, "</s>": eos},
            "byte_alphabet_ids": [
                min(vocab[c] for c in pre_tokenizers.ByteLevel.alphabet()),
                max(vocab[c] for c in pre_tokenizers.ByteLevel.alphabet()),
            ],
            "merges": len(json.loads(reloaded.to_str())["model"]["merges"]),
        },
        "corpus": (
            "the Zen of Python (codecs.decode(this.s, 'rot13')), the script's _UNICODE_LINES, then "
            "random.Random(1234) 3-line samples until >= 6000 UTF-8 bytes; "
            f"{len(corpus)} lines, {sum(len(x.encode()) for x in corpus)} bytes"
        ),
        "seeds": {"random.Random": 1234},
    }


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/golden", help="output directory (replaced)")
    args = parser.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)

    fixtures = {
        "llama": make_llama(args.out),
        "qwen2": make_qwen2(args.out),
        "mistral": make_mistral(args.out),
        "mamba2_hf": make_mamba2_hf(args.out, groups=1),
        "mamba2_hf_g2": make_mamba2_hf(args.out, groups=2),
        "mamba2_ss": make_mamba2_ss(args.out),
        "tokenizer": make_tokenizer(args.out),
    }
    total = 0
    for name, entry in fixtures.items():
        entry["files"] = _file_table(os.path.join(args.out, name))
        entry["bytes"] = sum(f["bytes"] for f in entry["files"].values())
        total += entry["bytes"]
    manifest = {
        "about": (
            "Golden outputs of the reference implementations (PyTorch + HF transformers) for the zoo's checkpoint "
            "converters; tests load each checkpoint through a converter and compare logits (fp32, atol 1e-4), "
            "the greedy continuation exactly, and token-by-token decoding."
        ),
        "command": COMMAND,
        "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
            "numpy": np.__version__,
        },
        "settings": {
            "dtype": "float32",
            "attn_implementation": "eager",
            "torch.use_deterministic_algorithms": True,
            "torch.set_num_threads": 1,
            "T_attention": SEQ_LEN,
            "T_mamba2": MAMBA_SEQ_LEN,
            "N_new_tokens": NEW_TOKENS,
            "min_greedy_margin": MIN_GREEDY_MARGIN,
        },
        "total_bytes_excluding_manifest": total,
        "fixtures": fixtures,
    }
    with open(os.path.join(args.out, "MANIFEST.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {len(fixtures)} fixtures, {total} bytes, to {args.out}")


if __name__ == "__main__":
    main()
