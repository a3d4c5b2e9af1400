"""Tests for zoo/models/memmamba.py: the note pool (priority replacement vs a Python oracle, masked
reads), causality by gradients, decode == parallel, chunked prefill, cross-layer pools, config."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_testing import assert_trees_close, decode_all, forward, prefill

from zoo.config import make_config
from zoo.models import registry
from zoo.models.base import make_context
from zoo.models.mamba2 import Mamba2, Mamba2Config
from zoo.models.memmamba import PRESETS, MemMamba, MemMambaConfig, NoteBlock, init_pool, pool_read, pool_scan
from zoo.models.params import ParamView

# 2 layers (layer 1 a cross layer), a 4-note pool so that it fills and replacement happens.
SMALL = dict(
    vocab_size=64,
    d_model=16,
    n_layers=2,
    d_state=8,
    headdim=8,
    chunk_size=8,
    pool_size=4,
    summary_dim=8,
    note_heads=2,
    cross_layer_interval=2,
    tau1=0.3,
)
T = 21


def _model(**kw) -> MemMamba:
    return MemMamba(MemMambaConfig(**{**SMALL, **kw}), rngs=nnx.Rngs(0))


def _tokens(b=2, t=T, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, SMALL["vocab_size"])


def _close(a, b, tol=2e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, atol=tol * max(1.0, float(np.abs(b).max())), rtol=0)


# ---------------------------------------------------------------- pool primitives
def _oracle_pool(scores, keys, m, tau1, decay):
    """Plain-Python priority pool: per step, decay stored priorities, then insert each candidate
    into the lowest slot (first empty slot first) iff score > tau1 and score > that slot."""
    prio, content, history = [-1.0] * m, [None] * m, []
    for step_scores, step_keys in zip(scores, keys):
        history.append((list(prio), list(content)))  # what the step reads
        prio = [p * decay if p > -0.5 else p for p in prio]
        for s, k in zip(step_scores, step_keys):
            j = int(np.argmin(prio))
            if s > tau1 and s > prio[j]:
                prio[j], content[j] = s, k
    return prio, content, history


@pytest.mark.parametrize("decay", [1.0, 0.9])
def test_pool_scan_matches_python_oracle(decay):
    rng = np.random.default_rng(0)
    t, c, m = 30, 2, 4
    scores = rng.uniform(size=(t, c)).astype(np.float32)
    ids = np.arange(t * c, dtype=np.float32).reshape(t, c)  # the key of a candidate is its id
    k = jnp.asarray(ids)[None, :, :, None, None]  # [1,T,C,1,1]
    q = jnp.zeros((1, t, 1, 1))
    _, pool = pool_scan(
        init_pool(1, MemMambaConfig(**{**SMALL, "pool_size": m, "note_heads": 1, "summary_dim": 1})),
        q,
        jnp.asarray(scores)[None],
        k,
        k,
        tau1=0.3,
        decay=decay,
    )
    prio, content, _ = _oracle_pool(scores.tolist(), ids.tolist(), m, 0.3, decay)
    np.testing.assert_allclose(np.asarray(pool["prio"][0]), prio, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(pool["k"][0, :, 0, 0]), [x if x is not None else 0 for x in content])
    assert all(p > -1 for p in prio) and len(set(content)) == m  # full, distinct notes
    if decay == 1.0:  # pure score priority: the pool holds the top-m candidates above tau1
        np.testing.assert_allclose(sorted(prio), sorted(scores.ravel())[-m:], rtol=1e-6)


def test_pool_read_masks_empty_slots():
    cfg = MemMambaConfig(**SMALL)
    pool = init_pool(2, cfg)
    q = jax.random.normal(jax.random.key(0), (2, cfg.note_heads, cfg.note_head_dim))
    np.testing.assert_array_equal(np.asarray(pool_read(q, pool)), 0.0)  # empty pool reads 0
    v = jax.random.normal(jax.random.key(1), (2, cfg.note_heads, cfg.note_head_dim))
    pool["v"] = pool["v"].at[:, 2].set(v).at[:, 0].set(100.0)  # slot 0 holds junk, empty
    pool["prio"] = pool["prio"].at[:, 2].set(0.7)
    _close(pool_read(q, pool), v, 1e-6)  # one stored note: read = its value


# ---------------------------------------------------------------- causality (gradients)
def test_note_block_reads_only_earlier_notes():
    """d fused_t / d src_s == 0 for s >= t: a token's own note (and later ones) never reach it."""
    cfg = MemMambaConfig(**{**SMALL, "tau1": 0.0, "trigger": "always", "pool_size": 16})  # room for all
    block = NoteBlock(cfg, True, rngs=nnx.Rngs(3))  # a cross layer: both pools
    t, b, d = 9, 1, cfg.d_model
    y = jax.random.normal(jax.random.key(0), (b, t, d))
    src = jax.random.normal(jax.random.key(1), (b, t, d))
    prev_s = jax.random.uniform(jax.random.key(2), (b, t, 1))
    prev_n = jax.random.normal(jax.random.key(3), (b, t, 1, cfg.summary_dim))

    outs = (0, 4, 8)

    @jax.jit
    def grads(src, prev_n):  # d fused[t_out] . w / d (src, prev_n) for every t_out, one compile
        state = {"pool": init_pool(b, cfg), "xpool": init_pool(b, cfg)}
        f = lambda a, c: block(a, y, state, prev_s, c, None)[0][0, jnp.array(outs)]
        _, vjp = jax.vjp(f, src, prev_n)
        cot = jnp.eye(len(outs))[:, :, None] * jnp.arange(1.0, d + 1)  # [len(outs), len(outs), D]
        return jax.vmap(vjp)(cot)

    g_all_src, g_all_prev = grads(src, prev_n)
    for i, t_out in enumerate(outs):
        g_src = np.abs(np.asarray(g_all_src[i])).sum(-1)[0]
        g_prev = np.abs(np.asarray(g_all_prev[i])).sum((-2, -1))[0]
        np.testing.assert_array_equal(g_src[t_out:], 0.0)
        np.testing.assert_array_equal(g_prev[t_out:], 0.0)
        if t_out:
            assert g_src[:t_out].min() > 0 and g_prev[:t_out].min() > 0  # every earlier note is read


