"""The training step: a run's `Setup` (model, mesh, shardings, optimiser) and the jitted step.

    params, opt_state, metrics = step(params, opt_state, batch)

`params` is a flat dict (see `zoo.models.params`) sharded by the logical-axis rules of
`zoo.train.sharding`; the optimizer state follows its parameters; the batch is split over
data x fsdp. A NaN/Inf loss or gradient skips the update (the loop in `zoo.train.trainer` reads
the flag).
"""

from __future__ import annotations

import dataclasses
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

from zoo.data.pipeline import BATCH_KEYS
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

    def abstract_state(self) -> tuple[dict[str, jax.ShapeDtypeStruct], Any, Any]:
        """(abstract parameters, abstract optimizer state, optimizer shardings): shapes, dtypes and
        shardings of the training state, nothing allocated (what a step is compiled on)."""
        params = {
            n: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.param_shardings[n])
            for n, s in self.view.shapes.items()
        }
        abstract_opt = jax.eval_shape(self.tx.init, params)
        opt_sh = self.opt_shardings(abstract_opt)
        abstract_opt = jax.tree.map(
            lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract_opt, opt_sh
        )
        return params, abstract_opt, opt_sh

    def abstract_batch(
        self, shape: tuple[int, int], keys: tuple[str, ...] = BATCH_KEYS
    ) -> dict[str, jax.ShapeDtypeStruct]:
        """An abstract global batch of `shape` [batch, length] with arrays `keys`, split over data x fsdp
        (masks float32, token ids and positions int32)."""
        bsh = sharding.batch_sharding(self.mesh, 2)
        return {
            k: jax.ShapeDtypeStruct(shape, jnp.float32 if k.endswith("mask") else jnp.int32, sharding=bsh) for k in keys
        }


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
