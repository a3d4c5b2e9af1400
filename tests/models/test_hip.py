"""HiP attention in the zoo: exactness when K covers everything, decode == prefill (per-query search),
prefill then decode, drop-in use on trained / other models, config errors. The search itself is
tested against its oracle in tests/kernels/test_hip_search.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_testing import decode_all, decode_step, forward, prefill

import zoo
from zoo.convert import convert_model
from zoo.models import registry
from zoo.models.hip import HiP, HiPAttention, HiPConfig, HiPSettings, use_hip

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
    hip = convert_model(tr, "hip", k_blocks=8, block_q=block_q, block_k=8, window=8, sinks=4, dense_below=0)
    np.testing.assert_allclose(forward(hip, tokens), forward(tr, tokens), atol=2e-5, rtol=2e-5)


def test_dense_below_is_the_transformer():
    tr = zoo.create_model("transformer", seed=1, **TINY)
    tokens = _tokens(40)
    hip = convert_model(tr, "hip", **{**SPARSE, "dense_below": 41})
    np.testing.assert_allclose(forward(hip, tokens), forward(tr, tokens), atol=1e-6)
    sparse = convert_model(tr, "hip", **SPARSE)
    assert float(jnp.abs(forward(sparse, tokens) - forward(tr, tokens)).max()) > 1e-3  # really sparse
    # The two scorings select different blocks on the same model.
    tile = convert_model(tr, "hip", **SPARSE, scoring="block_max")
    assert float(jnp.abs(forward(sparse, tokens) - forward(tile, tokens)).max()) > 1e-4


@pytest.mark.parametrize("scoring", ["representative", "block_max"])
def test_decode_matches_parallel_per_query_search(scoring):
    """block_q = 1: prefill searches per query, exactly what each decode step does, so decoding with
    the cache reproduces the parallel logits although only K=2 of up to 8 blocks are kept."""
    model = zoo.create_model("hip", seed=2, **TINY, **SPARSE, scoring=scoring)
    tokens = _tokens(64, seed=5)
    parallel = forward(model, tokens)
    decoded, cache = decode_all(model, tokens, max_length=tokens.shape[1] + 3)
    np.testing.assert_allclose(decoded, parallel, atol=3e-5, rtol=3e-5)
    assert int(cache["pos"]) == 64
    # A prompt prefilled in parallel into the empty cache, then decoding continues from it.
    head, cache = prefill(model, tokens[:, :40], model.init_cache(2, 67))
    np.testing.assert_allclose(head, parallel[:, :40], atol=3e-5, rtol=3e-5)
    for t in range(40, 64):
        logits, cache = decode_step(model, tokens[:, t], cache)
        np.testing.assert_allclose(logits, parallel[:, t], atol=3e-5, rtol=3e-5)
    # Continuing a filled cache with several tokens decodes them one by one: the same logits.
    _, cache = prefill(model, tokens[:, :30], model.init_cache(2, 67))
    tail, _ = prefill(model, tokens[:, 30:], cache)
    np.testing.assert_allclose(tail, parallel[:, 30:], atol=3e-5, rtol=3e-5)


def test_load_trained_transformer_into_hip(tmp_path, tiny):
    """A trained baseline checkpoint loads unchanged into `hip` (same names and shapes)."""
    from zoo.checkpoint import load_model
    from zoo.train.trainer import train

    train(tiny(steps=2, checkpoint_every=2), str(tmp_path), progress=False)
    base, config = load_model(str(tmp_path))
    assert config.model_name == "transformer"
    cover = convert_model(base, "hip", k_blocks=16, block_q=16, block_k=8, window=8, sinks=0, dense_below=0)
    tokens = _tokens(112)
    np.testing.assert_allclose(forward(cover, tokens), forward(base, tokens), atol=2e-5, rtol=2e-5)
    sparse = convert_model(base, "hip", k_blocks=2, block_q=16, block_k=8, window=16, sinks=8, dense_below=0)
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
    with pytest.raises(ValueError, match="scoring"):
        HiPSettings(scoring="tile")
    with pytest.raises(ValueError, match="rep_keys"):
        HiPSettings(block_k=8, rep_keys=9)
    with pytest.raises(ValueError, match="query_stride"):
        HiPSettings(query_stride=0)
    assert HiPSettings().scoring == "representative" and (HiPSettings().rep_keys, HiPSettings().query_stride) == (2, 2)
    assert registry.model_class("hip") is HiP
