"""NFE audit: count what the sampler really asks of the network, per sample."""

from __future__ import annotations

from harness.models.base import Denoiser


class CountingDenoiser(Denoiser):
    """Wraps a Denoiser and counts denoiser evaluations per sample row.

    `calls` counts D evaluations summed over rows; nfe_measured = calls / samples. The wrapped
    model counts raw network rows in `info.extra["network_rows"]` when it batches (classifier-free
    guidance evaluates a x2 batch for one D call).
    """

    def __init__(self, inner: Denoiser):
        self.inner = inner
        self.info = inner.info
        self.rows = 0

    def denoise(self, x, sigma, cond=None):
        self.rows += x.shape[0]
        return self.inner.denoise(x, sigma, cond)

    def decode(self, x0):
        return self.inner.decode(x0)

    def nfe_per_sample(self, num_samples: int) -> float:
        return self.rows / num_samples
