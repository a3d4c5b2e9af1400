"""The companion SSM kernel (SpaceTime): reference, XLA paths and the public `api`."""

from pallas_kernels.companion.api import (
    KERNEL_METHODS,
    closed_loop_rows,
    companion_kernel,
    companion_matrix,
    companion_powers,
)

__all__ = ["KERNEL_METHODS", "closed_loop_rows", "companion_kernel", "companion_matrix", "companion_powers"]
