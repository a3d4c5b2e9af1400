"""SwiGLU feed-forward block (Shazeer, 2020): W_down(silu(x W_gate) * x W_up)."""

from __future__ import annotations

import jax
from flax import nnx

from zoo.layers.linear import Linear


class SwiGLU(nnx.Module):
    """The SwiGLU feed-forward block: down(silu(gate(x)) * up(x)), D -> d_ff -> D."""

    def __init__(
        self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, dtype: str = "float32", out_init_std: float | None = None
    ):
        self.gate = Linear(d_model, d_ff, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.up = Linear(d_model, d_ff, axes=("embed", "mlp"), rngs=rngs, dtype=dtype)
        self.down = Linear(d_ff, d_model, axes=("mlp", "embed"), rngs=rngs, dtype=dtype, init_std=out_init_std)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(nnx.silu(self.gate(x)) * self.up(x))
