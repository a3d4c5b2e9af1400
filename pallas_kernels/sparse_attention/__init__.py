"""Block-sparse attention (listed key blocks + sliding window + sinks) and HiP block search."""

from pallas_kernels.sparse_attention.api import sparse_attention
from pallas_kernels.sparse_attention.hip import hip_block_indices

__all__ = ["sparse_attention", "hip_block_indices"]
