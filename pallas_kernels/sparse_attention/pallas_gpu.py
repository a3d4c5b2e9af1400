"""Pallas Triton (GPU) kernels of the sparse attention op: forward, dQ, dK/dV and HiP block scoring.

Layout: the op's own [B, T, heads, P] (no transposes, no padding copies). Each program loads its
tiles with `pl.ds` slices of the (b, head) row; rows past Tq / Tk and the columns of a head dim
padded to a power of two (Triton tiles are powers of two) are masked in the loads and stores.

Kernels (flash attention, Dao et al. 2022, Alg. 1 and 2, restricted to the visited blocks):

* forward, grid (nq, B, H), query blocks launched longest-first: online softmax in base 2 (the
  scale folded into one multiply, exp2) over the query block's key blocks: first the FULL blocks
  with no element mask, then the PARTIAL ones with the visibility rule of common.py. The block ids
  come from the slot table (listed patterns) or, for dense patterns, from the loop counter (the
  causal range of the query block, no table, no indirection).
* dQ, grid (nq, B, H): the same walk; P = exp(S - lse) from the saved log-sum-exp,
  dS = P * (dO V^T - delta), dQ += dS K.
* dK/dV, grid (nk, B, K): one program per key block and kv head accumulates over the transposed
  table (common.transpose_table: the (query head, query block) pairs of the G heads of the group
  that visit the block, FULL first) or, for dense patterns, over the causal query-block range of
  every head of the group. No atomics: every dK/dV tile has exactly one writer.
* HiP scoring, grid (nq, B, H): the exact block maximum of q . k over C candidate key blocks per
  query block (hip.py's search calls it once per round).

Every kernel runs on CPU with `interpret=True`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.sparse_attention import common

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _and(*masks):
    """Conjunction of the masks that are not None (None if all are)."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out


def _load(ref, mask, other=0.0):
    return pltriton.load(ref, mask=mask, other=other if mask is not None else None)


class _Geometry:
    """Static sizes and masks shared by the kernels of one call."""

    def __init__(self, cfg: common.Config, head_dim: int):
        self.cfg = cfg
        self.p = head_dim
        self.pp = max(16, common.next_pow2(head_dim))
        self.q_tail = cfg.seq_q % cfg.block_q != 0
        self.k_tail = cfg.seq_k % cfg.block_k != 0

    def col_mask(self):
        """[1, Pp] valid head-dim columns (None when P is a power of two)."""
        if self.pp == self.p:
            return None
        return lax.broadcasted_iota(jnp.int32, (1, self.pp), 1) < self.p

    def q_rows(self, i):
        """[bq, 1] query rows of block i that exist (None when Tq is a multiple of bq)."""
        if not self.q_tail:
            return None
        rows = i * self.cfg.block_q + lax.broadcasted_iota(jnp.int32, (self.cfg.block_q, 1), 0)
        return rows < self.cfg.seq_q

    def k_rows(self, blk, masked: bool):
        """[bk, 1] key rows of block blk that exist (FULL blocks never reach past Tk)."""
        if not (self.k_tail and masked):
            return None
        rows = blk * self.cfg.block_k + lax.broadcasted_iota(jnp.int32, (self.cfg.block_k, 1), 0)
        return rows < self.cfg.seq_k

    def vis(self, i, blk, listed, qseg, kseg):
        """[bq, bk] element mask of query block i against key block blk."""
        cfg = self.cfg
        qpos = i * cfg.block_q + lax.broadcasted_iota(jnp.int32, (cfg.block_q, 1), 0) + cfg.offset
        kpos = blk * cfg.block_k + lax.broadcasted_iota(jnp.int32, (1, cfg.block_k), 1)
        m = common.visible(qpos, kpos, listed, cfg)
        if qseg is not None:
            m = m & (qseg[:, None] == kseg[None, :])
        return m


