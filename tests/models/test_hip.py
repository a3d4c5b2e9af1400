"""HiP attention in the zoo: exactness when K covers everything, decode == prefill (per-query search),
the decode-time search against the op's search, drop-in use on trained / other models, config errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lm_testing import decode_all, forward

import zoo
from pallas_kernels.sparse_attention import hip_block_indices
from zoo.models import registry
from zoo.models.hip import (HiP, HiPAttention, HiPConfig, HiPSettings, block_summaries, decode_block_search,
                            from_transformer, use_hip)
from zoo.models.transformer import Transformer

TINY = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
SPARSE = dict(k_blocks=2, block_q=1, block_k=8, window=8, sinks=4, dense_below=0)


def _tokens(t, seed=0):
    return jax.random.randint(jax.random.key(seed), (2, t), 0, 256)


def test_same_seed_same_params_as_transformer():
    tr = zoo.create_model("transformer", seed=3, **TINY)
    hip = zoo.create_model("hip", seed=3, **TINY)
    a, b = nnx.state(tr, nnx.Param), nnx.state(hip, nnx.Param)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert all(isinstance(blk.attn, HiPAttention) for blk in hip.blocks)


@pytest.mark.parametrize("block_q", [8, 16])
def test_full_cover_equals_transformer(block_q):
    """K >= number of key blocks: every causal key is visible, so HiP == dense attention."""
    tr = zoo.create_model("transformer", seed=1, **TINY)
    tokens = _tokens(61)  # 8 key blocks of 8, last one partial
    hip = from_transformer(tr, k_blocks=8, block_q=block_q, block_k=8, window=8, sinks=4, dense_below=0)
    np.testing.assert_allclose(forward(hip, tokens), forward(tr, tokens), atol=2e-5, rtol=2e-5)


def test_dense_below_is_the_transformer():
    tr = zoo.create_model("transformer", seed=1, **TINY)
    tokens = _tokens(40)
    hip = from_transformer(tr, **{**SPARSE, "dense_below": 41})
    np.testing.assert_allclose(forward(hip, tokens), forward(tr, tokens), atol=1e-6)
    sparse = from_transformer(tr, **SPARSE)
    assert float(jnp.abs(forward(sparse, tokens) - forward(tr, tokens)).max()) > 1e-3  # really sparse


def test_decode_matches_parallel_per_query_search():
    """block_q = 1: prefill searches per query, exactly what each decode step does, so decoding with
    the cache (both the hip model's incremental summaries and the generic transformer decode path)
    reproduces the parallel logits although only K=2 of up to 8 blocks are kept."""
    model = zoo.create_model("hip", seed=2, **TINY, **SPARSE)
    tokens = _tokens(64, seed=5)
    parallel = forward(model, tokens)
    decoded, cache = decode_all(model, tokens, max_length=tokens.shape[1] + 3)
    np.testing.assert_allclose(decoded, parallel, atol=3e-5, rtol=3e-5)
    assert int(cache["pos"]) == 64 and set(cache) == {"k", "v", "pos", "kmin", "kmax"}
    generic, _ = decode_all(model, tokens, nnx.jit(_generic), max_length=tokens.shape[1] + 3)
    np.testing.assert_allclose(generic, parallel, atol=3e-5, rtol=3e-5)


def _generic(model, tokens_t, cache):
    """Transformer.decode_step (summaries recomputed from the cache by HiPAttention.decode)."""
    logits, small = Transformer.decode_step(model, tokens_t, {k: cache[k] for k in ("k", "v", "pos")})
    return logits, {**cache, **small}


@pytest.mark.parametrize("t", [0, 9, 23, 40, 63])
def test_decode_search_equals_op_search(t):
    """The decode-time search over the valid prefix == hip_block_indices for that one query."""
    s = HiPSettings(k_blocks=3, block_q=1, block_k=4, window=4, sinks=2)
    kq, kk = jax.random.split(jax.random.key(t))
    q = jax.random.normal(kq, (2, t + 1, 4, 8))
    k = jax.random.normal(kk, (2, t + 1, 2, 8))
    want = hip_block_indices(q[:, t:], k, k_blocks=3, block_q=1, block_k=4, window=4, sinks=2)[:, :, 0]
    cache = jnp.zeros((2, 70, 2, 8)).at[:, :t + 1].set(k)  # the rest of the cache is empty
    kmin, kmax = block_summaries(cache, jnp.int32(t), 4)
    got = decode_block_search(q[:, t], kmin, kmax, jnp.int32(t), s)
    np.testing.assert_array_equal(got, want)


def test_load_trained_transformer_into_hip(tmp_path, tiny):
    """A trained baseline checkpoint loads unchanged into `hip` (same names and shapes)."""
    from zoo.train.checkpoint import load_model
    from zoo.train.trainer import train
    train(tiny(steps=2, checkpoint_every=2), str(tmp_path), progress=False, evaluate=False)
    base, config = load_model(str(tmp_path))
    assert config.model_name == "transformer"
    cover = from_transformer(base, k_blocks=16, block_q=16, block_k=8, window=8, sinks=0, dense_below=0)
    tokens = _tokens(112)
    np.testing.assert_allclose(forward(cover, tokens), forward(base, tokens), atol=2e-5, rtol=2e-5)
    sparse = from_transformer(base, k_blocks=2, block_q=16, block_k=8, window=16, sinks=8, dense_below=0)
    out = forward(sparse, tokens)
    assert out.shape == (2, 112, 256) and bool(jnp.all(jnp.isfinite(out)))


def test_use_hip_swaps_only_full_layers():
    model = zoo.create_model("masformer", seed=0, **TINY, layer_attention=("window", "full"), window=8)
    use_hip(model, HiPSettings(k_blocks=2, block_q=8, block_k=8, window=8, sinks=0))
    assert not isinstance(model.blocks[0].attn, HiPAttention) and isinstance(model.blocks[1].attn, HiPAttention)
    assert bool(jnp.all(jnp.isfinite(forward(model, _tokens(48)))))


def test_presets_and_config_errors():
    for preset in registry.list_presets("hip"):
        cfg = registry.get_model_config("hip", preset)
        assert isinstance(cfg, HiPConfig) and cfg.window >= cfg.block_k
    with pytest.raises(ValueError, match="window"):
        HiPConfig(window=8, block_k=16)
    with pytest.raises(ValueError, match="implementation"):
        HiPConfig(implementation="cuda")
    with pytest.raises(ValueError, match="k_blocks"):
        HiPSettings(k_blocks=0)
    assert registry.model_class("hip") is HiP
