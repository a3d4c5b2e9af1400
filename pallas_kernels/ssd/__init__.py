"""SSD (Mamba-2 state space duality) op: `ssd` for sequences, `ssd_step` for decoding."""

from pallas_kernels.ssd.api import IMPLEMENTATIONS, Implementation, kernel_backend, ssd, ssd_pallas, ssd_step

__all__ = ["IMPLEMENTATIONS", "Implementation", "kernel_backend", "ssd", "ssd_pallas", "ssd_step"]
