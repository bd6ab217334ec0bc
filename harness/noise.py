"""Paired, batch-independent noise: sample i of a cell depends only on (seed, i).

Each sample owns a torch.Generator seeded from (seed, i) through numpy's SeedSequence, as EDM's
generate.py keeps one generator per image. The initial noise is that generator's first draw; any
later draws (SDE steps, ancestral samplers) continue the same per-sample stream, so stochastic
samplers are batch-independent too.
"""

from __future__ import annotations

import numpy as np
import torch


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
        # each row filled in place by its own generator: the same numbers as torch.randn(shape,
        # generator=g), without a tensor per sample and a stack to copy them together
        for row, g in zip(draws, self.generators):
            row.normal_(generator=g)
        return draws.to(device=self.device, dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(tuple(x.shape[1:]), dtype=x.dtype)
