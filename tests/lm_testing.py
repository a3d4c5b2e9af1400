"""Jitted calls of the LM protocol, shared by the model tests that check decode == parallel."""

import jax.numpy as jnp
from flax import nnx


@nnx.jit
def forward(model, tokens):
    return model(tokens)


@nnx.jit
def prefill(model, tokens, cache):
    return model.prefill(tokens, cache)


@nnx.jit
def decode_step(model, tokens_t, cache):
    return model.decode_step(tokens_t, cache)


def decode_all(model, tokens, step=decode_step, max_length=None):
    """Token-by-token decoding from a fresh cache with one compiled step -> (logits [B,T,V], cache)."""
    cache = model.init_cache(tokens.shape[0], max_length or tokens.shape[1])
    outs = []
    for t in range(tokens.shape[1]):
        logits, cache = step(model, tokens[:, t], cache)
        outs.append(logits)
    return jnp.stack(outs, 1), cache


def assert_trees_close(a, b, tol=2e-5):
    """Every leaf of two pytrees (e.g. two caches) equal within tol relative to the larger magnitude."""
    import jax
    import numpy as np

    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        scale = max(1.0, float(np.abs(y).max())) if y.size else 1.0
        np.testing.assert_allclose(x, y, atol=tol * scale, rtol=0)
