"""Run checkpoints: a training run's Orbax state, its configuration and checksums.

Layout of a work directory:
    config.json            the run configuration (written once, atomically; checked on resume)
    checkpoints/<step>/    Orbax step directories {params, opt_state, data, meta}; an interrupted
                           save never becomes visible (Orbax finalises a step by an atomic rename),
                           and `keep_checkpoints` most recent steps are kept
    metrics.jsonl, tensorboard/, eval.json, *.png

Model directories (pretrained weights, what `zoo convert` writes) are `zoo.model_dir`.

Parameters load into either layer layout: a checkpoint written with `model.scan_layers` loads into a
looped model and back (`zoo.models.params.convert_layout`).

Several processes: every process constructs the `Checkpointer` and calls `save` / `restore`; Orbax
writes each step once (each process its own array blocks, process 0 the JSON items and the
metadata, then one commit) and restores into whatever shardings the caller gives, whatever the
number of processes that wrote it. `load_model` in a multi-process job therefore restores on every
process, onto shardings that span the processes (never one process's device).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from zoo import storage
from zoo.models import registry
from zoo.models.params import ParamView, abstract_model, model_with_params


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


CONFIG_FILE = "config.json"
# Model fields that change how a model runs, not what it computes: a run may resume with them changed.
RUNTIME_FIELDS = ("implementation", "remat")


def read_config(workdir) -> ml_collections.ConfigDict:
    """The run config saved in `workdir` (ValueError naming the directory when it has none)."""
    file = storage.path(workdir) / CONFIG_FILE
    if not file.is_file():
        raise ValueError(
            f"{str(workdir)!r} has no {CONFIG_FILE}; it is not a zoo work directory (run `zoo train` first)"
        )
    saved = storage.read_json(file)
    if not isinstance(saved, dict) or not {"model_name", "model", "train", "data"} <= set(saved):
        hint = (
            "it looks like a Hugging Face config.json: convert that directory with `zoo convert --from hf`"
            if isinstance(saved, dict) and ("architectures" in saved or "model_type" in saved)
            else "it is not a zoo run config"
        )
        raise ValueError(f"{str(file)!r} is not the config of a zoo run; {hint}, and use another --workdir")
    return ml_collections.ConfigDict(saved)


def check_resume_config(workdir, config: ml_collections.ConfigDict) -> None:
    """A work directory belongs to one model: refuse to resume it with another model config."""
    if not (storage.path(workdir) / CONFIG_FILE).is_file():
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


def checksums(tree: Mapping[str, Any]) -> dict[str, list[int]]:
    """Content checksums of a flat {name: array} tree (or of a pytree of them), computed on the
    devices in one jitted pass: per array [sum of its words, position-weighted sum of its words]
    mod 2^32, over the raw bits (uint32 words; 16-bit dtypes widened). A changed byte changes them."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)

    def one(x):
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize])
        w = bits.astype(jnp.uint32).reshape(-1)
        pos = (jnp.arange(w.size, dtype=jnp.uint32) % jnp.uint32(65521)) + jnp.uint32(1)
        return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(w * pos, dtype=jnp.uint32)])

    sums = jax.jit(lambda xs: [one(x) for x in xs])([x for _, x in leaves])
    return {jax.tree_util.keystr(k): [int(v) for v in np.asarray(c)] for (k, _), c in zip(leaves, sums)}


def all_finite(tree) -> bool:
    """Every floating-point leaf finite (one jitted reduction; a host sync)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))(leaves))


class DamagedCheckpoint(ValueError):
    """A checkpoint step that cannot be used: unreadable, or its contents differ from their checksums."""


def json_digest(obj) -> str:
    """SHA-256 of a JSON value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _check_json(step: int, item: str, obj, want: str | None) -> None:
    """A checkpoint's JSON item (data position, meta) against the digest saved with it; a step
    without digests (an older zoo's) is checked by its array checksums only."""
    if want is not None and json_digest(obj) != want:
        raise DamagedCheckpoint(f"step {step} is damaged: its {item} item differs from the digest written with it")


