"""Ancestral samplers' own properties (their agreement with diffusers is in test_solver_zoo).

With a denoiser that is 0, x~ = sigma~ z has exactly the marginal variance sigma~^2 of that model's data
(a point mass at 0), and an ancestral step keeps it: the deterministic step scales x~ by sigma_down / sigma,
then noise of std sigma_up brings the variance to sigma_down^2 + sigma_up^2 = sigma'^2.
"""

from __future__ import annotations

import pytest
import torch

import harness.methods.family_solver  # noqa: F401  (registers the solvers)
from harness.errors import ConfigError
from harness.methods.solver_base import SOLVERS
from harness.noise import SampleNoise

ANCESTRAL = ["euler_ancestral", "dpm2_ancestral", "dpmpp_2s_ancestral"]
SIGMAS = [10.0, 3.0, 1.0, 0.3]  # three steps, not ending at 0 (where x = D = 0)
N = 20000


def zero_model(x, sigma):
    return torch.zeros_like(x)


@pytest.mark.parametrize("name", ANCESTRAL)
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ancestral_steps_keep_the_marginal_variance(name, eta):
    x = SIGMAS[0] * SampleNoise(1, range(N)).randn((2,), dtype=torch.float64)
    out = SOLVERS[name].fn(zero_model, x, SIGMAS, noise=SampleNoise(2, range(N)), eta=eta)
    assert float(out.var()) == pytest.approx(SIGMAS[-1] ** 2, rel=0.04)  # 40000 draws: sampling error ~0.7%


@pytest.mark.parametrize("name, deterministic", [("dpm2_ancestral", "dpm_solver_2"), ("dpmpp_2s_ancestral", "dpmpp_2s"),
                                                 ("euler_ancestral", "euler")])
def test_eta_zero_is_the_deterministic_solver(name, deterministic):
    x = torch.randn(50, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMAS[0]
    model = lambda x, s: x / (1 + s**2)  # noqa: E731  (the denoiser of N(0, 1) data)
    sigmas = SIGMAS + [0.0]
    expected = SOLVERS[deterministic].fn(model, x, sigmas)
    got = SOLVERS[name].fn(model, x, sigmas, noise=SampleNoise(0, range(50)), eta=0.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["dpm2_ancestral", "dpmpp_2s_ancestral"])
def test_second_order_ancestral_refuses_eta_beyond_one(name):
    with pytest.raises(ConfigError, match=r"eta must be in \[0, 1\]"):
        SOLVERS[name].fn(zero_model, torch.ones(2, 2), SIGMAS, noise=SampleNoise(0, range(2)), eta=1.5)
