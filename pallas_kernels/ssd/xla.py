"""Chunked SSD in pure JAX (runs on every backend; the CPU default and the pallas backward).

The state space dual form of Mamba-2 (Dao & Gu 2024, Sec. 6 "Hardware-efficient algorithm", Listing 1):
split the sequence into chunks of Q steps and, per chunk,

  1. intra-chunk (diagonal blocks, eq. (16)-(17)): Y_diag = (L o C B^T) (dt x), with the decay matrix
     L[i,j] = exp(sum_{k=j+1..i} dt_k A) for i >= j, else 0 (the "1-semiseparable mask");
  2. chunk states (right factors): S_c = sum_j exp(a_end - a_j) dt_j x_j B_j^T;
  3. inter-chunk state passing (centre factor): s_{c+1} = exp(a_end,c) s_c + S_c, a short scan over
     the T/Q chunks starting from the initial state;
  4. state -> output (left factors): Y_off[i] = exp(a_i) C_i s_c.

Here a_i is the within-chunk cumulative sum of dt A. All of it runs in float32. The segment sum in
step 1 is the stable form (a cumulative sum of masked copies, no cancellation between two long
cumsums), and masked entries are zeroed with a double `where` after a finite `exp`, so no -inf
enters the graph and gradients stay finite. `seq_idx` boundaries are masked in steps 1, 2 and 4 and
reset the state passed in step 3. Any T works: the sequence is padded to a multiple of Q with dt = 0
(decay 1, no input), which leaves the outputs and the final state unchanged. A sequence no longer
than Q is one chunk of its own length (Q = T): no padding, and the [Q,Q] work of step 1 shrinks
with T (the same sums; only the floating-point order differs from a padded chunk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.ssd import reference

_HIGHEST = jax.lax.Precision.HIGHEST


def pad_time(a, pad, mode="constant"):
    """Pads axis 1 (time) of `a` at the end by `pad` steps."""
    if a is None or pad == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[1] = (0, pad)
    return jnp.pad(a, widths, mode=mode)


def cumsum(a, axis):
    """Inclusive cumulative sum by `lax.associative_scan` (O(n log n) adds). Used for the [Q,Q] segment
    sum, where XLA's CPU cumsum (a reduce_window, O(n^2) per row) was 3-60x slower."""
    return jax.lax.associative_scan(jnp.add, a, axis=axis % a.ndim)


