"""Parameters with logical axis names, a linear layer and a (tiable) embedding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]


def param(
    rngs: nnx.Rngs, init: Initializer, shape: tuple[int, ...], axes: tuple[str | None, ...], **metadata
) -> nnx.Param:
    """Creates an fp32 `nnx.Param` annotated with one logical axis name per dimension.

    `zoo.train.sharding` maps the logical names to mesh axes. Extra metadata: `wd=False` exempts the
    parameter from weight decay, `lr_group="ssm"` gives it the SSM learning rate.
    """
    if len(axes) != len(shape):
        raise ValueError(f"axes {axes} must name every dimension of shape {shape}")
    return nnx.Param(init(rngs.params(), shape, jnp.float32), axes=tuple(axes), **metadata)


class Linear(nnx.Module):
    """y = x W (+ b), W [in, out] stored in fp32 and applied in the compute dtype."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        use_bias: bool = False,
        init_std: float | None = None,
        dtype: str = "float32",
    ):
        std = init_std if init_std is not None else d_in**-0.5
        self.kernel = param(rngs, nnx.initializers.normal(std), (d_in, d_out), axes)
        self.bias = param(rngs, nnx.initializers.zeros, (d_out,), (axes[1],), wd=False) if use_bias else None
        self.dtype = jnp.dtype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding [V, D]; `attend` reuses it as the output projection (tied embeddings)."""

    def __init__(self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs, dtype: str = "float32"):
        self.embedding = param(rngs, nnx.initializers.normal(1.0), (vocab_size, d_model), ("vocab", "embed"))
        self.vocab_size = vocab_size
        self.dtype = jnp.dtype(dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """Logits x E^T in fp32: [..., D] -> [..., V]."""
        return jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T).astype(jnp.float32)


def lm_logits(x: jax.Array, embed: Embed, unembed: Linear | None, scale: float = 1.0) -> jax.Array:
    """The output head of a language model on normalised x [..., D]: scale * x E^T with tied
    embeddings (`unembed` None), else x W_out; fp32 logits [..., V]."""
    if unembed is None:
        return embed.attend(x) * scale
    return unembed(x).astype(jnp.float32)
