"""The model protocol, checked on every registered model (a new model file is picked up here).

Every language model, at its `tiny` preset: the parallel form equals token-by-token decoding and a
prefill in two pieces; a document packed into a row (segment ids, positions) gets the logits it
gets alone; scanned layers equal looped ones and their parameters convert both ways; remat leaves
the gradients unchanged; bad token inputs give a ValueError; a few dozen steps on a learnable task
reduce the loss. Forecasters and classifiers implement their base classes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from lm_testing import decode_all, forward, prefill

from zoo.models import registry
from zoo.models.base import Classifier, Forecaster, LanguageModel, LMConfig
from zoo.models.params import ParamView, convert_layout, model_with_params

LMS = registry.list_models("lm")
T = 20


def _model(name, seed=0, **overrides):
    return registry.create_model(name, "tiny", seed=seed, **overrides)


def _tokens(model, shape, seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, model.config.vocab_size)


def _close(a, b, tol=5e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, atol=tol * max(1.0, float(np.abs(b).max())), rtol=0)


@pytest.mark.parametrize("name", LMS)
def test_parallel_equals_decode_and_prefill(name):
    model = _model(name)
    assert isinstance(model, LanguageModel) and isinstance(model.config, LMConfig)
    toks = _tokens(model, (2, T))
    full = forward(model, toks)
    assert full.shape == (2, T, model.config.vocab_size) and full.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(full)))
    decoded, cache = decode_all(model, toks)
    _close(decoded, full)
    assert int(cache["pos"]) == T
    a, cache = prefill(model, toks[:, :7], model.init_cache(2, T))
    b, cache = prefill(model, toks[:, 7:], cache)
    _close(jnp.concatenate([a, b], 1), full)


@pytest.mark.parametrize("name", LMS)
def test_packed_document_equals_document_alone(name):
    """Row 0 packs documents of 9 and 11 tokens; row 1 holds the second document alone."""
    model = _model(name)
    a, b = _tokens(model, (1, 9), seed=1), _tokens(model, (1, 11), seed=2)
    packed = jnp.concatenate([jnp.concatenate([a, b], 1), jnp.pad(b, ((0, 0), (0, 9)))])  # [2, 20]
    seg = jnp.array([[1] * 9 + [2] * 11, [1] * 11 + [0] * 9])
    pos = jnp.array([list(range(9)) + list(range(11)), list(range(11)) + list(range(9))])
    got = nnx.jit(lambda m, x, s, p: m(x, segment_ids=s, positions=p))(model, packed, seg, pos)
    _close(got[0, :9], forward(model, a)[0])
    _close(got[0, 9:], forward(model, b)[0])
    _close(got[1, :11], forward(model, b)[0])


@pytest.mark.parametrize("name", LMS)
def test_scanned_layers_equal_looped_and_convert(name):
    looped = _model(name, seed=3)
    scanned = _model(name, seed=3, scan_layers=True)
    toks = _tokens(looped, (2, 12))
    _close(forward(scanned, toks), forward(looped, toks))
    # the parameters convert both ways and give the same model
    flat = ParamView(scanned).flat(scanned)
    assert any("/scanned/" in n for n in flat) and not any("/layers/" in n for n in flat)
    back = model_with_params(name, looped.config, flat, scanned.config)
    for n, v in ParamView(looped).flat(looped).items():
        np.testing.assert_array_equal(ParamView(back).flat(back)[n], v)
    again = convert_layout(ParamView(back).flat(back), back, scanned)
    for n, v in flat.items():
        np.testing.assert_array_equal(again[n], v)


# every block under remat; the second policy differs only in what jax.checkpoint saves (slow-only)
REMAT_CASES = [(n, "full") for n in LMS] + [pytest.param(n, "dots_saveable", marks=pytest.mark.slow) for n in LMS]


@pytest.mark.parametrize("name,remat", REMAT_CASES)
def test_remat_leaves_gradients_unchanged(name, remat):
    grads = {}
    for policy in ("none", remat):
        model = _model(name, seed=4, remat=policy)
        toks = _tokens(model, (2, 12))
        view = ParamView(model)
        loss = lambda p: jnp.mean(jax.nn.log_softmax(view.merge(p)(toks)) ** 2)  # noqa: E731
        grads[policy] = jax.jit(jax.grad(loss))(view.flat(model))
    for n, g in grads["none"].items():
        _close(grads[remat][n], g, 1e-5)


@pytest.mark.parametrize("name", LMS)
def test_bad_tokens_are_value_errors(name):
    model = _model(name)
    for bad, match in [
        (jnp.zeros((2, 0), jnp.int32), "length must be >= 1"),
        (jnp.zeros((0, 4), jnp.int32), "batch and length"),
        (jnp.zeros((2, 4), jnp.float32), "integer token ids"),
        (jnp.zeros((4,), jnp.int32), "expected 2 dims"),
    ]:
        with pytest.raises(ValueError, match=match):
            model(bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(jnp.full((1, 3), model.config.vocab_size, jnp.int32))


@pytest.mark.parametrize("name", LMS)
def test_a_few_steps_reduce_the_loss(name):
    """40 Adam steps on a learnable task (each row repeats a random 4-token pattern) cut the loss of
    the predictable tokens by more than half."""
    model = _model(name, seed=5)
    view = ParamView(model)
    params = view.flat(model)
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, min(model.config.vocab_size, 64), (8, 4))
    toks = jnp.asarray(np.tile(pattern, (1, 9))[:, :33], jnp.int32)  # [8, 33]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    def loss(p):
        logits = view.merge(p)(toks[:, :-1])[:, 4:]  # the tokens after one period are predictable
        return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 5:]).mean()

    @jax.jit
    def step(p, o):
        value, g = jax.value_and_grad(loss)(p)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, value

    first = None
    for _ in range(40):
        params, opt, value = step(params, opt)
        first = float(value) if first is None else first
    assert float(loss(params)) < 0.5 * first, (first, float(loss(params)))


@pytest.mark.parametrize("name", registry.list_models())
def test_every_model_implements_its_kind(name):
    kind = registry.model_kind(name)
    model = _model(name)
    assert isinstance(model, {"lm": LanguageModel, "forecaster": Forecaster, "classifier": Classifier}[kind])
    assert model.model_name == name and model.config == registry.get_model_config(name, "tiny")
    presets = registry.list_presets(name)
    assert all(type(registry.get_model_config(name, p)) is registry.config_class(name) for p in presets)
