"""Public SSD op (Mamba-2): `ssd` (a whole sequence) and `ssd_step` (one decode step).

`ssd` mirrors `mamba_chunk_scan_combined` of state-spaces/mamba so that ported code reads the same.
Three implementations compute the same function (`implementation`, spelled as in
`pallas_kernels.dispatch`: "auto" = pallas on TPU/GPU, xla on CPU):

- "reference": the sequential recurrence (`lax.scan` over time, float32), the oracle;
- "xla": the chunked SSD algorithm in pure JAX (float32), every backend;
- "pallas": Pallas kernels, one family per backend: `pallas_gpu.py` (Triton, native [B,T,H,P]
  layout, 3 forward + 4 backward kernels) and `pallas_tpu.py` (Mosaic, one fused forward and one
  fused backward kernel with the chunk axis sequential). `interpret=None` interprets on CPU, where
  the TPU family runs (as for `sparse_attention`; `pltpu.InterpretParams()` adds TPU semantics
  checks). `ssd_pallas(..., backend="gpu"|"tpu")` picks a family explicitly (tests of the Triton
  family on CPU, `jax.export` for another platform).

The "pallas" path is differentiated by the custom VJP below, itself Pallas kernels: it saves the
inputs (and, with a gate z, the pre-gate output), recomputes C B^T and the chunk-entry states with
the forward kernels, runs the backward kernels of the family, and finishes with a short XLA epilogue
on [B,H,T]-sized arrays (`common.dt_backward`: reverse cumsum of d a over each chunk, then the
softplus and dt_bias chain rule). The "reference" and "xla" paths are differentiated by JAX.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from pallas_kernels import dispatch, sharding
from pallas_kernels.dispatch import IMPLEMENTATIONS, Implementation
from pallas_kernels.ssd import common, reference, xla

__all__ = ["IMPLEMENTATIONS", "Implementation", "kernel_backend", "ssd", "ssd_pallas", "ssd_step"]


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


def _validate_sequence(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size):
    """Checks the shapes and options of a whole-sequence call (raises ValueError naming the argument)."""
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
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"ssd: chunk_size={chunk_size!r} must be a positive int (e.g. 64 or 256).")


def ssd(
    x: Float[Array, "b t h p"],
    dt: Float[Array, "b t h"],
    A: Float[Array, " h"],
    B: Float[Array, "b t g n"],
    C: Float[Array, "b t g n"],
    *,
    chunk_size: int = 256,
    D: Float[Array, " h"] | Float[Array, "h p"] | None = None,
    z: Float[Array, "b t h p"] | None = None,
    dt_bias: Float[Array, " h"] | None = None,
    dt_softplus: bool = False,
    initial_states: Float[Array, "b h p n"] | None = None,
    seq_idx: Int[Array, "b t"] | None = None,
    return_final_states: bool = False,
    implementation: Implementation = "auto",
    interpret: Any = None,
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
      chunk_size: chunk length Q of the chunked algorithm (any T works). The pallas path needs a
        power of two >= 16 for the Triton family (GPU) and a multiple of 8 for the TPU family (TPU,
        and the CPU interpreter).
      D: [H] or [H,P] skip weights.
      z: [B,T,H,P] gate; the output is multiplied by silu(z).
      dt_bias: [H] added to dt before the softplus.
      dt_softplus: apply softplus to dt + dt_bias.
      initial_states: [B,H,P,N] state before the first step (of the first sequence in a row).
      seq_idx: [B,T] integer sequence index of each token for packed sequences; the state resets
        wherever it changes along T.
      return_final_states: also return the state after the last step.
      implementation: "auto" (pallas on GPU/TPU, xla on CPU), "reference", "xla" or "pallas".
      interpret: for "pallas": None (interpret exactly on CPU), True/False, or a
        `pltpu.InterpretParams()` (the TPU kernels under TPU semantics).

    Returns:
      y [B,T,H,P] in x.dtype, and with return_final_states also the final states [B,H,P,N] float32.

    Raises:
      ValueError: on inconsistent shapes, a bad chunk_size or an unknown implementation.
    """
    _validate_sequence(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size)
    impl = dispatch.resolve(implementation)
    kwargs = dict(D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx)
    if impl == "reference":
        y, final = reference.ssd_reference(x, dt, A, B, C, dt_softplus=dt_softplus, **kwargs)
    elif impl == "xla":
        y, final = xla.ssd_xla(x, dt, A, B, C, chunk_size=chunk_size, dt_softplus=dt_softplus, **kwargs)
    else:
        y, final = ssd_pallas(
            x,
            dt,
            A,
            B,
            C,
            chunk_size=chunk_size,
            dt_softplus=dt_softplus,
            interpret=dispatch.resolve_interpret(impl, interpret),
            **kwargs,
        )
    return (y, final) if return_final_states else y


