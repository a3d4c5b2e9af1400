"""SSD kernels for GPUs (Pallas -> Triton), forward and backward, on the native [B,T,H,P] layout.

Notation: B batch, T time, H heads, P head dim, G groups, N state dim, R = H/G heads per group,
Q chunk, c = ceil(T/Q) chunks, Tc = c*Q, Pb/Nb = P/N rounded up to a power of two >= 16 (Triton
blocks are powers of two; the extra columns are masked). Equations: Mamba-2 paper (Dao & Gu 2024),
Sec. 6 "Hardware-efficient algorithm" / Listing 1, in the notation of `xla.py`:
a_t the within-chunk cumulative log-decay, L[i,j] = exp(a_i - a_j) (i >= j, same sequence).

Forward (after the XLA prologue `common.chunk_dt`, which makes dt_t and a_t [B,H,Tc] fp32):

  1. `ssd_bmm`        grid (B, c, G, Q/bm, Q/bm): CB[i,j] = C_i . B_j once per group -> [B,c,G,Q,Q] f32
                      (only the causal tiles j <= i are computed).
  2. `ssd_state_fwd`  grid (B, H, Pb/bp, Nb/bn): chunk states and state passing fused. One program
                      walks the whole sequence for a [bp,bn] tile of the state:
                      s_{c+1} = exp(a_end,c) s_c + sum_j exp(a_end,c - a_j) dt_j x_j B_j^T
                      (steps 2+3 of Listing 1), storing s_c, the state entering chunk c, to
                      [B,c,H,Pb,Nb] (in the matmul dtype: only dots read it) and the final state
                      (fp32). x and B are read in [bq,.] time tiles straight from [B,T,H,P] /
                      [B,T,G,N]: no transposes, no padding copies.
  3. `ssd_chunk_fwd`  grid (B, c, H, Q/bm): a [bm] row block of outputs,
                      y_i = sum_{j<=i} CB[i,j] L[i,j] dt_j x_j + exp(a_i) C_i s_c^T   (steps 1+4)
                      + D x_i, times silu(z_i); the j loop runs over [bm] tiles up to the diagonal.

Backward (the custom VJP in `api.py`; CB and s_c are recomputed by kernels 1-2):

  4. `ssd_state_bwd`  grid (B, H, Pb/bp, Nb/bn): the reverse state pass. With dy = dout * silu(z),
                      ds_c = exp(a_end,c) ds_{c+1} + sum_i exp(a_i) dy_i^T C_i, from ds_{c+1} =
                      d final state; stores ds_{c+1} (the cotangent of the state leaving chunk c)
                      [B,c,H,Pb,Nb] (matmul dtype), d initial state, and exp(a_end,c) <ds_{c+1}, s_c>
                      per tile (d a_end through the chunk decay).
  5. `ssd_chunk_bwd_dx` grid (B, c, G, Q/bm): rows j of a chunk, looping over the R heads of the
                      group: u_j = sum_{i>=j} CB[i,j] L[i,j] dy_i, v_j = ds_{c+1} B_j,
                      dx_j = dt_j u_j + exp(a_end - a_j) dt_j v_j + D dy_j,
                      dB_j = sum_h [sum_i dCB_h[i,j] C_i + exp(a_end - a_j) dt_j x_j^T ds_{c+1}]
                      with dCB_h[i,j] = (dy_i . x_j) dt_j L[i,j]; also dz, dD partial sums, the
                      direct d dt_j = x_j . (u_j + exp(a_end - a_j) v_j) and the column side of d a:
                      -sum_i dCB_h[i,j] CB[i,j] - exp(a_end - a_j) dt_j x_j . v_j.
  6. `ssd_chunk_bwd_dc` grid (B, c, G, Q/bm): rows i, looping over the heads of the group:
                      dC_i = sum_h [sum_j dCB_h[i,j] B_j + exp(a_i) dy_i s_c], and the row side of
                      d a_i = sum_j dCB_h[i,j] CB[i,j] + exp(a_i) dy_i . (s_c C_i).

The XLA epilogue `common.dt_backward` turns d a into d dt, dA, d dt_bias (a reverse cumsum over Q).
Matmul operands are in the input dtype (fp32: HIGHEST precision) with fp32 accumulation; decays,
masks and every accumulator are fp32. Contractions over N run in [bn]-wide slices of N, so no dot
stages a whole [Pb,Nb] state. Block sizes come from `GpuBlockSizes.choose` (dtype and the device's
shared memory).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.ssd.common import Dims, decay_matrix, dims, dot, dsilu, pow2_at_least_16, silu

f32 = jnp.float32

# Shared memory per block (opt-in maximum, bytes) by CUDA compute capability.
_SMEM_BY_CC = {
    "8.0": 166912,  # A100
    "8.6": 101376,
    "8.7": 166912,
    "8.9": 101376,  # L4, RTX 40xx
    "9.0": 232448,  # H100, H200
    "10.0": 232448,  # B200
    "10.3": 232448,
    "12.0": 101376,
}
_SMEM_DEFAULT = 101376  # unknown GPU (or lowering on a machine without one): the smallest above


def device_smem_bytes() -> int:
    """Shared memory available to one block on the default GPU (a conservative default elsewhere)."""
    try:
        dev = jax.devices()[0]
        if dev.platform == "gpu":
            return _SMEM_BY_CC.get(str(getattr(dev, "compute_capability", "")), _SMEM_DEFAULT)
    except RuntimeError:
        pass
    return _SMEM_DEFAULT


@dataclasses.dataclass(frozen=True)
class GpuBlockSizes:
    """Tiles of the Triton kernels.

    Attributes:
        bq: time tile of the state kernels (`ssd_state_fwd`, `ssd_state_bwd`).
        bp, bn: the [bp, bn] state tile one state-kernel program owns.
        bm: row tile (i or j tokens) of the chunk kernels; also their inner time tile.
        num_warps: warps per program.
        num_stages: software-pipelining depth of the Triton loops.
    """

    bq: int = 64
    bp: int = 64
    bn: int = 64
    bm: int = 64
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def choose(cls, chunk_size, head_dim, d_state, dtype, *, has_z=True, smem_bytes=None):
        """The largest tiles whose estimated shared memory fits `smem_bytes` (device's if None).

        The estimate (`smem_estimate`) gets a 25% margin; the candidates shrink the pipeline depth,
        then the time tiles, then the state-dim slice, down to 16-token tiles with one stage and
        16-wide slices of N, which fit any GPU since Volta for head dims up to 256.
        """
        smem = device_smem_bytes() if smem_bytes is None else smem_bytes
        pb, nb = pow2_at_least_16(head_dim), pow2_at_least_16(d_state)
        item = jnp.dtype(dtype).itemsize
        prefs = [(64, 3), (64, 2), (32, 2), (32, 1), (16, 1)] if item <= 2 else [(64, 2), (32, 2), (32, 1), (16, 1)]
        chunk_kernels = ("ssd_bmm", "ssd_chunk_fwd", "ssd_chunk_bwd_dx", "ssd_chunk_bwd_dc")
        fits = lambda bs, names: 1.25 * max(bs.smem_estimate(pb, nb, item, has_z)[k] for k in names) <= smem  # noqa: E731
        # Shrink the pipeline depth and the time tile first, then the state-dim slice.
        cands = [(tile, stages, min(64, nb)) for tile, stages in prefs] + [(16, 1, min(bn, nb)) for bn in (32, 16)]
        for tile, stages, bn in cands:
            tile = min(tile, chunk_size)
            chosen = cls(bq=tile, bp=min(64, pb), bn=bn, bm=tile, num_warps=8 if tile >= 64 else 4, num_stages=stages)
            if fits(chosen, chunk_kernels):
                break
        # The state kernels hold no [bm,bm] tiles: give them the longest time tile that fits.
        for bq in (64, 32, 16):
            bq = min(bq, chunk_size)
            cand = dataclasses.replace(chosen, bq=bq)
            if fits(cand, ("ssd_state_fwd", "ssd_state_bwd")):
                return cand
        return chosen

    def check(self, chunk_size, pb, nb):
        """Raises ValueError unless the tiles are powers of two >= 16 that divide Q, Pb and Nb."""
        for name, size, whole in (
            ("bq", self.bq, chunk_size),
            ("bm", self.bm, chunk_size),
            ("bp", self.bp, pb),
            ("bn", self.bn, nb),
        ):
            if size < 16 or size & (size - 1) or whole % size:
                raise ValueError(
                    f"ssd: GpuBlockSizes.{name}={size} must be a power of two >= 16 dividing {whole} "
                    "(the chunk size, or P / N rounded up to a power of two); or pass block_sizes=None."
                )

    def smem_estimate(self, pb, nb, item, has_z=True):
        """Estimated shared memory (bytes) per kernel.

        Model (not validated on hardware): every tile loaded inside a pipelined loop is staged once
        per stage (fp32 CB tiles at 4 bytes, inputs at `item`), tiles loaded outside the loops and
        every register tile that becomes a dot operand are staged once; fp32 accumulators stay in
        registers.
        """
        s, bq, bp, bn, bm = self.num_stages, self.bq, self.bp, self.bn, self.bm
        nz = 2 if has_z else 1
        return {
            "ssd_bmm": 2 * bm * bn * item,
            "ssd_state_fwd": s * (bq * bp + bq * bn) * item,
            "ssd_state_bwd": s * (bq * bp * nz + bq * bn) * item + bp * bn * 4,
            "ssd_chunk_fwd": s * (bm * bm * 4 + bm * pb * item) + (bm * bm + bm * bn + pb * bn) * item,
            "ssd_chunk_bwd_dx": s * (bm * pb * nz * item + bm * bn * item + bm * bm * 4)
            + (2 * bm * bm + bm * pb + bm * bn + pb * bn) * item,
            "ssd_chunk_bwd_dc": s * (bm * pb * item + bm * bn * item + bm * bm * 4)
            + (bm * bm + bm * pb * nz + pb * bn) * item,
        }


def _params(bs: GpuBlockSizes):
    return plgpu.CompilerParams(num_warps=bs.num_warps, num_stages=bs.num_stages)


def _iota(n):
    return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def _valid(start, size, limit, exact):
    """[size] bool: start + k < limit (None when every index is known to be valid)."""
    return None if exact else (start + _iota(size)) < limit


def _mask(rows, cols, shape):
    """[M,K] bool from optional row [M] and column [K] validity (None: all valid)."""
    if rows is None:
        return jnp.broadcast_to(cols[None, :], shape)
    if cols is None:
        return jnp.broadcast_to(rows[:, None], shape)
    return rows[:, None] & cols[None, :]


def _load(ref, idx, rows, cols, shape):
    """ref[idx] with zeros where rows[:,None] & cols[None,:] is False (None: all valid)."""
    if rows is None and cols is None:
        return ref[idx]
    return plgpu.load(ref.at[idx], mask=_mask(rows, cols, shape), other=0)


def _store(ref, idx, val, rows, cols):
    """ref[idx] = val where rows[:,None] & cols[None,:] (None: all valid)."""
    if rows is None and cols is None:
        ref[idx] = val.astype(ref.dtype)
        return
    plgpu.store(ref.at[idx], val.astype(ref.dtype), mask=_mask(rows, cols, val.shape))


def _n_slices(d: Dims, bs: GpuBlockSizes):
    """Static [bn]-wide slices of the state dim with their column validity: no dot stages more
    than bn columns of C, B or a state at once."""
    exact = d.nb == d.d_state
    return [(pl.ds(k * bs.bn, bs.bn), _valid(k * bs.bn, bs.bn, d.d_state, exact)) for k in range(d.nb // bs.bn)]


def _chunk_seg(seg_ref, ci, q):
    """(segment of the chunk's last token, segment of the token before the chunk; 0 for chunk 0)."""
    seg_end = seg_ref[ci * q + q - 1]
    seg_prev = jnp.where(ci > 0, seg_ref[jnp.maximum(ci * q - 1, 0)], 0)
    return seg_end, seg_prev


# --------------------------------------------------------------------------------------- kernels
def _bmm_kernel(c_ref, b_ref, cb_ref, *, d: Dims, bs: GpuBlockSizes, mm_dtype):
    """CB tile [bm, bm] = C_i B_j^T for one (batch, chunk, group, i tile, j tile), j <= i."""
    ci, it, jt = pl.program_id(1), pl.program_id(3), pl.program_id(4)
    bm, bn, q = bs.bm, bs.bn, d.chunk
    exact_t = d.seqlen % q == 0

    @pl.when(jt <= it)
    def _():
        i0, j0 = it * bm, jt * bm
        rows_i = _valid(ci * q + i0, bm, d.seqlen, exact_t)
        rows_j = _valid(ci * q + j0, bm, d.seqlen, exact_t)
        cb = jnp.zeros((bm, bm), f32)
        for ns, cols in _n_slices(d, bs):  # contract over N in [bn] slices
            c = _load(c_ref, (pl.ds(i0, bm), ns), rows_i, cols, (bm, bn))
            b = _load(b_ref, (pl.ds(j0, bm), ns), rows_j, cols, (bm, bn))
            cb = cb + dot(c, b, (1, 1), mm_dtype)
        cb_ref[...] = cb  # [bm,bm]


def _state_fwd_kernel(*refs, d: Dims, bs: GpuBlockSizes, has_seg, has_init, mm_dtype):
    """Steps 2+3 for one [bp,bn] state tile of (batch, head): s_{c+1} = exp(a_end) s_c + S_c."""
    x_ref, b_ref, dt_ref, a_ref = refs[:4]
    rest = list(refs[4:])
    seg_ref = rest.pop(0) if has_seg else None
    init_ref = rest.pop(0) if has_init else None
    s_ref, final_ref = rest  # [c,bp,bn], [bp,bn]
    q, bq, bp, bn = d.chunk, bs.bq, bs.bp, bs.bn
    p0, n0 = pl.program_id(2) * bp, pl.program_id(3) * bn
    cols_p = _valid(p0, bp, d.head_dim, d.head_dim == d.pb)
    cols_n = _valid(n0, bn, d.d_state, d.d_state == d.nb)
    exact_t = d.seqlen % q == 0
    s0 = init_ref[...].astype(f32) if has_init else jnp.zeros((bp, bn), f32)

    def chunk(ci, s):
        s_ref[ci] = s.astype(s_ref.dtype)  # the state entering chunk ci (matmul dtype: only read by dots)
        a_end = a_ref[ci * q + q - 1]
        decay = jnp.exp(a_end)
        if has_seg:
            seg_end, seg_prev = _chunk_seg(seg_ref, ci, q)
            decay = jnp.where(seg_end == seg_prev, decay, 0.0)  # a new sequence drops the carry

        def tile(k, acc):
            t0 = ci * q + k * bq
            rows = _valid(t0, bq, d.seqlen, exact_t)
            x = _load(x_ref, (pl.ds(t0, bq), slice(None)), rows, cols_p, (bq, bp))  # [bq,bp]
            b = _load(b_ref, (pl.ds(t0, bq), slice(None)), rows, cols_n, (bq, bn))  # [bq,bn]
            # Weight of token j: its decay to the chunk end times dt_j (0 outside the last segment).
            w = jnp.exp(a_end - a_ref[pl.ds(t0, bq)]) * dt_ref[pl.ds(t0, bq)]  # [bq]
            if has_seg:
                w = jnp.where(seg_ref[pl.ds(t0, bq)] == seg_end, w, 0.0)
            return acc + dot(x * w[:, None], b, (0, 0), mm_dtype)  # [bp,bn]

        return s * decay + jax.lax.fori_loop(0, q // bq, tile, jnp.zeros((bp, bn), f32))

    final_ref[...] = jax.lax.fori_loop(0, d.nc, chunk, s0)


def _chunk_fwd_kernel(*refs, d: Dims, bs: GpuBlockSizes, has_seg, has_z, save_ypre, mm_dtype):
    """Steps 1+4 for a [bm] row block of (batch, chunk, head): y = (L o CB) dt x + exp(a) C s^T."""
    x_ref, c_ref, cb_ref, dt_ref, a_ref, s_ref, d_ref = refs[:7]
    rest = list(refs[7:])
    seg_ref = rest.pop(0) if has_seg else None
    z_ref = rest.pop(0) if has_z else None
    y_ref = rest.pop(0)
    ypre_ref = rest.pop(0) if save_ypre else None
    ci, it = pl.program_id(1), pl.program_id(3)
    q, bm, pb = d.chunk, bs.bm, d.pb
    i0 = it * bm
    exact_t = d.seqlen % q == 0
    cols_p = _valid(0, pb, d.head_dim, pb == d.head_dim)
    rows_i = _valid(ci * q + i0, bm, d.seqlen, exact_t)
    a_i = a_ref[pl.ds(i0, bm)]  # [bm]
    idx_i = i0 + _iota(bm)
    if has_seg:
        seg_i = seg_ref[pl.ds(ci * q + i0, bm)]
        _, seg_prev = _chunk_seg(seg_ref, ci, q)

    # State -> output (step 4): the carried state read out by C_i, decayed from the chunk start.
    w_off = jnp.exp(a_i)
    if has_seg:
        w_off = jnp.where(seg_i == seg_prev, w_off, 0.0)
    y = jnp.zeros((bm, pb), f32)
    for ns, cols in _n_slices(d, bs):
        c_i = _load(c_ref, (pl.ds(i0, bm), ns), rows_i, cols, (bm, bs.bn))  # [bm,bn]
        y = y + dot(c_i, s_ref[:, ns], (1, 1), mm_dtype)  # [bm,Pb]
    y = y * w_off[:, None]

    # Intra-chunk (step 1): causal tiles j <= i of (L o CB) times dt x.
    def tile(jt, y):
        j0 = jt * bm
        keep = idx_i[:, None] >= (j0 + _iota(bm))[None, :]
        if has_seg:
            keep = keep & (seg_i[:, None] == seg_ref[pl.ds(ci * q + j0, bm)][None, :])
        scores = cb_ref[pl.ds(i0, bm), pl.ds(j0, bm)] * decay_matrix(a_i[:, None], a_ref[pl.ds(j0, bm)][None, :], keep)
        rows_j = _valid(ci * q + j0, bm, d.seqlen, exact_t)
        x_j = _load(x_ref, (pl.ds(j0, bm), slice(None)), rows_j, cols_p, (bm, pb))  # [bm,Pb]
        return y + dot(scores, x_j * dt_ref[pl.ds(j0, bm)][:, None], (1, 0), mm_dtype)

    y = jax.lax.fori_loop(0, it + 1, tile, y)
    # Skip term and gate, in fp32.
    x_i = _load(x_ref, (pl.ds(i0, bm), slice(None)), rows_i, cols_p, (bm, pb)).astype(f32)
    y = y + d_ref[...][None, :] * x_i
    if save_ypre:
        _store(ypre_ref, (slice(None), slice(None)), y, rows_i, cols_p)
    if has_z:
        y = y * silu(_load(z_ref, (slice(None), slice(None)), rows_i, cols_p, (bm, pb)).astype(f32))
    _store(y_ref, (slice(None), slice(None)), y, rows_i, cols_p)


def _state_bwd_kernel(*refs, d: Dims, bs: GpuBlockSizes, has_seg, has_z, mm_dtype):
    """Reverse state pass for one [bp,bn] tile: ds_c = exp(a_end) ds_{c+1} + sum_i exp(a_i) dy_i^T C_i."""
    dout_ref, c_ref, a_ref, s_ref, dfinal_ref = refs[:5]
    rest = list(refs[5:])
    seg_ref = rest.pop(0) if has_seg else None
    z_ref = rest.pop(0) if has_z else None
    ds_ref, dinit_ref, ddec_ref = rest  # [c,bp,bn], [bp,bn], [c]
    q, bq, bp, bn = d.chunk, bs.bq, bs.bp, bs.bn
    p0, n0 = pl.program_id(2) * bp, pl.program_id(3) * bn
    cols_p = _valid(p0, bp, d.head_dim, d.head_dim == d.pb)
    cols_n = _valid(n0, bn, d.d_state, d.d_state == d.nb)
    exact_t = d.seqlen % q == 0

    def chunk(k, ds):
        ci = d.nc - 1 - k
        ds_ref[ci] = ds.astype(ds_ref.dtype)  # cotangent of the state leaving chunk ci (matmul dtype)
        decay = jnp.exp(a_ref[ci * q + q - 1])
        if has_seg:
            seg_end, seg_prev = _chunk_seg(seg_ref, ci, q)
            decay = jnp.where(seg_end == seg_prev, decay, 0.0)
        # d a_end through the chunk decay: exp(a_end) <ds_{c+1}, s_c> (this tile's share).
        ddec_ref[ci] = decay * jnp.sum(jnp.sum(ds * s_ref[ci].astype(f32), axis=1))

        def tile(kk, acc):
            t0 = ci * q + kk * bq
            rows = _valid(t0, bq, d.seqlen, exact_t)
            dy = _load(dout_ref, (pl.ds(t0, bq), slice(None)), rows, cols_p, (bq, bp)).astype(f32)
            if has_z:
                dy = dy * silu(_load(z_ref, (pl.ds(t0, bq), slice(None)), rows, cols_p, (bq, bp)).astype(f32))
            c = _load(c_ref, (pl.ds(t0, bq), slice(None)), rows, cols_n, (bq, bn))  # [bq,bn]
            e = jnp.exp(a_ref[pl.ds(t0, bq)])  # [bq]
            if has_seg:
                e = jnp.where(seg_ref[pl.ds(t0, bq)] == seg_prev, e, 0.0)
            return acc + dot(dy * e[:, None], c, (0, 0), mm_dtype)  # [bp,bn]

        return ds * decay + jax.lax.fori_loop(0, q // bq, tile, jnp.zeros((bp, bn), f32))

    dinit_ref[...] = jax.lax.fori_loop(0, d.nc, chunk, dfinal_ref[...].astype(f32))


def _chunk_bwd_dx_kernel(*refs, d: Dims, bs: GpuBlockSizes, has_seg, has_z, mm_dtype):
    """Column side of a chunk for rows j, looping over the heads of the group: dx, dB, dz, ..."""
    x_ref, dout_ref, b_ref, c_ref, cb_ref, dt_ref, a_ref, ds_ref, d_ref = refs[:9]
    rest = list(refs[9:])
    seg_ref = rest.pop(0) if has_seg else None
    z_ref = rest.pop(0) if has_z else None
    ypre_ref = rest.pop(0) if has_z else None
    dx_ref = rest.pop(0)
    dz_ref = rest.pop(0) if has_z else None
    db_ref, ddt_ref, da_ref, daend_ref, dd_ref = rest
    ci, jt = pl.program_id(1), pl.program_id(3)
    q, bm, bn, pb = d.chunk, bs.bm, bs.bn, d.pb
    j0 = jt * bm
    exact_t = d.seqlen % q == 0
    cols_p = _valid(0, pb, d.head_dim, pb == d.head_dim)
    rows_j = _valid(ci * q + j0, bm, d.seqlen, exact_t)
    idx_j = j0 + _iota(bm)
    slices = _n_slices(d, bs)
    b_j = [_load(b_ref, (pl.ds(j0, bm), ns), rows_j, cols, (bm, bn)) for ns, cols in slices]  # [bm,bn] each
    if has_seg:
        seg_j = seg_ref[pl.ds(ci * q + j0, bm)]
        seg_end, _ = _chunk_seg(seg_ref, ci, q)
    sl_j = (pl.ds(j0, bm),)

    def head(r, db):
        x_j = _load(x_ref, (*sl_j, r, slice(None)), rows_j, cols_p, (bm, pb)).astype(f32)  # [bm,Pb]
        dt_j = dt_ref[r, pl.ds(j0, bm)]  # [bm]
        a_j = a_ref[r, pl.ds(j0, bm)]

        # Intra-chunk, tiles i >= j: u_j = sum_i (L o CB)[i,j] dy_i and dCB_h[i,j] = (dy_i . x_j) dt_j L[i,j].
        def tile(it, carry):
            u, ecol, db = carry
            i0 = it * bm
            rows_i = _valid(ci * q + i0, bm, d.seqlen, exact_t)
            dy_i = _load(dout_ref, (pl.ds(i0, bm), r, slice(None)), rows_i, cols_p, (bm, pb)).astype(f32)
            if has_z:
                dy_i = dy_i * silu(_load(z_ref, (pl.ds(i0, bm), r, slice(None)), rows_i, cols_p, (bm, pb)).astype(f32))
            keep = (i0 + _iota(bm))[:, None] >= idx_j[None, :]
            if has_seg:
                keep = keep & (seg_ref[pl.ds(ci * q + i0, bm)][:, None] == seg_j[None, :])
            lmat = decay_matrix(a_ref[r, pl.ds(i0, bm)][:, None], a_j[None, :], keep)  # [bm_i,bm_j]
            cb = cb_ref[pl.ds(i0, bm), pl.ds(j0, bm)]  # [bm_i,bm_j]
            u = u + dot(cb * lmat, dy_i, (0, 0), mm_dtype)  # [bm_j,Pb]
            dcb = dot(dy_i, x_j, (1, 1), mm_dtype) * dt_j[None, :] * lmat  # [bm_i,bm_j]
            # Column sums of dCB o CB (the same fp32 tile as the row sums of kernel 6, so that the
            # two sides of d a cancel exactly where they should).
            ecol = ecol + jnp.sum(dcb * cb, axis=0)  # [bm_j]
            db = tuple(
                db_k + dot(dcb, _load(c_ref, (pl.ds(i0, bm), ns), rows_i, cols, (bm, bn)), (0, 0), mm_dtype)
                for db_k, (ns, cols) in zip(db, slices)
            )  # [bm_j,bn] each
            return u, ecol, db

        zero = (jnp.zeros((bm, pb), f32), jnp.zeros((bm,), f32))
        u, ecol, db = jax.lax.fori_loop(jt, q // bm, tile, (*zero, db))
        # Inputs to the chunk state: v_j = ds B_j and the weight exp(a_end - a_j) dt_j.
        v = jnp.zeros((bm, pb), f32)
        for (ns, _), b_k in zip(slices, b_j):
            v = v + dot(b_k, ds_ref[r, :, ns], (1, 1), mm_dtype)  # [bm,Pb]
        e_j = jnp.exp(a_ref[r, q - 1] - a_j)  # [bm]
        if has_seg:
            e_j = jnp.where(seg_j == seg_end, e_j, 0.0)
        w_j = e_j * dt_j
        dy_j = _load(dout_ref, (*sl_j, r, slice(None)), rows_j, cols_p, (bm, pb)).astype(f32)
        if has_z:
            z_j = _load(z_ref, (*sl_j, r, slice(None)), rows_j, cols_p, (bm, pb)).astype(f32)
            ypre = _load(ypre_ref, (*sl_j, r, slice(None)), rows_j, cols_p, (bm, pb)).astype(f32)
            _store(dz_ref, (slice(None), r, slice(None)), dy_j * ypre * dsilu(z_j), rows_j, cols_p)
            dy_j = dy_j * silu(z_j)
        dx = dt_j[:, None] * u + w_j[:, None] * v + d_ref[r][None, :] * dy_j
        _store(dx_ref, (slice(None), r, slice(None)), dx, rows_j, cols_p)
        xu, xv = jnp.sum(x_j * u, axis=1), jnp.sum(x_j * v, axis=1)  # [bm]
        ddt_ref[r, :] = xu + e_j * xv  # d loss / d dt_j through dt_j x_j
        da_ref[r, :] = -(ecol + w_j * xv)  # d loss / d a_j (column side)
        daend_ref[r] = jnp.sum(w_j * xv)  # d loss / d a_end through the chunk state
        dd_ref[r, :] = jnp.sum(dy_j * x_j, axis=0)  # dD partial [Pb]
        xw = x_j * w_j[:, None]
        return tuple(db_k + dot(xw, ds_ref[r, :, ns], (1, 0), mm_dtype) for db_k, (ns, _) in zip(db, slices))

    db = jax.lax.fori_loop(0, d.rep, head, tuple(jnp.zeros((bm, bn), f32) for _ in slices))
    for db_k, (ns, cols) in zip(db, slices):
        _store(db_ref, (slice(None), ns), db_k, rows_j, cols)


def _chunk_bwd_dc_kernel(*refs, d: Dims, bs: GpuBlockSizes, has_seg, has_z, mm_dtype):
    """Row side of a chunk for rows i, looping over the heads of the group: dC and d a_i."""
    x_ref, dout_ref, b_ref, c_ref, cb_ref, dt_ref, a_ref, s_ref = refs[:8]
    rest = list(refs[8:])
    seg_ref = rest.pop(0) if has_seg else None
    z_ref = rest.pop(0) if has_z else None
    dc_ref, da_ref = rest
    ci, it = pl.program_id(1), pl.program_id(3)
    q, bm, bn, pb = d.chunk, bs.bm, bs.bn, d.pb
    i0 = it * bm
    exact_t = d.seqlen % q == 0
    cols_p = _valid(0, pb, d.head_dim, pb == d.head_dim)
    rows_i = _valid(ci * q + i0, bm, d.seqlen, exact_t)
    idx_i = i0 + _iota(bm)
    slices = _n_slices(d, bs)
    c_i = [_load(c_ref, (pl.ds(i0, bm), ns), rows_i, cols, (bm, bn)).astype(f32) for ns, cols in slices]
    if has_seg:
        seg_i = seg_ref[pl.ds(ci * q + i0, bm)]
        _, seg_prev = _chunk_seg(seg_ref, ci, q)

    def head(r, dc):
        dy_i = _load(dout_ref, (pl.ds(i0, bm), r, slice(None)), rows_i, cols_p, (bm, pb)).astype(f32)
        if has_z:
            dy_i = dy_i * silu(_load(z_ref, (pl.ds(i0, bm), r, slice(None)), rows_i, cols_p, (bm, pb)).astype(f32))
        a_i = a_ref[r, pl.ds(i0, bm)]  # [bm]
        # State -> output: dC_i += exp(a_i) dy_i s_c; d a_i += exp(a_i) dy_i . (s_c C_i).
        e_i = jnp.exp(a_i)
        if has_seg:
            e_i = jnp.where(seg_i == seg_prev, e_i, 0.0)
        dy_e = dy_i * e_i[:, None]
        da = jnp.zeros((bm,), f32)
        new_dc = []
        for dc_k, c_k, (ns, _) in zip(dc, c_i, slices):
            dc_off = dot(dy_e, s_ref[r, :, ns], (1, 0), mm_dtype)  # [bm,bn]
            da = da + jnp.sum(dc_off * c_k, axis=1)
            new_dc.append(dc_k + dc_off)

        # Intra-chunk tiles j <= i: dC_i += dCB_h[i,j] B_j; d a_i += sum_j dCB_h[i,j] CB[i,j].
        def tile(jt, carry):
            dc, da = carry
            j0 = jt * bm
            rows_j = _valid(ci * q + j0, bm, d.seqlen, exact_t)
            keep = idx_i[:, None] >= (j0 + _iota(bm))[None, :]
            if has_seg:
                keep = keep & (seg_i[:, None] == seg_ref[pl.ds(ci * q + j0, bm)][None, :])
            lmat = decay_matrix(a_i[:, None], a_ref[r, pl.ds(j0, bm)][None, :], keep)  # [bm_i,bm_j]
            x_j = _load(x_ref, (pl.ds(j0, bm), r, slice(None)), rows_j, cols_p, (bm, pb))
            dcb = dot(dy_i, x_j, (1, 1), mm_dtype) * dt_ref[r, pl.ds(j0, bm)][None, :] * lmat
            da = da + jnp.sum(dcb * cb_ref[pl.ds(i0, bm), pl.ds(j0, bm)], axis=1)
            dc = tuple(
                dc_k + dot(dcb, _load(b_ref, (pl.ds(j0, bm), ns), rows_j, cols, (bm, bn)), (1, 0), mm_dtype)
                for dc_k, (ns, cols) in zip(dc, slices)
            )  # [bm_i,bn] each
            return dc, da

        dc, da = jax.lax.fori_loop(0, it + 1, tile, (tuple(new_dc), da))
        da_ref[r, :] = da  # d loss / d a_i (row side)
        return dc

    dc = jax.lax.fori_loop(0, d.rep, head, tuple(jnp.zeros((bm, bn), f32) for _ in slices))
    for dc_k, (ns, cols) in zip(dc, slices):
        _store(dc_ref, (slice(None), ns), dc_k, rows_i, cols)


# ------------------------------------------------------------------------------------ cost model
def kernel_costs(d: Dims, itemsize: int, has_z: bool = False) -> dict[str, pl.CostEstimate]:
    """FLOPs (matmuls only), exps and HBM bytes of each kernel for one call.

    FLOPs count the tiles the kernels compute (the causal half of each [Q,Q] block, C B^T once per
    group). Bytes are the distinct bytes each kernel reads and writes (every tensor once: the
    roofline lower bound; re-reads of B/C by the heads of a group and of the chunk by its row tiles
    are assumed to hit L2).
    """
    b, t, h, p, g, n, q, nc = d.batch, d.seqlen, d.heads, d.head_dim, d.groups, d.d_state, d.chunk, d.nc
    x = b * t * h * p * itemsize  # one [B,T,H,P] tensor
    bc = b * t * g * n * itemsize  # one of B, C
    vec = b * h * nc * q * 4  # one [B,H,Tc] fp32 vector (dt or a)
    states = b * nc * h * p * n * itemsize  # s_c or ds, stored in the matmul dtype
    causal = q * (q + 1) / 2  # token pairs (i >= j) per chunk
    cb = b * nc * g * causal * 4  # the causal tiles of C B^T, fp32
    tri = b * nc * h * causal
    xz = 2 if has_z else 1  # x-sized inputs that come with the gate

    def est(flops, trans, nbytes):
        return pl.CostEstimate(flops=int(flops), transcendentals=int(trans), bytes_accessed=int(nbytes))

    return {
        "ssd_bmm": est(2 * b * nc * g * causal * n, 0, 2 * bc + cb),
        "ssd_state_fwd": est(2 * b * t * h * p * n, b * t * h, x + bc + 2 * vec + states),
        "ssd_chunk_fwd": est(
            2 * tri * p + 2 * b * t * h * n * p, tri + b * t * h, xz * x + bc + cb + 2 * vec + states + xz * x
        ),
        "ssd_state_bwd": est(2 * b * t * h * p * n, b * t * h, xz * x + bc + vec + 2 * states),
        "ssd_chunk_bwd_dx": est(
            2 * tri * (2 * p + n) + 4 * b * t * h * p * n,
            tri + b * t * h,
            (2 * xz + (1 if has_z else 0)) * x + 2 * bc + cb + 2 * vec + states + xz * x + bc + 3 * vec,
        ),
        "ssd_chunk_bwd_dc": est(
            2 * tri * (p + n) + 2 * b * t * h * p * n,
            tri + b * t * h,
            (1 + xz) * x + 2 * bc + cb + 2 * vec + states + bc + vec,
        ),
    }


# ---------------------------------------------------------------------------------- entry points
def _pad_state(s, d: Dims):
    return jnp.pad(s.astype(f32), ((0, 0), (0, 0), (0, d.pb - d.head_dim), (0, d.nb - d.d_state)))


def _skip_weights(D, d: Dims):
    """D as [H,Pb] fp32 (zeros without D)."""
    if D is None:
        return jnp.zeros((d.heads, d.pb), f32)
    D2 = jnp.broadcast_to(D.astype(f32)[:, None] if D.ndim == 1 else D.astype(f32), (d.heads, d.head_dim))
    return jnp.pad(D2, ((0, 0), (0, d.pb - d.head_dim)))


def _bmm(d, bs, B, C, mm_dtype, interpret):
    nt = d.chunk // bs.bm
    spec = pl.BlockSpec((None, d.chunk, None, d.nb), lambda b, c, g, i, j: (b, c, g, 0))
    return pl.pallas_call(
        functools.partial(_bmm_kernel, d=d, bs=bs, mm_dtype=mm_dtype),
        out_shape=jax.ShapeDtypeStruct((d.batch, d.nc, d.groups, d.chunk, d.chunk), f32),
        grid=(d.batch, d.nc, d.groups, nt, nt),
        in_specs=[spec, spec],
        out_specs=pl.BlockSpec((None, None, None, bs.bm, bs.bm), lambda b, c, g, i, j: (b, c, g, i, j)),
        compiler_params=_params(bs),
        interpret=interpret,
        cost_estimate=kernel_costs(d, jnp.dtype(mm_dtype).itemsize)["ssd_bmm"],
        name="ssd_bmm",
    )(C, B)


def _state_fwd(d, bs, x, B, dt_h, a_h, seg, init, mm_dtype, interpret):
    rep, tc, bp, bn = d.rep, d.tc, bs.bp, bs.bn
    in_specs = [
        pl.BlockSpec((None, tc, None, bp), lambda b, h, p, n: (b, 0, h, p)),
        pl.BlockSpec((None, tc, None, bn), lambda b, h, p, n: (b, 0, h // rep, n)),
        pl.BlockSpec((None, None, tc), lambda b, h, p, n: (b, h, 0)),
        pl.BlockSpec((None, None, tc), lambda b, h, p, n: (b, h, 0)),
    ]
    args = [x, B, dt_h, a_h]
    if seg is not None:
        in_specs.append(pl.BlockSpec((None, tc), lambda b, h, p, n: (b, 0)))
        args.append(seg)
    if init is not None:
        in_specs.append(pl.BlockSpec((None, None, bp, bn), lambda b, h, p, n: (b, h, p, n)))
        args.append(_pad_state(init, d))
    return pl.pallas_call(
        functools.partial(
            _state_fwd_kernel, d=d, bs=bs, has_seg=seg is not None, has_init=init is not None, mm_dtype=mm_dtype
        ),
        out_shape=(
            jax.ShapeDtypeStruct((d.batch, d.nc, d.heads, d.pb, d.nb), mm_dtype),
            jax.ShapeDtypeStruct((d.batch, d.heads, d.pb, d.nb), f32),
        ),
        grid=(d.batch, d.heads, d.pb // bp, d.nb // bn),
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((None, d.nc, None, bp, bn), lambda b, h, p, n: (b, 0, h, p, n)),
            pl.BlockSpec((None, None, bp, bn), lambda b, h, p, n: (b, h, p, n)),
        ),
        compiler_params=_params(bs),
        interpret=interpret,
        cost_estimate=kernel_costs(d, jnp.dtype(mm_dtype).itemsize)["ssd_state_fwd"],
        name="ssd_state_fwd",
    )(*args)


def forward(x, dt_h, a_h, B, C, *, chunk_size, D, z, seg, initial_states, save_ypre, interpret, block_sizes=None):
    """Kernels 1-3. Returns (y [B,T,H,P] x.dtype, final [B,H,P,N] f32, ypre [B,T,H,P] or None)."""
    d = dims(x, B, chunk_size)
    mm_dtype = jnp.promote_types(x.dtype, B.dtype)
    bs = block_sizes or GpuBlockSizes.choose(d.chunk, d.head_dim, d.d_state, mm_dtype, has_z=z is not None)
    bs.check(d.chunk, d.pb, d.nb)
    cb = _bmm(d, bs, B, C, mm_dtype, interpret)  # [B,c,G,Q,Q]
    states, final = _state_fwd(d, bs, x, B, dt_h, a_h, seg, initial_states, mm_dtype, interpret)
    rep, q, bm, nm = d.rep, d.chunk, bs.bm, d.chunk // bs.bm
    in_specs = [
        pl.BlockSpec((None, q, None, d.pb), lambda b, c, h, i: (b, c, h, 0)),  # x
        pl.BlockSpec((None, q, None, d.nb), lambda b, c, h, i: (b, c, h // rep, 0)),  # C
        pl.BlockSpec((None, None, None, q, q), lambda b, c, h, i: (b, c, h // rep, 0, 0)),  # CB
        pl.BlockSpec((None, None, q), lambda b, c, h, i: (b, h, c)),  # dt
        pl.BlockSpec((None, None, q), lambda b, c, h, i: (b, h, c)),  # a
        pl.BlockSpec((None, None, None, d.pb, d.nb), lambda b, c, h, i: (b, c, h, 0, 0)),  # s_c
        pl.BlockSpec((None, d.pb), lambda b, c, h, i: (h, 0)),  # D
    ]
    args = [x, C, cb, dt_h, a_h, states, _skip_weights(D, d)]
    if seg is not None:
        in_specs.append(pl.BlockSpec((None, d.tc), lambda b, c, h, i: (b, 0)))
        args.append(seg)
    row_spec = pl.BlockSpec((None, bm, None, d.pb), lambda b, c, h, i: (b, c * nm + i, h, 0))
    if z is not None:
        in_specs.append(row_spec)
        args.append(z)
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    if save_ypre:
        out_shape.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
    outs = pl.pallas_call(
        functools.partial(
            _chunk_fwd_kernel,
            d=d,
            bs=bs,
            has_seg=seg is not None,
            has_z=z is not None,
            save_ypre=save_ypre,
            mm_dtype=mm_dtype,
        ),
        out_shape=tuple(out_shape),
        grid=(d.batch, d.nc, d.heads, nm),
        in_specs=in_specs,
        out_specs=tuple([row_spec] * len(out_shape)),
        compiler_params=_params(bs),
        interpret=interpret,
        cost_estimate=kernel_costs(d, jnp.dtype(mm_dtype).itemsize, z is not None)["ssd_chunk_fwd"],
        name="ssd_chunk_fwd",
    )(*args)
    final = final[:, :, : d.head_dim, : d.d_state]
    return outs[0], final, (outs[1] if save_ypre else None)


def backward(
    x, dt_h, a_h, B, C, dout, dfinal, *, chunk_size, D, z, ypre, seg, initial_states, interpret, block_sizes=None
):
    """Kernels 1, 2 (recompute), 4, 5, 6.

    Returns:
        dict with dx [B,T,H,P], dB, dC [B,T,G,N] (input dtypes), ddt_direct, da [B,H,Tc] f32,
        dD_part [..., H, Pb] f32, dz (or None), dinit [B,H,P,N] f32.
    """
    d = dims(x, B, chunk_size)
    mm_dtype = jnp.promote_types(x.dtype, B.dtype)
    itemsize = jnp.dtype(mm_dtype).itemsize
    has_z, has_seg = z is not None, seg is not None
    bs = block_sizes or GpuBlockSizes.choose(d.chunk, d.head_dim, d.d_state, mm_dtype, has_z=has_z)
    bs.check(d.chunk, d.pb, d.nb)
    cb = _bmm(d, bs, B, C, mm_dtype, interpret)
    states, _ = _state_fwd(d, bs, x, B, dt_h, a_h, seg, initial_states, mm_dtype, interpret)
    rep, q, tc, bp, bn, bm = d.rep, d.chunk, d.tc, bs.bp, bs.bn, bs.bm
    ntile = (d.pb // bp) * (d.nb // bn)
    nm = q // bm
    costs = kernel_costs(d, itemsize, has_z)

    # Kernel 4: reverse state pass.
    dfinal = jnp.zeros((d.batch, d.heads, d.pb, d.nb), f32) if dfinal is None else _pad_state(dfinal, d)
    in_specs = [
        pl.BlockSpec((None, tc, None, bp), lambda b, h, p, n: (b, 0, h, p)),  # dout
        pl.BlockSpec((None, tc, None, bn), lambda b, h, p, n: (b, 0, h // rep, n)),  # C
        pl.BlockSpec((None, None, tc), lambda b, h, p, n: (b, h, 0)),  # a
        pl.BlockSpec((None, d.nc, None, bp, bn), lambda b, h, p, n: (b, 0, h, p, n)),  # s_c
        pl.BlockSpec((None, None, bp, bn), lambda b, h, p, n: (b, h, p, n)),  # d final
    ]
    args = [dout, C, a_h, states, dfinal]
    if has_seg:
        in_specs.append(pl.BlockSpec((None, tc), lambda b, h, p, n: (b, 0)))
        args.append(seg)
    if has_z:
        in_specs.append(pl.BlockSpec((None, tc, None, bp), lambda b, h, p, n: (b, 0, h, p)))
        args.append(z)
    nn_ = d.nb // bn
    ds_out, dinit, ddec = pl.pallas_call(
        functools.partial(_state_bwd_kernel, d=d, bs=bs, has_seg=has_seg, has_z=has_z, mm_dtype=mm_dtype),
        out_shape=(
            jax.ShapeDtypeStruct((d.batch, d.nc, d.heads, d.pb, d.nb), mm_dtype),
            jax.ShapeDtypeStruct((d.batch, d.heads, d.pb, d.nb), f32),
            jax.ShapeDtypeStruct((d.batch, d.heads, ntile, d.nc), f32),
        ),
        grid=(d.batch, d.heads, d.pb // bp, nn_),
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((None, d.nc, None, bp, bn), lambda b, h, p, n: (b, 0, h, p, n)),
            pl.BlockSpec((None, None, bp, bn), lambda b, h, p, n: (b, h, p, n)),
            pl.BlockSpec((None, None, None, d.nc), lambda b, h, p, n: (b, h, p * nn_ + n, 0)),
        ),
        compiler_params=_params(bs),
        interpret=interpret,
        cost_estimate=costs["ssd_state_bwd"],
        name="ssd_state_bwd",
    )(*args)

    # Kernels 5 and 6 read whole chunks of every head of a group.
    grp = pl.BlockSpec((None, q, rep, d.pb), lambda b, c, g, i: (b, c, g, 0))  # x, dout, z, ypre
    bc = pl.BlockSpec((None, q, None, d.nb), lambda b, c, g, i: (b, c, g, 0))  # B, C
    cb_spec = pl.BlockSpec((None, None, None, q, q), lambda b, c, g, i: (b, c, g, 0, 0))
    vec = pl.BlockSpec((None, rep, q), lambda b, c, g, i: (b, g, c))  # dt, a
    st = pl.BlockSpec((None, None, rep, d.pb, d.nb), lambda b, c, g, i: (b, c, g, 0, 0))
    seg_spec = pl.BlockSpec((None, tc), lambda b, c, g, i: (b, 0))
    grid = (d.batch, d.nc, d.groups, nm)

    # Kernel 5: dx, dz, dB, d dt (direct), d a (column side), dD.
    in_specs = [grp, grp, bc, bc, cb_spec, vec, vec, st, pl.BlockSpec((rep, d.pb), lambda b, c, g, i: (g, 0))]
    args = [x, dout, B, C, cb, dt_h, a_h, ds_out, _skip_weights(D, d)]
    if has_seg:
        in_specs.append(seg_spec)
        args.append(seg)
    if has_z:
        in_specs += [grp, grp]
        args += [z, ypre]
    row_grp = pl.BlockSpec((None, bm, rep, d.pb), lambda b, c, g, i: (b, c * nm + i, g, 0))
    out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype)]
    out_specs = [row_grp]
    if has_z:
        out_shape.append(jax.ShapeDtypeStruct(z.shape, z.dtype))
        out_specs.append(row_grp)
    out_shape += [
        jax.ShapeDtypeStruct(B.shape, B.dtype),
        jax.ShapeDtypeStruct((d.batch, d.heads, tc), f32),
        jax.ShapeDtypeStruct((d.batch, d.heads, tc), f32),
        jax.ShapeDtypeStruct((d.batch, d.nc * nm, d.heads), f32),
        jax.ShapeDtypeStruct((d.batch, d.nc * nm, d.heads, d.pb), f32),
    ]
    out_specs += [
        pl.BlockSpec((None, bm, None, d.nb), lambda b, c, g, i: (b, c * nm + i, g, 0)),
        pl.BlockSpec((None, rep, bm), lambda b, c, g, i: (b, g, c * nm + i)),
        pl.BlockSpec((None, rep, bm), lambda b, c, g, i: (b, g, c * nm + i)),
        pl.BlockSpec((None, None, rep), lambda b, c, g, i: (b, c * nm + i, g)),
        pl.BlockSpec((None, None, rep, d.pb), lambda b, c, g, i: (b, c * nm + i, g, 0)),
    ]
    outs = list(
        pl.pallas_call(
            functools.partial(_chunk_bwd_dx_kernel, d=d, bs=bs, has_seg=has_seg, has_z=has_z, mm_dtype=mm_dtype),
            out_shape=tuple(out_shape),
            grid=grid,
            in_specs=in_specs,
            out_specs=tuple(out_specs),
            compiler_params=_params(bs),
            interpret=interpret,
            cost_estimate=costs["ssd_chunk_bwd_dx"],
            name="ssd_chunk_bwd_dx",
        )(*args)
    )
    dx = outs.pop(0)
    dz = outs.pop(0) if has_z else None
    dB, ddt_direct, da_col, daend, dD_part = outs

    # Kernel 6: dC and d a (row side).
    in_specs = [grp, grp, bc, bc, cb_spec, vec, vec, st]
    args = [x, dout, B, C, cb, dt_h, a_h, states]
    if has_seg:
        in_specs.append(seg_spec)
        args.append(seg)
    if has_z:
        in_specs.append(grp)
        args.append(z)
    dC, da_row = pl.pallas_call(
        functools.partial(_chunk_bwd_dc_kernel, d=d, bs=bs, has_seg=has_seg, has_z=has_z, mm_dtype=mm_dtype),
        out_shape=(
            jax.ShapeDtypeStruct(C.shape, C.dtype),
            jax.ShapeDtypeStruct((d.batch, d.heads, tc), f32),
        ),
        grid=grid,
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((None, bm, None, d.nb), lambda b, c, g, i: (b, c * nm + i, g, 0)),
            pl.BlockSpec((None, rep, bm), lambda b, c, g, i: (b, g, c * nm + i)),
        ),
        compiler_params=_params(bs),
        interpret=interpret,
        cost_estimate=costs["ssd_chunk_bwd_dc"],
        name="ssd_chunk_bwd_dc",
    )(*args)

    # d a_end (chunk decay + chunk-state inputs) lands on each chunk's last position.
    a_end_grad = jnp.sum(ddec, axis=2) + jnp.sum(daend.reshape(d.batch, d.nc, nm, d.heads), axis=2).transpose(0, 2, 1)
    da = (da_col + da_row).reshape(d.batch, d.heads, d.nc, q)
    da = da.at[..., q - 1].add(a_end_grad).reshape(d.batch, d.heads, tc)
    return dict(
        dx=dx,
        dz=dz,
        dB=dB,
        dC=dC,
        ddt_direct=ddt_direct,
        da=da,
        dD_part=dD_part[..., : d.head_dim],
        dinit=dinit[:, :, : d.head_dim, : d.d_state],
    )
