"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", the SSD layer) with recurrent decoding, chunked
prefill, and the training-free state-collapse mitigations of Stuffed Mamba (Chen et al. 2024,
"Stuffed Mamba: Oversized States Lead to the Inability to Forget", arXiv 2410.07145).

Shapes: B batch, T time, D d_model, E d_inner = expand*D, H heads, P headdim, G ngroups,
N d_state, K d_conv, C conv channels = E + 2GN, L layers, R window.

Block (as `mamba_ssm/modules/mamba2.py`, d_ssm = d_inner, no MLP split, rmsnorm, gate after norm):
    z, xBC, dt = split(in_proj(u), [E, E + 2GN, H])
    xBC = silu(causal_depthwise_conv1d(xBC))            # kernel K over x, B and C together
    x, B, C = split(xBC, [E, GN, GN])                    # heads share B, C within a group
    dt = softplus(dt + dt_bias); A = -exp(A_log)          # one scalar A per head
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T            # SSD, Mamba-2 paper eq. (1)-(2)
    y_t = h_t C_t + D x_t
    y = RMSNorm_G(y * silu(z)) * w                        # gated RMSNorm over groups of E/G channels
    out = out_proj(y)
LM (as `mamba_ssm/models/mixer_seq_simple.py`): embedding, pre-norm residual blocks
x = x + Mixer(RMSNorm(x)) with the residual stream in fp32, final RMSNorm, tied head (or, with
`tie_embeddings=False`, a separate `lm_head` as Hugging Face's untied Mamba2ForCausalLM). The
vocabulary is padded to a multiple of `pad_vocab_size_multiple` (16 as the released checkpoints);
the logits are returned for the `vocab_size` real tokens only.

Init (as upstream): A ~ U[1, 16] per head (A_log = log A); dt ~ log-uniform [dt_min, dt_max]
floored at dt_init_floor, dt_bias = softplus^-1(dt); D = 1; A_log, dt_bias, D, norms and biases
without weight decay; Linear weights U(+-1/sqrt(fan_in)) (torch's default), out_proj divided by
sqrt(n_layers) (GPT-2 rescaling of `_init_weights`); conv weight and bias U(+-1/sqrt(K)); the
embedding N(0, 0.02).

Inference protocol (`zoo.models.base.LanguageModel`): `model(tokens, segment_ids=...)`;
`cache = model.init_cache(B, max_length)` (per layer: conv state [B,K-1,C] + SSM state [B,H,P,N]);
`logits, cache = model.prefill(tokens, cache)` continues from the cache (chunked prefill of a long
prompt); `model.decode_step(tokens_t, cache)`. Packed documents (`segment_ids`) reset the conv
window and the SSD state (`seq_idx`) at every document start.

Stuffed-Mamba mitigations (training-free; fields of `Mamba2Config`, off by default; change them on a
trained model with `model.set_inference_options(...)`):
1. "Forget more, remember less" (Method 1 of the paper). Applied to every token before the scan:
   - `b_clip` > 0: B <- clip(B, -b_clip, b_clip)  (bounds each input written into the state);
   - `b_scale`: B <- b_scale * B                  (< 1 writes less: "remember less");
   - `dt_scale`, `dt_offset`: dt <- max(dt_scale * dt + dt_offset, 0) after the softplus; changes
     both the decay exp(dt A) and the input strength dt x B^T;
   - `a_scale`, `a_offset`: A <- min(a_scale * A + a_offset, 0); changes only the decay
     (a_scale > 1 or a_offset < 0 "forget more"). Upstream code of the paper applies the dt factor to
     the pre-softplus dt; here every adjustment acts on the discretised quantities, so its effect on
     alpha_t = exp(dt_t A) is explicit.
2. State normalisation (Method 2): with `state_norm_thresholds` set (one value, or one per
   layer and head, L*H values in layer-major order, from `calibrate_state_norm`), every call to the
   model processes its input in chunks of `state_norm_chunk` tokens and after each chunk (and after
   every decoded token) caps each head's state: h <- h * min(1, thr / ||h||_F). The paper's code
   multiplies the state by ||h||/thr, which grows it; here the norm never exceeds thr after a cap.
3. Sliding window by state difference (Method 3): with `window` = R > 0 the state only holds the
   last R tokens: h^R_t = h_t - (prod_{k=t-R+1..t} alpha_k) h_{t-R}, so y_t = C_t h^R_t + D x_t.
   Parallel form: a second SSD over the inputs delayed by R tokens and pre-multiplied by their
   decay over the window is subtracted. Recurrent form: h^R_t = alpha_t h^R_{t-1} + u_t -
   (prod_{k=t-R+1..t} alpha_k) u_{t-R}, u = dt x B^T, with the last R inputs (x, B, dt) kept in the
   cache. The division by dt_t in the parallel form is exact for dt_t >= 1e-20.
Diagnostic: `state_norm_trace(model, tokens, every)` returns ||h||_F per layer and head after every
`every` tokens (plotted by `scripts/stuffed_mamba.py`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pallas_kernels import dispatch
from pallas_kernels.ssd import ssd, ssd_step
from zoo.layers import Linear, RMSNorm, param
from zoo.models import registry
from zoo.models.base import Block, Context, LanguageModel, LMConfig, make_stack

_DT_FLOOR = 1e-20  # the windowed parallel form divides by dt_t (see the module docstring)


@dataclasses.dataclass(frozen=True)
class Mamba2Config(LMConfig):
    """Mamba-2's architecture (see the field comments)."""

    d_model: int = 64
    d_state: int = 32
    d_conv: int = 4
    expand: int = 2
    headdim: int = 16
    ngroups: int = 1
    chunk_size: int = 32  # SSD chunk length Q (32 suits the small heads on CPU; the released sizes use 256)
    pad_vocab_size_multiple: int = 16
    A_init_range: tuple[float, float] = (1.0, 16.0)
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # False: a separate head `lm_head` [padded vocab, D] (HF's untied Mamba2)
    # Stuffed-Mamba inference options (see the module docstring); defaults leave the model unchanged.
    b_scale: float = 1.0
    b_clip: float = 0.0  # 0 = off
    dt_scale: float = 1.0
    dt_offset: float = 0.0
    a_scale: float = 1.0
    a_offset: float = 0.0
    state_norm_thresholds: tuple[float, ...] = ()  # () = off; 1 or n_layers * n_heads values
    state_norm_chunk: int = 128
    window: int = 0  # 0 = off; R > 0 keeps only the last R tokens in the state

    def __post_init__(self):
        super().__post_init__()
        if self.d_inner % self.headdim:
            raise ValueError(
                f"d_inner = expand * d_model = {self.d_inner} must be a multiple of headdim "
                f"({self.headdim}); change headdim or d_model"
            )
        if self.n_heads % self.ngroups:
            raise ValueError(f"ngroups ({self.ngroups}) must divide the number of heads ({self.n_heads})")
        if len(self.A_init_range) != 2 or not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"A_init_range {self.A_init_range} must be (low, high) with 0 < low <= high")
        n = len(self.state_norm_thresholds)
        if n not in (0, 1, self.n_layers * self.n_heads):
            raise ValueError(
                f"state_norm_thresholds has {n} values; give 1 or n_layers * n_heads = "
                f"{self.n_layers * self.n_heads} (see calibrate_state_norm)"
            )
        if any(t <= 0 for t in self.state_norm_thresholds):
            raise ValueError(f"state_norm_thresholds {self.state_norm_thresholds} must all be > 0")
        for name in ("state_norm_chunk", "chunk_size", "d_conv"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.window < 0 or self.b_clip < 0:
            raise ValueError(f"window ({self.window}) and b_clip ({self.b_clip}) must be >= 0 (0 = off)")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def padded_vocab(self) -> int:
        m = self.pad_vocab_size_multiple
        return -(-self.vocab_size // m) * m


def _official(d_model: int, n_layers: int) -> Mamba2Config:
    return Mamba2Config(
        vocab_size=50277,
        d_model=d_model,
        n_layers=n_layers,
        d_state=128,
        headdim=64,
        expand=2,
        ngroups=1,
        chunk_size=256,
        dtype="bfloat16",
    )


PRESETS = {
    # 2 layers, D 64, 8 heads of 16, N 32: 77,168 parameters, trains in a few CPU minutes.
    "tiny": Mamba2Config(),
    # The released state-spaces/mamba2-* sizes (d_state 128, headdim 64, expand 2, vocab 50277 -> 50288).
    "130m": _official(768, 24),
    "370m": _official(1024, 48),
    "780m": _official(1536, 48),
    "1.3b": _official(2048, 48),
    "2.7b": _official(2560, 64),
}


def _uniform(bound: float):
    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _a_log_init(lo: float, hi: float):
    def init(key, shape, dtype):
        return jnp.log(jax.random.uniform(key, shape, dtype, lo, hi))

    return init


def _dt_bias_init(dt_min: float, dt_max: float, floor: float):
    def init(key, shape, dtype):
        u = jax.random.uniform(key, shape, dtype)
        dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = jnp.maximum(dt, floor)
        return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus

    return init


def gated_rms_norm(y: jax.Array, z: jax.Array, weight: jax.Array, group_size: int, eps: float) -> jax.Array:
    """RMSNorm(y * silu(z)) * weight, normalised over groups of `group_size` channels, in fp32."""
    g = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))  # [..., E]
    gs = g.reshape(*g.shape[:-1], -1, group_size)  # [..., G, E/G]
    gs = gs * jax.lax.rsqrt(jnp.mean(jnp.square(gs), -1, keepdims=True) + eps)
    return (gs.reshape(g.shape) * weight.astype(jnp.float32)).astype(y.dtype)


def cap_state_norm(h: jax.Array, thr: jax.Array) -> jax.Array:
    """h [B,H,P,N] <- h * min(1, thr / ||h||_F) per head; thr [H]."""
    norm = jnp.sqrt(jnp.sum(jnp.square(h), axis=(-2, -1)))  # [B,H]
    scale = jnp.minimum(1.0, thr / jnp.maximum(norm, 1e-30))
    return h * scale[..., None, None]


def windowed_ssd(
    x, dt, A, B, C, D, *, window: int, h0, hist_x, hist_B, hist_dt, chunk_size: int = 64, implementation: str = "xla"
):
    """SSD whose state holds only the last `window` tokens (Stuffed-Mamba Method 3), in parallel form.

    h^R_t = sum_{s=t-R+1..t} (prod_{k=s+1..t} alpha_k) dt_s x_s B_s^T (+ the decayed part of h0 that
    is still inside the window, as carried by the recurrent form), y_t = C_t h^R_t + D x_t.

    Args:
      x [B,T,H,P], dt [B,T,H] (discretised, > 0), A [H], B, C [B,T,G,N], D [H];
      h0 [B,H,P,N] the windowed state before the first token; hist_x [B,R,H,P], hist_B [B,R,G,N],
      hist_dt [B,R,H]: the R tokens before the first one (zeros at the start of a sequence).

    Returns:
      y [B,T,H,P] float32, the final windowed state [B,H,P,N], and the new history (x, B, dt).
    """
    r, t = window, x.shape[1]
    xs = jnp.concatenate([hist_x.astype(jnp.float32), x.astype(jnp.float32)], 1)  # [B,R+T,H,P]
    bs = jnp.concatenate([hist_B.astype(jnp.float32), B.astype(jnp.float32)], 1)  # [B,R+T,G,N]
    dts = jnp.concatenate([hist_dt.astype(jnp.float32), dt.astype(jnp.float32)], 1)  # [B,R+T,H]
    cs = jnp.cumsum(dts, axis=1)  # [B,R+T,H]
    # Decay over the window of each token leaving it: prod_{k=s+1..s+R} alpha_k for s = tau - R.
    w = jnp.exp(A * (cs[:, r:] - cs[:, :t]))  # [B,T,H]
    dt32 = dt.astype(jnp.float32)
    # The token leaving the window at tau enters the second scan with dt_tau as its step.
    x_lag = xs[:, :t] * (dts[:, :t] * w / jnp.maximum(dt32, _DT_FLOOR))[..., None]  # [B,T,H,P]
    y_in, h_in = ssd(
        x.astype(jnp.float32),
        dt32,
        A,
        B.astype(jnp.float32),
        C.astype(jnp.float32),
        chunk_size=chunk_size,
        D=D,
        initial_states=h0,
        return_final_states=True,
        implementation=implementation,
    )
    y_out, h_out = ssd(
        x_lag,
        dt32,
        A,
        bs[:, :t],
        C.astype(jnp.float32),
        chunk_size=chunk_size,
        return_final_states=True,
        implementation=implementation,
    )
    return y_in - y_out, h_in - h_out, (xs[:, t:], bs[:, t:], dts[:, t:])


class Mamba2Mixer(nnx.Module):
    """The Mamba-2 mixer (SSD layer). `forward(u, state, ctx)` maps [B,T,D] and a layer state to both."""

    def __init__(self, cfg: Mamba2Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        e, h, gn = cfg.d_inner, cfg.n_heads, cfg.ngroups * cfg.d_state
        d_in_proj = 2 * e + 2 * gn + h
        self.in_proj = Linear(cfg.d_model, d_in_proj, axes=("embed", "mlp"), rngs=rngs, dtype=cfg.dtype)
        self.in_proj.kernel[...] = _uniform(cfg.d_model**-0.5)(rngs.params(), (cfg.d_model, d_in_proj), jnp.float32)
        bound = cfg.d_conv**-0.5  # torch Conv1d default, fan_in = 1 * K (depthwise)
        self.conv_weight = param(rngs, _uniform(bound), (cfg.d_conv, cfg.conv_dim), ("conv", "mlp"))
        self.conv_bias = param(rngs, _uniform(bound), (cfg.conv_dim,), ("mlp",), wd=False) if cfg.conv_bias else None
        self.dt_bias = param(rngs, _dt_bias_init(cfg.dt_min, cfg.dt_max, cfg.dt_init_floor), (h,), ("heads",), wd=False)
        self.A_log = param(rngs, _a_log_init(*cfg.A_init_range), (h,), ("heads",), wd=False)
        self.D = param(rngs, nnx.initializers.ones, (h,), ("heads",), wd=False)
        self.norm_weight = param(rngs, nnx.initializers.ones, (e,), ("mlp",), wd=False)
        self.out_proj = Linear(e, cfg.d_model, axes=("mlp", "embed"), rngs=rngs, dtype=cfg.dtype)
        self.out_proj.kernel[...] = _uniform(e**-0.5 / math.sqrt(cfg.n_layers))(
            rngs.params(), (e, cfg.d_model), jnp.float32
        )

    # ---- pieces shared by the parallel and the recurrent forms
    def _thresholds(self, layer) -> jax.Array | None:
        """The state-norm caps [H] of layer `layer` (a traced index when the layers are scanned)."""
        cfg = self.cfg
        if not cfg.state_norm_thresholds:
            return None
        thr = jnp.asarray(cfg.state_norm_thresholds, jnp.float32)
        if thr.shape[0] == 1:
            return jnp.broadcast_to(thr, (cfg.n_heads,))
        return thr.reshape(cfg.n_layers, cfg.n_heads)[layer]

    def _discretise(self, dt_raw, B):
        """dt = softplus(dt_raw + dt_bias), A = -exp(A_log), then the Method-1 adjustments (fp32)."""
        cfg = self.cfg
        dt = jax.nn.softplus(dt_raw.astype(jnp.float32) + self.dt_bias[...])
        dt = jnp.maximum(dt * cfg.dt_scale + cfg.dt_offset, 0.0)
        A = jnp.minimum(-jnp.exp(self.A_log[...]) * cfg.a_scale + cfg.a_offset, 0.0)
        B = B.astype(jnp.float32)
        if cfg.b_clip > 0:
            B = jnp.clip(B, -cfg.b_clip, cfg.b_clip)
        return dt, A, B * cfg.b_scale

    def _split_in(self, u):
        cfg = self.cfg
        e, gn = cfg.d_inner, cfg.ngroups * cfg.d_state
        zxbcdt = self.in_proj(u)
        return zxbcdt[..., :e], zxbcdt[..., e : 2 * e + 2 * gn], zxbcdt[..., 2 * e + 2 * gn :]

    def _split_xbc(self, xbc):
        cfg = self.cfg
        e, gn = cfg.d_inner, cfg.ngroups * cfg.d_state
        lead = xbc.shape[:-1]
        x = xbc[..., :e].reshape(*lead, cfg.n_heads, cfg.headdim)
        B = xbc[..., e : e + gn].reshape(*lead, cfg.ngroups, cfg.d_state)
        C = xbc[..., e + gn :].reshape(*lead, cfg.ngroups, cfg.d_state)
        return x, B, C

    def _out(self, y, z):
        cfg = self.cfg
        y = y.reshape(*y.shape[:-2], cfg.d_inner).astype(z.dtype)
        y = gated_rms_norm(y, z, self.norm_weight[...], cfg.d_inner // cfg.ngroups, cfg.norm_eps)
        return self.out_proj(y)

    def _scan(self, x, dt, A, B, C, state, seq_idx=None):
        """SSD over one stretch with the carried state; returns y [B,T,H,P] and the new state."""
        cfg = self.cfg
        D = self.D[...]
        if cfg.window:
            y, h, (hx, hb, hdt) = windowed_ssd(
                x,
                dt,
                A,
                B,
                C,
                D,
                window=cfg.window,
                h0=state["ssm"],
                hist_x=state["hist_x"],
                hist_B=state["hist_B"],
                hist_dt=state["hist_dt"],
                chunk_size=cfg.chunk_size,
                implementation=dispatch.resolve(cfg.implementation),
            )
            return y, {"ssm": h, "hist_x": hx, "hist_B": hb, "hist_dt": hdt}
        y, h = ssd(
            x,
            dt,
            A,
            B.astype(x.dtype),
            C,
            chunk_size=cfg.chunk_size,
            D=D,
            initial_states=state["ssm"],
            seq_idx=seq_idx,
            return_final_states=True,
            implementation=dispatch.resolve(cfg.implementation),
        )
        return y, {"ssm": h}

    # ---- parallel form over a stretch of tokens, continuing from `state`
    def forward(self, u: jax.Array, state: dict, ctx: Context) -> tuple[jax.Array, dict]:
        """u [B,T,D] and the layer state {conv [B,K-1,C], ssm [B,H,P,N], (hist_*)} -> (out [B,T,D], state).

        With `ctx.segment_ids` (packed documents) neither the convolution nor the SSD state crosses
        a document boundary (the SSD's `seq_idx`)."""
        cfg = self.cfg
        t = u.shape[1]
        seg = ctx.segment_ids
        if seg is not None and (cfg.window or cfg.state_norm_thresholds):
            raise ValueError(
                "the Stuffed-Mamba window / state-norm options are inference options and do not "
                "take packed documents (segment_ids); run them on unpacked sequences"
            )
        z, xbc, dt_raw = self._split_in(u)
        # Depthwise causal conv over x, B, C, continuing from the last K-1 inputs; tap k reads the
        # token K-1-k steps back, masked when it lies in another document.
        xpad = jnp.concatenate([state["conv"].astype(xbc.dtype), xbc], 1)  # [B,K-1+T,C]
        w = self.conv_weight[...].astype(xbc.dtype)
        if seg is None:
            conv = sum(xpad[:, k : k + t] * w[k] for k in range(cfg.d_conv))
        else:
            segpad = jnp.concatenate([jnp.repeat(seg[:, :1], cfg.d_conv - 1, 1), seg], 1)  # [B,K-1+T]
            conv = sum(
                jnp.where((segpad[:, k : k + t] == seg)[..., None], xpad[:, k : k + t] * w[k], 0)
                for k in range(cfg.d_conv)
            )
        if self.conv_bias is not None:
            conv = conv + self.conv_bias[...].astype(xbc.dtype)
        new_conv = xpad[:, xpad.shape[1] - (cfg.d_conv - 1) :]
        x, B, C = self._split_xbc(jax.nn.silu(conv))
        dt, A, B = self._discretise(dt_raw, B)
        ssm_state = {k: v for k, v in state.items() if k != "conv"}
        thr = self._thresholds(ctx.layer)
        if thr is None:
            y, ssm_state = self._scan(x, dt, A, B, C, ssm_state, seq_idx=seg)
        else:
            # Method 2: cap the state norm after every chunk of `state_norm_chunk` tokens
            # (a scan over the full chunks, then the remainder).
            q = cfg.state_norm_chunk
            n_full = t // q

            def chunk_step(carry, inp):
                y_c, carry = self._scan(*inp[:2], A, *inp[2:], carry)
                carry["ssm"] = cap_state_norm(carry["ssm"], thr)
                return carry, y_c

            def chunks(a):  # [B, n_full*q, ...] -> [n_full, B, q, ...]
                a = a[:, : n_full * q].reshape(a.shape[0], n_full, q, *a.shape[2:])
                return jnp.moveaxis(a, 1, 0)

            ys = []
            if n_full:
                ssm_state, y_full = jax.lax.scan(chunk_step, ssm_state, tuple(chunks(a) for a in (x, dt, B, C)))
                ys.append(jnp.moveaxis(y_full, 0, 1).reshape(x.shape[0], n_full * q, *y_full.shape[3:]))
            if t > n_full * q:
                rest = slice(n_full * q, t)
                ssm_state, y_rest = chunk_step(ssm_state, (x[:, rest], dt[:, rest], B[:, rest], C[:, rest]))
                ys.append(y_rest)
            y = jnp.concatenate(ys, 1)
        return self._out(y, z), {"conv": new_conv, **ssm_state}

    # ---- recurrent form: one token
    def step(self, u: jax.Array, state: dict, ctx: Context) -> tuple[jax.Array, dict]:
        """u [B,D] -> (out [B,D], state); the same function as `forward` on one token."""
        cfg = self.cfg
        z, xbc, dt_raw = self._split_in(u)
        window = jnp.concatenate([state["conv"].astype(xbc.dtype), xbc[:, None]], 1)  # [B,K,C]
        conv = jnp.einsum("bkc,kc->bc", window, self.conv_weight[...].astype(xbc.dtype))
        if self.conv_bias is not None:
            conv = conv + self.conv_bias[...].astype(xbc.dtype)
        x, B, C = self._split_xbc(jax.nn.silu(conv))
        dt, A, B = self._discretise(dt_raw, B)
        new = {"conv": window[:, 1:]}
        if cfg.window:
            x32 = x.astype(jnp.float32)
            rep = cfg.n_heads // cfg.ngroups
            # u_t - (prod of the window's decays) u_{t-R}: add the new token, drop the leaving one.
            w = jnp.exp(A * (jnp.sum(state["hist_dt"][:, 1:], 1) + dt))  # [B,H]
            b_old = jnp.repeat(state["hist_B"][:, 0], rep, axis=1)  # [B,H,N]
            u_old = (state["hist_dt"][:, 0] * w)[..., None, None] * state["hist_x"][:, 0][..., None] * b_old[:, :, None]
            y, h = ssd_step(state["ssm"], x32, dt, A, B, C.astype(jnp.float32), D=self.D[...])
            h = h - u_old
            y = y - jnp.einsum("bhpn,bhn->bhp", u_old, jnp.repeat(C.astype(jnp.float32), rep, axis=1))
            new.update(
                hist_x=jnp.concatenate([state["hist_x"][:, 1:], x32[:, None]], 1),
                hist_B=jnp.concatenate([state["hist_B"][:, 1:], B[:, None]], 1),
                hist_dt=jnp.concatenate([state["hist_dt"][:, 1:], dt[:, None]], 1),
            )
        else:
            y, h = ssd_step(state["ssm"], x, dt, A, B.astype(x.dtype), C, D=self.D[...])
        thr = self._thresholds(ctx.layer)
        new["ssm"] = h if thr is None else cap_state_norm(h, thr)
        return self._out(y, z), new

    def init_state(self, batch_size: int) -> dict:
        cfg = self.cfg
        h, p, g, n, r = cfg.n_heads, cfg.headdim, cfg.ngroups, cfg.d_state, cfg.window
        state = {
            "conv": jnp.zeros((batch_size, cfg.d_conv - 1, cfg.conv_dim), jnp.dtype(cfg.dtype)),
            "ssm": jnp.zeros((batch_size, h, p, n), jnp.float32),
        }
        if r:
            state.update(
                hist_x=jnp.zeros((batch_size, r, h, p), jnp.float32),
                hist_B=jnp.zeros((batch_size, r, g, n), jnp.float32),
                hist_dt=jnp.zeros((batch_size, r, h), jnp.float32),
            )
        return state


class Mamba2Block(Block):
    """Pre-norm residual block x + Mixer(RMSNorm(x)) (no MLP, as the released models)."""

    def __init__(self, cfg: Mamba2Config, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
        self.mixer = Mamba2Mixer(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:
        return self.prefill(x, self.init_state(x.shape[0], x.shape[1]), ctx)[0]

    def init_state(self, batch_size: int, max_length: int) -> dict:
        """conv [B,K-1,C], ssm [B,H,P,N] fp32 (and the window history); the size is fixed."""
        return self.mixer.init_state(batch_size)

    def prefill(self, x: jax.Array, state: dict, ctx: Context) -> tuple[jax.Array, dict]:
        h, state = self.mixer.forward(self.norm(x), state, ctx)
        return x + h.astype(jnp.float32), state

    def decode(self, x: jax.Array, state: dict, ctx: Context) -> tuple[jax.Array, dict]:
        h, state = self.mixer.step(self.norm(x)[:, 0], state, ctx)
        return x + h[:, None].astype(jnp.float32), state


@registry.register("mamba2", PRESETS)
class Mamba2(LanguageModel):
    """Mamba-2 LM following the zoo's model protocol, plus the Stuffed-Mamba options."""

    paper = "Mamba-2 (Dao & Gu 2024) + Stuffed-Mamba mitigations"
    numerical_core = "`pallas_kernels/ssd`"
    convertible_from = "mamba2"

    def __init__(self, cfg: Mamba2Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embedding = param(rngs, nnx.initializers.normal(0.02), (cfg.padded_vocab, cfg.d_model), ("vocab", "embed"))
        self.blocks = make_stack(cfg, lambda i: self.make_block(cfg, i, rngs))
        self.final_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else param(rngs, _uniform(cfg.d_model**-0.5), (cfg.padded_vocab, cfg.d_model), ("vocab", "embed"))
        )

    def make_block(self, cfg: Mamba2Config, layer: int, rngs: nnx.Rngs) -> Block:
        """Layer `layer`'s block (MemMamba builds its own)."""
        del layer
        return Mamba2Block(cfg, rngs=rngs)

    def set_inference_options(self, **options) -> Mamba2Config:
        """Replaces config fields (e.g. the mitigations) on this model and its layers; returns the config."""
        cfg = registry.config_with_overrides(self.config, options)
        self.config = cfg
        for _, module in nnx.iter_modules(self):
            if hasattr(module, "cfg"):  # the mixers (and MemMamba's note blocks) read the config
                module.cfg = cfg
        return cfg

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(jnp.float32)  # fp32 residual stream

    def logits(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        x = self.final_norm(x).astype(jnp.dtype(cfg.dtype))
        head = self.embedding if self.lm_head is None else self.lm_head
        logits = jnp.dot(x, head[...].astype(x.dtype).T).astype(jnp.float32)
        return logits[..., : cfg.vocab_size]


def ssm_states(model: Mamba2, cache: dict) -> jax.Array:
    """The SSM state of every layer in a cache: [L, B, H, P, N]."""
    return jnp.stack([model.blocks.layer_state(cache["layers"], i)["ssm"] for i in range(model.config.n_layers)])


@nnx.jit
def _prefill_norms(model, tokens, cache):
    _, cache = model.prefill(tokens, cache)
    return cache, jnp.sqrt(jnp.sum(jnp.square(ssm_states(model, cache)), axis=(-2, -1)))  # [L,B,H]


def state_norm_trace(model: Mamba2, tokens: jax.Array, every: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Diagnostic: ||h||_F per layer and head after every `every` tokens (chunked prefill).

    Returns (positions [S] (number of tokens seen), norms [L, B, H, S]).
    """
    tokens = jnp.asarray(tokens)
    t = tokens.shape[1]
    cache = model.init_cache(tokens.shape[0], t)
    out = []
    for s in range(0, t, every):
        cache, n = _prefill_norms(model, tokens[:, s : s + every], cache)
        out.append(np.asarray(n))
    return np.minimum(np.arange(every, t + every, every), t), np.stack(out, -1)


def calibrate_state_norm(model: Mamba2, tokens: jax.Array, multiplier: float = 1.0) -> tuple[float, ...]:
    """Per-layer, per-head thresholds for `state_norm_thresholds`: `multiplier` times the largest
    state norm (over the batch and over chunk ends) reached on a calibration prompt, e.g. a prompt of
    the training length. Layer-major, n_layers * n_heads values."""
    _, norms = state_norm_trace(model, tokens, model.config.state_norm_chunk)
    return tuple(float(v) * multiplier for v in norms.max(axis=(1, 3)).reshape(-1))
