"""Embedded models with an exact denoiser: no training, no download, exact reference solutions.

Both compute in float64 and row by row independently of the batch, so a sample does not depend on
how many others share its batch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from harness.datasets import load_dataset
from harness.models.base import Denoiser, DenoiserInfo
from harness.schedules import make_process

DEFAULT_GMM = {  # eight anisotropic Gaussians on a ring, unequal weights
    "weights": [0.2, 0.05, 0.15, 0.1, 0.1, 0.15, 0.05, 0.2],
    "radius": 2.0,
    "std_radial": 0.5,
    "std_tangential": 0.3,
}


class GaussianMixture(Denoiser):
    """2-D Gaussian mixture: E[x0 | x~] in closed form for any sigma~."""

    def __init__(self, weights, means, covs, info: DenoiserInfo):
        self.info = info
        kw = dict(dtype=torch.float64, device=info.device)
        self.log_w = torch.log(torch.as_tensor(weights, **kw) / sum(weights))
        self.means = torch.as_tensor(means, **kw)  # [K, 2]
        self.covs = torch.as_tensor(covs, **kw)  # [K, 2, 2]

    @classmethod
    def from_config(cls, spec: dict, device: torch.device) -> "GaussianMixture":
        p = {**DEFAULT_GMM, **spec.get("params", {})}
        k = len(p["weights"])
        angles = 2 * math.pi * np.arange(k) / k
        means = p["radius"] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
        covs = []
        for a in angles:  # radial and tangential axes of each component
            rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
            covs.append(rot @ np.diag([p["std_radial"] ** 2, p["std_tangential"] ** 2]) @ rot.T)
        info = DenoiserInfo(
            data_shape=(2,),
            data_range=(-4.0, 4.0),
            prediction="x0",
            process=make_process(spec["process"]),
            dtype=torch.float64,
            device=device,
            extra={"analytic": True},
        )
        return cls(p["weights"], means, np.stack(covs), info)

    def denoise(self, x, sigma, cond=None):
        x = x.to(torch.float64)
        s2 = sigma.to(torch.float64)[:, None] ** 2  # [B, 1]
        # C = Sigma_k + s^2 I, written out per entry so every op is elementwise over (B, K).
        a = self.covs[None, :, 0, 0] + s2
        b = self.covs[None, :, 0, 1].expand_as(a)
        c = self.covs[None, :, 1, 1] + s2
        det = a * c - b * b
        d0 = x[:, None, 0] - self.means[None, :, 0]
        d1 = x[:, None, 1] - self.means[None, :, 1]
        z0 = (c * d0 - b * d1) / det  # C^{-1} d
        z1 = (a * d1 - b * d0) / det
        log_post = self.log_w[None] - 0.5 * (d0 * z0 + d1 * z1) - 0.5 * torch.log(det)
        post = torch.softmax(log_post, dim=1)  # p(k | x~)
        cov = self.covs[None]
        m0 = self.means[None, :, 0] + cov[..., 0, 0] * z0 + cov[..., 0, 1] * z1  # mu + Sigma C^{-1} d
        m1 = self.means[None, :, 1] + cov[..., 1, 0] * z0 + cov[..., 1, 1] * z1
        return torch.stack([(post * m0).sum(1), (post * m1).sum(1)], dim=1)

    def sample_data(self, n: int, seed: int = 0) -> np.ndarray:
        """Exact draws from the mixture (reference data for distribution metrics)."""
        rng = np.random.default_rng(seed)
        w = np.exp(self.log_w.cpu().numpy())
        k = rng.choice(len(w), size=n, p=w / w.sum())
        chol = np.linalg.cholesky(self.covs.cpu().numpy())
        return self.means.cpu().numpy()[k] + np.einsum("nij,nj->ni", chol[k], rng.standard_normal((n, 2)))


class IdealDenoiser(Denoiser):
    """The exact denoiser of an empirical dataset: the score of the data smoothed by N(0, sigma~^2).

    D(x~, s) = sum_i softmax_i(-|x~ - y_i|^2 / 2 s^2) y_i. Sampling with it reproduces training
    images when solved accurately, so quality differences between solvers are pure solver error.
    """

    def __init__(self, data: np.ndarray, info: DenoiserInfo):
        self.info = info
        self.data = torch.as_tensor(data.reshape(len(data), -1), dtype=torch.float64, device=info.device)
        self.sq_norms = (self.data**2).sum(1)

    @classmethod
    def from_config(cls, spec: dict, device: torch.device) -> "IdealDenoiser":
        data, _ = load_dataset(spec["dataset"])
        info = DenoiserInfo(
            data_shape=tuple(data.shape[1:]),
            data_range=(-1.0, 1.0),
            prediction="x0",
            process=make_process(spec["process"]),
            dtype=torch.float64,
            device=device,
            extra={"analytic": True, "dataset": spec["dataset"]},
        )
        return cls(data, info)

    def denoise(self, x, sigma, cond=None):
        flat = x.to(torch.float64).reshape(len(x), -1)
        dist2 = (flat**2).sum(1, keepdim=True) - 2 * _row_stable_matmul(flat, self.data.T) + self.sq_norms[None]
        weights = torch.softmax(-dist2 / (2 * sigma.to(torch.float64)[:, None] ** 2), dim=1)
        return _row_stable_matmul(weights, self.data).reshape(x.shape)


class GaussianData(Denoiser):
    """The Gaussian with a dataset's mean and covariance: the "second-order statistics only" baseline.

    With Sigma = V diag(lam) V^T, D(x~, s) = mu + V diag(lam / (lam + s^2)) V^T (x~ - mu), and the PF-ODE is
    solved in closed form: the coordinates of x~ - mu along V scale as sqrt(lam + s^2) (`exact_flow`), so
    exact_err needs no numerical integration.
    """

    def __init__(self, data: np.ndarray, info: DenoiserInfo):
        self.info = info
        flat = data.reshape(len(data), -1).astype(np.float64)
        lam, vectors = np.linalg.eigh(np.cov(flat, rowvar=False))
        kw = dict(dtype=torch.float64, device=info.device)
        self.mean = torch.as_tensor(flat.mean(0), **kw)
        self.lam = torch.as_tensor(np.clip(lam, 0.0, None), **kw)  # round-off can make a zero variance negative
        self.vectors = torch.as_tensor(vectors, **kw)

    @classmethod
    def from_config(cls, spec: dict, device: torch.device) -> "GaussianData":
        data, _ = load_dataset(spec["dataset"])
        info = DenoiserInfo(data_shape=tuple(data.shape[1:]), data_range=(-1.0, 1.0), prediction="x0",
                            process=make_process(spec["process"]), dtype=torch.float64, device=device,
                            extra={"analytic": True, "dataset": spec["dataset"]})
        return cls(data, info)

    def _coordinates(self, x: torch.Tensor) -> torch.Tensor:
        return _row_stable_matmul(x.to(torch.float64).reshape(len(x), -1) - self.mean, self.vectors)

    def _from_coordinates(self, c: torch.Tensor, shape) -> torch.Tensor:
        return (_row_stable_matmul(c, self.vectors.T) + self.mean).reshape(shape)

    def denoise(self, x, sigma, cond=None):
        shrink = self.lam / (self.lam + sigma.to(torch.float64)[:, None] ** 2)
        return self._from_coordinates(self._coordinates(x) * shrink, x.shape)

    def exact_flow(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The PF-ODE's solution at sigma_to from x at sigma_from, exactly."""
        scale = torch.sqrt((self.lam + sigma_to**2) / (self.lam + sigma_from**2))
        return self._from_coordinates(self._coordinates(x) * scale, x.shape)


def _row_stable_matmul(a: torch.Tensor, b: torch.Tensor, block: int = 64) -> torch.Tensor:
    """a @ b whose rows do not depend on how many rows a has.

    BLAS picks other kernels (and summation orders) for small or ragged row counts, which would
    make a sample depend on its batch size; padding the rows to a multiple of `block` keeps the
    kernel the same for every batch.
    """
    pad = (-a.shape[0]) % block
    return (torch.nn.functional.pad(a, (0, 0, 0, pad)) @ b)[: a.shape[0]]
