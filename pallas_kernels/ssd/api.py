"""Public SSD op (Mamba-2): `ssd` (a whole sequence) and `ssd_step` (one decode step).

`ssd` mirrors `mamba_chunk_scan_combined` of state-spaces/mamba so that ported code reads the same.
Three implementations compute the same function:

- "reference": the sequential recurrence (`lax.scan` over time, float32), the oracle;
- "xla": the chunked SSD algorithm in pure JAX (float32), every backend; the default on CPU;
- "pallas": Pallas kernels for the chunk pipeline (chunk states; intra-chunk + state -> output),
  one source for the GPU (Triton) and TPU (Mosaic) lowerings; the default on GPU/TPU.
  `interpret=True` (or a `pltpu.InterpretParams()`) runs the kernels on CPU.

Backward of "pallas" (`jax.custom_vjp` below): the cotangents are computed by `jax.vjp` of the
chunked XLA path, recomputed from the saved inputs. Why: the forward kernels save nothing the
backward could reuse except the chunk states, the recomputation costs one chunked forward (small
next to the backward's own matmuls), and the XLA backward is exact, already tested against the
oracle, and lowers everywhere. Backward kernels (the five of the Triton implementation) would
remove the [B,T/Q,H,Q,Q] intermediates that XLA materialises; they are not written yet.
The "reference" and "xla" paths are differentiated by JAX directly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from pallas_kernels.ssd import reference
from pallas_kernels.ssd import xla

IMPLEMENTATIONS = ("reference", "xla", "pallas")


def _shape(a):
    return None if a is None else tuple(a.shape)


def _check(name, arr, expected, fix):
    if arr is not None and tuple(arr.shape) != tuple(expected):
        raise ValueError(f"ssd: {name} has shape {tuple(arr.shape)}, expected {tuple(expected)}; {fix}.")


def _validate_common(x_shape, dt, A, B, C, D, z, dt_bias, time_dims):
    """Checks shapes shared by `ssd` and `ssd_step`; returns (H, P, G, N)."""
    num_heads, head_dim = x_shape[-2:]
    lead = x_shape[:-2]  # (B, T) or (B,)
    if B.ndim != len(lead) + 2:
        raise ValueError(
            f"ssd: B has shape {_shape(B)}, expected {lead + ('ngroups', 'dstate')}; "
            f"pass B as [{time_dims}, ngroups, dstate]."
        )
    num_groups, d_state = B.shape[-2:]
    _check("dt", dt, lead + (num_heads,), f"pass dt as [{time_dims}, nheads]")
    _check("A", A, (num_heads,), "pass one (negative) A per head")
    _check("B", B, lead + (num_groups, d_state), f"pass B as [{time_dims}, ngroups, dstate]")
    _check("C", C, lead + (num_groups, d_state), "C must have the same shape as B")
    if num_groups < 1 or num_heads % num_groups:
        raise ValueError(
            f"ssd: nheads={num_heads} is not a multiple of ngroups={num_groups} "
            f"(B/C axis -2); use ngroups dividing nheads."
        )
    if D is not None and tuple(D.shape) not in ((num_heads,), (num_heads, head_dim)):
        raise ValueError(
            f"ssd: D has shape {_shape(D)}, expected ({num_heads},) or "
            f"({num_heads}, {head_dim}); pass one skip weight per head or per (head, p)."
        )
    _check("z", z, x_shape, "z (the gate) must have the same shape as x")
    _check("dt_bias", dt_bias, (num_heads,), "pass one dt_bias per head")
    return num_heads, head_dim, num_groups, d_state


def _default_implementation():
    return "xla" if jax.default_backend() == "cpu" else "pallas"


def ssd(
    x: Float[Array, "b t h p"],
    dt: Float[Array, "b t h"],
    A: Float[Array, "h"],
    B: Float[Array, "b t g n"],
    C: Float[Array, "b t g n"],
    *,
    chunk_size: int = 256,
    D: Float[Array, "h"] | Float[Array, "h p"] | None = None,
    z: Float[Array, "b t h p"] | None = None,
    dt_bias: Float[Array, "h"] | None = None,
    dt_softplus: bool = False,
    initial_states: Float[Array, "b h p n"] | None = None,
    seq_idx: Int[Array, "b t"] | None = None,
    return_final_states: bool = False,
    implementation: str | None = None,
    interpret=False,
):
    """The SSD scan of Mamba-2 over a whole sequence.

    Per head (Mamba-2 paper eq. (1)-(2), scalar-identity A): h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,
    y_t = h_t C_t + D x_t, out_t = y_t * silu(z_t); dt_t = softplus(dt_t + dt_bias) if dt_softplus.

    Args:
      x: [B,T,H,P] inputs.
      dt: [B,T,H] step sizes (raw if dt_softplus, else already positive).
      A: [H] per-head decay rates (negative).
      B: [B,T,G,N] input projections; head h uses group h // (H // G).
      C: [B,T,G,N] output projections.
      chunk_size: chunk length Q of the chunked algorithm (any T works; the sequence is padded).
        The pallas path needs a multiple of 8 (a power of two on GPU).
      D: [H] or [H,P] skip weights.
      z: [B,T,H,P] gate; the output is multiplied by silu(z).
      dt_bias: [H] added to dt before the softplus.
      dt_softplus: apply softplus to dt + dt_bias.
      initial_states: [B,H,P,N] state before the first step (of the first sequence in a row).
      seq_idx: [B,T] integer sequence index of each token for packed sequences; the state resets
        wherever it changes along T.
      return_final_states: also return the state after the last step.
      implementation: None (pallas on GPU/TPU, xla on CPU), "reference", "xla" or "pallas".
      interpret: run the Pallas kernels in interpret mode (True, or a `pltpu.InterpretParams()`).

    Returns:
      y [B,T,H,P] in x.dtype, and with return_final_states also the final states [B,H,P,N] float32.

    Raises:
      ValueError: on inconsistent shapes, a bad chunk_size or an unknown implementation.
    """
    if x.ndim != 4:
        raise ValueError(
            f"ssd: x has shape {_shape(x)}, expected 4 dims [batch, seqlen, nheads, headdim]; add the missing axes."
        )
    batch, seqlen, num_heads, head_dim = x.shape
    _, _, _, d_state = _validate_common(x.shape, dt, A, B, C, D, z, dt_bias, "batch, seqlen")
    _check(
        "initial_states",
        initial_states,
        (batch, num_heads, head_dim, d_state),
        "pass initial_states as [batch, nheads, headdim, dstate]",
    )
    _check("seq_idx", seq_idx, (batch, seqlen), "pass seq_idx as [batch, seqlen]")
    if seq_idx is not None and not jnp.issubdtype(seq_idx.dtype, jnp.integer):
        raise ValueError(
            f"ssd: seq_idx has dtype {seq_idx.dtype}, expected an integer dtype; pass int32 sequence indices."
        )
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size={chunk_size!r} must be a positive int (e.g. 64 or 256).")
    if implementation is None:
        implementation = _default_implementation()
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"ssd: implementation={implementation!r} is unknown; use one of {IMPLEMENTATIONS} or None.")

    kwargs = dict(D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx)
    if implementation == "reference":
        y, final = reference.ssd_reference(x, dt, A, B, C, dt_softplus=dt_softplus, **kwargs)
    elif implementation == "xla":
        y, final = xla.ssd_xla(x, dt, A, B, C, chunk_size=chunk_size, dt_softplus=dt_softplus, **kwargs)
    else:
        from pallas_kernels.ssd import pallas_ssd  # pylint: disable=g-import-not-at-top

        pallas_ssd.check_config(chunk_size, interpret)
        y, final = _ssd_pallas_vjp(
            chunk_size, dt_softplus, interpret, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx
        )
    return (y, final) if return_final_states else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _ssd_pallas_vjp(chunk_size, dt_softplus, interpret, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx):
    from pallas_kernels.ssd import pallas_ssd  # pylint: disable=g-import-not-at-top

    return pallas_ssd.ssd_pallas(
        x,
        dt,
        A,
        B,
        C,
        chunk_size=chunk_size,
        D=D,
        z=z,
        dt_bias=dt_bias,
        dt_softplus=dt_softplus,
        initial_states=initial_states,
        seq_idx=seq_idx,
        interpret=interpret,
    )


def _ssd_pallas_fwd(chunk_size, dt_softplus, interpret, *args):
    out = _ssd_pallas_vjp(chunk_size, dt_softplus, interpret, *args)
    return out, args


def _ssd_pallas_bwd(chunk_size, dt_softplus, interpret, args, cotangents):
    del interpret
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx = args

    def xla_forward(x, dt, A, B, C, D, z, dt_bias, initial_states):
        return xla.ssd_xla(
            x,
            dt,
            A,
            B,
            C,
            chunk_size=chunk_size,
            D=D,
            z=z,
            dt_bias=dt_bias,
            dt_softplus=dt_softplus,
            initial_states=initial_states,
            seq_idx=seq_idx,
        )

    # Recompute the chunked XLA forward and pull the cotangents back through it.
    _, vjp = jax.vjp(xla_forward, x, dt, A, B, C, D, z, dt_bias, initial_states)
    return (*vjp(cotangents), None)


_ssd_pallas_vjp.defvjp(_ssd_pallas_fwd, _ssd_pallas_bwd)


def ssd_step(
    state: Float[Array, "b h p n"],
    x_t: Float[Array, "b h p"],
    dt_t: Float[Array, "b h"],
    A: Float[Array, "h"],
    B_t: Float[Array, "b g n"],
    C_t: Float[Array, "b g n"],
    *,
    D: Float[Array, "h"] | Float[Array, "h p"] | None = None,
    z: Float[Array, "b h p"] | None = None,
    dt_bias: Float[Array, "h"] | None = None,
    dt_softplus: bool = False,
):
    """One recurrence step for decoding (same arguments as `ssd` without the time axis).

    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T; y_t = (h_t C_t + D x_t) * silu(z_t).

    Args:
      state: [B,H,P,N] previous state (keep it in float32).
      x_t: [B,H,P]; dt_t: [B,H]; A: [H]; B_t, C_t: [B,G,N]; D: [H] or [H,P]; z: [B,H,P];
      dt_bias: [H]; dt_softplus: as in `ssd`.

    Returns:
      (y_t [B,H,P] in x_t.dtype, new_state [B,H,P,N] in state.dtype).

    Raises:
      ValueError: on inconsistent shapes.
    """
    if x_t.ndim != 3:
        raise ValueError(
            f"ssd_step: x_t has shape {_shape(x_t)}, expected 3 dims [batch, nheads, "
            f"headdim]; drop the seqlen axis (use ssd for sequences)."
        )
    batch, num_heads, head_dim = x_t.shape
    _, _, _, d_state = _validate_common(x_t.shape, dt_t, A, B_t, C_t, D, z, dt_bias, "batch")
    if tuple(state.shape) != (batch, num_heads, head_dim, d_state):
        raise ValueError(
            f"ssd_step: state has shape {_shape(state)}, expected "
            f"{(batch, num_heads, head_dim, d_state)}; pass [batch, nheads, headdim, "
            f"dstate]."
        )
    return reference.ssd_step_reference(
        state, x_t, dt_t, A, B_t, C_t, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus
    )
