"""Cauchy and log-Vandermonde products for S4 / S4D kernels (reference, xla, pallas)."""

from .api import cauchy, vandermonde
from .pallas_cauchy import BlockSizes

__all__ = ["cauchy", "vandermonde", "BlockSizes"]
