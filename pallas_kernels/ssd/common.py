"""Pieces shared by the SSD kernel families (`pallas_gpu.py`, `pallas_tpu.py`).

Notation: B batch, T time, H heads, P head dim, G groups, N state dim, Q chunk, c = ceil(T/Q) chunks,
Tc = c*Q the padded time, R = H/G heads per group.

The kernels never see the raw step sizes: a short XLA prologue (`chunk_dt`) turns dt [B,T,H] into
two head-major fp32 arrays, the discretisation step and its within-chunk cumulative log-decay,

    dt_t = softplus(dt_raw_t + dt_bias)            (Mamba-2 paper, Dao & Gu 2024, Sec. 7 / eq. (1))
    a_t  = sum_{k = chunk start .. t} dt_k A        (the "A_cumsum" of Listing 1, Sec. 6)

both [B,H,Tc] with dt = 0 on the padding (decay 1, no input), which is H/(P) = 1/64 of the bytes of x
for the released shapes. The backward ends with the mirror epilogue (`dt_backward`): the cotangent of
a_t becomes that of every dt_k (a reverse cumulative sum within the chunk), then the softplus and
dt_bias chain rule. Everything here is fp32 and elementwise or a scan of length Q.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.ssd import reference

_HIGHEST = jax.lax.Precision.HIGHEST


def num_chunks(seqlen: int, chunk_size: int) -> int:
    """c = ceil(T / Q)."""
    return -(-seqlen // chunk_size)


def pow2_at_least_16(n: int) -> int:
    """The smallest power of two >= n and >= 16 (a Triton block dimension)."""
    return max(16, 1 << (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class Dims:
    """Static shapes of one kernel call: B, T, H, P, G, N and the chunk Q."""

    batch: int
    seqlen: int
    heads: int
    head_dim: int
    groups: int
    d_state: int
    chunk: int

    @property
    def nc(self):
        """c, the number of chunks."""
        return num_chunks(self.seqlen, self.chunk)

    @property
    def tc(self):
        """Tc = c*Q, the padded time."""
        return self.nc * self.chunk

    @property
    def rep(self):
        """R = H/G, heads per group."""
        return self.heads // self.groups

    @property
    def pb(self):
        """P padded to a Triton block dimension."""
        return pow2_at_least_16(self.head_dim)

    @property
    def nb(self):
        """N padded to a Triton block dimension."""
        return pow2_at_least_16(self.d_state)


def dims(x, B, chunk_size: int) -> Dims:
    """The `Dims` of x [B,T,H,P] and B [B,T,G,N] with chunk Q."""
    batch, seqlen, heads, head_dim = x.shape
    groups, d_state = B.shape[-2:]
    return Dims(batch, seqlen, heads, head_dim, groups, d_state, chunk_size)


def chunk_dt(dt, A, dt_bias, dt_softplus, chunk_size):
    """The discretisation step and its within-chunk cumulative log-decay, head-major and padded.

    Args:
        dt: [B,T,H] raw step sizes; A: [H]; dt_bias: [H] or None; dt_softplus: apply softplus.
        chunk_size: Q.

    Returns:
        (dt_h, a_h), both [B,H,Tc] float32: dt_h = dt_t (0 on padding), a_h = a_t (eq. above).
    """
    batch, seqlen, num_heads = dt.shape
    nc = num_chunks(seqlen, chunk_size)
    pad = nc * chunk_size - seqlen
    dtp = reference.process_dt(dt, dt_bias, dt_softplus)  # [B,T,H]
    dt_h = jnp.pad(jnp.transpose(dtp, (0, 2, 1)), ((0, 0), (0, 0), (0, pad)))  # [B,H,Tc]
    log_a = (dt_h * A.astype(jnp.float32)[None, :, None]).reshape(batch, num_heads, nc, chunk_size)
    a_h = jnp.cumsum(log_a, axis=-1).reshape(batch, num_heads, nc * chunk_size)  # [B,H,Tc]
    return dt_h, a_h


def chunk_segments(seq_idx, seqlen, chunk_size):
    """Segment ids [B,Tc] int32 (nondecreasing from 0, edge-padded), or None without seq_idx."""
    if seq_idx is None:
        return None
    pad = num_chunks(seqlen, chunk_size) * chunk_size - seqlen
    seg = reference.segment_ids(seq_idx)  # [B,T]
    return jnp.pad(seg, ((0, 0), (0, pad)), mode="edge") if pad else seg


def dt_backward(ddt_direct, da, dt_h, dt, A, dt_bias, dt_softplus, chunk_size):
    """Cotangents of dt (raw), A and dt_bias from the per-position cotangents the kernels return.

    With a_t = sum_{k<=t in chunk} dt_k A, the cotangent of dt_k through the decays is
    A * sum_{t>=k in chunk} da_t (a reverse cumulative sum), and that of A is sum_k dt_k (same sum).

    Args:
        ddt_direct: [B,H,Tc] d loss / d dt_t through the inputs dt_t x_t (not through the decays).
        da: [B,H,Tc] d loss / d a_t (including the chunk-end terms at the chunk's last position).
        dt_h: [B,H,Tc] the processed step (from `chunk_dt`).
        dt: [B,T,H] raw dt; A: [H]; dt_bias: [H] or None; dt_softplus: as in the forward.
        chunk_size: Q.

    Returns:
        (d dt [B,T,H] in dt.dtype, dA [H] in A.dtype, d dt_bias [H] or None).
    """
    batch, num_heads, tc = da.shape
    seqlen = dt.shape[1]
    nc = tc // chunk_size
    da_c = da.reshape(batch, num_heads, nc, chunk_size)
    # Reverse cumulative sum within each chunk: dcum_k = sum_{t >= k} da_t.
    dcum = jnp.flip(jnp.cumsum(jnp.flip(da_c, -1), axis=-1), -1).reshape(batch, num_heads, tc)
    d_a_scale = jnp.sum(dt_h * dcum, axis=(0, 2))  # [H]
    ddt_h = ddt_direct + A.astype(jnp.float32)[None, :, None] * dcum  # [B,H,Tc]
    ddt = jnp.transpose(ddt_h[:, :, :seqlen], (0, 2, 1))  # [B,T,H], d loss / d dt_t (processed)
    # Chain rule through dt_t = softplus(dt_raw + dt_bias): softplus' = sigmoid.
    if dt_softplus:
        pre = dt.astype(jnp.float32)
        if dt_bias is not None:
            pre = pre + dt_bias.astype(jnp.float32)
        ddt = ddt * jax.nn.sigmoid(pre)
    d_bias = None if dt_bias is None else jnp.sum(ddt, axis=(0, 1)).astype(dt_bias.dtype)
    return ddt.astype(dt.dtype), d_a_scale.astype(A.dtype), d_bias


def d_skip(dD_part, D):
    """dD from per-head, per-p partial sums [..., H, P] (summed over all leading axes)."""
    if D is None:
        return None
    total = jnp.sum(dD_part.reshape(-1, *dD_part.shape[-2:]), axis=0)  # [H,P]
    if D.ndim == 1:
        total = jnp.sum(total, axis=-1)
    return total.astype(D.dtype)


# ----------------------------------------------------------------------------- in-kernel helpers
def dot(a, b, contract, mm_dtype):
    """a . b contracting dims `contract` = (lhs_dim, rhs_dim) of two 2-D blocks, fp32 accumulation.

    Operands are cast to `mm_dtype` (bf16 -> tensor-core / MXU passes; fp32 -> HIGHEST precision,
    no TF32 or bf16 passes).
    """
    precision = _HIGHEST if mm_dtype == jnp.float32 else None
    return jax.lax.dot_general(
        a.astype(mm_dtype),
        b.astype(mm_dtype),
        (((contract[0],), (contract[1],)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def decay_matrix(a_rows, a_cols, keep):
    """L[i,j] = exp(a_i - a_j) where `keep` (causal, same sequence), else 0 (eq. (16), Sec. 6).

    The exponent is zeroed before `exp` where not kept (a double `where`), so no inf appears.
    Args: a_rows [M,1] a_i; a_cols [1,K] a_j; keep [M,K] bool.
    """
    return jnp.where(keep, jnp.exp(jnp.where(keep, a_rows - a_cols, 0.0)), 0.0)


def silu(z):
    """SiLU, z * sigmoid(z)."""
    return z * jax.nn.sigmoid(z)


def dsilu(z):
    """d silu(z) / dz = sigmoid(z) (1 + z (1 - sigmoid(z)))."""
    s = jax.nn.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))
