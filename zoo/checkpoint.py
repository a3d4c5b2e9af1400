"""Checkpoints: a training run's Orbax state, and model directories (pretrained weights).

Layout of a work directory:
    config.json            the run configuration (written once, atomically; checked on resume)
    checkpoints/<step>/    Orbax step directories {params, opt_state, data, meta}; an interrupted
                           save never becomes visible (Orbax finalises a step by an atomic rename),
                           and `keep_checkpoints` most recent steps are kept
    metrics.jsonl, tensorboard/, eval.json, *.png

A model directory (`save_pretrained` / `load_pretrained`, what `zoo convert` writes and
`zoo.from_pretrained` reads):
    model.json             {"format": "zoo-model", "model_name", "model": config fields, "tokenizer", "source"}
    params.safetensors     the parameters, flat names of the looped layout (`zoo.models.params`)

Parameters load into either layer layout: a checkpoint written with `model.scan_layers` loads into a
looped model and back (`zoo.models.base.to_scanned` / `to_looped`).

Several processes: every process constructs the `Checkpointer` and calls `save` / `restore`; Orbax
writes each step once (each process its own array blocks, process 0 the JSON items and the
metadata, then one commit) and restores into whatever shardings the caller gives, whatever the
number of processes that wrote it. `load_model` in a multi-process job therefore restores on every
process, onto shardings that span the processes (never one process's device).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from zoo import io
from zoo.models import registry
from zoo.models.base import to_looped, to_scanned
from zoo.models.params import ParamView

CONFIG_FILE = "config.json"
MODEL_FILE = "model.json"
PARAMS_FILE = "params.safetensors"
# Model fields that change how a model runs, not what it computes: a run may resume with them changed.
RUNTIME_FIELDS = ("implementation", "remat")


def read_config(workdir) -> ml_collections.ConfigDict:
    file = io.path(workdir) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(
            f"{str(workdir)!r} has no {CONFIG_FILE}; it is not a zoo work directory (run `zoo train` first)"
        )
    return ml_collections.ConfigDict(io.read_json(file))


def check_resume_config(workdir, config: ml_collections.ConfigDict) -> None:
    """A work directory belongs to one model: refuse to resume it with another model config."""
    if not (io.path(workdir) / CONFIG_FILE).is_file():
        return
    saved = read_config(workdir)
    strip = lambda m: {k: v for k, v in m.to_dict().items() if k not in RUNTIME_FIELDS}  # noqa: E731
    if saved.model_name != config.model_name or strip(saved.model) != strip(config.model):
        changed = sorted(
            k for k in set(strip(saved.model)) | set(strip(config.model)) if saved.model.get(k) != config.model.get(k)
        )
        raise ValueError(
            f"{str(workdir)!r} holds a run of {saved.model_name} with other model settings "
            f"({', '.join(changed) or 'model_name'}); use a new --workdir, or the same model config "
            "to resume"
        )


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for the trainer's state."""

    def __init__(self, workdir, keep: int = 2, create: bool = True):
        self.directory = io.path(workdir) / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, data_state: dict, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def restore(self, step: int, abstract_params, abstract_opt_state=None):
        """Restores into the given abstract trees (ShapeDtypeStructs carrying shardings)."""
        items = {
            "params": ocp.args.StandardRestore(abstract_params),
            "data": ocp.args.JsonRestore(),
            "meta": ocp.args.JsonRestore(),
        }
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        return self.manager.restore(step, args=ocp.args.Composite(**items))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_model(model_name: str, cfg: Any) -> nnx.Module:
    """The model with abstract (shape-only) parameters: nothing is allocated."""
    cls = registry.model_class(model_name)
    return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


def _period(model: nnx.Module) -> int:
    return model.blocks.period if hasattr(model, "blocks") and hasattr(model.blocks, "period") else 1


def convert_layout(params: dict[str, Any], src: nnx.Module, dst: nnx.Module) -> dict[str, Any]:
    """Flat parameters of model `src`'s layer layout in `dst`'s layout (looped <-> scanned)."""
    src_scan = getattr(getattr(src, "blocks", None), "scan", False)
    dst_scan = getattr(getattr(dst, "blocks", None), "scan", False)
    if src_scan and not dst_scan:
        return to_looped(params, _period(src))
    if dst_scan and not src_scan:
        return to_scanned(params, _period(dst))
    return params


def bind(model_name: str, cfg: Any, params: dict[str, Any], src_cfg: Any | None = None) -> nnx.Module:
    """A model `model_name` with config `cfg` holding `params` (flat names; in the layout of
    `src_cfg`, default `cfg`), on the default device. Names and shapes must match exactly."""
    target = abstract_model(model_name, cfg)
    if src_cfg is not None:
        params = convert_layout(params, abstract_model(model_name, src_cfg), target)
    view = ParamView(target)
    check_same_tree(params, view.shapes, f"{model_name} parameters")
    return view.merge({n: jax.numpy.asarray(params[n], view.shapes[n].dtype) for n in view.names})