def test_model_is_causal():
    model = _model(tau1=0.0, trigger="always", pool_size=16)
    x0 = model.residual(model.embed_tokens(_tokens(1, 12)))
    outs = (0, 6, 11)

    @jax.jit
    def grads(x):
        _, vjp = jax.vjp(lambda x: model.residual_stream(x)[-1, 0, jnp.array(outs)], x)
        return jax.vmap(vjp)(jnp.eye(len(outs))[:, :, None] * jnp.ones(x.shape[-1]))[0]

    g_all = grads(x0)
    for i, t_out in enumerate(outs):
        g = np.abs(np.asarray(g_all[i])).sum(-1)[0]
        np.testing.assert_array_equal(g[t_out + 1 :], 0.0)
        assert g[: t_out + 1].min() > 0


# ---------------------------------------------------------------- protocol
@pytest.mark.parametrize(
    "opts",
    [{}, pytest.param({"priority_decay": 0.8, "note_source": "block_in", "tau2": 0.5}, marks=pytest.mark.slow)],
    ids=["default", "decay_blockin"],
)
def test_decode_matches_parallel(opts):
    model, toks = _model(**opts), _tokens()
    full = forward(model, toks)
    assert full.shape == (2, T, SMALL["vocab_size"]) and full.dtype == jnp.float32
    decoded, cache = decode_all(model, toks)
    _close(decoded, full)
    _, pre = prefill(model, toks, model.init_cache(2, T))
    assert_trees_close(cache, pre)
    prio = np.stack([s["pool"]["prio"] for s in pre["layers"]])
    assert (prio > 0).all()  # the 4-note pools filled up over 21 tokens
    assert [("xpool" in s) for s in pre["layers"]] == [False, True]  # layer 1 is the cross layer


def test_prefill_in_two_chunks_equals_one():
    model, toks = _model(priority_decay=0.9), _tokens()
    one, c_one = prefill(model, toks, model.init_cache(2, T))
    a, c = prefill(model, toks[:, :12], model.init_cache(2, T))
    b, c_two = prefill(model, toks[:, 12:], c)
    _close(jnp.concatenate([a, b], 1), one)
    assert_trees_close(c_two, c_one)