def ssd_xla(
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
):
    """Chunked SSD. Args: see `pallas_kernels.ssd.api.ssd` (shapes already validated).

    Returns:
      (y [B,T,H,P] in x.dtype, final state [B,H,P,N] float32).
    """
    batch, seqlen, num_heads, head_dim = x.shape
    num_groups, d_state = B.shape[-2:]
    rep = num_heads // num_groups
    q = max(1, min(chunk_size, seqlen))  # a short sequence is a single chunk, not padded to chunk_size
    num_chunks = -(-seqlen // q)
    pad = num_chunks * q - seqlen
    f32 = jnp.float32

    # Discretisation step in fp32; pad time to a multiple of Q (dt = 0 on padding).
    dtf = pad_time(reference.process_dt(dt, dt_bias, dt_softplus), pad)  # [B,Tp,H]
    seg = None if seq_idx is None else pad_time(reference.segment_ids(seq_idx), pad, "edge")
    xf = pad_time(x.astype(f32), pad).reshape(batch, num_chunks, q, num_groups, rep, head_dim)
    bf = pad_time(B.astype(f32), pad).reshape(batch, num_chunks, q, num_groups, d_state)
    cf = pad_time(C.astype(f32), pad).reshape(batch, num_chunks, q, num_groups, d_state)
    dtc = dtf.reshape(batch, num_chunks, q, num_groups, rep)  # [B,c,Q,G,R]
    xdt = xf * dtc[..., None]  # [B,c,Q,G,R,P]

    # Log-decays and their within-chunk cumulative sum a_i.
    log_a = dtc * A.astype(f32).reshape(num_groups, rep)  # [B,c,Q,G,R]
    a_cum = jnp.cumsum(log_a, axis=2)  # [B,c,Q,G,R]
    a_end = a_cum[:, :, -1]  # [B,c,G,R]

    # Step 1: stable segment sum S[i,j] = sum_{k=j+1..i} log_a_k and the decay matrix L.
    row = jnp.arange(q)[:, None]
    col = jnp.arange(q)[None, :]
    log_a_t = jnp.moveaxis(log_a, 2, -1)  # [B,c,G,R,Q]
    seg_sum = cumsum(jnp.where(row > col, log_a_t[..., :, None], 0.0), axis=-2)  # [B,c,G,R,Q,Q]
    mask = row >= col  # [Q,Q]
    if seg is not None:
        seg_c = seg.reshape(batch, num_chunks, q)  # [B,c,Q]
        mask = mask & (seg_c[:, :, :, None] == seg_c[:, :, None, :])  # [B,c,Q,Q]
        mask = mask[:, :, None, None]  # [B,c,1,1,Q,Q]
    decay_mat = jnp.where(mask, jnp.exp(jnp.where(mask, seg_sum, 0.0)), 0.0)  # [B,c,G,R,Q,Q]
    cb = jnp.einsum("bcign,bcjgn->bcgij", cf, bf, precision=_HIGHEST)  # [B,c,G,Q,Q]
    y_diag = jnp.einsum(
        "bcgrij,bcjgrp->bcigrp", cb[:, :, :, None] * decay_mat, xdt, precision=_HIGHEST
    )  # [B,c,Q,G,R,P]

    # Step 2: chunk states from the tokens of the chunk's last segment, decayed to the chunk end. States
    # are kept as [.., N, R*P] (the R heads of a group side by side): one [N, Q] x [Q, R*P] matmul per
    # chunk and group here and one [Q, N] x [N, R*P] in step 4, with no transpose between the steps.
    w_state = jnp.exp(a_end[:, :, None] - a_cum)  # [B,c,Q,G,R], <= 1
    if seg is not None:
        w_state = w_state * (seg_c == seg_c[:, :, -1:])[..., None, None]
    xdt_w = (xdt * w_state[..., None]).reshape(batch, num_chunks, q, num_groups, rep * head_dim)
    states = jnp.einsum("bcjgn,bcjgm->bcgnm", bf, xdt_w, precision=_HIGHEST)  # [B,c,G,N,R*P]
    states = states.reshape(batch, num_chunks, num_groups, d_state, rep, head_dim)  # [B,c,G,N,R,P]

    # Step 3: pass states across chunks; a chunk that starts a new sequence drops the carried state.
    chunk_decay = jnp.exp(a_end)  # [B,c,G,R]
    if seg is not None:
        seg_end = seg_c[:, :, -1]  # [B,c]
        seg_prev = jnp.concatenate([jnp.zeros_like(seg_end[:, :1]), seg_end[:, :-1]], axis=1)  # [B,c]
        chunk_decay = chunk_decay * (seg_end == seg_prev)[..., None, None]
    if initial_states is None:
        s0 = jnp.zeros((batch, num_groups, d_state, rep, head_dim), f32)
    else:
        s0 = initial_states.astype(f32).reshape(batch, num_groups, rep, head_dim, d_state).transpose(0, 1, 4, 2, 3)

    def pass_state(s, inp):  # s [B,G,N,R,P]
        decay_c, state_c = inp
        return s * decay_c[:, :, None, :, None] + state_c, s

    s_final, s_in = jax.lax.scan(pass_state, s0, (jnp.moveaxis(chunk_decay, 1, 0), jnp.moveaxis(states, 1, 0)))
    s_in = jnp.moveaxis(s_in, 0, 1).reshape(
        batch, num_chunks, num_groups, d_state, rep * head_dim
    )  # entering each chunk

    # Step 4: state -> output for tokens still in the segment that the carried state belongs to.
    w_out = jnp.exp(a_cum)  # [B,c,Q,G,R], <= 1
    if seg is not None:
        w_out = w_out * (seg_c == seg_prev[:, :, None])[..., None, None]
    y_off = jnp.einsum("bcign,bcgnm->bcigm", cf, s_in, precision=_HIGHEST)  # [B,c,Q,G,R*P]
    y_off = y_off.reshape(batch, num_chunks, q, num_groups, rep, head_dim) * w_out[..., None]

    y = (y_diag + y_off).reshape(batch, num_chunks * q, num_heads, head_dim)[:, :seqlen]
    y = reference.skip_and_gate(y, x, D, z)
    s_final = s_final.transpose(0, 1, 3, 4, 2)  # [B,G,R,P,N]
    return y.astype(x.dtype), s_final.reshape(batch, num_heads, head_dim, d_state)