def kernel_backend(interpret: Any = None) -> str:
    """The kernel family `ssd(implementation="pallas")` runs: "tpu" or "gpu" (Triton).

    GPUs get the Triton family; TPUs, a `pltpu.InterpretParams()` and the CPU interpreter get the TPU
    family (as `sparse_attention` does).
    """
    if jax.default_backend() == "gpu" and not isinstance(interpret, pltpu.InterpretParams):
        return "gpu"
    return "tpu"


def _family(backend):
    if backend == "tpu":
        from pallas_kernels.ssd import pallas_tpu  # pylint: disable=g-import-not-at-top

        return pallas_tpu
    from pallas_kernels.ssd import pallas_gpu  # pylint: disable=g-import-not-at-top

    return pallas_gpu


def check_pallas_config(chunk_size: int, backend: str, interpret: Any, explicit_backend: bool = False) -> None:
    """Raises ValueError if the `backend` kernel family cannot run `chunk_size` with `interpret`.

    An explicitly named backend with interpret=False on CPU is accepted: that is lowering for another
    platform (`jax.export`), which needs no device.
    """
    if backend not in ("gpu", "tpu"):
        raise ValueError(f"ssd: backend={backend!r} must be 'gpu' (Triton) or 'tpu' (Mosaic).")
    if not dispatch.accelerator() and interpret is False and not explicit_backend:
        raise ValueError(
            "ssd: implementation='pallas' on CPU needs interpret=True (or None, or a "
            "pltpu.InterpretParams()); or use implementation='xla'."
        )
    if backend == "tpu" and chunk_size % 8:
        raise ValueError(
            f"ssd: chunk_size={chunk_size} must be a multiple of 8 for the TPU kernels (sublane tiling); "
            "use 64, 128 or 256."
        )
    if backend == "gpu" and (chunk_size < 16 or chunk_size & (chunk_size - 1)):
        raise ValueError(
            f"ssd: chunk_size={chunk_size} must be a power of two >= 16 for the Triton kernels; use 64, 128 or 256."
        )


@dataclasses.dataclass(frozen=True)
class _PallasConfig:
    """Static options of one pallas call (hashable: the nondiff argument of the custom VJP)."""

    chunk_size: int
    dt_softplus: bool
    backend: str
    interpret: Any
    block_sizes: Any


def ssd_pallas(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size: int = 256,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = False,
    initial_states=None,
    seq_idx=None,
    backend: str | None = None,
    interpret: Any = None,
    block_sizes=None,
):
    """The "pallas" implementation of `ssd` with an explicit kernel family; differentiable.

    Args: as `ssd` (returns (y, final states) always), plus
      backend: "gpu" (Triton kernels) or "tpu" (Mosaic kernels); None: `kernel_backend(interpret)`.
        Naming one lowers for that platform from any machine (`jax.export(..., platforms=...)`).
      interpret: None (interpret exactly on CPU), True/False or a `pltpu.InterpretParams()`.
      block_sizes: a `pallas_gpu.GpuBlockSizes` for the Triton family (None: chosen from the dtype
        and the device's shared memory); the TPU family works on whole chunks and ignores it.

    Returns:
      (y [B,T,H,P] in x.dtype, final states [B,H,P,N] float32).
    """
    _validate_sequence(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, chunk_size)
    interpret = dispatch.resolve_interpret("pallas", interpret)
    explicit_backend = backend is not None
    backend = backend or kernel_backend(interpret)
    check_pallas_config(chunk_size, backend, interpret, explicit_backend)
    cfg = _PallasConfig(chunk_size, bool(dt_softplus), backend, interpret, block_sizes)
    # Under a mesh the kernels (and the custom VJP, so the backward kernels too) run per device.
    seq = ("batch", None)
    dims = (
        seq + ("heads", None),  # x [B,T,H,P]
        seq + ("heads",),  # dt [B,T,H]
        ("heads",),  # A [H]
        seq + ("groups", None),  # B [B,T,G,N]
        seq + ("groups", None),  # C [B,T,G,N]
        None if D is None else ("heads",) + (None,) * (D.ndim - 1),  # D [H] or [H,P]
        seq + ("heads", None),  # z [B,T,H,P]
        ("heads",),  # dt_bias [H]
        ("batch", "heads", None, None),  # initial_states [B,H,P,N]
        seq,  # seq_idx [B,T]
    )
    out_dims = (seq + ("heads", None), ("batch", "heads", None, None))  # y [B,T,H,P], final [B,H,P,N]
    return sharding.shard_map_kernel(
        functools.partial(_pallas_vjp, cfg),
        (x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx),
        dims,
        out_dims,
    )


