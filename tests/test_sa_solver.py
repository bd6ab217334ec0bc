"""SA-Solver (harness.methods.sa_solver) against diffusers' SASolverScheduler on the exact gmm2d model.

Same model (DDPM linear betas), same x_T, same integer timesteps (diffusers' default "linspace" spacing) with
their float64 noise levels installed in the scheduler, float64 throughout, and the same standard-normal draws
on the steps where tau > 0 (diffusers draws on every step and multiplies the draw by 0 where tau = 0;
stepbench draws only where tau > 0, so the test hands diffusers zeros on the others: a draw taken on a wrong
step would shift every later one).

diffusers cannot step to sigma~ = 0 (lambda = inf) and ends at sigma~ of timestep 0 without denoising, where
stepbench's last step is x = D. Two ways to put them side by side:
- lower_order_final (diffusers' default): diffusers' grid ends in sigma~ = 1e-15 instead of 0, where its
  first-order last step is x = D to ~1e-15, and the orders fall off over the same steps as stepbench's;
- lower_order_final=False: diffusers runs to sigma~(0) and the test applies D there; stepbench's grid is
  diffusers' levels, then sigma~(0), then 0.
Both agree to 4e-16..2e-14 (relative) with data prediction, and to 5e-11 with noise prediction (diffusers'
rounding, see the module docstring), far inside RTOL = 1e-5. No deviation of diffusers from the paper's reference code
(scxue/SA-Solver) was found on this path; the differences between those two, where tau is read within a step
and the reference's tau = 0 on its last step, are described in the module docstring.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_sasolver as diffusers_sasolver  # noqa: E402
from diffusers import SASolverScheduler  # noqa: E402
from test_solver_zoo import SharedNoise, denoise_unscaled, grid, solve, trailing_timesteps  # noqa: E402
from test_solvers_vs_diffusers import (  # noqa: E402
    DIFFUSERS_BETAS,
    RTOL,
    eps_network,
    gmm,  # noqa: F401  (fixture)
    relative_difference,
    x_T,  # noqa: F401  (fixture)
)

from harness.errors import ConfigError  # noqa: E402
from harness.methods import make_sampler  # noqa: E402
from harness.methods.family_solver import SOLVERS  # noqa: E402
from harness.methods.sa_solver import DIFFUSERS_TAU_WINDOW  # noqa: E402
from harness.metrics.reference import rms_distance  # noqa: E402
from harness.nfe import CountingDenoiser  # noqa: E402
from harness.noise import SampleNoise  # noqa: E402
from harness.schedules import VPDiscrete  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
STEP_COUNTS = (5, 10, 20)
WINDOW = "window"  # diffusers' default tau_func (1 for timesteps 200..800) = stepbench's default tau
# (predictor_order, corrector_order, tau)
SETTINGS = [
    (2, 2, WINDOW),  # diffusers' defaults
    (2, 2, 0.0),  # the deterministic solver
    (3, 4, WINDOW),  # the authors' recommendation for unconditional models
    (3, 4, 0.0),
    (1, 1, 0.0),
    (4, 4, 1.0),  # the reverse diffusion SDE throughout
    (1, 3, 0.5),
    (4, 2, 0.5),
]
ids = [f"p{p}-c{c}-tau_{tau}" for p, c, tau in SETTINGS]


def diffusers_sa_solver(gmm, x_T, steps, predictor_order, corrector_order, tau, prediction, lower_order_final,
                        last_sigma, noise, monkeypatch):
    """SASolverScheduler over `steps` linspace timesteps, its last level replaced by `last_sigma`, drawing from
    `noise` where tau > 0 (zeros elsewhere). Returns the float64 levels of its timesteps and its final sample."""
    scheduler = SASolverScheduler(
        **DIFFUSERS_BETAS, predictor_order=predictor_order, corrector_order=corrector_order,
        lower_order_final=lower_order_final, tau_func=None if tau == WINDOW else (lambda t: tau),
        algorithm_type=f"{prediction}_prediction",
    )
    scheduler.set_timesteps(steps)
    levels = grid(gmm.process, scheduler.timesteps, final_zero=False)
    scheduler.sigmas = torch.tensor(levels + [last_sigma], dtype=torch.float64)
    draws = iter([noise.randn_like(None) if scheduler.tau_func(t) > 0 else torch.zeros_like(x_T)
                  for t in scheduler.timesteps.tolist()])
    monkeypatch.setattr(diffusers_sasolver, "randn_tensor", lambda *args, **kwargs: next(draws))
    net, sample = eps_network(gmm), x_T
    for t in scheduler.timesteps:
        sample = scheduler.step(net(sample, t), t, sample).prev_sample
    return levels, sample


def params(predictor_order, corrector_order, tau, prediction, **extra):
    """stepbench's parameters; tau and prediction left at their defaults for diffusers' default window and data."""
    return {"predictor_order": predictor_order, "corrector_order": corrector_order,
            **({} if tau == WINDOW else {"tau": tau}), **({} if prediction == "data" else {"prediction": prediction}),
            **extra}


@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("predictor_order, corrector_order, tau", SETTINGS, ids=ids)
def test_matches_diffusers(gmm, x_T, predictor_order, corrector_order, tau, steps, prediction, monkeypatch):
    """lower_order_final (both defaults): diffusers' grid ends at 1e-15, stepbench's at 0."""
    noise = SharedNoise(x_T.shape)
    levels, expected = diffusers_sa_solver(gmm, x_T, steps, predictor_order, corrector_order, tau, prediction, True,
                                           1e-15, noise.fresh(), monkeypatch)
    got = solve("sa_solver", gmm, x_T, levels + [0.0], noise=noise.fresh(),
                **params(predictor_order, corrector_order, tau, prediction))
    assert relative_difference(got, expected) <= RTOL


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("predictor_order, corrector_order, tau", SETTINGS, ids=ids)
def test_matches_diffusers_at_full_order_to_sigma_min(gmm, x_T, predictor_order, corrector_order, tau, steps,
                                                      monkeypatch):
    """lower_order_final=False: diffusers down to sigma~(0) at full order, then x = D there; stepbench's grid has
    that level and then 0 (one step and one evaluation more). Data prediction only: noise prediction's step to 0
    starts from the point corrected at sigma~(0), which diffusers computes only within a further step."""
    prediction = "data"
    noise = SharedNoise(x_T.shape)
    sigma_min = float(gmm.process.sigma(0))
    levels, x_min = diffusers_sa_solver(gmm, x_T, steps, predictor_order, corrector_order, tau, prediction, False,
                                        sigma_min, noise.fresh(), monkeypatch)
    got = solve("sa_solver", gmm, x_T, levels + [sigma_min, 0.0], noise=noise.fresh(),
                **params(predictor_order, corrector_order, tau, prediction, lower_order_final=False))
    assert relative_difference(got, denoise_unscaled(gmm, x_min, sigma_min)) <= RTOL


def test_default_window_is_diffusers_default_tau_func():
    """On diffusers' default process the window holds exactly the training timesteps 200..800 (tau = 1 there)."""
    process = VPDiscrete.from_config(**DIFFUSERS_BETAS)
    tau_func = SASolverScheduler(**DIFFUSERS_BETAS).tau_func
    lo, hi = DIFFUSERS_TAU_WINDOW
    for levels in (process.sigmas, process.sigma(np.arange(1000))):
        assert [lo <= s <= hi for s in levels] == [tau_func(t) == 1 for t in range(1000)]


