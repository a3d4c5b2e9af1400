"""SSD (Mamba-2 state space duality) op: `ssd` for sequences, `ssd_step` for decoding."""

from pallas_kernels.ssd.api import IMPLEMENTATIONS, ssd, ssd_step

__all__ = ["IMPLEMENTATIONS", "ssd", "ssd_step"]
