"""A flat, string-keyed view of an NNX model's parameters.

The trainer is functional: it holds the parameters as `{"blocks/0/attn/wq/kernel": array, ...}`,
a plain dict that optax, Orbax and sharding trees all handle, and rebuilds the module inside the
jitted step with `merge`. Metadata (logical axes, weight-decay and LR groups) comes along.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


class ParamView:
    """Splits a (possibly abstract) model into graphdef + flat params, and merges them back."""

    def __init__(self, model: nnx.Module):
        self.graphdef, self.state, self.rest = nnx.split(model, nnx.Param, ...)
        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(self.state, is_leaf=_is_var)
        self.names = [_name(path) for path, _ in leaves]
        self.metadata = {n: dict(v.get_metadata()) for n, (_, v) in zip(self.names, leaves)}
        self.shapes = {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, (_, v) in zip(self.names, leaves)}
        for n, meta in self.metadata.items():
            if "axes" not in meta:
                raise ValueError(f"parameter {n!r} has no logical axes; create it with nnx.Param(..., axes=(...))")

    def flat(self, model: nnx.Module) -> dict[str, jax.Array]:
        state = nnx.state(model, nnx.Param)
        leaves = jax.tree_util.tree_leaves(state, is_leaf=_is_var)
        return {n: v[...] for n, v in zip(self.names, leaves)}

    def merge(self, params: dict[str, jax.Array]) -> nnx.Module:
        """The module with these parameter values (works on tracers inside jit)."""
        leaves = jax.tree_util.tree_leaves(self.state, is_leaf=_is_var)
        state = jax.tree_util.tree_unflatten(self.treedef, [v.replace(params[n]) for n, v in zip(self.names, leaves)])
        return nnx.merge(self.graphdef, state, self.rest)

    def tree(self, fn: Callable[[str, dict[str, Any], jax.ShapeDtypeStruct], Any]) -> dict[str, Any]:
        """{name: fn(name, metadata, shape)} for building sharding and label trees."""
        return {n: fn(n, self.metadata[n], self.shapes[n]) for n in self.names}
