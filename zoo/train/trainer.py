"""The training loop: `train` runs the jitted step (`zoo.train.step`) over the data, checks its
non-finite flags, logs and saves checkpoints. Re-running the same command resumes from the latest
checkpoint: parameters, optimizer state, data-iterator state and step are restored, so the
continued run is identical to an uninterrupted one.

Several processes (hosts) run the same loop (`zoo.train.sharding.maybe_initialize_distributed`):
each reads only its own shard of every global batch, every process takes part in each checkpoint
save and restore (Orbax coordinates them), and only process 0 writes the work directory's own files
(config.json, metrics). A checkpoint restores into the current process count's shardings, so a run
can resume on another number of processes with the same global batch (fixed-length and
decomposition modes; packed mode packs each host's own documents and resumes on as many processes
as it was saved with).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time

import jax
import ml_collections
import numpy as np

from zoo import checkpoint as ckpt_lib
from zoo import model_dir, storage
from zoo.config import validate
from zoo.data.pipeline import DOCUMENT_SOURCES, check_vocab, make_batches
from zoo.models import registry
from zoo.models.params import ParamView, check_same_tree
from zoo.train import optim, sharding
from zoo.train.memory import check_memory, check_memory_estimate
from zoo.train.step import Setup, global_batch, make_setup, make_train_step


def initial_params(setup: Setup, source: str) -> dict:
    """Parameters to start training from: a model directory (`zoo convert`, pretrained weights) or
    another run's work directory (its latest checkpoint), in this run's layout and shardings."""
    is_model_dir = (storage.path(source) / model_dir.MODEL_FILE).is_file()
    model = (
        model_dir.load_pretrained(source, **_layout(setup))
        if is_model_dir
        else ckpt_lib.load_model(source, **_layout(setup))
    )[0]
    params = ParamView(model).flat(model)
    check_same_tree(params, setup.view.shapes, f"train.init_from={source!r} vs {setup.config.model_name}")
    out = {}
    for n, s in setup.view.shapes.items():
        # Via the host: every process holds the whole array (one device, or replicated over all
        # processes' devices) and places the blocks of its own devices.
        host = np.asarray(params[n]).astype(s.dtype)
        out[n] = jax.make_array_from_callback(host.shape, setup.param_shardings[n], lambda idx, h=host: h[idx])
    return out


def _layout(setup: Setup) -> dict:
    return {"scan_layers": bool(setup.config.model.get("scan_layers", False))}


def gather_data_states(state: dict) -> dict:
    """The data-iterator states of all processes (each a small JSON dict), as saved in a checkpoint:
    {"process_count": P, "hosts": [state of process 0, ..., state of process P - 1]}.

    Every process calls this (it is a collective when P > 1) and gets the same dict.
    """
    count = jax.process_count()
    if count == 1:
        return {"process_count": 1, "hosts": [state]}
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(state, sort_keys=True).encode(), np.uint8)  # [n]
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int32)).reshape(count)  # [P]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: raw.size] = raw
    rows = multihost_utils.process_allgather(padded).reshape(count, -1)  # [P, max n]
    return {"process_count": count, "hosts": [json.loads(r[:n].tobytes()) for r, n in zip(rows, sizes)]}


def host_data_state(saved: dict, mode: str, process_index: int, process_count: int) -> dict:
    """This process's data-iterator state from a checkpoint's (see `gather_data_states`).

    Fixed-length and decomposition batches are a function of the step alone (every process's state
    is the step), so they resume on any number of processes with the same global batches. Packed
    mode packs each process's own documents: its states resume only on as many processes.
    """
    if "hosts" not in saved:  # written by one process before states were kept per process
        saved = {"process_count": 1, "hosts": [saved]}
    hosts = saved["hosts"]
    if len(hosts) == process_count:
        return hosts[process_index]
    if mode in ("fixed", "decomposition"):
        return hosts[0]
    raise ValueError(
        f"the checkpoint was written by {len(hosts)} processes and this run has {process_count}: "
        f"data.mode={mode!r} packs each process's own documents, so its data position cannot move to "
        f"another number of processes; resume with {len(hosts)} processes (or use a new --workdir)"
    )


class NonFinite(ValueError):
    """The run met non-finite losses or gradients that its `train.on_nonfinite` policy does not absorb."""


class Preempted(SystemExit):
    """A SIGTERM stopped a run after its checkpoint: a caller that runs several runs stops as well (exit 0)."""


def finished(result: dict, run_dir: str) -> dict:
    """`result` of `train` when the run reached its last step; else (a SIGTERM stopped it) one line and
    `Preempted`, so that a driver of several runs never records a run cut short as done."""
    if result.get("preempted"):
        print(
            f"zoo: stopped by SIGTERM at step {result['step']} of {run_dir} (its checkpoint is saved); "
            "rerun the same command to resume",
            file=sys.stderr,
        )
        raise Preempted(0)
    return result


def train(
    config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, stop_after: int | None = None
) -> dict:
    """Trains (or resumes) the run in `workdir`; returns {"train": last logged metrics, "step", and
    "preempted": True when a SIGTERM stopped it after a checkpoint}.

    Everything that can fail on user input is checked before the work directory is touched (the
    config's ranges, the model, the data and its splits, the mesh, writability, and the compiled
    step's memory against the device's). Then one writer holds the work directory (`WorkdirLock`);
    a resume starts from the newest checkpoint that reads back and matches its checksums (damaged
    steps are moved aside with one line each); changed run settings are recorded.

    Args:
      stop_after: stop after this global step without a final checkpoint (tests simulate preemption).
    """
    if not str(workdir).strip():
        raise ValueError("--workdir is empty; name a directory for the run (e.g. --workdir runs/default)")
    with _Sigterm() as sigterm:
        return _train(config, workdir, progress, stop_after, sigterm)


def _train(config, workdir, progress: bool, stop_after: int | None, sigterm: _Sigterm) -> dict:
    sharding.maybe_initialize_distributed()
    validate(config)
    check_memory_estimate(config)
    setup = make_setup(config)
    batches = make_batches(config.data, "train", process_index=jax.process_index(), process_count=jax.process_count())
    step_fn, opt_sh, abstract_params, abstract_opt = _preflight(config, setup, batches, workdir)
    # A fresh run's starting point is read (and its shapes checked) before the work directory is touched.
    fresh = not (storage.path(workdir) / "checkpoints").exists() or not list(
        (storage.path(workdir) / "checkpoints").iterdir()
    )
    start_from = initial_params(setup, config.train.init_from) if config.train.init_from and fresh else None

    with storage.WorkdirLock(workdir):
        _record_config(workdir, config)
        checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints, log=_log)
        checkpointer.bind(abstract_params, abstract_opt)
        had = checkpointer.all_steps()
        start, restored = checkpointer.restore_latest(abstract_params, abstract_opt)
        if restored is None and had:
            _log(
                f"zoo: no usable checkpoint: every step ({', '.join(map(str, had))}) is damaged and was moved "
                f"to {storage.path(workdir) / 'damaged'}; training starts again from step 0"
            )
        if restored is not None:
            params, opt_state = restored["params"], restored["opt_state"]
            batches.set_state(
                host_data_state(restored["data"], config.data.mode, jax.process_index(), jax.process_count())
            )
        else:
            if start_from is None and config.train.init_from:
                start_from = initial_params(setup, config.train.init_from)
            params = setup.init_params() if start_from is None else start_from
            opt_state = jax.jit(setup.tx.init, out_shardings=opt_sh)(params)
            start = 0
        loop = _Loop(config, setup, step_fn, batches, checkpointer, workdir, start, progress, sigterm)
        try:
            return loop.run(params, opt_state, stop_after)
        finally:
            loop.close()


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def _preflight(config, setup: Setup, batches, workdir):
    """The checks that need no work directory: data, splits, mesh, writability, compiled memory.

    Returns (step function, optimizer shardings, abstract params, abstract optimizer state)."""
    vocab = registry.config_from_run(config).vocab_size
    initial_state = batches.get_state()
    check_vocab(next(batches), vocab, f"data.source={config.data.source!r}")  # peek, then rewind
    batches.set_state(initial_state)
    if config.data.source in DOCUMENT_SOURCES:  # the evaluation's split must exist before training
        make_batches(config.data, "validation")
    dp = sharding.data_parallel_size(setup.mesh)
    for b, _ in batches.global_shapes:
        if b % dp:
            raise ValueError(
                f"a global batch of {b} sequences is not divisible by the mesh's data x fsdp = {dp}; "
                "change data.batch_size (or data.tokens_per_step) or the mesh"
            )
    storage.check_writable_dir(workdir)
    ckpt_lib.check_resume_config(workdir, config)  # a work dir of another run (or not a zoo run) is refused
    if config.train.init_from:
        src = storage.path(config.train.init_from)
        if not (src / model_dir.MODEL_FILE).is_file() and not (src / ckpt_lib.CONFIG_FILE).is_file():
            raise ValueError(
                f"train.init_from={config.train.init_from!r} is neither a model directory nor a work directory"
            )
    abstract_params, abstract_opt, opt_sh = setup.abstract_state()
    step_fn = make_train_step(setup, opt_sh)
    # The largest step (fixed: the one shape; decomposition: the longest bucket) compiled now, and
    # its memory compared with the device's before anything is written.
    abstract_batch = setup.abstract_batch(batches.max_shape, batches.keys)
    check_memory(step_fn.precompile(abstract_params, abstract_opt, abstract_batch), config)
    return step_fn, opt_sh, abstract_params, abstract_opt


def _record_config(workdir, config) -> None:
    """config.json: written for a new run; on a resume the model must match (`check_resume_config`)
    and changed run settings are recorded (one line, `config_history.jsonl`, config.json updated)."""
    ckpt_lib.check_resume_config(workdir, config)
    if jax.process_index() != 0:
        return
    file = storage.path(workdir) / ckpt_lib.CONFIG_FILE
    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    new = config.to_dict()
    if not file.is_file():
        storage.write_json_atomic(file, new)
        return
    old = storage.read_json(file)
    changes = {k: [v, w] for k, (v, w) in _flat_diff(old, json.loads(json.dumps(new))).items()}
    if not changes:
        return
    _log(
        "zoo: resuming with changed settings (recorded in config_history.jsonl): "
        + ", ".join(f"{k} {v!r} -> {w!r}" for k, (v, w) in sorted(changes.items()))
    )
    history = storage.path(workdir) / "config_history.jsonl"
    lines = history.read_text() if history.exists() else ""
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": changes}
    storage.write_text_atomic(history, lines + json.dumps(entry) + "\n")
    storage.write_json_atomic(file, new)


def _flat_diff(a: dict, b: dict, prefix: str = "") -> dict:
    out = {}
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out.update(_flat_diff(x, y, f"{prefix}{k}."))
        elif x != y:
            out[f"{prefix}{k}"] = (x, y)
    return out


class _Sigterm:
    """Notes a SIGTERM (from the start of `train`, compiling included) for the loop, which acts on it
    after its next step: a checkpoint, then a clean exit."""

    def __init__(self):
        self.term = False
        self.previous = None

    def __enter__(self) -> _Sigterm:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        self.term = True

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


class _Loop:
    """The training loop proper: steps, logging, checkpoints, the non-finite policy, SIGTERM."""

    def __init__(
        self, config, setup: Setup, step_fn, batches, checkpointer, workdir, start: int, progress: bool, sigterm
    ):
        self.config, self.setup, self.step_fn, self.batches = config, setup, step_fn, batches
        self.checkpointer, self.workdir, self.start = checkpointer, workdir, start
        self.writer = storage.MetricsWriter(workdir, resume_at=start)
        self.vocab = registry.config_from_run(config).vocab_size
        self.bar = None
        if progress and jax.process_index() == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=config.train.steps,
                initial=start,
                desc=f"train {config.model_name}",
                unit="step",
                dynamic_ncols=True,
            )
        self.lr = optim.lr_schedule(
            config.optim.lr,
            config.optim.warmup_steps * setup.tokens_per_step,
            config.train.steps * setup.tokens_per_step,
            config.optim.min_lr_ratio,
            setup.tokens_per_step,
        )
        self.unchecked: list[tuple[int, int, dict]] = []  # (step, seq_len, device metrics) not yet checked
        self.consecutive = self.nonfinite_total = self.rollbacks = 0
        self.first_bad: int | None = None  # the run's first non-finite step
        self.sigterm = sigterm
        self.profiling = False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.profiling:
            jax.profiler.stop_trace()
        self.writer.close()
        self.checkpointer.close()

    def _stop_requested(self) -> bool:
        """SIGTERM on any process stops every process at the same step (a tiny collective when several)."""
        if jax.process_count() == 1:
            return self.sigterm.term
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.sigterm.term))))

    def _check_guard_flags(self, step: int) -> None:
        """Reads the non-finite guard flags of the steps not yet checked and applies the policy."""
        flags = jax.device_get([(m["nonfinite"], m["bad_grads"]) for _, _, m in self.unchecked])
        for (s, seq_len, _), (bad, groups) in zip(self.unchecked, flags):
            if not bad:
                self.consecutive = 0
                continue
            self.consecutive += 1
            self.nonfinite_total += 1
            if self.first_bad is None:  # the checkpoints before it are never rotated out
                self.first_bad = s
                self.checkpointer.protect_before(s)
            names = [n for n, g in zip(self.setup.view.names, groups) if g]
            where = f"step {s} (sequence length {seq_len}): non-finite loss or gradient" + (
                f", first in {names[0]}" if names else " (the loss; every gradient is finite)"
            )
            policy = self.config.train.on_nonfinite
            if policy == "stop" or self.consecutive > self.config.train.max_nonfinite:
                raise NonFinite(
                    f"{where}; the update was skipped and training stopped (train.on_nonfinite="
                    f"{policy}, {self.consecutive} in a row, limit train.max_nonfinite="
                    f"{self.config.train.max_nonfinite}); {self._resume_hint()}"
                )
            if policy == "rollback":
                self.unchecked = []
                raise _Rollback(where)
            _log(f"zoo: {where}; the update was skipped (train.on_nonfinite=skip)")
        self.unchecked = []

    def _resume_hint(self) -> str:
        """Which checkpoint a rerun resumes from, and the last one written before the divergence."""
        self.checkpointer.wait()
        steps = self.checkpointer.all_steps()
        if not steps:
            return "there is no checkpoint yet, so a rerun starts from step 0"
        before = [s for s in steps if s < self.first_bad]
        if before and before[-1] == steps[-1]:
            return (
                f"the last checkpoint is step {steps[-1]}, written before the first non-finite step "
                f"({self.first_bad}); change the settings (e.g. a lower optim.lr) and rerun to resume from it"
            )
        good = f"step {before[-1]}" if before else "none"
        return (
            f"a rerun resumes from the last checkpoint, step {steps[-1]}; the last checkpoint before the "
            f"first non-finite step ({self.first_bad}) is {good}"
        )

    def run(self, params, opt_state, stop_after: int | None) -> dict:
        config, total = self.config, self.config.train.steps
        step, last = self.start, {}
        t0, tokens_since = time.perf_counter(), 0
        profile = list(config.train.profile_steps)
        while step < total:
            if profile and step + 1 == profile[0] and jax.process_index() == 0:
                jax.profiler.start_trace(str(storage.path(self.workdir) / "profile"))
                self.profiling = True
            host_batch = next(self.batches)
            check_vocab(host_batch, self.vocab, f"data.source={config.data.source!r}")
            batch = global_batch(host_batch, self.setup.mesh)
            params, opt_state, metrics = self.step_fn(params, opt_state, batch)
            step += 1
            seq_len = int(batch["inputs"].shape[1])
            self.unchecked.append((step, seq_len, metrics))
            tokens_since += int(np.prod(batch["inputs"].shape))
            if self.profiling and step == profile[1]:
                jax.block_until_ready(metrics)
                jax.profiler.stop_trace()
                self.profiling = False
                where = storage.path(self.workdir) / "profile"
                _log(f"zoo: profile of steps {profile[0]}..{profile[1]} written to {where}")
            log_now = step % config.train.log_every == 0 or step == total
            save_now = step % config.train.checkpoint_every == 0 or step == total
            stop = self._stop_requested()
            if log_now or save_now or stop:
                try:
                    self._check_guard_flags(step)
                except _Rollback as e:
                    step, params, opt_state = self._rollback(str(e), step)
                    continue
            if log_now:
                now = time.perf_counter()
                last = {k: float(v) for k, v in metrics.items() if k in ("loss", "accuracy", "grad_norm")}
                last.update(
                    tokens_per_sec=tokens_since / (now - t0),
                    lr=float(self.lr(step - 1)),
                    seq_len=seq_len,
                    nonfinite_steps=self.nonfinite_total,
                )
                t0, tokens_since = now, 0
                self.writer.write(step, last)
                if self.bar is not None:
                    self.bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.3f}")
            if self.bar is not None:
                self.bar.update(1)
            if stop_after is not None and step >= stop_after:
                self.checkpointer.wait()
                return {"train": last, "step": step}
            saved = False
            if (save_now or stop) and self.consecutive:
                # Updates are being skipped: the state may be collapsing, so no checkpoint replaces a good one.
                _log(f"zoo: no checkpoint at step {step}: its update was skipped (non-finite)")
            elif save_now or stop:
                self._save(step, params, opt_state)
                saved = True
            if stop:
                self.checkpointer.wait()
                what = (
                    "checkpoint saved"
                    if saved
                    else f"no checkpoint (non-finite), last is step {self.checkpointer.latest_step()}"
                )
                _log(f"zoo: stopped by SIGTERM at step {step}; {what}, rerun the same command to resume")
                return {"train": last, "step": step, "preempted": True}
        self.checkpointer.wait()
        return {"train": last, "step": step}

    def _save(self, step: int, params, opt_state) -> None:
        data_states = gather_data_states(self.batches.get_state())
        meta = {"step": step, "model_name": self.config.model_name, "process_count": jax.process_count()}
        self.checkpointer.save(step, params, opt_state, data_states, meta)
        self.writer.flush()

    def _rollback(self, where: str, step: int):
        """Back to the newest good checkpoint; the data stream goes on (the failing batches are not
        replayed), so the run continues on new data from the checkpoint's parameters."""
        self.rollbacks += 1
        if self.rollbacks > self.config.train.max_nonfinite:
            raise NonFinite(
                f"{where}; {self.rollbacks - 1} rollbacks did not help (train.max_nonfinite="
                f"{self.config.train.max_nonfinite})"
            )
        self.checkpointer.wait()
        back, restored = self.checkpointer.restore_latest(*self.checkpointer.targets)
        if restored is None:
            raise NonFinite(f"{where}; there is no checkpoint to roll back to (train.on_nonfinite=rollback)")
        _log(f"zoo: {where}; rolled back to step {back} (train.on_nonfinite=rollback), the data stream continues")
        self.consecutive = 0
        return back, restored["params"], restored["opt_state"]


class _Rollback(Exception):
    """Internal: the rollback policy asks the loop to return to the last checkpoint."""
