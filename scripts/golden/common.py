"""Shared helpers of the golden fixtures: settings, seeded random parameters, the checks every
fixture passes (cached decode, greedy margin, reload), and deterministic file writing."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import zipfile

import numpy as np
import torch
from transformers import (
    GenerationConfig,
)

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
