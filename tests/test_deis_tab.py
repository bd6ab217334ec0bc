"""DEIS tAB (harness.methods.deis_tab): the coefficients, the special cases and the convergence order.

On EDM (t = sigma~) tAB-k is LMS of order k; tAB-1 is DDIM on every process; with eps a polynomial of
degree < k in native time, tAB-k integrates exactly once its history is full; on gmm2d under the VP
processes (smooth exact PF-ODE solutions, unlike digits-ideal, whose samples snap to training images so
that its error stops falling with NFE) the measured order is k. All in float64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from harness.config import load_methods
from harness.methods import make_sampler
from harness.methods.deis_tab import deis_tab1, deis_tab2, deis_tab3, tab_weights
from harness.methods.lms import lms
from harness.methods.solvers import euler
from harness.metrics.reference import rms_distance
from harness.models import load_denoiser
from harness.noise import SampleNoise
from harness.references import exact_solution
from harness.schedules import VPContinuous, VPDiscrete, edm_rho, sigma_grid

REPO = Path(__file__).resolve().parents[1]
TAB = {1: deis_tab1, 2: deis_tab2, 3: deis_tab3}
PROCESSES = {"vp_discrete": {"kind": "vp_discrete"}, "vp_continuous": {"kind": "vp_continuous"}}


def gmm_on(process_spec):
    return load_denoiser({"adapter": "gmm2d", "process": process_spec, "metrics": []})


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def relative_difference(a, b):
    return float((a - b).norm() / b.norm())


def sigma_levels(process, steps, schedule=None):
    """steps + 1 sigma~ values ending in 0 (schedule: EDM rho 7, non-uniform in t on every process)."""
    return [float(s) for s in sigma_grid(process, steps, schedule or {"kind": "edm_rho", "rho": 7.0})]


def kinks_between(process, lo, hi):
    """Where t(sigma~) bends inside (lo, hi): VPDiscrete's training steps, so quad sees smooth pieces."""
    inner = [float(s) for s in getattr(process, "sigmas", []) if lo < s < hi]
    return [lo, *inner, hi]


def quad_over_sigma(f, process, s_from, s_to):
    """Integral of f(sigma~) from s_from to s_to by scipy, piece by piece."""
    lo, hi = sorted((s_from, s_to))
    points = kinks_between(process, lo, hi)
    total = sum(quad(f, a, b, epsabs=0.0, epsrel=1e-12, limit=200)[0] for a, b in zip(points[:-1], points[1:]))
    return total if s_to > s_from else -total


# ---- the coefficients ----


@pytest.mark.parametrize("kind", PROCESSES)
def test_weights_match_scipy_quadrature(kind):
    """C_j against scipy's adaptive quadrature over sigma~ of l_j(t(sigma~)), on every third-order step."""
    process = gmm_on(PROCESSES[kind]).process
    sigmas = sigma_levels(process, 8)[:-1]
    for i in range(2, len(sigmas) - 1):
        t_nodes = [float(process.t(sigmas[i - k])) for k in range(3)]
        ours = tab_weights(process, t_nodes, sigmas[i], sigmas[i + 1])
        for j, t_j in enumerate(t_nodes):
            others = [t_k for k, t_k in enumerate(t_nodes) if k != j]

            def basis(s, t_j=t_j, others=others):
                t = float(process.t(s))
                return np.prod([(t - t_k) / (t_j - t_k) for t_k in others])

            expected = quad_over_sigma(basis, process, sigmas[i], sigmas[i + 1])
            assert abs(ours[j] - expected) <= 1e-12 * abs(expected), (i, j, ours[j], expected)


# ---- special cases: LMS on EDM, DDIM on VP ----


@pytest.mark.parametrize("order", [1, 2, 3])
def test_tab_is_lms_on_edm(x_T, order):
    """On EDM t = sigma~, so the polynomial in t is LMS's polynomial in sigma~. Compared up to sigma_min:
    LMS integrates its polynomial down to 0 where tAB (like deis.py) takes x = D(x)."""
    gmm = gmm_on({"kind": "edm", "sigma_min": 0.002, "sigma_max": 80.0})
    sigmas = sigma_levels(gmm.process, 12)[:-1]
    x = x_T * sigmas[0]
    ours = TAB[order](gmm, x, sigmas, process=gmm.process)
    assert relative_difference(ours, lms(gmm, x, sigmas, order=order)) <= 1e-10


@pytest.mark.parametrize("kind", PROCESSES)
def test_tab1_is_ddim(x_T, kind):
    gmm = gmm_on(PROCESSES[kind])
    sigmas = sigma_levels(gmm.process, 10)
    x = x_T * gmm.process.prior_std(sigmas[0])
    ours = deis_tab1(gmm, x, sigmas, process=gmm.process)
    assert relative_difference(ours, euler(gmm, x, sigmas)) <= 1e-10


# ---- exactness for eps polynomial in t ----


def eps_polynomial(process, degree):
    """eps(t) = p(t) with p of the given degree in t / t_max; positive, so quad's relative tolerance holds."""
    t_max = process.t_range[1]
    coeffs = [1.0, 2.0, 3.0, 1.5][: degree + 1]
    return lambda t: sum(c * (t / t_max) ** d for d, c in enumerate(coeffs))


