"""SpaceTime: companion kernels, closed loop, preprocessing, the forecaster, and its data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.companion import api as companion
from zoo.data import timeseries as ts
from zoo.layers import direct_conv
from zoo.models import registry
from zoo.models import spacetime as st

TOL = {"float32": dict(rtol=2e-5, atol=2e-5)}


def _direct_conv(u, k):
    """The O(T^2) oracle in SpaceTime's layout: u [B, T, D], k [D, L] -> [B, T, D]."""
    return jnp.moveaxis(direct_conv(jnp.moveaxis(jnp.asarray(u), 1, -1), jnp.asarray(k)), -1, 1)


@pytest.mark.parametrize("t,klen", [(1, 1), (7, 3), (12, 12), (13, 40)])
def test_fft_conv_btd_equals_direct_conv(t, klen):
    rng = np.random.default_rng(t)
    u = rng.standard_normal((2, t, 3)).astype(np.float32)
    k = rng.standard_normal((3, klen)).astype(np.float32)
    want = np.zeros((2, t, 3))
    for s in range(t):
        for l in range(min(s + 1, klen)):
            want[:, s] += k[:, l] * u[:, s - l]
    np.testing.assert_allclose(np.asarray(_direct_conv(u, k)), want, **TOL["float32"])
    np.testing.assert_allclose(np.asarray(st.fft_conv_btd(u, k)), want, rtol=1e-5, atol=1e-5)


