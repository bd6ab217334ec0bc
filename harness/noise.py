"""Paired, batch-independent noise: sample i of a cell depends only on (seed, i).

Each sample owns a torch.Generator seeded from (seed, i) through numpy's SeedSequence, as EDM's
generate.py keeps one generator per image. The initial noise is that generator's first draw; any
later draws (SDE steps, ancestral samplers) continue the same per-sample stream, so stochastic
samplers are batch-independent too.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Below this many numbers per draw, handing rows to other threads costs more than it saves.
PARALLEL_MIN_NUMBERS = 1 << 16
_pool: ThreadPoolExecutor | None = None


def _draw_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(thread_name_prefix="sample-noise")
    return _pool


def _forget_pool() -> None:  # a forked child does not inherit the pool's threads
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def _fill(rows) -> None:
    for row, generator in rows:
        row.normal_(generator=generator)


def sample_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class SampleNoise:
    """Per-sample generators for the samples `indices` of a cell seeded with `seed`."""

    def __init__(self, seed: int, indices, device: torch.device | str = "cpu"):
        self.indices = list(indices)
        self.device = torch.device(device)
        self.generators = [torch.Generator(device="cpu").manual_seed(sample_seed(seed, i)) for i in self.indices]

    def randn(self, shape: tuple[int, ...], dtype=torch.float64) -> torch.Tensor:
        """[len(indices), *shape] standard normal; drawn in float32 on CPU so every device and compute
        dtype sees the same numbers."""
        draws = torch.empty((len(self.generators), *shape), dtype=torch.float32)
        # Each row is filled in place by its own generator: the same numbers as torch.randn(shape,
        # generator=g), without a tensor per sample and a stack to copy them together.
        rows = list(zip(draws, self.generators))
        workers = min(torch.get_num_threads(), len(rows))
        if workers > 1 and draws.numel() >= PARALLEL_MIN_NUMBERS:
            # One generator draws serially, but the rows' generators are independent: split the rows
            # over torch's thread budget (torch releases the GIL while it draws). Every generator is
            # used by one thread only, so the numbers do not depend on the split.
            chunks = [rows[k::workers] for k in range(workers)]
            pending = [_draw_pool().submit(_fill, chunk) for chunk in chunks[1:]]
            _fill(chunks[0])
            for future in pending:
                future.result()
        else:
            _fill(rows)
        return draws.to(device=self.device, dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(tuple(x.shape[1:]), dtype=x.dtype)
