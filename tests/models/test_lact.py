"""LaCT: the chunk recurrence vs a float64 loop oracle, the explicit gradient, Muon, causality, decoding."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo.layers import AttentionSpec, attend, self_attention
from zoo.models import lact as L
from zoo.models import registry
from zoo.models.base import make_context

TOL = {"float32": dict(rtol=2e-4, atol=2e-5)}


# ---------------------------------------------------------------------------- float64 oracles


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _np_newton_schulz(g):
    """Muon's quintic Newton-Schulz, one matrix per leading index, in float64."""
    transpose = g.shape[-2] > g.shape[-1]
    x = np.swapaxes(g, -1, -2) if transpose else g
    x = x / (np.sqrt((x**2).sum(axis=(-2, -1), keepdims=True)) + 1e-7)
    for a, b, c in (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ):
        gram = x @ np.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return np.swapaxes(x, -1, -2) if transpose else x


def _np_lact(w0, w1, w2, q, k, v, lr, mom, chunk, use_muon):
    """The block-causal recurrence as a plain loop over chunks (all arrays batched on axis 0).

    w0, w2 [N, Dh, Dk], w1 [N, Dv, Dh]; q, k [N, T, Dk]; v [N, T, Dv]; lr [N, T, 3]; mom [N, T] or None.
    """
    w0, w1, w2, q, k, v, lr = (np.asarray(a, np.float64) for a in (w0, w1, w2, q, k, v, lr))
    n0, n1, n2 = (np.linalg.norm(w, axis=-1, keepdims=True) for w in (w0, w1, w2))
    prev = [np.zeros_like(w0), np.zeros_like(w1), np.zeros_like(w2)]
    out = np.zeros(v.shape)

    def f(x):  # [N, L, Dk] -> [N, L, Dv]
        g = x @ np.swapaxes(w0, 1, 2)
        u = x @ np.swapaxes(w2, 1, 2)
        return (_silu(g) * u) @ np.swapaxes(w1, 1, 2)

    t = q.shape[1]
    done = 0  # tokens whose chunk has been used for an update
    for start in range(0, t - chunk, chunk):  # every chunk followed by another one is used to update
        sl = slice(start, start + chunk)
        out[:, sl] = f(q[:, sl])
        ki, vi, lri = k[:, sl], v[:, sl], lr[:, sl]
        g = ki @ np.swapaxes(w0, 1, 2)
        u = ki @ np.swapaxes(w2, 1, 2)
        s = 1.0 / (1.0 + np.exp(-g))
        hid = g * s * u
        dhid = vi @ w1
        du = dhid * g * s
        dg = dhid * u * s * (1.0 + g * (1.0 - s))
        d1 = np.swapaxes(vi, 1, 2) @ (hid * lri[..., 1:2])
        d0 = np.swapaxes(dg, 1, 2) @ (ki * lri[..., 0:1])
        d2 = np.swapaxes(du, 1, 2) @ (ki * lri[..., 2:3])
        ds = [d0, d1, d2]
        if mom is not None:
            mbar = np.asarray(mom, np.float64)[:, sl].mean(axis=1)[:, None, None]
            ds = [d + mbar * p for d, p in zip(ds, prev)]
            prev = ds
        if use_muon:
            ds = [_np_newton_schulz(d) for d in ds]
        w0, w1, w2 = (w + d for w, d in zip((w0, w1, w2), ds))
        w0, w1, w2 = (
            w / (np.linalg.norm(w, axis=-1, keepdims=True) + 1e-5) * n for w, n in zip((w0, w1, w2), (n0, n1, n2))
        )
        done = start + chunk
    out[:, done:] = f(q[:, done:])  # the last chunk: applied only
    return out


