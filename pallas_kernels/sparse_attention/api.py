"""Public entry point: `sparse_attention` (listed key blocks + sliding window + sinks attention).

Implementations (pallas_kernels.dispatch): "reference" (dense masked fp32 oracle), "xla" (gathered
blocked online softmax, its backward the blocked XLA backward), "pallas" (the kernels of
pallas_gpu.py on GPU and pallas_tpu.py on TPU, forward and backward), "auto" (pallas on TPU/GPU,
xla on CPU). The gradient of "xla" and "pallas" is one custom VJP owned by this module: the
forward saves the fp32 log-sum-exp and the backward recomputes the probabilities block by block
(flash attention, Dao et al. 2022, Alg. 2), with the implementation's own backward kernels.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from pallas_kernels import dispatch, sharding
from pallas_kernels.dispatch import Implementation
from pallas_kernels.sparse_attention import (
    common,
    pallas_gpu,
    pallas_tpu,
    reference,
    xla,
)

Backend = Literal["gpu", "tpu"]
LISTED_BLOCK = 64  # block_q / block_k of a listed pattern when not given (= hip_block_indices')


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call (a hashable custom_vjp argument)."""

    impl: str  # "xla" or "pallas"
    backend: str | None  # kernel lowering for "pallas": "gpu" or "tpu"
    interpret: object  # False, True or a pltpu.InterpretParams
    cfg: common.Config  # forward pattern and tiles
    bwd_cfg: common.Config  # the same pattern with the backward tiles
    tiles: common.Tiles | None


def _forward(plan: _Plan, q, k, v, q_seg, k_seg, table):
    if plan.impl == "xla":
        return xla.forward(q, k, v, q_seg, k_seg, table, plan.cfg)
    if plan.backend == "gpu":
        return pallas_gpu.forward(
            q,
            k,
            v,
            q_seg,
            k_seg,
            table,
            plan.cfg,
            num_warps=plan.tiles.num_warps,
            num_stages=plan.tiles.num_stages,
            interpret=plan.interpret,
        )
    return pallas_tpu.forward(q, k, v, q_seg, k_seg, table, plan.cfg, interpret=plan.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan, q, k, v, q_seg, k_seg, table):
    return _forward(plan, q, k, v, q_seg, k_seg, table)[0]


def _attend_fwd(plan, q, k, v, q_seg, k_seg, table):
    o, lse = _forward(plan, q, k, v, q_seg, k_seg, table)
    return o, (q, k, v, q_seg, k_seg, table, o, lse)


def _attend_bwd(plan, res, do):
    q, k, v, q_seg, k_seg, table, o, lse = res
    if plan.impl == "xla":
        dq, dk, dv = xla.backward(q, k, v, q_seg, k_seg, table, o, lse, do, plan.cfg)
    elif plan.backend == "gpu":
        dq, dk, dv = pallas_gpu.backward(
            q,
            k,
            v,
            q_seg,
            k_seg,
            table,
            o,
            lse,
            do,
            plan.bwd_cfg,
            num_warps=plan.tiles.bwd_num_warps,
            num_stages=plan.tiles.bwd_num_stages,
            interpret=plan.interpret,
        )
    else:
        dq, dk, dv = pallas_tpu.backward(
            q, k, v, q_seg, k_seg, table, o, lse, do, plan.bwd_cfg, fwd_cfg=plan.cfg, interpret=plan.interpret
        )
    return dq, dk, dv, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def kernel_backend(interpret=None, backend: str | None = None) -> str:
    """The Pallas lowering a call gets: `backend` if given, "tpu" under the TPU interpreter,
    "gpu" on a GPU, else "tpu" (the TPU kernels, interpreted, on CPU)."""
    if backend is not None:
        if backend not in ("gpu", "tpu"):
            raise ValueError(f"backend={backend!r} must be None, 'gpu' or 'tpu'.")
        return backend
    if isinstance(interpret, pltpu.InterpretParams):
        return "tpu"
    return "gpu" if jax.default_backend() == "gpu" else "tpu"


def _clamp_tile(tile: int, length: int) -> int:
    """A default tile no larger than the sequence needs (a power of two >= 16)."""
    return min(tile, max(16, common.next_pow2(length)))


def _check_tiles(backend: str, interpret, block_q: int, block_k: int):
    """Tile constraints of the kernel lowerings (interpret mode takes any size)."""
    if backend == "gpu":
        for name, val in (("block_q", block_q), ("block_k", block_k)):
            if val < 16 or val & (val - 1):
                raise ValueError(
                    f"{name}={val} must be a power of two >= 16 for the GPU (Triton) "
                    "kernels; change the pattern's block size."
                )
    elif interpret is False:
        for name, val in (("block_q", block_q), ("block_k", block_k)):
            if val % 8:
                raise ValueError(
                    f"{name}={val} must be a multiple of 8 for the TPU (Mosaic) "
                    "kernels; change the pattern's block size."
                )


