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
from zoo import io
from zoo.config import model_config
from zoo.data.pipeline import check_vocab, make_batches
from zoo.data.pipeline import tokens_per_step as data_tokens_per_step
from zoo.models import registry
from zoo.models.params import ParamView
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
    cfg = model_config(config)
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
    abstract = nnx.eval_shape(lambda: cls(model_config(config), rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    return sharding.param_shardings(ParamView(abstract), mesh)


def make_train_step(setup: Setup, opt_sh) -> Callable:
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
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        metrics = {
            "loss": stats["loss_sum"] / jnp.maximum(stats["loss_weight"], 1.0),
            "accuracy": stats["correct"] / jnp.maximum(stats["answers"], 1.0),
            "grad_norm": optax.global_norm(grads),
        }
        return params, opt_state, metrics

    batch_sh = sharding.batch_sharding(setup.mesh, 2)
    jitted = jax.jit(
        step,
        in_shardings=(setup.param_shardings, opt_sh, batch_sh),
        out_shardings=(setup.param_shardings, opt_sh, None),
        donate_argnums=(0, 1),
    )

    def run(params, opt_state, batch):
        with jax.set_mesh(setup.mesh):  # the kernels see the mesh while tracing (shard_map)
            return jitted(params, opt_state, batch)

    run.lower = lambda *a: _lower_under_mesh(jitted, setup.mesh, *a)
    return run


def _lower_under_mesh(jitted, mesh, *args):
    with jax.set_mesh(mesh):
        return jitted.lower(*args)


def initial_params(setup: Setup, source: str) -> dict:
    """Parameters to start training from: a model directory (`zoo convert`, pretrained weights) or
    another run's work directory (its latest checkpoint), in this run's layout and shardings."""
    is_model_dir = (io.path(source) / ckpt_lib.MODEL_FILE).is_file()
    model = (
        ckpt_lib.load_pretrained(source, **_layout(setup))
        if is_model_dir
        else ckpt_lib.load_model(source, **_layout(setup))
    )[0]
    params = ParamView(model).flat(model)
    ckpt_lib.check_same_tree(params, setup.view.shapes, f"train.init_from={source!r} vs {setup.config.model_name}")
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


def train(
    config: ml_collections.ConfigDict, workdir: str, *, progress: bool = True, stop_after: int | None = None
) -> dict:
    """Trains (or resumes) the run in `workdir`; returns {"train": last logged metrics, "step"}.

    Args:
      stop_after: stop after this global step without a final checkpoint (tests simulate preemption).
    """
    sharding.maybe_initialize_distributed()
    # Everything that can fail on user input is checked before the work directory is touched.
    setup = make_setup(config)
    batches = make_batches(config.data, "train", process_index=jax.process_index(), process_count=jax.process_count())
    vocab = model_config(config).vocab_size
    initial_state = batches.get_state()
    check_vocab(next(batches), vocab, f"data.source={config.data.source!r}")  # peek, then rewind
    batches.set_state(initial_state)
    ckpt_lib.check_resume_config(workdir, config)

    if jax.process_index() == 0:
        io.path(workdir).mkdir(parents=True, exist_ok=True)
        if not (io.path(workdir) / ckpt_lib.CONFIG_FILE).is_file():
            io.write_json_atomic(io.path(workdir) / ckpt_lib.CONFIG_FILE, config.to_dict())
    checkpointer = ckpt_lib.Checkpointer(workdir, keep=config.train.keep_checkpoints)  # all processes wait here

    abstract_params = {
        n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=setup.param_shardings[n])
        for n, s in setup.view.shapes.items()
    }
    abstract_opt = jax.eval_shape(setup.tx.init, abstract_params)
    opt_sh = setup.opt_shardings(abstract_opt)
    start = checkpointer.latest_step()
    if start is None and config.train.init_from:
        params = initial_params(setup, config.train.init_from)
        opt_state = jax.jit(setup.tx.init, out_shardings=opt_sh)(params)
        start = 0
    elif start is None:
        params = setup.init_params()
        opt_state = jax.jit(setup.tx.init, out_shardings=opt_sh)(params)
        start = 0
    else:
        target_opt = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_opt, opt_sh)
        restored = checkpointer.restore(start, abstract_params, target_opt)
        params, opt_state = restored["params"], restored["opt_state"]
        batches.set_state(host_data_state(restored["data"], config.data.mode, jax.process_index(), jax.process_count()))
    step_fn = make_train_step(setup, opt_sh)

    writer = io.MetricsWriter(workdir)
    total = config.train.steps
    bar = None
    if progress and jax.process_index() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc=f"train {config.model_name}", unit="step", dynamic_ncols=True)
    last = {}
    t0, tokens_since = time.perf_counter(), 0
    lr = optim.lr_schedule(
        config.optim.lr,
        config.optim.warmup_steps * setup.tokens_per_step,
        total * setup.tokens_per_step,
        config.optim.min_lr_ratio,
        setup.tokens_per_step,
    )
    step = start
    try:
        while step < total:
            host_batch = next(batches)
            check_vocab(host_batch, vocab, f"data.source={config.data.source!r}")
            batch = global_batch(host_batch, setup.mesh)
            params, opt_state, metrics = step_fn(params, opt_state, batch)
            step += 1
            tokens_since += int(np.prod(batch["inputs"].shape))
            if step % config.train.log_every == 0 or step == total:
                now = time.perf_counter()
                last = {k: float(v) for k, v in metrics.items()}
                last.update(
                    tokens_per_sec=tokens_since / (now - t0),
                    lr=float(lr(step - 1)),
                    seq_len=int(batch["inputs"].shape[1]),
                )
                t0, tokens_since = now, 0
                writer.write(step, last)
                if bar is not None:
                    bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.3f}")
            if bar is not None:
                bar.update(1)
            if stop_after is not None and step >= stop_after:
                checkpointer.wait()
                return {"train": last, "step": step}
            if step % config.train.checkpoint_every == 0 or step == total:
                data_states = gather_data_states(batches.get_state())
                meta = {"step": step, "model_name": config.model_name, "process_count": jax.process_count()}
                checkpointer.save(step, params, opt_state, data_states, meta)
                writer.flush()
        checkpointer.wait()
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        checkpointer.close()
    return {"train": last, "step": step}
