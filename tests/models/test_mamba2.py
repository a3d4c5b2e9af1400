"""Tests for zoo/models/mamba2.py: the Mamba-2 block, decoding, prefill, init, sizes, and the
Stuffed-Mamba mitigations (B/dt/A adjustments, state-norm cap, sliding window by state difference)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_testing import assert_trees_close, decode_all, decode_step, forward, prefill

from zoo.config import make_config
from zoo.info import count_params
from zoo.models.mamba2 import (
    PRESETS,
    Mamba2,
    Mamba2Config,
    calibrate_state_norm,
    cap_state_norm,
    gated_rms_norm,
    ssm_states,
    state_norm_trace,
    windowed_ssd,
)

# Small enough for CPU: 2 layers, 4 heads of 8, 2 groups, chunk 8 (so several SSD chunks are used).
SMALL = dict(vocab_size=64, d_model=16, n_layers=2, d_state=8, headdim=8, ngroups=2, chunk_size=8)
T = 21


def _model(**kw) -> Mamba2:
    return Mamba2(Mamba2Config(**{**SMALL, **kw}), rngs=nnx.Rngs(0))


def _tokens(b=2, t=T, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, SMALL["vocab_size"])


def _close(a, b, tol=2e-5):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, atol=tol * max(1.0, float(np.abs(b).max())), rtol=0)


# ---------------------------------------------------------------- protocol: decode and prefill
@pytest.mark.parametrize("opts", [{}, {"window": 5}], ids=["plain", "window5"])
def test_decode_matches_parallel(opts):
    model, toks = _model(**opts), _tokens()
    full = forward(model, toks)
    assert full.shape == (2, T, SMALL["vocab_size"]) and full.dtype == jnp.float32
    steps, cache = decode_all(model, toks)
    _close(steps, full)
    _, pre = prefill(model, toks, model.init_cache(2, T))
    assert_trees_close(cache, pre)
    assert int(cache["pos"]) == int(pre["pos"]) == T


@pytest.mark.parametrize(
    "opts",
    [{}, {"window": 5}, {"state_norm_thresholds": (0.05,), "state_norm_chunk": 4}],
    ids=["plain", "window5", "state_norm"],
)
def test_prefill_in_two_chunks_equals_one(opts):
    model, toks = _model(**opts), _tokens()
    one, c_one = prefill(model, toks, model.init_cache(2, T))
    split = 12  # a multiple of state_norm_chunk, not of the SSD chunk (8)
    a, c = prefill(model, toks[:, :split], model.init_cache(2, T))
    b, c_two = prefill(model, toks[:, split:], c)
    _close(jnp.concatenate([a, b], 1), one)
    assert_trees_close(c_two, c_one)


def test_prefill_then_decode_continues():
    model, toks = _model(), _tokens()
    full = forward(model, toks)
    _, cache = prefill(model, toks[:, :15], model.init_cache(2, T))
    for i in range(15, T):
        logits, cache = decode_step(model, toks[:, i], cache)
        _close(logits, full[:, i])


# ---------------------------------------------------------------- block pieces and init
def test_gated_rms_norm_matches_formula():
    rng = np.random.default_rng(0)
    y, z = rng.normal(size=(3, 12)), rng.normal(size=(3, 12))
    w = rng.normal(size=12)
    out = np.asarray(
        gated_rms_norm(
            jnp.asarray(y, jnp.float32),
            jnp.asarray(z, jnp.float32),
            jnp.asarray(w, jnp.float32),
            group_size=4,
            eps=1e-5,
        )
    )
    g = y * z / (1 + np.exp(-z))
    expect = (
        np.concatenate(
            [g[:, i : i + 4] / np.sqrt((g[:, i : i + 4] ** 2).mean(-1, keepdims=True) + 1e-5) for i in range(0, 12, 4)],
            -1,
        )
        * w
    )
    np.testing.assert_allclose(out, expect, rtol=1e-5, atol=1e-6)
    # one group = plain RMSNorm over all channels: differs from the 3-group result
    whole = np.asarray(
        gated_rms_norm(
            jnp.asarray(y, jnp.float32),
            jnp.asarray(z, jnp.float32),
            jnp.asarray(w, jnp.float32),
            group_size=12,
            eps=1e-5,
        )
    )
    assert not np.allclose(whole, out)


def test_init_ranges_and_metadata():
    cfg = Mamba2Config(d_model=256, n_layers=4, headdim=8, d_state=4)  # 64 heads per layer
    model = Mamba2(cfg, rngs=nnx.Rngs(1))
    mixers = [b.mixer for b in model.blocks]
    A = np.concatenate([np.exp(np.asarray(m.A_log[...])) for m in mixers])
    dt = np.concatenate([np.asarray(jax.nn.softplus(m.dt_bias[...])) for m in mixers])
    assert A.min() >= 1.0 and A.max() <= 16.0 and A.max() - A.min() > 10  # U[1, 16]
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)  # log-uniform [1e-3, 0.1]
    logdt = np.log(dt)
    assert abs(logdt.mean() - 0.5 * (math.log(1e-3) + math.log(0.1))) < 0.4  # uniform in log space
    for m in mixers:
        np.testing.assert_array_equal(np.asarray(m.D[...]), 1.0)
        for p in (m.A_log, m.dt_bias, m.D, m.norm_weight):
            assert p.get_metadata()["wd"] is False
        assert np.abs(np.asarray(m.out_proj.kernel[...])).max() <= cfg.d_inner**-0.5 / math.sqrt(cfg.n_layers)
        assert np.abs(np.asarray(m.conv_weight[...])).max() <= 0.5
    assert abs(float(np.std(np.asarray(model.embedding[...]))) - 0.02) < 0.002
    # the floor: dt_min below the floor gives dt >= floor
    low = Mamba2(Mamba2Config(**{**SMALL, "dt_min": 1e-6, "dt_max": 1e-5}), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(np.asarray(jax.nn.softplus(low.blocks[0].mixer.dt_bias[...])), 1e-4, rtol=1e-4)


def _formula_params(cfg: Mamba2Config) -> int:
    e, h, gn = cfg.d_inner, cfg.n_heads, cfg.ngroups * cfg.d_state
    per_layer = (
        cfg.d_model * (2 * e + 2 * gn + h) + cfg.conv_dim * (cfg.d_conv + 1) + 3 * h + e + e * cfg.d_model + cfg.d_model
    )
    return cfg.n_layers * per_layer + cfg.padded_vocab * cfg.d_model + cfg.d_model


def test_official_sizes_and_param_counts():
    dims = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64)}
    published = {"130m": 130e6, "370m": 370e6, "780m": 780e6, "1.3b": 1.3e9, "2.7b": 2.7e9}
    for name, (d, n) in dims.items():
        cfg = PRESETS[name]
        assert (cfg.d_model, cfg.n_layers, cfg.d_state, cfg.headdim, cfg.expand) == (d, n, 128, 64, 2)
        assert cfg.padded_vocab == 50288 and cfg.n_heads == 2 * d // 64
        assert abs(_formula_params(cfg) / published[name] - 1) < 0.035, name
    # the model itself (abstract, nothing allocated) has exactly the formula's count
    assert count_params(make_config("mamba2", "130m")) == _formula_params(PRESETS["130m"]) == 128_989_632
    assert count_params(make_config("mamba2", "tiny")) == _formula_params(PRESETS["tiny"])


def test_config_errors():
    with pytest.raises(ValueError, match="headdim"):
        Mamba2Config(d_model=20, headdim=16)
    with pytest.raises(ValueError, match="state_norm_thresholds"):
        Mamba2Config(**{**SMALL, "state_norm_thresholds": (1.0, 2.0)})
    with pytest.raises(ValueError, match="tokens"):
        _model()(jnp.zeros((3,), jnp.int32))


# ---------------------------------------------------------------- Stuffed-Mamba mitigations
def test_method1_adjustments():
    model = _model()
    mixer = model.blocks[0].mixer
    dt_raw = jax.random.normal(jax.random.key(1), (2, 3, 4))
    B = 3 * jax.random.normal(jax.random.key(2), (2, 3, 2, 8))
    dt0, A0, B0 = mixer._discretise(dt_raw, B)
    model.set_inference_options(b_scale=0.5, b_clip=1.0, dt_scale=2.0, dt_offset=0.01, a_scale=3.0, a_offset=-0.5)
    dt1, A1, B1 = mixer._discretise(dt_raw, B)
    _close(dt1, 2 * dt0 + 0.01)
    _close(A1, 3 * A0 - 0.5)
    _close(B1, 0.5 * np.clip(np.asarray(B), -1, 1))
    # B = 0 writes nothing: the state stays zero
    model.set_inference_options(b_scale=0.0, b_clip=0.0, dt_scale=1.0, dt_offset=0.0, a_scale=1.0, a_offset=0.0)
    _, cache = prefill(model, _tokens(), model.init_cache(2, T))
    assert float(jnp.abs(ssm_states(model, cache)).max()) == 0.0


def test_state_norm_cap_never_exceeds_threshold():
    model, toks = _model(), _tokens(t=24)
    pos, free = state_norm_trace(model, toks, every=4)
    assert free.shape == (2, 2, 4, 6) and list(pos) == list(range(4, 28, 4))
    thr = 0.5 * float(np.median(free[..., -1]))
    assert free[..., 2:].max() > thr  # the cap will be active
    model.set_inference_options(state_norm_thresholds=(thr,), state_norm_chunk=4)
    _, capped = state_norm_trace(model, toks, every=4)  # norms at every chunk end
    assert capped.max() <= thr * (1 + 1e-5)
    assert np.isclose(capped.max(), thr, rtol=1e-4)  # capped, not zeroed
    # decoding caps after every token
    steps, cache = decode_all(model, toks)
    norms = np.sqrt((np.asarray(ssm_states(model, cache)) ** 2).sum((-2, -1)))
    assert norms.max() <= thr * (1 + 1e-5)
    # the cap formula; the paper code's h * ||h|| / thr would grow the state instead
    h = jax.random.normal(jax.random.key(0), (1, 2, 3, 4))
    thr2 = jnp.array([1.0, 100.0])
    out = cap_state_norm(h, thr2)
    n_in, n_out = np.sqrt((np.asarray(h) ** 2).sum((-2, -1))), np.sqrt((np.asarray(out) ** 2).sum((-2, -1)))
    assert n_in[0, 0] > 1.0  # head 0 is above its cap, head 1 below
    np.testing.assert_allclose(n_out[0], [1.0, n_in[0, 1]], rtol=1e-5)


def test_calibrate_state_norm():
    model = _model(state_norm_chunk=8)
    thr = calibrate_state_norm(model, _tokens(), multiplier=2.0)
    assert len(thr) == SMALL["n_layers"] * 4 and min(thr) > 0
    cfg = model.set_inference_options(state_norm_thresholds=thr)
    assert cfg.state_norm_thresholds == thr
    # with thresholds at twice the calibration norms the calibration prompt is unchanged
    ref = _model(state_norm_chunk=8)
    _close(forward(model, _tokens()), forward(ref, _tokens()))


def _explicit_window(x, dt, A, B, C, D, r):
    """y_t = sum_{s=t-r+1..t} C_t . (prod_{k=s+1..t} exp(dt_k A)) dt_s x_s B_s^T + D x_t (float64)."""
    x, dt, A, B, C, D = (np.asarray(v, np.float64) for v in (x, dt, A, B, C, D))
    b, t, h, p = x.shape
    rep = h // B.shape[2]
    Bh, Ch = np.repeat(B, rep, 2), np.repeat(C, rep, 2)
    y = np.zeros_like(x)
    for ti in range(t):
        for s in range(max(0, ti - r + 1), ti + 1):
            decay = np.exp(A * dt[:, s + 1 : ti + 1].sum(1))  # [b,h]
            coef = decay * dt[:, s] * np.einsum("bhn,bhn->bh", Ch[:, ti], Bh[:, s])  # [b,h]
            y[:, ti] += coef[..., None] * x[:, s]
        y[:, ti] += D[:, None] * x[:, ti]
    return y


@pytest.mark.parametrize("r", [1, 3, 9])
def test_windowed_ssd_matches_explicit_window(r):
    k = jax.random.split(jax.random.key(3), 5)
    b, t, h, p, g, n = 2, 19, 4, 3, 2, 5
    x = jax.random.normal(k[0], (b, t, h, p))
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, t, h)) - 1)
    A = -jnp.exp(jax.random.normal(k[2], (h,)))
    B, C = jax.random.normal(k[3], (b, t, g, n)), jax.random.normal(k[4], (b, t, g, n))
    D = jnp.linspace(0.5, 1.5, h)
    expect = _explicit_window(x, dt, A, B, C, D, r)
    zeros = dict(
        h0=jnp.zeros((b, h, p, n)),
        hist_x=jnp.zeros((b, r, h, p)),
        hist_B=jnp.zeros((b, r, g, n)),
        hist_dt=jnp.zeros((b, r, h)),
    )
    wssd = jax.jit(windowed_ssd, static_argnames=("window", "chunk_size", "implementation"))
    y, _, _ = wssd(x, dt, A, B, C, D, window=r, chunk_size=4, **zeros)
    np.testing.assert_allclose(np.asarray(y), expect, atol=2e-5 * np.abs(expect).max())
    # carrying (state, history) across a split gives the same outputs
    y1, h1, (hx, hb, hd) = wssd(x[:, :7], dt[:, :7], A, B[:, :7], C[:, :7], D, window=r, chunk_size=4, **zeros)
    y2, _, _ = wssd(
        x[:, 7:], dt[:, 7:], A, B[:, 7:], C[:, 7:], D, window=r, chunk_size=4, h0=h1, hist_x=hx, hist_B=hb, hist_dt=hd
    )
    np.testing.assert_allclose(np.asarray(jnp.concatenate([y1, y2], 1)), expect, atol=2e-5 * np.abs(expect).max())


def test_window_longer_than_sequence_is_the_plain_model():
    toks = _tokens()
    _close(forward(_model(window=T + 3), toks), forward(_model(), toks))
