"""NFE audit: count what the sampler really asks of the network, per sample."""

from __future__ import annotations

import time

import torch

from harness import accounting
from harness.models.base import Denoiser


class CountingDenoiser(Denoiser):
    """Wraps a Denoiser and counts denoiser evaluations per sample row.

    `rows` counts D evaluations summed over rows; nfe_measured = rows / samples. The wrapped
    model counts raw network rows in `info.extra["network_rows"]` when it batches (classifier-free
    guidance evaluates a x2 batch for one D call). `network_s` is the wall time inside the calls (on CUDA
    synchronised, so it is the kernels' time, not their launch).
    """

    def __init__(self, inner: Denoiser):
        self.inner = inner
        self.info = inner.info
        self.rows = 0
        self.network_s = 0.0
        self._cuda = torch.device(inner.info.device).type == "cuda"

    def denoise(self, x, sigma, cond=None):
        self.rows += x.shape[0]
        start = time.perf_counter()
        with accounting.timed("network"):
            out = self.inner.denoise(x, sigma, cond)
            if self._cuda:
                torch.cuda.synchronize()
        self.network_s += time.perf_counter() - start
        return out

    def decode(self, x0):
        return self.inner.decode(x0)

    def nfe_per_sample(self, num_samples: int) -> float:
        return self.rows / num_samples
