"""Tests for zoo/models/s4.py: S4 (DPLR) and S4D kernels, recurrent mode, classifier and LM."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zoo.models import registry
from zoo.models.s4 import PRESETS, S4LM, S4Classifier, S4Config, S4Layer, SSMKernel, _solve, hippo_legs, nplr_legs

DIAG_VARIANTS = [("lin", "zoh"), ("inv", "bilinear"), ("real", "zoh"), ("legs", "bilinear")]


def _cfg(**kw) -> S4Config:
    base = dict(d_model=8, n_layers=1, d_state=16, l_max=32, vocab_size=32)
    base.update(kw)
    return S4Config(**base)


def _rel(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def _power_series_kernel(k: SSMKernel, length: int) -> np.ndarray:
    """K_l = Re(C dA^l dB) from the parameters in float64 NumPy (independent of the Cauchy path)."""
    prm = jax.tree.map(lambda x: np.asarray(x, np.complex128), k.ssm_params())
    cfg = k.cfg
    dt = prm["dt"].real
    out = np.zeros((prm["C"].shape[0], cfg.d_model, length))
    for h in range(cfg.d_model):
        if cfg.mode == "dplr":
            lam = np.concatenate([prm["A"][h], prm["A"][h].conj()])
            p = np.concatenate([prm["P"][h], prm["P"][h].conj()])
            b = np.concatenate([prm["B"][h], prm["B"][h].conj()])
            a = np.diag(lam) - np.outer(p, p.conj())
            eye = np.eye(len(lam))
            back = np.linalg.inv(eye - dt[h] / 2 * a)
            d_a, d_b = back @ (eye + dt[h] / 2 * a), back @ (dt[h] * b)
            c_full = np.concatenate([prm["C"][:, h], prm["C"][:, h].conj()], -1)
            c = c_full @ np.linalg.inv(eye - np.linalg.matrix_power(d_a, cfg.l_max))  # C = C~ (I - dA^L)^-1
        else:
            a = prm["A"][h]
            if cfg.disc == "zoh":
                d_a = np.exp(dt[h] * a)
                d_b = (d_a - 1) / a * prm["B"][h]
            else:
                d_a = (1 + dt[h] * a / 2) / (1 - dt[h] * a / 2)
                d_b = dt[h] * prm["B"][h] / (1 - dt[h] * a / 2)
            d_a, d_b = np.diag(np.concatenate([d_a, d_a.conj()])), np.concatenate([d_b, d_b.conj()])
            c = np.concatenate([prm["C"][:, h], prm["C"][:, h].conj()], -1)
        x = d_b.copy()
        for ell in range(length):
            out[:, h, ell] = (c @ x).real
            x = d_a @ x
    return out


def test_hippo_legs_matrix():
    a, b = hippo_legs(3)
    np.testing.assert_allclose(a, [[-1, 0, 0], [-np.sqrt(3), -2, 0], [-np.sqrt(5), -np.sqrt(15), -3]])
    np.testing.assert_allclose(b, np.sqrt([1, 3, 5]))


@pytest.mark.parametrize("n", [4, 16, 64])
def test_nplr_reconstructs_hippo(n):
    """V (W - Pt Pt^*) V^* == A_LegS (full basis = stored half + conjugates); Re(W) = -1/2."""
    w, pt, bt, v = nplr_legs(n)
    a, b = hippo_legs(n)
    vf = np.concatenate([v, v.conj()], 1)
    wf, pf = np.concatenate([w, w.conj()]), np.concatenate([pt, pt.conj()])
    recon = vf @ (np.diag(wf) - np.outer(pf, pf.conj())) @ vf.conj().T
    np.testing.assert_allclose(recon, a, atol=1e-9 * n * n)
    np.testing.assert_allclose(w.real, -0.5, atol=1e-12)
    assert np.all(w.imag < 0)
    np.testing.assert_allclose(vf @ np.concatenate([bt, bt.conj()]), b, atol=1e-9 * n)


@pytest.mark.parametrize("length", [32, 20, 77, 1])
def test_dplr_kernel_equals_power_series(length):
    """Cauchy + Woodbury kernel == C dA^l dB; length == l_max, < l_max (truncation), > l_max (doubling)."""
    k = SSMKernel(_cfg(dt_min=0.01, dt_max=0.1), 1, rngs=nnx.Rngs(0))
    got = k.kernel(length)
    assert got.shape == (1, 8, length)
    assert _rel(got, _power_series_kernel(k, length)) < 2e-4


def test_dplr_kernel_odd_l_max():
    k = SSMKernel(_cfg(l_max=33), 2, rngs=nnx.Rngs(1))
    assert _rel(k.kernel(33), _power_series_kernel(k, 33)) < 2e-4


@pytest.mark.parametrize("init,disc", DIAG_VARIANTS)
def test_s4d_kernel_equals_power_series(init, disc):
    k = SSMKernel(_cfg(mode="diag", init=init, disc=disc), 1, rngs=nnx.Rngs(2))
    assert _rel(k.kernel(50), _power_series_kernel(k, 50)) < 1e-4


@pytest.mark.parametrize("n", [2, 5, 32])
def test_solve_with_pivoting_equals_numpy(n):
    """The LAPACK-free solve (Gauss-Jordan, partial pivoting) == NumPy, also where the leading entry
    is zero (no pivoting would divide by it), batched, complex."""
    rng = np.random.default_rng(n)
    a = rng.normal(size=(3, n, n)) + 1j * rng.normal(size=(3, n, n))
    a[:, 0, 0] = 0
    b = rng.normal(size=(3, n, 2)) + 1j * rng.normal(size=(3, n, 2))
    got = _solve(jnp.asarray(a, jnp.complex64), jnp.asarray(b, jnp.complex64))
    assert _rel(got, np.linalg.solve(a, b)) < 1e-5


def test_dplr_discrete_matrices_equal_dense_inverses():
    """dA, dB by Sherman-Morrison and C = C~ (I - dA^L)^{-1} == the dense float64 inverses."""
    k = SSMKernel(_cfg(dt_min=0.01, dt_max=0.1), 2, rngs=nnx.Rngs(5))
    prm = jax.tree.map(lambda x: np.asarray(x, np.complex128), k.ssm_params())
    mats = k.setup_step()
    for h in range(k.cfg.d_model):
        lam = np.concatenate([prm["A"][h], prm["A"][h].conj()])
        p = np.concatenate([prm["P"][h], prm["P"][h].conj()])
        a = np.diag(lam) - np.outer(p, p.conj())
        eye, half = np.eye(len(lam)), prm["dt"][h].real / 2
        back = np.linalg.inv(eye - half * a)
        d_a = back @ (eye + half * a)
        np.testing.assert_allclose(mats["dA"][h], d_a, atol=1e-5)
        b = np.concatenate([prm["B"][h], prm["B"][h].conj()])
        np.testing.assert_allclose(mats["dB"][h], back @ (2 * half * b), atol=1e-5)
        c_full = np.concatenate([prm["C"][:, h], prm["C"][:, h].conj()], -1)
        c = c_full @ np.linalg.inv(eye - np.linalg.matrix_power(d_a, k.cfg.l_max))
        assert _rel(mats["C"][:, h], c) < 1e-4


@pytest.mark.parametrize("impl", ["reference", "pallas"])
def test_kernel_implementations_agree(impl):
    """The model's kernel is the same through every pallas_kernels.cauchy implementation (the Pallas
    kernels run interpreted on CPU)."""
    for mode, init in [("dplr", "legs"), ("diag", "lin")]:
        base = SSMKernel(_cfg(mode=mode, init=init, implementation="xla"), 1, rngs=nnx.Rngs(3))
        other = SSMKernel(_cfg(mode=mode, init=init, implementation=impl), 1, rngs=nnx.Rngs(3))
        assert _rel(other.kernel(32), base.kernel(32)) < 1e-4


@pytest.mark.parametrize("mode,init,disc", [("dplr", "legs", "bilinear")] + [("diag", i, d) for i, d in DIAG_VARIANTS])
def test_conv_mode_equals_recurrence(mode, init, disc):
    """S4Layer in convolution mode == setup_step/step run token by token."""
    layer = S4Layer(_cfg(mode=mode, init=init, disc=disc, dt_min=0.01), rngs=nnx.Rngs(4))
    u = jax.random.normal(jax.random.key(0), (2, 40, 8))
    y_conv = layer(u)
    mats = layer.setup_step()
    state = layer.kernel.init_state(2)
    step = jax.jit(lambda u_t, s: layer.step(u_t, s, mats))
    ys = []
    for t in range(40):
        y, state = step(u[:, t], state)
        ys.append(y)
    assert _rel(jnp.stack(ys, 1), y_conv) < 1e-4


def test_bidirectional_layer_matches_explicit_noncausal_conv():
    layer = S4Layer(_cfg(mode="diag", init="lin"), bidirectional=True, rngs=nnx.Rngs(5))
    t = 12
    u = np.asarray(jax.random.normal(jax.random.key(1), (1, t, 8)))
    k = np.asarray(layer.kernel.kernel(t))  # [2,H,T]
    d = np.asarray(layer.D[...])
    y = np.zeros((1, t, 8))
    for i in range(t):
        for s in range(t):
            y[0, i] += k[0, :, i - s] * u[0, s] if s <= i else k[1, :, s - i - 1] * u[0, s]
    y += d * u
    y = jnp.asarray(y, jnp.float32)
    want = layer._head(y, jnp.float32)
    assert _rel(layer(jnp.asarray(u)), want) < 1e-4
    with pytest.raises(ValueError, match="bidirectional"):
        layer.setup_step()


@pytest.mark.parametrize("preset", ["tiny", "tiny-s4d"])
def test_lm_decode_equals_parallel(preset):
    """Token-by-token decode_step reproduces the parallel logits (T > l_max exercises C~ doubling)."""
    model = registry.create_model("s4", preset, l_max=16, d_model=16, seed=1)
    tokens = jax.random.randint(jax.random.key(2), (2, 24), 0, 256)
    logits = model(tokens)
    assert logits.shape == (2, 24, 256) and logits.dtype == jnp.float32
    cache = model.init_cache(2, 24)
    step = nnx.jit(lambda m, tok, c: m.decode_step(tok, c))
    outs = []
    for t in range(24):
        out, cache = step(model, tokens[:, t], cache)
        outs.append(out)
    assert int(cache["pos"]) == 24
    assert _rel(jnp.stack(outs, 1), logits) < 1e-4


def test_lm_is_causal_and_grads_finite():
    model = registry.create_model("s4", "tiny", d_model=16, l_max=32)
    tok = jax.random.randint(jax.random.key(3), (1, 20), 0, 256)
    tok2 = tok.at[0, 15].set((tok[0, 15] + 1) % 256)
    a, b = model(tok), model(tok2)
    np.testing.assert_allclose(a[:, :15], b[:, :15], atol=1e-5)
    assert not np.allclose(a[:, 15:], b[:, 15:])

    def loss(m):
        lg = m(tok)
        return -jnp.mean(jax.nn.log_softmax(lg[:, :-1]) * jax.nn.one_hot(tok[:, 1:], 256)) * 256

    grads = nnx.jit(nnx.grad(loss))(model)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert float(jnp.abs(grads.blocks.layers[0].layer.kernel.log_dt[...]).sum()) > 0


def test_ssm_params_metadata():
    model = registry.create_model("s4", "tiny")
    kern = model.blocks[0].layer.kernel
    for name in ("log_dt", "log_a_real", "a_imag", "B", "P"):
        p = getattr(kern, name)
        assert p.get_metadata()["lr_group"] == "ssm" and p.get_metadata()["wd"] is False, name
        assert len(p.get_metadata()["axes"]) == p[...].ndim, name
        assert p[...].dtype == jnp.float32
    assert "lr_group" not in kern.C.get_metadata()
    for path, p in nnx.state(model, nnx.Param).flat_state():
        assert len(p.get_metadata()["axes"]) == p[...].ndim, path


def test_classifier_pooling_ignores_padding():
    cfg = _cfg(bidirectional=True, n_classes=5, n_layers=1, mode="diag", init="inv")
    clf = S4Classifier(cfg, rngs=nnx.Rngs(6))
    tok = jax.random.randint(jax.random.key(4), (2, 10), 1, 32)
    mask = jnp.arange(10)[None] < jnp.array([[7], [10]])
    padded = jnp.where(mask, tok, 0)
    junk = jnp.where(mask, tok, 17)
    a, b = clf(padded, mask), clf(junk, mask)
    assert a.shape == (2, 5)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # row 0 equals the same sequence without padding
    np.testing.assert_allclose(clf(tok[:1, :7])[0], a[0], atol=1e-4)


def test_registry_and_presets():
    """Every preset builds its kind: the LM presets an S4LM, the LRA classifier shapes the classifier
    (they used to be listed under the LM, which refused them)."""
    assert registry.model_kind("s4") == "lm" and registry.model_kind("s4_classifier") == "classifier"
    for name, cls in (("s4", S4LM), ("s4_classifier", S4Classifier)):
        for preset in registry.list_presets(name):
            model = nnx.eval_shape(lambda: registry.create_model(name, preset))
            assert isinstance(model, cls) and model.config == registry.get_model_config(name, preset)
    with pytest.raises(ValueError, match="unknown preset 'lra-listops'"):
        registry.create_model("s4", "lra-listops")
    assert set(PRESETS) == {"tiny", "tiny-s4d"}


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(mode="s5"), "mode"),
        (dict(mode="diag", init="legs2"), "init"),
        (dict(init="lin"), "init"),
        (dict(d_state=5), "d_state"),
        (dict(n_ssm=3), "n_ssm"),
        (dict(disc="euler"), "disc"),
        (dict(dt_min=0.2, dt_max=0.1), "dt_min"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**kw)


def test_lm_rejects_bidirectional():
    with pytest.raises(ValueError, match="bidirectional"):
        S4LM(dataclasses.replace(PRESETS["tiny"], bidirectional=True), rngs=nnx.Rngs(0))


# --- LRA ListOps source (zoo/data/listops.py), used by scripts/listops_s4.py ---------------------


def test_listops_evaluate_known_expressions():
    from zoo.data.listops import evaluate, to_string

    tree = ("MAX", [2, 9, ("MIN", [4, 7]), 0])
    assert to_string(tree) == "[MAX 2 9 [MIN 4 7 ] 0 ]" and evaluate(tree) == 9
    assert evaluate(("SM", [7, 8, ("MED", [1, 5, 3])])) == (7 + 8 + 3) % 10
    assert evaluate(("MED", [1, 2, 7, 9])) == 4  # even count: floor of the two middle values' mean
    assert evaluate(("MIN", [("MAX", [1, 6]), ("SM", [9, 9])])) == 6


def test_listops_source_is_deterministic_and_well_formed():
    from zoo.data.listops import CLOSE_ID, PAD_ID, VOCAB_SIZE, ListOpsSource

    src = ListOpsSource(200, seed=3, max_length=64)
    again = ListOpsSource(200, seed=3, max_length=64)
    toks, mask, labels = src.arrays()
    np.testing.assert_array_equal(toks, again.arrays()[0])
    assert toks.shape == (200, 64) and toks.dtype == np.int32 and toks.max() < VOCAB_SIZE
    lengths = mask.sum(1)
    assert np.all(mask == (np.arange(64)[None] < lengths[:, None]))  # padding only at the end
    opens = ((toks >= 11) & (toks < CLOSE_ID)).sum(1)
    assert np.all(opens == (toks == CLOSE_ID).sum(1)) and np.all(opens >= 1)  # balanced brackets
    assert np.all(toks[~mask] == PAD_ID) and set(labels.tolist()) == set(range(10))
    with pytest.raises(IndexError):
        src[200]
    with pytest.raises(ValueError, match="max_args"):
        ListOpsSource(5, max_args=1)
