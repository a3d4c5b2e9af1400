"""Pallas flash-style sparse attention kernels that visit only the slots of the slot table.

Two lowerings of the same algorithm (online softmax over the visited key blocks, Dao et al. 2022,
Alg. 1, with the visibility rule of common.py applied inside each block):

* TPU (Mosaic): grid (B, H, nq, S); the slot axis is the sequential ("arbitrary") reduction
  axis. The slot tables are scalar-prefetched into SMEM (`pltpu.PrefetchScalarGridSpec`) and the
  key/value BlockSpec index maps read them, so the pipeline DMAs exactly the listed key blocks.
  Invalid slots repeat the previous block id (no new copy) and are skipped with `pl.when`.
  Running statistics live in VMEM scratch.
* GPU (Triton): grid (B, H, nq); the slot tables come in as int32 inputs and a `fori_loop` over
  the valid slots loads each key/value block with a dynamic slice. The head dim is zero-padded to
  a power of two (Triton needs power-of-two tiles).

Both run on CPU with `interpret=True`; the TPU one also under `pltpu.InterpretParams()`. The
kernel tiles are the pattern's blocks (block_q x block_k of `sparse_attention`), so there is no
separate BlockSizes: a listed block is exactly one grid step / loop iteration.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.sparse_attention import common


def _online_softmax_step(q, k, v, qpos, kpos, listed, qseg, kseg, m, l, acc, cfg):
    """One key block: masked scores, running max/normaliser/accumulator update."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32) * cfg.sm_scale  # [bq,bk]
    vis = common.visible(qpos, kpos, listed, cfg) & (qseg == kseg)
    s = jnp.where(vis, s, common.NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))  # [bq,1]
    p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m - m_new)
    l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return m_new, l, alpha * acc + pv


def _finalize(m, l, acc):
    """Normalised output and log-sum-exp; rows that saw nothing give 0 and LSE_EMPTY."""
    seen = l > 0
    l_safe = jnp.where(seen, l, 1.0)
    o = jnp.where(seen, acc / l_safe, 0.0)
    lse = jnp.where(seen, m + jnp.log(l_safe), common.LSE_EMPTY)
    return o, lse


# ----------------------------------------------------------------------------------------- TPU


def _tpu_kernel(fetch_ref, code_ref, q_ref, k_ref, v_ref, qseg_ref, kseg_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, cfg, heads, nq):
    b, h, i, s = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    n_slots = pl.num_programs(3)
    idx = ((b * heads + h) * nq + i) * n_slots + s
    bq, bk = cfg.block_q, cfg.block_k

    @pl.when(s == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, common.NEG_INF, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    code = code_ref[idx]

    @pl.when(code >= 0)
    def _visit():
        blk = fetch_ref[idx]
        qpos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0) + cfg.offset
        kpos = blk * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        listed = (jnp.zeros((bq, bk), jnp.int32) + code) == 1
        m, l, acc = _online_softmax_step(q_ref[...], k_ref[...], v_ref[...], qpos, kpos, listed,
                                         qseg_ref[...], kseg_ref[...], m_sc[...], l_sc[...],
                                         acc_sc[...], cfg)
        m_sc[...], l_sc[...], acc_sc[...] = m, l, acc

    @pl.when(s == n_slots - 1)
    def _done():
        o, lse = _finalize(m_sc[...], l_sc[...], acc_sc[...])
        o_ref[...] = o.astype(o_ref.dtype)
        lse_ref[...] = lse


