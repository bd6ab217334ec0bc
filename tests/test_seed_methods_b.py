"""Seed-paper accelerators: Gaussian teleportation, DualFast, AutoDiffusion / USF schedule searches,
Denoising MCMC. Honest NFE, batch independence, the building blocks' maths, and each paper's claim
where it holds on the embedded models (see each module's docstring for where it does not)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from harness import prepared
from harness.cells import generate
from harness.config import load_models
from harness.errors import ConfigError, UnsupportedNFE
from harness.methods import make_sampler
from harness.methods.dmcmc import _rowwise_schedules, _solve_rowwise
from harness.methods.schedule_search import (DATA, NOISE, _finite_difference, _taylor_update, unified_solve,
                                             usf_solve)
from harness.methods.family_solver import SOLVERS  # the whole zoo registered
from harness.methods.solver_base import NFERule
from harness.methods.teleport import base_solver, gaussian_flow, restart_schedule
from harness.metrics.reference import rms_distance
from harness.models import load_denoiser
from harness.noise import SampleNoise
from harness.references import exact_solution
from harness.schedules import sigma_grid

REPO = Path(__file__).resolve().parents[1]
SMALL_SEARCH = {"calibration_samples": 8, "max_evals": 12, "population": 4, "reference_steps": 50}
METHODS = {  # id -> (methods.yaml-style spec, an NFE it supports)
    "teleport": ({"family": "solver", "solver": "teleport", "params": {"skip_sigma": 10.0}}, 6),
    "teleport_heun": ({"family": "solver", "solver": "teleport_heun"}, 5),
    "dualfast": ({"family": "solver", "solver": "dualfast", "params": {"base": "euler", "mix": 0.4}}, 6),
    "autodiffusion": ({"family": "solver", "solver": "autodiffusion", "params": SMALL_SEARCH}, 6),
    "usf": ({"family": "solver", "solver": "usf", "params": SMALL_SEARCH}, 6),
    "dmcmc": ({"family": "solver", "solver": "dmcmc", "params": {"start_sigma": 2.0}}, 6),
}


@pytest.fixture(scope="module")
def models():
    return load_models(REPO / "models.yaml")


@pytest.fixture(scope="module")
def denoisers(models):
    return {mid: load_denoiser(models[mid]) for mid in ("gmm2d", "digits-ideal")}


def _generate(models, denoisers, model_id, method_id, spec, nfe, num, batch, cache):
    sampler = make_sampler(spec)
    if sampler.prepare_scope is not None:
        prepared.prepare(sampler, cache, model_id, models[model_id], method_id, spec, nfe)
        prepared.load(sampler, cache, model_id, models[model_id], method_id, spec, nfe)
    return generate(denoisers[model_id], sampler, nfe, 0, num, batch)


@pytest.mark.parametrize("model_id", ["gmm2d", "digits-ideal"])
@pytest.mark.parametrize("method_id", list(METHODS))
def test_nfe_is_honest_and_samples_do_not_depend_on_batch(models, denoisers, tmp_path, model_id, method_id):
    spec, nfe = METHODS[method_id]
    whole = _generate(models, denoisers, model_id, method_id, spec, nfe, 6, 6, tmp_path)
    split = _generate(models, denoisers, model_id, method_id, spec, nfe, 6, 4, tmp_path)
    assert whole.nfe_measured == nfe == split.nfe_measured
    assert whole.status == "ok"
    np.testing.assert_array_equal(whole.samples, split.samples)


def test_dmcmc_rejects_budgets_below_its_mcmc_cost():
    sampler = make_sampler(METHODS["dmcmc"][0])
    sampler.check_nfe(4)
    with pytest.raises(UnsupportedNFE):
        sampler.check_nfe(3)


def test_gaussian_flow_is_the_exact_pf_ode_solution_for_gaussian_data():
    rng = np.random.default_rng(0)
    root = rng.normal(size=(3, 3))
    cov, mean = root @ root.T, rng.normal(size=3)
    lam, vecs = np.linalg.eigh(cov)
    moments = {"mean": torch.tensor(mean), "eigvals": torch.tensor(lam), "eigvecs": torch.tensor(vecs)}
    x = torch.tensor(rng.normal(size=(4, 3)) * 80.0)

    def rhs(s, y):  # dx/dsigma = (x - D(x, sigma)) / sigma, D the Gaussian posterior mean
        pts = y.reshape(4, 3)
        denoised = mean + (pts - mean) @ np.linalg.solve(cov + s**2 * np.eye(3), cov)
        return ((pts - denoised) / s).reshape(-1)

    solved = solve_ivp(rhs, (80.0, 0.5), x.numpy().reshape(-1), rtol=1e-10, atol=1e-10).y[:, -1].reshape(4, 3)
    np.testing.assert_allclose(gaussian_flow(x, 80.0, 0.5, moments).numpy(), solved, rtol=1e-6, atol=1e-6)


def test_teleport_moments_follow_the_documented_rule(denoisers):
    solver = SOLVERS["teleport"]
    mixture = solver.prepare(denoiser=denoisers["gmm2d"], sigmas=None, calibration_seed=1)
    draws = denoisers["gmm2d"].sample_data(200_000, 0)
    assert mixture["source"] == "exact mixture moments"
    np.testing.assert_allclose(mixture["mean"].numpy(), draws.mean(0), atol=0.02)
    np.testing.assert_allclose(np.sort(mixture["eigvals"].numpy()), np.sort(np.linalg.eigvalsh(np.cov(draws.T))),
                               rtol=0.02)
    assert solver.prepare(denoiser=denoisers["digits-ideal"], sigmas=None, calibration_seed=1)["source"] == \
        "dataset digits"


@pytest.mark.parametrize("base", ["ts_dpm", "deis_tab2", "dc_solver"])
def test_wrappers_refuse_base_solvers_needing_a_process_or_prepared_data(base):
    """teleport, DualFast and AutoDiffusion call their base with the sigmas alone."""
    with pytest.raises(ConfigError, match=rf"^teleport: base solver '{base}' not usable here; valid: .*dpmpp_2m"):
        base_solver(base, NFERule(), "teleport")


def test_restart_schedule_keeps_steps_and_starts_at_the_new_level():
    sigmas = [80.0, 20.0, 5.0, 1.0, 0.002, 0.0]
    warped = restart_schedule(sigmas, 10.0)
    assert len(warped) == len(sigmas) and warped[-1] == 0.0
    assert math.isclose(warped[0], 10.0) and math.isclose(warped[-2], 0.002)
    assert all(a > b for a, b in zip(warped[:-1], warped[1:]))


def test_usf_integrator_with_second_order_and_no_corrector_is_dpmpp_2m(denoisers):
    denoiser = denoisers["gmm2d"]
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 80.0
    sigmas = [80.0, 12.0, 2.5, 0.6, 0.05, 0.0]
    ours = usf_solve(denoiser, x, sigmas, [2] * 5, [0] * 5)
    torch.testing.assert_close(ours, SOLVERS["dpmpp_2m"].fn(denoiser, x, sigmas), rtol=1e-12, atol=1e-12)


def test_dmcmc_rowwise_solver_is_dpmpp_2m_on_each_rows_restarted_schedule(denoisers):
    denoiser = denoisers["gmm2d"]
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 3.0
    sigmas = [80.0, 12.0, 2.5, 0.6, 0.05, 0.0]
    starts = torch.tensor([3.0, 3.0, 3.0, 0.9, 0.9, 0.9], dtype=torch.float64)
    ours = _solve_rowwise(denoiser, x, _rowwise_schedules(sigmas, starts), order=2)
    for rows, start in ((slice(0, 3), 3.0), (slice(3, 6), 0.9)):
        expected = SOLVERS["dpmpp_2m"].fn(denoiser, x[rows], restart_schedule(sigmas, start))
        torch.testing.assert_close(ours[rows], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method_id", ["autodiffusion", "usf"])
def test_search_artifact_records_schedule_and_budget(denoisers, method_id):
    spec, nfe = METHODS[method_id]
    sampler = make_sampler(spec)
    artifact = sampler.prepare(denoisers["gmm2d"], nfe, calibration_seed=2**31 - 1)
    sigmas = artifact["sigmas"]
    assert len(sigmas) == nfe + 1 and sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(sigmas[:-1], sigmas[1:]))
    search = artifact["search"]
    assert search["evaluations"] == SMALL_SEARCH["max_evals"]
    assert search["network_evals"] > search["network_evals_reference"] > 0
    assert artifact["objective"] <= artifact["objective_initial"]
    if method_id == "usf":  # the default decision space: every per-step gene recorded
        for gene in ("orders", "predictions", "estimates", "relaxations", "relax_coefs", "correctors"):
            assert len(artifact[gene]) == nfe
        assert set(artifact["predictions"]) <= {DATA, NOISE} and set(artifact["correctors"]) <= {0, 1, 2}


def test_usf_earlier_decision_space_stays_available_and_unknown_spaces_are_refused(denoisers):
    spec = {"family": "solver", "solver": "usf", "params": {**SMALL_SEARCH, "decisions": "unipc"}}
    artifact = make_sampler(spec).prepare(denoisers["gmm2d"], 5, calibration_seed=7)
    assert "predictions" not in artifact and len(artifact["orders"]) == len(artifact["correctors"]) == 5
    assert artifact["objective"] <= artifact["objective_initial"]
    with pytest.raises(ConfigError, match="decisions"):
        make_sampler({"family": "solver", "solver": "usf", "params": {"decisions": "all"}}).prepare(
            denoisers["gmm2d"], 5, calibration_seed=7)


N_STEPS = 5
SECOND_ORDER = {"orders": [2] * N_STEPS, "estimates": [2] * N_STEPS, "relaxations": [1] * N_STEPS,
                "relax_coefs": [0.0] * N_STEPS}


def test_usf_unified_integrator_in_data_prediction_is_dpmpp_2m_and_with_unic_the_earlier_unipc(denoisers):
    denoiser = denoisers["gmm2d"]
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 80.0
    sigmas = [80.0, 9.0, 1.7, 0.4, 0.03, 0.0]
    plain = unified_solve(denoiser, x, sigmas, predictions=[DATA] * N_STEPS, correctors=[0] * N_STEPS, **SECOND_ORDER)
    torch.testing.assert_close(plain, SOLVERS["dpmpp_2m"].fn(denoiser, x, sigmas), rtol=1e-12, atol=1e-12)
    unic = unified_solve(denoiser, x, sigmas, predictions=[DATA] * N_STEPS, correctors=[1] * N_STEPS, **SECOND_ORDER)
    torch.testing.assert_close(unic, usf_solve(denoiser, x, sigmas, [2] * N_STEPS, [1] * N_STEPS),
                               rtol=1e-12, atol=1e-12)
    assert (unic - plain).abs().max() > 1e-3  # the corrector does something


def _dpm_solver_2m_noise_prediction(model, x, sigmas):
    """Multistep DPM-Solver-2 (Lu et al. 2022, noise prediction, 'dpmsolver' variant) with alpha = 1, written
    out by hand: x_t = x_s - (sigma_s - sigma_t) eps_s - (sigma_s - sigma_t) / (2 r) (eps_s - eps_prev),
    r = h_prev / h; first order on the first step and to sigma = 0."""
    eps_prev, h_prev = None, None
    for s, t in zip(sigmas[:-1], sigmas[1:]):
        eps = (x - model(x, s)) / s
        if t == 0:
            return x - s * eps
        h = math.log(s / t)
        x_next = x - (s - t) * eps
        if eps_prev is not None:
            x_next = x_next - (s - t) * (h / h_prev) / 2 * (eps - eps_prev)
        x, eps_prev, h_prev = x_next, eps, h
    return x


def test_usf_unified_integrator_in_noise_prediction_is_multistep_dpm_solver_2(denoisers):
    denoiser = denoisers["digits-ideal"]
    shape = denoiser.info.data_shape
    x = torch.randn(4, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 80.0
    sigmas = [80.0, 9.0, 1.7, 0.4, 0.03, 0.0]
    ours = unified_solve(denoiser, x, sigmas, predictions=[NOISE] * N_STEPS, correctors=[0] * N_STEPS, **SECOND_ORDER)
    torch.testing.assert_close(ours, _dpm_solver_2m_noise_prediction(denoiser, x, sigmas), rtol=1e-10, atol=1e-10)
    data = unified_solve(denoiser, x, sigmas, predictions=[DATA] * N_STEPS, correctors=[0] * N_STEPS, **SECOND_ORDER)
    assert (ours - data).abs().max() > 1e-3  # the prediction type is a real decision


@pytest.mark.parametrize("prediction", [DATA, NOISE])
@pytest.mark.parametrize("coef", [(0.7, -0.4, 0.15), (0.7, -0.4, 0.15, -0.05)], ids=["order3", "order4"])
def test_usf_taylor_step_is_exact_for_a_polynomial_model_output(prediction, coef):
    """With the model output a polynomial of degree p - 1 in lambda = -log sigma, the finite differences over
    p - 1 earlier points give its exact derivatives and the order-p exponential-integrator step is the exact
    ODE solution: data x_t = (sigma_t/sigma_s) x_s + sigma_t int e^lam D dlam; noise x_t = x_s - int e^-lam eps."""
    from scipy.integrate import quad

    order = len(coef)
    value = lambda lam: sum(c * lam ** k for k, c in enumerate(coef))  # noqa: E731
    lams = [-math.log(level) for level in (20.0, 8.0, 3.0, 1.1)[-order:]]  # earlier points, then the start
    lam_t = -math.log(0.2)
    values = [torch.tensor([value(lam)], dtype=torch.float64) for lam in lams]
    earlier = list(range(-order, -1))
    derivatives = [_finite_difference(lams, values, -1, earlier, k) for k in range(1, order)]
    slope = sum(k * c * lams[-1] ** (k - 1) for k, c in enumerate(coef) if k)
    torch.testing.assert_close(derivatives[0], torch.tensor([slope], dtype=torch.float64))
    x_s, s, t = torch.tensor([1.3], dtype=torch.float64), math.exp(-lams[-1]), math.exp(-lam_t)
    step = _taylor_update(x_s, s, t, lam_t - lams[-1], prediction, values[-1], derivatives)
    if prediction == DATA:
        exact = (t / s) * 1.3 + t * quad(lambda lam: math.exp(lam) * value(lam), lams[-1], lam_t)[0]
    else:
        exact = 1.3 - quad(lambda lam: math.exp(-lam) * value(lam), lams[-1], lam_t)[0]
    assert abs(float(step) - exact) < 1e-12


@pytest.mark.parametrize("prediction", [DATA, NOISE])
def test_usf_fourth_order_steps_converge_at_fourth_order(denoisers, prediction):
    """unified_solve keeps the history an order-4 step reaches: all steps order 4 (first derivative from 3
    points) converge at order 4 on gmm2d (exact_err, EDM rho 7, 40 -> 160 steps; measured 3.9 and 4.0)."""
    denoiser = denoisers["gmm2d"]
    exact = exact_solution(denoiser, 0, 300)
    errors, steps = [], [40, 80, 160]
    for n in steps:
        sigmas = [float(v) for v in sigma_grid(denoiser.process, n, {"kind": "edm_rho", "rho": 7.0})]
        x = SampleNoise(0, range(300)).randn(denoiser.info.data_shape, dtype=torch.float64)
        x = x * denoiser.process.prior_std(sigmas[0])
        out = unified_solve(denoiser, x, sigmas, orders=[4] * n, predictions=[prediction] * n, estimates=[3] * n,
                            relaxations=[0] * n, relax_coefs=[0.0] * n, correctors=[0] * n)
        errors.append(rms_distance(out.numpy(), exact))
    measured = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(measured - 4) <= 0.4, f"measured order {measured:.2f}, errors {errors}"


# ---- the papers' claims on gmm2d, exact_err from the same noise ----

CLAIM_SAMPLES = 200
CLAIMS = {  # method -> (spec with the method's defaults, its base solver)
    "teleport": ({"family": "solver", "solver": "teleport", "params": {"base": "dpmpp_2m", "skip_sigma": 10.0}},
                 "dpmpp_2m"),
    "dualfast": ({"family": "solver", "solver": "dualfast", "params": {"base": "euler", "mix": 0.4}}, "euler"),
    "autodiffusion": ({"family": "solver", "solver": "autodiffusion"}, "dpmpp_2m"),
    "usf": ({"family": "solver", "solver": "usf"}, "dpmpp_2m"),
}


@pytest.fixture(scope="module")
def gmm_exact(denoisers):
    return exact_solution(denoisers["gmm2d"], 0, CLAIM_SAMPLES)


@pytest.mark.parametrize("nfe", [8, 10])
@pytest.mark.parametrize("method_id", list(CLAIMS))
def test_beats_its_base_solver_on_gmm2d(models, denoisers, gmm_exact, tmp_path, method_id, nfe):
    spec, base = CLAIMS[method_id]
    ours = _generate(models, denoisers, "gmm2d", method_id, spec, nfe, CLAIM_SAMPLES, CLAIM_SAMPLES, tmp_path)
    theirs = _generate(models, denoisers, "gmm2d", base, {"family": "solver", "solver": base}, nfe, CLAIM_SAMPLES,
                       CLAIM_SAMPLES, tmp_path)
    assert rms_distance(ours.samples, gmm_exact) < rms_distance(theirs.samples, gmm_exact)


def _energy_distance(x: np.ndarray, y: np.ndarray) -> float:
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


@pytest.mark.parametrize("nfe", [8, 10])
def test_dmcmc_samples_the_distribution_better_than_its_base_on_gmm2d(models, denoisers, tmp_path, nfe):
    """DMCMC is stochastic, so its claim is distributional (the paper: FID): energy distance to exact
    mixture draws, against DPM-Solver++(2M) at the same NFE."""
    data = denoisers["gmm2d"].sample_data(2000, 123)
    spec = METHODS["dmcmc"][0]
    ours = _generate(models, denoisers, "gmm2d", "dmcmc", spec, nfe, 500, 500, tmp_path)
    base = _generate(models, denoisers, "gmm2d", "dpmpp_2m", {"family": "solver", "solver": "dpmpp_2m"}, nfe, 500,
                     500, tmp_path)
    assert _energy_distance(ours.samples, data) < _energy_distance(base.samples, data)