def _row_vec(ref, start, size, valid_len, other, head=None):
    """Loads ref[(head,) start:start+size] (one 1-D row), `other` at offsets >= valid_len."""
    idx = (pl.ds(start, size),) if head is None else (head, pl.ds(start, size))
    if valid_len is None:
        return ref[idx]
    off = lax.broadcasted_iota(jnp.int32, (size,), 0)
    return pltriton.load(ref.at[idx], mask=off < valid_len, other=other)


def _seg_rows(ref, start, size, length, tail):
    """Segment ids ref[start:start+size] (-1 past `length` when the block has a tail)."""
    return _row_vec(ref, start, size, (length - start) if tail else None, -1)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, geo: _Geometry, dense: bool, nq: int):
    if dense:
        q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, qseg_ref, kseg_ref, fetch_ref, code_ref, count_ref, o_ref, lse_ref) = refs
    cfg = geo.cfg
    bq, bk, pp = cfg.block_q, cfg.block_k, geo.pp
    i = nq - 1 - pl.program_id(0)  # longest causal rows first
    col = geo.col_mask()
    qmask = _and(geo.q_rows(i), col)
    q = _load(q_ref, qmask)  # [bq, Pp]
    qseg = _seg_rows(qseg_ref, 0, bq, cfg.seq_q - i * bq, geo.q_tail) if cfg.segmented else None
    c = cfg.sm_scale * LOG2E

    def step(blk, listed, masked, carry):
        m, l, acc = carry  # [bq], [bq], [bq, Pp]
        start = pl.multiple_of(blk * bk, bk)
        kvmask = _and(geo.k_rows(blk, masked), col)
        k = _load(k_ref.at[pl.ds(start, bk), :], kvmask)  # [bk, Pp]
        v = _load(v_ref.at[pl.ds(start, bk), :], kvmask)
        s = common.dot_nt(q, k) * c  # [bq, bk] scores in log2 units
        if masked:
            kseg = _seg_rows(kseg_ref, start, bk, cfg.seq_k, geo.k_tail) if cfg.segmented else None
            vis = geo.vis(i, blk, listed, qseg, kseg)
            s = jnp.where(vis, s, common.NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        if masked:
            p = jnp.where(vis, p, 0.0)
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + common.dot_nn(p.astype(v.dtype), v)
        return m_new, l, acc

    if dense:
        n_full, n_vis = common.dense_bounds(i, cfg)
        full = lambda s, carry: step(s, True, False, carry)
        part = lambda s, carry: step(s, True, True, carry)
    else:
        n_full, n_vis = count_ref[0], count_ref[1]
        full = lambda s, carry: step(fetch_ref[s], True, False, carry)
        part = lambda s, carry: step(fetch_ref[s], code_ref[s] == common.PARTIAL_LISTED, True, carry)
    carry = (
        jnp.full((bq,), common.NEG_INF, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, pp), jnp.float32),
    )
    carry = lax.fori_loop(0, n_full, full, carry)
    m, l, acc = lax.fori_loop(n_full, n_vis, part, carry)
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse = jnp.where(seen, m * LN2 + jnp.log(l_safe), common.LSE_EMPTY)
    pltriton.store(o_ref, o.astype(o_ref.dtype), mask=qmask)
    rows = geo.q_rows(i)
    pltriton.store(lse_ref, lse, mask=None if rows is None else rows[:, 0])


def _table_specs(index_q, slots_pad: int):
    """BlockSpecs of the slot table rows (fetch, code, counts) of one query block."""
    return [
        pl.BlockSpec((None, None, None, slots_pad), index_q),
        pl.BlockSpec((None, None, None, slots_pad), index_q),
        pl.BlockSpec((None, None, None, 2), index_q),
    ]


def _table_inputs(table: common.SlotTable):
    """Slot table padded to a power-of-two slot count (Triton tensors are powers of two)."""
    s = table.fetch.shape[-1]
    sp = common.next_pow2(s)
    pad = ((0, 0),) * 3 + ((0, sp - s),)
    fetch = jnp.pad(table.fetch, pad, mode="edge")
    code = jnp.pad(table.code, pad, constant_values=common.INVALID)
    counts = jnp.stack([table.n_full, table.n_valid], axis=-1)
    return sp, (fetch, code, counts)


