"""S4 (DPLR, HiPPO-LegS) and S4D (diagonal) state-space layers, a sequence classifier and a causal LM.

Papers: Gu, Goel, Re 2022, "Efficiently Modeling Long Sequences with Structured State Spaces" (S4);
Gu, Gupta, Goel, Re 2022, "On the Parameterization and Initialization of Diagonal State Space
Models" (S4D). Per channel h the continuous SSM is x' = A x + B u, y = C x + D u (S4 Eq. 1).

S4 (mode="dplr"): A = Lambda - P P^* in the HiPPO-LegS eigenbasis (NPLR, Thm. 1; Lambda has real part
-1/2), bilinear discretisation (Eq. 3), kernel from the truncated generating function at the roots of
unity (Lemma C.3) with the Woodbury identity (Lemma C.2) and Cauchy products, then an inverse FFT
(Alg. 1). As upstream, the stored C parameter is C~ = C (I - dA^L) for L = cfg.l_max.
S4D (mode="diag"): diagonal A with the Lin / Inv / Real / LegS initialisations, ZOH or bilinear,
kernel K_l = 2 Re sum_n C_n dB_n dA_n^l as a log-Vandermonde product (S4D Eq. 6).

Conjugate symmetry: d_state = N stands for N/2 stored complex modes plus their conjugates.
Layer (as the original S4 block): y = FFTConv(u, K) + D u -> GELU -> Linear(H, 2H) -> GLU.
Shapes: B batch, T time, H = d_model channels, N2 = d_state/2 stored modes, N = d_state, C kernel
channels (2 when bidirectional).
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import dispatch
from pallas_kernels.cauchy import cauchy, vandermonde
from zoo.layers import Embed, Linear, RMSNorm, fft_conv, lm_logits
from zoo.models import registry
from zoo.models.base import (
    Block,
    Classifier,
    Context,
    LanguageModel,
    LMConfig,
    check_tokens,
    make_context,
    make_stack,
    scan_over_time,
)

MODES = ("dplr", "diag")
INITS = {"dplr": ("legs",), "diag": ("lin", "inv", "real", "legs")}
DISCS = ("zoh", "bilinear")


@dataclasses.dataclass(frozen=True)
class S4Config(LMConfig):
    """S4 / S4D's architecture (see the field comments)."""

    d_model: int = 64
    d_state: int = 64  # N: N/2 complex modes are stored (conjugate-symmetric)
    mode: str = "dplr"  # dplr (S4, HiPPO-LegS NPLR) | diag (S4D)
    init: str = "legs"  # dplr: legs; diag: lin | inv | real | legs
    disc: str = "bilinear"  # diag: zoh | bilinear; dplr is always bilinear
    n_ssm: int = 1  # independent (A, B, P) copies shared across H/n_ssm channels
    l_max: int = 256  # kernel length that C~ = C (I - dA^L) refers to (dplr)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    b_clip: float = 2.0  # dplr: clip Im(V^* B) to [-b_clip, b_clip] as upstream (0 = off)
    bidirectional: bool = False  # classifier only: a second kernel channel runs backwards in time
    n_classes: int = 10  # classifier head size
    norm_eps: float = 1e-6

    def __post_init__(self):
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} must be one of {MODES}")
        if self.init not in INITS[self.mode]:
            raise ValueError(
                f"init={self.init!r} is not valid for mode={self.mode!r}; use one of "
                f"{INITS[self.mode]} (S4D inits need mode='diag')"
            )
        if self.disc not in DISCS:
            raise ValueError(f"disc={self.disc!r} must be one of {DISCS}")
        if self.d_state < 2 or self.d_state % 2:
            raise ValueError(f"d_state={self.d_state} must be even and >= 2 (N/2 conjugate pairs)")
        if self.n_ssm < 1 or self.d_model % self.n_ssm:
            raise ValueError(f"n_ssm={self.n_ssm} must divide d_model={self.d_model}")
        if self.l_max < 1:
            raise ValueError(f"l_max={self.l_max} must be >= 1")
        if not 0 < self.dt_min <= self.dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max; got {self.dt_min}, {self.dt_max}")


