"""Helper process for test_sharding: trains 20 steps on a given mesh, prints losses and shardings.

Usage: python sharded_run.py WORKDIR DATA FSDP TENSOR  (set XLA_FLAGS for fake CPU devices first)
"""

import json
import sys

import jax

sys.path.insert(0, __file__.rsplit("/tests/", 1)[0] + "/tests")
from conftest import tiny_config  # noqa: E402

from zoo.storage import read_metrics  # noqa: E402
from zoo.train.step import make_setup  # noqa: E402
from zoo.train.trainer import train  # noqa: E402


def main():
    workdir, data, fsdp, tensor = sys.argv[1], *map(int, sys.argv[2:5])
    config = tiny_config(steps=20, checkpoint_every=20)
    config.model.d_model, config.model.n_heads, config.model.n_kv_heads = 64, 4, 2
    config.model.d_ff = 128
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    train(config, workdir, progress=False)
    setup = make_setup(config)
    params = setup.init_params()
    shards = {
        n: [list(p.sharding.spec), list(p.addressable_shards[0].data.shape), list(p.shape)] for n, p in params.items()
    }
    print(
        json.dumps(
            {"devices": jax.device_count(), "losses": [r["loss"] for r in read_metrics(workdir)], "shards": shards}
        )
    )


if __name__ == "__main__":
    main()