def _inputs(seed, n=3, t=50, dk=8, dh=12, lr_scale=0.3, momentum=True):
    r = np.random.default_rng(seed)
    w0 = r.standard_normal((n, dh, dk)) / math.sqrt(dk)
    w2 = r.standard_normal((n, dh, dk)) / math.sqrt(dk)
    w1 = r.standard_normal((n, dk, dh)) / math.sqrt(dh)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    q, k = unit(r.standard_normal((n, t, dk))), unit(r.standard_normal((n, t, dk)))
    v = r.standard_normal((n, t, dk))
    lr = lr_scale * r.uniform(0.0, 1.0, (n, t, 3))
    mom = r.uniform(0.0, 1.0, (n, t)) if momentum else None
    f32 = lambda x: None if x is None else np.asarray(x, np.float32)  # noqa: E731
    return tuple(f32(x) for x in (w0, w1, w2, q, k, v, lr, mom))


def _jax_lact(w0, w1, w2, q, k, v, lr, mom, chunk, use_muon):
    """block_causal_lact on [N, ...] inputs (N used as the batch, one head)."""
    add = lambda x: None if x is None else jnp.asarray(x)[:, None]  # noqa: E731
    out = L.block_causal_lact(
        (add(w0), add(w1), add(w2)), add(q), add(k), add(v), add(lr), add(mom), chunk_size=chunk, use_muon=use_muon
    )
    return out[:, 0]


# ---------------------------------------------------------------------------- the recurrence


@pytest.mark.parametrize("use_muon", [False, True])
@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("t", [50, 48, 16, 7, 1])
def test_block_causal_matches_loop_oracle(use_muon, momentum, t):
    args = _inputs(0, t=t, momentum=momentum)
    want = _np_lact(*args, chunk=16, use_muon=use_muon)
    got = _jax_lact(*args, chunk=16, use_muon=use_muon)
    np.testing.assert_allclose(np.asarray(got), want, **TOL["float32"])


def test_unrolled_scan_equals_rolled():
    args = _inputs(7, t=40)
    add = lambda x: jnp.asarray(x)[:, None]  # noqa: E731
    run = lambda unroll: L.block_causal_lact(
        tuple(add(w) for w in args[:3]),
        *(add(x) for x in args[3:]),  # noqa: E731
        chunk_size=16,
        use_muon=True,
        unroll=unroll,
    )
    np.testing.assert_allclose(np.asarray(run(True)), np.asarray(run(False)), rtol=1e-5, atol=1e-6)


def test_updates_change_later_chunks():
    """The oracle comparison is not vacuous: later chunks differ from applying the initial weights."""
    w0, w1, w2, q, k, v, lr, mom = _inputs(1)
    out = np.asarray(_jax_lact(w0, w1, w2, q, k, v, lr, mom, 16, True))
    static = np.asarray(L.fast_weight_apply(w0, w1, w2, q))
    np.testing.assert_allclose(out[:, :16], static[:, :16], **TOL["float32"])
    assert np.abs(out[:, 16:] - static[:, 16:]).max() > 1e-2


def test_explicit_gradient_equals_autodiff():
    w0, w1, w2, _, k, v, lr, _ = _inputs(2, t=16)
    grads = L.fast_weight_grads(w0, w1, w2, k, v, lr[..., 0], lr[..., 1], lr[..., 2])
    for j in range(3):
        auto = jax.grad(L.inner_loss, argnums=j)(w0, w1, w2, k, v, lr[..., j])
        np.testing.assert_allclose(np.asarray(grads[j]), -np.asarray(auto), rtol=1e-4, atol=1e-6)


def test_row_norms_restored_after_update():
    w0, w1, w2, _, k, v, lr, mom = _inputs(3, t=16)
    weights = tuple(jnp.asarray(w) for w in (w0, w1, w2))
    norms = tuple(L.row_norms(w) for w in weights)
    for use_muon in (False, True):
        new, _ = L.fast_weight_update(weights, None, norms, k, v, lr, None, use_muon=use_muon)
        for w_new, w_old, n in zip(new, weights, norms):
            assert np.abs(np.asarray(w_new - w_old)).max() > 1e-3  # the weights did move
            np.testing.assert_allclose(np.asarray(L.row_norms(w_new)), np.asarray(n), rtol=1e-4)


