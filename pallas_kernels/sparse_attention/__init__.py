"""Block-sparse attention (listed key blocks + sliding window + sinks) and HiP block search."""

from pallas_kernels.sparse_attention.api import sparse_attention
from pallas_kernels.sparse_attention.hip import (
    hip_block_indices,
    hip_decode_block_indices,
    hip_search,
)

__all__ = ["hip_block_indices", "hip_decode_block_indices", "hip_search", "sparse_attention"]
