"""A flat, string-keyed view of an NNX model's parameters.

The trainer is functional: it holds the parameters as `{"blocks/0/attn/wq/kernel": array, ...}`,
a plain dict that optax, Orbax and sharding trees all handle, and rebuilds the module inside the
jitted step with `merge`. Metadata (logical axes, weight-decay and LR groups) comes along.

Building a model from flat parameters: `abstract_model` (shapes only, nothing allocated),
`convert_layout` (looped <-> scanned layer stacks), `check_same_tree` and `model_with_params`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from zoo.models import registry
from zoo.models.base import to_looped, to_scanned


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


def abstract_model(model_name: str, cfg: Any) -> nnx.Module:
    """The model with abstract (shape-only) parameters: nothing is allocated."""
    cls = registry.model_class(model_name)
    return nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))


def _scan_period(model: nnx.Module) -> int:
    """The period of `model`'s scanned layer stack (1 for a model without one)."""
    return model.blocks.period if hasattr(model, "blocks") and hasattr(model.blocks, "period") else 1


def convert_layout(params: dict[str, Any], src: nnx.Module, dst: nnx.Module) -> dict[str, Any]:
    """Flat parameters of model `src`'s layer layout in `dst`'s layout (looped <-> scanned)."""
    src_scan = getattr(getattr(src, "blocks", None), "scan", False)
    dst_scan = getattr(getattr(dst, "blocks", None), "scan", False)
    if src_scan and not dst_scan:
        return to_looped(params, _scan_period(src))
    if dst_scan and not src_scan:
        return to_scanned(params, _scan_period(dst))
    return params


def model_with_params(model_name: str, cfg: Any, params: dict[str, Any], src_cfg: Any | None = None) -> nnx.Module:
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
