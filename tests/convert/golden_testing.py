"""Shared helpers of the converter tests: the golden fixtures (tests/fixtures/golden, written by
scripts/make_golden.py from PyTorch + transformers), their conversions (once per session) and
jitted calls of the model protocol."""

from __future__ import annotations

import functools
import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "fixtures", "golden")
# fixture -> checkpoint format
FIXTURES = {
    "llama": "hf",
    "qwen2": "hf",
    "mistral": "hf",
    "mamba2_hf": "hf",
    "mamba2_hf_g2": "hf",
    "mamba2_ss": "mamba_ssm",
}


def golden_dir(name: str) -> str:
    return os.path.join(GOLDEN, name)


def golden_arrays(name: str) -> dict[str, np.ndarray]:
    with np.load(os.path.join(GOLDEN, name, "golden.npz")) as z:
        return {k: z[k] for k in z.files}


def manifest() -> dict:
    with open(os.path.join(GOLDEN, "MANIFEST.json"), encoding="utf-8") as f:
        return json.load(f)


@nnx.jit
def forward(model, tokens):
    return model(tokens)


@nnx.jit
def decode_step(model, tokens_t, cache):
    return model.decode_step(tokens_t, cache)


def decode_all(model, tokens) -> np.ndarray:
    """Logits [B, T, V] of decoding `tokens` one at a time from an empty cache."""
    tokens = jnp.asarray(tokens)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1])
    out = []
    for t in range(tokens.shape[1]):
        logits, cache = decode_step(model, tokens[:, t], cache)
        out.append(logits)
    return np.asarray(jnp.stack(out, 1))


@functools.cache
def converted(name: str):
    """(model, info) of a golden fixture's conversion, converted once per session."""
    from zoo.convert.pretrained import import_checkpoint

    return import_checkpoint(golden_dir(name), FIXTURES[name])
