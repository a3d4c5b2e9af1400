"""LaCT: Large-Chunk Test-Time Training with in-layer sliding-window attention (causal LM).

Paper: Zhang et al. 2025, "Test-Time Training Done Right" (arXiv 2505.23884). Port of the causal LM
layer of the original code (`a1600012888/LaCT`, lact_llm/lact_model/layer_lact_swiglu.py and
ttt_operation.py::block_causal_lact_swiglu), written from the equations.

Layer (input x [B, T, D], already RMS-normalised by the block):
    q, k, v = x Wq, x Wk, x Wv                      # shared by both branches
    o_attn  = SWA(RoPE(q), RoPE(k), v)              # causal sliding window of `window` keys
    q', k'  = q * s_q + b_q, k * s_k + b_k          # per-channel affine (`qk_scale`, `qk_offset`)
    q', k', v' = silu(.) per fast-weight head; q', k' L2-normalised per head, then RoPE
    lr_j    = softplus(x W_lr + b_lr + softplus^-1(1e-3)), j = 0, 1, 2 (one per fast matrix)
    o_ttt   = LaCT(W0, W1, W2; q', k', v', lr)       # block-causal chunk recurrence below
    o       = (o_attn + silu(x W_s) * RMSNorm_head(o_ttt)) Wo

Fast weights per fast-weight head: f_W(x) = W1 (silu(W0 x) * (W2 x)), W0, W2 [Dh, Dk], W1 [Dv, Dh],
initialised from learned slow weights (optionally W = L R + 0.5 I, low rank). Per chunk c of
`chunk_size` tokens (apply-then-update: a token only sees chunks strictly before its own):
    o_t       = f_{W_c}(q_t)                                    for t in chunk c
    L_j(W)    = -sum_{t in c} lr_{j,t} <f_W(k_t), v_t>         (negative dot-product inner loss)
    G_j       = -dL_j/dW_j                                      (explicit manual backprop)
    G_j      <- G_j + mean_{t in c}(m_t) G_j^prev              (momentum, optional)
    G_j      <- NewtonSchulz5(G_j)                              (Muon, optional)
    W_{c+1,j} = rownorm(W_{c,j} + G_j) * ||W_{0,j}||_row        (each row back to its initial norm)
The last chunk is only applied. Fast weights are fp32; matmuls run in the compute dtype with fp32
accumulation (the original runs them in bf16 under autocast).

Block (pre-norm, fp32 residual): x = x + LaCTLayer(RMSNorm(x)); x = x + SwiGLU(RMSNorm(x)).

Decoding state per layer: the fast weights (+ momentum), the current partial chunk's k/v/lr/momentum
buffers and a ring-buffer KV cache of the last `window` keys; the update runs when a chunk fills.

Shapes: B batch, T time, D model, H fast-weight heads, A attention heads, P attention head dim,
Dk = Dv = D / H fast-weight head dim, Dh = inter_multi * Dk fast hidden, C chunk, N = ceil(T / C).
Differences from the original, by choice: linear layers use the zoo's init (std 1/sqrt(d_in));
the ttt_prenorm variant and the fused Triton kernels are not ported.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from zoo.layers import (
    AttentionSpec,
    Embed,
    Linear,
    RMSNorm,
    apply_rope,
    attend,
    lm_logits,
    param,
    rms_norm,
    self_attention,
)
from zoo.models import registry
from zoo.models.base import Context, LanguageModel, LMConfig, PreNormBlock, make_stack, scan_over_time

# Per-step (a, b, c) of the quintic Newton-Schulz iteration X <- a X + (b A + c A^2) X, A = X X^T,
# as published with the LaCT code (ttt_operation.py::zeropower_via_newtonschulz5).
NS_COEFFS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)


@dataclasses.dataclass(frozen=True)
class LaCTConfig(LMConfig):
    """LaCT's architecture: window attention and fast-weight heads (see the field comments)."""

    n_heads: int = 4  # attention heads of the window branch
    n_lact_heads: int = 2  # fast-weight heads
    inter_multi: float = 1.0  # fast-weight hidden width Dh = inter_multi * Dk
    d_ff: int = 384  # block MLP width
    window: int = 64  # sliding-window size (keys, including the query's own)
    chunk_size: int = 64  # TTT chunk size C
    use_muon: bool = True
    use_momentum: bool = True
    learnable_ttt_scale: bool = True
    w0_w2_low_rank: int = 8  # rank of the low-rank + 0.5 I init of W0, W2; -1 = full matrices
    fw_init_gain: float = 0.5
    qkv_silu: bool = True  # silu on the fast-weight q, k, v
    no_v_silu: bool = False  # with qkv_silu: silu on q, k only
    attn_qk_norm: bool = False  # RMSNorm on q, k over the full width (the released configs: off)
    ttt_nope: bool = False  # no RoPE on the fast-weight q, k
    base_lr: float = 1e-3  # per-token learning rate at init
    rope_theta: float = 10_000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    ttt_norm_eps: float = 1e-5  # per-head output RMSNorm (fla's RMSNorm default)
    scan_unroll: bool = False  # unroll the chunk scan (XLA's cost analysis counts a rolled body once)

    def __post_init__(self):
        super().__post_init__()
        d = self.d_model
        if d % self.n_heads:
            raise ValueError(f"d_model ({d}) must be divisible by n_heads ({self.n_heads})")
        if (d // self.n_heads) % 2:
            raise ValueError(f"attention head dim d_model/n_heads = {d // self.n_heads} must be even (RoPE)")
        if d % self.n_lact_heads:
            raise ValueError(f"d_model ({d}) must be divisible by n_lact_heads ({self.n_lact_heads})")
        if self.chunk_size < 1 or self.window < 1:
            raise ValueError(f"chunk_size ({self.chunk_size}) and window ({self.window}) must be >= 1")
        if self.inter_multi <= 0 or int(self.fw_head_dim * self.inter_multi) < 1:
            raise ValueError(f"inter_multi ({self.inter_multi}) must give a fast hidden width >= 1")
        if self.w0_w2_low_rank == 0 or self.w0_w2_low_rank < -1:
            raise ValueError(f"w0_w2_low_rank ({self.w0_w2_low_rank}) must be a positive rank or -1 (off)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def fw_head_dim(self) -> int:
        return self.d_model // self.n_lact_heads

    @property
    def fw_hidden(self) -> int:
        return int(self.fw_head_dim * self.inter_multi)


def _released_lm_config(d_model: int) -> LaCTConfig:
    """The released LM configs (lact_llm/configs/*_nh4_fwlow_rank_momentum_muon.json).

    The block MLP is fla's GatedMLP with hidden_ratio 4: width round_up(8/3 D, 256).
    """
    d_ff = 256 * math.ceil(int(d_model * 4 * 2 / 3) / 256)
    return LaCTConfig(
        vocab_size=32_000,
        d_model=d_model,
        n_layers=24,
        n_heads=24,
        n_lact_heads=4,
        inter_multi=1.0,
        d_ff=d_ff,
        window=2048,
        chunk_size=2048,
        use_muon=True,
        use_momentum=True,
        learnable_ttt_scale=True,
        w0_w2_low_rank=32,
        fw_init_gain=0.5,
        rope_theta=1e6,
        tie_embeddings=False,
        dtype="bfloat16",
    )


PRESETS = {
    # ~0.5M parameters, chunks and window of 64 tokens: CPU tests and the passkey demo.
    "tiny": LaCTConfig(),
    "760m": _released_lm_config(1536),
    "3b": _released_lm_config(3072),
}


# ---------------------------------------------------------------------------- the fast-weight op


def _mm(spec: str, a: jax.Array, b: jax.Array, dtype) -> jax.Array:
    """einsum in the compute dtype with fp32 accumulation and fp32 result."""
    return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


def l2_normalize(x: jax.Array, eps: float = 1e-5) -> jax.Array:
    """x / (||x||_2 + eps) over the last axis, computed in fp32 (as the original `l2_norm`)."""
    x32 = x.astype(jnp.float32)
    return (x32 / (jnp.linalg.norm(x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def fast_weight_apply(w0: jax.Array, w1: jax.Array, w2: jax.Array, x: jax.Array, dtype=jnp.float32) -> jax.Array:
    """f_W(x) = W1 (silu(W0 x) * (W2 x)) row-wise.

    Args:
      w0, w2: [..., Dh, Dk]; w1: [..., Dv, Dh]; x: [..., L, Dk].

    Returns:
      [..., L, Dv] in fp32.
    """
    gate = _mm("...hk,...lk->...lh", w0, x, dtype)  # [..., L, Dh]
    up = _mm("...hk,...lk->...lh", w2, x, dtype)
    return _mm("...vh,...lh->...lv", w1, jax.nn.silu(gate) * up, dtype)


def inner_loss(w0, w1, w2, k, v, lr) -> jax.Array:
    """The TTT inner loss -sum_t lr_t <f_W(k_t), v_t> (fp32), summed over all leading dims.

    Args:
      k: [..., L, Dk]; v: [..., L, Dv]; lr: [..., L] per-token learning rate.
    """
    return -jnp.sum(lr * jnp.sum(fast_weight_apply(w0, w1, w2, k) * v, axis=-1))


def fast_weight_grads(w0, w1, w2, k, v, lr0, lr1, lr2, dtype=jnp.float32):
    """Explicit negative gradients G_j = -dL_j/dW_j of the inner loss, L_j using lr_j.

    Manual backprop of f through the SwiGLU (ttt_operation.py), with g = W0 k, u = W2 k:
      h = silu(g) u;  dh = W1^T v;  du = dh silu(g);  dg = dh u sigmoid(g) (1 + g (1 - sigmoid(g)))
      G1 = sum_t lr1_t v_t h_t^T;  G0 = sum_t lr0_t dg_t k_t^T;  G2 = sum_t lr2_t du_t k_t^T.

    Args:
      w0, w2: [..., Dh, Dk]; w1: [..., Dv, Dh]; k: [..., L, Dk]; v: [..., L, Dv];
      lr0, lr1, lr2: [..., L] fp32.

    Returns:
      (G0, G1, G2) fp32, shaped like (w0, w1, w2).
    """
    g = _mm("...hk,...lk->...lh", w0, k, dtype)  # [..., L, Dh]
    u = _mm("...hk,...lk->...lh", w2, k, dtype)
    sig = jax.nn.sigmoid(g)
    silu_g = g * sig
    h = silu_g * u
    dh = _mm("...vh,...lv->...lh", w1, v, dtype)  # [..., L, Dh]
    du = dh * silu_g
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    g1 = _mm("...lv,...lh->...vh", v, h * lr1[..., None], dtype)
    g0 = _mm("...lh,...lk->...hk", dg, k.astype(jnp.float32) * lr0[..., None], dtype)
    g2 = _mm("...lh,...lk->...hk", du, k.astype(jnp.float32) * lr2[..., None], dtype)
    return g0, g1, g2


def newton_schulz5(g: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Approximate orthogonalisation (zeroth matrix power) of g [..., m, n] by 5 Newton-Schulz steps.

    X = G / ||G||_F (transposed when m > n), then X <- a X + (b A + c A^2) X with A = X X^T for the
    per-step coefficients `NS_COEFFS` (Muon; Jordan et al. 2024). Runs in `dtype` (bf16 upstream).

    Returns:
      [..., m, n] fp32 with singular values close to 1.
    """
    transpose = g.shape[-2] > g.shape[-1]
    x = jnp.swapaxes(g, -1, -2) if transpose else g
    x32 = x.astype(jnp.float32)
    x = (x32 / (jnp.linalg.norm(x32, axis=(-2, -1), keepdims=True) + 1e-7)).astype(dtype)
    for a, b, c in NS_COEFFS:
        gram = _mm("...ij,...kj->...ik", x, x, dtype).astype(dtype)  # A = X X^T
        poly = (b * gram + c * _mm("...ij,...jk->...ik", gram, gram, dtype)).astype(dtype)
        x = (a * x.astype(jnp.float32) + _mm("...ij,...jk->...ik", poly, x, dtype)).astype(dtype)
    x = x.astype(jnp.float32)
    return jnp.swapaxes(x, -1, -2) if transpose else x


def row_norms(w: jax.Array) -> jax.Array:
    """||W_i||_2 over the input dim (last axis): [..., out, 1]."""
    return jnp.linalg.norm(w.astype(jnp.float32), axis=-1, keepdims=True)


def fast_weight_update(weights, momentum, norms, k, v, lr, m, *, use_muon: bool, dtype=jnp.float32):
    """One chunk's update of the fast weights (steps 2-5 of the recurrence in the module docstring).

    Args:
      weights: (W0, W1, W2) fp32 [..., Dh, Dk], [..., Dv, Dh], [..., Dh, Dk].
      momentum: previous (G0, G1, G2) or None (no momentum).
      norms: initial row norms of (W0, W1, W2), [..., out, 1] each.
      k: [..., C, Dk]; v: [..., C, Dv]; lr: [..., C, 3] fp32; m: [..., C] fp32 momentum or None.

    Returns:
      (new weights, new momentum or None).
    """
    grads = fast_weight_grads(*weights, k, v, lr[..., 0], lr[..., 1], lr[..., 2], dtype)
    if momentum is not None:
        # Momentum: one coefficient per chunk, the mean of the per-token ones.
        m_bar = jnp.mean(m, axis=-1)[..., None, None]
        grads = tuple(g + m_bar * p for g, p in zip(grads, momentum))
        momentum = grads
    if use_muon:
        grads = tuple(newton_schulz5(g, dtype) for g in grads)
    # Gradient step, then each row back to its initial norm.
    new = tuple(w + g for w, g in zip(weights, grads))
    new = tuple(w / (row_norms(w) + 1e-5) * n for w, n in zip(new, norms))
    return new, momentum


def block_causal_lact(
    weights,
    q,
    k,
    v,
    lr,
    m=None,
    *,
    chunk_size: int,
    use_muon: bool,
    dtype=jnp.float32,
    unroll: bool = False,
    return_state: bool = False,
):
    """Shifted block-causal LaCT over a whole sequence: a `lax.scan` of apply-then-update per chunk.

    Token t in chunk c = t // C is answered by the fast weights updated with chunks 0..c-1 only.

    Args:
      weights: initial (W0, W1, W2) fp32, [B, H, Dh, Dk], [B, H, Dv, Dh], [B, H, Dh, Dk].
      q, k: [B, H, T, Dk]; v: [B, H, T, Dv]; lr: [B, H, T, 3] fp32; m: [B, H, T] fp32 or None.
      unroll: fully unroll the scan over chunks.
      return_state: also return the fast weights and momentum after every *complete* chunk has
        updated them, as token-by-token decoding holds them after the last token (a final
        complete chunk updates them too; a partial one does not).

    Returns:
      [B, H, T, Dv] fp32; with `return_state`, (that, (W0, W1, W2), momentum or None).
    """
    t = q.shape[2]
    c = chunk_size
    n = -(-t // c)  # chunks, the last one possibly partial
    pad = n * c - t

    def chunks(x):  # [B, H, T, ...] -> [N, B, H, C, ...]
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
        x = x.reshape(x.shape[:2] + (n, c) + x.shape[3:])
        return jnp.moveaxis(x, 2, 0)

    qc, kc, vc, lrc = chunks(q), chunks(k), chunks(v), chunks(lr)
    mc = chunks(m) if m is not None else None
    weights = tuple(w.astype(jnp.float32) for w in weights)
    norms = tuple(row_norms(w) for w in weights)
    momentum = tuple(jnp.zeros_like(w) for w in weights) if m is not None else None

    def body(carry, xs):
        ws, mom = carry
        q_i, k_i, v_i, lr_i, m_i = xs
        out = fast_weight_apply(*ws, q_i, dtype)  # apply before the update
        ws, mom = fast_weight_update(ws, mom, norms, k_i, v_i, lr_i, m_i, use_muon=use_muon, dtype=dtype)
        return (ws, mom), out

    # Apply-then-update over the chunks that update (all but the last; with `return_state`, every
    # complete chunk), then apply only on what is left.
    n_scan = t // c if return_state else n - 1
    head = jax.tree.map(lambda x: x[:n_scan], (qc, kc, vc, lrc, mc))
    (weights, momentum), out = jax.lax.scan(body, (weights, momentum), head, unroll=unroll)  # [n_scan,B,H,C,Dv]
    if n_scan < n:
        last = fast_weight_apply(*weights, qc[-1], dtype)  # the last chunk is applied only
        out = jnp.concatenate([out, last[None]], axis=0)
    out = jnp.moveaxis(out, 0, 2).reshape(q.shape[:2] + (n * c, v.shape[-1]))[:, :, :t]
    return (out, weights, momentum) if return_state else out


# ---------------------------------------------------------------------------- modules


class FastWeightInit(nnx.Module):
    """Learned initial fast weights [H, out, in]: full, or W = L R + 0.5 I (low rank; LowRankFastWeight)."""

    def __init__(self, heads: int, d_out: int, d_in: int, *, rank: int, gain: float, rngs: nnx.Rngs):
        self.rank = rank
        if rank > 0:
            self.left = param(
                rngs, nnx.initializers.normal(gain / math.sqrt(rank)), (heads, d_out, rank), ("heads", None, None)
            )
            self.right = param(
                rngs, nnx.initializers.normal(gain / math.sqrt(d_in)), (heads, rank, d_in), ("heads", None, None)
            )
        else:
            self.weight = param(
                rngs, nnx.initializers.normal(1.0 / math.sqrt(d_in)), (heads, d_out, d_in), ("heads", None, None)
            )

    def __call__(self) -> jax.Array:  # [H, out, in] fp32
        if self.rank > 0:
            w = jnp.einsum("hor,hri->hoi", self.left[...], self.right[...])
            return w + 0.5 * jnp.eye(w.shape[1], w.shape[2], dtype=w.dtype)
        return self.weight[...]


class LaCTLayer(nnx.Module):
    """Shared q/k/v; sliding-window attention + large-chunk TTT branch, summed, then o_proj."""

    def __init__(self, cfg: LaCTConfig, *, rngs: nnx.Rngs):
        d, h, dk, dh = cfg.d_model, cfg.n_lact_heads, cfg.fw_head_dim, cfg.fw_hidden
        self.cfg = cfg
        self.wq = Linear(d, d, axes=("embed", "heads"), rngs=rngs, dtype=cfg.dtype)
        self.wk = Linear(d, d, axes=("embed", "heads"), rngs=rngs, dtype=cfg.dtype)
        self.wv = Linear(d, d, axes=("embed", "heads"), rngs=rngs, dtype=cfg.dtype)
        self.wo = Linear(
            d, d, axes=("heads", "embed"), rngs=rngs, dtype=cfg.dtype, init_std=d**-0.5 / (2 * cfg.n_layers) ** 0.5
        )
        self.q_norm = RMSNorm(d, rngs=rngs, eps=cfg.norm_eps) if cfg.attn_qk_norm else None
        self.k_norm = RMSNorm(d, rngs=rngs, eps=cfg.norm_eps) if cfg.attn_qk_norm else None
        # Learned initial fast weights.
        self.w0 = FastWeightInit(h, dh, dk, rank=cfg.w0_w2_low_rank, gain=cfg.fw_init_gain, rngs=rngs)
        self.w2 = FastWeightInit(h, dh, dk, rank=cfg.w0_w2_low_rank, gain=cfg.fw_init_gain, rngs=rngs)
        self.w1 = FastWeightInit(h, dk, dh, rank=-1, gain=1.0, rngs=rngs)
        # Per-token learning rates (3 per head: lr0, lr1, lr2 interleaved as [head, matrix]).
        self.lr_proj = Linear(d, 3 * h, axes=("embed", None), rngs=rngs, use_bias=True, dtype=cfg.dtype)
        self.qk_scale = param(rngs, nnx.initializers.ones, (d, 2), ("embed", None), wd=False)
        self.qk_offset = param(rngs, nnx.initializers.zeros, (d, 2), ("embed", None), wd=False)
        self.ttt_norm = RMSNorm(dk, rngs=rngs, eps=cfg.ttt_norm_eps)
        self.ttt_scale_proj = (
            Linear(d, h, axes=("embed", None), rngs=rngs, use_bias=True, dtype=cfg.dtype)
            if cfg.learnable_ttt_scale
            else None
        )
        self.momentum_proj = (
            Linear(d, h, axes=("embed", None), rngs=rngs, use_bias=True, dtype=cfg.dtype) if cfg.use_momentum else None
        )

    def initial_fast_weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(W0 [H, Dh, Dk], W1 [H, Dv, Dh], W2 [H, Dh, Dk]) fp32."""
        return self.w0(), self.w1(), self.w2()

    def project(self, x: jax.Array, positions: jax.Array) -> dict[str, jax.Array]:
        """Both branches' inputs for x [B, T, D] at positions [T]."""
        cfg = self.cfg
        b, t, d = x.shape
        h, a = cfg.n_lact_heads, cfg.n_heads
        q, k, v = self.wq(x), self.wk(x), self.wv(x)  # [B, T, D]
        if cfg.attn_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # Fast-weight q, k: per-channel affine of the shared q, k.
        scale, offset = self.qk_scale[...].astype(q.dtype), self.qk_offset[...].astype(q.dtype)
        fq, fk, fv = q * scale[:, 0] + offset[:, 0], k * scale[:, 1] + offset[:, 1], v
        heads = lambda z: z.reshape(b, t, h, cfg.fw_head_dim)  # noqa: E731
        fq, fk, fv = heads(fq), heads(fk), heads(fv)
        if cfg.qkv_silu:
            fq, fk = jax.nn.silu(fq), jax.nn.silu(fk)
            fv = fv if cfg.no_v_silu else jax.nn.silu(fv)
        fq, fk = l2_normalize(fq), l2_normalize(fk)
        attn_heads = lambda z: z.reshape(b, t, a, cfg.head_dim)  # noqa: E731
        if not cfg.ttt_nope:  # the attention branch's RoPE, on the attention-head split
            fq = apply_rope(attn_heads(fq), positions, cfg.rope_theta).reshape(b, t, h, -1)
            fk = apply_rope(attn_heads(fk), positions, cfg.rope_theta).reshape(b, t, h, -1)
        # Per-token learning rates ("mamba" parameterisation) and momentum, fp32.
        inv_sp = self.cfg.base_lr + math.log(-math.expm1(-self.cfg.base_lr))
        lr = jax.nn.softplus(self.lr_proj(x).astype(jnp.float32) + inv_sp).reshape(b, t, h, 3)
        mom = jax.nn.sigmoid(self.momentum_proj(x).astype(jnp.float32)) if cfg.use_momentum else None
        to_bhtd = lambda z: jnp.moveaxis(z, 1, 2)  # noqa: E731  [B, T, H, ...] -> [B, H, T, ...]
        return {
            "q": apply_rope(attn_heads(q), positions, cfg.rope_theta),
            "k": apply_rope(attn_heads(k), positions, cfg.rope_theta),
            "v": attn_heads(v),
            "fq": to_bhtd(fq),
            "fk": to_bhtd(fk),
            "fv": to_bhtd(fv),
            "lr": to_bhtd(lr),
            "mom": to_bhtd(mom) if mom is not None else None,
        }

    def combine(self, x: jax.Array, o_attn: jax.Array, o_ttt: jax.Array) -> jax.Array:
        """o_attn [B, T, A, P] + scaled per-head-normed o_ttt [B, H, T, Dv] -> o_proj -> [B, T, D]."""
        b, t = x.shape[:2]
        o_ttt = rms_norm(jnp.moveaxis(o_ttt, 1, 2), self.ttt_norm.scale[...], self.cfg.ttt_norm_eps)  # [B,T,H,Dv]
        if self.ttt_scale_proj is not None:
            o_ttt = o_ttt * jax.nn.silu(self.ttt_scale_proj(x).astype(jnp.float32))[..., None]
        o = o_attn.reshape(b, t, -1).astype(jnp.float32) + o_ttt.reshape(b, t, -1)
        return self.wo(o.astype(jnp.dtype(self.cfg.dtype)))

    def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:  # [B, T, D]
        """The parallel form. Packed rows (segment ids) run the exact token-by-token form instead:
        every document restarts the fast weights and its own chunk grid, which the chunk-parallel
        form cannot express (train LaCT at scale with decomposition buckets, which never pack)."""
        if ctx.segment_ids is not None:
            b, t, _ = x.shape
            return scan_over_time(self.decode, x, self.init_state(b, t), ctx)[0]
        _, o_attn, o_ttt = self._parallel(x, ctx)
        return self.combine(x, o_attn, o_ttt)

    def _parallel(self, x: jax.Array, ctx: Context, return_state: bool = False):
        """Projections z, window attention and the chunk-parallel TTT output from the initial fast
        weights (with return_state: (output, fast weights, momentum) after the last complete chunk)."""
        cfg = self.cfg
        z = self.project(x, ctx.positions)
        spec = AttentionSpec("window", window=cfg.window)
        o_attn = self_attention(
            z["q"], z["k"], z["v"], spec=spec, positions=ctx.positions, implementation=cfg.implementation
        )
        weights = tuple(jnp.broadcast_to(w, (x.shape[0],) + w.shape) for w in self.initial_fast_weights())
        ttt = block_causal_lact(
            weights,
            z["fq"],
            z["fk"],
            z["fv"],
            z["lr"],
            z["mom"],
            chunk_size=cfg.chunk_size,
            use_muon=cfg.use_muon,
            dtype=jnp.dtype(cfg.dtype),
            unroll=cfg.scan_unroll,
            return_state=return_state,
        )
        return z, o_attn, ttt

    def init_state(self, batch_size: int, max_length: int) -> dict[str, jax.Array]:
        """Decoding state of one layer (see the module docstring)."""
        cfg = self.cfg
        b, h, c, dk = batch_size, cfg.n_lact_heads, cfg.chunk_size, cfg.fw_head_dim
        s = min(cfg.window, max_length)
        dt = jnp.dtype(cfg.dtype)
        ws = self.initial_fast_weights()
        state = {
            "k": jnp.zeros((b, s, cfg.n_heads, cfg.head_dim), dt),
            "v": jnp.zeros((b, s, cfg.n_heads, cfg.head_dim), dt),
            "kpos": jnp.full((b, s), -1, jnp.int32),  # position held by each ring-buffer slot (-1: empty)
            "w0": jnp.broadcast_to(ws[0], (b,) + ws[0].shape),
            "w1": jnp.broadcast_to(ws[1], (b,) + ws[1].shape),
            "w2": jnp.broadcast_to(ws[2], (b,) + ws[2].shape),
            "kbuf": jnp.zeros((b, h, c, dk), dt),
            "vbuf": jnp.zeros((b, h, c, dk), dt),
            "lrbuf": jnp.zeros((b, h, c, 3), jnp.float32),
        }
        if cfg.use_momentum:
            state.update({f"m{j}": jnp.zeros_like(state[f"w{j}"]) for j in range(3)})
            state["mbuf"] = jnp.zeros((b, h, c), jnp.float32)
        return state

    def prefill(self, x: jax.Array, state: dict[str, jax.Array], ctx: Context):
        """T tokens continuing from `state`. Into an empty cache (ctx.index == 0: a prompt) the
        parallel form runs and the decoding state is built from its pieces; continuing a filled
        cache decodes token by token (the chunk grid and the ring buffer follow the positions)."""
        if x.shape[1] == 1:
            return self.decode(x, state, ctx)

        def sequential(x, state, ctx):
            return scan_over_time(self.decode, x, state, ctx)

        if isinstance(ctx.index, int):  # known when tracing (e.g. `zoo.generate`'s prompt): one branch
            return (self._prefill_empty if ctx.index == 0 else sequential)(x, state, ctx)
        return jax.lax.cond(ctx.index == 0, self._prefill_empty, sequential, x, state, ctx)

    def _prefill_empty(self, x: jax.Array, state: dict[str, jax.Array], ctx: Context):
        """The parallel form of T tokens at positions 0..T-1 and the state decoding them would leave:
        the fast weights (and momentum) after every complete chunk, the partial chunk's buffers, and
        the ring buffer of the last S keys at slots position mod S."""
        cfg = self.cfg
        t = x.shape[1]
        z, o_attn, (o_ttt, weights, momentum) = self._parallel(x, ctx, return_state=True)
        new = dict(state)
        new["w0"], new["w1"], new["w2"] = weights
        if cfg.use_momentum:
            new["m0"], new["m1"], new["m2"] = momentum
        # The chunk buffers as decoding leaves them: the partial chunk after the last complete one at
        # indices 0..r-1, the last complete chunk's tokens (already used) after it.
        c = cfg.chunk_size
        done = (t // c) * c
        for name, key in (("kbuf", "fk"), ("vbuf", "fv"), ("lrbuf", "lr")) + (
            (("mbuf", "mom"),) if cfg.use_momentum else ()
        ):
            if done:
                new[name] = z[key][:, :, done - c : done].astype(new[name].dtype)
            if t > done:
                new[name] = new[name].at[:, :, : t - done].set(z[key][:, :, done:].astype(new[name].dtype))
        # Ring buffer: the last S keys (positions t - S' .. t - 1) at slots position mod S.
        s = state["k"].shape[1]
        keep = min(s, t)
        slots = jnp.arange(t - keep, t) % s  # [S']
        new["k"] = new["k"].at[:, slots].set(z["k"][:, t - keep :].astype(new["k"].dtype))
        new["v"] = new["v"].at[:, slots].set(z["v"][:, t - keep :].astype(new["v"].dtype))
        new["kpos"] = new["kpos"].at[:, slots].set(ctx.positions[:, t - keep :])
        return self.combine(x, o_attn, o_ttt), new

    def decode(self, x: jax.Array, state: dict[str, jax.Array], ctx: Context):
        """One token x [B, 1, D] at positions ctx.positions [B, 1] -> (output [B, 1, D], new state).

        Each row has its own position within its document; position 0 starts a document and resets
        that row's state (a no-op on a fresh state), so packed rows decode document by document.
        """
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        b = x.shape[0]
        pos = ctx.positions[:, 0]  # [B]
        fresh = self.init_state(b, state["k"].shape[1])
        state = jax.tree.map(
            lambda f, s: jnp.where((pos == 0).reshape((-1,) + (1,) * (s.ndim - 1)), f, s), fresh, state
        )
        z = self.project(x, ctx.positions)

        def put(buf, val, idx, axis):  # write val [B, ..., 1, ...] at index idx [B] of `axis`, per row
            hit = jax.nn.one_hot(idx, buf.shape[axis], dtype=bool).reshape(
                (b,) + (1,) * (axis - 1) + (buf.shape[axis],) + (1,) * (buf.ndim - axis - 1)
            )
            return jnp.where(hit, val.astype(buf.dtype), buf)

        # Window branch: ring buffer of the last S keys, slot pos mod S, with the positions they hold.
        s = state["k"].shape[1]
        slot = pos % s
        state["k"], state["v"] = put(state["k"], z["k"], slot, 1), put(state["v"], z["v"], slot, 1)
        state["kpos"] = put(state["kpos"], pos[:, None], slot, 1)
        o_attn = attend(
            z["q"],
            state["k"],
            state["v"],
            q_pos=ctx.positions,
            k_pos=state["kpos"],
            spec=AttentionSpec("window", window=cfg.window),
            k_valid=state["kpos"] >= 0,
        )
        # TTT branch: answer with the current fast weights, then buffer k, v, lr (and momentum).
        weights = (state["w0"], state["w1"], state["w2"])
        o_ttt = fast_weight_apply(*weights, z["fq"], dt)  # [B, H, 1, Dv]
        idx = pos % cfg.chunk_size
        state["kbuf"], state["vbuf"] = put(state["kbuf"], z["fk"], idx, 2), put(state["vbuf"], z["fv"], idx, 2)
        state["lrbuf"] = put(state["lrbuf"], z["lr"], idx, 2)
        if cfg.use_momentum:
            state["mbuf"] = put(state["mbuf"], z["mom"], idx, 2)
        momentum = tuple(state[f"m{j}"] for j in range(3)) if cfg.use_momentum else None
        norms = tuple(row_norms(w) for w in self.initial_fast_weights())
        full = idx == cfg.chunk_size - 1  # [B]: this row's chunk is complete

        def update(operand):
            ws, mom = operand
            new_ws, new_mom = fast_weight_update(
                ws,
                mom,
                norms,
                state["kbuf"],
                state["vbuf"],
                state["lrbuf"],
                state.get("mbuf"),
                use_muon=cfg.use_muon,
                dtype=dt,
            )
            keep = lambda new, old: jnp.where(full.reshape((-1,) + (1,) * (old.ndim - 1)), new, old)  # noqa: E731
            return jax.tree.map(keep, (new_ws, new_mom), (ws, mom))

        # A full chunk updates the fast weights for the next chunk (only the rows whose chunk is full).
        weights, momentum = jax.lax.cond(jnp.any(full), update, lambda o: o, (weights, momentum))
        state["w0"], state["w1"], state["w2"] = weights
        if cfg.use_momentum:
            state["m0"], state["m1"], state["m2"] = momentum
        return self.combine(x, o_attn, o_ttt), state


@registry.register("lact", PRESETS)
class LaCT(LanguageModel):
    """Decoder-only LaCT LM following the zoo's model protocol."""

    paper = "LaCT (Zhang et al. 2025), large-chunk test-time training"
    numerical_core = "XLA chunk recurrence + window attention"
    attention = "dispatch"

    def __init__(self, cfg: LaCTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=cfg.dtype)
        self.blocks = make_stack(cfg, lambda i: PreNormBlock(lambda: LaCTLayer(cfg, rngs=rngs), cfg, rngs=rngs))
        self.final_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps)
        self.unembed = (
            None
            if cfg.tie_embeddings
            else Linear(cfg.d_model, cfg.vocab_size, axes=("embed", "vocab"), rngs=rngs, dtype=cfg.dtype)
        )

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        return self.embed(tokens).astype(jnp.float32)

    def logits(self, x: jax.Array) -> jax.Array:
        return lm_logits(self.final_norm(x), self.embed, self.unembed, self.config.d_model**-0.5)