def _pallas_forward(cfg: _PallasConfig, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, save_ypre):
    dt_h, a_h = common.chunk_dt(dt, A, dt_bias, cfg.dt_softplus, cfg.chunk_size)  # [B,H,Tc] each
    seg = common.chunk_segments(seq_idx, x.shape[1], cfg.chunk_size)
    return _family(cfg.backend).forward(
        x,
        dt_h,
        a_h,
        B,
        C,
        chunk_size=cfg.chunk_size,
        D=D,
        z=z,
        seg=seg,
        initial_states=initial_states,
        save_ypre=save_ypre,
        interpret=cfg.interpret,
        block_sizes=cfg.block_sizes,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _pallas_vjp(cfg, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx):
    y, final, _ = _pallas_forward(cfg, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, save_ypre=False)
    return y, final


def _pallas_vjp_fwd(cfg, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx):
    # With a gate, keep the pre-gate output y + D x for dz (one [B,T,H,P] residual in x.dtype).
    y, final, ypre = _pallas_forward(
        cfg, x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, save_ypre=z is not None
    )
    return (y, final), ((x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx), ypre)


def _pallas_vjp_bwd(cfg, residuals, cotangents):
    (x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx), ypre = residuals
    dout, dfinal = cotangents
    dt_h, a_h = common.chunk_dt(dt, A, dt_bias, cfg.dt_softplus, cfg.chunk_size)
    seg = common.chunk_segments(seq_idx, x.shape[1], cfg.chunk_size)
    grads = _family(cfg.backend).backward(
        x,
        dt_h,
        a_h,
        B,
        C,
        dout.astype(x.dtype),
        dfinal,
        chunk_size=cfg.chunk_size,
        D=D,
        z=z,
        ypre=ypre,
        seg=seg,
        initial_states=initial_states,
        interpret=cfg.interpret,
        block_sizes=cfg.block_sizes,
    )
    ddt, dA, d_bias = common.dt_backward(
        grads["ddt_direct"], grads["da"], dt_h, dt, A, dt_bias, cfg.dt_softplus, cfg.chunk_size
    )
    d_init = None if initial_states is None else grads["dinit"].astype(initial_states.dtype)
    return (
        grads["dx"],
        ddt,
        dA,
        grads["dB"],
        grads["dC"],
        common.d_skip(grads["dD_part"], D),
        grads["dz"],
        d_bias,
        d_init,
        None,
    )


_pallas_vjp.defvjp(_pallas_vjp_fwd, _pallas_vjp_bwd)


def ssd_step(
    state: Float[Array, "b h p n"],
    x_t: Float[Array, "b h p"],
    dt_t: Float[Array, "b h"],
    A: Float[Array, " h"],
    B_t: Float[Array, "b g n"],
    C_t: Float[Array, "b g n"],
    *,
    D: Float[Array, " h"] | Float[Array, "h p"] | None = None,
    z: Float[Array, "b h p"] | None = None,
    dt_bias: Float[Array, " h"] | None = None,
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