def test_normalize_l1_and_degenerate_rows():
    x = jnp.array([[1.0, -3.0], [0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(st.normalize(x, 1)), [[0.25, -0.75], [0.0, 0.0]])
    np.testing.assert_array_equal(np.asarray(st.normalize(x, 0)), np.asarray(x))


# ---------------------------------------------------------------------------- SSM layers


def _set(module, **values):
    for name, v in values.items():
        getattr(module, name)[...] = jnp.asarray(v, jnp.float32)


@pytest.mark.parametrize("p", [1, 3, 8])
def test_companion_ssm_with_ar_coefficients_reproduces_the_ar_process(p):
    """Last column a = (phi_p, .., phi_1), b = e_1, c = first N impulse-response terms: driving the
    SSM with the innovations gives y_t = sum_j phi_j y_{t-j} + eps_t exactly (zero history)."""
    rng = np.random.default_rng(p)
    phi = ts.sample_ar_coefficients(p, rng)
    t = 96
    eps = rng.standard_normal(t)
    want = ts.simulate_arima(phi, t, noise=eps, burn_in=0)
    psi = ts.simulate_arima(phi, p, noise=np.eye(1, p)[0], burn_in=0)  # impulse response psi_0..psi_{p-1}
    ssm = st.CompanionSSM(1, 1, p, norm_order=0, skip=False, kernel_method="fft", rngs=nnx.Rngs(0))
    _set(ssm, a=phi[::-1][None], b=np.eye(1, p), c=psi[None])
    y = ssm(jnp.asarray(eps, jnp.float32)[None, :, None])
    np.testing.assert_allclose(np.asarray(y[0, :, 0]), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_open_loop_equals_step_recurrence_and_shift_ssm_is_fir():
    rng = np.random.default_rng(3)
    d, n, t = 4, 5, 11
    dec = st.ClosedLoopSSM(d, 2, n, norm_order=1, rngs=nnx.Rngs(1))
    u = jnp.asarray(rng.standard_normal((2, t, d)), jnp.float32)
    y_open, u_next = dec.open_loop(u)
    _, _, c, k = dec.abck()
    c, k = jnp.repeat(c, 2, axis=0), jnp.repeat(k, 2, axis=0)
    x = jnp.zeros((2, d, n))
    for s in range(t):
        x = dec.step(x, u[:, s])  # x_{s+1}
        np.testing.assert_allclose(np.asarray(y_open[:, s]), np.asarray((x * c).sum(-1)), atol=2e-5)
        np.testing.assert_allclose(np.asarray(u_next[:, s]), np.asarray((x * k).sum(-1)), atol=2e-5)
    np.testing.assert_allclose(np.asarray(dec.state(u)), np.asarray(x), atol=2e-5)
    # shift SSM: A = S, b = e_1 -> the kernel is c itself (a learnable FIR filter of length N)
    shift = st.CompanionSSM(d, d, n, kind="shift", skip=False, rngs=nnx.Rngs(2))
    a0, b0, c0 = shift.abc()
    np.testing.assert_allclose(
        np.asarray(shift.kernel(9)), np.asarray(companion.companion_kernel(9, a0, b0, c0, "sequential")), atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(shift(u)), np.asarray(_direct_conv(u, c0)), atol=2e-5)


@pytest.mark.parametrize("normalize_bck", [True, False])
@pytest.mark.parametrize("kind", st.SSM_KINDS)
def test_closed_loop_equals_explicit_rollout(kind, normalize_bck):
    rng = np.random.default_rng(4)
    d, n, t, horizon = 6, 4, 9, 7
    dec = st.ClosedLoopSSM(d, 3, n, kind=kind, norm_order=1, normalize_bck=normalize_bck, rngs=nnx.Rngs(5))
    u = jnp.asarray(rng.standard_normal((2, t, d)), jnp.float32)
    y, u_hat = dec(u, horizon)
    assert y.shape == u_hat.shape == (2, horizon, d)
    _, _, c, k = dec.abck()
    c, k = jnp.repeat(c, 2, axis=0), jnp.repeat(k, 2, axis=0)
    x = jnp.zeros((2, d, n))
    for s in range(t):  # encode the window
        x = dec.step(x, u[:, s])
    for h in range(horizon):  # feed the prediction back
        np.testing.assert_allclose(np.asarray(y[:, h]), np.asarray((x * c).sum(-1)), rtol=1e-4, atol=1e-4)
        nxt = (x * k).sum(-1)
        np.testing.assert_allclose(np.asarray(u_hat[:, h]), np.asarray(nxt), rtol=1e-4, atol=1e-4)
        x = dec.step(x, nxt)
    y_open, _ = dec.open_loop(u)  # first forecast = last open-loop output
    np.testing.assert_allclose(np.asarray(y[:, 0]), np.asarray(y_open[:, -1]), atol=2e-5)


def test_closed_loop_shift_decoder_is_the_optimal_ar_forecast():
    p, n, lag, horizon = 5, 8, 24, 12
    rng = np.random.default_rng(6)
    phi = ts.sample_ar_coefficients(p, rng)
    series = ts.simulate_arima(phi, lag, rng=rng)
    coef = np.zeros((1, n))
    coef[0, :p] = phi
    dec = st.ClosedLoopSSM(1, 1, n, kind="shift", norm_order=0, rngs=nnx.Rngs(0))
    _set(dec, c=coef, k=coef)
    y, _ = dec(jnp.asarray(series, jnp.float32)[None, :, None], horizon)
    want = ts.ar_forecast(phi, series, horizon)
    np.testing.assert_allclose(np.asarray(y[0, :, 0]), want, rtol=1e-4, atol=1e-4)


def test_companion_decoder_with_free_bck_is_the_optimal_forecast_of_a_high_gain_ar():
    """AR processes with roots near the unit circle have ||phi||_1 >> 1. With only a normalised
    (decoder_norm="a"), a = e_N, b = e_1, c = k = phi is the optimal forecast; with b, c, k also
    L1-normalised (the reference) the same parameters give k = phi / ||phi||_1, a different process."""
    p, n, lag, horizon = 6, 10, 32, 12
    rng = np.random.default_rng(11)
    phi = ts.sample_ar_coefficients(p, rng, min_radius=0.9, max_radius=0.99)
    assert np.abs(phi).sum() > 3.0
    series = ts.simulate_arima(phi, lag, rng=rng)
    coef = np.zeros((1, n))
    coef[0, :p] = phi
    e_n, e_1 = np.eye(n)[None, -1], np.eye(n)[None, 0]
    want = ts.ar_forecast(phi, series, horizon)
    u = jnp.asarray(series, jnp.float32)[None, :, None]
    free = st.ClosedLoopSSM(1, 1, n, norm_order=1, normalize_bck=False, rngs=nnx.Rngs(0))
    _set(free, a=e_n, b=e_1, c=coef, k=coef)
    y, u_hat = free(u, horizon)
    np.testing.assert_allclose(np.asarray(y[0, :, 0]), want, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(u_hat[0, :, 0]), want, rtol=1e-4, atol=1e-3)
    normed = st.ClosedLoopSSM(1, 1, n, norm_order=1, normalize_bck=True, rngs=nnx.Rngs(0))
    _set(normed, a=e_n, b=e_1, c=coef, k=coef)
    y_normed, _ = normed(u, horizon)
    assert np.abs(np.asarray(y_normed[0, :, 0]) - want).max() > 0.1 * np.abs(want).max()


def test_free_bck_decoder_starts_where_the_normalised_one_starts():
    u = jnp.asarray(np.random.default_rng(3).standard_normal((2, 12, 4)), jnp.float32)
    outs = [st.ClosedLoopSSM(4, 2, 5, normalize_bck=f, rngs=nnx.Rngs(7))(u, 6) for f in (True, False)]
    for x, y in zip(*outs):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
    model = _model(decoder_norm="a")
    assert not model.decoder.normalize_bck and _model().decoder.normalize_bck


# ---------------------------------------------------------------------------- preprocessing


def test_preprocessing_kernels_compute_differences_and_ma_residuals():
    rng = np.random.default_rng(7)
    t = 20
    u = rng.standard_normal(t)
    padded = np.concatenate([np.zeros(8), u])
    for order in range(4):
        k = st.differencing_kernel(order)
        y = _direct_conv(jnp.asarray(u, jnp.float32)[None, :, None], jnp.asarray(k)[None])[0, :, 0]
        want = np.diff(padded, n=order)[-t:]  # zero history before t = 0
        np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)
    w = 5
    k = st.moving_average_residual_kernel(w)
    y = st.fft_conv_btd(jnp.asarray(u, jnp.float32)[None, :, None], jnp.asarray(k)[None])[0, :, 0]
    want = u - np.array([padded[8 + s - w + 1 : 8 + s + 1].mean() for s in range(t)])
    np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)


def test_residual_preprocess_layout_applies_its_kernels():
    d, nk = 16, 8
    pre = st.PreprocessSSM("residual", d, nk, max_diff_order=4, min_window=3, max_window=9, rngs=nnx.Rngs(0))
    assert len(pre.windows) == (d // nk) * (nk - 4) and all(3 <= w < 9 for w in pre.windows)
    kern = np.asarray(pre.kernel())
    for ch in range(d):
        r, j = divmod(ch, nk)
        want = st.differencing_kernel(j) if j < 4 else st.moving_average_residual_kernel(pre.windows[r * 4 + j - 4])
        np.testing.assert_allclose(kern[ch, : len(want)], want)
        assert not kern[ch, len(want) :].any()
    u = jnp.asarray(np.random.default_rng(1).standard_normal((2, 10, d)), jnp.float32)
    np.testing.assert_allclose(np.asarray(pre(u)), np.asarray(_direct_conv(u, jnp.asarray(kern))), atol=2e-5)
    for kind in ("differencing", "ma_residual"):
        assert (
            st.PreprocessSSM(kind, d, nk, max_diff_order=4, min_window=3, max_window=9, rngs=nnx.Rngs(0))
            .kernel()
            .shape[0]
            == d
        )


# ---------------------------------------------------------------------------- the forecaster


def _model(**overrides):
    return registry.create_model("spacetime", "tiny", seed=0, **overrides)


@nnx.jit
def _run(model, x, y):
    (loss, metrics), grads = nnx.value_and_grad(lambda m: m.loss(x, y), has_aux=True)(model)
    return model.forward(x), model(x), loss, metrics, grads


def test_forecaster_shapes_loss_and_gradients():
    cfg = st.PRESETS["tiny"]
    rng = np.random.default_rng(8)
    for overrides in (
        {},
        {
            "n_channels": 3,
            "channel_independent": False,
            "encoder_ssm": "shift",
            "decoder_ssm": "shift",
            "n_encoder_blocks": 2,
            "preprocess": "none",
            "kernel_method": "squaring",
        },
    ):
        model = _model(**overrides)
        c = model.config.n_channels
        x = jnp.asarray(rng.standard_normal((2, cfg.lag, c)), jnp.float32)
        y = jnp.asarray(rng.standard_normal((2, cfg.horizon, c)), jnp.float32)
        out, forecast, loss, metrics, grads = _run(model, x, y)
        assert out.forecast.shape == (2, cfg.horizon, c) and out.lag_pred.shape == (2, cfg.lag, c)
        np.testing.assert_allclose(np.asarray(forecast), np.asarray(out.forecast), atol=1e-6)
        # the closed loop starts where the open loop ends
        np.testing.assert_allclose(np.asarray(out.forecast[:, 0]), np.asarray(out.lag_pred[:, -1]), atol=1e-4)
        assert np.isfinite(float(loss)) and set(metrics) == {"horizon", "lag", "next_input", "mse"}
        np.testing.assert_allclose(float(metrics["mse"]), float(jnp.mean((forecast - y) ** 2)), rtol=1e-5)
        leaves = jax.tree.leaves(nnx.state(grads))
        assert leaves and all(np.isfinite(np.asarray(g)).all() for g in leaves)
        assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)


def test_forecast_is_shift_equivariant_with_mean_transform():
    model = _model()
    x = jnp.asarray(np.random.default_rng(9).standard_normal((2, 32, 1)), jnp.float32)
    np.testing.assert_allclose(np.asarray(model(x + 5.0)), np.asarray(model(x)) + 5.0, atol=1e-4)


def test_channel_independent_model_treats_channels_alike():
    model = _model(n_channels=2)
    x1 = np.random.default_rng(10).standard_normal((1, 32, 1)).astype(np.float32)
    x2 = np.random.default_rng(11).standard_normal((1, 32, 1)).astype(np.float32)
    both = model(jnp.asarray(np.concatenate([x1, x2], axis=2)))
    single = _model()
    np.testing.assert_allclose(np.asarray(both[..., 1:]), np.asarray(single(jnp.asarray(x2))), atol=1e-5)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="lag"):
        st.SpaceTimeConfig(lag=8, kernel_dim=8)
    with pytest.raises(ValueError, match="kernel_method"):
        st.SpaceTimeConfig(kernel_method="cauchy")
    with pytest.raises(ValueError, match="first_block_kernels"):
        st.SpaceTimeConfig(first_block_kernels=5)
    with pytest.raises(ValueError, match="decoder_norm"):
        st.SpaceTimeConfig(decoder_norm="bk")
    with pytest.raises(ValueError, match="expects"):
        _model()(jnp.zeros((2, 31, 1)))


