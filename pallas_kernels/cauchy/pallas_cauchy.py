"""Pallas kernels for the Cauchy and log-Vandermonde sums (complex numbers as float32 re/im pairs).

One kernel source for TPU (Mosaic) and GPU (Triton): the grid runs over (batch tile, output tile),
both parallel, and the reduction axis is a `fori_loop` over tiles of the summed axis inside the
kernel, so no two programs write the same output block (no cross-program accumulation, which the
GPU backend would race on). Every tile is a [tb, tj, ti] broadcast of the summed-axis operands
[tb, tj, 1] against the output-axis operands [tb, 1, ti], reduced over the sublane axis tj.

On CPU run with `interpret=True` (generic interpreter) or `interpret=pltpu.InterpretParams()`
(TPU semantics: catches out-of-bounds block reads). The TPU and GPU lowerings are untested on
hardware in this repository (no accelerator was available when they were written).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the [batch, summed axis, output axis] tile.

    Attributes:
      batch: rows of the flattened batch per program (TPU: a multiple of 8).
      reduce: elements of the summed axis per inner-loop step (sublanes on TPU).
      out: elements of the output axis per program (TPU: a multiple of 128; GPU: a power of 2).
    """

    batch: int = 8
    reduce: int = 32
    out: int = 128

    @classmethod
    def for_backend(cls, backend: str | None = None) -> BlockSizes:
        """Defaults per backend: TPU (8, 32, 128) fills 32 vregs per temporary; GPU (1, 32, 128)."""
        backend = backend or jax.default_backend()
        if backend == "gpu":
            return cls(batch=1, reduce=32, out=128)
        return cls()

    def validate(self) -> None:
        for name in ("batch", "reduce", "out"):
            val = getattr(self, name)
            if val < 1 or (val & (val - 1)) != 0:
                raise ValueError(f"BlockSizes.{name}={val} must be a positive power of two; pick e.g. 8, 32, 128.")


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = (-x.shape[axis]) % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _compiler_params(backend: str):
    """Mosaic (TPU) or Triton (GPU) parameters; Triton ones also pick the Triton lowering on GPU,
    which the tiles here are written for (without them jax may choose its Mosaic GPU backend)."""
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"))
    if backend == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    return None


TileFn = Callable[..., tuple[jax.Array, jax.Array]]


