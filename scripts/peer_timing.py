"""Timing of the PyTorch peers the benchmark scripts measure beside the zoo (torch is not a zoo
dependency: only these scripts import it, and only when a peer runs)."""

from __future__ import annotations

import statistics
from collections.abc import Callable


def torch_cuda_time(fn: Callable, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of the PyTorch CUDA call `fn()`, timed with CUDA events (for baselines)."""
    import torch  # imported here only: the peers are optional

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
