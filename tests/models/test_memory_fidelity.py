"""Tests for zoo/eval/memory_fidelity.py: ETMF/ECLMF on cases with known answers, then on the
Mamba-2 and MemMamba LMs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo.eval.memory_fidelity import (
    fidelity_from_fn,
    fidelity_from_influence,
    influence,
    memory_fidelity,
    residual_stream_fn,
)
from zoo.models.mamba2 import Mamba2, Mamba2Config
from zoo.models.memmamba import MemMamba, MemMambaConfig


def _linear_stack(a: float, n_layers: int):
    """x^l_t = a x^l_{t-1} + x^{l-1}_t (no residual): J^l_{t+k,t} = C(k+l-1, k) a^k I."""

    def fn(x):
        out = []
        for _ in range(n_layers):
            x = jax.lax.associative_scan(
                lambda p, q: (p[0] * q[0], q[0] * p[1] + q[1]), (jnp.full_like(x, a), x), axis=1
            )[1]
            out.append(x)
        return jnp.stack(out)

    return fn


def test_one_linear_layer_gives_a_to_the_k():
    x0 = jax.random.normal(jax.random.key(0), (2, 16, 3))
    lags = [0, 1, 2, 5, 9]
    r = fidelity_from_fn(_linear_stack(0.7, 1), x0, lags, probes=2)
    np.testing.assert_allclose(r["etmf"][0], 0.7 ** np.asarray(lags), rtol=1e-5)
    np.testing.assert_allclose(r["eclmf"][0], 1.0, rtol=1e-6)


def test_two_linear_layers_known_answer():
    x0 = jax.random.normal(jax.random.key(1), (1, 12, 4))
    lags = [0, 1, 3, 6]
    k = np.asarray(lags)
    r = fidelity_from_fn(_linear_stack(0.5, 2), x0, lags, sources=[0, 2, 5], probes=1)
    np.testing.assert_allclose(r["etmf"][1], (k + 1) * 0.5**k, rtol=1e-5)
    np.testing.assert_allclose(r["eclmf"][1], k + 1, rtol=1e-5)


def test_identity_layers_forget_nothing_vertically_and_carry_nothing_in_time():
    x0 = jax.random.normal(jax.random.key(2), (1, 8, 3))
    r = fidelity_from_fn(lambda x: jnp.stack([x, 2.0 * x]), x0, [0, 1, 4], probes=3)
    np.testing.assert_allclose(r["etmf"][:, 0], 1.0, rtol=1e-6)
    np.testing.assert_array_equal(r["etmf"][:, 1:], 0.0)
    np.testing.assert_allclose(r["eclmf"][1, 0], 2.0, rtol=1e-6)


def test_influence_is_causal_and_lags_past_the_end_are_nan():
    inf = influence(_linear_stack(0.9, 1), jax.random.normal(jax.random.key(3), (1, 6, 2)), [3], probes=1)
    assert inf.shape == (1, 1, 6)
    np.testing.assert_array_equal(inf[0, 0, :3], 0.0)
    r = fidelity_from_influence(inf, [3], [0, 2, 3])
    assert np.isnan(r["etmf"][0, 2]) and np.isfinite(r["etmf"][0, :2]).all()
    with pytest.raises(ValueError):
        influence(_linear_stack(0.9, 1), jnp.zeros((1, 6, 2)), [6])


@pytest.mark.parametrize(
    "cls,cfg_cls", [(Mamba2, Mamba2Config), (MemMamba, MemMambaConfig)], ids=["mamba2", "memmamba"]
)
def test_on_zoo_models(cls, cfg_cls):
    cfg = cfg_cls(vocab_size=32, d_model=16, n_layers=2, d_state=8, headdim=8, chunk_size=8)
    model = cls(cfg, rngs=nnx.Rngs(0))
    toks = jax.random.randint(jax.random.key(0), (1, 12), 0, 32)
    # the adapter reproduces the model's own forward
    x0 = model.residual(model.embed_tokens(toks))
    stream = residual_stream_fn(model)(x0)
    logits = model.logits(model.carry_from_embeddings(stream[-1]))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(toks)), atol=1e-5)
    r = memory_fidelity(model, toks, [0, 1, 4], sources=[0, 3, 6], probes=2)
    assert r["etmf"].shape == r["eclmf"].shape == (2, 3)
    np.testing.assert_allclose(r["etmf"][:, 0], 1.0, rtol=1e-6)
    np.testing.assert_allclose(r["eclmf"][0], 1.0, rtol=1e-6)
    assert np.isfinite(r["etmf"]).all() and (r["etmf"][:, 1:] > 0).all()
    with pytest.raises(ValueError):
        memory_fidelity(object(), toks, [0])
