"""Long-context evaluations of any zoo language model.

- `passkey_grid`: exact-match retrieval of the 5-digit key for every (length, depth) pair.
- `answer_accuracy_by_length`: answer accuracy of a synthetic task at several lengths.
- `loss_by_position`: mean next-token loss at each position of sequences of one length, so the
  loss beyond the training length is visible.
Exact match under teacher forcing equals greedy decoding's exact match: if every answer digit is
the argmax given the true previous digits, greedy decoding emits exactly those digits.

The model's parameters may live on one device or be sharded over a mesh that spans several
processes (a multi-process run): the inputs are then placed replicated on that mesh, the forward
runs under it, and the per-token results come back replicated, so every process computes the same
numbers without fetching an array it does not hold. Only [B, T] arrays (loss, prediction) leave
the devices, never the logits [B, T, V].
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from zoo.data.pipeline import DOCUMENT_SOURCES, example_source, to_model_inputs


@functools.partial(nnx.jit, static_argnames="replicated")
def _token_stats(model, inputs, targets, replicated: NamedSharding | None = None):
    logits = model(inputs).astype(jnp.float32)  # [B, T, V]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, T]
    pred = jnp.argmax(logits, -1).astype(jnp.int32)  # [B, T]
    if replicated is not None:
        ce, pred = jax.lax.with_sharding_constraint((ce, pred), replicated)
    return ce, pred


def model_mesh(model) -> jax.sharding.Mesh | None:
    """The mesh the model's parameters are sharded over (None: they live on one device)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def token_stats(model, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Next-token loss (fp32) and argmax prediction (int32), both [B, T], for token ids [B, T].

    Every process of a multi-process job must call this with the same arrays; each gets the result.
    """
    mesh = model_mesh(model)
    if mesh is None:
        ce, pred = _token_stats(model, jnp.asarray(inputs), jnp.asarray(targets))
    else:
        replicated = NamedSharding(mesh, P())
        x, y = (jax.make_array_from_callback(a.shape, replicated, lambda idx, a=a: a[idx]) for a in (inputs, targets))
        with jax.set_mesh(mesh):  # the kernels see the mesh while tracing, as in training
            ce, pred = _token_stats(model, x, y, replicated)
    return np.asarray(ce), np.asarray(pred)  # replicated: every process holds all of it


def _batches(source, n: int, batch_size: int):
    for start in range(0, n, batch_size):
        items = [to_model_inputs(source[i]) for i in range(start, min(start + batch_size, n))]
        yield {k: np.stack([it[k] for it in items]) for k in items[0]}


def answer_stats(model, source, n: int, batch_size: int) -> dict[str, float]:
    """Per-answer-token accuracy, exact match of all answer tokens, and mean answer loss."""
    tok_correct = tok_total = exact = loss_sum = 0.0
    for b in _batches(source, n, batch_size):
        ce, pred = token_stats(model, b["inputs"], b["targets"])  # [B, T] each
        correct = (pred == b["targets"]) | (b["answer_mask"] == 0)
        tok_correct += float(((pred == b["targets"]) * b["answer_mask"]).sum())
        tok_total += float(b["answer_mask"].sum())
        exact += float(correct.all(-1).sum())
        loss_sum += float((ce * b["answer_mask"]).sum())
    return {"token_accuracy": tok_correct / tok_total, "exact_match": exact / n, "answer_loss": loss_sum / tok_total}


def passkey_grid(model, data: Any, lengths, depths, samples: int, batch_size: int) -> dict:
    """{"lengths", "depths", "exact_match" [len x depth], "token_accuracy" [len x depth]}."""
    em = np.zeros((len(lengths), len(depths)))
    ta = np.zeros_like(em)
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            s = answer_stats(
                model, example_source(data, "validation", int(length), depth=float(depth)), samples, batch_size
            )
            em[i, j], ta[i, j] = s["exact_match"], s["token_accuracy"]
    return {
        "lengths": list(map(int, lengths)),
        "depths": list(map(float, depths)),
        "exact_match": em.tolist(),
        "token_accuracy": ta.tolist(),
    }


def answer_accuracy_by_length(model, data: Any, lengths, samples: int, batch_size: int) -> dict:
    """Answer accuracy of `model` on `samples` validation examples of `data` at each length, keyed by length."""
    rows = {
        int(length): answer_stats(model, example_source(data, "validation", int(length)), samples, batch_size)
        for length in lengths
    }
    return {"lengths": list(rows), **{k: [rows[length][k] for length in rows] for k in next(iter(rows.values()))}}


def loss_by_position(model, data: Any, length: int, samples: int, batch_size: int, bins: int = 32) -> dict:
    """Mean loss over the loss-mask at each position, averaged into `bins` equal position bins.

    Over `samples` sequences, or all the validation split holds when it holds fewer (a document
    corpus of a few documents).
    """
    try:
        source = example_source(data, "validation", int(length))
    except ValueError as e:
        if data.source not in DOCUMENT_SOURCES:
            raise
        raise ValueError(
            f"the validation split of data.path {data.path!r} is too small to evaluate at length {length} ({e}); "
            "lower eval.lengths, or give it more documents (zoo data prepare --validation-fraction, --splits)"
        ) from e
    samples = min(int(samples), len(source))
    total = np.zeros(length)
    weight = np.zeros(length)
    for b in _batches(source, samples, batch_size):
        ce, _ = token_stats(model, b["inputs"], b["targets"])  # [B, T]
        total += (ce * b["loss_mask"]).sum(0)
        weight += b["loss_mask"].sum(0)
    edges = np.linspace(0, length, min(bins, length) + 1).astype(int)
    centers, losses = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        if weight[lo:hi].sum() > 0:
            centers.append(float((lo + hi - 1) / 2))
            losses.append(float(total[lo:hi].sum() / weight[lo:hi].sum()))
    return {"length": int(length), "position": centers, "loss": losses}
