"""Measured convergence orders on gmm2d match the solvers' theoretical orders (within 0.4).

exact_err against the exact PF-ODE solution from the same noise (benchmarks/convergence_order.py), at NFE
about 20, 40, 80. Some solvers reach their asymptotic order only beyond that (the benchmark's local orders
show it, e.g. `--nfe 20 40 80 160 320 640`), and are measured where they have:
- the singlestep third-order solvers (7 steps at NFE 22: local orders 4.0, 3.4, 3.1 for DPM-Solver-3 and
  2.0, 2.6, 2.7, 2.9 for DPM-Solver++(3S)) and PNDM (its 12-evaluation Runge-Kutta warm-up dominates
  small budgets) at 40, 80, 160;
- the published DPM-Solver++(3M), second order (see harness.methods.dpm_solver.dpmpp_3m) but with a small
  second-order error term, so it looks third order up to NFE ~40 (local orders 3.8, 1.9, 1.7, 1.9, 1.9),
  at 160, 320, 640.
LMS (order 4) measures 3.2 at 20-80 and 3.6 at 40-160 and is not checked here.

On the logSNR-uniform steps that the DPM-Solver papers use for their own solvers, DPM-Solver-3 (3.3) and the
published DPM-Solver++(3M) (2.3: its true order 2 shows already) are in their asymptotic range at 20-80 and are
checked there too. Of EDM rho 3/5/7, logSNR-uniform and time-quadratic steps, DPM-Solver++(3S) is within 0.4
at 20-80 only on time-quadratic (3.0, checked; logSNR-uniform 2.6), and PNDM on none (3.1 to 3.5, above
its order 2).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("convergence_order", ROOT / "benchmarks" / "convergence_order.py")
convergence_order = sys.modules["convergence_order"] = importlib.util.module_from_spec(_spec)  # for dataclasses
_spec.loader.exec_module(convergence_order)

WINDOW = (20, 40, 80)
LATE_WINDOW = (40, 80, 160)
ASYMPTOTIC_WINDOW = (160, 320, 640)
EDM_RHO7 = convergence_order.SCHEDULE
LOGSNR = {"kind": "logsnr_uniform"}
TIME_QUADRATIC = {"kind": "time_quadratic"}
CHECKS = [
    *[(name, WINDOW, EDM_RHO7) for name in ("euler", "heun", "dpmpp_2m", "dpm_solver_2", "dpmpp_2s", "deis_2m",
                                            "plms", "ipndm", "dpmpp_3m_taylor", "deis_3m", "unipc")],
    *[(name, LATE_WINDOW, EDM_RHO7) for name in ("dpm_solver_3", "dpmpp_3s", "pndm")],
    ("dpmpp_3m", ASYMPTOTIC_WINDOW, EDM_RHO7),
    ("dpm_solver_3", WINDOW, LOGSNR),
    ("dpmpp_3m", WINDOW, LOGSNR),
    ("dpmpp_3s", WINDOW, TIME_QUADRATIC),
]


@pytest.fixture(scope="module")
def problem():
    return convergence_order.make_problem(num_samples=300, models_file=ROOT / "models.yaml")


@pytest.mark.parametrize("name, targets, schedule", CHECKS, ids=lambda v: v["kind"] if isinstance(v, dict) else None)
def test_measured_order_matches_theory(problem, name, targets, schedule):
    result = convergence_order.measure(problem, name, targets, schedule)
    assert abs(result.order - result.theory) <= 0.4, (
        f"{name}: measured order {result.order:.2f}, errors {result.errors} at NFE {result.nfes}"
    )
