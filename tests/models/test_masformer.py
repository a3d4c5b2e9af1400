"""MASFormer: per-layer schedules, the block-sparse path == the dense masked path (values and
gradients), decode == parallel, attention FLOPs, and continual training from a baseline checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_OVERRIDES
from flax import nnx

import zoo
from pallas_kernels.sparse_attention import sparse_attention
from zoo.config import load_config
from zoo.layers import AttentionSpec, attend, attention_mask
from zoo.layers.attention import sparse_pattern_kwargs
from zoo.models import registry
from zoo.models.masformer import LocalAttention, MASFormerConfig, make_schedule, parse_schedule
from zoo.models.transformer import attention_flops, pairs_per_layer

TINY = dict(
    d_model=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=2,
    d_ff=64,
    window=8,
    block=16,
    layer_attention=("window", "full", "block"),
)
forward = nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize(
    "spec,packed",
    [
        (AttentionSpec("window", window=11), False),
        (AttentionSpec("block", block=8), False),
        (AttentionSpec("window", window=11), True),
    ],
)
def test_local_sparse_attention_equals_dense_mask(spec, packed):
    """The block-sparse op with a window / own-block list == the dense masked path, values and grads
    (packed: two documents in a row, positions restarting, no attention across them)."""
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (2, 37, 4, 16))
    k = jax.random.normal(kk, (2, 37, 2, 16))
    v = jax.random.normal(kv, (2, 37, 2, 16))
    if packed:
        seg = jnp.broadcast_to(jnp.repeat(jnp.array([1, 2]), jnp.array([20, 17]), total_repeat_length=37), (2, 37))
        pos = jnp.broadcast_to(jnp.concatenate([jnp.arange(20), jnp.arange(17)]), (2, 37))
    else:
        seg, pos = None, jnp.broadcast_to(jnp.arange(37), (2, 37))
    dense = lambda q, k, v: attend(q, k, v, q_pos=pos, k_pos=pos, spec=spec, q_seg=seg, k_seg=seg)  # noqa: E731
    sparse = lambda q, k, v: sparse_attention(
        q,
        k,
        v,
        causal=True,
        segment_ids=seg,
        implementation="xla",  # noqa: E731
        **sparse_pattern_kwargs(spec, 37, 2, 4, 8),
    )
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
    assert (cfg.n_layers, cfg.d_model) == (24, 2048) and cfg.layer_attention.count("full") == 4


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
    """Baseline run -> `zoo convert masformer` (same weights, new masks) -> `zoo train` starts from it."""
    from zoo import cli
    from zoo.checkpoint import load_model
    from zoo.model_dir import load_pretrained
    from zoo.train.trainer import train

    src, init, dst = str(tmp_path / "base"), str(tmp_path / "mas-init"), str(tmp_path / "mas")
    train(tiny(steps=2, checkpoint_every=2), src, progress=False)
    assert cli.main(["convert", "masformer", "--src", src, "--out", init, "--schedule", "window"]) == 0
    base, _ = load_model(src)
    converted, meta = load_pretrained(init)
    assert meta["model_name"] == "masformer" and meta["model"]["layer_attention"] == ["window"]
    assert isinstance(converted.blocks[0].attn, LocalAttention)
    for x, y in zip(jax.tree.leaves(nnx.state(base, nnx.Param)), jax.tree.leaves(nnx.state(converted, nnx.Param))):
        np.testing.assert_array_equal(x, y)
    # Fine-tune: the same shape, the new schedule, the converted parameters as the starting point.
    shape = [o for o in TINY_OVERRIDES if o.startswith("--config.model.")]
    run = [
        *shape,
        "--config.model.layer_attention=['window']",
        "--config.data.seq_len=112",
        "--config.data.batch_size=8",
        "--config.train.steps=2",
        "--config.train.log_every=1",
        f"--config.train.init_from={init}",
    ]
    config = load_config("masformer:tiny", run)
    result = train(config, dst, progress=False, stop_after=1)
    assert result["step"] == 1 and np.isfinite(result["train"]["loss"])
    # The run's first loss is the converted parameters' loss (under the run's own model config).
    assert abs(result["train"]["loss"] - _first_loss(converted, config)) < 1e-4
    with pytest.raises(ValueError, match="missing"):
        train(load_config("masformer:tiny", [f"--config.train.init_from={init}"]), str(tmp_path / "x"), progress=False)


def _first_loss(converted, config) -> float:
    from zoo.data.pipeline import make_batches
    from zoo.models.params import ParamView, model_with_params
    from zoo.train.step import lm_loss

    model = model_with_params("masformer", registry.config_from_run(config), ParamView(converted).flat(converted))
    batch = next(make_batches(config.data, "train"))
    return float(lm_loss(model(jnp.asarray(batch["inputs"])), {k: jnp.asarray(v) for k, v in batch.items()})[0])