def check_same_tree(params: dict[str, Any], shapes: dict[str, Any], what: str) -> None:
    """One clear error when two flat parameter trees differ in names or shapes."""
    missing, extra = sorted(set(shapes) - set(params)), sorted(set(params) - set(shapes))
    if missing or extra:
        raise ValueError(
            f"{what}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
            f"{extra[:5]}{'...' if len(extra) > 5 else ''}"
        )
    for n, s in shapes.items():
        if tuple(np.shape(params[n])) != tuple(s.shape):
            raise ValueError(f"{what}: {n!r} has shape {tuple(np.shape(params[n]))}, expected {tuple(s.shape)}")


def load_model(
    workdir,
    step: int | None = None,
    *,
    shardings: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding] | None = None,
    **model_overrides,
):
    """(model, run config) from a work directory.

    Args:
      step: the checkpoint step (default: the latest).
      shardings: where the parameters are restored: one sharding for all, or one per flat name of
        the run's saved layout. Default: the first device in a single process; in a job of several
        processes (which must all call this), replicated over every device of every process.
      **model_overrides: model fields changed at load time, e.g. `scan_layers=False` (a scanned
        run's checkpoint loaded into a looped model) or an inference option.
    """
    config = read_config(workdir)
    saved_cfg = registry.config_from_run(config)
    cfg = registry.config_with_overrides(saved_cfg, model_overrides)
    view = ParamView(abstract_model(config.model_name, saved_cfg))
    ckpt = Checkpointer(workdir, create=False)
    try:
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise ValueError(f"{str(workdir)!r} has no checkpoint yet")
        if step not in ckpt.all_steps():
            raise ValueError(f"{str(workdir)!r} has no checkpoint at step {step}; it has steps {ckpt.all_steps()}")
        if shardings is None:
            shardings = default_sharding()
        if not isinstance(shardings, Mapping):
            shardings = dict.fromkeys(view.shapes, shardings)
        if set(shardings) != set(view.shapes):
            raise ValueError(
                f"shardings name {len(shardings)} parameters but {str(workdir)!r} holds {len(view.shapes)} "
                f"(e.g. missing {sorted(set(view.shapes) - set(shardings))[:3]}); give one per parameter of "
                "the run's saved layout, or one sharding for all"
            )
        target = {n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=shardings[n]) for n, s in view.shapes.items()}
        restored = ckpt.restore(step, target)
    finally:
        ckpt.close()
    for k, v in model_overrides.items():
        config.model[k] = list(v) if isinstance(v, tuple) else v
    return bind(config.model_name, cfg, restored["params"], saved_cfg), config


def default_sharding() -> jax.sharding.Sharding:
    """Where `load_model` puts parameters by default: the first device in a single process,
    replicated over all devices of all processes in a multi-process job."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def save_pretrained(model: nnx.Module, out_dir, *, tokenizer: dict | None = None, source: dict | None = None) -> None:
    """Writes a model directory: model.json and params.safetensors (looped layout, fp32 as held)."""
    out = io.path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    looped = dataclasses.replace(cfg, scan_layers=False) if hasattr(cfg, "scan_layers") else cfg
    flat = ParamView(model).flat(model)
    params = convert_layout(flat, model, abstract_model(model.model_name, looped))
    io.save_flat(out / PARAMS_FILE, {k: np.asarray(v) for k, v in params.items()})
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(looped).items()}
    io.write_json_atomic(
        out / MODEL_FILE,
        {
            "format": "zoo-model",
            "version": 1,
            "model_name": model.model_name,
            "model": fields,
            "tokenizer": tokenizer,
            "source": source or {},
        },
    )


def read_model_dir(model_dir) -> dict:
    """The model.json of a model directory (one clear error when it is not one)."""
    file = io.path(model_dir) / MODEL_FILE
    if not file.is_file():
        raise ValueError(
            f"{str(model_dir)!r} is not a zoo model directory (no {MODEL_FILE}); write one with "
            "`zoo convert` or zoo.checkpoint.save_pretrained"
        )
    meta = io.read_json(file)
    if meta.get("format") != "zoo-model":
        raise ValueError(f"{str(file)!r} is not a zoo model description (format {meta.get('format')!r})")
    return meta


def load_pretrained(model_dir, **model_overrides):
    """(model, model.json dict) from a model directory; `model_overrides` as in `load_model`."""
    meta = read_model_dir(model_dir)
    saved_cfg = registry.config_from_dict(meta["model_name"], meta["model"])
    cfg = registry.config_with_overrides(saved_cfg, model_overrides)
    params = io.load_flat(io.path(model_dir) / PARAMS_FILE)
    return bind(meta["model_name"], cfg, params, saved_cfg), meta
