"""Runs a kernel op inside `shard_map` over the ambient mesh: one helper for every op.

A Pallas kernel is a custom call that XLA cannot partition: under GSPMD (`jax.jit` over sharded
operands) XLA would all-gather its operands and run the whole kernel on every device. Every op's
public entry point therefore calls its kernels through `shard_map_kernel`, which reads the mesh the
caller traces under (`jax.set_mesh(mesh)`, as the trainer does; `jax.sharding.get_abstract_mesh()`
inside jit) and runs the op on per-device (local) shapes:

    y = shard_map_kernel(body, (x, A, B), (("batch", None, "heads", None), ("heads",),
                         ("batch", None, "groups", None)), ("batch", None, "heads", None))

Each operand names the role of each of its dimensions:
- "batch":  split over `batch_axes` (default ("data", "fsdp"));
- "heads":  split over `head_axes` (default ("tensor",));
- "groups": heads shared by several heads (Mamba-2's B/C groups, grouped-query key/value heads;
  head h uses group h // (H / G)). With t devices on the head axes: G % t == 0 splits the groups
  like the heads; t % G == 0 first repeats each group t / G times (so every device holds the groups
  of its heads; the repeat's transpose sums the copies' gradients); otherwise the heads are not
  split at all;
- "rows":   split over `row_axes` (default: every mesh axis); a "rows" output is all-gathered inside
  the manual region (for parameter-sized results such as S4's Cauchy kernel);
- None:     replicated.

Rules. Axes missing from the mesh, of size 1, or already manual (an enclosing shard_map) are
skipped. A dimension is split over the longest run of its axes, taken in order, whose product
divides it; the axes that would not divide it stay replicated for that dimension (B = 2 on
data = fsdp = 2 splits over data only). With no mesh, or when no dimension is split, `body` is
called unchanged. The shard_map makes the split axes manual (the others stay automatic and the
body runs replicated over them), so XLA partitions nothing of the kernels: operands arrive, after
whatever resharding the boundary needs, as their local blocks. The op's custom VJP lives inside
`body`, so the backward kernels run per device too; shard_map's transpose sums the cotangent of
an operand over the split axes its dims do not name (dA, dD, dt_bias over the batch axes; the
Cauchy nodes z over the rows), and the transpose of a group repeat sums the copies.

Kernels never import `zoo`: the axis names are defaults that match `zoo.train.sharding.MESH_AXES`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

BATCH_AXES: tuple[str, ...] = ("data", "fsdp")
HEAD_AXES: tuple[str, ...] = ("tensor",)
ROLES = ("batch", "heads", "groups", "rows")

Dims = tuple[str | None, ...]  # the role of every dimension of one array


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one call is split: the mesh axes of each role."""

    batch: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    rows: tuple[str, ...] = ()

    @property
    def split(self) -> tuple[str, ...]:
        """The axes some dimension is split over (the shard_map's manual axes)."""
        return self.batch + self.heads + self.rows

    def axes(self, role: str | None) -> tuple[str, ...]:
        if role is None:
            return ()
        if role in ("heads", "groups"):
            return self.heads
        return getattr(self, role)

    def spec(self, dims: Dims, *, gathered: bool = False) -> P:
        """The PartitionSpec of an array with `dims` (a gathered output has its "rows" whole)."""
        entries = []
        for role in dims:
            axes = () if gathered and role == "rows" else self.axes(role)
            entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return P(*entries)


def _check_dims(dims: Dims, shape: tuple[int, ...], where: str) -> None:
    if len(dims) != len(shape) or any(r is not None and r not in ROLES for r in dims):
        raise ValueError(
            f"shard_map_kernel: {where} has dims {dims} for shape {shape}; give one role per dimension, "
            f"each one of {ROLES} or None."
        )


def _divide(size: int, axes: Sequence[str], sizes: dict[str, int], ok=lambda n: True) -> tuple[str, ...]:
    """The longest prefix-ordered selection of `axes` whose product divides `size` (and passes `ok`)."""
    taken, n = [], 1
    for a in axes:
        m = n * sizes[a]
        if size % m == 0 and ok(m):
            taken.append(a)
            n = m
    return tuple(taken)


def _role_size(shapes, dims, role: str) -> int | None:
    sizes = {s[i] for s, d in zip(shapes, dims) for i, r in enumerate(d) if r == role}
    if len(sizes) > 1:
        raise ValueError(f"shard_map_kernel: the '{role}' dimensions have different sizes {sorted(sizes)}.")
    return sizes.pop() if sizes else None


