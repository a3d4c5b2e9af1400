"""SpaceTime (Zhang et al., ICLR 2023): a forecaster built from discrete-time companion SSMs.

"Effectively Modeling Time Series with Simple Discrete State Spaces", arXiv 2303.09489.

SpaceTime is a *forecaster*, not a language model. Its API:

    model = SpaceTime(SpaceTimeConfig(lag=336, horizon=720, n_channels=7), rngs=nnx.Rngs(0))
    forecast = model(x)                    # x float [B, lag, C] -> forecast float [B, horizon, C]
    out = model.forward(x)                 # SpaceTimeOutput: forecast + what the loss needs
    loss, metrics = model.loss(x, y)       # y float [B, horizon, C]: the three-term loss (sec. 3.4)

`model.train()` / `model.eval()` switch dropout on and off (dropout draws from the "dropout" stream
of the `nnx.Rngs` given at construction).

Shapes: B batch, T time, D model width, C channels, N state size (`kernel_dim`), L kernel length,
K kernels (`n_kernels`; channel d uses kernel d // (D / K)), H horizon.

The discrete SSM (paper eq. 1), parameterised directly in discrete time:
    x_{t+1} = A x_t + b u_t,   y_t = c^T x_{t+1}   (+ skip * u_t)
so y = K * u is a causal convolution with the kernel K_l = c^T A^l b, l = 0..L-1 (eq. 2).
The companion matrix (eq. 3) is A = S + a e_N^T: S the down-shift (ones on the sub-diagonal) and the
learnable last column a, L1-normalised (a / ||a||_1) so that every eigenvalue has modulus <= 1.

K and the closed loop's structured products come from `pallas_kernels.companion` (the dense
Krylov oracle, repeated squaring, and the O((N + L) log(N + L)) power-series form of sec. 3.3).

Closed loop (sec. 3.2, the decoder): after encoding the lag window into the state x_lag, the layer
forecasts its own next input u_hat = k^T x and feeds it back, so x_{h+1} = (A + b k^T) x_h and
y_h = c^T (A + b k^T)^h x_lag, h = 0..H-1. Unlike the original code, a, b, c and k are normalised
the same way everywhere (the original encodes x_lag with the unnormalised b, predicts u_hat with the
unnormalised k, and its k-normalisation falls back to b when norm_order <= 0), so the closed loop
equals the explicit rollout of the open-loop layer exactly (tested). x_lag and the rows c^T (A+bk^T)^h
use the companion structure (A x = shift(x) + a x_N: O(N) per step, `companion.companion_powers`,
`companion.closed_loop_rows`) rather than the original's repeated squaring of N x N matrices (O(N^3 log L)).

Normalising b and k as well as a (the reference, `decoder_norm="abck"`) fixes ||b||_1 = ||k||_1 = 1, so
the feedback b k^T has induced 1-norm <= 1 and the closed-loop matrix A + b k^T cannot take the values
that realise a high-gain AR(p) directly (a = e_N, b = e_1, k = phi needs ||k||_1 = ||phi||_1, which is
about 12 to 320 for the near-unit-root processes of scripts/forecast_ar.py); measured, the decoder alone then
stays far from the optimal AR(4) forecast. `decoder_norm="a"` normalises only a (which bounds the
open-loop powers A^l over the lag window) and leaves b, c, k free, initialised at their normalised
values: then a = e_N, b = e_1, c = k = phi is the optimal AR(p) forecast for any phi (tested).

Preprocessing (sec. 3.1.2): fixed kernels for differencing (binomial coefficients of (1 - z)^j) and
moving-average residuals (u_t - mean(u_{t-w+1..t})). The original `MovingAvgResidualSSM` computes
the residual kernel but returns the plain base kernel; here every kernel is the one applied.

Model (the reference configs): embedding (repeat the univariate input D times, or a linear map for
mixed channels) -> encoder blocks [preprocess -> companion SSM (+skip) -> GELU-MLP (+residual),
+ block residual] -> closed-loop companion decoder -> output MLP (GELU, dropout, linear D -> 1).
Inputs are centred on their lag-window mean and the forecast is shifted back ("data_transform mean").
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels.companion.api import (
    KERNEL_METHODS,
    closed_loop_rows,
    companion_kernel,
    companion_matrix,
    companion_powers,
)
from zoo.layers import Linear, param
from zoo.layers import fft_conv as layers_fft_conv
from zoo.models import registry
from zoo.models.base import Forecaster

PREPROCESS_KINDS = ("none", "residual", "differencing", "ma_residual")
SSM_KINDS = ("companion", "shift")
LOSSES = ("mse", "rmse", "mae")


# --------------------------------------------------------------------------------------------------
# Convolution over time and normalisation (the companion kernel itself: pallas_kernels.companion)
# --------------------------------------------------------------------------------------------------


def fft_conv_btd(u: jax.Array, k: jax.Array) -> jax.Array:
    """Causal convolution y_t = sum_{l<=t} k_l u_{t-l} over time: u [B, T, D], k [D, L] -> [B, T, D] fp32."""
    return jnp.moveaxis(layers_fft_conv(jnp.moveaxis(u, 1, -1), k), -1, 1)


def normalize(x: jax.Array, order: int) -> jax.Array:
    """x / ||x||_order over the last axis (order <= 0: unchanged); rows with norm <= 1e-4 unchanged.

    The original skips the whole batch of rows when their mean norm is below 1e-4; per row is the
    same in every non-degenerate case and never divides a single row by ~0.
    """
    if order <= 0:
        return x
    norm = jnp.linalg.norm(x, ord=order, axis=-1, keepdims=True)
    ok = norm > 1e-4
    return jnp.where(ok, x / jnp.where(ok, norm, 1.0), x)


# --------------------------------------------------------------------------------------------------
# Fixed preprocessing kernels (paper sec. 3.1.2)
# --------------------------------------------------------------------------------------------------


def differencing_kernel(order: int) -> np.ndarray:
    """Coefficients of (1 - z)^order: conv with it is the order-th difference. [order + 1]."""
    return np.array([(-1) ** j * math.comb(order, j) for j in range(order + 1)], np.float32)


def moving_average_residual_kernel(window: int) -> np.ndarray:
    """Kernel of y_t = u_t - (1/w) sum_{i<w} u_{t-i} (zero history before t = 0). [window]."""
    kernel = np.full((window,), -1.0 / window, np.float32)
    kernel[0] += 1.0
    return kernel


def preprocess_kernels(
    kind: str, d_model: int, n_kernels: int, max_diff_order: int, windows: tuple[int, ...]
) -> np.ndarray:
    """The fixed kernel of every channel, [D, max(max_diff_order, max window)].

    Channel d uses kernel d % n_kernels of its repeat group r = d // n_kernels (the reference layout):
    - "differencing": difference order (d % n_kernels) % max_diff_order (0 = identity);
    - "ma_residual": moving-average residual with window windows[d];
    - "residual": orders 0..max_diff_order-1 first, then MA residuals with windows[r * n_ma + j].
    """
    width = max([max_diff_order] + list(windows))
    out = np.zeros((d_model, width), np.float32)
    n_ma = n_kernels - max_diff_order
    for d in range(d_model):
        r, j = divmod(d, n_kernels)
        if kind == "differencing" or (kind == "residual" and j < max_diff_order):
            k = differencing_kernel(j % max_diff_order)
        elif kind == "ma_residual":
            k = moving_average_residual_kernel(windows[d])
        elif kind == "residual":
            k = moving_average_residual_kernel(windows[r * n_ma + j - max_diff_order])
        else:
            raise ValueError(f"preprocess kind {kind!r} is not one of {PREPROCESS_KINDS[1:]}")
        out[d, : len(k)] = k
    return out


class PreprocessSSM(nnx.Module):
    """A non-trainable SSM whose kernels are fixed differencing / moving-average-residual filters.

    The moving-average windows are drawn once at construction, uniformly in [min_window, max_window),
    as in the reference; they are static (part of the graph), not parameters.
    """

    def __init__(
        self,
        kind: str,
        d_model: int,
        n_kernels: int,
        *,
        max_diff_order: int,
        min_window: int,
        max_window: int,
        rngs: nnx.Rngs,
    ):
        n_windows = {
            "differencing": 0,
            "ma_residual": d_model,
            "residual": (d_model // n_kernels) * (n_kernels - max_diff_order),
        }[kind]
        key = rngs.params()
        draws = jax.random.randint(key, (n_windows,), min_window, max_window) if n_windows else []
        self.windows = tuple(int(w) for w in np.asarray(draws))
        self.kind, self.d_model, self.n_kernels, self.max_diff_order = kind, d_model, n_kernels, max_diff_order

    def kernel(self) -> jax.Array:
        """[D, width] fixed kernels (a constant built from the static windows)."""
        return jnp.asarray(
            preprocess_kernels(self.kind, self.d_model, self.n_kernels, self.max_diff_order, self.windows)
        )

    def __call__(self, u: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D]
        return fft_conv_btd(u, self.kernel())


# --------------------------------------------------------------------------------------------------
# SSM layers
# --------------------------------------------------------------------------------------------------


def _ssm_param(rngs: nnx.Rngs, shape: tuple[int, ...]) -> nnx.Param:
    # the reference's kernel_init="normal": standard normal entries
    return param(rngs, nnx.initializers.normal(1.0), shape, (None, "state"))


class _CompanionLayer(nnx.Module):
    """What the open- and closed-loop layers share: K kernels of state size N, each with a, b, c [K, N].

    The two layers' __init__ signatures stay written out (they are the layers' public arguments);
    everything they build in common is `_init_abc`.
    """

    def _init_abc(self, d_model, n_kernels, kernel_dim, kind, norm_order, kernel_method, rngs):
        if d_model % n_kernels:
            raise ValueError(f"n_kernels ({n_kernels}) must divide d_model ({d_model})")
        self.kind, self.norm_order, self.kernel_method = kind, norm_order, kernel_method
        self.d_model, self.n_kernels, self.kernel_dim = d_model, n_kernels, kernel_dim
        shape = (n_kernels, kernel_dim)
        self.a = _ssm_param(rngs, shape) if kind == "companion" else None
        self.b = _ssm_param(rngs, shape) if kind == "companion" else None
        self.c = _ssm_param(rngs, shape)


class CompanionSSM(_CompanionLayer):
    """Open-loop companion SSM layer (kind="companion") or shift SSM (kind="shift": a = 0, b = e_1).

    K kernels of state size N shared by D / K consecutive channels; y = K * u (+ skip * u).
    """

    def __init__(
        self,
        d_model: int,
        n_kernels: int,
        kernel_dim: int,
        *,
        kind: str = "companion",
        norm_order: int = 1,
        skip: bool = True,
        kernel_method: str = "fft",
        rngs: nnx.Rngs,
    ):
        self._init_abc(d_model, n_kernels, kernel_dim, kind, norm_order, kernel_method, rngs)
        self.skip = param(rngs, nnx.initializers.normal(1.0), (d_model,), ("embed",)) if skip else None

    def abc(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(a, b, c) as used: a normalised; the shift SSM's fixed a = 0 and b = e_1. Each [K, N]."""
        shape = (self.n_kernels, self.kernel_dim)
        if self.kind == "shift":
            return jnp.zeros(shape), jnp.zeros(shape).at[:, 0].set(1.0), self.c[...]
        return normalize(self.a[...], self.norm_order), self.b[...], self.c[...]

    def kernel(self, length: int) -> jax.Array:
        """K_l = c^T A^l b per kernel, [K, L] (fp32)."""
        a, b, c = self.abc()
        if self.kind == "shift":  # S^l e_1 = e_{l+1}: K = c, zero-padded
            return c[:, :length] if length <= self.kernel_dim else jnp.pad(c, ((0, 0), (0, length - self.kernel_dim)))
        return companion_kernel(length, a, b, c, self.kernel_method)

    def __call__(self, u: jax.Array) -> jax.Array:  # [B, T, D] -> [B, T, D] fp32
        k = jnp.repeat(self.kernel(u.shape[1]), self.d_model // self.n_kernels, axis=0)  # [D, T]
        y = fft_conv_btd(u, k)
        if self.skip is not None:
            y = y + u.astype(jnp.float32) * self.skip[...]
        return y


class ClosedLoopSSM(_CompanionLayer):
    """The closed-loop companion (or shift) SSM decoder (paper sec. 3.2).

    Open loop over the lag window: y_t = c^T x_{t+1}, next-input prediction u_hat_{t+1} = k^T x_{t+1},
    x_{t+1} = sum_{i<=t} A^{t-i} b u_i. Closed loop over the horizon: x_{h+1} = (A + b k^T) x_h from
    x_0 = x_lag, y_h = c^T x_h and u_hat_h = k^T x_h. a is normalised (norm_order), and so are b, c, k
    unless normalize_bck=False (then they start at their normalised values and train freely).
    """

    def __init__(
        self,
        d_model: int,
        n_kernels: int,
        kernel_dim: int,
        *,
        kind: str = "companion",
        norm_order: int = 1,
        normalize_bck: bool = True,
        kernel_method: str = "fft",
        rngs: nnx.Rngs,
    ):
        self._init_abc(d_model, n_kernels, kernel_dim, kind, norm_order, kernel_method, rngs)
        self.normalize_bck = normalize_bck
        self.k = _ssm_param(rngs, (n_kernels, kernel_dim))
        if not normalize_bck and norm_order > 0:  # start where the normalised layer starts
            for v in (self.b, self.c, self.k):
                if v is not None:
                    v[...] = normalize(v[...], norm_order)

    def abck(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """(a, b, c, k) as used, each [K, N]: a normalised, and b, c, k too unless normalize_bck=False;
        shift: a = 0, b = e_1."""
        shape = (self.n_kernels, self.kernel_dim)
        o = self.norm_order
        bck = (lambda v: normalize(v, o)) if self.normalize_bck else (lambda v: v)
        if self.kind == "shift":
            a, b = jnp.zeros(shape), jnp.zeros(shape).at[:, 0].set(1.0)
        else:
            a, b = normalize(self.a[...], o), bck(self.b[...])
        return a, b, bck(self.c[...]), bck(self.k[...])

    def _per_channel(self, x: jax.Array) -> jax.Array:
        return jnp.repeat(x, self.d_model // self.n_kernels, axis=0)

    def state(self, u: jax.Array) -> jax.Array:
        """x_lag = sum_{i<T} A^{T-1-i} b u_i: the state after the input window. u [B,T,D] -> [B,D,N]."""
        a, b, _, _ = self.abck()
        powers = companion_powers(u.shape[1], a, b)  # [K, N, T]: A^l b
        powers = self._per_channel(powers)  # [D, N, T]
        return jnp.einsum("dnl,bld->bdn", powers, u[:, ::-1].astype(jnp.float32))

    def rollout(self, x: jax.Array, horizon: int) -> tuple[jax.Array, jax.Array]:
        """From the state x [B, D, N]: (y, u_hat) [B, H, D] with y_h = c^T (A + b k^T)^h x."""
        a, b, c, k = self.abck()
        rows = closed_loop_rows(
            horizon, a[:, None], b[:, None], k[:, None], jnp.stack([c, k], axis=1)
        )  # [K, 2, N, H]: r^T (A + b k^T)^h
        rows = self._per_channel(rows)  # [D, 2, N, H]
        out = jnp.einsum("dsnh,bdn->sbhd", rows, x)
        return out[0], out[1]

    def __call__(self, u: jax.Array, horizon: int) -> tuple[jax.Array, jax.Array]:
        """Closed-loop forecast: u [B, T, D] -> (y [B, H, D], u_hat [B, H, D])."""
        return self.rollout(self.state(u), horizon)

    def open_loop(self, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Open loop over the window: u [B, T, D] -> (y [B, T, D], u_hat_next [B, T, D])."""
        a, b, c, k = self.abck()
        t = u.shape[1]
        kernels = companion_kernel(
            t, a[:, None], b[:, None], jnp.stack([c, k], axis=1), self.kernel_method
        )  # [K, 2, T]
        kernels = self._per_channel(kernels)  # [D, 2, T]
        return fft_conv_btd(u, kernels[:, 0]), fft_conv_btd(u, kernels[:, 1])

    def step(self, x: jax.Array, u_t: jax.Array) -> jax.Array:
        """One open-loop recurrence step x <- A x + b u_t. x [B, D, N], u_t [B, D]."""
        a, b, _, _ = self.abck()
        A = self._per_channel(companion_matrix(a))  # [D, N, N]
        return jnp.einsum("dij,bdj->bdi", A, x) + self._per_channel(b) * u_t[..., None]


# --------------------------------------------------------------------------------------------------
# The SpaceTime forecaster
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpaceTimeConfig:
    """SpaceTime's forecaster: window, horizon, encoder and decoder layers (see the field comments)."""

    lag: int = 32  # input window length (lag terms)
    horizon: int = 16  # forecast length
    n_channels: int = 1  # C in x [B, lag, C]
    channel_independent: bool = True  # share one univariate model over channels (repeat embedding)
    d_model: int = 16  # D
    kernel_dim: int = 8  # N, the state size of every SSM
    n_encoder_blocks: int = 1
    first_block_kernels: int = 4  # kernels in encoder block 1 (later blocks and decoder: D)
    encoder_ssm: str = "companion"  # companion | shift
    decoder_ssm: str = "companion"  # companion | shift
    preprocess: str = "residual"  # first block's fixed SSM: none | residual | differencing | ma_residual
    preprocess_kernels: int = 8  # distinct preprocessing kernels per repeat group
    max_diff_order: int = 4
    min_avg_window: int = 4
    max_avg_window: int = 16
    norm_order: int = 1  # L1-normalise a (and b, c, k in the decoder if abck); 0 = off
    decoder_norm: str = "abck"  # decoder vectors normalised: abck (reference) | a (b, c, k free)
    kernel_method: str = "fft"  # fft | squaring | sequential
    dropout: float = 0.0
    input_transform: str = "mean"  # mean (subtract the lag-window mean) | none
    loss: str = "rmse"  # per-term criterion: mse | rmse | mae
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # horizon, lag (open loop), next input
    dtype: str = "float32"  # compute dtype of the MLPs; kernels and FFTs run in fp32

    def __post_init__(self):
        def bad(name, value, fix):
            raise ValueError(f"SpaceTimeConfig.{name}={value!r} is invalid: {fix}")

        if self.lag <= self.kernel_dim:
            bad("lag", self.lag, f"the lag-term loss needs lag > kernel_dim ({self.kernel_dim})")
        if self.horizon < 1:
            bad("horizon", self.horizon, "use horizon >= 1")
        if self.d_model % self.first_block_kernels:
            bad("first_block_kernels", self.first_block_kernels, f"it must divide d_model ({self.d_model})")
        for name, kinds in (
            ("encoder_ssm", SSM_KINDS),
            ("decoder_ssm", SSM_KINDS),
            ("preprocess", PREPROCESS_KINDS),
            ("kernel_method", KERNEL_METHODS),
            ("loss", LOSSES),
            ("input_transform", ("mean", "none")),
            ("decoder_norm", ("abck", "a")),
        ):
            if getattr(self, name) not in kinds:
                bad(name, getattr(self, name), f"choose one of {kinds}")
        if self.preprocess != "none":
            if self.d_model % self.preprocess_kernels:
                bad("preprocess_kernels", self.preprocess_kernels, f"it must divide d_model ({self.d_model})")
            if self.preprocess == "residual" and self.preprocess_kernels <= self.max_diff_order:
                bad(
                    "preprocess_kernels",
                    self.preprocess_kernels,
                    f"'residual' needs more than max_diff_order ({self.max_diff_order}) kernels",
                )
            if not 1 <= self.min_avg_window < self.max_avg_window:
                bad("min_avg_window", self.min_avg_window, f"need 1 <= min < max_avg_window ({self.max_avg_window})")
        if self.n_encoder_blocks < 1:
            bad("n_encoder_blocks", self.n_encoder_blocks, "use at least 1 (block 1 holds the preprocessing)")
        if len(self.loss_weights) != 3:
            bad("loss_weights", self.loss_weights, "give three weights (horizon, lag, next input)")

    @property
    def in_dim(self) -> int:
        return 1 if self.channel_independent else self.n_channels


PRESETS = {
    # CPU tests: 913 parameters.
    "tiny": SpaceTimeConfig(),
    # The ETT command of the reference README (lag 336, horizon 720, n_blocks 1 = one encoder block
    # + the decoder, kernel_dim 64, width 128 from 4 heads x 32 kernels, dropout 0.25).
    "ett": SpaceTimeConfig(
        lag=336,
        horizon=720,
        d_model=128,
        kernel_dim=64,
        n_encoder_blocks=1,
        first_block_kernels=16,
        preprocess_kernels=8,
        max_avg_window=64,
        dropout=0.25,
    ),
    # configs/model/encoder/default.yaml: two encoder blocks (preprocessing + companion, companion).
    "default": SpaceTimeConfig(
        lag=336,
        horizon=720,
        d_model=128,
        kernel_dim=64,
        n_encoder_blocks=2,
        first_block_kernels=16,
        preprocess_kernels=8,
        max_avg_window=64,
        dropout=0.2,
    ),
}


class MLP(nnx.Module):
    """The reference MLP: pre-activation GELU, dropout, linear (+ input when residual)."""

    def __init__(self, d_in: int, d_out: int, *, residual: bool, dropout: float, axes, rngs: nnx.Rngs, dtype: str):
        self.linear = Linear(d_in, d_out, axes=axes, rngs=rngs, use_bias=True, dtype=dtype)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.residual = residual

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.linear(self.dropout(jax.nn.gelu(x, approximate=False))).astype(jnp.float32)
        return y + x if self.residual else y


class EncoderBlock(nnx.Module):
    """z = pre(u); y = MLP(SSM(z)) (+ z inside the MLP); output y + z (block 1) or y + u."""

    def __init__(self, cfg: SpaceTimeConfig, index: int, *, rngs: nnx.Rngs):
        first = index == 0
        self.pre = (
            PreprocessSSM(
                cfg.preprocess,
                cfg.d_model,
                cfg.preprocess_kernels,
                max_diff_order=cfg.max_diff_order,
                min_window=cfg.min_avg_window,
                max_window=cfg.max_avg_window,
                rngs=rngs,
            )
            if first and cfg.preprocess != "none"
            else None
        )
        self.ssm = CompanionSSM(
            cfg.d_model,
            cfg.first_block_kernels if first else cfg.d_model,
            cfg.kernel_dim,
            kind=cfg.encoder_ssm,
            norm_order=cfg.norm_order,
            skip=True,
            kernel_method=cfg.kernel_method,
            rngs=rngs,
        )
        self.mlp = MLP(
            cfg.d_model,
            cfg.d_model,
            residual=True,
            dropout=cfg.dropout,
            axes=("embed", "mlp"),
            rngs=rngs,
            dtype=cfg.dtype,
        )

    def __call__(self, u: jax.Array) -> jax.Array:  # [B, T, D] fp32
        z = u if self.pre is None else self.pre(u)
        return self.mlp(self.ssm(z)) + z


class SpaceTimeOutput(NamedTuple):
    """What the forecaster returns: the forecast and the open-loop predictions the loss uses."""

    forecast: jax.Array  # [B, H, C] closed-loop forecast (input scale)
    lag_pred: jax.Array  # [B, lag, C] open-loop one-step-ahead predictions of x[t+1]
    next_input_pred: jax.Array  # [B*, lag, D] decoder's predictions k^T x_{t+1} of its next input
    next_input: jax.Array  # [B*, lag, D] the decoder's actual inputs (B* = B*C if channel-independent)


@registry.register("spacetime", PRESETS)
class SpaceTime(Forecaster):
    """The SpaceTime forecaster: `model(x)` x [B, lag, C] -> forecast [B, horizon, C].

    A `Forecaster`, not a language model: no `vocab_size`, no token decode step; its recurrent
    (decode) form is the closed-loop decoder, tested equal to an explicit rollout.
    """

    paper = "SpaceTime (Zhang et al., ICLR 2023), a forecaster"
    numerical_core = "`pallas_kernels/companion` (FFT power series)"

    def __init__(self, cfg: SpaceTimeConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        d = cfg.d_model
        self.embed = (
            None
            if cfg.channel_independent
            else Linear(cfg.n_channels, d, axes=(None, "embed"), rngs=rngs, use_bias=True, dtype=cfg.dtype)
        )
        self.encoder = nnx.List([EncoderBlock(cfg, i, rngs=rngs) for i in range(cfg.n_encoder_blocks)])
        self.decoder = ClosedLoopSSM(
            d,
            d,
            cfg.kernel_dim,
            kind=cfg.decoder_ssm,
            norm_order=cfg.norm_order,
            normalize_bck=cfg.decoder_norm == "abck",
            kernel_method=cfg.kernel_method,
            rngs=rngs,
        )
        self.output = MLP(
            d, cfg.in_dim, residual=False, dropout=cfg.dropout, axes=("embed", None), rngs=rngs, dtype=cfg.dtype
        )

    def _check(self, x: jax.Array) -> None:
        cfg = self.config
        if x.ndim != 3 or x.shape[1] != cfg.lag or x.shape[2] != cfg.n_channels:
            raise ValueError(
                f"x has shape {x.shape}; SpaceTime expects [B, lag={cfg.lag}, "
                f"C={cfg.n_channels}] (set lag/n_channels in the config to match)"
            )

    def _encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Centre, embed, encode. x [B, lag, C] -> (decoder input z [B*, lag, D], offset [B, 1, C])."""
        cfg = self.config
        x = x.astype(jnp.float32)
        offset = x.mean(axis=1, keepdims=True) if cfg.input_transform == "mean" else jnp.zeros_like(x[:, :1])
        u = x - offset
        if cfg.channel_independent:  # [B, T, C] -> [B*C, T, D]
            u = jnp.moveaxis(u, 2, 1).reshape(-1, cfg.lag, 1)
            z = jnp.broadcast_to(u, u.shape[:2] + (cfg.d_model,))
        else:
            z = self.embed(u).astype(jnp.float32)
        for block in self.encoder:
            z = block(z)
        return z, offset

    def _readout(self, y: jax.Array, offset: jax.Array, batch: int) -> jax.Array:
        """Output MLP and un-centring: y [B*, T, D] -> [B, T, C]."""
        cfg = self.config
        out = self.output(y)  # [B*, T, in_dim]
        if cfg.channel_independent:
            out = jnp.moveaxis(out[..., 0].reshape(batch, cfg.n_channels, -1), 1, 2)
        return out + offset

    def __call__(self, x: jax.Array) -> jax.Array:
        """x float [B, lag, C] -> closed-loop forecast float32 [B, horizon, C]."""
        self._check(x)
        z, offset = self._encode(x)
        y, _ = self.decoder(z, self.config.horizon)
        return self._readout(y, offset, x.shape[0])

    def forward(self, x: jax.Array) -> SpaceTimeOutput:
        """Closed- and open-loop outputs: everything the three-term loss needs."""
        self._check(x)
        z, offset = self._encode(x)
        y_closed, _ = self.decoder(z, self.config.horizon)
        y_open, z_pred = self.decoder.open_loop(z)
        return SpaceTimeOutput(
            self._readout(y_closed, offset, x.shape[0]), self._readout(y_open, offset, x.shape[0]), z_pred, z
        )

    def loss(self, x: jax.Array, y: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The training loss w0 L(forecast, y) + w1 L(lag preds, x[t+1]) + w2 L(u_hat, next input).

        x [B, lag, C], y [B, horizon, C]. The first kernel_dim - 1 open-loop steps are warm-up and
        not supervised, as in the reference. Returns (loss, {"horizon", "lag", "next_input", "mse"}).
        """
        cfg = self.config
        if y.shape != (x.shape[0], cfg.horizon, cfg.n_channels):
            raise ValueError(
                f"y has shape {y.shape}; expected [B={x.shape[0]}, horizon={cfg.horizon}, C={cfg.n_channels}]"
            )
        out = self.forward(x)
        n = cfg.kernel_dim
        full = jnp.concatenate([x, y], axis=1).astype(jnp.float32)  # [B, lag + H, C]
        l_h = criterion(cfg.loss, out.forecast, y.astype(jnp.float32))
        l_lag = criterion(cfg.loss, out.lag_pred[:, n - 1 :], full[:, n : cfg.lag + 1])
        l_next = criterion(cfg.loss, out.next_input_pred[:, n - 1 : -1], out.next_input[:, n:])
        w0, w1, w2 = cfg.loss_weights
        total = w0 * l_h + w1 * l_lag + w2 * l_next
        mse = jnp.mean(jnp.square(out.forecast - y))
        return total, {"horizon": l_h, "lag": l_lag, "next_input": l_next, "mse": mse}


def criterion(kind: str, pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean over everything: "mse", "rmse" (sqrt of the mean, the reference's informer_rmse), "mae"."""
    err = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if kind == "mse":
        return jnp.mean(jnp.square(err))
    if kind == "rmse":
        return jnp.sqrt(jnp.mean(jnp.square(err)))
    if kind == "mae":
        return jnp.mean(jnp.abs(err))
    raise ValueError(f"loss {kind!r} is not one of {LOSSES}")
