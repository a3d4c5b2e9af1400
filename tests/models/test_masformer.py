"""MASFormer: per-layer schedules, the block-sparse path == the dense masked path (values and
gradients), decode == parallel, attention FLOPs, and continual training from a baseline checkpoint."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import zoo
from zoo.config import load_config
from zoo.layers import AttentionSpec, attend, attention_mask
from zoo.models import registry
from zoo.models.masformer import (LocalAttention, MASFormerConfig, attention_flops, convert_checkpoint,
                                  local_sparse_attention, make_schedule, pairs_per_layer, parse_schedule)

TINY = dict(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, window=8, block=16,
            layer_attention=("window", "full", "block"))
forward = nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize("spec", [AttentionSpec("window", window=11), AttentionSpec("block", block=8)])
def test_local_sparse_attention_equals_dense_mask(spec):
    """The block-sparse op with a window / own-block list == the dense masked path, values and grads."""
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (2, 37, 4, 16))
    k = jax.random.normal(kk, (2, 37, 2, 16))
    v = jax.random.normal(kv, (2, 37, 2, 16))
    pos = jnp.arange(37)
    dense = lambda q, k, v: attend(q, k, v, q_pos=pos, k_pos=pos, spec=spec)  # noqa: E731
    sparse = lambda q, k, v: local_sparse_attention(q, k, v, spec, tile=8)  # noqa: E731
    want, vjp_d = jax.vjp(dense, q, k, v)
    got, vjp_s = jax.vjp(sparse, q, k, v)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    ct = jax.random.normal(kg, want.shape)
    for gd, gs in zip(vjp_d(ct), vjp_s(ct)):
        np.testing.assert_allclose(gs, gd, atol=1e-4, rtol=1e-4)


def test_sparse_path_equals_dense_path_in_the_model():
    dense = zoo.create_model("masformer", seed=1, sparse_from=10**6, tile=8, **TINY)
    sparse = zoo.create_model("masformer", seed=1, sparse_from=1, tile=8, **TINY)
    assert [type(b.attn).__name__ for b in sparse.blocks] == ["LocalAttention", "Attention", "LocalAttention"]
    tokens = jax.random.randint(jax.random.key(0), (2, 40), 0, 256)
    np.testing.assert_allclose(forward(sparse, tokens), forward(dense, tokens), atol=2e-5, rtol=2e-5)


def test_schedule_matters_and_decode_matches_parallel():
    model = zoo.create_model("masformer", seed=2, sparse_from=1, tile=8, **TINY)
    full = zoo.create_model("transformer", seed=2, **{**TINY, "layer_attention": ()})
    tokens = jax.random.randint(jax.random.key(1), (2, 30), 0, 256)
    parallel = forward(model, tokens)
    # Same parameters as the baseline; the masks change the function beyond the window.
    for x, y in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(full, nnx.Param))):
        np.testing.assert_array_equal(x, y)
    base = forward(full, tokens)
    np.testing.assert_allclose(parallel[:, :8], base[:, :8], atol=2e-5)  # inside window and block
    assert float(jnp.abs(parallel[:, 20:] - base[:, 20:]).max()) > 1e-3
    cache = model.init_cache(2, 32)
    step = nnx.jit(lambda m, t, c: m.decode_step(t, c))
    out = []
    for t in range(30):
        logits, cache = step(model, tokens[:, t], cache)
        out.append(logits)
    np.testing.assert_allclose(jnp.stack(out, 1), parallel, atol=3e-5, rtol=3e-5)


def test_schedules_parse_and_validate():
    assert parse_schedule("window*3,full", 4) == ("window", "window", "window", "full")
    assert parse_schedule("full@1,3:block", 4) == ("block", "full", "block", "full")
    assert make_schedule(3, [0]) == ("full", "window", "window")
    with pytest.raises(ValueError, match="has 2 layers"):
        parse_schedule("full,window", 3)
    with pytest.raises(ValueError, match="unknown attention kind"):
        parse_schedule("full,local", 2)
    with pytest.raises(ValueError, match="outside"):
        make_schedule(2, [2])
    with pytest.raises(ValueError, match="implementation"):
        MASFormerConfig(implementation="triton")
    cfg = registry.get_model_config("masformer", "1.3b")
    assert (cfg.n_layers, cfg.d_model) == (24, 2048) and cfg.schedule().count("full") == 4


def test_attention_flops():
    # Pair counts agree with the dense masks of zoo.layers.
    for spec in (AttentionSpec("full"), AttentionSpec("window", window=5), AttentionSpec("block", block=4)):
        pos = jnp.arange(23)[None]
        n = int(attention_mask(pos, pos, spec).sum())
        assert pairs_per_layer(spec.kind, 23, spec.window, spec.block) == n
    cfg = MASFormerConfig(n_layers=4, layer_attention=("window", "full", "window", "window"), window=32)
    f = attention_flops(cfg, 256)
    assert f["all_full"] == 4 * cfg.n_heads * cfg.head_dim * 4 * 256 * 257 // 2
    assert f["total"] == sum(f["per_layer"]) and 0.3 < f["ratio"] < 0.5
    assert attention_flops(MASFormerConfig(n_layers=2, layer_attention=("full", "full")), 100)["ratio"] == 1.0
    ratio = attention_flops(registry.get_model_config("masformer", "1.3b"), 8192)["ratio"]
    assert abs(ratio - (4 * 8193 + 20 * 1025) / (24 * 8193)) < 1e-9


def test_convert_baseline_checkpoint_and_fine_tune(tmp_path, tiny):
    """Baseline run -> MASFormer work dir (same weights, new masks) -> `zoo train` resumes it."""
    from zoo.train.checkpoint import load_model
    from zoo.train.trainer import train
    src, dst = str(tmp_path / "base"), str(tmp_path / "mas")
    train(tiny(steps=2, checkpoint_every=2), src, progress=False, evaluate=False)
    run = ["--config.data.seq_len=112", "--config.data.batch_size=8", "--config.train.steps=2",
           "--config.train.log_every=1", "--config.eval.lengths=[112]"]
    out = convert_checkpoint(src, dst, "window", "configs/masformer.py:tiny", tuple(run))
    assert out["config"]["model"]["layer_attention"] == ["window"] and out["config"]["model_name"] == "masformer"
    base, _ = load_model(src)
    converted, config = load_model(dst, step=0)
    assert isinstance(converted.blocks[0].attn, LocalAttention)
    for x, y in zip(jax.tree.leaves(nnx.state(base, nnx.Param)), jax.tree.leaves(nnx.state(converted, nnx.Param))):
        np.testing.assert_array_equal(x, y)
    # The printed train command (config + overrides) matches the saved run, so training resumes at 0.
    result = train(load_config("configs/masformer.py:tiny", run + out["train_overrides"]), dst,
                   progress=False, evaluate=False)
    assert result["step"] == 2 and np.isfinite(result["train"]["loss"])
    with pytest.raises(ValueError, match="already holds a run"):
        convert_checkpoint(src, dst, "window", "configs/masformer.py:tiny", tuple(run))