def forward(q, k, v, q_seg, k_seg, table, cfg: common.Config, *, num_warps: int, num_stages: int, interpret=False):
    """Sparse attention forward.

    Args:
        q: [B, Tq, H, P]; k, v: [B, Tk, K, P]; q_seg / k_seg: int32 [B, Tq] / [B, Tk].
        table: the SlotTable, or None for a dense pattern.
        cfg: the static configuration (its blocks are the kernel tiles).

    Returns:
        o [B, Tq, H, P] in q.dtype and lse fp32 [B, H, Tq] (natural log; LSE_EMPTY for rows
        that see nothing).
    """
    b, tq, h, p = q.shape
    kv_heads = k.shape[2]
    g = h // kv_heads
    geo = _Geometry(cfg, p)
    bq, bk, pp, nq, nk = cfg.block_q, cfg.block_k, geo.pp, cfg.nq, cfg.nk
    dense = table is None
    rev = lambda i: nq - 1 - i
    in_specs = [
        pl.BlockSpec((None, bq, None, pp), lambda i, bi, hi: (bi, rev(i), hi, 0)),
        pl.BlockSpec((None, nk * bk, None, pp), lambda i, bi, hi: (bi, 0, hi // g, 0)),
        pl.BlockSpec((None, nk * bk, None, pp), lambda i, bi, hi: (bi, 0, hi // g, 0)),
        pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, rev(i))),
        pl.BlockSpec((None, nk * bk), lambda i, bi, hi: (bi, 0)),
    ]
    args = [q, k, v, q_seg, k_seg]
    n_slots = None
    if not dense:
        n_slots = table.fetch.shape[-1]
        sp, tabs = _table_inputs(table)
        in_specs += _table_specs(lambda i, bi, hi: (bi, hi, rev(i), 0), sp)
        args += tabs
    kernel = functools.partial(_fwd_kernel, geo=geo, dense=dense, nq=nq)
    o, lse = pl.pallas_call(
        kernel,
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, bq, None, pp), lambda i, bi, hi: (bi, rev(i), hi, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, rev(i))),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, tq, h, p), q.dtype), jax.ShapeDtypeStruct((b, h, tq), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=common.pass_cost("fwd", cfg, q, k, n_slots),
        interpret=interpret,
        name="sparse_attention_fwd_gpu",
    )(*args)
    return o, lse


# ----------------------------------------------------------------------------- dQ


def _dq_kernel(*refs, geo: _Geometry, dense: bool, nq: int):
    if dense:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref = refs
    else:
        (
            q_ref,
            k_ref,
            v_ref,
            do_ref,
            lse_ref,
            delta_ref,
            qseg_ref,
            kseg_ref,
            fetch_ref,
            code_ref,
            count_ref,
            dq_ref,
        ) = refs
    cfg = geo.cfg
    bq, bk, pp = cfg.block_q, cfg.block_k, geo.pp
    i = nq - 1 - pl.program_id(0)
    col = geo.col_mask()
    rows = geo.q_rows(i)
    qmask = _and(rows, col)
    q = _load(q_ref, qmask)  # [bq, Pp]
    do = _load(do_ref, qmask)
    valid_len = None if rows is None else cfg.seq_q - i * bq
    lse2 = _row_vec(lse_ref, 0, bq, valid_len, common.LSE_EMPTY) * LOG2E  # [bq]
    delta = _row_vec(delta_ref, 0, bq, valid_len, 0.0)
    qseg = _seg_rows(qseg_ref, 0, bq, cfg.seq_q - i * bq, geo.q_tail) if cfg.segmented else None
    c = cfg.sm_scale * LOG2E

    def step(blk, listed, masked, dq):
        start = pl.multiple_of(blk * bk, bk)
        kvmask = _and(geo.k_rows(blk, masked), col)
        k = _load(k_ref.at[pl.ds(start, bk), :], kvmask)
        v = _load(v_ref.at[pl.ds(start, bk), :], kvmask)
        p = jnp.exp2(common.dot_nt(q, k) * c - lse2[:, None])  # [bq, bk]
        if masked:
            kseg = _seg_rows(kseg_ref, start, bk, cfg.seq_k, geo.k_tail) if cfg.segmented else None
            p = jnp.where(geo.vis(i, blk, listed, qseg, kseg), p, 0.0)
        ds = p * (common.dot_nt(do, v) - delta[:, None])
        return dq + common.dot_nn(ds.astype(k.dtype), k)

    if dense:
        n_full, n_vis = common.dense_bounds(i, cfg)
        full = lambda s, dq: step(s, True, False, dq)
        part = lambda s, dq: step(s, True, True, dq)
    else:
        n_full, n_vis = count_ref[0], count_ref[1]
        full = lambda s, dq: step(fetch_ref[s], True, False, dq)
        part = lambda s, dq: step(fetch_ref[s], code_ref[s] == common.PARTIAL_LISTED, True, dq)
    dq = jnp.zeros((bq, pp), jnp.float32)
    dq = lax.fori_loop(0, n_full, full, dq)
    dq = lax.fori_loop(n_full, n_vis, part, dq)
    pltriton.store(dq_ref, (dq * cfg.sm_scale).astype(dq_ref.dtype), mask=qmask)


