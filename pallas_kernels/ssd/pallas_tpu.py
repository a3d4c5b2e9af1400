"""SSD kernels for TPUs (Pallas -> Mosaic): one fused forward kernel and one fused backward kernel.

Notation and equations as in `pallas_gpu.py` (Mamba-2 paper, Dao & Gu 2024, Sec. 6, Listing 1):
a_t the within-chunk cumulative log-decay, L[i,j] = exp(a_i - a_j) for i >= j in one sequence.

A TPU core runs the grid in order, so the chunk axis can be sequential and carry the state in VMEM:
no state round trip through HBM and no separate state-passing step. The carry of the R heads of a
group lives in the group's output block of the final states ([R,P,N], resident while the grid walks
that group's chunks and heads, written back once), so no block is ever revisited.

  * `ssd_tpu_fwd`, grid (B, G, c, R) ("parallel", "parallel", "arbitrary", "arbitrary"):
    at r == 0, CB = C B^T for the (group, chunk) into scratch (once per group);
    for head h = g R + r, with s = the carried state [P,N] of that head:
        y = (L o CB)(dt x) + exp(a) C s^T + D x, times silu(z)          (steps 1 + 4)
        s <- exp(a_end) s + (exp(a_end - a) dt x)^T B                     (steps 2 + 3)
    With `emit_states` it also writes s_c (the state entering each chunk, [B,H,c,P,N] in the matmul
    dtype: only the backward's dots read it); with `emit_y=False` (`ssd_tpu_fwd_states`) it only
    runs the state recurrence.
  * `ssd_tpu_bwd`, grid (B, G, c, R) with the chunks in reverse, carrying ds (the cotangent of the
    state leaving the chunk) per head in the group's [R,P,N] block of d initial states. For each
    (chunk, head), with dy = dout silu(z):
        u = (L o CB)^T dy, dCB_h = (dy x^T) o dt_j o L, v = B ds^T,
        dx = dt u + exp(a_end - a) dt v + D dy,   dz = dout (y + D x) silu'(z),
        d a = rowsum(dCB_h o CB) - colsum(dCB_h o CB) - exp(a_end - a) dt x.v + exp(a) dy.(s_c C)
              (+ d a_end at the last position),
        ds <- exp(a_end) ds + (exp(a) dy)^T C;
    dCB, the state part of dB and the output part of dC are summed over the R heads in scratch;
    at r == R-1: dB = sum_h dB_h + dCB^T C, dC = sum_h dC_h + dCB B (once per group).

Layouts: Mosaic wants the last two block dims to be multiples of (8, 128) or the full array dims, so
the kernels read head-major copies x [B,H,Tc,P], B/C [B,G,Tc,N] (full P and N blocks, Q rows) and
per-token vectors both as columns [.., Tc, 1] and as rows [.., c, 1, Q]. The XLA prologue that makes
them (a transpose plus the time padding, fused by XLA into one copy per tensor) is the TPU-specific
cost; the GPU kernels read the native layout instead.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.ssd.common import Dims, decay_matrix, dims, dot, dsilu, silu

f32 = jnp.float32


def vmem_estimate(d: Dims, itemsize: int, backward: bool) -> int:
    """Bytes of VMEM: double-buffered blocks + scratch + [Q,Q] temporaries (columns padded to 128 lanes)."""
    q, p, n, r = d.chunk, d.head_dim, d.d_state, d.rep
    lane = lambda k: -(-k // 128) * 128
    col = q * 128 * 4
    blocks = (4 if backward else 3) * q * lane(p) * itemsize + 2 * q * lane(n) * itemsize + 6 * col
    blocks += 2 * p * lane(n) * 4 + (2 if backward else 0) * q * lane(n) * itemsize
    blocks += r * p * lane(n) * 4  # the group's state carry block
    scratch = q * lane(q) * 4 + (q * lane(q) * 4 + 2 * q * lane(n) * 4 if backward else 0)
    temps = (6 if backward else 3) * q * lane(q) * 4
    return 2 * blocks + scratch + temps


def _params(d: Dims, itemsize: int, backward: bool):
    limit = int(min(max(2 * vmem_estimate(d, itemsize, backward), 32 * 2**20), 60 * 2**20))
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary"), vmem_limit_bytes=limit
    )


def kernel_costs(d: Dims, itemsize: int, has_z: bool = False) -> dict[str, pl.CostEstimate]:
    """FLOPs (matmuls only, full [Q,Q] tiles: the MXU does not skip the upper triangle), exps and
    HBM bytes (every block the grid reads or writes once; C/B re-read by the R heads of a group)."""
    b, t, h, p, g, n, q, nc = d.batch, d.tc, d.heads, d.head_dim, d.groups, d.d_state, d.chunk, d.nc
    x = b * t * h * p * itemsize
    bc = b * t * g * n * itemsize
    col = b * h * t * 4 * 2  # [.., Tc, 1] column + [.., c, 1, Q] row of one fp32 vector
    states = b * nc * h * p * n * itemsize  # s_c, stored in the matmul dtype
    xz = 2 if has_z else 1
    qq = b * nc * q * q
    est = lambda fl, tr, by: pl.CostEstimate(flops=int(fl), transcendentals=int(tr), bytes_accessed=int(by))  # noqa: E731
    return {
        "ssd_tpu_fwd": est(
            2 * qq * g * n + 2 * qq * h * p + 4 * b * t * h * p * n,
            qq * h + 2 * b * t * h,
            xz * x + 2 * d.rep * bc + 2 * col + xz * x,
        ),
        "ssd_tpu_fwd_states": est(2 * b * t * h * p * n, b * t * h, x + d.rep * bc + 2 * col + states),
        "ssd_tpu_bwd": est(
            2 * qq * g * n * 3 + 4 * qq * h * p + 10 * b * t * h * p * n,
            qq * h + 3 * b * t * h,
            (2 * xz + (1 if has_z else 0)) * x + 2 * d.rep * bc + 3 * col + states + xz * x + 2 * bc + col,
        ),
    }


# --------------------------------------------------------------------------------------- kernels
def _fwd_kernel(*refs, d: Dims, has_seg, has_init, has_z, emit_y, save_ypre, emit_states, mm_dtype):
    """One (batch, group, chunk, head-in-group) step of the fused forward."""
    it = iter(refs)
    x_ref, b_ref, c_ref, dt_ref, a_ref, arow_ref, d_ref = (next(it) for _ in range(7))
    segc_ref, segr_ref, segend_ref, segprev_ref = (next(it) for _ in range(4)) if has_seg else (None,) * 4
    init_ref = next(it) if has_init else None
    z_ref = next(it) if has_z else None
    y_ref = next(it) if emit_y else None
    ypre_ref = next(it) if save_ypre else None
    final_ref = next(it)  # [R,P,N] the group's block of the final states: the carry of each head
    states_ref = next(it) if emit_states else None
    cb_scr = next(it) if emit_y else None  # [Q,Q]
    q = d.chunk
    c, r = pl.program_id(2), pl.program_id(3)

    @pl.when(c == 0)
    def _():
        final_ref[r] = init_ref[r].astype(f32) if has_init else jnp.zeros((d.head_dim, d.d_state), f32)

    s = final_ref[r]  # [P,N] state entering the chunk
    if emit_states:
        states_ref[...] = s.astype(states_ref.dtype)  # only read by the backward's dots
    a_col = a_ref[...]  # [Q,1]
    a_end = a_col[q - 1 :, :]  # [1,1]
    dt_col = dt_ref[...]  # [Q,1]
    x = x_ref[...].astype(f32)  # [Q,P]
    decay = jnp.exp(a_end)  # [1,1]
    w_state = jnp.exp(a_end - a_col) * dt_col  # [Q,1]
    if has_seg:
        seg_col, seg_end, seg_prev = segc_ref[...], segend_ref[...], segprev_ref[...]
        decay = jnp.where(seg_end == seg_prev, decay, 0.0)  # a new sequence drops the carry
        w_state = jnp.where(seg_col == seg_end, w_state, 0.0)

    if emit_y:
        # C B^T once per (group, chunk).
        @pl.when(r == 0)
        def _():
            cb_scr[...] = dot(c_ref[...], b_ref[...], (1, 1), mm_dtype)

        # Intra-chunk (step 1): (L o CB) (dt x).
        rows = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
        keep = rows >= jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
        if has_seg:
            keep = keep & (seg_col == segr_ref[...])
        lmat = decay_matrix(a_col, arow_ref[...], keep)  # [Q,Q]
        y = dot(cb_scr[...] * lmat, x * dt_col, (1, 0), mm_dtype)  # [Q,P]
        # State -> output (step 4): exp(a_i) C_i s^T for tokens of the carried state's sequence.
        w_off = jnp.exp(a_col)
        if has_seg:
            w_off = jnp.where(seg_col == seg_prev, w_off, 0.0)
        y = y + dot(c_ref[...], s, (1, 1), mm_dtype) * w_off
        y = y + d_ref[...] * x  # skip term D x
        if save_ypre:
            ypre_ref[...] = y.astype(ypre_ref.dtype)
        if has_z:
            y = y * silu(z_ref[...].astype(f32))
        y_ref[...] = y.astype(y_ref.dtype)

    # Chunk state and state passing (steps 2 + 3).
    final_ref[r] = s * decay + dot(x * w_state, b_ref[...], (0, 0), mm_dtype)  # [P,N]


def _bwd_kernel(*refs, d: Dims, has_seg, has_z, mm_dtype):
    """One (batch, group, chunk from the end, head-in-group) step of the fused backward."""
    it = iter(refs)
    x_ref, dout_ref, b_ref, c_ref, dt_ref, dtrow_ref, a_ref, arow_ref, s_ref, dfinal_ref, d_ref = (
        next(it) for _ in range(11)
    )
    segc_ref, segr_ref, segend_ref, segprev_ref = (next(it) for _ in range(4)) if has_seg else (None,) * 4
    z_ref, ypre_ref = (next(it), next(it)) if has_z else (None, None)
    dx_ref = next(it)
    dz_ref = next(it) if has_z else None
    db_ref, dc_ref, ddt_ref, da_ref, darow_ref, dd_ref = (next(it) for _ in range(6))
    dinit_ref = next(it)  # [R,P,N] the group's block of d initial states: the carry ds of each head
    cb_scr, dcb_acc, db_acc, dc_acc = (next(it) for _ in range(4))
    q = d.chunk
    c, r = pl.program_id(2), pl.program_id(3)

    @pl.when(c == 0)
    def _():
        dinit_ref[r] = dfinal_ref[r]

    @pl.when(r == 0)
    def _():
        cb_scr[...] = dot(c_ref[...], b_ref[...], (1, 1), mm_dtype)
        dcb_acc[...] = jnp.zeros_like(dcb_acc)
        db_acc[...] = jnp.zeros_like(db_acc)
        dc_acc[...] = jnp.zeros_like(dc_acc)

    ds = dinit_ref[r]  # [P,N] cotangent of the state leaving the chunk
    s_c = s_ref[...].astype(f32)  # [P,N] state entering the chunk
    x = x_ref[...].astype(f32)  # [Q,P]
    bmat, cmat = b_ref[...], c_ref[...]  # [Q,N]
    a_col, a_row, dt_col = a_ref[...], arow_ref[...], dt_ref[...]
    a_end = a_col[q - 1 :, :]  # [1,1]
    dy = dout_ref[...].astype(f32)  # [Q,P]
    if has_z:
        z = z_ref[...].astype(f32)
        dz_ref[...] = (dy * ypre_ref[...].astype(f32) * dsilu(z)).astype(dz_ref.dtype)
        dy = dy * silu(z)
    rows = jax.lax.broadcasted_iota(jnp.int32, (q, q), 0)
    keep = rows >= jax.lax.broadcasted_iota(jnp.int32, (q, q), 1)
    decay = jnp.exp(a_end)
    e_state = jnp.exp(a_end - a_col)  # [Q,1]
    e_off = jnp.exp(a_col)  # [Q,1]
    if has_seg:
        seg_col, seg_end, seg_prev = segc_ref[...], segend_ref[...], segprev_ref[...]
        keep = keep & (seg_col == segr_ref[...])
        decay = jnp.where(seg_end == seg_prev, decay, 0.0)
        e_state = jnp.where(seg_col == seg_end, e_state, 0.0)
        e_off = jnp.where(seg_col == seg_prev, e_off, 0.0)
    w_state = e_state * dt_col  # [Q,1]

    # Intra-chunk: u = (L o CB)^T dy, dCB_h = (dy x^T) o dt_j o L.
    lmat = decay_matrix(a_col, a_row, keep)  # [Q,Q]
    cb = cb_scr[...]
    u = dot(cb * lmat, dy, (0, 0), mm_dtype)  # [Q,P]
    dcb = dot(dy, x, (1, 1), mm_dtype) * dtrow_ref[...] * lmat  # [Q,Q]
    dcb_acc[...] += dcb
    # State -> output: dC_h = exp(a) dy s_c, and its share of d a.
    dc_off = dot(dy * e_off, s_c, (1, 0), mm_dtype)  # [Q,N]
    dc_acc[...] += dc_off
    # Chunk state: v = B ds^T feeds dx and d dt; dB_h = (exp(a_end - a) dt x) ds.
    v = dot(bmat, ds, (1, 1), mm_dtype)  # [Q,P]
    db_acc[...] += dot(x * w_state, ds, (1, 0), mm_dtype)  # [Q,N]
    dx_ref[...] = (dt_col * u + w_state * v + d_ref[...] * dy).astype(dx_ref.dtype)
    xu = jnp.sum(x * u, axis=1, keepdims=True)  # [Q,1]
    xv = jnp.sum(x * v, axis=1, keepdims=True)
    ddt_ref[...] = xu + e_state * xv  # d loss / d dt_t through dt_t x_t
    # d a_t: rows and columns of the decay matrix, the state readout, the chunk-state inputs and
    # (at the chunk's last position) a_end through the chunk decay and the state weights.
    a_end_grad = jnp.sum(w_state * xv, keepdims=True) + decay * jnp.sum(ds * s_c, keepdims=True)  # [1,1]
    # Row sums minus column sums of dCB o CB, both from the same fp32 tile so that they cancel
    # exactly; the column sums leave as a row [1,Q] (no transpose in the kernel; XLA adds the two).
    e = dcb * cb  # [Q,Q]
    da = jnp.sum(e, axis=1, keepdims=True) + jnp.sum(dc_off * cmat.astype(f32), axis=1, keepdims=True) - w_state * xv
    last = jax.lax.broadcasted_iota(jnp.int32, (q, 1), 0) == q - 1
    da_ref[...] = da + jnp.where(last, a_end_grad, 0.0)  # [Q,1]
    darow_ref[...] = -jnp.sum(e, axis=0, keepdims=True)  # [1,Q]
    dd_ref[...] = jnp.sum(dy * x, axis=0, keepdims=True)  # dD partial [1,P]
    # Reverse state passing: ds_c = exp(a_end) ds_{c+1} + (exp(a) dy)^T C.
    dinit_ref[r] = ds * decay + dot(dy * e_off, cmat, (0, 0), mm_dtype)  # [P,N]

    # Once per (group, chunk): dB = sum_h dB_h + dCB^T C, dC = sum_h dC_h + dCB B.
    @pl.when(r == d.rep - 1)
    def _():
        db_ref[...] = (db_acc[...] + dot(dcb_acc[...], cmat, (0, 0), mm_dtype)).astype(db_ref.dtype)
        dc_ref[...] = (dc_acc[...] + dot(dcb_acc[...], bmat, (1, 0), mm_dtype)).astype(dc_ref.dtype)


# ---------------------------------------------------------------------------------- entry points
def _head_major(a, d: Dims):
    """[B,T,K,W] -> [B,K,Tc,W] (transpose + time padding; one XLA copy)."""
    a = jnp.transpose(a, (0, 2, 1, 3))
    return jnp.pad(a, ((0, 0), (0, 0), (0, d.tc - d.seqlen), (0, 0)))


def _time_major(a, d: Dims):
    """[B,K,Tc,W] -> [B,T,K,W]."""
    return jnp.transpose(a[:, :, : d.seqlen], (0, 2, 1, 3))


def _vectors(dt_h, a_h, seg, d: Dims):
    """Per-token vectors as columns [B,H,Tc,1] and rows [B,H,c,1,Q]; segment columns/rows/ends."""
    q, nc = d.chunk, d.nc
    out = dict(
        dt_col=dt_h[..., None],
        a_col=a_h[..., None],
        dt_row=dt_h.reshape(d.batch, d.heads, nc, 1, q),
        a_row=a_h.reshape(d.batch, d.heads, nc, 1, q),
    )
    if seg is not None:
        seg_c = seg.reshape(d.batch, nc, q)
        seg_end = seg_c[:, :, -1]  # [B,c]
        seg_prev = jnp.concatenate([jnp.zeros_like(seg_end[:, :1]), seg_end[:, :-1]], axis=1)
        out.update(
            seg_col=seg[..., None],
            seg_row=seg_c[:, :, None, :],
            seg_end=seg_end[:, :, None, None],
            seg_prev=seg_prev[:, :, None, None],
        )
    return out


def _specs(d: Dims, reverse: bool):
    """BlockSpecs over the grid (B, G, c, R); chunk order reversed for the backward."""
    rep, q, p, n = d.rep, d.chunk, d.head_dim, d.d_state
    cc = (lambda c: d.nc - 1 - c) if reverse else (lambda c: c)
    head = lambda g, r: g * rep + r
    return dict(
        x=pl.BlockSpec((None, None, q, p), lambda b, g, c, r: (b, head(g, r), cc(c), 0)),
        bc=pl.BlockSpec((None, None, q, n), lambda b, g, c, r: (b, g, cc(c), 0)),
        col=pl.BlockSpec((None, None, q, 1), lambda b, g, c, r: (b, head(g, r), cc(c), 0)),
        row=pl.BlockSpec((None, None, None, 1, q), lambda b, g, c, r: (b, head(g, r), cc(c), 0, 0)),
        d=pl.BlockSpec((None, 1, p), lambda b, g, c, r: (head(g, r), 0, 0)),
        seg_col=pl.BlockSpec((None, q, 1), lambda b, g, c, r: (b, cc(c), 0)),
        seg_row=pl.BlockSpec((None, None, 1, q), lambda b, g, c, r: (b, cc(c), 0, 0)),
        seg_one=pl.BlockSpec((None, None, 1, 1), lambda b, g, c, r: (b, cc(c), 0, 0)),
        state=pl.BlockSpec((None, rep, p, n), lambda b, g, c, r: (b, g, 0, 0)),  # all heads of the group
        chunk_state=pl.BlockSpec((None, None, None, p, n), lambda b, g, c, r: (b, head(g, r), cc(c), 0, 0)),
        chunk_row=pl.BlockSpec((None, None, None, 1, p), lambda b, g, c, r: (b, head(g, r), cc(c), 0, 0)),
    )


def _skip_weights(D, d: Dims):
    if D is None:
        return jnp.zeros((d.heads, 1, d.head_dim), f32)
    D2 = D.astype(f32)[:, None] if D.ndim == 1 else D.astype(f32)
    return jnp.broadcast_to(D2, (d.heads, d.head_dim))[:, None, :]


def _fwd_call(d, x_h, b_g, c_g, vec, D, z_h, init, *, emit_y, save_ypre, emit_states, mm_dtype, interpret):
    sp = _specs(d, reverse=False)
    has_seg, has_init, has_z = "seg_col" in vec, init is not None, z_h is not None and emit_y
    in_specs = [sp["x"], sp["bc"], sp["bc"], sp["col"], sp["col"], sp["row"], sp["d"]]
    args = [x_h, b_g, c_g, vec["dt_col"], vec["a_col"], vec["a_row"], _skip_weights(D, d)]
    if has_seg:
        in_specs += [sp["seg_col"], sp["seg_row"], sp["seg_one"], sp["seg_one"]]
        args += [vec["seg_col"], vec["seg_row"], vec["seg_end"], vec["seg_prev"]]
    if has_init:
        in_specs.append(sp["state"])
        args.append(init.astype(f32))
    if has_z:
        in_specs.append(sp["x"])
        args.append(z_h)
    out_shape, out_specs = [], []
    if emit_y:
        out_shape += [jax.ShapeDtypeStruct(x_h.shape, x_h.dtype)] * (2 if save_ypre else 1)
        out_specs += [sp["x"]] * (2 if save_ypre else 1)
    out_shape.append(jax.ShapeDtypeStruct((d.batch, d.heads, d.head_dim, d.d_state), f32))
    out_specs.append(sp["state"])
    if emit_states:
        out_shape.append(jax.ShapeDtypeStruct((d.batch, d.heads, d.nc, d.head_dim, d.d_state), mm_dtype))
        out_specs.append(sp["chunk_state"])
    scratch = [pltpu.VMEM((d.chunk, d.chunk), f32)] if emit_y else []
    itemsize = jnp.dtype(mm_dtype).itemsize
    name = "ssd_tpu_fwd" if emit_y else "ssd_tpu_fwd_states"
    return pl.pallas_call(
        functools.partial(
            _fwd_kernel,
            d=d,
            has_seg=has_seg,
            has_init=has_init,
            has_z=has_z,
            emit_y=emit_y,
            save_ypre=save_ypre,
            emit_states=emit_states,
            mm_dtype=mm_dtype,
        ),
        out_shape=tuple(out_shape),
        grid=(d.batch, d.groups, d.nc, d.rep),
        in_specs=in_specs,
        out_specs=tuple(out_specs),
        scratch_shapes=scratch,
        compiler_params=_params(d, itemsize, backward=False),
        interpret=interpret,
        cost_estimate=kernel_costs(d, itemsize, has_z)[name],
        name=name,
    )(*args)


def forward(x, dt_h, a_h, B, C, *, chunk_size, D, z, seg, initial_states, save_ypre, interpret, block_sizes=None):
    """The fused forward. Returns (y [B,T,H,P] x.dtype, final [B,H,P,N] f32, ypre or None)."""
    del block_sizes  # whole chunks: the only block size is Q
    d = dims(x, B, chunk_size)
    mm_dtype = jnp.promote_types(x.dtype, B.dtype)
    vec = _vectors(dt_h, a_h, seg, d)
    z_h = None if z is None else _head_major(z, d)
    outs = _fwd_call(
        d,
        _head_major(x, d),
        _head_major(B, d),
        _head_major(C, d),
        vec,
        D,
        z_h,
        initial_states,
        emit_y=True,
        save_ypre=save_ypre,
        emit_states=False,
        mm_dtype=mm_dtype,
        interpret=interpret,
    )
    y = _time_major(outs[0], d)
    ypre = _time_major(outs[1], d) if save_ypre else None
    return y, outs[-1], ypre


def backward(
    x, dt_h, a_h, B, C, dout, dfinal, *, chunk_size, D, z, ypre, seg, initial_states, interpret, block_sizes=None
):
    """States recomputed by `ssd_tpu_fwd_states`, then the fused backward. Returns as `pallas_gpu.backward`."""
    del block_sizes
    d = dims(x, B, chunk_size)
    mm_dtype = jnp.promote_types(x.dtype, B.dtype)
    itemsize = jnp.dtype(mm_dtype).itemsize
    vec = _vectors(dt_h, a_h, seg, d)
    x_h, b_g, c_g = _head_major(x, d), _head_major(B, d), _head_major(C, d)
    _, states = _fwd_call(
        d,
        x_h,
        b_g,
        c_g,
        vec,
        None,
        None,
        initial_states,
        emit_y=False,
        save_ypre=False,
        emit_states=True,
        mm_dtype=mm_dtype,
        interpret=interpret,
    )
    has_seg, has_z = seg is not None, z is not None
    sp = _specs(d, reverse=True)
    dfinal = jnp.zeros((d.batch, d.heads, d.head_dim, d.d_state), f32) if dfinal is None else dfinal.astype(f32)
    in_specs = [sp["x"], sp["x"], sp["bc"], sp["bc"], sp["col"], sp["row"], sp["col"], sp["row"]]
    in_specs += [sp["chunk_state"], sp["state"], sp["d"]]
    args = [x_h, _head_major(dout, d), b_g, c_g, vec["dt_col"], vec["dt_row"], vec["a_col"], vec["a_row"]]
    args += [states, dfinal, _skip_weights(D, d)]
    if has_seg:
        in_specs += [sp["seg_col"], sp["seg_row"], sp["seg_one"], sp["seg_one"]]
        args += [vec["seg_col"], vec["seg_row"], vec["seg_end"], vec["seg_prev"]]
    if has_z:
        in_specs += [sp["x"], sp["x"]]
        args += [_head_major(z, d), _head_major(ypre, d)]
    x_struct = jax.ShapeDtypeStruct((d.batch, d.heads, d.tc, d.head_dim), x.dtype)
    col_struct = jax.ShapeDtypeStruct((d.batch, d.heads, d.tc, 1), f32)
    out_shape = [x_struct] + ([jax.ShapeDtypeStruct(x_struct.shape, z.dtype)] if has_z else [])
    out_specs = [sp["x"]] * (2 if has_z else 1)
    out_shape += [
        jax.ShapeDtypeStruct((d.batch, d.groups, d.tc, d.d_state), B.dtype),
        jax.ShapeDtypeStruct((d.batch, d.groups, d.tc, d.d_state), C.dtype),
        col_struct,
        col_struct,
        jax.ShapeDtypeStruct((d.batch, d.heads, d.nc, 1, d.chunk), f32),
        jax.ShapeDtypeStruct((d.batch, d.heads, d.nc, 1, d.head_dim), f32),
        jax.ShapeDtypeStruct((d.batch, d.heads, d.head_dim, d.d_state), f32),
    ]
    out_specs += [sp["bc"], sp["bc"], sp["col"], sp["col"], sp["row"], sp["chunk_row"], sp["state"]]
    q, n = d.chunk, d.d_state
    scratch = [
        pltpu.VMEM((q, q), f32),  # CB
        pltpu.VMEM((q, q), f32),  # sum over heads of dCB
        pltpu.VMEM((q, n), f32),  # dB accumulator
        pltpu.VMEM((q, n), f32),  # dC accumulator
    ]
    outs = list(
        pl.pallas_call(
            functools.partial(_bwd_kernel, d=d, has_seg=has_seg, has_z=has_z, mm_dtype=mm_dtype),
            out_shape=tuple(out_shape),
            grid=(d.batch, d.groups, d.nc, d.rep),
            in_specs=in_specs,
            out_specs=tuple(out_specs),
            scratch_shapes=scratch,
            compiler_params=_params(d, itemsize, backward=True),
            interpret=interpret,
            cost_estimate=kernel_costs(d, itemsize, has_z)["ssd_tpu_bwd"],
            name="ssd_tpu_bwd",
        )(*args)
    )
    dx = _time_major(outs.pop(0), d)
    dz = _time_major(outs.pop(0), d) if has_z else None
    db, dc, ddt, da, da_row, dD_part, dinit = outs
    return dict(
        dx=dx,
        dz=dz,
        dB=_time_major(db, d),
        dC=_time_major(dc, d),
        ddt_direct=ddt[..., 0],
        da=da[..., 0] + da_row.reshape(d.batch, d.heads, d.tc),
        dD_part=jnp.transpose(dD_part[:, :, :, 0, :], (0, 2, 1, 3)),  # [B,c,H,P]
        dinit=dinit,
    )
