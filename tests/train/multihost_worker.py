"""Helper process for test_multihost: runs the zoo CLI (`zoo.cli.main`) with test-only recording.

Usage: python multihost_worker.py train|eval ARGS...   (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID and XLA_FLAGS set by the test for a multi-process run)

Test-only environment variables (production code has no hooks; this script wraps module functions):
  ZOO_TEST_RECORD=PREFIX   writes PREFIX.<process index>.json at exit with
      "read":    every index this process read from the training example source (read-ahead included);
      "steps":   per trained step, this process's rows (sha1 of each row's input tokens, in order);
      "saves":   per checkpoint save, {"step", "params", "spanning": parameters not fully addressable here
                 (on devices of several processes), "split": parameters this process holds only part of};
      "eval":    the same counts for the parameters of each evaluated model;
      "process_index", "process_count", "devices", "local_devices".
  ZOO_TEST_STOP_AFTER=N    stops training after global step N without a final checkpoint (preemption).
"""

import functools
import hashlib
import json
import os
import sys

import jax
import numpy as np
from flax import nnx

from zoo import checkpoint, cli
from zoo.data import pipeline
from zoo.eval import evaluate
from zoo.train import trainer

RECORD = {"read": set(), "steps": [], "saves": [], "eval": []}


class RecordedSource:
    """An example source that notes every index read from it."""

    def __init__(self, source):
        self.source = source

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        RECORD["read"].add(int(i))
        return self.source[i]


def _held(a) -> int:
    """How many elements of the global array `a` this process holds (each distinct block once)."""
    blocks = {tuple(sl.indices(d) for sl, d in zip(sh.index, a.shape)) for sh in a.addressable_shards}
    return sum(int(np.prod([len(range(*ix)) for ix in block])) for block in blocks)


def _placement(arrays) -> dict:
    arrays = list(arrays)
    return {
        "params": len(arrays),
        "spanning": sum(not a.is_fully_addressable for a in arrays),
        "split": sum(_held(a) < a.size for a in arrays),
    }


def install_hooks() -> None:
    example_source = pipeline.example_source

    @functools.wraps(example_source)
    def recorded_example_source(data, split, length, depth=None):
        source = example_source(data, split, length, depth)
        return RecordedSource(source) if split == "train" else source

    pipeline.example_source = recorded_example_source

    global_batch = trainer.global_batch

    @functools.wraps(global_batch)
    def recorded_global_batch(batch, mesh):
        RECORD["steps"].append([hashlib.sha1(row.tobytes()).hexdigest() for row in batch["inputs"]])
        return global_batch(batch, mesh)

    trainer.global_batch = recorded_global_batch

    save = checkpoint.Checkpointer.save

    @functools.wraps(save)
    def recorded_save(self, step, params, *args, **kwargs):
        RECORD["saves"].append({"step": step, **_placement(params.values())})
        return save(self, step, params, *args, **kwargs)

    checkpoint.Checkpointer.save = recorded_save

    evaluate_fn = evaluate.evaluate

    @functools.wraps(evaluate_fn)
    def recorded_evaluate(model, config):
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        RECORD["eval"].append(_placement(leaves))
        return evaluate_fn(model, config)

    evaluate.evaluate = recorded_evaluate

    if "ZOO_TEST_STOP_AFTER" in os.environ:
        trainer.train = functools.partial(trainer.train, stop_after=int(os.environ["ZOO_TEST_STOP_AFTER"]))


def main() -> int:
    install_hooks()
    rc = cli.main(sys.argv[1:])
    prefix = os.environ.get("ZOO_TEST_RECORD")
    if prefix:
        out = {
            **RECORD,
            "read": sorted(RECORD["read"]),
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
            "devices": jax.device_count(),
            "local_devices": jax.local_device_count(),
        }
        with open(f"{prefix}.{jax.process_index()}.json", "w") as f:
            json.dump(out, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
