"""Gaussian-score analytical teleportation (Wang & Vastola, "The Unreasonable Effectiveness of Gaussian
Score Approximation for Diffusion Models and its Applications", TMLR 2024).

At high noise the score of any bounded data set is close to the score of the Gaussian with the data's
mean mu and covariance Sigma = U diag(lam) U^T. For that Gaussian the PF-ODE in scaled variables,
dx/dsigma = (x - D(x, sigma)) / sigma with D(x, s) = mu + Sigma (Sigma + s^2 I)^-1 (x - mu), has the
closed-form solution (paper, Sec. 4)

    x(s) = mu + U diag(sqrt((lam + s^2) / (lam + s0^2))) U^T (x(s0) - mu),

so the first part of the trajectory, sigma_max -> skip_sigma, costs no network evaluation. A base
solver then integrates skip_sigma -> 0 ("hybrid sampling", paper Sec. 6).

Faithful: the closed form, moments of the training data, a base solver after the jump.
Differs: the paper skips the first steps of a fixed schedule and saves their NFE (it reports skipping
15-30% of Heun's steps, i.e. teleporting to sigma about 10-20 for EDM models of [-1, 1] images);
here the base solver spends the whole NFE budget on [skip_sigma, sigma_min], on the cell's schedule
warped in log sigma to start at skip_sigma (`restart_schedule`), so the comparison is at equal NFE.
Checked side by side against the reference code (edm_x_t_traj and the hybrid EDM-Heun script of
Animadversio/GaussianTeleportationDiffusion): the flow map agrees to 1e-15 (float64, dimension 16, full- and
low-rank covariance), and on gmm2d with the same moments, noise, skip level and NFE, the only difference is this
warp (the reference re-spaces with a fresh rho=7 grid on [skip_sigma, sigma_min]; levels differ by up to 40%,
samples by 1e-3 to 0.2, with exact_err 3-13% lower here); on the reference's grid the samples agree to 1e-14.

NFE rule: exactly the base solver's (the teleport costs none): `teleport` takes bases that spend one
evaluation per step (dpmpp_2m, euler, ...), `teleport_heun` uses Heun (2*steps-1).

Moments (prepared once per model, prepare_scope "model"), first rule that applies:
  1. the model names a dataset (info.extra["dataset"]): mean and covariance of that data set — exact
     for the ideal denoiser, the training-data moments the paper uses for networks;
  2. the model is a Gaussian mixture (weights, means, covs): its exact moments;
  3. the model can draw data (`sample_data(n, seed)`): moments of 100k calibration draws.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from harness.datasets import load_dataset
from harness.errors import ConfigError, StepbenchError, valid_names
from harness.methods.solver_base import SOLVERS, NFERule, solver

MOMENT_DRAWS = 100_000
HEUN_RULE = NFERule(per_step=2, saved_at_end=1)


def base_solver(name: str, rule: NFERule, method: str):
    """The registered solver `name`, checked to spend NFE as `rule` says (so the audit holds) and to need
    nothing but the model and the sigmas (no prepared data, no noise process: the wrappers pass neither)."""

    def usable(s):
        return s.nfe == rule and s.prepare is None and not s.needs_process

    valid = sorted(n for n, s in SOLVERS.items() if usable(s))
    if name not in SOLVERS:
        raise ConfigError(f"{method}: base solver {name!r} unknown{valid_names(name, valid)}")
    if not usable(SOLVERS[name]):
        raise ConfigError(f"{method}: base solver {name!r} not usable here; valid: {', '.join(valid)}")
    return SOLVERS[name].fn


def restart_schedule(sigmas: list[float], sigma_start: float) -> list[float]:
    """The same number of steps on [sigma_start, sigma_min]: the schedule warped affinely in log sigma
    (exact for logSNR-uniform grids, shape-preserving for the others); the final 0 is kept."""
    levels = np.asarray(sigmas[:-1], dtype=np.float64)
    if sigma_start >= levels[0]:
        return list(sigmas)
    if len(levels) == 1:
        return [float(sigma_start), 0.0]
    if sigma_start <= levels[-1]:
        raise ConfigError(f"start level {sigma_start} must lie above the schedule's last level {levels[-1]:.4g}")
    lo = math.log(levels[-1])
    scale = (math.log(sigma_start) - lo) / (math.log(levels[0]) - lo)
    return [float(s) for s in np.exp(lo + (np.log(levels) - lo) * scale)] + [0.0]


def gaussian_moments(denoiser, sigmas, calibration_seed, **params) -> dict:
    """Mean and eigendecomposition of the data covariance, by the rule in the module docstring."""
    model = denoiser
    while hasattr(model, "inner"):  # unwrap counting / guidance wrappers
        model = model.inner
    info = model.info
    if info.latent:
        raise StepbenchError("teleport needs data moments in the model's sample space; latent models are not supported")
    if info.extra.get("dataset"):
        data, _ = load_dataset(info.extra["dataset"])
        flat = torch.as_tensor(data.reshape(len(data), -1), dtype=torch.float64)
        mean, cov, source = flat.mean(0), torch.cov(flat.T, correction=0), f"dataset {info.extra['dataset']}"
    elif all(hasattr(model, a) for a in ("log_w", "means", "covs")):
        w = torch.exp(model.log_w).double()
        means, covs = model.means.double(), model.covs.double()
        mean = w @ means
        centred = means - mean
        cov = torch.einsum("k,kij->ij", w, covs) + torch.einsum("k,ki,kj->ij", w, centred, centred)
        source = "exact mixture moments"
    elif hasattr(model, "sample_data"):
        flat = torch.as_tensor(model.sample_data(MOMENT_DRAWS, calibration_seed), dtype=torch.float64)
        flat = flat.reshape(len(flat), -1)
        mean, cov, source = flat.mean(0), torch.cov(flat.T, correction=0), f"{MOMENT_DRAWS} model draws"
    else:
        raise StepbenchError("teleport needs data moments: the model names no dataset, is no mixture and has no "
                             "sample_data")
    eigvals, eigvecs = torch.linalg.eigh(cov)
    return {"mean": mean.cpu(), "eigvals": eigvals.clamp(min=0).cpu(), "eigvecs": eigvecs.cpu(), "source": source}


def gaussian_flow(x: torch.Tensor, sigma_from: float, sigma_to: float, moments: dict) -> torch.Tensor:
    """The exact PF-ODE map sigma_from -> sigma_to for Gaussian data with the given moments."""
    kw = dict(dtype=torch.float64, device=x.device)
    mean, lam, vecs = (moments[k].to(**kw) for k in ("mean", "eigvals", "eigvecs"))
    gain = torch.sqrt((lam + sigma_to**2) / (lam + sigma_from**2))
    centred = x.reshape(len(x), -1).to(torch.float64) - mean
    # broadcast products instead of matmuls: BLAS picks kernels by row count, which would make a
    # sample depend on its batch size
    coords = (centred[:, None, :] * vecs.T[None]).sum(-1) * gain
    moved = mean + (coords[:, None, :] * vecs[None]).sum(-1)
    return moved.reshape(x.shape).to(x.dtype)


def teleport_then_solve(model, x, sigmas, noise, moments, base_fn, skip_sigma):
    if skip_sigma >= sigmas[0]:  # nothing to skip: plain base solver
        return base_fn(model, x, sigmas, noise=noise)
    x = gaussian_flow(x, sigmas[0], skip_sigma, moments)
    return base_fn(model, x, restart_schedule(sigmas, skip_sigma), noise=noise)


# order 0: the Gaussian jump is exact only for Gaussian data, so the error does not vanish with NFE
@solver("teleport", order=0, prepare=gaussian_moments, prepare_scope="model")
def teleport(model, x, sigmas, noise=None, prepared=None, base="dpmpp_2m", skip_sigma=10.0):
    """Closed-form Gaussian jump sigma_max -> skip_sigma, then `base` (one evaluation per step)."""
    base_fn = base_solver(base, NFERule(), "teleport")
    return teleport_then_solve(model, x, sigmas, noise, prepared, base_fn, float(skip_sigma))


@solver("teleport_heun", order=0, nfe=HEUN_RULE, prepare=gaussian_moments, prepare_scope="model")
def teleport_heun(model, x, sigmas, noise=None, prepared=None, skip_sigma=10.0):
    """Closed-form Gaussian jump sigma_max -> skip_sigma, then EDM Heun (the paper's base solver)."""
    return teleport_then_solve(model, x, sigmas, noise, prepared, SOLVERS["heun"].fn, float(skip_sigma))
