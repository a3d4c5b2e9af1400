"""Reference SSD (Mamba-2 state space duality) op: the sequential recurrence, the oracle.

Shapes (notation of the zoo): B batch, T time, H heads, P head dim, G groups (B/C shared by the
H/G consecutive heads of a group), N state dim.

Per head h and time t (Mamba-2 paper, Dao & Gu 2024, eq. (1)-(2) with the scalar-identity A of
Sec. 3 "SSD": A_t = a_t I, discretised as in the released code):

    dt_t  = softplus(dt_raw_t + dt_bias)            (the softplus only when dt_softplus=True)
    h_t   = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T    # h_t [P,N]
    y_t   = h_t C_t + D x_t                          # y_t [P]
    out_t = y_t * silu(z_t)                          (only when z is given)

With `seq_idx`, the state is reset (h_{t-1} := 0) wherever seq_idx[t] != seq_idx[t-1]; the
initial state seeds the first segment of each batch row.

Everything here is computed in float32 (float64 for float64 inputs, for gradient checks); outputs
are cast back to x's dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


def compute_dtype(dtype):
    """float64 for float64 inputs, else float32 (the accumulation dtype of every implementation)."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def process_dt(dt, dt_bias=None, dt_softplus=False, dtype=jnp.float32):
    """Returns the discretisation step in `dtype`: softplus(dt + dt_bias) or dt + dt_bias."""
    dt = dt.astype(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(dtype)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    return dt


def segment_ids(seq_idx):
    """Maps seq_idx [B,T] to nondecreasing segment ids starting at 0 (+1 wherever the index changes).

    The state resets exactly where the id increments, so this is equivalent to `seq_idx` under the
    "reset where the index changes" rule, and lets the chunked paths compare ids by equality.
    """
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).astype(jnp.int32)  # [B,T-1]
    first = jnp.zeros_like(seq_idx[:, :1], dtype=jnp.int32)  # [B,1]
    ids = jax.lax.associative_scan(jnp.add, change, axis=1)  # inclusive cumsum, O(T log T)
    return jnp.concatenate([first, ids], axis=1)  # [B,T]


def skip_and_gate(y, x, D=None, z=None):
    """Adds the skip term D x and applies the output gate silu(z), in y's dtype.

    Args:
      y: [..., H, P] float32 SSM output.
      x: [..., H, P] input.
      D: [H] or [H, P] skip weights, or None.
      z: [..., H, P] gate input, or None.
    """
    if D is not None:
        d = D.astype(y.dtype)
        y = y + x.astype(y.dtype) * (d[:, None] if d.ndim == 1 else d)
    if z is not None:
        zf = z.astype(y.dtype)
        y = y * zf * jax.nn.sigmoid(zf)
    return y


def ssd_step_reference(state, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One step of the recurrence (decode).

    Args:
      state: [B,H,P,N] state h_{t-1}.
      x: [B,H,P]; dt: [B,H]; A: [H]; B, C: [B,G,N]; D: [H] or [H,P]; z: [B,H,P]; dt_bias: [H].

    Returns:
      (y [B,H,P] in x.dtype, new state [B,H,P,N] in state.dtype).
    """
    num_heads, num_groups = x.shape[-2], B.shape[-2]
    rep = num_heads // num_groups
    f = compute_dtype(x.dtype)
    dtf = process_dt(dt, dt_bias, dt_softplus, f)  # [B,H]
    b_h = jnp.repeat(B.astype(f), rep, axis=-2)  # [B,H,N]
    c_h = jnp.repeat(C.astype(f), rep, axis=-2)  # [B,H,N]
    xf = x.astype(f)  # [B,H,P]
    # h_t = exp(dt A) h_{t-1} + dt x B^T
    decay = jnp.exp(dtf * A.astype(f))  # [B,H]
    new = (
        state.astype(f) * decay[..., None, None] + (dtf[..., None] * xf)[..., :, None] * b_h[..., None, :]
    )  # [B,H,P,N]
    # y_t = h_t C_t (+ D x_t, gate)
    y = jnp.einsum("bhpn,bhn->bhp", new, c_h, precision=_HIGHEST)  # [B,H,P]
    y = skip_and_gate(y, x, D, z)
    return y.astype(x.dtype), new.astype(state.dtype)


def ssd_reference(
    x, dt, A, B, C, *, D=None, z=None, dt_bias=None, dt_softplus=False, initial_states=None, seq_idx=None
):
    """The sequential recurrence over time with `lax.scan`, in float32.

    Args: see `pallas_kernels.ssd.api.ssd` (shapes already validated).

    Returns:
      (y [B,T,H,P] in x.dtype, final state [B,H,P,N] float32 (float64 for float64 x)).
    """
    batch, _, num_heads, head_dim = x.shape
    d_state = B.shape[-1]
    f = compute_dtype(x.dtype)
    if initial_states is None:
        h0 = jnp.zeros((batch, num_heads, head_dim, d_state), f)
    else:
        h0 = initial_states.astype(f)
    if seq_idx is None:
        keep = jnp.ones(dt.shape[:2], f)  # [B,T]
    else:
        seg = segment_ids(seq_idx)  # [B,T]
        prev = jnp.concatenate([seg[:, :1], seg[:, :-1]], axis=1)
        keep = (seg == prev).astype(f)  # 0 where a new sequence starts

    def step(h, inp):
        x_t, dt_t, b_t, c_t, keep_t, z_t = inp
        # Reset the state at a sequence boundary, then take one recurrence step.
        h = h * keep_t[:, None, None, None]
        y_t, h = ssd_step_reference(h, x_t, dt_t, A, b_t, c_t, D=D, z=z_t, dt_bias=dt_bias, dt_softplus=dt_softplus)
        return h, y_t

    swap = lambda a: None if a is None else jnp.swapaxes(a, 0, 1)
    h_final, y = jax.lax.scan(step, h0, (swap(x), swap(dt), swap(B), swap(C), swap(keep), swap(z)))
    return jnp.swapaxes(y, 0, 1), h_final