def forward_tpu(q, k, v, q_seg, k_seg, fetch, code, cfg: common.Config, interpret=False):
    """TPU kernel on padded head-major inputs; returns (o [B,H,Tq_pad,D], lse [B,H,Tq_pad])."""
    b, h, tq, d = q.shape
    hk = k.shape[1]
    g = h // hk
    nq, n_slots = tq // cfg.block_q, fetch.shape[-1]
    bq, bk = cfg.block_q, cfg.block_k

    def flat(bi, hi, qi, si):
        return ((bi * h + hi) * nq + qi) * n_slots + si

    def kv_map(bi, hi, qi, si, fetch_ref, code_ref):
        return bi, hi // g, fetch_ref[flat(bi, hi, qi, si)], 0

    def kseg_map(bi, hi, qi, si, fetch_ref, code_ref):
        return bi, 0, fetch_ref[flat(bi, hi, qi, si)]

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, h, nq, n_slots),
        in_specs=[
            pl.BlockSpec((None, None, bq, d), lambda bi, hi, qi, si, *_: (bi, hi, qi, 0)),
            pl.BlockSpec((None, None, bk, d), kv_map),
            pl.BlockSpec((None, None, bk, d), kv_map),
            pl.BlockSpec((None, bq, 1), lambda bi, hi, qi, si, *_: (bi, qi, 0)),
            pl.BlockSpec((None, 1, bk), kseg_map),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, d), lambda bi, hi, qi, si, *_: (bi, hi, qi, 0)),
            pl.BlockSpec((None, None, bq, 1), lambda bi, hi, qi, si, *_: (bi, hi, qi, 0)),
        ],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
    )
    kernel = functools.partial(_tpu_kernel, cfg=cfg, heads=h, nq=nq)
    o, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct((b, h, tq, d), q.dtype),
                   jax.ShapeDtypeStruct((b, h, tq, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="sparse_attention_fwd_tpu",
    )(fetch.reshape(-1), code.reshape(-1), q, k, v, q_seg[:, :, None], k_seg[:, None, :])
    return o, lse[..., 0]


# ----------------------------------------------------------------------------------------- GPU


def _gpu_kernel(q_ref, k_ref, v_ref, fetch_ref, code_ref, nvalid_ref, qseg_ref, kseg_ref, o_ref,
                lse_ref, *, cfg):
    i = pl.program_id(2)
    bq, bk = cfg.block_q, cfg.block_k
    q = q_ref[...]  # [bq, Dp]
    qpos = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0) + cfg.offset
    qseg = qseg_ref[...][:, None]  # [bq, 1]
    dp = q.shape[-1]

    def body(s, carry):
        m, l, acc = carry
        blk = fetch_ref[s]
        start = pl.multiple_of(blk * bk, bk)
        k = k_ref[pl.ds(start, bk), :]
        v = v_ref[pl.ds(start, bk), :]
        kseg = kseg_ref[pl.ds(start, bk)][None, :]
        kpos = blk * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
        listed = (jnp.zeros((bq, bk), jnp.int32) + code_ref[s]) == 1
        return _online_softmax_step(q, k, v, qpos, kpos, listed, qseg, kseg, m, l, acc, cfg)

    init = (jnp.full((bq, 1), common.NEG_INF, jnp.float32), jnp.zeros((bq, 1), jnp.float32),
            jnp.zeros((bq, dp), jnp.float32))
    # Valid slots are packed first, so the loop stops at n_valid and never touches the rest.
    m, l, acc = jax.lax.fori_loop(0, nvalid_ref[0], body, init)
    o, lse = _finalize(m, l, acc)
    o_ref[...] = o.astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def forward_gpu(q, k, v, q_seg, k_seg, fetch, code, n_valid, cfg: common.Config,
                interpret=False, num_warps: int = 4, num_stages: int = 2):
    """GPU (Triton) kernel on padded head-major inputs; returns (o, lse) like forward_tpu."""
    b, h, tq, d = q.shape
    hk, tk = k.shape[1], k.shape[2]
    g = h // hk
    nq, bq = tq // cfg.block_q, cfg.block_q
    dp = max(16, pl.next_power_of_2(d))
    n_slots = pl.next_power_of_2(fetch.shape[-1])
    pad_d = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, dp - d),))
    pad_s = lambda x: jnp.pad(x, ((0, 0),) * 3 + ((0, n_slots - x.shape[-1]),), mode="edge")
    kernel = functools.partial(_gpu_kernel, cfg=cfg)
    o, lse = pl.pallas_call(
        kernel,
        grid=(b, h, nq),
        in_specs=[
            pl.BlockSpec((None, None, bq, dp), lambda bi, hi, qi: (bi, hi, qi, 0)),
            pl.BlockSpec((None, None, tk, dp), lambda bi, hi, qi: (bi, hi // g, 0, 0)),
            pl.BlockSpec((None, None, tk, dp), lambda bi, hi, qi: (bi, hi // g, 0, 0)),
            pl.BlockSpec((None, None, None, n_slots), lambda bi, hi, qi: (bi, hi, qi, 0)),
            pl.BlockSpec((None, None, None, n_slots), lambda bi, hi, qi: (bi, hi, qi, 0)),
            pl.BlockSpec((None, None, None, 1), lambda bi, hi, qi: (bi, hi, qi, 0)),
            pl.BlockSpec((None, bq), lambda bi, hi, qi: (bi, qi)),
            pl.BlockSpec((None, tk), lambda bi, hi, qi: (bi, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, bq, dp), lambda bi, hi, qi: (bi, hi, qi, 0)),
            pl.BlockSpec((None, None, bq), lambda bi, hi, qi: (bi, hi, qi)),
        ],
        out_shape=[jax.ShapeDtypeStruct((b, h, tq, dp), q.dtype),
                   jax.ShapeDtypeStruct((b, h, tq), jnp.float32)],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="sparse_attention_fwd_gpu",
    )(pad_d(q), pad_d(k), pad_d(v), pad_s(fetch), pad_s(code), n_valid[..., None], q_seg, k_seg)
    return o[..., :d], lse


def forward(q, k, v, q_seg, k_seg, fetch, code, n_valid, cfg: common.Config, interpret=False,
            platform: str | None = None):
    """Dispatches to the GPU kernel on GPU and to the TPU kernel elsewhere (TPU, CPU interpret)."""
    platform = platform or ("gpu" if jax.default_backend() == "gpu" else "tpu")
    if platform == "gpu":
        return forward_gpu(q, k, v, q_seg, k_seg, fetch, code, n_valid, cfg, interpret=interpret)
    return forward_tpu(q, k, v, q_seg, k_seg, fetch, code, cfg, interpret=interpret)
