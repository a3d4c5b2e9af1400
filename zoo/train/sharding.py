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

    Two ways to describe them:
    - by hand (any machines, CPU included): `JAX_COORDINATOR_ADDRESS=host:port` (process 0's
      address, reachable from every process), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` (0 ..
      JAX_NUM_PROCESSES - 1), the same on every process but the id;
    - a cluster JAX detects by itself: Cloud TPU pod slices, SLURM, Open MPI.
    A single process (none of these) does nothing, and a second call does nothing.

    On CPU, computations that span processes need a cross-process collectives implementation:
    JAX's `jax_cpu_collectives_implementation` is "gloo" by default (TCP through the coordinator's
    key-value store); when it has been switched off (None) it is set to "gloo" here, and "mpi" is
    left alone. This must run before anything creates a JAX backend (before `jax.devices()`).

    Raises:
      ValueError: a partial or inconsistent hand-written description (one clear line naming the
        variable and its value).
    """
    if jax.distributed.is_initialized():
        return
    env = os.environ
    by_hand = [k for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k in env]
    cluster = (
        int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )
    if len(by_hand) == 3:
        count, index = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
        address = env["JAX_COORDINATOR_ADDRESS"]
        if count < 1 or not 0 <= index < count:
            raise ValueError(
                f"JAX_PROCESS_ID={index} with JAX_NUM_PROCESSES={count}: the id must be in [0, {count}) "
                "and the count >= 1"
            )
        if ":" not in address:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS={address!r} must be host:port (process 0's address)")
        if count > 1:
            _use_cpu_collectives()
            jax.distributed.initialize(address, num_processes=count, process_id=index)
            _first_barrier()
    elif cluster:  # JAX finds the processes (and reads JAX_COORDINATOR_ADDRESS itself when it is set)
        _use_cpu_collectives()
        jax.distributed.initialize()
        _first_barrier()
    elif "JAX_COORDINATOR_ADDRESS" in by_hand or _env_int("JAX_NUM_PROCESSES", 1) > 1:
        missing = sorted({"JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"} - set(by_hand))
        raise ValueError(
            f"{', '.join(f'{k}={env[k]!r}' for k in by_hand)} is set but {', '.join(missing)} is not; a "
            "multi-process run needs all three (coordinator host:port, number of processes, this process's id)"
        )


def _use_cpu_collectives() -> None:
    """Cross-process computations on CPU need a collectives implementation (gloo unless one is set)."""
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _first_barrier() -> None:
    """One collective over all devices while the processes are still in step.

    On CPU the first cross-process computation sets up gloo's context, which waits at most 30 s for
    every process to arrive; later collectives wait as long as it takes. Made here, at start-up, it
    cannot fail because process 0 is busy writing the work directory while the others wait at
    Orbax's first barrier (which is itself such a collective).
    """
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("zoo: processes started")


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


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


def param_shardings(view, mesh: Mesh) -> dict[str, NamedSharding]:
    """Each parameter's sharding on `mesh` from its logical axes (`view`: a `zoo.models.params.ParamView`)."""
    return view.tree(lambda n, meta, s: NamedSharding(mesh, logical_to_spec(meta["axes"], s.shape, mesh)))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(LOGICAL_RULES["batch"], *([None] * (ndim - 1))))


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split over `mesh` (the axes of the logical 'batch' axis)."""
    return int(np.prod([mesh.shape[a] for a in LOGICAL_RULES["batch"]]))