def test_momentum_accumulates_previous_update():
    w0, w1, w2, _, k, v, lr, mom = _inputs(4, t=32)
    weights = tuple(jnp.asarray(w) for w in (w0, w1, w2))
    norms = tuple(L.row_norms(w) for w in weights)
    zeros = tuple(jnp.zeros_like(w) for w in weights)
    c1, c2 = slice(0, 16), slice(16, 32)
    # Chunk 1: zero momentum = plain update; the buffer holds the raw gradient.
    w_m, buf = L.fast_weight_update(weights, zeros, norms, k[:, c1], v[:, c1], lr[:, c1], mom[:, c1], use_muon=False)
    w_p, none = L.fast_weight_update(weights, None, norms, k[:, c1], v[:, c1], lr[:, c1], None, use_muon=False)
    assert none is None
    for a, b in zip(w_m, w_p):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    g1 = L.fast_weight_grads(*weights, k[:, c1], v[:, c1], lr[:, c1, 0], lr[:, c1, 1], lr[:, c1, 2])
    for a, b in zip(buf, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    # Chunk 2: buffer = G2 + mean(m) * G1.
    _, buf2 = L.fast_weight_update(w_m, buf, norms, k[:, c2], v[:, c2], lr[:, c2], mom[:, c2], use_muon=False)
    g2 = L.fast_weight_grads(*w_m, k[:, c2], v[:, c2], lr[:, c2, 0], lr[:, c2, 1], lr[:, c2, 2])
    mbar = mom[:, c2].mean(axis=1)[:, None, None]
    for a, b, p in zip(buf2, g2, g1):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b + mbar * p), rtol=1e-5, atol=1e-7)
    # Momentum coefficients of zero are the same as no momentum over a whole sequence; others differ.
    args = list(_inputs(5))
    off = _jax_lact(*args[:7], None, 16, False)
    args[7] = np.zeros_like(args[7])
    np.testing.assert_allclose(np.asarray(_jax_lact(*args, 16, False)), np.asarray(off), rtol=1e-5, atol=1e-6)
    args[7] = np.ones_like(args[7])
    assert np.abs(np.asarray(_jax_lact(*args, 16, False) - off)).max() > 1e-4


# ---------------------------------------------------------------------------- Muon


def test_newton_schulz_coefficient_schedule():
    assert L.NS_COEFFS == (
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    )
    # On a diagonal matrix each step maps every singular value s -> a s + b s^3 + c s^5, in order.
    s = np.array([2.0, 1.0, 0.5, 0.1, 0.02])
    x = s / np.linalg.norm(s)
    for a, b, c in L.NS_COEFFS:
        x = a * x + b * x**3 + c * x**5
    got = np.asarray(L.newton_schulz5(jnp.diag(jnp.asarray(s, jnp.float32))))
    np.testing.assert_allclose(np.diag(got), x, rtol=1e-4)
    np.testing.assert_allclose(got - np.diag(np.diag(got)), 0.0, atol=1e-6)
    # The schedule in reverse order gives a different map (the order matters and is checked above).
    y = s / np.linalg.norm(s)
    for a, b, c in reversed(L.NS_COEFFS):
        y = a * y + b * y**3 + c * y**5
    assert np.abs(y - x).max() > 1e-2