def sparse_attention(
    q: Float[Array, "B Tq H P"],
    k: Float[Array, "B Tk K P"],
    v: Float[Array, "B Tk K P"],
    *,
    block_indices: Int[Array, "B H nq k_blocks"] | None = None,
    causal: bool = True,
    window: int | None = None,
    sinks: int = 0,
    block_q: int | None = None,
    block_k: int | None = None,
    sm_scale: float | None = None,
    segment_ids=None,
    implementation: Implementation = "auto",
    interpret=None,
    backend: Backend | None = None,
) -> Float[Array, "B Tq H P"]:
    """Attention restricted to listed key blocks, a causal sliding window and sink keys.

    Query i (absolute position p_i = i + Tk - Tq) attends to the union of the keys in the blocks
    listed for its query block, the keys p_i - window < j <= p_i and the keys j < sinks, intersected
    with j <= p_i when `causal` and with equal segment ids. With neither `block_indices` nor
    `window` this is dense (causal) attention. A query that sees no key returns zeros.
    softmax(q k^T * sm_scale) v over the visible keys (Vaswani et al. 2017, eq. 1).

    Args:
        q: [B, Tq, H, P] queries.
        k, v: [B, Tk, K, P] keys / values; K must divide H (grouped-query attention).
        block_indices: int [B, H, ceil(Tq/block_q), k_blocks] key block ids (block j = keys
            [j*block_k, (j+1)*block_k)) per query block; -1 (or any id outside
            [0, ceil(Tk/block_k))) marks an unused slot. Duplicates are allowed and counted once.
        causal: intersect with j <= p_i.
        window: keep the last `window` keys up to and including the query itself (None: no window).
        sinks: always attend to the first `sinks` keys.
        block_q, block_k: the pattern's query / key block sizes, which are also the kernel tiles.
            None: 64 with `block_indices` (the defaults of `hip_block_indices`); without listed
            blocks (dense, window, sinks) the tile table's entry for the backend, head dim and
            dtype (`common.default_tiles`). The GPU kernels need powers of two >= 16, the TPU
            kernels multiples of 8. Dense patterns run their backward on the tile table's
            backward tiles whatever the forward's.
        sm_scale: score scale, default 1/sqrt(P).
        segment_ids: [B, T] (self-attention) or a (q_ids [B, Tq], kv_ids [B, Tk]) pair: attend only
            where the ids are equal (document masking).
        implementation: "auto", "reference", "xla" or "pallas" (pallas_kernels.dispatch).
        interpret: for "pallas": None interprets exactly on CPU; True / a
            pltpu.InterpretParams() forces the interpreter; False compiles.
        backend: the Pallas lowering, "gpu" (Triton) or "tpu" (Mosaic); None: the default
            backend's (the TPU kernels when interpreting on CPU). Naming one with interpret=False
            off that platform lowers for it (jax.export).

    Returns:
        [B, Tq, H, P] in q.dtype.
    """
    impl = dispatch.resolve(implementation)
    interpret = dispatch.resolve_interpret(impl, interpret)
    if block_indices is not None:
        # Listed ids refer to the pattern's blocks: hip_block_indices' defaults unless given.
        block_q = LISTED_BLOCK if block_q is None else block_q
        block_k = LISTED_BLOCK if block_k is None else block_k
    cfg, q_seg, k_seg = common.validate(
        q,
        k,
        v,
        block_indices,
        segment_ids,
        causal=causal,
        window=window,
        sinks=sinks,
        block_q=1 if block_q is None else block_q,
        block_k=1 if block_k is None else block_k,
        sm_scale=sm_scale,
    )
    b, tq, h, p = q.shape
    tk = k.shape[1]
    kb = kernel_backend(interpret, backend) if impl == "pallas" else None
    if impl == "pallas" and interpret is False and backend is None and not dispatch.accelerator():
        raise ValueError("implementation='pallas' on CPU needs interpret=True (or None), or implementation='xla'.")
    tiles = common.default_tiles(kb, p, q.dtype) if kb is not None else None
    if block_q is None or block_k is None:
        # Only patterns without listed blocks get here: the blocks are pure tiles.
        default_q = _clamp_tile(tiles.block_q, tq) if tiles else 64
        default_k = _clamp_tile(tiles.block_k, tk) if tiles else 64
        cfg = cfg.with_blocks(default_q if block_q is None else block_q, default_k if block_k is None else block_k)
    if impl == "reference":
        return reference.sparse_attention_reference(q, k, v, block_indices, q_seg, k_seg, cfg)
    bwd_cfg = cfg
    if impl == "pallas":
        _check_tiles(kb, interpret, cfg.block_q, cfg.block_k)
        if cfg.dense:
            # Dense blocks are pure tiles: the backward takes its own from the tile table.
            bwd_cfg = cfg.with_blocks(_clamp_tile(tiles.bwd_block_q, tq), _clamp_tile(tiles.bwd_block_k, tk))
    plan = _Plan(impl=impl, backend=kb, interpret=interpret, cfg=cfg, bwd_cfg=bwd_cfg, tiles=tiles)
    if impl == "xla":
        return _attend_local(plan, q, k, v, q_seg, k_seg, block_indices)
    # Under a mesh the kernels (forward and backward, the slot table too) run on per-device blocks.
    seq = ("batch", None)
    return sharding.shard_map_kernel(
        functools.partial(_attend_local, plan),
        (q, k, v, q_seg, k_seg, block_indices),
        (
            seq + ("heads", None),
            seq + ("groups", None),
            seq + ("groups", None),
            seq,
            seq,
            ("batch", "heads", None, None),
        ),
        seq + ("heads", None),
    )


def _attend_local(plan: _Plan, q, k, v, q_seg, k_seg, block_indices):
    """The op on one device's blocks: the slot table of its (batch, head) rows, then the kernels."""
    dense_kernel = plan.impl == "pallas" and plan.cfg.dense
    table = None if dense_kernel else common.slot_table(block_indices, plan.cfg, q.shape[0], q.shape[2])
    return _attend(plan, q, k, v, q_seg, k_seg, table)
