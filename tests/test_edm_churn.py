"""EDM's stochastic sampler (Karras et al. 2022, Alg. 2): euler and heun with s_churn > 0.

On a model whose denoiser is 0 every step is exact (x' = x s_next / s_hat), so the added noise has a variance
that follows from the churn rule alone: gamma = min(s_churn / steps, sqrt(2) - 1) inside [s_tmin, s_tmax],
s_hat = (1 + gamma) s, noise of std s_noise sqrt(s_hat^2 - s^2). The samplers must reproduce it. (Their
agreement with NVlabs/edm's own samplers is recorded in harness.methods.solvers.heun.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import harness.methods.family_solver  # noqa: F401  (registers the solvers)
from harness.methods.solver_base import SOLVERS
from harness.noise import SampleNoise

SIGMAS = [4.0, 2.0, 1.0]  # two steps, not ending at 0 (where x = D = 0 would hide the noise)
N = 20000


def zero_model(x, sigma):
    return torch.zeros_like(x)


def expected_variance(s_churn, s_tmin, s_tmax, s_noise):
    """Per coordinate, from x = 0, written from the churn rule."""
    gamma, variance = min(s_churn / (len(SIGMAS) - 1), math.sqrt(2) - 1), 0.0
    for s, s_next in zip(SIGMAS[:-1], SIGMAS[1:]):
        s_hat = s * (1 + gamma) if s_tmin <= s <= s_tmax else s
        variance = (variance + s_noise**2 * (s_hat**2 - s**2)) * (s_next / s_hat) ** 2
    return variance


@pytest.mark.parametrize("name, params", [("euler", {}), ("heun", {}), ("heun", {"variables": "flow"})])
@pytest.mark.parametrize("churn", [
    {"s_churn": 0.4},  # gamma 0.2 at both levels
    {"s_churn": 5.0, "s_noise": 1.003},  # gamma capped at sqrt(2) - 1
    {"s_churn": 0.4, "s_tmin": 1.5, "s_tmax": 3.0},  # only the level 2 churns
])
def test_churn_adds_the_noise_of_the_rule(name, params, churn):
    x = torch.zeros(N, 2, dtype=torch.float64)
    out = SOLVERS[name].fn(zero_model, x, SIGMAS, noise=SampleNoise(0, range(N)), **params, **churn)
    expected = expected_variance(churn["s_churn"], churn.get("s_tmin", 0.0), churn.get("s_tmax", math.inf),
                                 churn.get("s_noise", 1.0))
    assert float(out.var()) == pytest.approx(expected, rel=0.04)  # 40000 draws: sampling error ~0.7%


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_churn_needs_per_sample_noise(name):
    with pytest.raises(ValueError, match="per-sample noise"):
        SOLVERS[name].fn(zero_model, torch.ones(3, 2), SIGMAS, s_churn=1.0)


class NoDraws:
    def randn_like(self, x):
        raise AssertionError("drew noise")


@pytest.mark.parametrize("name", ["euler", "heun"])
def test_no_churn_draws_nothing_and_changes_nothing(name):
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(5, 2)))
    model = lambda x, s: x / (1 + s**2)  # noqa: E731  (the denoiser of N(0, 1) data)
    plain = SOLVERS[name].fn(model, x, SIGMAS + [0.0])
    windowed_out = SOLVERS[name].fn(model, x, SIGMAS + [0.0], noise=NoDraws(), s_churn=1.0, s_tmin=10.0)
    assert torch.equal(plain, SOLVERS[name].fn(model, x, SIGMAS + [0.0], noise=NoDraws(), s_churn=0.0))
    assert torch.equal(plain, windowed_out)  # no level inside [10, inf): no draw, no change
