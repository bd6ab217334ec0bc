"""NFE audit: count what the sampler really asks of the network, per sample."""

from __future__ import annotations

import time

import torch

from harness import accounting
from harness.models.base import Denoiser, WrappedDenoiser


class CountingDenoiser(WrappedDenoiser):
    """Wraps a Denoiser and counts denoiser evaluations per sample row.

    `rows` counts D evaluations summed over rows; nfe_measured = rows / samples. The wrapped
    model counts raw network rows in `info.extra["network_rows"]` when it batches (classifier-free
    guidance evaluates a x2 batch for one D call). `network_s` is the wall time inside the calls (on CUDA
    synchronised, so it is the kernels' time, not their launch).

    A flow (harness.models.flow) is audited the same way through `invert`: its NFE is its sequential network
    passes, `rows` adds passes per sample x samples, and `network_rows` its token evaluations (for a denoiser
    `network_rows` is `rows`: a call's rows are the network's rows).
    """

    def __init__(self, inner: Denoiser):
        super().__init__(inner)
        self.rows = 0
        self.network_rows = 0
        self.network_s = 0.0
        self._cuda = torch.device(inner.info.device).type == "cuda"

    def denoise(self, x, sigma, cond=None):
        self.rows += x.shape[0]
        self.network_rows += x.shape[0]
        return self._timed(self.inner.denoise, x, sigma, cond)

    def invert(self, z, cond=None, strategies=None, **settings):
        result = self._timed(self.inner.invert, z, cond, strategies, **settings)
        self.rows += round(result.cost["passes_per_sample"] * len(z))
        self.network_rows += round(result.cost["token_evals_per_sample"] * len(z))
        return result

    def _timed(self, call, *args, **kwargs):
        start = time.perf_counter()
        with accounting.timed("network"):
            out = call(*args, **kwargs)
            if self._cuda:
                torch.cuda.synchronize()
        self.network_s += time.perf_counter() - start
        return out

    def nfe_per_sample(self, num_samples: int) -> float:
        return self.rows / num_samples


class PassCounter:
    """Counts the network passes of a flow's blocks (TarFlow and kin), per sample, as NFE is audited.

    A forward pre-hook on each block's input projection sees every transformer pass, whatever code
    path makes it (the sequential inverse, a Jacobi iteration, the forward map of the denoising step):
    a pass over m tokens of r batch rows adds r to `rows` and r m to `tokens` of that block. A
    guided pass runs the conditional and unconditional rows as one batch, so `rows_per_sample` = 2
    then: passes per sample = rows / (rows_per_sample x samples), while token evaluations count the
    network's work, both halves. Use as a context manager; the hooks are gone after it.
    """

    def __init__(self, blocks, num_samples: int, rows_per_sample: int = 1):
        self.blocks = list(blocks)
        self.num_samples, self.rows_per_sample = num_samples, rows_per_sample
        self.rows = [0] * len(self.blocks)
        self.tokens = [0] * len(self.blocks)
        self._handles = []

    def __enter__(self) -> "PassCounter":
        for index, block in enumerate(self.blocks):
            self._handles.append(block.proj_in.register_forward_pre_hook(self._hook(index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, index: int):
        def count(module, args):
            x = args[0]  # [rows, tokens, token_dim]
            self.rows[index] += x.shape[0]
            self.tokens[index] += x.shape[0] * x.shape[1]
        return count

    def block_passes(self) -> list[float]:
        """Sequential passes per sample, per block (model.blocks order)."""
        return [r / (self.rows_per_sample * self.num_samples) for r in self.rows]

    def summary(self) -> dict:
        """JSON-able counts per sample: passes (the family's budget axis), network rows (x2 when
        guided) and token evaluations, in total and per block."""
        n = self.num_samples
        return {
            "passes_per_sample": sum(self.rows) / (self.rows_per_sample * n),
            "network_rows_per_sample": sum(self.rows) / n,
            "token_evals_per_sample": sum(self.tokens) / n,
            "block_passes_per_sample": self.block_passes(),
            "block_token_evals_per_sample": [t / n for t in self.tokens],
        }
