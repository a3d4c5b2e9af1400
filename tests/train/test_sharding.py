"""Real multi-device sharding on 8 simulated CPU devices (data=2, fsdp=2, tensor=2)."""

import json
import os
import subprocess
import sys

import jax
import pytest

from zoo.train import sharding

HERE = os.path.dirname(os.path.abspath(__file__))


def _run(workdir, mesh, devices):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharded_run.py"), str(workdir), *map(str, mesh)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_8_device_mesh_matches_single_device(tmp_path):
    one = _run(tmp_path / "one", (1, 1, 1), 1)
    eight = _run(tmp_path / "eight", (2, 2, 2), 8)
    assert one["devices"] == 1 and eight["devices"] == 8
    assert len(one["losses"]) == len(eight["losses"]) == 20
    for a, b in zip(one["losses"], eight["losses"]):
        assert abs(a - b) <= 1e-4 * abs(a), (a, b)
    spec, shard, full = eight["shards"]["blocks/layers/0/mlp/gate/kernel"]  # axes (embed, mlp)
    assert spec == ["fsdp", "tensor"] and shard == [full[0] // 2, full[1] // 2]
    spec, shard, full = eight["shards"]["blocks/layers/0/attn/wq/kernel"]  # axes (embed, heads)
    assert spec == ["fsdp", "tensor"] and shard == [32, 32]
    spec, shard, _ = eight["shards"]["blocks/layers/0/attn_norm/scale"]  # norms stay replicated
    assert spec == [None]


def test_mesh_shape_errors():
    assert sharding.mesh_shape(-1, 2, 2, 8) == (2, 2, 2)
    assert sharding.mesh_shape(1, -1, 1, 8) == (1, 8, 1)
    with pytest.raises(ValueError, match="at most one"):
        sharding.mesh_shape(-1, -1, 1, 8)
    with pytest.raises(ValueError, match="but there are 8 devices"):
        sharding.mesh_shape(2, 2, 1, 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape(-1, 3, 1, 8)


def test_logical_rules_replicate_undividable_dims():
    mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    assert sharding.logical_to_spec(("embed", "mlp"), (6, 10), mesh) == jax.sharding.PartitionSpec(None, None)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.logical_to_spec(("bogus",), (4,), mesh)
