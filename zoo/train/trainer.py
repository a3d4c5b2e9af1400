"""The training loop: one jitted, explicitly sharded step over (params, opt_state, batch).

    params, opt_state, metrics = step(params, opt_state, batch)

`params` is a flat dict (see `zoo.models.params`) sharded by the logical-axis rules of
`zoo.train.sharding`; the optimizer state follows its parameters; the batch is split over
data x fsdp. Re-running the same command resumes from the latest checkpoint: parameters,
optimizer state, data-iterator state and step are restored, so the continued run is identical
to an uninterrupted one.

Several processes (hosts) run the same loop (`zoo.train.sharding.maybe_initialize_distributed`):
each reads only its own shard of every global batch, every process takes part in each checkpoint
save and restore (Orbax coordinates them), and only process 0 writes the work directory's own files
(config.json, metrics). A checkpoint restores into the current process count's shardings, so a run
can resume on another number of processes with the same global batch (fixed-length and
decomposition modes; packed mode packs each host's own documents and resumes on as many processes
as it was saved with).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from zoo import checkpoint as ckpt_lib
from zoo import io, model_dir
from zoo.config import validate
from zoo.data.pipeline import DOCUMENT_SOURCES, PACKED_KEYS, check_vocab, make_batches
from zoo.data.pipeline import tokens_per_step as data_tokens_per_step
from zoo.models import registry
from zoo.models.params import ParamView, check_same_tree
from zoo.train import optim, sharding


def lm_loss(logits: jax.Array, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Masked next-token cross-entropy (fp32) and answer accuracy."""
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
    lm, am = batch["loss_mask"], batch["answer_mask"]
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    stats = {
        "loss_sum": jnp.sum(ce * lm),
        "loss_weight": jnp.sum(lm),
        "correct": jnp.sum(correct * am),
        "answers": jnp.sum(am),
    }
    return stats["loss_sum"] / jnp.maximum(stats["loss_weight"], 1.0), stats


@dataclasses.dataclass
class Setup:
    """Everything derived from a run config before any state exists."""

    config: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    view: ParamView
    param_shardings: dict[str, NamedSharding]
    tx: optax.GradientTransformation
    init_params: Callable[[], dict]
    tokens_per_step: int

    def opt_shardings(self, abstract_opt_state) -> Any:
        """Each optimizer leaf keyed by a parameter name gets that parameter's sharding."""
        replicated = NamedSharding(self.mesh, P())

        def pick(path, leaf):
            for k in reversed(path):
                name = getattr(k, "key", None)
                if name in self.param_shardings:
                    return self.param_shardings[name]
            return replicated

        return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def make_setup(config: ml_collections.ConfigDict) -> Setup:
    """Builds a run's model (abstractly), mesh, parameter shardings, optimiser and jitted initialiser."""
    cfg = registry.config_from_run(config)
    cls = registry.model_class(config.model_name)
    kind = registry.model_kind(config.model_name)
    if kind != "lm":
        raise ValueError(
            f"model {config.model_name!r} is a {kind}, not a language model; `zoo train` trains "
            "language models (see the model's card in docs/models/)"
        )
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    seed = config.train.seed
    abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(seed)))
    view = ParamView(abstract)
    param_sh = sharding.param_shardings(view, mesh)
    labels = view.tree(lambda n, meta, s: optim.param_label(meta, len(s.shape)))
    tokens_per_step = data_tokens_per_step(config.data)
    tx = optim.make_optimizer(config.optim, config.train.steps, tokens_per_step, labels)
    init = jax.jit(lambda: view.flat(cls(cfg, rngs=nnx.Rngs(seed))), out_shardings=param_sh)
    return Setup(config, mesh, view, param_sh, tx, init, tokens_per_step)


