"""The baseline transformer: protocol, decode == parallel, attention patterns, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm_testing import decode_all

import zoo
from zoo.layers import AttentionSpec, attend
from zoo.models import registry
from zoo.models.transformer import TransformerConfig

TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


@pytest.mark.parametrize("attention", ["full", "window", "block"])
def test_decode_matches_parallel(attention):
    model = zoo.create_model("transformer", seed=1, attention=attention, window=5, block=4, **TINY)
    tokens = jax.random.randint(jax.random.key(0), (2, 13), 0, 256)
    parallel = model(tokens)
    decoded, cache = decode_all(model, tokens)
    assert parallel.shape == (2, 13, 256) and parallel.dtype == jnp.float32
    np.testing.assert_allclose(decoded, parallel, atol=2e-5, rtol=2e-5)
    assert int(cache["pos"]) == 13


def test_untied_and_bf16_forward():
    model = zoo.create_model("transformer", tie_embeddings=False, dtype="bfloat16", **TINY)
    logits = model(jnp.zeros((1, 8), jnp.int32))
    assert logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
    assert model.unembed is not None and model.embed.embedding[...].dtype == jnp.float32


def test_causality():
    model = zoo.create_model("transformer", **TINY)
    tokens = jax.random.randint(jax.random.key(1), (1, 10), 0, 256)
    changed = tokens.at[0, 6].set((tokens[0, 6] + 1) % 256)
    a, b = model(tokens), model(changed)
    np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert float(jnp.abs(a[:, 6:] - b[:, 6:]).max()) > 1e-4


def _naive_attention(q, k, v, allowed):
    """Softmax over allowed keys, one head at a time, in numpy float64."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, p = q.shape
    rep = h // k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            s = q[bi, :, hi] @ k[bi, :, hi // rep].T / np.sqrt(p)
            for i in range(t):
                idx = np.flatnonzero(allowed[i])
                if idx.size:
                    w = np.exp(s[i, idx] - s[i, idx].max())
                    out[bi, i, hi] = (w / w.sum()) @ v[bi, idx, hi // rep]
    return out


@pytest.mark.parametrize("kind,size", [("full", 1), ("window", 3), ("block", 4)])
def test_attend_matches_definition(kind, size):
    t = 11
    q = jax.random.normal(jax.random.key(0), (2, t, 4, 8))
    k = jax.random.normal(jax.random.key(1), (2, t, 2, 8))
    v = jax.random.normal(jax.random.key(2), (2, t, 2, 8))
    spec = AttentionSpec(kind, window=size, block=size)
    i, j = np.arange(t)[:, None], np.arange(t)[None]
    allowed = {"full": j <= i, "window": (j <= i) & (j > i - size), "block": (j <= i) & (j // size == i // size)}[kind]
    got = attend(q, k, v, q_pos=jnp.arange(t), k_pos=jnp.arange(t), spec=spec)
    np.testing.assert_allclose(got, _naive_attention(q, k, v, allowed), atol=1e-5)


def test_query_that_sees_nothing_gets_zeros_and_finite_grads():
    q = jnp.ones((1, 2, 1, 4))
    k = v = jnp.ones((1, 3, 1, 4))
    valid = jnp.zeros((1, 3), bool)
    out = attend(q, k, v, q_pos=jnp.array([[0, 1]]), k_pos=jnp.arange(3), k_valid=valid)
    assert float(jnp.abs(out).max()) == 0.0
    g = jax.grad(lambda q: attend(q, k, v, q_pos=jnp.array([[0, 1]]), k_pos=jnp.arange(3), k_valid=valid).sum())(q)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_registry_and_config_errors():
    assert "transformer" in zoo.list_models()
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        zoo.create_model("nope")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        zoo.create_model("transformer", "huge")
    with pytest.raises(ValueError, match="unknown field"):
        registry.get_model_config("transformer", "tiny", n_layer=3)
    with pytest.raises(ValueError, match="divisible by n_heads"):
        TransformerConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="attention kind 'sparse'"):
        TransformerConfig(attention="sparse").layer_specs()
    with pytest.raises(ValueError, match="one pattern per layer"):
        TransformerConfig(n_layers=2, layer_attention=("full",))


def test_paper_preset_parameter_count():
    from zoo.config import make_config
    from zoo.info import count_params

    n = count_params(make_config("transformer", "1.3b"))
    assert 1.25e9 < n < 1.4e9, n