# ---- NFE, noise ----


@pytest.mark.parametrize("sampler_params", [{}, {"tau": 0.0}, {"predictor_order": 3, "corrector_order": 4},
                                            {"predictor_order": 4, "corrector_order": 1, "tau": 1.0,
                                             "lower_order_final": False}])
def test_declared_nfe_is_measured_nfe(gmm, sampler_params):
    """Through the sampler and the NFE counter, as a cell runs it: one evaluation per step."""
    sampler = make_sampler({"family": "solver", "solver": "sa_solver", "params": sampler_params})
    rule = SOLVERS["sa_solver"].nfe
    for steps in (rule.min_steps, rule.min_steps + 1, rule.min_steps + 6):
        counted, noise = CountingDenoiser(gmm), SampleNoise(0, range(8))
        start = noise.randn(gmm.info.data_shape, dtype=torch.float64)
        sampler.sample(counted, start, rule.nfe(steps), None, noise)
        assert counted.nfe_per_sample(8) == rule.nfe(steps) == steps


def test_refuses_to_run_stochastic_without_noise(gmm, x_T):
    sigmas = grid(gmm.process, trailing_timesteps(5))
    for stochastic in ({}, {"tau": 1.0}, {"tau": 0.3, "predictor_order": 3}, {"tau": [0.5, 5.0]}):
        with pytest.raises(ValueError, match="per-sample noise"):
            solve("sa_solver", gmm, x_T, sigmas, **stochastic)
    # deterministic: tau 0, or a window that no step starts in
    for deterministic in ({"tau": 0.0}, {"tau": [1e3, 1e4]}):
        assert torch.isfinite(solve("sa_solver", gmm, x_T, sigmas, **deterministic)).all()


