"""One spelling of "which implementation" for every op in `pallas_kernels` and every model option.

    implementation: Implementation = "auto"     # the default everywhere
    impl = resolve(implementation)              # "reference" | "xla" | "pallas"
    interpret = resolve_interpret(impl, interpret)

"auto" picks the Pallas kernels on TPU and GPU and the pure-JAX "xla" path on CPU (where Pallas only
runs interpreted). "reference" is each op's slow, exact oracle. `interpret=None` (the default of every
op) interprets the Pallas kernels exactly when they would otherwise fail to run: on CPU.
"""

from __future__ import annotations

from typing import Literal, get_args

import jax

Implementation = Literal["auto", "reference", "xla", "pallas"]
IMPLEMENTATIONS: tuple[str, ...] = get_args(Implementation)


def accelerator() -> bool:
    """True when the default backend compiles Pallas kernels (TPU or GPU)."""
    return jax.default_backend() in ("tpu", "gpu")


def resolve(implementation: str) -> str:
    """The concrete implementation ("reference", "xla" or "pallas") that `implementation` names.

    Raises:
        ValueError: for anything but one of `IMPLEMENTATIONS`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"implementation={implementation!r} is not one of {IMPLEMENTATIONS}; "
            "'auto' picks pallas on TPU/GPU and xla on CPU."
        )
    if implementation == "auto":
        return "pallas" if accelerator() else "xla"
    return implementation


def resolve_interpret(impl: str, interpret=None):
    """`interpret` for a Pallas call: None means interpret exactly when running on CPU."""
    if interpret is None:
        return impl == "pallas" and not accelerator()
    return interpret