def test_dropout_is_active_only_in_train_mode():
    model = _model(dropout=0.5)
    x = jnp.asarray(np.random.default_rng(12).standard_normal((2, 32, 1)), jnp.float32)
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x)))
    model.train()
    assert not np.allclose(np.asarray(model(x)), np.asarray(model(x)))


# ---------------------------------------------------------------------------- data


@pytest.mark.parametrize("p", [1, 2, 7, 32])
def test_sampled_ar_processes_are_stable(p):
    phi = ts.sample_ar_coefficients(p, np.random.default_rng(p), max_radius=0.97)
    assert phi.shape == (p,) and np.abs(ts.ar_roots(phi)).max() < 0.97 + 1e-6
    y = ts.simulate_arima(phi, 4000, rng=np.random.default_rng(0))
    psi = ts.simulate_arima(phi, 20000, noise=np.eye(1, 20000)[0], burn_in=0)  # impulse response
    assert abs(psi[-100:]).max() < 1e-6 * abs(psi).max()  # decays: stable
    assert np.isfinite(y).all() and np.abs(y).max() < 8 * np.sqrt(np.sum(psi**2))


def test_simulate_arima_is_the_recursion():
    phi, theta = np.array([0.5, -0.3]), np.array([0.4])
    eps = np.random.default_rng(0).standard_normal(50)
    w = ts.simulate_arima(phi, 50, theta=theta, noise=eps, burn_in=0)
    ref = np.zeros(50)
    for t in range(50):
        ref[t] = (
            eps[t]
            + theta[0] * (eps[t - 1] if t else 0.0)
            + sum(phi[j] * ref[t - 1 - j] for j in range(2) if t - 1 - j >= 0)
        )
    np.testing.assert_allclose(w, ref, atol=1e-12)
    y = ts.simulate_arima(phi, 50, theta=theta, noise=eps, burn_in=0, d=1)
    np.testing.assert_allclose(np.diff(y), ref[1:], atol=1e-12)
    # noise-free continuation == the optimal forecast, for ARI(p, 1) too
    hist = ts.simulate_arima(phi, 30, noise=np.r_[eps[:20], np.zeros(10)], burn_in=0, d=1)
    np.testing.assert_allclose(ts.ar_forecast(phi, hist[:20], 10, d=1), hist[20:], atol=1e-10)


