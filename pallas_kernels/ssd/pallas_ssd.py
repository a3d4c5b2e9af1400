"""Pallas kernels for the chunked SSD forward (Mamba-2, Dao & Gu 2024, Sec. 6, Listing 1).

The chunk pipeline (see `xla.py` for the four steps) runs as:

  * `_chunk_state_kernel` (pallas_call, grid (B, H, T/Q)): step 2, the state each chunk adds,
    S_c = sum_j exp(a_end - a_j) dt_j x_j B_j^T  -> [B,H,c,P,N] float32;
  * state passing (step 3): a `lax.scan` over the T/Q chunks in XLA (T/Q small, [B,H,P,N] carry);
  * `_chunk_scan_kernel` (pallas_call, grid (B, H, T/Q)): steps 1 and 4 fused, the intra-chunk
    quadratic form (L o C B^T)(dt x) plus the state -> output term exp(a_i) C_i s_c  -> [B,H,T,P].

The within-chunk cumulative log-decays a (a cheap cumsum), the skip term D x and the gate silu(z) are
computed in XLA, which fuses them with the layout transposes around the kernels.

One kernel source serves both lowerings. Every block has its last two dims either full or
(Q, full) with Q a multiple of 8, which Mosaic (TPU) accepts; the grid is fully parallel. On GPU
(Triton) the block dims must be powers of two of at least 16 for `tl.dot`, so P and N are zero-padded
to such sizes there (zero columns of B/C and x change nothing) and Q must be a power of two.
Matmul operands stay in the input dtype with float32 accumulation (HIGHEST precision for float32
inputs, so no TF32 / bf16 passes); decays, masks and states are float32.

Numerics: inside a chunk the decay is exp(min(a_i - a_j, 0)) (the difference of chunk-local cumsums,
as in the Triton kernels; the clamp guards rounding), masked to 0 above the diagonal and across
sequence boundaries; the kernels are not differentiated (see api.py for the backward).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ssd import reference
from pallas_kernels.ssd import xla


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Block sizes of the SSD kernels.

    Attributes:
      chunk_size: Q, the time block of both kernels (multiple of 8; a power of two >= 16 on GPU).
      head_dim: the P block (None: full P on TPU/CPU, next power of two >= 16 on GPU).
      d_state: the N block (None: full N on TPU/CPU, next power of two >= 16 on GPU).
    """

    chunk_size: int = 256
    head_dim: int | None = None
    d_state: int | None = None

    @classmethod
    def for_backend(cls, chunk_size, head_dim, d_state, backend):
        """Block sizes for `backend` ("gpu" pads P and N for Triton)."""
        if backend == "gpu":
            return cls(chunk_size, _pow2_at_least_16(head_dim), _pow2_at_least_16(d_state))
        return cls(chunk_size, head_dim, d_state)


def _pow2_at_least_16(n):
    return max(16, 1 << (n - 1).bit_length())


def _target_backend(interpret):
    """ "tpu", "gpu" or "cpu" for the lowering the kernels will get."""
    if isinstance(interpret, pltpu.InterpretParams):
        return "tpu"
    return jax.default_backend()


def check_config(chunk_size, interpret):
    """Raises ValueError if the pallas path cannot run `chunk_size` with this `interpret` setting."""
    backend = _target_backend(interpret)
    if backend == "cpu" and interpret is False:
        raise ValueError(
            "ssd: implementation='pallas' on CPU needs interpret=True (or a "
            "pltpu.InterpretParams()); or use implementation='xla'."
        )
    if chunk_size % 8:
        raise ValueError(
            f"ssd: chunk_size={chunk_size} must be a multiple of 8 for the pallas "
            f"kernels (TPU tiling); use 64, 128 or 256."
        )
    if backend == "gpu" and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        raise ValueError(
            f"ssd: chunk_size={chunk_size} must be a power of two >= 16 for the Triton kernels; use 64, 128 or 256."
        )


def _compiler_params(backend):
    if backend == "tpu":
        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
    if backend == "gpu":
        from jax.experimental.pallas import triton as pl_triton  # pylint: disable=g-import-not-at-top

        return pl_triton.CompilerParams(num_warps=4, num_stages=2)
    return None