def _pairwise_sum(
    tile_fn: TileFn,
    j_arrays: Sequence[jax.Array],  # each [B,J] float32 (summed axis)
    i_arrays: Sequence[jax.Array],  # each [B,I] float32 (output axis)
    n_j: int,
    n_i: int,
    block_sizes: BlockSizes,
    interpret,
    name: str,
    backend: str | None = None,
) -> tuple[jax.Array, jax.Array]:  # ([B,I], [B,I]) float32 real and imaginary parts
    """out[b,i] = sum_j tile_fn(j-operands[b,j], i-operands[b,i], j, i) as a tiled Pallas kernel."""
    block_sizes.validate()
    tb, tj, ti = block_sizes.batch, block_sizes.reduce, block_sizes.out
    batch = (j_arrays or i_arrays)[0].shape[0]
    # pad every axis to its tile; padded summed-axis entries are masked in the kernel
    # the summed axis is padded to a power of two (Triton block shapes must be powers of two); the
    # inner loop only visits the ceil(n_j / tj) tiles that hold data
    j_pad = max(tj, 1 << max(n_j - 1, 0).bit_length())
    j_p = [_pad_to(_pad_to(a.astype(jnp.float32), 0, tb), 1, j_pad) for a in j_arrays]
    i_p = [_pad_to(_pad_to(a.astype(jnp.float32), 0, tb), 1, ti) for a in i_arrays]
    b_pad = -(-batch // tb) * tb
    i_pad = -(-n_i // ti) * ti
    n_inner = -(-n_j // tj)
    n_jarr = len(j_p)

    def kernel(*refs):
        j_refs, i_refs = refs[:n_jarr], refs[n_jarr:-2]
        o_re, o_im = refs[-2], refs[-1]
        i_vals = [r[...][:, None, :] for r in i_refs]  # each [tb,1,ti]
        i_idx = pl.program_id(1) * ti + lax.broadcasted_iota(jnp.int32, (1, 1, ti), 2)  # [1,1,ti]

        def body(k, acc):
            start = pl.multiple_of(k * tj, tj)
            j_vals = [r[:, pl.ds(start, tj)][:, :, None] for r in j_refs]  # each [tb,tj,1]
            j_idx = start + lax.broadcasted_iota(jnp.int32, (1, tj, 1), 1)  # [1,tj,1]
            re, im = tile_fn(j_vals, i_vals, j_idx, i_idx)  # [tb,tj,ti]
            # mask padded summed-axis entries (they may hold 0/0)
            valid = j_idx < n_j
            re = jnp.where(valid, re, 0.0)
            im = jnp.where(valid, im, 0.0)
            return acc[0] + jnp.sum(re, axis=1), acc[1] + jnp.sum(im, axis=1)

        zeros = jnp.zeros((tb, ti), jnp.float32)
        acc_re, acc_im = lax.fori_loop(0, n_inner, body, (zeros, zeros))
        o_re[...] = acc_re
        o_im[...] = acc_im

    j_spec = pl.BlockSpec((tb, j_pad), lambda b, i: (b, 0))
    i_spec = pl.BlockSpec((tb, ti), lambda b, i: (b, i))
    out_shape = jax.ShapeDtypeStruct((b_pad, i_pad), jnp.float32)
    out_re, out_im = pl.pallas_call(
        kernel,
        out_shape=(out_shape, out_shape),
        grid=(b_pad // tb, i_pad // ti),
        in_specs=[j_spec] * n_jarr + [i_spec] * len(i_p),
        out_specs=(i_spec, i_spec),
        interpret=interpret,
        compiler_params=None if interpret else _compiler_params(backend or jax.default_backend()),
        name=name,
    )(*j_p, *i_p)
    return out_re[:batch, :n_i], out_im[:batch, :n_i]


def _recip(dr, di, power):
    """(dr + i di)^(-power) as a (re, im) pair, power in {1, 2}."""
    inv_m = 1.0 / (dr * dr + di * di)
    rr, ri = dr * inv_m, -di * inv_m
    if power == 2:
        rr, ri = rr * rr - ri * ri, 2.0 * rr * ri
    return rr, ri


def _cauchy_tile(power: int, conj: bool) -> TileFn:
    def tile(j_vals, i_vals, j_idx, i_idx):
        ar, ai, yr, yi = j_vals  # [tb,tj,1]
        xr, xi = i_vals  # [tb,1,ti]
        dr = xr - yr  # [tb,tj,ti]
        # a / (x - y)^p
        rr, ri = _recip(dr, xi - yi, power)
        re = ar * rr - ai * ri
        im = ar * ri + ai * rr
        if conj:
            # conj(a) / (x - conj(y))^p
            cr, ci = _recip(dr, xi + yi, power)
            re = re + ar * cr + ai * ci
            im = im + ar * ci - ai * cr
        return re, im

    return tile


def cauchy_sum(
    a: jax.Array,  # [B,J] complex64 weights
    x: jax.Array,  # [B,I] complex64 evaluation points
    y: jax.Array,  # [B,J] complex64 poles
    *,
    power: int = 1,
    conj: bool = True,
    block_sizes: BlockSizes | None = None,
    interpret=False,
    backend: str | None = None,
) -> jax.Array:  # [B,I] complex64
    """out[b,i] = sum_j a[b,j]/(x[b,i]-y[b,j])^p (+ conj(a)/(x-conj(y))^p) as a Pallas kernel."""
    bs = block_sizes or BlockSizes.for_backend(backend)
    re, im = _pairwise_sum(
        _cauchy_tile(power, conj),
        [a.real, a.imag, y.real, y.imag],
        [x.real, x.imag],
        n_j=a.shape[-1],
        n_i=x.shape[-1],
        block_sizes=bs,
        interpret=interpret,
        backend=backend,
        name=f"cauchy_p{power}{'_conj' if conj else ''}",
    )
    return lax.complex(re, im)


def _vandermonde_tile(j_vals, i_vals, j_idx, i_idx):
    vr, vi, xr, xi = j_vals  # [tb,tj,1], summed over n
    ell = i_idx.astype(jnp.float32)  # [1,1,ti], output position l
    # exp(x l) = exp(Re(x) l) (cos(Im(x) l) + i sin(Im(x) l))
    mag = jnp.exp(xr * ell)
    er, ei = mag * jnp.cos(xi * ell), mag * jnp.sin(xi * ell)
    return vr * er - vi * ei, vr * ei + vi * er


def _vandermonde_transpose_tile(power: int) -> TileFn:
    def tile(j_vals, i_vals, j_idx, i_idx):
        gr, gi = j_vals  # [tb,tj,1], summed over l
        xr, xi = i_vals  # [tb,1,ti], output index n
        ell = j_idx.astype(jnp.float32)  # [1,tj,1]
        mag = jnp.exp(xr * ell)
        if power:
            mag = mag * ell
        er, ei = mag * jnp.cos(xi * ell), mag * jnp.sin(xi * ell)
        return gr * er - gi * ei, gr * ei + gi * er

    return tile


def vandermonde_sum(
    v: jax.Array,  # [B,N] complex64
    x: jax.Array,  # [B,N] complex64
    length: int,
    *,
    block_sizes: BlockSizes | None = None,
    interpret=False,
    backend: str | None = None,
) -> jax.Array:  # [B,L] complex64
    """out[b,l] = sum_n v[b,n] exp(x[b,n] l) as a Pallas kernel."""
    bs = block_sizes or BlockSizes.for_backend(backend)
    re, im = _pairwise_sum(
        _vandermonde_tile,
        [v.real, v.imag, x.real, x.imag],
        [],
        n_j=v.shape[-1],
        n_i=length,
        block_sizes=bs,
        interpret=interpret,
        backend=backend,
        name="vandermonde",
    )
    return lax.complex(re, im)


def vandermonde_transpose(
    g: jax.Array,  # [B,L] complex64
    x: jax.Array,  # [B,N] complex64
    *,
    power: int = 0,
    block_sizes: BlockSizes | None = None,
    interpret=False,
    backend: str | None = None,
) -> jax.Array:  # [B,N] complex64
    """out[b,n] = sum_l g[b,l] l^p exp(x[b,n] l) as a Pallas kernel (the backward of the sum)."""
    bs = block_sizes or BlockSizes.for_backend(backend)
    re, im = _pairwise_sum(
        _vandermonde_transpose_tile(power),
        [g.real, g.imag],
        [x.real, x.imag],
        n_j=g.shape[-1],
        n_i=x.shape[-1],
        block_sizes=bs,
        interpret=interpret,
        backend=backend,
        name=f"vandermonde_transpose_p{power}",
    )
    return lax.complex(re, im)


__all__ = ["BlockSizes", "cauchy_sum", "vandermonde_sum", "vandermonde_transpose"]
