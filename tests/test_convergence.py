"""Measured convergence orders on gmm2d match the solvers' theoretical orders (within 0.4).

exact_err at NFE about 20, 40, 80 against the exact PF-ODE solution (benchmarks/convergence_order.py).
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

SOLVERS_TO_CHECK = ["euler", "heun", "dpmpp_2m"]


@pytest.fixture(scope="module")
def problem():
    return convergence_order.make_problem(num_samples=1000, models_file=ROOT / "models.yaml")


@pytest.mark.parametrize("name", SOLVERS_TO_CHECK)
def test_measured_order_matches_theory(problem, name):
    result = convergence_order.measure(problem, name)
    assert abs(result.order - result.theory) <= 0.4, f"{name}: errors {result.errors} at NFE {result.nfes}"
