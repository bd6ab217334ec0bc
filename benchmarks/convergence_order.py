"""Empirical convergence orders of the ODE solvers on gmm2d.

For each solver: exact_err (RMS over samples of the Euclidean distance to the exact PF-ODE solution
from the same noise) at NFE about 20, 40 and 80, and the order measured as minus the slope of
log exact_err against log NFE, next to the solver's theoretical order.

    python benchmarks/convergence_order.py [SOLVER ...] [--samples 1000] [--nfe 20 40 80 160 320]
                                           [--schedule '{kind: logsnr_uniform}']
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch
import yaml

from harness.config import load_models
from harness.methods import make_sampler
from harness.methods.family_solver import SOLVERS
from harness.metrics.reference import rms_distance
from harness.models import load_denoiser
from harness.noise import SampleNoise
from harness.prepared import CALIBRATION_SEED
from harness.references import exact_solution

TARGET_NFES = (20, 40, 80)
DEFAULT_SOLVERS = ("euler", "heun", "dpmpp_2m", "dpm_solver_2", "dpmpp_2s", "deis_2m", "deis_tab2", "plms", "ipndm",
                   "dpm_solver_3", "dpmpp_3s", "dpmpp_3m", "dpmpp_3m_taylor", "deis_3m", "deis_tab3", "unipc", "pndm",
                   "lms")
SCHEDULE = {"kind": "edm_rho", "rho": 7.0}


@dataclass
class Problem:
    """The model, the seed of the paired noise and the exact solutions from that noise."""

    denoiser: object
    seed: int
    exact: np.ndarray


@dataclass
class Convergence:
    solver: str
    nfes: list[int]
    errors: list[float]
    order: float  # measured: -slope of log exact_err vs log NFE
    theory: int


def make_problem(num_samples: int = 1000, seed: int = 0, models_file: str = "models.yaml") -> Problem:
    denoiser = load_denoiser(load_models(models_file)["gmm2d"])
    return Problem(denoiser, seed, exact_solution(denoiser, seed, num_samples))


def budgets(name: str, targets=TARGET_NFES) -> list[int]:
    """The smallest NFE at or above each target that the solver meets exactly (Heun needs odd NFE)."""
    rule = SOLVERS[name].nfe_rule({})
    nfes = []
    for target in targets:
        steps = max(rule.min_steps, -(-(target + rule.saved_at_end) // rule.per_step))
        nfes.append(rule.nfe(steps))
    return nfes


def measure(problem: Problem, name: str, targets=TARGET_NFES, schedule: dict = SCHEDULE) -> Convergence:
    sampler = make_sampler({"family": "solver", "solver": name, "schedule": schedule})
    nfes = budgets(name, targets)
    errors = []
    for nfe in nfes:
        if sampler.prepare_scope is not None:  # side data (statistics, fitted ratios, searched steps), as a cell has
            sampler.use_prepared(sampler.prepare(problem.denoiser, nfe, CALIBRATION_SEED))
        # as harness.cells.generate does: the first draw is x_T, later draws feed stochastic solvers
        noise = SampleNoise(problem.seed, range(len(problem.exact)))
        start = noise.randn(problem.denoiser.info.data_shape, dtype=torch.float64)
        samples = sampler.sample(problem.denoiser, start, nfe, None, noise)
        errors.append(rms_distance(samples.numpy(), problem.exact))
    slope = np.polyfit(np.log(nfes), np.log(errors), 1)[0]
    return Convergence(name, nfes, errors, float(-slope), SOLVERS[name].order)


def local_orders(c: Convergence) -> list[float]:
    """The order between each pair of neighbouring budgets: -d log exact_err / d log NFE."""
    logs = np.log(c.nfes), np.log(c.errors)
    return list(-np.diff(logs[1]) / np.diff(logs[0]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("solvers", nargs="*", default=list(DEFAULT_SOLVERS), help="solver names (default: %(default)s)")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--models-file", default="models.yaml")
    parser.add_argument("--nfe", type=int, nargs="+", default=list(TARGET_NFES),
                        help="target NFEs, two or more (default: %(default)s); with more than three, the local orders "
                             "between neighbours show where each solver reaches its asymptotic order")
    parser.add_argument("--schedule", type=yaml.safe_load, default=SCHEDULE,
                        help="time steps, as in methods.yaml (default: %(default)s)")
    args = parser.parse_args()

    problem = make_problem(args.samples, models_file=args.models_file)
    print(f"gmm2d ({problem.denoiser.process.kind} process), {args.samples} samples, steps {args.schedule}")
    print(f"{'solver':<16}{'theory':>7}{'measured':>10}   exact_err at NFE   | local orders")
    for name in args.solvers:
        c = measure(problem, name, args.nfe, args.schedule)
        errs = "  ".join(f"{n}: {e:.3e}" for n, e in zip(c.nfes, c.errors))
        local = " ".join(f"{o:.2f}" for o in local_orders(c))
        print(f"{c.solver:<16}{c.theory:>7}{c.order:>10.2f}   {errs}   | {local}")


if __name__ == "__main__":
    main()
