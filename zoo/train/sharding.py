"""Device mesh (data, fsdp, tensor) and the one table mapping logical axis names to mesh axes.

Parameters carry logical axis names (`nnx.Param(..., axes=("embed", "mlp"))`); `LOGICAL_RULES`
maps each name to mesh axes. A dimension whose size the mesh axes do not divide is replicated
instead, so tiny test models shard wherever they can and never fail to compile.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None = replicated). The batch is split over data and fsdp (FSDP is data
# parallelism whose parameters are also sharded over `fsdp`); model widths go on `tensor`.
LOGICAL_RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "vocab": ("tensor",),
    "head_dim": None,
    "norm": None,
    "state": None,
    "conv": None,
    "layers": None,
}


def maybe_initialize_distributed() -> None:
    """Calls `jax.distributed.initialize()` when the environment describes several processes.

    Cloud TPU pods, SLURM and Open MPI set these variables; a single process does nothing.
    """
    multi = (
        int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "TPU_WORKER_HOSTNAMES" in os.environ
        and "," in os.environ["TPU_WORKER_HOSTNAMES"]
        or "JAX_COORDINATOR_ADDRESS" in os.environ
    )
    if multi and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 (at most one) to 'all the remaining devices' and checks the product."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {sizes}: at most one of data/fsdp/tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes {sizes} must be positive (or -1 for the rest)")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"cannot fill the mesh: {num_devices} devices are not divisible by {known}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
            f"but there are {num_devices} devices; set one of them to -1"
        )
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices of all processes (Auto axis types: GSPMD)."""
    shape = mesh_shape(data, fsdp, tensor, jax.device_count())
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """PartitionSpec for an array with logical `axes`; undividable dims are replicated."""
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        if name is not None and name not in LOGICAL_RULES:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(LOGICAL_RULES)}")
        mesh_axes = tuple(a for a in (LOGICAL_RULES.get(name) or ()) if a not in used and mesh.shape[a] > 1)
        if mesh_axes and size % math.prod(mesh.shape[a] for a in mesh_axes) == 0:
            used.update(mesh_axes)
            spec.append(mesh_axes if len(mesh_axes) > 1 else mesh_axes[0])
        else:
            spec.append(None)
    return P(*spec)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"], *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in LOGICAL_RULES["batch"]]))