# ----------------------------------------------------------------------------- dK / dV


def _dkv_kernel(*refs, geo: _Geometry, dense: bool, groups: int, nq: int):
    if dense:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, entry_ref, bounds_ref, dk_ref, dv_ref) = (
            refs
        )
    cfg = geo.cfg
    bq, bk, pp = cfg.block_q, cfg.block_k, geo.pp
    j = pl.program_id(0)
    col = geo.col_mask()
    kmask = _and(geo.k_rows(j, True), col)
    k = _load(k_ref, kmask)  # [bk, Pp]
    v = _load(v_ref, kmask)
    kseg = _seg_rows(kseg_ref, 0, bk, cfg.seq_k - j * bk, geo.k_tail) if cfg.segmented else None
    c = cfg.sm_scale * LOG2E

    def step(g, i, listed, masked, carry):
        dk, dv = carry
        start = pl.multiple_of(i * bq, bq)
        rows = geo.q_rows(i)
        qmask = _and(rows, col)
        q = _load(q_ref.at[pl.ds(start, bq), g, :], qmask)  # [bq, Pp]
        do = _load(do_ref.at[pl.ds(start, bq), g, :], qmask)
        valid_len = None if rows is None else cfg.seq_q - start
        lse2 = _row_vec(lse_ref, start, bq, valid_len, common.LSE_EMPTY, head=g) * LOG2E
        delta = _row_vec(delta_ref, start, bq, valid_len, 0.0, head=g)
        p = jnp.exp2(common.dot_nt(q, k) * c - lse2[:, None])  # [bq, bk]
        if masked:
            qseg = _seg_rows(qseg_ref, start, bq, cfg.seq_q, geo.q_tail) if cfg.segmented else None
            p = jnp.where(geo.vis(i, j, listed, qseg, kseg), p, 0.0)
        dv = dv + common.dot_tn(p.astype(do.dtype), do)
        ds = p * (common.dot_nt(do, v) - delta[:, None])
        dk = dk + common.dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    carry = (jnp.zeros((bk, pp), jnp.float32), jnp.zeros((bk, pp), jnp.float32))
    if dense:
        i_first, i_full = common.dense_query_bounds(j, cfg)

        def per_head(g, carry):
            carry = lax.fori_loop(i_first, i_full, lambda i, c_: step(g, i, True, True, c_), carry)
            return lax.fori_loop(i_full, nq, lambda i, c_: step(g, i, True, False, c_), carry)

        carry = lax.fori_loop(0, groups, per_head, carry)
    else:
        start, mid, end = bounds_ref[0], bounds_ref[1], bounds_ref[2]

        def entry(r, masked, carry):
            e = entry_ref[r]
            src, code = e // 4, e % 4
            return step(src // nq, src % nq, code == common.PARTIAL_LISTED, masked, carry)

        carry = lax.fori_loop(start, mid, lambda r, c_: entry(r, False, c_), carry)
        carry = lax.fori_loop(mid, end, lambda r, c_: entry(r, True, c_), carry)
    dk, dv = carry
    pltriton.store(dk_ref, (dk * cfg.sm_scale).astype(dk_ref.dtype), mask=kmask)
    pltriton.store(dv_ref, dv.astype(dv_ref.dtype), mask=kmask)


def backward(
    q, k, v, q_seg, k_seg, table, o, lse, do, cfg: common.Config, *, num_warps: int, num_stages: int, interpret=False
):
    """dQ, dK, dV of the sparse attention (shapes and dtypes of q, k, v).

    `table` is the forward's SlotTable (None for dense patterns); `lse` the forward's fp32
    [B, H, Tq] log-sum-exp; `o`, `do` are [B, Tq, H, P].
    """
    b, tq, h, p = q.shape
    tk, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    geo = _Geometry(cfg, p)
    bq, bk, pp, nq, nk = cfg.block_q, cfg.block_k, geo.pp, cfg.nq, cfg.nk
    dense = table is None
    delta = jnp.einsum("bthp,bthp->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    params = pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    n_slots = None if dense else table.fetch.shape[-1]
    rev = lambda i: nq - 1 - i

    # dQ: one program per (query block, batch, head).
    in_specs = [
        pl.BlockSpec((None, bq, None, pp), lambda i, bi, hi: (bi, rev(i), hi, 0)),
        pl.BlockSpec((None, nk * bk, None, pp), lambda i, bi, hi: (bi, 0, hi // g, 0)),
        pl.BlockSpec((None, nk * bk, None, pp), lambda i, bi, hi: (bi, 0, hi // g, 0)),
        pl.BlockSpec((None, bq, None, pp), lambda i, bi, hi: (bi, rev(i), hi, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, rev(i))),
        pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, rev(i))),
        pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, rev(i))),
        pl.BlockSpec((None, nk * bk), lambda i, bi, hi: (bi, 0)),
    ]
    args = [q, k, v, do, lse, delta, q_seg, k_seg]
    if not dense:
        sp, tabs = _table_inputs(table)
        in_specs += _table_specs(lambda i, bi, hi: (bi, hi, rev(i), 0), sp)
        args += tabs
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, geo=geo, dense=dense, nq=nq),
        grid=(nq, b, h),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, pp), lambda i, bi, hi: (bi, rev(i), hi, 0)),
        out_shape=jax.ShapeDtypeStruct((b, tq, h, p), q.dtype),
        compiler_params=params,
        cost_estimate=common.pass_cost("dq", cfg, q, k, n_slots),
        interpret=interpret,
        name="sparse_attention_dq_gpu",
    )(*args)

    # dK, dV: one program per (key block, batch, kv head), summing over the G heads of the group.
    in_specs = [
        pl.BlockSpec((None, nq * bq, g, pp), lambda j, bi, ki: (bi, 0, ki, 0)),
        pl.BlockSpec((None, bk, None, pp), lambda j, bi, ki: (bi, j, ki, 0)),
        pl.BlockSpec((None, bk, None, pp), lambda j, bi, ki: (bi, j, ki, 0)),
        pl.BlockSpec((None, nq * bq, g, pp), lambda j, bi, ki: (bi, 0, ki, 0)),
        pl.BlockSpec((None, g, nq * bq), lambda j, bi, ki: (bi, ki, 0)),
        pl.BlockSpec((None, g, nq * bq), lambda j, bi, ki: (bi, ki, 0)),
        pl.BlockSpec((None, nq * bq), lambda j, bi, ki: (bi, 0)),
        pl.BlockSpec((None, bk), lambda j, bi, ki: (bi, j)),
    ]
    args = [q, k, v, do, lse, delta, q_seg, k_seg]
    if not dense:
        kt = common.transpose_table(table, cfg, kv_heads)
        e = kt.entry.shape[-1]
        ep = common.next_pow2(e)
        entry = jnp.pad(kt.entry, ((0, 0), (0, 0), (0, ep - e)))
        in_specs += [
            pl.BlockSpec((None, None, ep), lambda j, bi, ki: (bi, ki, 0)),
            pl.BlockSpec((None, None, None, 4), lambda j, bi, ki: (bi, ki, j, 0)),
        ]
        args += [entry, kt.bounds]
    kv_spec = pl.BlockSpec((None, bk, None, pp), lambda j, bi, ki: (bi, j, ki, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, geo=geo, dense=dense, groups=g, nq=nq),
        grid=(nk, b, kv_heads),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[
            jax.ShapeDtypeStruct((b, tk, kv_heads, p), k.dtype),
            jax.ShapeDtypeStruct((b, tk, kv_heads, p), v.dtype),
        ],
        compiler_params=params,
        cost_estimate=common.pass_cost("dkv", cfg, q, k, n_slots),
        interpret=interpret,
        name="sparse_attention_dkv_gpu",
    )(*args)
    return dq, dk, dv