PRESETS = {
    # 35,616 parameters: S4 (DPLR) LM for CPU tests.
    "tiny": S4Config(d_model=64, n_layers=2, d_state=16, l_max=256),
    "tiny-s4d": S4Config(d_model=64, n_layers=2, d_state=16, mode="diag", init="lin", disc="zoh"),
}

CLASSIFIER_PRESETS = {
    # A small bidirectional classifier for CPU tests.
    "tiny": S4Config(vocab_size=20, d_model=32, n_layers=2, d_state=8, l_max=256, bidirectional=True, n_classes=10),
    # LRA ListOps as upstream's experiment config: 6 x 256, d_state 4, bidirectional, L = 2048.
    "lra-listops": S4Config(
        vocab_size=20, d_model=256, n_layers=6, d_state=4, l_max=2048, bidirectional=True, n_classes=10
    ),
    # S4D sequential-CIFAR example: 4 x 128, N = 64, S4D-Lin ZOH, L = 1024 pixels.
    "s4d-scifar": S4Config(
        vocab_size=256,
        d_model=128,
        n_layers=4,
        d_state=64,
        mode="diag",
        init="lin",
        disc="zoh",
        l_max=1024,
        bidirectional=False,
        n_classes=10,
    ),
}


# --------------------------------------------------------------------------------------------------
# Initialisation (float64 NumPy)
# --------------------------------------------------------------------------------------------------