def run_param_shardings(config: ml_collections.ConfigDict) -> dict[str, NamedSharding]:
    """The run's parameter shardings on the current devices (its mesh and logical-axis rules), keyed
    by flat names in the run's layer layout: what evaluation of a multi-process run restores into."""
    cls = registry.model_class(config.model_name)
    abstract = nnx.eval_shape(lambda: cls(registry.config_from_run(config), rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    return sharding.param_shardings(ParamView(abstract), mesh)


def make_train_step(setup: Setup, opt_sh) -> Callable:
    """The jitted training step (params, opt_state, batch) -> (params, opt_state, metrics)."""
    view, tx, accum = setup.view, setup.tx, setup.config.train.grad_accum

    def loss_fn(params, batch):
        # Packed rows carry document ids and positions: no token sees another document.
        logits = view.merge(params)(
            batch["inputs"], segment_ids=batch.get("segment_ids"), positions=batch.get("positions")
        )
        return lm_loss(logits, batch)

    def step(params, opt_state, batch):
        grad_fn = jax.grad(loss_fn, has_aux=True)
        if accum == 1:
            grads, stats = grad_fn(params, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def body(carry, mb):
                g, s = grad_fn(params, mb)
                w = s["loss_weight"]  # weight each micro-batch by its loss tokens
                return jax.tree.map(jnp.add, carry, (jax.tree.map(lambda x: x * w, g), s)), None

            zeros = (
                jax.tree.map(jnp.zeros_like, params),
                {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "loss_weight", "correct", "answers")},
            )
            (grads, stats), _ = jax.lax.scan(body, zeros, micro)
            grads = jax.tree.map(lambda g: g / jnp.maximum(stats["loss_weight"], 1.0), grads)
        loss = stats["loss_sum"] / jnp.maximum(stats["loss_weight"], 1.0)
        grad_norm = optax.global_norm(grads)
        # The non-finite guard: a NaN/Inf loss or gradient skips the update (parameters and optimizer
        # state unchanged); the host learns it from the metrics when it next looks, no sync per step.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params, opt_state = jax.tree.map(keep, new_params, params), jax.tree.map(keep, new_opt, opt_state)
        metrics = {
            "loss": loss,
            "accuracy": stats["correct"] / jnp.maximum(stats["answers"], 1.0),
            "grad_norm": grad_norm,
            "nonfinite": ~finite,
            # per parameter (in `view.names` order): its gradient is not finite
            "bad_grads": jnp.stack([~jnp.all(jnp.isfinite(grads[n])) for n in view.names]),
        }
        return params, opt_state, metrics

    batch_sh = sharding.batch_sharding(setup.mesh, 2)
    jitted = jax.jit(
        step,
        in_shardings=(setup.param_shardings, opt_sh, batch_sh),
        out_shardings=(setup.param_shardings, opt_sh, None),
        donate_argnums=(0, 1),
    )

    compiled = {}  # batch shape -> ahead-of-time compiled step (`precompile`)

    def run(params, opt_state, batch):
        exe = compiled.get(batch["inputs"].shape)
        if exe is not None:
            return exe(params, opt_state, batch)
        with jax.set_mesh(setup.mesh):  # the kernels see the mesh while tracing (shard_map)
            return jitted(params, opt_state, batch)

    def precompile(params, opt_state, batch):
        """Compiles the step for these (abstract) inputs; later calls with this batch shape use it."""
        exe = _lower_under_mesh(jitted, setup.mesh, params, opt_state, batch).compile()
        compiled[batch["inputs"].shape] = exe
        return exe

    run.lower = lambda *a: _lower_under_mesh(jitted, setup.mesh, *a)
    run.precompile = precompile
    return run


def _lower_under_mesh(jitted, mesh, *args):
    with jax.set_mesh(mesh):
        return jitted.lower(*args)


def initial_params(setup: Setup, source: str) -> dict:
    """Parameters to start training from: a model directory (`zoo convert`, pretrained weights) or
    another run's work directory (its latest checkpoint), in this run's layout and shardings."""
    is_model_dir = (io.path(source) / model_dir.MODEL_FILE).is_file()
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


def global_batch(batch: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
    """Per-host numpy batch -> global jax arrays split over data x fsdp."""
    sh = sharding.batch_sharding(mesh, 2)
    dp = sharding.data_parallel_size(mesh)
    n = batch["inputs"].shape[0] * jax.process_count()
    if n % dp:
        raise ValueError(
            f"global batch {n} is not divisible by data x fsdp = {dp}; change data.batch_size "
            "(or data.tokens_per_step) or the mesh"
        )
    return {k: jax.make_array_from_process_local_data(sh, v) for k, v in batch.items()}


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
    fresh = not (io.path(workdir) / "checkpoints").exists() or not list((io.path(workdir) / "checkpoints").iterdir())
    start_from = initial_params(setup, config.train.init_from) if config.train.init_from and fresh else None

    with io.WorkdirLock(workdir):
        _record_config(workdir, config)
        checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints, log=_log)
        checkpointer.bind(abstract_params, abstract_opt)
        had = checkpointer.all_steps()
        start, restored = checkpointer.restore_latest(abstract_params, abstract_opt)
        if restored is None and had:
            _log(
                f"zoo: no usable checkpoint: every step ({', '.join(map(str, had))}) is damaged and was moved "
                f"to {io.path(workdir) / 'damaged'}; training starts again from step 0"
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
    sizes = batches.schedule.batch_sizes.values() if config.data.mode == "decomposition" else [config.data.batch_size]
    for b in sizes:
        if b % dp:
            raise ValueError(
                f"a global batch of {b} sequences is not divisible by the mesh's data x fsdp = {dp}; "
                "change data.batch_size (or data.tokens_per_step) or the mesh"
            )
    io.check_writable_dir(workdir)
    ckpt_lib.check_resume_config(workdir, config)  # a work dir of another run (or not a zoo run) is refused
    if config.train.init_from:
        src = io.path(config.train.init_from)
        if not (src / model_dir.MODEL_FILE).is_file() and not (src / ckpt_lib.CONFIG_FILE).is_file():
            raise ValueError(
                f"train.init_from={config.train.init_from!r} is neither a model directory nor a work directory"
            )
    abstract_params = {
        n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=setup.param_shardings[n])
        for n, s in setup.view.shapes.items()
    }
    abstract_opt = jax.eval_shape(setup.tx.init, abstract_params)
    opt_sh = setup.opt_shardings(abstract_opt)
    abstract_opt = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_opt, opt_sh)
    step_fn = make_train_step(setup, opt_sh)
    # The largest step (fixed: the one shape; decomposition: the longest bucket) compiled now, and
    # its memory compared with the device's before anything is written.
    if config.data.mode == "decomposition":
        k = max(batches.schedule.batch_sizes)
        shape = (batches.schedule.batch_size(k), 1 << k)
    else:
        shape = (config.data.batch_size, config.data.seq_len)
    bsh = sharding.batch_sharding(setup.mesh, 2)
    keys = PACKED_KEYS if config.data.mode == "packed" else PACKED_KEYS[:4]
    abstract_batch = {
        k: jax.ShapeDtypeStruct(shape, jnp.float32 if k.endswith("mask") else jnp.int32, sharding=bsh) for k in keys
    }
    check_memory(step_fn.precompile(abstract_params, abstract_opt, abstract_batch), config)
    return step_fn, opt_sh, abstract_params, abstract_opt


def compiled_memory(compiled) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled function (bytes), where the backend offers one."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 -- some backends do not implement it
        return None
    if m is None:
        return None
    fields = (
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "temp_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
    )
    out = {f: int(getattr(m, f, 0) or 0) for f in fields}
    out["peak_bytes"] = (
        out["argument_size_in_bytes"]
        + out["output_size_in_bytes"]
        + out["temp_size_in_bytes"]
        - out["alias_size_in_bytes"]
    )
    return out


def check_memory(compiled, config) -> None:
    """One clear error when the compiled step needs more memory than a device has (where known)."""
    need = (compiled_memory(compiled) or {}).get("peak_bytes")
    have = device_memory_bytes()
    if need is not None and have is not None and need > have:
        raise ValueError(
            f"the training step needs {need / 2**30:.1f} GiB per device but a device has {have / 2**30:.1f} GiB; "
            f"lower data.batch_size or data.seq_len (now {config.data.batch_size} x {config.data.seq_len}), set "
            "--config.model.remat=full, or add devices to the mesh"
        )


def check_memory_estimate(config) -> None:
    """One clear error, before anything is allocated or compiled, when a step's batch cannot fit: its
    fp32 logits and residual stream alone (B x T x (vocab + d_model) x 4 bytes per micro-batch of
    `train.grad_accum`, split over the devices) are a lower bound of the step's memory.
    `check_memory` compares the compiled step."""
    cfg = registry.config_from_run(config)
    tokens = data_tokens_per_step(config.data) // max(int(config.train.grad_accum), 1)
    devices = (
        config.mesh.data * config.mesh.fsdp if config.mesh.data > 0 and config.mesh.fsdp > 0 else jax.device_count()
    )
    need = tokens * (cfg.vocab_size + getattr(cfg, "d_model", 0)) * 4 // max(devices, 1)
    have = device_memory_bytes()
    if have is not None and need > have:
        raise ValueError(
            f"a (micro-)batch of {tokens:,} tokens needs at least {need / 2**30:.1f} GiB per device (its logits "
            f"alone) but a device has {have / 2**30:.1f} GiB; lower data.batch_size or data.seq_len (now "
            f"{config.data.batch_size} x {config.data.seq_len}), raise train.grad_accum or add devices to the mesh"
        )


def device_memory_bytes() -> int | None:
    """Memory of one local device: the accelerator's limit, or the available host RAM on CPU."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    if jax.default_backend() == "cpu":
        try:
            with open("/proc/meminfo") as f:
                info = dict(line.split(":", 1) for line in f)
            return int(info["MemAvailable"].split()[0]) * 1024
        except (OSError, KeyError, ValueError):
            return None
    return None


def _record_config(workdir, config) -> None:
    """config.json: written for a new run; on a resume the model must match (`check_resume_config`)
    and changed run settings are recorded (one line, `config_history.jsonl`, config.json updated)."""
    ckpt_lib.check_resume_config(workdir, config)
    if jax.process_index() != 0:
        return
    file = io.path(workdir) / ckpt_lib.CONFIG_FILE
    io.path(workdir).mkdir(parents=True, exist_ok=True)
    new = config.to_dict()
    if not file.is_file():
        io.write_json_atomic(file, new)
        return
    old = io.read_json(file)
    changes = {k: [v, w] for k, (v, w) in _flat_diff(old, json.loads(json.dumps(new))).items()}
    if not changes:
        return
    _log(
        "zoo: resuming with changed settings (recorded in config_history.jsonl): "
        + ", ".join(f"{k} {v!r} -> {w!r}" for k, (v, w) in sorted(changes.items()))
    )
    history = io.path(workdir) / "config_history.jsonl"
    lines = history.read_text() if history.exists() else ""
    entry = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changes": changes}
    io.write_text_atomic(history, lines + json.dumps(entry) + "\n")
    io.write_json_atomic(file, new)


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
        self.writer = io.MetricsWriter(workdir, resume_at=start)
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
                jax.profiler.start_trace(str(io.path(self.workdir) / "profile"))
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
                _log(f"zoo: profile of steps {profile[0]}..{profile[1]} written to {io.path(self.workdir) / 'profile'}")
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