# ----------------------------------------------------------------------------- HiP scoring


def _score_kernel(q_ref, k_ref, cand_ref, out_ref, *, geo: _Geometry, causal: bool, n_cand: int):
    cfg = geo.cfg
    bq, bk = cfg.block_q, cfg.block_k
    i = pl.program_id(0)
    col = geo.col_mask()
    rows = geo.q_rows(i)
    q = _load(q_ref, _and(rows, col))  # [bq, Pp]
    qpos = i * bq + lax.broadcasted_iota(jnp.int32, (bq, 1), 0) + cfg.offset
    qok = lax.broadcasted_iota(jnp.int32, (bq, 1), 0) < cfg.seq_q - i * bq
    slots = lax.broadcasted_iota(jnp.int32, (cand_ref.shape[0],), 0)

    def body(c, scores):
        blk = cand_ref[c]
        start = pl.multiple_of(blk * bk, bk)
        k = _load(k_ref.at[pl.ds(start, bk), :], _and(geo.k_rows(blk, True), col))
        s = common.dot_nt(q, k)  # [bq, bk]
        kpos = start + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        ok = qok & (kpos < cfg.seq_k)
        if causal:
            ok = ok & (kpos <= qpos)
        best = jnp.max(jnp.where(ok, s, -jnp.inf))
        return jnp.where(slots == c, best, scores)

    scores = jnp.full((cand_ref.shape[0],), -jnp.inf, jnp.float32)
    out_ref[...] = lax.fori_loop(0, n_cand, body, scores)