def hippo_legs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO-LegS (A [N,N], B [N]) in float64 (S4 Eq. 2): A_nk = -sqrt(2n+1)sqrt(2k+1) for n>k,
    -(n+1) for n=k, 0 for n<k; B_n = sqrt(2n+1)."""
    q = np.sqrt(2.0 * np.arange(n) + 1.0)
    a = -np.tril(np.outer(q, q), -1) - np.diag(np.arange(n) + 1.0)
    return a, q.copy()


@lru_cache(maxsize=32)
def nplr_legs(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """NPLR form of HiPPO-LegS (S4 Thm. 1 / Cor. 1), computed in float64.

    A + P P^T = -1/2 I + S with S skew-symmetric (P_n = sqrt(n + 1/2)), so A = V (W - V^*P (V^*P)^*) V^*
    with W = -1/2 + i eig(S). Keeps the N/2 modes with negative imaginary part (their conjugates are
    implied).

    Returns:
      (W [N/2], Pt = V^* P [N/2], Bt = V^* B [N/2], V [N, N/2]), complex128.
    """
    a, b = hippo_legs(n)
    p = np.sqrt(np.arange(n) + 0.5)
    s = a + np.outer(p, p) + 0.5 * np.eye(n)  # skew-symmetric part
    mu, v = np.linalg.eigh(-1j * s)  # S = V diag(i mu) V^*
    keep = np.argsort(mu)[: n // 2]  # the modes with Im(W) < 0
    w = -0.5 + 1j * mu[keep]
    v = v[:, keep]
    return w, v.conj().T @ p, v.conj().T @ b, v


def init_diag(n: int, init: str) -> tuple[np.ndarray, np.ndarray]:
    """S4D initialisations (S4D Sec. 4): (A [N/2], B [N/2]) complex128, n = 0..N/2-1."""
    k = np.arange(n // 2)
    b = np.ones(n // 2, np.complex128)
    if init == "lin":  # S4D-Lin: A_n = -1/2 + i pi n
        return -0.5 + 1j * np.pi * k, b
    if init == "inv":  # S4D-Inv: A_n = -1/2 + i (N/pi)(N/(2n+1) - 1)
        return -0.5 + 1j * (n / np.pi) * (n / (2 * k + 1) - 1), b
    if init == "real":  # S4D-Real: A_n = -(n+1)
        return -(k + 1.0) + 0j, b
    w, _, bt, _ = nplr_legs(n)  # S4D-LegS: the diagonal part of the NPLR form
    return w, bt


def _complex_param(x: np.ndarray) -> jax.Array:
    """complex -> float32 [..., 2] (real, imag)."""
    return jnp.asarray(np.stack([x.real, x.imag], -1), jnp.float32)


def _as_complex(p: jax.Array) -> jax.Array:
    return jax.lax.complex(p[..., 0], p[..., 1])


def _matrix_power(m: jax.Array, e: int) -> jax.Array:
    """m^e for a static int e >= 0 by repeated squaring; m [..., N, N]."""
    result = jnp.broadcast_to(jnp.eye(m.shape[-1], dtype=m.dtype), m.shape)
    while e:
        if e & 1:
            result = result @ m
        e >>= 1
        if e:
            m = m @ m
    return result


def _solve(a: jax.Array, b: jax.Array) -> jax.Array:
    """x = a^{-1} b for a [..., N, N], b [..., N, K] by Gauss-Jordan elimination with partial pivoting.

    Not jnp.linalg.solve: XLA's CPU runtime runs a batched LAPACK getrf on its Eigen thread pool
    and, with several such calls in one program on a 2-core machine, can wait on itself forever
    (docs/platform.md). N is the state size (<= a few hundred), so N steps of rank-1 updates are cheap.
    """
    n = a.shape[-1]
    rows = jnp.arange(n)
    ab = jnp.concatenate([a, b], -1)  # [..., N, N+K]

    def step(k, ab):
        col = jnp.where(rows >= k, jnp.abs(ab[..., :, k]), -1.0)  # candidates at or below row k
        piv = jnp.argmax(col, -1)[..., None]  # [..., 1]
        swap = jnp.where(rows == k, piv, jnp.where(rows == piv, k, rows))  # [..., N]
        ab = jnp.take_along_axis(ab, swap[..., None], axis=-2)
        pivot_row = ab[..., k, :]  # [..., N+K]
        factor = jnp.where(rows == k, 0, ab[..., :, k] / pivot_row[..., k, None])  # [..., N]
        return ab - factor[..., None] * pivot_row[..., None, :]

    ab = jax.lax.fori_loop(0, n, step, ab)
    return ab[..., n:] / jnp.diagonal(ab[..., :n], axis1=-2, axis2=-1)[..., None]


# --------------------------------------------------------------------------------------------------
# The SSM kernel
# --------------------------------------------------------------------------------------------------


class SSMKernel(nnx.Module):
    """Per-channel SSM parameters and their convolution kernel / recurrent step.

    Parameters (fp32; complex numbers as [..., 2] real/imag pairs). A, B, P and dt carry
    `lr_group="ssm"` and `wd=False` (the SSM learning rate without weight decay, as the papers train).
    """

    def __init__(self, cfg: S4Config, channels: int, *, rngs: nnx.Rngs):
        self.cfg, self.channels = cfg, channels
        h, n, n2 = cfg.d_model, cfg.d_state, cfg.d_state // 2
        ssm = dict(wd=False, lr_group="ssm")
        # dt log-uniform in [dt_min, dt_max], one per channel
        u = jax.random.uniform(rngs.params(), (h,), jnp.float32)
        self.log_dt = nnx.Param(
            math.log(cfg.dt_min) + u * (math.log(cfg.dt_max) - math.log(cfg.dt_min)), axes=("embed",), **ssm
        )
        if cfg.mode == "dplr":
            w, pt, bt, _ = nplr_legs(n)
            if cfg.b_clip:
                bt = bt.real + 1j * np.clip(bt.imag, -cfg.b_clip, cfg.b_clip)
            self.P = nnx.Param(jnp.tile(_complex_param(pt)[None], (cfg.n_ssm, 1, 1)), axes=(None, "state", None), **ssm)
        else:
            w, bt = init_diag(n, cfg.init)
            self.P = None
        tile = lambda x: jnp.tile(jnp.asarray(x, jnp.float32)[None], (cfg.n_ssm, 1))
        # Re(A) = -exp(log_a_real) keeps the real part negative; Im(A) is free
        self.log_a_real = nnx.Param(tile(np.log(-w.real)), axes=(None, "state"), **ssm)
        self.a_imag = nnx.Param(tile(w.imag), axes=(None, "state"), **ssm)
        self.B = nnx.Param(jnp.tile(_complex_param(bt)[None], (cfg.n_ssm, 1, 1)), axes=(None, "state", None), **ssm)
        # C (C~ for dplr) ~ complex normal with unit variance
        self.C = nnx.Param(
            jax.random.normal(rngs.params(), (channels, h, n2, 2), jnp.float32) * 0.5**0.5,
            axes=(None, "embed", "state", None),
        )

    def _op_kwargs(self) -> dict:
        """The Cauchy / Vandermonde op's implementation for this config."""
        impl = dispatch.resolve(self.cfg.implementation)
        return {"implementation": impl, "interpret": dispatch.resolve_interpret(impl)}

    # -- parameters in complex form, expanded to the H channels ---------------------------------
    def _expand(self, x: jax.Array) -> jax.Array:  # [n_ssm, ...] -> [H, ...]
        return jnp.repeat(x, self.cfg.d_model // self.cfg.n_ssm, axis=0)

    def ssm_params(self) -> dict:
        """dt [H], A [H,N2], B [H,N2], P [H,N2] (dplr), C [C,H,N2] as float32 / complex64."""
        a = jax.lax.complex(-jnp.exp(self.log_a_real[...]), self.a_imag[...])
        out = {
            "dt": jnp.exp(self.log_dt[...]),
            "A": self._expand(a),
            "B": self._expand(_as_complex(self.B[...])),
            "C": _as_complex(self.C[...]),
        }
        if self.P is not None:
            out["P"] = self._expand(_as_complex(self.P[...]))
        return out

    # -- S4 (DPLR) --------------------------------------------------------------------------------
    def dense_discrete(self, prm: dict) -> tuple[jax.Array, jax.Array]:
        """Bilinear dA [H,N,N], dB [H,N] of the full (conjugate-completed) DPLR system (S4 Eq. 3).

        Full basis: A = diag(Lambda, conj Lambda) - p p^*, p = [P; conj P]. The backward step
        (I - dt/2 A)^{-1} = (D + dt/2 p p^*)^{-1}, D = I - dt/2 diag(lam), is exact by Sherman-Morrison:
        D^{-1} - (D^{-1} dt/2 p)(p^* D^{-1}) / (1 + dt/2 p^* D^{-1} p)  (S4 App. C.2).
        """
        lam = jnp.concatenate([prm["A"], jnp.conj(prm["A"])], -1)  # [H,N]
        p = jnp.concatenate([prm["P"], jnp.conj(prm["P"])], -1)  # [H,N]
        b = jnp.concatenate([prm["B"], jnp.conj(prm["B"])], -1)  # [H,N]
        a = jax.vmap(jnp.diag)(lam) - p[:, :, None] * jnp.conj(p)[:, None, :]  # [H,N,N]
        half = (prm["dt"] / 2).astype(jnp.complex64)[:, None]  # [H,1]
        eye = jnp.eye(a.shape[-1], dtype=jnp.complex64)
        d_inv = 1 / (1 - half * lam)  # D^{-1} [H,N]
        u = d_inv * half * p  # D^{-1} dt/2 p
        w = jnp.conj(p) * d_inv  # p^* D^{-1}
        denom = 1 + jnp.sum(w * half * p, -1)  # [H]

        def back_solve(rhs):  # (I - dt/2 A)^{-1} rhs, rhs [H,N,K]
            proj = jnp.einsum("hn,hnk->hk", w, rhs) / denom[:, None]  # [H,K]
            return d_inv[..., None] * rhs - u[..., None] * proj[:, None, :]

        d_a = back_solve(eye + half[..., None] * a)  # [H,N,N]
        d_b = back_solve((prm["dt"][:, None] * b)[..., None])[..., 0]  # [H,N]
        return d_a, d_b

    def _dplr_c_tilde(self, prm: dict, length: int) -> tuple[jax.Array, int]:
        """C~ for a kernel of length >= length: doubles from l_max with C~ <- C~ (I + dA^L)."""
        c_t, cur = prm["C"], self.cfg.l_max  # [C,H,N2]
        if length <= cur:
            return c_t, cur
        d_a, _ = self.dense_discrete(prm)
        n2 = c_t.shape[-1]
        while cur < length:
            full = jnp.concatenate([c_t, jnp.conj(c_t)], -1)  # [C,H,N]
            full = full + jnp.einsum("chn,hnm->chm", full, _matrix_power(d_a, cur))
            c_t, cur = full[..., :n2], 2 * cur
        return c_t, cur

    def _dplr_kernel(self, prm: dict, length: int) -> jax.Array:
        """S4 kernel [C,H,L'] (L' >= length) from Cauchy products at the roots of unity (Lemma C.3)."""
        c_t, l_k = self._dplr_c_tilde(prm, length)
        dt = prm["dt"]  # [H]
        b, p = prm["B"], prm["P"]  # [H,N2]
        # nodes z_k = 2(1 - w_k)/(1 + w_k), w_k = exp(-2 pi i k / L'), k = 0..L'/2 (float64 on host);
        # the Nyquist node (w = -1, z = inf) of an even L' is taken by its limit below
        n_nodes = l_k // 2 + 1
        n_fin = n_nodes - 1 if l_k % 2 == 0 else n_nodes
        omega = np.exp(-2j * np.pi * np.arange(n_fin) / l_k)
        z = jnp.asarray(2 * (1 - omega) / (1 + omega), jnp.complex64)  # [K]
        w = dt[:, None] * prm["A"]  # poles dt*Lambda [H,N2]
        n_c = c_t.shape[0]
        # Cauchy weights for the four Woodbury blocks: C~B, C~P, P^*B, P^*P, scaled by dt
        v = jnp.concatenate([c_t * b, c_t * p, (jnp.conj(p) * b)[None], (jnp.conj(p) * p)[None]], 0)
        v = v * dt[:, None]  # [2C+2,H,N2]
        r = cauchy(v, z, w, conj=True, **self._op_kwargs())  # [2C+2,H,K]
        r00, r01, r10, r11 = r[:n_c], r[n_c : 2 * n_c], r[2 * n_c], r[2 * n_c + 1]
        # Woodbury (rank 1): k = r00 - r01 r10 / (1 + r11); bilinear factor 2/(1 + w)
        k_f = (r00 - r01 * r10 / (1 + r11)) * jnp.asarray(2 / (1 + omega), jnp.complex64)  # [C,H,K]
        if n_fin < n_nodes:
            # w = -1: 2/(1+w) r00 -> dt Re(sum_n C~_n B_n); the low-rank term vanishes like 1/z
            nyq = dt * jnp.sum(c_t * b, -1).real  # [C,H]
            k_f = jnp.concatenate([k_f, nyq[..., None].astype(jnp.complex64)], -1)
        return jnp.fft.irfft(k_f, n=l_k)  # [C,H,L']

    # -- S4D (diagonal) ---------------------------------------------------------------------------
    def _diag_discrete(self, prm: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(dA, dB, log dA) [H,N2] for ZOH or bilinear (S4D Sec. 3.1)."""
        dt_a = prm["dt"][:, None] * prm["A"]  # [H,N2]
        if self.cfg.disc == "zoh":
            d_a = jnp.exp(dt_a)
            d_b = (d_a - 1) / prm["A"] * prm["B"]
            return d_a, d_b, dt_a
        d_a = (1 + dt_a / 2) / (1 - dt_a / 2)
        d_b = prm["dt"][:, None] * prm["B"] / (1 - dt_a / 2)
        return d_a, d_b, jnp.log(d_a)

    def kernel(self, length: int) -> jax.Array:
        """The convolution kernel K [C,H,length] (float32)."""
        prm = self.ssm_params()
        if self.cfg.mode == "dplr":
            return self._dplr_kernel(prm, length)[..., :length]
        _, d_b, log_a = self._diag_discrete(prm)
        # K_l = 2 Re sum_n C_n dB_n exp(l log dA_n) (S4D Eq. 6)
        return vandermonde(prm["C"] * d_b, log_a, length, conj=True, **self._op_kwargs())

    # -- recurrent mode ---------------------------------------------------------------------------
    def setup_step(self) -> dict:
        """Discrete matrices for the recurrence x_t = dA x_{t-1} + dB u_t, y_t = Re(C x_t).

        dplr: dense full-basis dA [H,N,N], dB [H,N], and C [C,H,N] = C~ (I - dA^L)^{-1} (L = l_max).
        diag: dA, dB [H,N2] and C [C,H,N2] (half storage; y = 2 Re(C x)).
        """
        prm = self.ssm_params()
        if self.cfg.mode == "dplr":
            d_a, d_b = self.dense_discrete(prm)
            c_full = jnp.concatenate([prm["C"], jnp.conj(prm["C"])], -1)  # [C,H,N]
            m = jnp.eye(d_a.shape[-1], dtype=d_a.dtype) - _matrix_power(d_a, self.cfg.l_max)  # [H,N,N]
            # C = C~ M^{-1}  <=>  M^T C^T = C~^T
            c_t = _solve(jnp.swapaxes(m, -1, -2), jnp.moveaxis(c_full, 0, -1))  # [H,N,C]
            c = jnp.transpose(c_t, (2, 0, 1))  # [C,H,N]
            return {"dA": d_a, "dB": d_b, "C": c}
        d_a, d_b, _ = self._diag_discrete(prm)
        return {"dA": d_a, "dB": d_b, "C": 2 * prm["C"]}

    def init_state(self, batch_size: int) -> jax.Array:
        n = self.cfg.d_state if self.cfg.mode == "dplr" else self.cfg.d_state // 2
        return jnp.zeros((batch_size, self.cfg.d_model, n), jnp.complex64)

    def final_state(self, u: jax.Array, mats: dict) -> jax.Array:
        """The recurrent state after u [B,T,H] (float32) from the empty state, in parallel:
        x_T = sum_s dA^(T-1-s) dB u_s = sum_j K_j u_(T-1-j) with the Krylov vectors K_j = dA^j dB
        [T,H,N*], built by doubling (K_(m..2m-1) = dA^m K_(0..m-1)): log2(T) batched products."""
        t = u.shape[1]
        dense = self.cfg.mode == "dplr"
        krylov, power = mats["dB"][None], mats["dA"]  # [1,H,N*], dA^1
        while krylov.shape[0] < t:
            if dense:
                more = jnp.einsum("hnm,jhm->jhn", power, krylov)
                power = jnp.einsum("hnm,hmk->hnk", power, power)
            else:
                more, power = power[None] * krylov, power * power
            krylov = jnp.concatenate([krylov, more], 0)
        krylov = krylov[:t]  # [T,H,N*]
        return jnp.einsum("jhn,bjh->bhn", krylov, u[:, ::-1].astype(krylov.dtype))

    def step(self, u: jax.Array, state: jax.Array, mats: dict) -> tuple[jax.Array, jax.Array]:
        """One step: u [B,H] float32, state [B,H,N*] complex64 -> (y [B,C,H], new state)."""
        if self.cfg.mode == "dplr":
            state = jnp.einsum("hnm,bhm->bhn", mats["dA"], state) + mats["dB"] * u[..., None]
        else:
            state = mats["dA"] * state + mats["dB"] * u[..., None]
        y = jnp.einsum("chn,bhn->bch", mats["C"], state).real
        return y, state


# --------------------------------------------------------------------------------------------------
# The S4 layer and blocks
# --------------------------------------------------------------------------------------------------


class S4Layer(nnx.Module):
    """FFTConv(u, K) + D u -> GELU -> Linear(H, 2H) -> GLU, on u [B,T,H]."""

    def __init__(self, cfg: S4Config, *, bidirectional: bool = False, rngs: nnx.Rngs):
        self.cfg, self.bidirectional = cfg, bidirectional
        self.kernel = SSMKernel(cfg, 2 if bidirectional else 1, rngs=rngs)
        self.D = nnx.Param(jax.random.normal(rngs.params(), (cfg.d_model,), jnp.float32), axes=("embed",))
        self.out = Linear(
            cfg.d_model, 2 * cfg.d_model, axes=("embed", "mlp"), rngs=rngs, use_bias=True, dtype=cfg.dtype
        )

    def _head(self, y: jax.Array, dtype) -> jax.Array:  # y [B,T,H] fp32 -> [B,T,H]
        y = jax.nn.gelu(y, approximate=False)
        return jax.nn.glu(self.out(y.astype(dtype)), axis=-1)

    def __call__(self, u: jax.Array) -> jax.Array:
        """u [B,T,H] -> [B,T,H]."""
        t = u.shape[1]
        u32 = jnp.swapaxes(u.astype(jnp.float32), 1, 2)  # [B,H,T]
        k = self.kernel.kernel(t)  # [C,H,T]
        y = fft_conv(u32, k[0])  # [B,H,T]
        if self.bidirectional:
            # anti-causal part y_t += sum_{s>t} k1_{s-t-1} u_s (as upstream: lag 0 only once)
            k1 = jnp.pad(k[1], ((0, 0), (1, 0)))[:, :t]
            y = y + fft_conv(u32[..., ::-1], k1)[..., ::-1]
        y = y + self.D[...][:, None] * u32
        return self._head(jnp.swapaxes(y, 1, 2), u.dtype)

    def setup_step(self) -> dict:
        if self.bidirectional:
            raise ValueError("a bidirectional S4 layer has no recurrent mode; set bidirectional=False")
        return self.kernel.setup_step()

    def step(self, u: jax.Array, state: jax.Array, mats: dict) -> tuple[jax.Array, jax.Array]:
        """u [B,H] -> (y [B,H], state)."""
        y, state = self.kernel.step(u.astype(jnp.float32), state, mats)
        y = y[:, 0] + self.D[...] * u.astype(jnp.float32)
        return self._head(y[:, None], u.dtype)[:, 0], state


class S4Block(Block):
    """Pre-norm residual block: x + S4Layer(RMSNorm(x)), residual stream in fp32.

    Decoding state: the SSM state [B,H,N*] complex64 and the discrete step matrices (computed once
    from the parameters by `init_state`). Packed rows (segment ids) run the recurrent form with the
    state reset at each document start (the convolution would mix documents).
    """

    def __init__(self, cfg: S4Config, *, bidirectional: bool, rngs: nnx.Rngs):
        self.norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
        self.layer = S4Layer(cfg, bidirectional=bidirectional, rngs=rngs)
        self.dtype = jnp.dtype(cfg.dtype)

    def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:  # [B,T,H]
        if ctx.segment_ids is not None:
            return scan_over_time(self.decode, x, self.init_state(x.shape[0], x.shape[1]), ctx)[0]
        return x + self.layer(self.norm(x).astype(self.dtype)).astype(jnp.float32)

    def init_state(self, batch_size: int, max_length: int) -> dict:
        """The empty recurrent state and the step matrices; `max_length` does not change its size."""
        return {"ssm": self.layer.kernel.init_state(batch_size), "step": self.layer.setup_step()}

    def prefill(self, x: jax.Array, state: dict, ctx: Context) -> tuple[jax.Array, dict]:
        """T tokens continuing from `state`. Into an empty cache (ctx.index == 0: a prompt) the
        convolution gives the outputs and `SSMKernel.final_state` the state, in parallel; continuing
        a filled cache runs the recurrence token by token."""
        if x.shape[1] == 1:
            return self.decode(x, state, ctx)

        def parallel(x, state):
            u = self.norm(x).astype(self.dtype)  # [B,T,H]
            y = x + self.layer(u).astype(jnp.float32)
            ssm = self.layer.kernel.final_state(u.astype(jnp.float32), state["step"])
            return y, {"ssm": ssm.astype(state["ssm"].dtype), "step": state["step"]}

        def sequential(x, state):
            return scan_over_time(self.decode, x, state, ctx)

        if isinstance(ctx.index, int):  # known when tracing (e.g. `zoo.generate`'s prompt): one branch
            return (parallel if ctx.index == 0 else sequential)(x, state)
        return jax.lax.cond(ctx.index == 0, parallel, sequential, x, state)

    def decode(self, x: jax.Array, state: dict, ctx: Context) -> tuple[jax.Array, dict]:  # x [B,1,H]
        """One token; a row at position 0 starts a document from the empty state."""
        start = (ctx.positions[:, 0] == 0)[:, None, None]
        ssm = jnp.where(start, jnp.zeros_like(state["ssm"]), state["ssm"])
        y, ssm = self.layer.step(self.norm(x[:, 0]).astype(self.dtype), ssm, state["step"])
        return x + y[:, None].astype(jnp.float32), {"ssm": ssm, "step": state["step"]}


@registry.register("s4_classifier", CLASSIFIER_PRESETS)
class S4Classifier(Classifier):
    """Sequence classifier: embedding -> S4 blocks -> RMSNorm -> masked mean pool -> Linear."""

    paper = "S4 / S4D sequence classifier (Long Range Arena)"
    numerical_core = "`pallas_kernels/cauchy`"

    def __init__(self, cfg: S4Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=cfg.dtype)
        self.blocks = nnx.List([S4Block(cfg, bidirectional=cfg.bidirectional, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
        self.head = Linear(cfg.d_model, cfg.n_classes, axes=("embed", None), rngs=rngs, use_bias=True, dtype=cfg.dtype)

    def __call__(self, tokens: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """tokens int32 [B,T], mask bool [B,T] (True = real token; None = all) -> logits [B, n_classes]."""
        tokens = check_tokens(tokens, 2, vocab_size=self.config.vocab_size)
        if mask is None:
            mask = jnp.ones(tokens.shape, bool)
        m = mask[..., None].astype(jnp.float32)  # [B,T,1]
        x = self.embed(tokens).astype(jnp.float32) * m
        ctx = make_context(tokens)
        for block in self.blocks:
            # re-zero padding so it never feeds the (bidirectional) convolutions
            x = block(x, ctx) * m
        x = self.final_norm(x)
        pooled = jnp.sum(x * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)  # [B,H]
        return self.head(pooled).astype(jnp.float32)


@registry.register("s4", PRESETS)
class S4LM(LanguageModel):
    """Causal S4 / S4D language model following the zoo's model protocol.

    The parallel form is the convolution with the SSM kernel; decoding is the recurrence, O(H N^2)
    (dplr) / O(H N) (diag) per layer and token, with the step matrices computed once by `init_cache`
    (build the cache after the parameters are final: it holds their discretisation).
    """

    paper = "S4 (DPLR) and S4D (Gu et al. 2022)"
    numerical_core = "`pallas_kernels/cauchy`"

    def __init__(self, cfg: S4Config, *, rngs: nnx.Rngs):
        if cfg.bidirectional:
            raise ValueError(
                "the S4 LM is causal; set bidirectional=False (bidirectional is for the s4_classifier model)"
            )
        self.config = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=cfg.dtype)
        self.blocks = make_stack(cfg, lambda i: S4Block(cfg, bidirectional=False, rngs=rngs))
        self.final_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.embed(tokens).astype(jnp.float32)

    def logits(self, x: jax.Array) -> jax.Array:
        return lm_logits(self.final_norm(x), self.embed, None, self.config.d_model**-0.5)
