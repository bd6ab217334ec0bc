"""Budgeted searches whose output is a prepared schedule (prepare_scope "nfe"):

- `autodiffusion`: AutoDiffusion (Li et al., "AutoDiffusion: Training-Free Optimization of Time Steps
  and Architectures for Automated Diffusion Model Acceleration", ICCV 2023), time steps only:
  evolutionary search (mutation + crossover of time-step sets) for the time steps of a fixed solver.
  The reference (github.com/lilijiangg/AutoDiffusion, search_ea.py / search_*.py) searches a set of grid
  time steps (integers 0-999, or DPM-Solver's 1000-point time-uniform grid), none fixed, with DDIM, PLMS or
  DPM-Solver++(2M); generational: population 50 (uniform grid, random sets, grid mutants), 10 epochs, parents
  from the top 10, 25 mutants (each step replaced by an unused grid step with prob 0.1-0.25), 10-15
  uniform crossovers (per position, 0.5), the rest random; fitness FID of 1000-5000 samples (~500 FIDs).
  Ours: continuous log-sigmas, local moves, first level sigma_max and final 0 fixed, paired-RMS fitness.
- `usf`: USF / S3 (Liu, Ning, Yang & Wang, "A Unified Sampling Framework for Solver Searching of
  Diffusion Probabilistic Models", ICLR 2024): per-step solver decisions searched together with the
  time steps. `decisions: unified` (default) is the reference code's `uni_sampler` (github.com/thu-nics/USF,
  codebases/edm) in `unified_solve`: per step a Taylor expansion in lambda = -log sigma of order 1-4 of
  the data or the noise prediction (exponential integrator, phi functions), its k-th derivative a
  finite difference from the Taylor expansions at the k nearest earlier points, the first derivative
  from min(estimate, order - 1) points (estimate 1 or 2: the reference's "derivative estimation order",
  so an order-4 step is third order unless its estimate is 3, which only a direct call can ask for),
  relaxed by the 'dpmsolver-2' factor (on/off) times the reference's 'linear' 1 + c h (c searched,
  mutated by N(0, 0.03)), and a corrector: none, UniC-bh2, or the reference's pseudo corrector (Taylor
  order + 1 from the step's start, the new evaluation added to each derivative's points, unrelaxed).
  Order 2 with 'dpmsolver-2' is DPM-Solver++(2M) (data) or multistep DPM-Solver-2 (noise), tested.
  Side by side with the reference `uni_sampler.sample` (start points -1, no AFS), same decisions, noise
  and time steps (80 -> 0.002, 9 steps, 20 random decision lists each, orders up to 4, pseudo correctors),
  the samples agree to 2e-13 (gmm2d) and 3e-12 (digits-ideal) max relative difference with a float64
  EDM noise schedule; the reference's own NoiseScheduleEDM casts lambda to float32 (9e-5, 5e-3).
  `decisions: unipc` keeps the earlier space (UniP-p predictor in data prediction + optional UniC,
  `usf_solve`); with it the search reproduces the earlier artifacts bit for bit.

  Still different from the reference: no "dpmsolver_v3_prediction" (needs DPM-Solver-v3's EMS
  statistics per step), no analytical first step (AFS: zero or dataset-mean x0 instead of the first
  evaluation, i.e. one extra step for the NFE; our schedules keep steps = NFE), no U-Net skip
  coefficients (architecture-specific), start points always -1
  (multistep; the reference's file format allows others but its search never changes them), the
  'dpmsolver-2' and 'linear' relaxations combine multiplicatively (the reference uses one or the other),
  a fixed NFE (the reference's search adds and deletes steps within NFE 3-12), the last level is 0 with
  the final step the denoiser's output (the reference ends at a searched t_end in [0.002, 0.003]).
  The reference's search (codebases/edm/search.py) scores each candidate by FID of 1000 samples, picks
  parents from the best 15, crosses over with probability 0.3 (whole decision keys, per-step with 0.5)
  and mutates each per-step decision with probability 0.3 (time steps by a factor 1 + N(0, 0.08); a
  Taylor order redrawn with weights 0.2, 0.4, 0.3, 0.1 for 1-4, as here);
  the paper's trained performance predictor and multi-stage search are not in that code.

Both evaluate a candidate by the RMS distance of its samples to a high-accuracy reference (dpmpp_2m,
`reference_steps` steps on an EDM rho=7 grid) from `calibration_samples` calibration noises
(SampleNoise(calibration_seed, ...), disjoint from cells' noise). The papers rank candidates by FID
(AutoDiffusion) or by FID through a trained performance predictor (USF/S3); a paired distance to
the reference needs far fewer samples and no feature network, which is what a budget of seconds
allows. Calibration samples whose reference diverges (NaN/Inf) are left out of the distance; a candidate
that diverges scores +inf and loses, and if every one does the first seed (the base) is kept. The cell's
own schedule seeds the population with the base decisions (USF unified: DPM-Solver++(2M), UniPC-bh2
and multistep DPM-Solver-2; unipc: the first two), so the result never
scores worse than the base on the calibration noise. USF's default budget is 120 candidates
(population 12; the larger space needs it: at 40 it found worse schedules on digits-ideal than the
unipc space); prepare at NFE 8 takes about 3 s (gmm2d) and 5 s (digits-ideal) on 2 CPU cores.

Search (steady-state evolutionary, both): a population of `population` candidates; each new
candidate is a crossover of two of the best half (union of their time steps, resampled; a step's
genes taken together from one parent, uniformly) or a copy of one, then mutated (each free log-sigma
moved by N(0, 0.3) with probability 0.3; each USF gene redrawn, flipped or moved with the same
probability). The first level stays sigma_max; the others are free in [sigma_min, sigma_max]. At most
`max_evals` candidates are evaluated.

Artifact: "sigmas" (the searched schedule; replaces the cell's), for USF one list per decision
("orders", "correctors", and for unified "predictions", "estimates", "relaxations", "relax_coefs"),
the objective before and after, and "search": the budget and the network evaluations it spent.

NFE rule: one evaluation per step for both (USF's correctors reuse the next step's evaluation, as
UniC and the reference's pseudo corrector do; autodiffusion needs a base solver that spends one
evaluation per step).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from harness.errors import ConfigError
from harness.methods.solver_base import SOLVERS, NFERule, finite_rows, keep_rows, solver
from harness.methods.teleport import base_solver
from harness.noise import SampleNoise
from harness.schedules import sigma_grid

MUTATION_PROB = 0.3
MUTATION_LOG_SIGMA = 0.3
MAX_ORDER = 3  # the unipc space's UniP-p orders
UNIFIED_MAX_ORDER = 4  # the unified space's Taylor orders, 1-4 as the reference's
# the reference's search draws a step's Taylor order with these weights (configs/evo_search.yml)
UNIFIED_ORDER_WEIGHTS = {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.1}
RELAX_COEF_SD = 0.03  # the reference's mutation of its 'linear' relaxation coefficient

# ---- USF's sampler: per-step order and corrector in a data-prediction exponential integrator ----


def _unified_coefficients(hh: float, rks: list[float], order: int) -> tuple[np.ndarray, np.ndarray, float]:
    """UniPC's linear system (B(h) = e^hh - 1 variant, 'bh2') for an order-`order` update over a step h
    in lambda = -log sigma (hh = -h for data prediction, h for noise prediction), with earlier points at
    relative positions rks (plus 1 for the new point)."""
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
    lams = [-math.log(sigmas[0])]  # lambda of each evaluated point, oldest first
    data = [model(x, sigmas[0])]  # D(x, sigma) there
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if s_next == 0:
            return data[-1]
        lam_next = -math.log(s_next)
        h = lam_next - lams[-1]
        order = min(orders[i], len(lams))
        x_first = (s_next / s) * x - math.expm1(-h) * data[-1]
        if order == 1:
            x_pred = x_first
        else:
            earlier = range(len(lams) - order, len(lams) - 1)
            rks = [(lams[j] - lams[-1]) / h for j in earlier]
            diffs = [(data[j] - data[-1]) / rk for j, rk in zip(earlier, rks)]
            rows, rhs, b_h = _unified_coefficients(-h, rks, order)  # data prediction integrates exp(-h)
            rhos = [0.5] if order == 2 else np.linalg.solve(rows[:-1, :-1], rhs[:-1])
            x_pred = x_first - b_h * sum(float(r) * d for r, d in zip(rhos, diffs))
        denoised_next = model(x_pred, s_next)
        # UniC reuses the evaluation the next step needs anyway
        x = _unic(x, s, s_next, h, lams, data, order, DATA, denoised_next) if correctors[i] else x_pred
        lams.append(lam_next), data.append(denoised_next)
        del lams[:-MAX_ORDER], data[:-MAX_ORDER]  # as far back as any step reaches
    return x


# ---- USF's unified sampler (the reference's `uni_sampler`, EDM parametrisation alpha = 1) ----

DATA, NOISE = 0, 1  # per-step prediction type
NO_CORRECTOR, UNIC_CORRECTOR, TAYLOR_CORRECTOR = 0, 1, 2


def _phis(hh: float, count: int) -> list[float]:
    """phi_1(hh) .. phi_count(hh), phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1/k!) / z."""
    phis, fac = [math.expm1(hh) / hh], 1
    for k in range(1, count):
        fac *= k
        phis.append((phis[-1] - 1 / fac) / hh)
    return phis


def _finite_difference(lams: list[float], values: list, start: int, points: list[int], derivative: int):
    """The `derivative`-th lambda-derivative of `values` at `start` from the Taylor expansions of the
    values at `points` around it (len(points) terms; Lagrange-consistent finite differences)."""
    dh = np.asarray([lams[p] - lams[start] for p in points], dtype=np.float64)
    taylor = np.stack([dh ** m / math.factorial(m) for m in range(1, len(points) + 1)])
    unit = np.zeros(len(points))
    unit[derivative - 1] = 1.0
    weights = np.linalg.solve(taylor, unit)
    return sum(float(w) * (values[p] - values[start]) for w, p in zip(weights, points))


def _taylor_update(x_s, sigma_s: float, sigma_t: float, h: float, prediction: int, value_s, derivatives: list):
    """Exponential-integrator Taylor update over h = lambda_t - lambda_s: data prediction
    x_t = (sigma_t / sigma_s) x_s + sum_k h^(k+1) phi_(k+1)(-h) D^(k); noise prediction
    x_t = x_s - sigma_t sum_k h^(k+1) phi_(k+1)(h) eps^(k)."""
    if prediction == DATA:
        phis = _phis(-h, len(derivatives) + 1)
        x_t = (sigma_t / sigma_s) * x_s + h * phis[0] * value_s
        for k, d in enumerate(derivatives, start=1):
            x_t = x_t + h ** (k + 1) * phis[k] * d
        return x_t
    phis = _phis(h, len(derivatives) + 1)
    x_t = x_s - sigma_t * h * phis[0] * value_s
    for k, d in enumerate(derivatives, start=1):
        x_t = x_t - sigma_t * h ** (k + 1) * phis[k] * d
    return x_t


def _relaxation(h: float, prediction: int, bh2: int, coef: float) -> float:
    """The reference's relaxation of the first derivative: 'dpmsolver-2' (= UniPC-bh2; makes order 2 the
    multistep DPM-Solver(++)-2) evaluated at -h for data and h for noise prediction, times the
    'linear' factor 1 + coef * h."""
    factor = 1.0 + coef * h
    if bh2:
        hh = -h if prediction == DATA else h
        factor *= 0.5 * hh * math.expm1(hh) / (math.expm1(hh) - hh)
    return factor


def unified_solve(model, x, sigmas, orders, predictions, estimates, relaxations, relax_coefs, correctors):
    """USF's per-step decisions in one multistep exponential integrator (the reference `uni_sampler` with
    start point -1 each step): step i is a Taylor expansion of order orders[i] (capped by the history)
    of the data (predictions[i] = 0) or noise (1) prediction in lambda = -log sigma; its k-th derivative
    is a finite difference from the k nearest earlier points' Taylor expansions, k = orders[i] - 1, except
    the first derivative, which uses min(estimates[i], orders[i] - 1) points; the first derivative is
    relaxed (relaxations[i]: 'dpmsolver-2' factor, relax_coefs[i]: 1 + c h). correctors[i]: 0 none,
    1 UniC (bh2, as UniPC), 2 the reference's pseudo corrector (Taylor order + 1 from the step's start,
    the new evaluation added to each derivative's points, no relaxation). Both correctors reuse the next
    step's evaluation; the final step to sigma = 0 returns the denoiser's output (first order)."""
    lams: list[float] = []  # lambda of the last UNIFIED_MAX_ORDER evaluated points (as far back as any step reaches)
    data: list = []  # D(x, sigma) there
    noise: list = []  # (x - D) / sigma there, where some step reads the noise prediction (else None)
    keep_noise = any(int(p) == NOISE for p in predictions)
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if i == 0:
            denoised = model(x, s)
            lams.append(-math.log(s)), data.append(denoised), noise.append((x - denoised) / s if keep_noise else None)
        if s_next == 0:
            return data[-1]
        lam_next = -math.log(s_next)
        h = lam_next - lams[-1]
        prediction = int(predictions[i])
        values = data if prediction == DATA else noise
        order = min(int(orders[i]), len(lams))
        counts = [order - 1] * (order - 1)  # points per derivative
        if order > 1:
            counts[0] = min(int(estimates[i]), order - 1)
        points = [list(range(-k - 1, -1)) for k in counts]
        derivatives = [_finite_difference(lams, values, -1, p, k + 1) for k, p in enumerate(points)]
        if derivatives:
            derivatives[0] = derivatives[0] * _relaxation(h, prediction, int(relaxations[i]), float(relax_coefs[i]))
        x_pred = _taylor_update(x, s, s_next, h, prediction, values[-1], derivatives)
        denoised_next = model(x_pred, s_next)
        noise_next = (x_pred - denoised_next) / s_next if keep_noise else None
        corrector = int(correctors[i])
        if corrector == TAYLOR_CORRECTOR:
            lams_c = lams + [lam_next]
            values_c = values + [denoised_next if prediction == DATA else noise_next]
            start = -2  # the step's start; the new point is -1, earlier points shift by one
            points_c = [[q - 1 for q in p] + [-1] for p in points] + [[q - 1 for q in (points[-1] if points else [])] + [-1]]
            derivs_c = [_finite_difference(lams_c, values_c, start, p, k + 1) for k, p in enumerate(points_c)]
            x_next = _taylor_update(x, s, s_next, h, prediction, values[-1], derivs_c)
        elif corrector == UNIC_CORRECTOR:
            x_next = _unic(x, s, s_next, h, lams, values, order, prediction,
                           denoised_next if prediction == DATA else noise_next)
        else:
            x_next = x_pred
        lams.append(lam_next), data.append(denoised_next), noise.append(noise_next)
        del lams[:-UNIFIED_MAX_ORDER], data[:-UNIFIED_MAX_ORDER], noise[:-UNIFIED_MAX_ORDER]  # none kept beyond
        x = x_next
    return x


def _unic(x, s, s_next, h, lams, values, order, prediction, value_next):
    """UniC-p (B(h) = e^hh - 1, 'bh2') on the prediction type's values, p = the step's order."""
    hh = -h if prediction == DATA else h
    earlier = list(range(len(lams) - order, len(lams) - 1))
    rks = [(lams[j] - lams[-1]) / h for j in earlier]
    diffs = [(values[j] - values[-1]) / rk for j, rk in zip(earlier, rks)]
    rows, rhs, b_h = _unified_coefficients(hh, rks, order)
    scale = 1.0 if prediction == DATA else s_next
    if prediction == DATA:
        x_first = (s_next / s) * x - math.expm1(-h) * values[-1]
    else:
        x_first = x - s_next * math.expm1(h) * values[-1]
    rhos_c = [0.5] if order == 1 else np.linalg.solve(rows, rhs)
    correction = sum(float(r) * d for r, d in zip(rhos_c[:-1], diffs))
    correction = correction + float(rhos_c[-1]) * (value_next - values[-1])
    return x_first - scale * b_h * correction


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


# Per-step genes of each search space: ("int", lo, hi) redrawn uniformly, ("choice", {value: weight}) redrawn
# with those weights, ("flip",) 0 <-> 1, ("normal", sd) moved by N(0, sd); each with probability MUTATION_PROB
# per step.
DECISIONS = {
    # USF's decisions that fit a one-evaluation-per-step exponential integrator (unified_solve)
    "unified": {"orders": ("choice", UNIFIED_ORDER_WEIGHTS), "predictions": ("flip",), "estimates": ("int", 1, 2),
                "relaxations": ("flip",), "relax_coefs": ("normal", RELAX_COEF_SD),
                "correctors": ("int", NO_CORRECTOR, TAYLOR_CORRECTOR)},
    # the earlier space: UniP-p predictor (data prediction) and an optional UniC corrector (usf_solve)
    "unipc": {"orders": ("int", 1, MAX_ORDER), "correctors": ("flip",)},
}


def _evolve(first_level: float, lo: float, candidates: list[dict], score, rng, population: int, max_evals: int,
            genes: dict | None) -> tuple[dict, float, float, int]:
    """Steady-state evolutionary search; candidates carry "levels" (free log-sigmas, decreasing) and,
    for USF, one list per gene. Returns the best candidate, its score, the best seed's score and the
    number of candidates evaluated."""
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
            child = _crossover(parents[a], parents[b], rng, genes) if rng.random() < 0.5 else dict(parents[a])
        child = _mutate(child, rng, lo, hi, genes)
        if child is not None:
            scored.append((score(child), child))
    # scores are never NaN (+inf for a diverged run); min() and the stable sort keep the earliest of equal
    # scores, so with every candidate at +inf this is the first seed
    best_score, best = min(scored, key=lambda item: item[0])
    return best, best_score, seed_score, len(scored)


def _crossover(a: dict, b: dict, rng, genes: dict | None) -> dict:
    pool = np.unique(np.concatenate([a["levels"], b["levels"]]))
    levels = np.sort(rng.choice(pool, size=len(a["levels"]), replace=False))[::-1]
    child = {"levels": levels}
    if genes:
        pick = rng.random(len(a["orders"])) < 0.5  # a step's genes travel together
        for name in genes:
            child[name] = np.where(pick, a[name], b[name])
    return child


def _mutate(c: dict, rng, lo: float, hi: float, genes: dict | None) -> dict | None:
    levels = np.array(c["levels"], dtype=np.float64)
    moved = rng.random(len(levels)) < MUTATION_PROB
    levels[moved] += rng.normal(0.0, MUTATION_LOG_SIGMA, moved.sum())
    levels = np.sort(np.clip(levels, lo, hi - 1e-6))[::-1]
    if len(np.unique(levels)) < len(levels):  # two steps at one level: not a schedule
        return None
    child = {"levels": levels}
    for name, (kind, *args) in (genes or {}).items():
        old = np.asarray(c[name])
        hit = rng.random(len(old)) < MUTATION_PROB
        if kind == "int":
            child[name] = np.where(hit, rng.integers(args[0], args[1] + 1, len(old)), old)
        elif kind == "choice":
            values, weights = zip(*args[0].items())
            child[name] = np.where(hit, rng.choice(values, len(old), p=weights), old)
        elif kind == "flip":
            child[name] = np.where(hit, 1 - old, old)
        else:  # "normal"
            child[name] = old + np.where(hit, rng.normal(0.0, args[0], len(old)), 0.0)
    return child


def _schedule(first_level: float, c: dict) -> list[float]:
    return [first_level] + [float(v) for v in np.exp(c["levels"])] + [0.0]


def _search(denoiser, sigmas, calibration_seed, sample_fn, seeds: list[dict], calibration_samples, max_evals,
            population, reference_steps, genes) -> dict:
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
    # A calibration sample whose reference diverged (NaN/Inf) cannot score a candidate: score on the others
    # (all of them, the same numbers, when none diverged).
    finite = finite_rows(reference)
    finite_reference = keep_rows(reference, finite)

    def score(c):
        out = sample_fn(model, x_T, _schedule(sigmas[0], c), c)
        diff = keep_rows(out, finite) - finite_reference
        err = (diff.flatten(1) ** 2).sum(1).mean().sqrt()  # no row left: NaN, so +inf
        # A diverged candidate scores +inf and loses. If every one does (or no reference sample is finite),
        # min() in _evolve keeps the first seed, the base solver on the cell's schedule: its cell then
        # runs and is reported diverged if it is, rather than the preparation failing.
        return float(err) if torch.isfinite(err) else math.inf

    rng = np.random.default_rng(calibration_seed)
    if len(seeds[0]["levels"]) == 0:  # a single step: no time step to move
        max_evals = len(seeds)
    best, best_score, seed_score, evaluations = _evolve(sigmas[0], math.log(process.sigma_min), seeds, score, rng,
                                                        int(population), int(max_evals), genes)
    artifact = {
        "sigmas": _schedule(sigmas[0], best),
        "objective": best_score,
        "objective_initial": seed_score,  # the best of the unsearched seeds (the base solver's)
        "search": {
            "objective": "RMS distance to dpmpp_2m reference from calibration noise",
            "calibration_samples": int(calibration_samples),
            "calibration_samples_diverged": int((~finite).sum()),  # reference not finite: left out of scores
            "max_evals": int(max_evals),
            "evaluations": evaluations,
            "population": int(population),
            "reference": f"dpmpp_2m, {int(reference_steps)} steps, edm_rho 7",
            "network_evals": model.rows,  # denoiser rows spent preparing, reference included
            "network_evals_reference": reference_rows,
            "nfe_per_calibration_sample": model.rows / int(calibration_samples),
        },
    }
    for name, (kind, *_) in (genes or {}).items():
        artifact[name] = [float(v) if kind == "normal" else int(v) for v in best[name]]
    return artifact


def _free_levels(sigmas) -> np.ndarray:
    return np.log(np.asarray(sigmas[1:-1], dtype=np.float64))


def search_time_steps(denoiser, sigmas, calibration_seed, base="dpmpp_2m", calibration_samples=32, max_evals=40,
                      population=8, reference_steps=100) -> dict:
    base_fn = base_solver(base, NFERule(), "autodiffusion")
    return _search(denoiser, sigmas, calibration_seed, lambda model, x, s, c: base_fn(model, x, s),
                   [{"levels": _free_levels(sigmas)}], calibration_samples, max_evals, population, reference_steps,
                   genes=None)


def _decision_space(decisions: str) -> dict:
    if decisions not in DECISIONS:
        raise ConfigError(f"usf: decisions must be one of {sorted(DECISIONS)}; got {decisions!r}")
    return DECISIONS[decisions]


def _usf_sampler(decisions: str):
    if decisions == "unipc":
        return lambda model, x, s, c: usf_solve(model, x, s, c["orders"], c["correctors"])
    return lambda model, x, s, c: unified_solve(model, x, s, c["orders"], c["predictions"], c["estimates"],
                                                c["relaxations"], c["relax_coefs"], c["correctors"])


def search_solver_schedule(denoiser, sigmas, calibration_seed, calibration_samples=32, max_evals=120, population=12,
                           reference_steps=100, decisions="unified") -> dict:
    genes = _decision_space(decisions)
    steps = len(sigmas) - 1
    levels = _free_levels(sigmas)

    def seed(**values):
        return {"levels": levels, **{name: np.full(steps, values[name]) for name in genes}}

    if decisions == "unipc":  # DPM-Solver++(2M) and UniPC-bh2 (2M with corrector) on the cell's schedule
        seeds = [seed(orders=2, correctors=0), seed(orders=2, correctors=1)]
    else:  # the same two, and multistep DPM-Solver-2 (noise prediction)
        common = {"orders": 2, "estimates": 2, "relaxations": 1, "relax_coefs": 0.0}
        seeds = [seed(predictions=DATA, correctors=NO_CORRECTOR, **common),
                 seed(predictions=DATA, correctors=UNIC_CORRECTOR, **common),
                 seed(predictions=NOISE, correctors=NO_CORRECTOR, **common)]
    return _search(denoiser, sigmas, calibration_seed, _usf_sampler(decisions), seeds, calibration_samples, max_evals,
                   population, reference_steps, genes)


@solver("autodiffusion", order=2, prepare=search_time_steps, prepare_scope="nfe")
def autodiffusion(model, x, sigmas, noise=None, prepared=None, base="dpmpp_2m", calibration_samples=32, max_evals=40,
                  population=8, reference_steps=100):
    """`base` on the searched time steps (already in `sigmas`); the budget parameters drive prepare."""
    return base_solver(base, NFERule(), "autodiffusion")(model, x, sigmas, noise=noise)


@solver("usf", order=2, prepare=search_solver_schedule, prepare_scope="nfe")
def usf(model, x, sigmas, noise=None, prepared=None, calibration_samples=32, max_evals=120, population=12,
        reference_steps=100, decisions="unified"):
    """The searched solver schedule: searched time steps (in `sigmas`) and the per-step decisions."""
    _decision_space(decisions)
    return _usf_sampler(decisions)(model, x, sigmas, prepared)
