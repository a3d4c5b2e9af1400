"""Public entry point: `sparse_attention` (block-sparse + sliding window + sinks attention).

Implementations: "reference" (dense masked oracle), "xla" (gathered blocked online softmax),
"pallas" (flash-style kernel that visits only the listed key blocks). None picks "pallas" on
TPU/GPU and "xla" on CPU. The gradient of "xla" and "pallas" is one custom VJP whose backward is
the blocked xla backward (xla.backward) run on the forward's saved log-sum-exp; see the README
section for why the backward is not a Pallas kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.sparse_attention import common, pallas_attention, reference, xla

_IMPLEMENTATIONS = (None, "reference", "xla", "pallas")


def _forward(impl, interpret, cfg, q, k, v, q_seg, k_seg, fetch, code, n_valid):
    if impl == "xla":
        return xla.forward(q, k, v, q_seg, k_seg, fetch, code, cfg)
    return pallas_attention.forward(q, k, v, q_seg, k_seg, fetch, code, n_valid, cfg,
                                    interpret=interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attend(impl, interpret, cfg, q, k, v, q_seg, k_seg, fetch, code, n_valid):
    return _forward(impl, interpret, cfg, q, k, v, q_seg, k_seg, fetch, code, n_valid)[0]


def _attend_fwd(impl, interpret, cfg, q, k, v, q_seg, k_seg, fetch, code, n_valid):
    o, lse = _forward(impl, interpret, cfg, q, k, v, q_seg, k_seg, fetch, code, n_valid)
    return o, (q, k, v, q_seg, k_seg, fetch, code, o, lse)


def _attend_bwd(impl, interpret, cfg, res, do):
    del impl, interpret
    q, k, v, q_seg, k_seg, fetch, code, o, lse = res
    dq, dk, dv = xla.backward(q, k, v, q_seg, k_seg, fetch, code, o, lse, do, cfg)
    return dq, dk, dv, None, None, None, None, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def default_implementation() -> str:
    return "pallas" if jax.default_backend() in ("tpu", "gpu") else "xla"


def sparse_attention(
    q: Float[Array, "B Tq H D"],
    k: Float[Array, "B Tk Hk D"],
    v: Float[Array, "B Tk Hk D"],
    *,
    block_indices: Int[Array, "B H nq K"] | None = None,
    causal: bool = True,
    window: int | None = None,
    sinks: int = 0,
    block_q: int = 64,
    block_k: int = 64,
    sm_scale: float | None = None,
    segment_ids=None,
    implementation: str | None = None,
    interpret=False,
) -> Float[Array, "B Tq H D"]:
    """Attention restricted to listed key blocks, a causal sliding window and sink keys.

    Query i (absolute position p_i = i + Tk - Tq) attends to the union of the keys in the blocks
    listed for its query block, the keys p_i - window < j <= p_i and the keys j < sinks, intersected
    with j <= p_i when `causal` and with equal segment ids. With neither `block_indices` nor
    `window` this is dense (causal) attention. A query that sees no key returns zeros.
    softmax(q k^T * sm_scale) v over the visible keys (Vaswani et al. 2017, eq. 1).

    Args:
        q: [B, Tq, H, D] queries.
        k, v: [B, Tk, Hk, D] keys / values; Hk must divide H (grouped-query attention).
        block_indices: int [B, H, ceil(Tq/block_q), K] key block ids (block j = keys
            [j*block_k, (j+1)*block_k)) per query block; -1 (or any id outside
            [0, ceil(Tk/block_k))) marks an unused slot. Duplicates are allowed and counted
            once.
        causal: intersect with j <= p_i.
        window: keep the last `window` keys up to and including the query itself (None: no window).
        sinks: always attend to the first `sinks` keys.
        block_q, block_k: query / key block sizes (Pallas on TPU wants multiples of 8, GPU powers of
            two >= 16).
        sm_scale: score scale, default 1/sqrt(D).
        segment_ids: [B, T] (self-attention) or a (q_ids [B, Tq], kv_ids [B, Tk]) pair: attend only
            where the ids are equal (document masking).
        implementation: None, "reference", "xla" or "pallas".
        interpret: run the Pallas kernel in interpret mode (True, or a pltpu.InterpretParams()).

    Returns:
        [B, Tq, H, D] in q.dtype.
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} must be one of {_IMPLEMENTATIONS}.")
    cfg, q_seg, k_seg = common.validate(q, k, v, block_indices, segment_ids, causal=causal,
                                        window=window, sinks=sinks, block_q=block_q,
                                        block_k=block_k, sm_scale=sm_scale)
    impl = implementation or default_implementation()
    if impl == "pallas" and jax.default_backend() == "cpu" and not interpret:
        raise ValueError("implementation='pallas' on CPU needs interpret=True "
                         "(or use implementation='xla').")
    if impl == "reference":
        return reference.sparse_attention_reference(q, k, v, block_indices, q_seg, k_seg, cfg)
    b, h = q.shape[0], q.shape[2]
    tq_pad, tk_pad = cfg.nq * cfg.block_q, cfg.nk * cfg.block_k
    fetch, code, n_valid = common.slot_table(block_indices, cfg, b, h)
    o = _attend(impl, interpret, cfg, common.to_head_major(q, tq_pad),
                common.to_head_major(k, tk_pad),
                common.to_head_major(v, tk_pad), common.pad_seg(q_seg, tq_pad),
                common.pad_seg(k_seg, tk_pad), fetch, code, n_valid)
    return jnp.swapaxes(o[:, :, :cfg.seq_q], 1, 2)