class Checkpointer:
    """Orbax checkpoints of the trainer's state that are good or not used.

    Every save records content checksums of the parameters and optimizer state, a SHA-256 digest of
    the data-iterator position and one of `meta` itself in the step's `meta` (written in the same
    atomic Orbax commit), so every item of a step is verified. `restore` recomputes them on the restored arrays; a step
    that fails to read or to match is moved aside to `<workdir>/damaged/<step>` (nothing is deleted)
    and the next older step is tried (`restore_latest`). Retention is ours, not Orbax's: a step is
    deleted only when `keep` newer steps have been read back and verified, so the last verified
    checkpoint is never rotated out, and never when it is protected (`protect_before`: the trainer
    protects the last `keep` steps written before a run's first non-finite step). Non-finite states
    are refused by `save`.
    """

    def __init__(self, workdir, keep: int = 2, create: bool = True, log=None):
        if keep < 1:
            raise ValueError(f"keep_checkpoints={keep} must be >= 1: a run always keeps its last good checkpoint")
        self.workdir, self.keep, self.log = storage.path(workdir), keep, log or _to_stderr
        self.directory = self.workdir / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=None, create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self.pending: int | None = None  # saved, not yet read back
        self.verified: list[int] = []
        self.protected: set[int] = set()
        self.targets = None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def protect_before(self, step: int) -> list[int]:
        """Protects the last `keep` checkpoints older than `step` from rotation (for the rest of this
        run); returns them, oldest first."""
        written = set(self.all_steps()) | ({self.pending} if self.pending is not None else set())
        kept = sorted(s for s in written if s < step)[-self.keep :]
        self.protected.update(kept)
        return kept

    def save(self, step: int, params, opt_state, data_state: dict, meta: dict) -> None:
        """Saves asynchronously after verifying the previous save; refuses non-finite states.

        A previous save that no longer reads back (damaged on disk since) does not stop the run: this
        state is saved and verified first, then the damaged step is set aside."""
        if not all_finite((params, opt_state)):
            raise ValueError(f"refusing to save a non-finite state at step {step}: the run diverged")
        previous, damaged = self.pending, None
        try:
            self._finish_pending()
        except DamagedCheckpoint as e:
            damaged = (previous, str(e))
        meta = {**meta, "checksums": checksums({"params": params, "opt_state": opt_state})}
        meta["data_sha256"] = json_digest(data_state)
        meta["meta_sha256"] = json_digest(meta)
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )
        self.pending = step
        if damaged is not None:
            self.protected.add(damaged[0])  # kept for inspection, not rotated out
            self._finish_pending()
            self.set_aside(*damaged)
            self.protected.discard(damaged[0])

    def _finish_pending(self) -> None:
        """Waits for the last save, reads it back, and only then rotates out older steps."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 -- Orbax and tensorstore raise many types
            if self.pending is not None:
                step, self.pending = self.pending, None
                raise self._failed_save(step, str(e)) from e
            raise
        if self.pending is None:
            return
        step, self.pending = self.pending, None
        if not (self.directory / str(step)).exists():  # the save failed in Orbax's threads
            raise self._failed_save(step, "")
        self.verify(step)
        self.verified.append(step)
        good = sorted(set(self.verified))
        for old in self.all_steps():
            if old < step and old not in self.protected and len([v for v in good if v > old]) >= self.keep:
                self.manager.delete(old)

    def _failed_save(self, step: int, error: str) -> ValueError:
        """The one line for a save that did not complete (its partial files are removed): a full disk
        when it says so or when less space is left than the newest step takes, else a failed save."""
        intact = [s for s in self.all_steps() if s != step]
        full = "No space left" in error or "RESOURCE_EXHAUSTED" in error
        if not storage.is_remote(self.directory):
            local = str(self.directory)
            newest = os.path.join(local, str(intact[-1])) if intact else None
            size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(newest) for f in fs) if newest else 0
            full = full or shutil.disk_usage(local).free < max(size, 1 << 20)
            for name in os.listdir(local):
                if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                    shutil.rmtree(os.path.join(local, name), ignore_errors=True)
        kept = {0: "no earlier step exists", 1: f"step {intact[0]} is intact"}.get(
            len(intact), f"steps {', '.join(map(str, intact))} are intact"
        )
        if full:
            return ValueError(
                f"no space left on device while saving step {step} in {str(self.directory)!r}; {kept}; free "
                "space and rerun the same command to resume"
            )
        return ValueError(f"saving step {step} failed (see the errors above); {kept}; rerun to resume")

    def bind(self, abstract_params, abstract_opt_state) -> None:
        """The abstract state (shapes, dtypes, the run's shardings) that saves are read back into."""
        self.targets = (abstract_params, abstract_opt_state)

    def verify(self, step: int) -> None:
        """Reads step back into the bound abstract state (`bind`) and compares its checksums."""
        if self.targets is None:
            raise ValueError("Checkpointer.verify needs the abstract state: call bind(params, opt_state) first")
        self.restore(step, *self.targets)

    def _read(self, step: int, items: dict):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 -- Orbax and tensorstore raise many types; one clear reason
            raise DamagedCheckpoint(f"step {step} cannot be read ({type(e).__name__}: {_first_line(e)})") from e

    @staticmethod
    def _compare(step: int, meta: dict, tree) -> None:
        got = checksums(tree)
        want = meta["checksums"]
        bad = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        if bad:
            raise DamagedCheckpoint(
                f"step {step} is damaged: the contents of {bad[0]} (and {len(bad) - 1} more "
                "arrays) differ from the checksums written with it"
            )

    def restore(self, step: int, abstract_params, abstract_opt_state=None):
        """Restores one step into the given abstract trees (ShapeDtypeStructs carrying shardings),
        verified against its checksums (DamagedCheckpoint otherwise)."""
        items = {
            "params": ocp.args.StandardRestore(abstract_params),
            "data": ocp.args.JsonRestore(),
            "meta": ocp.args.JsonRestore(),
        }
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        restored = self._read(step, items)
        meta = restored["meta"]
        if not isinstance(meta, dict) or "checksums" not in meta:
            raise DamagedCheckpoint(f"step {step} has no checksums (written by an older zoo or damaged)")
        _check_json(step, "meta", {k: v for k, v in meta.items() if k != "meta_sha256"}, meta.get("meta_sha256"))
        _check_json(step, "data", restored["data"], meta.get("data_sha256"))
        tree = {"params": restored["params"]}
        if abstract_opt_state is not None:
            tree["opt_state"] = restored["opt_state"]
        want = {k: v for k, v in meta["checksums"].items() if abstract_opt_state is not None or "opt_state" not in k}
        self._compare(step, {"checksums": want}, tree)
        return restored

    def restore_latest(
        self, abstract_params, abstract_opt_state=None, before: int | None = None, move_aside: bool = True
    ):
        """(step, restored) of the newest good step (older than `before` if given), or (None, None).

        Every step that fails is skipped with one line saying which step and why, and moved aside when
        `move_aside` (a training run; a read-only evaluation leaves the directory as it is)."""
        for step in reversed(self.all_steps()):
            if before is not None and step >= before:
                continue
            try:
                restored = self.restore(step, abstract_params, abstract_opt_state)
            except DamagedCheckpoint as e:
                if move_aside:
                    self.set_aside(step, str(e))
                elif jax.process_index() == 0:
                    self.log(f"zoo: checkpoint {e}; skipped it")
                continue
            self.verified.append(step)
            return step, restored
        return None, None

    def set_aside(self, step: int, reason: str) -> None:
        """Moves a damaged step out of the checkpoint directory (kept for inspection) and says so."""
        target = self.workdir / "damaged"
        dest = target / str(step)
        if jax.process_index() == 0:
            self.log(f"zoo: checkpoint {reason}; skipped it (moved to {dest})")
            target.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                dest = target / f"{step}-{len(list(target.iterdir()))}"
            (self.directory / str(step)).rename(dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"zoo checkpoint set aside {step}")
        self.manager.reload()

    def wait(self) -> None:
        self._finish_pending()

    def close(self) -> None:
        try:
            self._finish_pending()
        finally:
            self.manager.close()


def _abstract_tree(metadata) -> Any:
    """Host-local ShapeDtypeStructs for an item from Orbax's saved metadata (for verification reads)."""
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
        metadata,
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"),
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""


def load_model(
    workdir,
    step: int | None = None,
    *,
    shardings: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding] | None = None,
    return_step: bool = False,
    **model_overrides,
):
    """(model, run config) from a work directory; (model, run config, step) with `return_step`.

    Args:
      step: the checkpoint step (default: the latest).
      shardings: where the parameters are restored: one sharding for all, or one per flat name of
        the run's saved layout. Default: the first device in a single process; in a job of several
        processes (which must all call this), replicated over every device of every process.
      return_step: also return the step that was loaded (the latest good one when `step` is None).
      **model_overrides: model fields changed at load time, e.g. `scan_layers=False` (a scanned
        run's checkpoint loaded into a looped model) or an inference option.
    """
    config = read_config(workdir)
    saved_cfg = registry.config_from_run(config)
    cfg = registry.config_with_overrides(saved_cfg, model_overrides)
    view = ParamView(abstract_model(config.model_name, saved_cfg))
    ckpt = Checkpointer(workdir, create=False)
    try:
        if not ckpt.all_steps():
            raise ValueError(f"{str(workdir)!r} has no checkpoint yet")
        if step is not None and step not in ckpt.all_steps():
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
        if step is None:  # the newest good step; damaged ones are skipped with one line each
            step, restored = ckpt.restore_latest(target, move_aside=False)
            if step is None:
                raise ValueError(f"{str(workdir)!r} holds no usable checkpoint (every step is damaged)")
        else:
            restored = ckpt.restore(step, target)
    finally:
        ckpt.manager.close()
    for k, v in model_overrides.items():
        config.model[k] = list(v) if isinstance(v, tuple) else v
    model = model_with_params(config.model_name, cfg, restored["params"], saved_cfg)
    return (model, config, step) if return_step else (model, config)


def default_sharding() -> jax.sharding.Sharding:
    """Where `load_model` puts parameters by default: the first device in a single process,
    replicated over all devices of all processes in a multi-process job."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("devices",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