@pytest.mark.parametrize("bad", [{"predictor_order": 5}, {"corrector_order": 0}, {"tau": -1.0}, {"tau": [2.0, 1.0]},
                                 {"tau": "high"}, {"prediction": "v"}])
def test_bad_params_are_config_errors(gmm, x_T, bad):
    with pytest.raises(ConfigError, match="sa_solver"):
        solve("sa_solver", gmm, x_T, grid(gmm.process, trailing_timesteps(5)), noise=SharedNoise(x_T.shape), **bad)


@pytest.mark.parametrize("prediction", ["data", "noise"])
def test_a_sample_does_not_depend_on_its_batch(gmm, prediction):
    """Per-sample draws: samples 2, 3 of a batch of 6 are the samples of a batch holding only them (with noise
    prediction and tau = 1 the step to 0 draws too)."""
    sigmas = grid(gmm.process, trailing_timesteps(10))

    def run(indices):
        noise = SampleNoise(11, indices)
        x = noise.randn(gmm.info.data_shape, dtype=torch.float64) * gmm.process.prior_std(sigmas[0])
        return SOLVERS["sa_solver"].fn(lambda x, s: gmm(x, s), x, sigmas, noise=noise, tau=1.0, prediction=prediction)

    torch.testing.assert_close(run(range(6))[2:4], run([2, 3]), rtol=1e-12, atol=0)


# ---- the registered order ----


def _convergence_order():
    """benchmarks/convergence_order.py, loaded once (tests/test_convergence.py loads it the same way)."""
    if "convergence_order" not in sys.modules:
        spec = importlib.util.spec_from_file_location("convergence_order", ROOT / "benchmarks" / "convergence_order.py")
        module = sys.modules["convergence_order"] = importlib.util.module_from_spec(spec)  # for dataclasses
        spec.loader.exec_module(module)
    return sys.modules["convergence_order"]


@pytest.fixture(scope="module")
def problem():
    return _convergence_order().make_problem(num_samples=300, models_file=ROOT / "models.yaml")


@pytest.mark.parametrize("sampler_params, order", [
    ({"tau": 0.0}, SOLVERS["sa_solver"].order),
    ({"tau": 0.0, "predictor_order": 3, "corrector_order": 4}, 4),
    ({"tau": 0.0, "prediction": "noise"}, 2),
    ({"tau": 0.0, "prediction": "noise", "predictor_order": 2, "corrector_order": 3}, 3),
])
def test_deterministic_order(problem, sampler_params, order):
    """With tau = 0, PEC with an order-p predictor and an order-c corrector converges with order min(c, p + 1),
    in data and in noise prediction: 2 at diffusers' defaults (the registered order), 4 at 3, 4. exact_err on
    gmm2d (EDM rho 7) at NFE 80-320, where they are in their asymptotic range (at 20-80 the defaults measure 2.8)."""
    sampler = make_sampler({"family": "solver", "solver": "sa_solver", "params": sampler_params,
                            "schedule": _convergence_order().SCHEDULE})
    nfes, errors = [80, 160, 320], []
    for nfe in nfes:
        noise = SampleNoise(problem.seed, range(len(problem.exact)))
        start = noise.randn(problem.denoiser.info.data_shape, dtype=torch.float64)
        errors.append(rms_distance(sampler.sample(problem.denoiser, start, nfe, None, noise).numpy(), problem.exact))
    measured = -np.polyfit(np.log(nfes), np.log(errors), 1)[0]
    assert abs(measured - order) <= 0.4, f"measured order {measured:.2f}, errors {errors}"