def test_ar_task_windows_and_oracle():
    task = ts.ARTask(p=4, lag=16, horizon=8, train_length=256, eval_length=64)
    w = task.windows("test")
    assert len(w) == 64 - 24 + 1
    item = w[3]
    arrays = w.arrays()
    np.testing.assert_array_equal(arrays["x"][3], item["x"])
    np.testing.assert_array_equal(arrays["y"][3, 0], task.series("test")[3 + 16])
    oracle = task.oracle("test")
    assert oracle["forecast"].shape == arrays["y"].shape
    assert abs(task.series("train").std() - 1.0) < 1e-5
    # the oracle beats forecasting the lag mean
    err = np.mean((oracle["forecast"] - oracle["y"]) ** 2)
    assert err < np.mean((oracle["x"].mean(1, keepdims=True) - oracle["y"]) ** 2)


def _write_ett_csv(path, hours, rng):
    start = np.datetime64("2016-07-01T00:00:00")
    data = np.cumsum(rng.standard_normal((hours, 3)), axis=0) + np.array([10.0, -5.0, 100.0])
    with open(path, "w") as f:
        f.write("date,HUFL,HULL,OT\n")
        for i in range(hours):
            stamp = str(start + np.timedelta64(i, "h")).replace("T", " ")
            f.write(stamp + "," + ",".join(f"{v:.6f}" for v in data[i]) + "\n")
    return data


