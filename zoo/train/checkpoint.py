"""Orbax checkpoints: params, optimizer state, data-iterator state and step, saved atomically.

Layout of a work directory:
    config.json            the run configuration (written once, atomically; checked on resume)
    checkpoints/<step>/    Orbax step directories {params, opt_state, data, meta}; an interrupted
                           save never becomes visible (Orbax finalises a step by an atomic rename),
                           and `keep_checkpoints` most recent steps are kept
    metrics.jsonl, events.* (TensorBoard), eval.json, *.png
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

CONFIG_FILE = "config.json"


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{workdir!r} has no {CONFIG_FILE}; it is not a zoo work directory (run `zoo train` first)")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def check_resume_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """A work directory belongs to one model: refuse to resume it with another model config."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    saved = read_config(workdir)
    if saved.model_name != config.model_name or saved.model.to_dict() != config.model.to_dict():
        raise ValueError(f"{workdir!r} holds a run of a different model ({saved.model_name}); "
                         "use a new --workdir, or the same model config to resume")


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for the trainer's state."""

    def __init__(self, workdir: str, keep: int = 2, create: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_state: dict, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)))

    def restore(self, step: int, abstract_params, abstract_opt_state=None):
        """Restores into the given abstract trees (ShapeDtypeStructs carrying shardings)."""
        items = {"params": ocp.args.StandardRestore(abstract_params), "data": ocp.args.JsonRestore(),
                 "meta": ocp.args.JsonRestore()}
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        return self.manager.restore(step, args=ocp.args.Composite(**items))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def load_model(workdir: str, step: int | None = None):
    """(model, run config) from a work directory, params restored on the default device."""
    from zoo.config import model_config
    from zoo.models import registry
    from zoo.train.params import ParamView

    config = read_config(workdir)
    cfg = model_config(config)
    cls = registry.model_class(config.model_name)
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
    view = ParamView(abstract)
    ckpt = Checkpointer(workdir, create=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise ValueError(f"{workdir!r} has no checkpoint yet")
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for n, s in view.shapes.items()}
    restored = ckpt.restore(step, target)
    ckpt.close()
    return view.merge(restored["params"]), config