def test_cross_layer_pool_is_top_of_earlier_pools():
    """With priority_decay = 1, a cross layer's pool = the top-M notes of the union of the earlier
    layers' candidates = the top-M of their pools."""
    model = _model(n_layers=3, cross_layer_interval=3, tau1=0.45)
    assert model.config.cross_layers == (2,) and model.config.cross_sources(2) == (0, 1)
    _, cache = prefill(model, _tokens(), model.init_cache(2, T))
    local = np.stack([s["pool"]["prio"] for s in cache["layers"]])  # [3,B,M]
    cross = np.asarray(cache["layers"][2]["xpool"]["prio"])  # [B,M]
    for bi in range(2):
        union = np.concatenate([local[0, bi], local[1, bi]])
        np.testing.assert_allclose(np.sort(cross[bi]), np.sort(union)[-4:], rtol=1e-6)
    windowed = _model(n_layers=3, cross_layer_interval=3, cross_layer_window=1)
    assert windowed.config.cross_sources(2) == (1,)


def test_no_cross_layers_and_trigger_off():
    model = _model(cross_layer_interval=0)
    assert model.config.cross_layers == () and model.blocks[1].note.cross is None
    logits, cache = prefill(model, _tokens(), model.init_cache(2, T))
    assert not any("xpool" in s for s in cache["layers"]) and np.isfinite(np.asarray(logits)).all()
    # tau2 = 1: retrieval never triggers, so each block adds exactly its mixer output
    quiet = _model(tau2=1.0)
    tokens = _tokens(1, 9)
    x0 = quiet.residual(quiet.embed_tokens(tokens))
    stream = quiet.residual_stream(x0)
    block = quiet.blocks[0]
    y, _ = block.mixer.forward(block.norm(x0), block.mixer.init_state(1), make_context(tokens))
    _close(stream[0], x0 + y)


def test_gradients_reach_every_parameter():
    model = _model(tau1=0.4)
    view = ParamView(model)
    params = view.flat(model)
    toks = _tokens(2, 16)

    def loss(p):
        return jnp.mean(jax.nn.log_softmax(view.merge(p)(toks)) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    for name, g in grads.items():
        assert np.isfinite(np.asarray(g)).all(), name
        if "note" in name:  # scorer (through the score-weighted notes), summariser, attention, gates
            assert float(jnp.abs(g).max()) > 0, name


# ---------------------------------------------------------------- config, presets, registry
def test_config_validation():
    for bad in (
        dict(pool_size=0),
        dict(summary_dim=10, note_heads=4),
        dict(tau1=1.5),
        dict(note_source="state"),
        dict(trigger="mean"),
        dict(priority_decay=0.0),
        dict(cross_layer_interval=-1),
    ):
        with pytest.raises(ValueError):
            MemMambaConfig(**{**SMALL, **bad})
    with pytest.raises(ValueError, match="MemMambaConfig"):
        MemMamba(registry.get_model_config("mamba2", "tiny"), rngs=nnx.Rngs(0))


def test_presets_and_registry():
    assert "memmamba" in registry.list_models()
    assert PRESETS["tiny"].cross_layers == (1,)
    assert PRESETS["130m"].cross_layers == (3, 7, 11, 15, 19, 23)
    assert (PRESETS["130m"].pool_size, PRESETS["130m"].summary_dim, PRESETS["130m"].tau1, PRESETS["130m"].tau2) == (
        50,
        64,
        0.5,
        0.3,
    )

    def count(cls, cfg):
        model = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
        return sum(math.prod(s.shape) for s in ParamView(model).shapes.values())

    cfg = PRESETS["130m"]
    d, s, h = cfg.d_model, cfg.summary_dim, cfg.hidden
    attention = d * s + 2 * s * s + s * d + 2 * d * d + d  # q, k, v, o, gate (+ bias)
    note = d * h + h + h + 1 + d * s + attention  # scorer, summariser, local pool
    body = count(Mamba2, Mamba2Config(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(Mamba2Config)}))
    assert count(MemMamba, cfg) == body + cfg.n_layers * note + len(cfg.cross_layers) * attention
    config = make_config("memmamba", "tiny", pool_size=8)
    assert config.model.pool_size == 8 and config.model_name == "memmamba"
    assert dataclasses.asdict(registry.get_model_config("memmamba", "tiny"))["pool_size"] == 16