def _dot(a, b, contract, dtype):
    """a @ b contracting dims `contract` = (lhs_dim, rhs_dim), operands in `dtype`, fp32 result."""
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return jax.lax.dot_general(
        a.astype(dtype),
        b.astype(dtype),
        ((contract[:1], contract[1:]), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def _chunk_state_kernel(*refs, has_seg, mm_dtype):
    """Step 2 for one (batch, head, chunk): S_c = sum_j exp(a_end - a_j) dt_j x_j B_j^T  [P,N]."""
    if has_seg:
        x_ref, dt_ref, acum_ref, aend_ref, b_ref, seg_ref, segend_ref, out_ref = refs
    else:
        x_ref, dt_ref, acum_ref, aend_ref, b_ref, out_ref = refs
    # Weight of token j: its decay to the chunk end times dt_j (0 outside the last segment).
    w = jnp.exp(aend_ref[...] - acum_ref[...]) * dt_ref[...]  # [Q,1]
    if has_seg:
        w = jnp.where(seg_ref[...] == segend_ref[...], w, 0.0)
    xw = x_ref[...].astype(jnp.float32) * w  # [Q,P]
    # Contract over the chunk's tokens: (x w)^T B.
    out_ref[...] = _dot(xw, b_ref[...], (0, 0), mm_dtype)  # [P,N]


def _chunk_scan_kernel(*refs, has_seg, mm_dtype):
    """Steps 1 + 4 for one (batch, head, chunk): (L o C B^T)(dt x) + exp(a_i) C_i s_c  [Q,P]."""
    if has_seg:
        (x_ref, dt_ref, acum_ref, acum_row_ref, b_ref, c_ref, s_ref, seg_ref, seg_row_ref, segprev_ref, y_ref) = refs
    else:
        x_ref, dt_ref, acum_ref, acum_row_ref, b_ref, c_ref, s_ref, y_ref = refs
    c = c_ref[...]  # [Q,N]
    acum = acum_ref[...]  # [Q,1]
    # Intra-chunk: decay matrix L[i,j] = exp(a_i - a_j) on the causal (same-sequence) part.
    cb = _dot(c, b_ref[...], (1, 1), mm_dtype)  # [Q,Q]
    q = cb.shape[0]
    causal = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0) >= jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    if has_seg:
        causal = causal & (seg_ref[...] == seg_row_ref[...])
    decay = jnp.exp(jnp.minimum(acum - acum_row_ref[...], 0.0))  # [Q,Q]
    scores = jnp.where(causal, cb * decay, 0.0)  # [Q,Q]
    xdt = x_ref[...].astype(jnp.float32) * dt_ref[...]  # [Q,P]
    y = _dot(scores, xdt, (1, 0), mm_dtype)  # [Q,P]
    # State -> output: the carried state read out by C, decayed from the chunk start.
    w_out = jnp.exp(acum)  # [Q,1]
    if has_seg:
        w_out = jnp.where(seg_ref[...] == segprev_ref[...], w_out, 0.0)
    y_ref[...] = y + _dot(c, s_ref[...], (1, 1), mm_dtype) * w_out  # [Q,P]


def ssd_pallas(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size=256,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus=False,
    initial_states=None,
    seq_idx=None,
    interpret=False,
    block_sizes: BlockSizes | None = None,
    backend: str | None = None,
):
    """Chunked SSD forward with Pallas kernels.

    Args: as `pallas_kernels.ssd.api.ssd`, plus
      block_sizes: kernel block sizes (default `BlockSizes.for_backend`).
      backend: "tpu" or "gpu" to lower for that platform regardless of the default backend (for
        `jax.export(..., platforms=...)` on another machine); None follows `interpret` / the default.

    Returns:
      (y [B,T,H,P] in x.dtype, final state [B,H,P,N] float32).
    """
    batch, seqlen, num_heads, head_dim = x.shape
    num_groups, d_state = B.shape[-2:]
    rep = num_heads // num_groups
    backend = backend or _target_backend(interpret)
    if block_sizes is None:
        block_sizes = BlockSizes.for_backend(chunk_size, head_dim, d_state, backend)
    q = block_sizes.chunk_size
    p_blk, n_blk = block_sizes.head_dim, block_sizes.d_state
    num_chunks = -(-seqlen // q)
    tp = num_chunks * q
    pad = tp - seqlen
    f32 = jnp.float32
    mm_dtype = jnp.promote_types(x.dtype, B.dtype)
    has_seg = seq_idx is not None

    # Head-major layouts with time padded to T/Q chunks (dt = 0 there) and P, N padded to the blocks.
    dtf = xla.pad_time(reference.process_dt(dt, dt_bias, dt_softplus), pad)  # [B,Tp,H]
    x_h = jnp.pad(jnp.transpose(x, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, pad), (0, p_blk - head_dim)))  # [B,H,Tp,Pb]
    b_g = jnp.pad(jnp.transpose(B, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, pad), (0, n_blk - d_state)))  # [B,G,Tp,Nb]
    c_g = jnp.pad(jnp.transpose(C, (0, 2, 1, 3)), ((0, 0), (0, 0), (0, pad), (0, n_blk - d_state)))  # [B,G,Tp,Nb]
    dt_h = jnp.transpose(dtf, (0, 2, 1))  # [B,H,Tp]
    # Within-chunk cumulative log-decay a_i (fp32) in column, row and chunk-end layouts.
    acum = jnp.cumsum(
        dt_h.reshape(batch, num_heads, num_chunks, q) * A.astype(f32)[None, :, None, None], axis=-1
    )  # [B,H,c,Q]
    acum_col = acum.reshape(batch, num_heads, tp, 1)  # [B,H,Tp,1]
    acum_row = acum[:, :, :, None, :]  # [B,H,c,1,Q]
    a_end = acum[..., -1:, None]  # [B,H,c,1,1]
    dt_col = dt_h[..., None]  # [B,H,Tp,1]
    if has_seg:
        seg = xla.pad_time(reference.segment_ids(seq_idx), pad, "edge")  # [B,Tp]
        seg_c = seg.reshape(batch, num_chunks, q)  # [B,c,Q]
        seg_end = seg_c[:, :, -1]  # [B,c]
        seg_prev = jnp.concatenate([jnp.zeros_like(seg_end[:, :1]), seg_end[:, :-1]], axis=1)  # [B,c]
        seg_col = seg[..., None]  # [B,Tp,1]
        seg_row = seg_c[:, :, None, :]  # [B,c,1,Q]

    grid = (batch, num_heads, num_chunks)
    params = _compiler_params(backend)
    col_spec = lambda width: pl.BlockSpec((None, None, q, width), lambda b, h, c: (b, h, c, 0))
    grp_spec = pl.BlockSpec((None, None, q, n_blk), lambda b, h, c: (b, h // rep, c, 0))
    scalar_spec = pl.BlockSpec((None, None, None, 1, 1), lambda b, h, c: (b, h, c, 0, 0))
    state_spec = pl.BlockSpec((None, None, None, p_blk, n_blk), lambda b, h, c: (b, h, c, 0, 0))
    seg_specs = [
        pl.BlockSpec((None, q, 1), lambda b, h, c: (b, c, 0)),
        pl.BlockSpec((None, None, 1, q), lambda b, h, c: (b, c, 0, 0)),
        pl.BlockSpec((None, None, 1, 1), lambda b, h, c: (b, c, 0, 0)),
    ]

    # Step 2 (kernel): the state each chunk contributes, [B,H,c,Pb,Nb].
    state_inputs = [x_h, dt_col, acum_col, a_end, b_g]
    state_specs = [col_spec(p_blk), col_spec(1), col_spec(1), scalar_spec, grp_spec]
    if has_seg:
        state_inputs += [seg_col, seg_end[:, :, None, None]]
        state_specs += [seg_specs[0], seg_specs[2]]
    chunk_states = pl.pallas_call(
        functools.partial(_chunk_state_kernel, has_seg=has_seg, mm_dtype=mm_dtype),
        out_shape=jax.ShapeDtypeStruct((batch, num_heads, num_chunks, p_blk, n_blk), f32),
        grid=grid,
        in_specs=state_specs,
        out_specs=state_spec,
        compiler_params=params,
        interpret=interpret,
        name="ssd_chunk_state",
    )(*state_inputs)

    # Step 3 (XLA scan over chunks): the state entering each chunk; new sequences drop the carry.
    chunk_decay = jnp.exp(a_end[..., 0, 0])  # [B,H,c]
    if has_seg:
        chunk_decay = chunk_decay * (seg_end == seg_prev)[:, None, :]
    if initial_states is None:
        s0 = jnp.zeros((batch, num_heads, p_blk, n_blk), f32)
    else:
        s0 = jnp.pad(initial_states.astype(f32), ((0, 0), (0, 0), (0, p_blk - head_dim), (0, n_blk - d_state)))

    def pass_state(s, inp):
        decay_c, state_c = inp
        return s * decay_c[..., None, None] + state_c, s

    s_final, s_in = jax.lax.scan(pass_state, s0, (jnp.moveaxis(chunk_decay, 2, 0), jnp.moveaxis(chunk_states, 2, 0)))
    s_in = jnp.moveaxis(s_in, 0, 2)  # [B,H,c,Pb,Nb]

    # Steps 1 + 4 (kernel): outputs, [B,H,Tp,Pb].
    scan_inputs = [x_h, dt_col, acum_col, acum_row, b_g, c_g, s_in]
    scan_specs = [
        col_spec(p_blk),
        col_spec(1),
        col_spec(1),
        pl.BlockSpec((None, None, None, 1, q), lambda b, h, c: (b, h, c, 0, 0)),
        grp_spec,
        grp_spec,
        state_spec,
    ]
    if has_seg:
        scan_inputs += [seg_col, seg_row, seg_prev[:, :, None, None]]
        scan_specs += seg_specs
    y_h = pl.pallas_call(
        functools.partial(_chunk_scan_kernel, has_seg=has_seg, mm_dtype=mm_dtype),
        out_shape=jax.ShapeDtypeStruct((batch, num_heads, tp, p_blk), f32),
        grid=grid,
        in_specs=scan_specs,
        out_specs=col_spec(p_blk),
        compiler_params=params,
        interpret=interpret,
        name="ssd_chunk_scan",
    )(*scan_inputs)

    # Back to [B,T,H,P]; skip term and gate in fp32.
    y = jnp.transpose(y_h[:, :, :seqlen, :head_dim], (0, 2, 1, 3))  # [B,T,H,P]
    y = reference.skip_and_gate(y, x, D, z)
    return y.astype(x.dtype), s_final[:, :, :head_dim, :d_state]