@pytest.mark.parametrize("shape", [(16, 16), (24, 8), (8, 24)])
def test_newton_schulz_orthogonalises(shape):
    r = np.random.default_rng(0)
    m, n = shape
    u, _ = np.linalg.qr(r.standard_normal((m, m)))
    vt, _ = np.linalg.qr(r.standard_normal((n, n)))
    sv = np.linspace(1.0, 0.3, min(m, n))  # condition number 3.3
    g = (u[:, : min(m, n)] * sv) @ vt[: min(m, n)]
    x = np.asarray(L.newton_schulz5(jnp.asarray(g, jnp.float32)))
    assert x.shape == shape
    s = np.linalg.svd(x, compute_uv=False)
    assert s.min() > 0.85 and s.max() < 1.2, s
    np.testing.assert_allclose(x, _np_newton_schulz(g), rtol=1e-4, atol=1e-5)
    # Same singular vectors as g: x ~ U V^T (the polar factor).
    np.testing.assert_allclose(x, u[:, : min(m, n)] @ vt[: min(m, n)], atol=0.2)
    np.testing.assert_allclose(np.asarray(L.newton_schulz5(jnp.asarray(g.T, jnp.float32))), x.T, atol=1e-5)


# ---------------------------------------------------------------------------- causality


def test_apply_before_update_causality():
    """d o_t / d (k, v, lr, m)_s = 0 for s in t's chunk or later; d o_t / d q_s = 0 for s != t."""
    w0, w1, w2, q, k, v, lr, mom = _inputs(6, n=1, t=40)
    chunk = 16

    @jax.jit
    def out_t(t):  # gradients of sum(o_t) wrt every input, one compilation for all t
        def f(q, k, v, lr, mom):
            return jnp.sum(jax.lax.dynamic_index_in_dim(_jax_lact(w0, w1, w2, q, k, v, lr, mom, chunk, True), t, 1))

        return jax.grad(f, argnums=(0, 1, 2, 3, 4))(q, k, v, lr, mom)

    for t in (3, 15, 16, 31, 33, 39):
        # per-token gradient magnitude [T] for each input
        dq, dk, dv, dlr, dm = (np.abs(np.asarray(g)).reshape(1, 40, -1).sum(-1)[0] for g in out_t(t))
        first_own = (t // chunk) * chunk
        for g in (dk, dv, dlr, dm):
            assert np.all(g[first_own:] == 0.0), t
        if first_own:  # earlier chunks do reach o_t
            assert min(dk[:first_own].max(), dv[:first_own].max(), dlr[:first_own].max()) > 0.0, t
        if first_own >= 2 * chunk:  # the first chunk's momentum multiplies a zero buffer
            assert dm[chunk:first_own].max() > 0.0 and np.all(dm[:chunk] == 0.0), t
        assert np.all(np.delete(dq, t) == 0.0) and dq[t] > 0.0


# ---------------------------------------------------------------------------- layer and model


def _np_layer(layer: L.LaCTLayer, x: np.ndarray) -> np.ndarray:
    """The whole LaCT layer in float64 from its parameters (dense window mask, loop TTT oracle)."""
    cfg = layer.cfg
    p = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    b, t, d = x.shape
    h, a, hd, dk = cfg.n_lact_heads, cfg.n_heads, cfg.head_dim, cfg.fw_head_dim
    q, k, v = x @ p(layer.wq.kernel), x @ p(layer.wk.kernel), x @ p(layer.wv.kernel)

    def rope(z):  # [B, T, A*P], half-split rotation per attention head
        z = z.reshape(b, t, a, hd)
        inv = cfg.rope_theta ** (-np.arange(0, hd // 2) * 2.0 / hd)
        ang = np.arange(t)[:, None] * inv
        c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
        z1, z2 = z[..., : hd // 2], z[..., hd // 2 :]
        return np.concatenate([z1 * c - z2 * s, z2 * c + z1 * s], -1)

    qa, ka, va = rope(q), rope(k), v.reshape(b, t, a, hd)
    scores = np.einsum("bthp,bshp->bhts", qa, ka) / math.sqrt(hd)
    tt, ss = np.arange(t)[:, None], np.arange(t)[None]
    scores = np.where((ss <= tt) & (ss > tt - cfg.window), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o_attn = np.einsum("bhts,bshp->bthp", probs, va).reshape(b, t, d)
    fq = q * p(layer.qk_scale)[:, 0] + p(layer.qk_offset)[:, 0]
    fk = k * p(layer.qk_scale)[:, 1] + p(layer.qk_offset)[:, 1]
    unit = lambda z: z / (np.linalg.norm(z, axis=-1, keepdims=True) + 1e-5)  # noqa: E731
    fq = unit(_silu(fq.reshape(b, t, h, dk))).reshape(b, t, d)
    fk = unit(_silu(fk.reshape(b, t, h, dk))).reshape(b, t, d)
    fq, fk, fv = rope(fq).reshape(b, t, h, dk), rope(fk).reshape(b, t, h, dk), _silu(v).reshape(b, t, h, dk)
    lin = x @ p(layer.lr_proj.kernel) + p(layer.lr_proj.bias) + math.log(math.expm1(cfg.base_lr))
    lr = np.log1p(np.exp(lin)).reshape(b, t, h, 3)  # [head, matrix] layout of lr_proj's outputs
    mom = 1 / (1 + np.exp(-(x @ p(layer.momentum_proj.kernel) + p(layer.momentum_proj.bias))))
    ws = [np.asarray(w, np.float64) for w in layer.initial_fast_weights()]
    fold = lambda z: np.moveaxis(z, 2, 1).reshape((b * h,) + z.shape[1:2] + z.shape[3:])  # noqa: E731
    o = _np_lact(
        *(np.tile(w, (b, 1, 1)) for w in ws),
        fold(fq),
        fold(fk),
        fold(fv),
        fold(lr),
        np.moveaxis(mom, 2, 1).reshape(b * h, t),
        cfg.chunk_size,
        cfg.use_muon,
    )
    o = np.moveaxis(o.reshape(b, h, t, dk), 1, 2)  # [B, T, H, Dk]
    o = o / np.sqrt((o**2).mean(-1, keepdims=True) + cfg.ttt_norm_eps) * p(layer.ttt_norm.scale)
    sc = x @ p(layer.ttt_scale_proj.kernel) + p(layer.ttt_scale_proj.bias)
    o = o * _silu(sc)[..., None]
    return (o_attn + o.reshape(b, t, d)) @ p(layer.wo.kernel)


SMALL = dict(d_model=32, n_heads=4, n_lact_heads=2, d_ff=64, chunk_size=16, window=8, w0_w2_low_rank=4)


def test_layer_matches_float64_oracle():
    cfg = registry.get_model_config("lact", "tiny", **SMALL)
    layer = L.LaCTLayer(cfg, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((2, 40, cfg.d_model)).astype(np.float32)
    got = nnx.jit(lambda m, x: m(x, make_context(x[..., 0].astype(jnp.int32))))(layer, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), _np_layer(layer, x.astype(np.float64)), rtol=1e-3, atol=1e-4)


def test_low_rank_init_is_identity_plus_low_rank():
    cfg = registry.get_model_config("lact", "tiny", **SMALL)
    layer = L.LaCTLayer(cfg, rngs=nnx.Rngs(0))
    w0 = np.asarray(layer.w0())
    rest = w0 - 0.5 * np.eye(w0.shape[1], w0.shape[2])
    assert w0.shape == (2, 16, 16)
    assert np.linalg.matrix_rank(rest[0], tol=1e-5) == cfg.w0_w2_low_rank


@pytest.mark.parametrize("t,packed", [(50, False), (5, False), (50, True)])
def test_window_attention_blocked_equals_dense(t, packed):
    """LaCT's window attention (the shared `self_attention`, blocked O(T w) on the XLA path) equals
    the dense masked window, also on a packed row (3 documents: positions restart and keys of
    another document are invisible)."""
    r = np.random.default_rng(1)
    q, k, v = (jnp.asarray(r.standard_normal((2, t, 3, 8)), jnp.float32) for _ in range(3))
    if packed:
        lengths = [13, 20, t - 33]
        seg = jnp.asarray(np.repeat(np.arange(1, 4), lengths)[None].repeat(2, 0), jnp.int32)
        pos = jnp.asarray(np.concatenate([np.arange(n) for n in lengths])[None].repeat(2, 0), jnp.int32)
    else:
        seg, pos = None, jnp.broadcast_to(jnp.arange(t), (2, t))
    dense = attend(q, k, v, q_pos=pos, k_pos=pos, spec=AttentionSpec("window", window=8), q_seg=seg, k_seg=seg)
    spec = AttentionSpec("window", window=8)
    got = self_attention(q, k, v, spec=spec, positions=pos, segment_ids=seg, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(dense), atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(use_muon=False, use_momentum=False, w0_w2_low_rank=-1, learnable_ttt_scale=False, window=20)],
)
def test_decode_matches_parallel(overrides):
    """Token-by-token decoding (chunk 16, T 50: three updates and a partial chunk) = the parallel logits."""
    model = registry.create_model("lact", "tiny", **{**SMALL, **overrides})
    tokens = jax.random.randint(jax.random.key(0), (2, 50), 0, 256)
    full = nnx.jit(lambda m, x: m(x))(model, tokens)
    step = nnx.jit(lambda m, x, c: m.decode_step(x, c))
    cache = model.init_cache(2, 50)
    outs = []
    for i in range(tokens.shape[1]):
        logits, cache = step(model, tokens[:, i], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.asarray(jnp.stack(outs, 1)), np.asarray(full), rtol=1e-4, atol=1e-4)
    assert int(cache["pos"]) == 50


def test_presets_match_released_sizes():
    def count(name):  # embeddings + final norm + n_layers * (one layer), from abstract 1- and 2-layer models
        sizes = [
            sum(
                x.size
                for x in jax.tree.leaves(
                    nnx.state(nnx.eval_shape(lambda: registry.create_model("lact", name, n_layers=n)), nnx.Param)
                )
            )
            for n in (1, 2)
        ]
        return sizes[0] + (registry.get_model_config("lact", name).n_layers - 1) * (sizes[1] - sizes[0])

    c760 = registry.get_model_config("lact", "760m")
    assert (
        c760.d_model,
        c760.n_layers,
        c760.n_heads,
        c760.n_lact_heads,
        c760.chunk_size,
        c760.window,
        c760.d_ff,
        c760.w0_w2_low_rank,
        c760.rope_theta,
    ) == (1536, 24, 24, 4, 2048, 2048, 4096, 32, 1e6)
    assert 0.77e9 < count("760m") < 0.82e9  # 797.6M with the untied 32K vocabulary
    assert 2.8e9 < count("3b") < 3.1e9


def test_config_errors():
    with pytest.raises(ValueError, match="n_lact_heads"):
        registry.get_model_config("lact", "tiny", n_lact_heads=3)
    with pytest.raises(ValueError, match="chunk_size"):
        registry.get_model_config("lact", "tiny", chunk_size=0)


def test_model_gradients_finite_and_bf16_close():
    cfg = dict(SMALL, n_layers=1)
    model = registry.create_model("lact", "tiny", **cfg)
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, 256)

    def loss(m):
        return jnp.mean(m(tokens) ** 2)

    grads = nnx.jit(nnx.grad(loss))(model)
    flat = {jax.tree_util.keystr(path): g for path, g in jax.tree_util.tree_flatten_with_path(nnx.state(grads))[0]}
    assert all(bool(jnp.isfinite(g).all()) for g in flat.values())
    w1 = [g for name, g in flat.items() if "w1" in name and "blocks" in name]
    assert w1 and all(float(jnp.abs(g).max()) > 0 for g in w1)  # the slow init of the fast weights learns
    bf = registry.create_model("lact", "tiny", **cfg, dtype="bfloat16")
    fwd = nnx.jit(lambda m, x: m(x))
    f32, b16 = fwd(model, tokens), fwd(bf, tokens)
    assert b16.dtype == jnp.float32
    assert float(jnp.abs(b16 - f32).max()) < 0.1 * float(jnp.abs(f32).max())