def fake_model(process, p, direction):
    """D = x - sigma~ p(t(sigma~)) v: its eps is p(t) v whatever x is."""
    return lambda x, s: x - s * p(float(process.t(s))) * direction


def expected_increment(process, p, sigmas, order):
    """What tAB-`order` must add, computed independently: while the history builds up (first order - 1
    steps) the integral of the interpolant of p through the times so far (numpy's polyfit), after that the
    integral of p itself, each by scipy's quad over sigma~."""
    t = [float(process.t(s)) for s in sigmas]
    total = 0.0
    for i in range(order - 1):
        fit = np.polynomial.polynomial.Polynomial.fit(t[: i + 1], [p(ti) for ti in t[: i + 1]], deg=i)
        total += quad_over_sigma(lambda s, fit=fit: fit(float(process.t(s))), process, sigmas[i], sigmas[i + 1])
    return total + quad_over_sigma(lambda s: p(float(process.t(s))), process, sigmas[order - 1], sigmas[-1])


@pytest.mark.parametrize("kind", PROCESSES)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_tab_exact_for_eps_polynomial_in_t(kind, order):
    process = gmm_on(PROCESSES[kind]).process
    sigmas = sigma_levels(process, 10)[:-1]  # EDM rho 7 steps: far from uniform in t
    direction = torch.tensor([1.0, -0.5], dtype=torch.float64)
    p = eps_polynomial(process, order - 1)
    ours = TAB[order](fake_model(process, p, direction), torch.zeros(1, 2, dtype=torch.float64), sigmas,
                      process=process)
    expected = expected_increment(process, p, sigmas, order) * direction
    assert relative_difference(ours[0], expected) <= 1e-9
    # one degree more is not integrated exactly: the check above has teeth
    p_higher = eps_polynomial(process, order)
    ours = TAB[order](fake_model(process, p_higher, direction), torch.zeros(1, 2, dtype=torch.float64), sigmas,
                      process=process)
    exact = quad_over_sigma(lambda s: p_higher(float(process.t(s))), process, sigmas[0], sigmas[-1]) * direction
    assert relative_difference(ours[0], exact) > 1e-6


# ---- convergence order against the exact PF-ODE solution ----

NFES = (20, 40, 80)
SAMPLES = 64


@pytest.mark.parametrize("kind", PROCESSES)
def test_measured_order_is_k(kind):
    """-slope of log exact_err vs log NFE on time-quadratic steps (the DEIS paper's default for tAB)."""
    gmm = gmm_on(PROCESSES[kind])
    exact = exact_solution(gmm, 0, SAMPLES)
    x_T = SampleNoise(0, range(SAMPLES)).randn((2,), dtype=torch.float64)  # the draws exact_solution starts from
    for order, tab in TAB.items():
        errors = []
        for nfe in NFES:
            sigmas = sigma_levels(gmm.process, nfe, {"kind": "time_quadratic"})
            samples = tab(gmm, x_T * gmm.process.prior_std(sigmas[0]), sigmas, process=gmm.process)
            errors.append(rms_distance(samples.numpy(), exact))
        measured = -np.polyfit(np.log(NFES), np.log(errors), 1)[0]
        assert abs(measured - order) <= 0.4, (order, measured, errors)


# ---- through methods.yaml: the process from the sampler, the NFE ----


@pytest.mark.parametrize("method_id", ["deis_tab2", "deis_tab3"])
def test_methods_yaml_entries_get_the_process_and_spend_one_evaluation_per_step(x_T, method_id):
    gmm = gmm_on(PROCESSES["vp_discrete"])
    spec = load_methods(REPO / "methods.yaml")[method_id]
    sampler = make_sampler(spec)
    calls = []

    class Counting:
        process, info = gmm.process, gmm.info

        def __call__(self, x, s, cond=None):
            calls.append(s)
            return gmm(x, s, cond)

    nfe = 7
    samples = sampler.sample(Counting(), x_T, nfe)
    assert len(calls) == nfe
    sigmas = sampler.sigmas(gmm.process, nfe)
    direct = TAB[int(method_id[-1])](gmm, x_T * gmm.process.prior_std(sigmas[0]), sigmas,
                                     process=gmm.process)
    assert torch.equal(samples, direct)


def test_refuses_to_run_without_the_process(x_T):
    gmm = gmm_on(PROCESSES["vp_continuous"])
    with pytest.raises(ValueError, match="noise process"):
        deis_tab2(gmm, x_T, sigma_levels(gmm.process, 4))


def test_weights_sum_to_the_step():
    """sum_j l_j = 1, so the weights sum to sigma~_next - sigma~ on any process (edm_rho sanity)."""
    for process in (VPDiscrete.from_config(), VPContinuous()):
        sigmas = edm_rho(process, 6)
        t_nodes = [float(process.t(s)) for s in sigmas[2::-1]]
        weights = tab_weights(process, t_nodes, sigmas[2], sigmas[3])
        assert sum(weights) == pytest.approx(sigmas[3] - sigmas[2], rel=1e-13)
