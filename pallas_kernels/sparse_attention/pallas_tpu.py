"""Pallas Mosaic (TPU) kernels of the sparse attention op: forward, dQ, dK/dV and HiP block scoring.

Layout: "units" U = B * K, one batch row and kv head with its G query heads: q / o / dO
[U, G, Tq_pad, P], k / v [U, Tk_pad, P], log-sum-exp and delta [U, G, Tq_pad, 1], segment ids
[B, Tq_pad, 1] and [B, nk, 1, bk] (every block's last two dims are full or (8k, full), which
Mosaic tiles). Sequences are zero padded to whole blocks; padded rows are masked by position.

Kernels (flash attention, Dao et al. 2022, Alg. 1 and 2, restricted to the visited blocks); the
BlockSpec pipeline DMAs exactly the visited tiles, the running statistics live in VMEM scratch:

* forward and dQ, grid (U, G, nq, S) for listed patterns: the slot table is scalar-prefetched into
  SMEM and the key/value index maps read it; the slot axis is the sequential reduction axis.
  INVALID slots repeat the previous block id (no new copy) and are skipped with `pl.when`; FULL
  slots skip the element mask. Dense patterns use grid (U, G, nq, nk) with arithmetic index maps
  that clamp to the causal range (steps past it neither copy nor compute), and no table.
* dK/dV, grid (U, E'): the transposed table flattened into one sequential axis
  (common.flat_key_table): the entries of one key block are consecutive, so its dK/dV tile stays
  resident in VMEM while the (query head, query block) tiles that visit it stream through; a
  placeholder entry per key block zeroes the accumulator, the block's last entry writes it. Dense
  patterns use grid (U, nk, G, nq) with the causal query-block range of every key block.
* HiP scoring, grid (U, G, nq, C): the exact block maximum of q . k of C candidate key blocks.

SMEM holds every table of a call; calls whose tables exceed `SMEM_WORDS` int32 words are split
over units (batch rows x kv heads). All kernels run on CPU with `interpret=True` and under
`pltpu.InterpretParams()` (which also checks out-of-bounds block reads).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.sparse_attention import common

SMEM_WORDS = 1 << 17  # int32 table words per pallas_call (512 KiB of SMEM)
_MAX_GROUP = 64  # the flattened key table packs the query head of the group in 6 bits
_MAX_QBLOCKS = 1 << 20  # ... and the query block in 20 bits


def _vis(i, blk, listed, qseg, kseg, cfg: common.Config):
    """[bq, bk] element mask of query block i against key block blk."""
    shape = (cfg.block_q, cfg.block_k)
    qpos = i * cfg.block_q + lax.broadcasted_iota(jnp.int32, shape, 0) + cfg.offset
    kpos = blk * cfg.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
    m = common.visible(qpos, kpos, listed, cfg)
    if cfg.segmented:
        m = m & (qseg == kseg)  # [bq, 1] == [1, bk]
    return m


# ----------------------------------------------------------------------------- layout


def to_units(x, kv_heads: int, t_pad: int):
    """[B, T, H, P] -> [B*K, G, T_pad, P]."""
    b, _, h, p = x.shape
    return common.to_head_major(x, t_pad).reshape(b * kv_heads, h // kv_heads, t_pad, p)


def kv_to_units(x, t_pad: int):
    """[B, T, K, P] -> [B*K, T_pad, P]."""
    b, _, kv_heads, p = x.shape
    return common.to_head_major(x, t_pad).reshape(b * kv_heads, t_pad, p)


def from_units(x, batch: int, seq: int):
    """[B*K, G, T_pad, P] -> [B, T, H, P]."""
    u, g, t_pad, p = x.shape
    x = x.reshape(batch, (u // batch) * g, t_pad, p)[:, :, :seq]
    return jnp.swapaxes(x, 1, 2)


def kv_from_units(x, batch: int, seq: int):
    """[B*K, T_pad, P] -> [B, T, K, P]."""
    u, t_pad, p = x.shape
    return jnp.swapaxes(x.reshape(batch, u // batch, t_pad, p)[:, :, :seq], 1, 2)


def _segments(q_seg, k_seg, cfg: common.Config):
    """Segment ids in the kernels' layout: [B, Tq_pad, 1] and [B, nk, 1, bk]."""
    b = q_seg.shape[0]
    qs = common.pad_seg(q_seg, cfg.nq * cfg.block_q)[:, :, None]
    ks = common.pad_seg(k_seg, cfg.nk * cfg.block_k).reshape(b, cfg.nk, 1, cfg.block_k)
    return qs, ks


