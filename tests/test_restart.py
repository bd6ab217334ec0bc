"""Restart sampling: its NFE rule against the paper's published budgets, the anchoring of its intervals, and
what a restart does to a sample's distribution. (Its agreement with the reference code is recorded in
harness.methods.restart.)"""

from __future__ import annotations

import pytest
import torch

import harness.methods.family_solver  # noqa: F401  (registers the solvers)
from harness.errors import ConfigError
from harness.methods import make_sampler
from harness.methods.solver_base import SOLVERS
from harness.noise import SampleNoise

# Newbeeer/diffusion_restart_sampling README: ImageNet-64 EDM, 36 main steps, "NFE=203"
IMAGENET = [[4, 1, 19.35, 40.79], [4, 1, 1.09, 1.92], [4, 5, 0.59, 1.09], [4, 5, 0.30, 0.59], [6, 6, 0.06, 0.30]]


def zero_model(x, sigma):
    return torch.zeros_like(x)


@pytest.mark.parametrize("intervals, main_steps, nfe", [(IMAGENET, 36, 203), ([[3, 2, 0.14, 0.30]], 18, 43)])
def test_nfe_rule_gives_the_papers_budgets(intervals, main_steps, nfe):
    assert SOLVERS["restart"].nfe_rule({"intervals": intervals}).nfe(main_steps) == nfe


@pytest.mark.parametrize("intervals", [[[3, 2, 0.14, 0.30]], IMAGENET[2:]])
def test_declared_nfe_is_spent(intervals):
    sampler = make_sampler({"family": "solver", "solver": "restart", "params": {"intervals": intervals}})
    nfe = sampler.nfe_rule.nfe(20)
    calls = []

    def counting(x, sigma):
        calls.append(sigma)
        return x / (1 + sigma**2)

    sigmas = sampler.sigmas(type("P", (), {"sigma_max": 80.0, "sigma_min": 0.002})(), nfe)
    SOLVERS["restart"].fn(counting, torch.zeros(3, 2), sigmas, noise=SampleNoise(0, range(3)), intervals=intervals)
    assert len(sigmas) == 21 and len(calls) == nfe


def test_no_restarts_is_heun():
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    sigmas = [80.0, 10.0, 1.0, 0.1, 0.0]
    model = lambda x, s: x / (1 + s**2)  # noqa: E731
    got = SOLVERS["restart"].fn(model, x, sigmas, intervals=[[3, 0, 1.0, 5.0]])  # K = 0: nothing drawn either
    assert torch.equal(got, SOLVERS["heun"].fn(model, x, sigmas))


def test_a_restart_keeps_the_marginal_variance_of_a_zero_model():
    """x~ = sigma~ z for a point mass at 0: the jump to t_max brings the variance to t_max^2 (s_noise 1), the
    exact ODE steps back scale it to t_min^2, so a restart changes nothing in distribution."""
    n = 20000
    x = 4.0 * SampleNoise(1, range(n)).randn((2,), dtype=torch.float64)
    out = SOLVERS["restart"].fn(zero_model, x, [4.0, 1.0, 0.3], noise=SampleNoise(2, range(n)),
                                intervals=[[3, 2, 1.0, 3.0]], s_noise=1.0, restart_gamma=0.0)
    assert float(out.var()) == pytest.approx(0.3**2, rel=0.04)


@pytest.mark.parametrize("intervals, message", [
    ([[3, 2, 0.3]], r"each interval is \[n, K, t_min, t_max\]"),
    ([[1, 2, 0.3, 1.0]], "needs n >= 2"),
    ([[3, 2, 50.0, 90.0]], "falls on main level 80"),  # the first level: nothing to restart from
    ([[3, 1, 1.0, 2.0], [3, 1, 1.1, 3.0]], "two intervals fall on main level 1"),
])
def test_bad_intervals_are_config_errors(intervals, message):
    with pytest.raises(ConfigError, match=message):
        make_sampler({"family": "solver", "solver": "restart", "params": {"intervals": intervals}})
        SOLVERS["restart"].fn(zero_model, torch.zeros(2, 2), [80.0, 1.0, 0.1, 0.0], noise=SampleNoise(0, range(2)),
                              intervals=intervals)
