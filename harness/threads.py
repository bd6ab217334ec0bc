"""CPU threads for a job: chosen from its share of the cores and the size of its work, not inherited.

torch starts with one intra-op thread per core. For small work that is slower, not faster: digits-ideal's
denoiser (two [250, 64] x [64, 1797] matmuls per call) sampled in 0.18 s with one thread and 1.2 s with
two on a 2-core machine (measured with the other core busy, as it is in a grid: each thread of an OpenMP
region waits for the slowest). A job's share is OMP_NUM_THREADS (Snakemake sets it to the rule's threads),
else the cores this process may run on.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

# Matmul/convolution FLOPs per network call below which one thread is fastest; above it one more thread per
# this much work, up to the job's share (measured: benchmarks/grid_efficiency.py prints the choice per cell).
FLOPS_PER_THREAD = 2e9


def job_threads() -> int:
    """The job's share of the cores."""
    value = os.environ.get("OMP_NUM_THREADS")
    if value and value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_for_work(flops_per_call: float) -> int:
    """Threads for work of this size: one below FLOPS_PER_THREAD, at most the job's share."""
    return max(1, min(job_threads(), int(flops_per_call // FLOPS_PER_THREAD) or 1))


@contextmanager
def use_threads(count: int | None):
    """torch's intra-op threads set to `count` (None: unchanged) for the block, then restored: a library call
    (a test, a notebook) keeps its own setting."""
    import torch

    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
