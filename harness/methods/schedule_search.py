"""Budgeted searches whose output is a prepared schedule (prepare_scope "nfe"):

- `autodiffusion`: AutoDiffusion (Li et al., "AutoDiffusion: Training-Free Optimization of Time Steps
  and Architectures for Automated Diffusion Model Acceleration", ICCV 2023), time steps only:
  evolutionary search (mutation + crossover of time-step sets) for the time steps of a fixed solver.
- `usf`: USF / S3 (Liu, Ning, Yang & Wang, "A Unified Sampling Framework for Solver Searching of
  Diffusion Probabilistic Models", ICLR 2024; "S3: Search for Solver Schedules"): per-step solver
  decisions searched together with the time steps, inside a data-prediction exponential integrator.

Both evaluate a candidate by the RMS distance of its samples to a high-accuracy reference (dpmpp_2m,
`reference_steps` steps on an EDM rho=7 grid) from `calibration_samples` calibration noises
(SampleNoise(calibration_seed, ...), disjoint from cells' noise). The papers rank candidates by FID
(AutoDiffusion) or by FID through a trained performance predictor (USF/S3); a paired distance to
the reference needs far fewer samples and no feature network, which is what a budget of seconds
allows. The cell's own schedule (and for USF also DPM-Solver++(2M) and UniPC-bh2 decisions) seeds the
population, so the result never scores worse than the base on the calibration noise.

Search (steady-state evolutionary, both): a population of `population` candidates; each new
candidate is a crossover of two of the best half (union of their time steps, resampled; per-step
genes mixed uniformly) or a copy of one, then mutated (each free log-sigma moved by N(0, 0.3) with
probability 0.3; USF genes redrawn with the same probability). The first level stays sigma_max; the
others are free in [sigma_min, sigma_max]. At most `max_evals` candidates are evaluated.

Artifact: "sigmas" (the searched schedule; replaces the cell's), for USF "orders" and "correctors",
the objective before and after, and "search": the budget and the network evaluations it spent.

NFE rule: one evaluation per step for both (USF's corrector reuses the next step's evaluation, as
UniC does; autodiffusion needs a base solver that spends one evaluation per step).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from harness.errors import ConfigError
from harness.methods.solver_base import SOLVERS, NFERule, solver
from harness.methods.teleport import base_solver
from harness.noise import SampleNoise
from harness.schedules import sigma_grid

MUTATION_PROB = 0.3
MUTATION_LOG_SIGMA = 0.3
MAX_ORDER = 3

# ---- USF's sampler: per-step order and corrector in a data-prediction exponential integrator ----


def _unified_coefficients(h: float, rks: list[float], order: int) -> tuple[np.ndarray, np.ndarray, float]:
    """UniPC's linear system (B(h) = e^h - 1 variant, 'bh2') for an order-`order` update over a step h
    in lambda = -log sigma, with earlier points at relative positions rks (plus 1 for the new point)."""
    hh = -h  # data prediction integrates exp(-h)
    h_phi_k = math.expm1(hh) / hh - 1
    factorial = 1
    b_h = math.expm1(hh)
    rows, rhs = [], []
    for i in range(1, order + 1):
        rows.append(np.asarray(rks + [1.0]) ** (i - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return np.stack(rows), np.asarray(rhs), b_h


def usf_solve(model, x, sigmas, orders, correctors):
    """Exponential integrator with UniP-p predictors (p = orders[i], capped by the history available)
    and an optional UniC corrector per step; first order on the final step to sigma = 0."""
    history: list[tuple[float, torch.Tensor]] = []  # (lambda, denoised), newest last
    denoised = model(x, sigmas[0])
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if s_next == 0:
            return denoised
        lam, lam_next = -math.log(s), -math.log(s_next)
        h = lam_next - lam
        order = min(orders[i], len(history) + 1)
        earlier = history[len(history) - (order - 1):] if order > 1 else []
        rks = [(lam_prev - lam) / h for lam_prev, _ in earlier]
        diffs = [(d_prev - denoised) / rk for (_, d_prev), rk in zip(earlier, rks)]
        rows, rhs, b_h = _unified_coefficients(h, rks, order)
        x_first = (s_next / s) * x - math.expm1(-h) * denoised
        if order == 1:
            x_pred = x_first
        else:
            rhos = [0.5] if order == 2 else np.linalg.solve(rows[:-1, :-1], rhs[:-1])
            x_pred = x_first - b_h * sum(float(r) * d for r, d in zip(rhos, diffs))
        denoised_next = model(x_pred, s_next)
        if correctors[i]:  # UniC: reuses the evaluation the next step needs anyway
            rhos_c = [0.5] if order == 1 else np.linalg.solve(rows, rhs)
            correction = sum(float(r) * d for r, d in zip(rhos_c[:-1], diffs))
            correction = correction + float(rhos_c[-1]) * (denoised_next - denoised)
            x = x_first - b_h * correction
        else:
            x = x_pred
        history.append((lam, denoised))
        denoised = denoised_next
    return x


# ---- the search ----


def _calibration_noise(denoiser, calibration_seed: int, num: int) -> torch.Tensor:
    info = denoiser.info
    return SampleNoise(calibration_seed, range(num), device=info.device).randn(info.data_shape, dtype=info.dtype)


class _Budgeted:
    """Counts what the search asks of the network (rows), to record the NFE it spent."""

    def __init__(self, denoiser):
        self.denoiser, self.rows = denoiser, 0

    def __call__(self, x, sigma):
        self.rows += x.shape[0]
        return self.denoiser(x, sigma)


def _evolve(first_level: float, lo: float, candidates: list[dict], score, rng, population: int, max_evals: int,
            with_genes: bool) -> tuple[dict, float, float, int]:
    """Steady-state evolutionary search; candidates carry "levels" (free log-sigmas, decreasing) and,
    for USF, "orders" and "correctors". Returns the best candidate, its score, the best seed's score
    and the number of candidates evaluated."""
    hi = math.log(first_level)
    scored = [(score(c), c) for c in candidates]
    seed_score = min(s for s, _ in scored)
    while len(scored) < max_evals:
        scored.sort(key=lambda item: item[0])
        if len(scored) < population:  # fill the first population with mutants of the seeds
            child = dict(candidates[int(rng.integers(len(candidates)))])
        else:
            parents = [c for _, c in scored[: population // 2]]
            a, b = rng.choice(len(parents), size=2, replace=False)
            child = _crossover(parents[a], parents[b], rng, with_genes) if rng.random() < 0.5 else dict(parents[a])
        child = _mutate(child, rng, lo, hi, with_genes)
        if child is not None:
            scored.append((score(child), child))
    best_score, best = min(scored, key=lambda item: item[0])
    return best, best_score, seed_score, len(scored)


def _crossover(a: dict, b: dict, rng, with_genes: bool) -> dict:
    pool = np.unique(np.concatenate([a["levels"], b["levels"]]))
    levels = np.sort(rng.choice(pool, size=len(a["levels"]), replace=False))[::-1]
    child = {"levels": levels}
    if with_genes:
        pick = rng.random(len(a["orders"])) < 0.5
        child["orders"] = np.where(pick, a["orders"], b["orders"])
        child["correctors"] = np.where(pick, a["correctors"], b["correctors"])
    return child


def _mutate(c: dict, rng, lo: float, hi: float, with_genes: bool) -> dict | None:
    levels = np.array(c["levels"], dtype=np.float64)
    moved = rng.random(len(levels)) < MUTATION_PROB
    levels[moved] += rng.normal(0.0, MUTATION_LOG_SIGMA, moved.sum())
    levels = np.sort(np.clip(levels, lo, hi - 1e-6))[::-1]
    if len(np.unique(levels)) < len(levels):  # two steps at one level: not a schedule
        return None
    child = {"levels": levels}
    if with_genes:
        redraw = rng.random(len(c["orders"])) < MUTATION_PROB
        child["orders"] = np.where(redraw, rng.integers(1, MAX_ORDER + 1, len(redraw)), c["orders"])
        flip = rng.random(len(c["correctors"])) < MUTATION_PROB
        child["correctors"] = np.where(flip, 1 - c["correctors"], c["correctors"])
    return child


def _schedule(first_level: float, c: dict) -> list[float]:
    return [first_level] + [float(v) for v in np.exp(c["levels"])] + [0.0]


def _search(denoiser, sigmas, calibration_seed, sample_fn, seeds: list[dict], calibration_samples, max_evals,
            population, reference_steps, with_genes) -> dict:
    if int(population) < 4:
        raise ConfigError(f"schedule search: population must be at least 4 (two parents from the best half); "
                          f"got {population}")
    model = _Budgeted(denoiser)
    process = denoiser.process
    noise = _calibration_noise(denoiser, calibration_seed, int(calibration_samples))
    x_T = noise * process.prior_std(sigmas[0])
    ref_sigmas = [float(s) for s in sigma_grid(process, int(reference_steps), {"kind": "edm_rho", "rho": 7.0})]
    reference = SOLVERS["dpmpp_2m"].fn(model, noise * process.prior_std(ref_sigmas[0]), ref_sigmas)
    reference_rows = model.rows

    def score(c):
        out = sample_fn(model, x_T, _schedule(sigmas[0], c), c)
        err = ((out - reference).reshape(len(out), -1) ** 2).sum(1).mean().sqrt()
        return float(err) if torch.isfinite(err) else math.inf

    rng = np.random.default_rng(calibration_seed)
    if len(seeds[0]["levels"]) == 0:  # a single step: no time step to move
        max_evals = len(seeds)
    best, best_score, seed_score, evaluations = _evolve(sigmas[0], math.log(process.sigma_min), seeds, score, rng,
                                                        int(population), int(max_evals), with_genes)
    artifact = {
        "sigmas": _schedule(sigmas[0], best),
        "objective": best_score,
        "objective_initial": seed_score,  # the best of the unsearched seeds (the base solver's)
        "search": {
            "objective": "RMS distance to dpmpp_2m reference from calibration noise",
            "calibration_samples": int(calibration_samples),
            "max_evals": int(max_evals),
            "evaluations": evaluations,
            "population": int(population),
            "reference": f"dpmpp_2m, {int(reference_steps)} steps, edm_rho 7",
            "network_evals": model.rows,  # denoiser rows spent preparing, reference included
            "network_evals_reference": reference_rows,
            "nfe_per_calibration_sample": model.rows / int(calibration_samples),
        },
    }
    if with_genes:
        artifact["orders"] = [int(o) for o in best["orders"]]
        artifact["correctors"] = [int(k) for k in best["correctors"]]
    return artifact


def _free_levels(sigmas) -> np.ndarray:
    return np.log(np.asarray(sigmas[1:-1], dtype=np.float64))


def search_time_steps(denoiser, sigmas, calibration_seed, base="dpmpp_2m", calibration_samples=32, max_evals=40,
                      population=8, reference_steps=100) -> dict:
    base_fn = base_solver(base, NFERule(), "autodiffusion")
    return _search(denoiser, sigmas, calibration_seed, lambda model, x, s, c: base_fn(model, x, s),
                   [{"levels": _free_levels(sigmas)}], calibration_samples, max_evals, population, reference_steps,
                   with_genes=False)


def search_solver_schedule(denoiser, sigmas, calibration_seed, calibration_samples=32, max_evals=40, population=8,
                           reference_steps=100) -> dict:
    steps = len(sigmas) - 1
    second_order = np.full(steps, 2)
    seeds = [  # DPM-Solver++(2M) and UniPC-bh2 (2M with corrector) on the cell's schedule
        {"levels": _free_levels(sigmas), "orders": second_order, "correctors": np.zeros(steps, dtype=int)},
        {"levels": _free_levels(sigmas), "orders": second_order, "correctors": np.ones(steps, dtype=int)},
    ]
    return _search(denoiser, sigmas, calibration_seed,
                   lambda model, x, s, c: usf_solve(model, x, s, c["orders"], c["correctors"]), seeds,
                   calibration_samples, max_evals, population, reference_steps, with_genes=True)


@solver("autodiffusion", order=2, prepare=search_time_steps, prepare_scope="nfe")
def autodiffusion(model, x, sigmas, noise=None, prepared=None, base="dpmpp_2m", calibration_samples=32, max_evals=40,
                  population=8, reference_steps=100):
    """`base` on the searched time steps (already in `sigmas`); the budget parameters drive prepare."""
    return base_solver(base, NFERule(), "autodiffusion")(model, x, sigmas, noise=noise)


@solver("usf", order=2, prepare=search_solver_schedule, prepare_scope="nfe")
def usf(model, x, sigmas, noise=None, prepared=None, calibration_samples=32, max_evals=40, population=8,
        reference_steps=100):
    """The searched solver schedule: searched time steps (in `sigmas`), per-step order and corrector."""
    return usf_solve(model, x, sigmas, prepared["orders"], prepared["correctors"])