def plan(
    mesh,
    shapes: Sequence[tuple[int, ...]],
    dims: Sequence[Dims],
    *,
    batch_axes: Sequence[str] = BATCH_AXES,
    head_axes: Sequence[str] = HEAD_AXES,
    row_axes: Sequence[str] | None = None,
) -> Plan | None:
    """How arrays of `shapes` with roles `dims` are split on `mesh`; None when nothing is split.

    Args:
        mesh: a Mesh or AbstractMesh (or None / an empty mesh: nothing to split).
        shapes, dims: the operands' shapes and the role of each of their dimensions.
        batch_axes, head_axes, row_axes: mesh axes of the roles, in the order they are tried
            (row_axes None: every axis of the mesh).
    """
    if mesh is None or mesh.empty:
        return None
    sizes = dict(mesh.shape)
    types = dict(zip(mesh.axis_names, mesh.axis_types))
    free = [a for a in mesh.axis_names if types[a] != AxisType.Manual and sizes[a] > 1]
    if not free:
        return None
    for shape, d in zip(shapes, dims):
        _check_dims(d, shape, "an operand")
    used: list[str] = []

    def candidates(axes):
        return [a for a in axes if a in free and a not in used]

    batch = _role_size(shapes, dims, "batch")
    batch_mesh = _divide(batch, candidates(batch_axes), sizes) if batch else ()
    used += batch_mesh
    heads = _role_size(shapes, dims, "heads")
    groups = {s[i] for s, d in zip(shapes, dims) for i, r in enumerate(d) if r == "groups"}
    fits = lambda n: all(g % n == 0 or n % g == 0 for g in groups)  # noqa: E731
    head_mesh = _divide(heads, candidates(head_axes), sizes, fits) if heads else ()
    used += head_mesh
    rows = _role_size(shapes, dims, "rows")
    row_mesh = _divide(rows, candidates(mesh.axis_names if row_axes is None else row_axes), sizes) if rows else ()
    result = Plan(batch=batch_mesh, heads=head_mesh, rows=row_mesh)
    return result if result.split else None


def _size(mesh, axes) -> int:
    return math.prod(dict(mesh.shape)[a] for a in axes)


def shard_map_kernel(
    body: Callable[..., Any],
    operands: Sequence[jax.Array | None],
    dims: Sequence[Dims | None],
    out_dims: Any,
    *,
    batch_axes: Sequence[str] = BATCH_AXES,
    head_axes: Sequence[str] = HEAD_AXES,
    row_axes: Sequence[str] | None = None,
) -> Any:
    """`body(*operands)`, run inside `shard_map` over the ambient mesh on per-device blocks.

    Args:
        body: the op on local shapes (it sees every operand's block; None operands stay None).
        operands: the arrays (or None) passed positionally to `body`.
        dims: per operand, the role of each dimension (see the module docstring); None for a None
            operand.
        out_dims: the roles of body's outputs, a pytree of `Dims` tuples matching its outputs
            (one tuple for a single array). Outputs take "batch", "heads", "rows" (gathered) or None.
        batch_axes, head_axes, row_axes: the mesh axes of each role (missing axes are skipped).

    Returns:
        body's outputs as global arrays, split like `out_dims` says ("rows" outputs replicated).

    Raises:
        ValueError: if a dims tuple does not match its operand, or one role has two sizes.
    """
    present = [i for i, a in enumerate(operands) if a is not None]
    shapes = [tuple(operands[i].shape) for i in present]
    in_dims = [tuple(dims[i]) for i in present]
    mesh = jax.sharding.get_abstract_mesh()
    p = plan(mesh, shapes, in_dims, batch_axes=batch_axes, head_axes=head_axes, row_axes=row_axes)
    if p is None:
        return body(*operands)
    t = _size(mesh, p.heads)
    args = []
    for i, d in zip(present, in_dims):
        a = operands[i]
        for axis, role in enumerate(d):
            if role == "groups" and a.shape[axis] % t:
                a = jnp.repeat(a, t // a.shape[axis], axis=axis)  # every device holds its heads' groups
        args.append(a)
    in_specs = tuple(p.spec(d) for d in in_dims)
    is_dims = lambda x: isinstance(x, tuple) and all(r is None or isinstance(r, str) for r in x)  # noqa: E731
    out_specs = jax.tree.map(lambda d: p.spec(d, gathered=True), out_dims, is_leaf=is_dims)

    def local(*blocks):
        full = list(operands)
        for i, blk in zip(present, blocks):
            full[i] = blk
        out = body(*full)

        def gather(d, o):
            for axis, role in enumerate(d):
                if role == "rows" and p.rows:
                    o = jax.lax.all_gather(o, p.rows, axis=axis, tiled=True)
            return o

        return jax.tree.map(gather, out_dims, out, is_leaf=is_dims)

    # Pallas calls carry no varying-axes types, hence check_vma=False: the transpose then sums the
    # cotangent of an operand over the split axes its spec does not name (dA over the batch axes).
    mapped = jax.shard_map(
        local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names=set(p.split), check_vma=False
    )
    return mapped(*args)


__all__ = ["BATCH_AXES", "HEAD_AXES", "ROLES", "Dims", "Plan", "plan", "shard_map_kernel"]