def _unit_chunks(n_units: int, words_per_unit: int, what: str):
    """Unit ranges [(start, stop)] whose tables fit SMEM_WORDS."""
    per = SMEM_WORDS // max(1, words_per_unit)
    if per < 1:
        raise ValueError(
            f"sparse_attention (TPU): the {what} table of one (batch row, kv head) needs "
            f"{words_per_unit} int32 words of SMEM > {SMEM_WORDS}; use larger block_q / block_k "
            "or fewer listed blocks."
        )
    return [(s, min(s + per, n_units)) for s in range(0, n_units, per)]


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, cfg: common.Config, dense: bool, groups: int, n_slots: int):
    if dense:
        (q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc) = refs
    else:
        (tab_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc) = refs
    u, g, i, s = (pl.program_id(a) for a in range(4))
    nq = cfg.nq

    @pl.when(s == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, common.NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    if dense:
        n_full, n_vis = common.dense_bounds(i, cfg)
        blk, listed = s, True
        is_full, is_part = s < n_full, (s >= n_full) & (s < n_vis)
    else:
        e = tab_ref[((u * groups + g) * nq + i) * n_slots + s]
        blk, code = e // 4, e % 4 - 1
        listed = code == common.PARTIAL_LISTED
        is_full, is_part = code == common.FULL, (code >= 0) & (code < common.FULL)

    def step(masked):
        s_ = common.dot_nt(q_ref[...], k_ref[...]) * cfg.sm_scale  # [bq, bk]
        if masked:
            vis = _vis(i, blk, listed, qseg_ref[...], kseg_ref[...], cfg)
            s_ = jnp.where(vis, s_, common.NEG_INF)
        m = m_sc[...]
        m_new = jnp.maximum(m, jnp.max(s_, axis=1, keepdims=True))  # [bq, 1]
        p = jnp.exp(s_ - m_new)
        if masked:
            p = jnp.where(vis, p, 0.0)
        alpha = jnp.exp(m - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_sc[...] = alpha * acc_sc[...] + common.dot_nn(p.astype(v.dtype), v)
        m_sc[...] = m_new

    pl.when(is_full)(lambda: step(False))
    pl.when(is_part)(lambda: step(True))

    @pl.when(s == pl.num_programs(3) - 1)
    def _done():
        l = l_sc[...]
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = jnp.where(seen, acc_sc[...] / l_safe, 0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(l_safe), common.LSE_EMPTY)


def _fwd_tables(table, groups: int):
    """Packed forward table of every unit: int32 [U, G*nq*S], block * 4 + (code + 1)."""
    b, h, nq, s = table.fetch.shape
    packed = table.fetch * 4 + (table.code + 1)
    return packed.reshape(b * (h // groups), groups * nq * s)


def _call_rows(
    kernel,
    cfg: common.Config,
    tabs,
    arrays,
    per_unit,
    specs,
    out_specs,
    out_shape,
    scratch,
    n_units: int,
    groups: int,
    steps: int,
    cost,
    interpret,
    name,
):
    """Runs a (U, G, nq, steps) row-major kernel (forward, dQ).

    Listed patterns scalar-prefetch their table `tabs` [U, words]; the call is split over unit
    chunks whose tables fit SMEM (arrays flagged in `per_unit` are sliced per chunk).
    """
    params = _params("parallel", "parallel", "parallel", "arbitrary")
    if tabs is None:
        return pl.pallas_call(
            kernel,
            grid=(n_units, groups, cfg.nq, steps),
            in_specs=specs(0),
            out_specs=out_specs,
            out_shape=out_shape(n_units),
            scratch_shapes=scratch,
            compiler_params=params,
            cost_estimate=cost,
            interpret=interpret,
            name=name,
        )(*arrays)
    outs = []
    for u0, u1 in _unit_chunks(n_units, tabs.shape[1], "slot"):
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(u1 - u0, groups, cfg.nq, steps),
            in_specs=specs(u0),
            out_specs=out_specs,
            scratch_shapes=scratch,
        )
        chunk = [x[u0:u1] if cut else x for x, cut in zip(arrays, per_unit)]
        outs.append(
            pl.pallas_call(
                kernel,
                grid_spec=grid_spec,
                out_shape=out_shape(u1 - u0),
                compiler_params=params,
                cost_estimate=cost,
                interpret=interpret,
                name=name,
            )(tabs[u0:u1].reshape(-1), *chunk)
        )
    if isinstance(outs[0], (list, tuple)):
        return [jnp.concatenate(parts, axis=0) for parts in zip(*outs)]
    return jnp.concatenate(outs, axis=0)


def _kv_block(cfg: common.Config, dense: bool, groups: int, n_slots: int):
    """Key block of grid step (u, g, i, s): the table entry, or the clamped causal range."""
    nq = cfg.nq

    def block(u, g, i, s, tab=None):
        if dense:
            _, n_vis = common.dense_bounds(i, cfg)
            return jnp.clip(s, 0, jnp.maximum(n_vis - 1, 0))
        return tab[((u * groups + g) * nq + i) * n_slots + s] // 4

    return block


def _row_kernel_specs(cfg, head_dim, kv_heads, groups, dense, n_slots, n_q_inputs, n_row_inputs):
    """BlockSpecs of the row-major kernels: `n_q_inputs` [U,G,Tq_pad,P] tiles, k, v,
    `n_row_inputs` [U,G,Tq_pad,1] tiles, q / k segment ids."""
    bq, bk, p = cfg.block_q, cfg.block_k, head_dim
    block = _kv_block(cfg, dense, groups, n_slots)

    def specs(off):  # off: first unit of the chunk (tables and unit arrays are chunk-local)
        q_map = lambda u, g, i, s, *t: (u, g, i, 0)
        kv_map = lambda u, g, i, s, *t: (u, block(u, g, i, s, *t), 0)
        qseg_map = lambda u, g, i, s, *t: ((u + off) // kv_heads, i, 0)
        kseg_map = lambda u, g, i, s, *t: ((u + off) // kv_heads, block(u, g, i, s, *t), 0, 0)
        return (
            [pl.BlockSpec((None, None, bq, p), q_map)] * n_q_inputs
            + [pl.BlockSpec((None, bk, p), kv_map)] * 2
            + [pl.BlockSpec((None, None, bq, 1), q_map)] * n_row_inputs
            + [pl.BlockSpec((None, bq, 1), qseg_map), pl.BlockSpec((None, None, 1, bk), kseg_map)]
        )

    return specs


def forward(q, k, v, q_seg, k_seg, table, cfg: common.Config, *, interpret=False):
    """Sparse attention forward.

    Args:
        q: [B, Tq, H, P]; k, v: [B, Tk, K, P]; q_seg / k_seg: int32 [B, Tq] / [B, Tk].
        table: the SlotTable, or None for a dense pattern.

    Returns:
        o [B, Tq, H, P] in q.dtype and lse fp32 [U, G, Tq_pad, 1] (this module's layout).
    """
    b, tq, h, p = q.shape
    kv_heads = k.shape[2]
    g = h // kv_heads
    nq, nk, bq, bk = cfg.nq, cfg.nk, cfg.block_q, cfg.block_k
    n_units = b * kv_heads
    dense = table is None
    n_slots = nk if dense else table.fetch.shape[-1]
    qu = to_units(q, kv_heads, nq * bq)
    ku, vu = kv_to_units(k, nk * bk), kv_to_units(v, nk * bk)
    qs, ks = _segments(q_seg, k_seg, cfg)
    tabs = None if dense else _fwd_tables(table, g)
    specs = _row_kernel_specs(cfg, p, kv_heads, g, dense, n_slots, 1, 0)
    o_map = lambda u, g_, i, s, *t: (u, g_, i, 0)
    o, lse = _call_rows(
        functools.partial(_fwd_kernel, cfg=cfg, dense=dense, groups=g, n_slots=n_slots),
        cfg,
        tabs,
        [qu, ku, vu, qs, ks],
        [True, True, True, False, False],
        specs,
        [pl.BlockSpec((None, None, bq, p), o_map), pl.BlockSpec((None, None, bq, 1), o_map)],
        lambda n: [
            jax.ShapeDtypeStruct((n, g, nq * bq, p), q.dtype),
            jax.ShapeDtypeStruct((n, g, nq * bq, 1), jnp.float32),
        ],
        [pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, p), jnp.float32)],
        n_units,
        g,
        n_slots,
        common.pass_cost("fwd", cfg, q, k, None if dense else n_slots),
        interpret,
        "sparse_attention_fwd_tpu",
    )
    return from_units(o, b, tq), lse


# ----------------------------------------------------------------------------- dQ


def _dq_kernel(*refs, cfg: common.Config, dense: bool, groups: int, n_slots: int):
    if dense:
        (q_ref, do_ref, k_ref, v_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref, acc_sc) = refs
    else:
        (tab_ref, q_ref, do_ref, k_ref, v_ref, lse_ref, delta_ref, qseg_ref, kseg_ref, dq_ref, acc_sc) = refs
    u, g, i, s = (pl.program_id(a) for a in range(4))
    nq = cfg.nq

    @pl.when(s == 0)
    def _init():
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    if dense:
        n_full, n_vis = common.dense_bounds(i, cfg)
        blk, listed = s, True
        is_full, is_part = s < n_full, (s >= n_full) & (s < n_vis)
    else:
        e = tab_ref[((u * groups + g) * nq + i) * n_slots + s]
        blk, code = e // 4, e % 4 - 1
        listed = code == common.PARTIAL_LISTED
        is_full, is_part = code == common.FULL, (code >= 0) & (code < common.FULL)

    def step(masked):
        k = k_ref[...]
        p = jnp.exp(common.dot_nt(q_ref[...], k) * cfg.sm_scale - lse_ref[...])  # [bq, bk]
        if masked:
            p = jnp.where(_vis(i, blk, listed, qseg_ref[...], kseg_ref[...], cfg), p, 0.0)
        ds = p * (common.dot_nt(do_ref[...], v_ref[...]) - delta_ref[...])
        acc_sc[...] += common.dot_nn(ds.astype(k.dtype), k)

    pl.when(is_full)(lambda: step(False))
    pl.when(is_part)(lambda: step(True))

    @pl.when(s == pl.num_programs(3) - 1)
    def _done():
        dq_ref[...] = (acc_sc[...] * cfg.sm_scale).astype(dq_ref.dtype)


# ----------------------------------------------------------------------------- dK / dV


def _dkv_kernel_table(
    blk_ref,
    info_ref,
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qseg_ref,
    k_ref,
    v_ref,
    kseg_ref,
    dk_ref,
    dv_ref,
    dk_sc,
    dv_sc,
    *,
    cfg: common.Config,
    n_entries: int,
):
    u, e = pl.program_id(0), pl.program_id(1)
    idx = u * n_entries + e
    info = info_ref[idx]
    blk = blk_ref[idx]
    flags = info % 16
    code = flags % 4
    i = (info // 16) % (1 << 20)

    @pl.when(flags // 4 % 2 == 1)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        _dkv_step(
            q_ref,
            do_ref,
            lse_ref,
            delta_ref,
            qseg_ref,
            k_ref,
            v_ref,
            kseg_ref,
            dk_sc,
            dv_sc,
            i,
            blk,
            code == common.PARTIAL_LISTED,
            masked,
            cfg,
        )

    pl.when(code == common.FULL)(lambda: step(False))
    pl.when(code < common.FULL)(lambda: step(True))

    @pl.when(flags // 8 == 1)
    def _done():
        dk_ref[...] = (dk_sc[...] * cfg.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# The dense-pattern dK/dV kernel: its prologue mirrors _dkv_kernel_table (same scratch, same
# zeroing), but it walks a (j, g, i) grid bounded by dense_query_bounds instead of a slot table.
def _dkv_kernel_dense(
    q_ref,
    do_ref,
    lse_ref,
    delta_ref,
    qseg_ref,
    k_ref,
    v_ref,
    kseg_ref,
    dk_ref,
    dv_ref,
    dk_sc,
    dv_sc,
    *,
    cfg: common.Config,
):
    j, g, i = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    last_g, last_i = pl.num_programs(2) - 1, pl.num_programs(3) - 1
    i_first, i_full = common.dense_query_bounds(j, cfg)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def step(masked):
        _dkv_step(
            q_ref, do_ref, lse_ref, delta_ref, qseg_ref, k_ref, v_ref, kseg_ref, dk_sc, dv_sc, i, j, True, masked, cfg
        )

    pl.when((i >= i_first) & (i < i_full))(lambda: step(True))
    pl.when(i >= i_full)(lambda: step(False))

    @pl.when((g == last_g) & (i == last_i))
    def _done():
        dk_ref[...] = (dk_sc[...] * cfg.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _dkv_step(
    q_ref, do_ref, lse_ref, delta_ref, qseg_ref, k_ref, v_ref, kseg_ref, dk_sc, dv_sc, i, blk, listed, masked, cfg
):
    """Adds one (query tile, key tile) pair's dK / dV contributions to the accumulators."""
    q, do = q_ref[...], do_ref[...]
    p = jnp.exp(common.dot_nt(q, k_ref[...]) * cfg.sm_scale - lse_ref[...])  # [bq, bk]
    if masked:
        p = jnp.where(_vis(i, blk, listed, qseg_ref[...], kseg_ref[...], cfg), p, 0.0)
    dv_sc[...] += common.dot_tn(p.astype(do.dtype), do)
    ds = p * (common.dot_nt(do, v_ref[...]) - delta_ref[...])
    dk_sc[...] += common.dot_tn(ds.astype(q.dtype), q)


def backward(q, k, v, q_seg, k_seg, table, o, lse, do, cfg: common.Config, *, fwd_cfg=None, interpret=False):
    """dQ, dK, dV (shapes and dtypes of q, k, v).

    `lse` is the forward's [U, G, Tq_pad, 1] under `fwd_cfg` (default `cfg`); dense patterns may
    run the backward on other tiles (`cfg`).
    """
    b, tq, h, p = q.shape
    tk, kv_heads = k.shape[1], k.shape[2]
    g = h // kv_heads
    nq, nk, bq, bk = cfg.nq, cfg.nk, cfg.block_q, cfg.block_k
    n_units = b * kv_heads
    dense = table is None
    n_slots = nk if dense else table.fetch.shape[-1]
    tq_pad = nq * bq
    qu, dou = to_units(q, kv_heads, tq_pad), to_units(do, kv_heads, tq_pad)
    ku, vu = kv_to_units(k, nk * bk), kv_to_units(v, nk * bk)
    delta = jnp.einsum("bthp,bthp->bht", do.astype(jnp.float32), o.astype(jnp.float32))
    delta = common.to_head_major(delta[..., None].swapaxes(1, 2), tq_pad)  # [B,H,Tq_pad,1]
    delta = delta.reshape(n_units, g, tq_pad, 1)
    # Padded query rows: lse = LSE_EMPTY so that P = 0 there whatever their scores.
    lse = jnp.pad(lse[:, :, :tq], ((0, 0), (0, 0), (0, tq_pad - tq), (0, 0)), constant_values=common.LSE_EMPTY)
    qs, ks = _segments(q_seg, k_seg, cfg)
    # dQ over the same walk as the forward.
    tabs = None if dense else _fwd_tables(table, g)
    specs = _row_kernel_specs(cfg, p, kv_heads, g, dense, n_slots, 2, 2)
    o_map = lambda u, g_, i, s, *t: (u, g_, i, 0)
    dqu = _call_rows(
        functools.partial(_dq_kernel, cfg=cfg, dense=dense, groups=g, n_slots=n_slots),
        cfg,
        tabs,
        [qu, dou, ku, vu, lse, delta, qs, ks],
        [True] * 6 + [False] * 2,
        specs,
        pl.BlockSpec((None, None, bq, p), o_map),
        lambda n: jax.ShapeDtypeStruct((n, g, tq_pad, p), q.dtype),
        [pltpu.VMEM((bq, p), jnp.float32)],
        n_units,
        g,
        n_slots,
        common.pass_cost("dq", cfg, q, k, None if dense else n_slots),
        interpret,
        "sparse_attention_dq_tpu",
    )
    dq = from_units(dqu, b, tq)

    # dK / dV.
    scratch = [pltpu.VMEM((bk, p), jnp.float32), pltpu.VMEM((bk, p), jnp.float32)]
    kv_shape = lambda n: [
        jax.ShapeDtypeStruct((n, nk * bk, p), k.dtype),
        jax.ShapeDtypeStruct((n, nk * bk, p), v.dtype),
    ]
    cost = common.pass_cost("dkv", cfg, q, k, None if dense else n_slots)
    if dense:
        first = lambda j: common.dense_query_bounds(j, cfg)[0]
        q_map = lambda u, j, g_, i: (u, g_, jnp.clip(i, first(j), nq - 1), 0)
        kv_map = lambda u, j, g_, i: (u, j, 0)
        dku, dvu = pl.pallas_call(
            functools.partial(_dkv_kernel_dense, cfg=cfg),
            grid=(n_units, nk, g, nq),
            in_specs=[pl.BlockSpec((None, None, bq, p), q_map)] * 2
            + [pl.BlockSpec((None, None, bq, 1), q_map)] * 2
            + [
                pl.BlockSpec((None, bq, 1), lambda u, j, g_, i: (u // kv_heads, jnp.clip(i, first(j), nq - 1), 0)),
                pl.BlockSpec((None, bk, p), kv_map),
                pl.BlockSpec((None, bk, p), kv_map),
                pl.BlockSpec((None, None, 1, bk), lambda u, j, g_, i: (u // kv_heads, j, 0, 0)),
            ],
            out_specs=[pl.BlockSpec((None, bk, p), kv_map)] * 2,
            out_shape=kv_shape(n_units),
            scratch_shapes=scratch,
            compiler_params=_params("parallel", "parallel", "arbitrary", "arbitrary"),
            cost_estimate=cost,
            interpret=interpret,
            name="sparse_attention_dkv_tpu",
        )(qu, dou, lse, delta, qs, ku, vu, ks)
    else:
        if g > _MAX_GROUP or nq > _MAX_QBLOCKS:
            raise ValueError(
                f"sparse_attention (TPU): heads // kv_heads = {g} (max {_MAX_GROUP})"
                f" or query blocks {nq} (max {_MAX_QBLOCKS}) too large for the dK/dV"
                " table; use more kv heads or a larger block_q."
            )
        ft = common.flat_key_table(table, cfg, kv_heads)
        e_total = ft.blk.shape[-1]
        # Repack (g * nq + i) * 16 + flags as g * 2^24 + i * 16 + flags (no division by nq).
        src, flags = ft.info // 16, ft.info % 16
        info = (src // nq) * (1 << 24) + (src % nq) * 16 + flags
        blk_tab = ft.blk.reshape(n_units, e_total)
        info_tab = info.reshape(n_units, e_total)

        def q_map(u, e, bt, it):
            x = it[u * e_total + e]
            return u, x // (1 << 24), (x // 16) % (1 << 20), 0

        def seg_map(u0):
            return lambda u, e, bt, it: ((u + u0) // kv_heads, (it[u * e_total + e] // 16) % (1 << 20), 0)

        kv_map = lambda u, e, bt, it: (u, bt[u * e_total + e], 0)

        def kseg_map(u0):
            return lambda u, e, bt, it: ((u + u0) // kv_heads, bt[u * e_total + e], 0, 0)

        parts = []
        for u0, u1 in _unit_chunks(n_units, 2 * e_total, "key"):
            grid_spec = pltpu.PrefetchScalarGridSpec(
                num_scalar_prefetch=2,
                grid=(u1 - u0, e_total),
                in_specs=[pl.BlockSpec((None, None, bq, p), q_map)] * 2
                + [pl.BlockSpec((None, None, bq, 1), q_map)] * 2
                + [
                    pl.BlockSpec((None, bq, 1), seg_map(u0)),
                    pl.BlockSpec((None, bk, p), kv_map),
                    pl.BlockSpec((None, bk, p), kv_map),
                    pl.BlockSpec((None, None, 1, bk), kseg_map(u0)),
                ],
                out_specs=[pl.BlockSpec((None, bk, p), kv_map)] * 2,
                scratch_shapes=scratch,
            )
            parts.append(
                pl.pallas_call(
                    functools.partial(_dkv_kernel_table, cfg=cfg, n_entries=e_total),
                    grid_spec=grid_spec,
                    out_shape=kv_shape(u1 - u0),
                    compiler_params=_params("parallel", "arbitrary"),
                    cost_estimate=cost,
                    interpret=interpret,
                    name="sparse_attention_dkv_tpu",
                )(
                    blk_tab[u0:u1].reshape(-1),
                    info_tab[u0:u1].reshape(-1),
                    qu[u0:u1],
                    dou[u0:u1],
                    lse[u0:u1],
                    delta[u0:u1],
                    qs,
                    ku[u0:u1],
                    vu[u0:u1],
                    ks,
                )
            )
        dku = jnp.concatenate([x[0] for x in parts], axis=0)
        dvu = jnp.concatenate([x[1] for x in parts], axis=0)
    return dq, kv_from_units(dku, b, tk), kv_from_units(dvu, b, tk)


# ----------------------------------------------------------------------------- HiP scoring


def _score_kernel(cand_ref, q_ref, k_ref, out_ref, *, cfg: common.Config, groups: int, n_cand: int):
    u, g, i, c = (pl.program_id(a) for a in range(4))
    blk = cand_ref[((u * groups + g) * cfg.nq + i) * n_cand + c]
    shape = (cfg.block_q, cfg.block_k)
    row = lax.broadcasted_iota(jnp.int32, shape, 0)
    qpos = i * cfg.block_q + row + cfg.offset
    kpos = blk * cfg.block_k + lax.broadcasted_iota(jnp.int32, shape, 1)
    ok = (i * cfg.block_q + row < cfg.seq_q) & (kpos < cfg.seq_k)
    if cfg.causal:
        ok = ok & (kpos <= qpos)
    s = jnp.where(ok, common.dot_nt(q_ref[...], k_ref[...]), -jnp.inf)
    best = jnp.max(jnp.max(s, axis=1, keepdims=True), axis=0, keepdims=True)  # [1, 1]

    @pl.when(c == 0)
    def _init():
        out_ref[...] = jnp.full(out_ref.shape, -jnp.inf, jnp.float32)

    lane = lax.broadcasted_iota(jnp.int32, out_ref.shape, 1)
    out_ref[...] = jnp.where(lane == c, best, out_ref[...])


def score_blocks(q, k, cand, cfg: common.Config, *, interpret=False):
    """Exact block-max scores for HiP's search (see pallas_gpu.score_blocks).

    Args:
        q: [B, Tq, H, P]; k: [B, Tk, K, P]; cand: int32 [B, H, nq, C] in-range key blocks.

    Returns:
        fp32 [B, H, nq, C].
    """
    b, _, h, p = q.shape
    kv_heads = k.shape[2]
    g = h // kv_heads
    nq, nk, bq, bk = cfg.nq, cfg.nk, cfg.block_q, cfg.block_k
    n_units = b * kv_heads
    n_cand = cand.shape[-1]
    qu = to_units(q, kv_heads, nq * bq)
    ku = kv_to_units(k, nk * bk)
    tab = cand.reshape(n_units, g * nq * n_cand)
    item = jnp.dtype(q.dtype).itemsize
    outs = []
    for u0, u1 in _unit_chunks(n_units, tab.shape[1], "candidate"):
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(u1 - u0, g, nq, n_cand),
            in_specs=[
                pl.BlockSpec((None, None, bq, p), lambda u, g_, i, c, t: (u, g_, i, 0)),
                pl.BlockSpec((None, bk, p), lambda u, g_, i, c, t: (u, t[((u * g + g_) * nq + i) * n_cand + c], 0)),
            ],
            out_specs=pl.BlockSpec((None, None, None, 1, n_cand), lambda u, g_, i, c, t: (u, g_, i, 0, 0)),
        )
        pairs = (u1 - u0) * g * nq * n_cand
        outs.append(
            pl.pallas_call(
                functools.partial(_score_kernel, cfg=cfg, groups=g, n_cand=n_cand),
                grid_spec=grid_spec,
                out_shape=jax.ShapeDtypeStruct((u1 - u0, g, nq, 1, n_cand), jnp.float32),
                compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
                cost_estimate=pl.CostEstimate(
                    flops=2 * pairs * bq * bk * p, transcendentals=0, bytes_accessed=pairs * (bq + bk) * p * item
                ),
                interpret=interpret,
                name="hip_score_blocks_tpu",
            )(tab[u0:u1].reshape(-1), qu[u0:u1], ku[u0:u1])
        )
    return jnp.concatenate(outs, axis=0).reshape(b, h, nq, n_cand)


def _rep_score_kernel(q_ref, reps_ref, qlim_ref, kpos_ref, out_ref, *, rep_keys: int):
    q = q_ref[...]  # [R, P] sampled query rows
    qlim = qlim_ref[...]  # [R, 1]
    best = jnp.full(out_ref.shape, -jnp.inf, jnp.float32)  # [1, C]
    for j in range(rep_keys):  # key j of every candidate's representative
        s = common.dot_nt(q, reps_ref[j])  # [R, C]
        ok = kpos_ref[pl.ds(j, 1), :] <= qlim
        best = jnp.maximum(best, jnp.max(jnp.where(ok, s, -jnp.inf), axis=0, keepdims=True))
    out_ref[...] = best


def score_representatives(qs, reps, qlim, kpos, *, interpret=False):
    """HiP's representative scores (see pallas_gpu.score_representatives).

    Args:
        qs: [B, H, nq, R, P]; reps: [B, H, nq, b_k, C, P]; qlim: int32 [nq, R];
        kpos: int32 [B, H, nq, b_k, C].

    Returns:
        fp32 [B, H, nq, C].
    """
    b, h, nq, r, p = qs.shape
    rep_keys, c = reps.shape[3], reps.shape[4]
    # Lane-dense candidates and rows (padding rows see nothing, padding candidates exist nowhere).
    rp, cp = common.cdiv(r, 8) * 8, common.cdiv(c, 128) * 128
    qs = jnp.pad(qs, ((0, 0),) * 3 + ((0, rp - r), (0, 0)))
    reps = jnp.pad(reps, ((0, 0),) * 4 + ((0, cp - c), (0, 0)))
    qlim = jnp.pad(qlim, ((0, 0), (0, rp - r)), constant_values=-1)[..., None]  # [nq, Rp, 1]
    kpos = jnp.pad(kpos, ((0, 0),) * 4 + ((0, cp - c),), constant_values=jnp.iinfo(jnp.int32).max)
    item = jnp.dtype(qs.dtype).itemsize
    out = pl.pallas_call(
        functools.partial(_rep_score_kernel, rep_keys=rep_keys),
        grid=(b, h, nq),
        in_specs=[
            pl.BlockSpec((None, None, None, rp, p), lambda bi, hi, i: (bi, hi, i, 0, 0)),
            pl.BlockSpec((None, None, None, rep_keys, cp, p), lambda bi, hi, i: (bi, hi, i, 0, 0, 0)),
            pl.BlockSpec((None, rp, 1), lambda bi, hi, i: (i, 0, 0)),
            pl.BlockSpec((None, None, None, rep_keys, cp), lambda bi, hi, i: (bi, hi, i, 0, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, None, 1, cp), lambda bi, hi, i: (bi, hi, i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((b, h, nq, 1, cp), jnp.float32),
        compiler_params=_params("parallel", "parallel", "parallel"),
        cost_estimate=pl.CostEstimate(
            flops=2 * b * h * nq * r * rep_keys * c * p,
            transcendentals=0,
            bytes_accessed=(b * h * nq * (r + rep_keys * c) * p) * item,
        ),
        interpret=interpret,
        name="hip_score_representatives_tpu",
    )(qs, reps, qlim, kpos)
    return out[:, :, :, 0, :c]