def score_blocks(q, k, cand, cfg: common.Config, *, interpret=False, num_warps: int = 4, num_stages: int = 2):
    """Exact block-max scores for HiP's search.

    Args:
        q: [B, Tq, H, P]; k: [B, Tk, K, P].
        cand: int32 [B, H, nq, C] candidate key blocks (in range) per query block.
        cfg: blocks, lengths and `causal` (other pattern fields are ignored).

    Returns:
        fp32 [B, H, nq, C]: max over the query block's rows and the key block's keys (causally
        visible pairs, real rows only) of q . k; -inf if no pair is visible.
    """
    b, _, h, p = q.shape
    g = h // k.shape[2]
    geo = _Geometry(cfg, p)
    bq, bk, pp, nq, nk = cfg.block_q, cfg.block_k, geo.pp, cfg.nq, cfg.nk
    n_cand = cand.shape[-1]
    cp = common.next_pow2(n_cand)
    cand_p = jnp.pad(cand, ((0, 0),) * 3 + ((0, cp - n_cand),), mode="edge")
    item = jnp.dtype(q.dtype).itemsize
    pairs = b * h * nq * n_cand
    out = pl.pallas_call(
        functools.partial(_score_kernel, geo=geo, causal=cfg.causal, n_cand=n_cand),
        grid=(nq, b, h),
        in_specs=[
            pl.BlockSpec((None, bq, None, pp), lambda i, bi, hi: (bi, i, hi, 0)),
            pl.BlockSpec((None, nk * bk, None, pp), lambda i, bi, hi: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, None, None, cp), lambda i, bi, hi: (bi, hi, i, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, None, cp), lambda i, bi, hi: (bi, hi, i, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, nq, cp), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=pl.CostEstimate(
            flops=2 * pairs * bq * bk * p, transcendentals=0, bytes_accessed=q.size * item + pairs * bk * p * item
        ),
        interpret=interpret,
        name="hip_score_blocks_gpu",
    )(q, k, cand_p)
    return out[..., :n_cand]


def _rep_score_kernel(q_ref, reps_ref, qlim_ref, kpos_ref, out_ref, *, rep_keys: int):
    q = q_ref[...]  # [R, Pp] sampled query rows
    qlim = qlim_ref[...]  # [R, 1]
    best = jnp.full((out_ref.shape[0],), -jnp.inf, jnp.float32)
    for j in range(rep_keys):  # key j of every candidate's representative
        s = common.dot_nt(q, reps_ref[j])  # [R, C]
        ok = kpos_ref[j][None, :] <= qlim
        best = jnp.maximum(best, jnp.max(jnp.where(ok, s, -jnp.inf), axis=0))
    out_ref[...] = best


def score_representatives(qs, reps, qlim, kpos, *, interpret=False, num_warps: int = 4, num_stages: int = 2):
    """HiP's representative scores (Algorithm 1): per candidate branch, the max of q . k over the
    sampled query rows x the branch's representative keys (allowed pairs only).

    Args:
        qs: [B, H, nq, R, P] sampled query rows of every query block.
        reps: [B, H, nq, b_k, C, P] key j of the representative of every candidate branch.
        qlim: int32 [nq, R] the largest key position each row may see (-1 for padding rows).
        kpos: int32 [B, H, nq, b_k, C] the position of every representative key (int32 max for
            keys that do not exist).

    Returns:
        fp32 [B, H, nq, C]; -inf where no pair is allowed.
    """
    b, h, nq, r, p = qs.shape
    rep_keys, c = reps.shape[3], reps.shape[4]
    # Triton's dot wants power-of-two sides >= 16: pad rows (never allowed), candidates and P.
    rp, cp, pp = (max(16, common.next_pow2(n)) for n in (r, c, p))
    kp = common.next_pow2(rep_keys)
    qs = jnp.pad(qs, ((0, 0),) * 3 + ((0, rp - r), (0, pp - p)))
    reps = jnp.pad(reps, ((0, 0),) * 3 + ((0, kp - rep_keys), (0, cp - c), (0, pp - p)))
    qlim = jnp.pad(qlim, ((0, 0), (0, rp - r)), constant_values=-1)[..., None]  # [nq, Rp, 1]
    kpos = jnp.pad(kpos, ((0, 0),) * 3 + ((0, kp - rep_keys), (0, cp - c)), constant_values=jnp.iinfo(jnp.int32).max)
    item = jnp.dtype(qs.dtype).itemsize
    out = pl.pallas_call(
        functools.partial(_rep_score_kernel, rep_keys=rep_keys),
        grid=(nq, b, h),
        in_specs=[
            pl.BlockSpec((None, None, None, rp, pp), lambda i, bi, hi: (bi, hi, i, 0, 0)),
            pl.BlockSpec((None, None, None, kp, cp, pp), lambda i, bi, hi: (bi, hi, i, 0, 0, 0)),
            pl.BlockSpec((None, rp, 1), lambda i, bi, hi: (i, 0, 0)),
            pl.BlockSpec((None, None, None, kp, cp), lambda i, bi, hi: (bi, hi, i, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, None, cp), lambda i, bi, hi: (bi, hi, i, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, nq, cp), jnp.float32),
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        cost_estimate=pl.CostEstimate(
            flops=2 * b * h * nq * r * rep_keys * c * p,
            transcendentals=0,
            bytes_accessed=(b * h * nq * (r + rep_keys * c) * p) * item,
        ),
        interpret=interpret,
        name="hip_score_representatives_gpu",
    )(qs, reps, qlim, kpos)
    return out[..., :c]