def test_informer_csv_loader(tmp_path):
    path = tmp_path / "ETTh1.csv"
    hours = 20 * 30 * 24 + 100  # 20 months of hourly rows and a few more
    data = _write_ett_csv(path, hours, np.random.default_rng(0))
    lag = 48
    s = ts.load_informer_csv(str(path), lag=lag)
    n_tr, n_va = 12 * 720, 4 * 720
    assert s.columns == ("HUFL", "HULL", "OT")
    assert s.borders == ((0, n_tr), (n_tr - lag, n_tr + n_va), (n_tr + n_va - lag, n_tr + 2 * n_va))
    assert s.train.shape == (n_tr, 3) and s.val.shape == (n_va + lag, 3) and s.test.shape == (n_va + lag, 3)
    np.testing.assert_allclose(s.mean, data[:n_tr].mean(0), rtol=1e-5)  # fitted on train only
    np.testing.assert_allclose(s.train.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(s.train.std(0), 1.0, atol=1e-4)
    np.testing.assert_allclose(
        s.inverse_transform(s.test), data[n_tr + n_va - lag : n_tr + 2 * n_va], rtol=1e-4, atol=1e-3
    )
    w = ts.ForecastWindows(s.val, lag, 24)
    np.testing.assert_allclose(w[0]["y"][0], (data[n_tr] - s.mean) / s.std, rtol=1e-4, atol=1e-4)
    single = ts.load_informer_csv(str(path), lag=lag, features="S")
    assert single.columns == ("OT",) and single.train.shape == (n_tr, 1)
    assert np.datetime64("2016-07-01T01:00:00") == s.dates[1]
    with pytest.raises(ValueError, match="rows"):
        ts.load_informer_csv(str(path), lag=lag, months=(12, 4, 5))
    with pytest.raises(ValueError, match="target"):
        ts.load_informer_csv(str(path), lag=lag, features="S", target="nope")


@pytest.mark.parametrize("target", ["noisy", "optimal"])
def test_forecast_ar_script_runs_end_to_end(tmp_path, target):
    """scripts/forecast_ar.py (the README's SpaceTime vs S4D table) at toy size: both models train,
    and every metric the table reads is written."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    out = tmp_path / "far"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "scripts", "forecast_ar.py"),
        "--orders",
        "2",
        "--seeds",
        "0",
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--lag",
        "16",
        "--horizon",
        "4",
        "--train-length",
        "512",
        "--d-model",
        "8",
        "--kernel-dim",
        "8",
        "--s4d-d-model",
        "8",
        "--s4d-layers",
        "1",
        "--s4d-state",
        "8",
        "--target",
        target,
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["args"]["target"] == target
    for name in ("spacetime", "s4d"):
        r = results["results"]["2"]["0"][name]
        assert all(np.isfinite(r[k]) and r[k] > 0 for k in ("rmse", "oracle", "vs_oracle", "final_train_loss"))
        assert len(r["example"]["pred"]) == 4
    assert (out / "table.md").read_text().startswith("| p |") and (out / "ar_forecast.png").stat().st_size > 0
