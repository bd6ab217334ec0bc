"""Cross-check the solver zoo against diffusers' schedulers on the exact gmm2d model (DDPM linear betas).

Same model, same x_T, same noise levels, float64 (see test_solvers_vs_diffusers for the conventions).
Where a stepbench solver evaluates at noise levels diffusers would only reach by integer timesteps
(singlestep intermediate points at fractions of a step in lambda), `install_grid` gives the scheduler the
exact float64 sigma~ list and the matching fractional timesteps after set_timesteps, and the network maps
timesteps back through the process. Stochastic samplers share their noise: stepbench reads it through
`SharedNoise.randn_like`, diffusers as `variance_noise` or through its `randn_tensor`.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm  # noqa: E402
import diffusers.schedulers.scheduling_euler_ancestral_discrete as diffusers_euler_ancestral  # noqa: E402
import diffusers.schedulers.scheduling_k_dpm_2_ancestral_discrete as diffusers_kdpm2_ancestral  # noqa: E402
from diffusers import (  # noqa: E402
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerAncestralDiscreteScheduler,
    IPNDMScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from test_solvers_vs_diffusers import (  # noqa: E402
    DIFFUSERS_BETAS,
    RTOL,
    ddim_scheduler,
    eps_network,
    gmm,  # noqa: F401  (fixture)
    promote_sigmas,
    relative_difference,
    run_scheduler,
    use_float64_tables,
    x_T,  # noqa: F401  (fixture)
)

import harness.methods.family_solver  # noqa: E402,F401  (registers the zoo)
from harness.methods.solver_base import SOLVERS  # noqa: E402
from harness.schedules import make_process  # noqa: E402

pytestmark = [  # numpy 2 / deprecation noise from inside diffusers
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:`algorithm_types=dpmsolver` is deprecated:FutureWarning"),
]
STEP_COUNTS = (5, 10, 20)


def trailing_timesteps(steps):
    return ddim_scheduler(steps, "trailing").timesteps.tolist()  # 999, ..., ending well above 0


def leading_timesteps(steps):
    return ddim_scheduler(steps, "leading").timesteps.tolist()  # ..., 0: the last one is sigma_min


def grid(process, timesteps, final_zero=True):
    sigmas = [float(process.sigma(t)) for t in timesteps]
    return sigmas + [0.0] if final_zero else sigmas


def install_grid(scheduler, process, sigmas):
    """After set_timesteps with the right count: the exact sigma~ list (ending in the final level) and the
    fractional timesteps the network reads it back from."""
    scheduler.sigmas = torch.tensor(sigmas, dtype=torch.float64)
    scheduler.timesteps = torch.from_numpy(np.asarray(process.t(np.asarray(sigmas[:-1]))))


def with_intermediates(sigmas, fractions):
    """Each step s -> s_next except the last split at the given fractions of its lambda length."""
    points = []
    for s, s_next in zip(sigmas[:-2], sigmas[1:-1]):
        points += [s] + [s * (s_next / s) ** r for r in fractions]
    return points + sigmas[-2:]


def solve(name, gmm, x_T, sigmas, noise=None, **params):
    """A registered solver from x~ = x_T / alpha(sigmas[0])."""
    x = x_T / float(gmm.process.alpha(sigmas[0]))
    return SOLVERS[name].fn(lambda x, s: gmm(x, s), x, sigmas, noise=noise, **params)


def denoise_unscaled(gmm, x_t, sigma):
    """The final step x = D(x~, sigma~) that stepbench takes where diffusers stops at sigma_min."""
    return gmm(x_t / float(gmm.process.alpha(sigma)), sigma)


class SharedNoise:
    """The same standard-normal draws, in order, for stepbench (randn_like) and diffusers (__call__)."""

    def __init__(self, shape, count=64):
        gen = torch.Generator().manual_seed(7)
        # float32 draws, as SampleNoise makes them and as some diffusers steps cast them
        self.draws = [torch.randn(shape, generator=gen).double() for _ in range(count)]
        self.used = 0

    def randn_like(self, x):
        self.used += 1
        return self.draws[self.used - 1]

    def __call__(self, *args, **kwargs):
        return self.randn_like(None)

    def fresh(self):
        other = SharedNoise.__new__(SharedNoise)
        other.draws, other.used = self.draws, 0
        return other


# ---- DPM-Solver family ----


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name, order", [("dpm_solver_2", 2), ("dpm_solver_3", 3)])
def test_dpm_solver_singlestep_noise_prediction(gmm, x_T, name, order, steps):
    """diffusers' noise-prediction DPM-Solver cannot step to sigma 0; it stops at sigma_min, where
    stepbench's grid ends with its last step x = D(x)."""
    sigmas = grid(gmm.process, leading_timesteps(steps))
    points = with_intermediates(sigmas, [k / order for k in range(1, order)])[:-1]  # up to sigma_min
    scheduler = DPMSolverSinglestepScheduler(
        **DIFFUSERS_BETAS, algorithm_type="dpmsolver", solver_order=order, solver_type="midpoint",
        lower_order_final=False, final_sigmas_type="sigma_min",
    )
    scheduler.set_timesteps(len(points) - 1)
    install_grid(scheduler, gmm.process, points)
    x_min = run_scheduler(scheduler, eps_network(gmm), x_T)
    expected = denoise_unscaled(gmm, x_min, sigmas[-2])
    assert relative_difference(solve(name, gmm, x_T, sigmas), expected) <= RTOL


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name, order", [("dpmpp_2s", 2), ("dpmpp_3s", 3)])
def test_dpmpp_singlestep(gmm, x_T, name, order, steps):
    sigmas = grid(gmm.process, trailing_timesteps(steps))
    points = with_intermediates(sigmas, [k / order for k in range(1, order)])
    scheduler = DPMSolverSinglestepScheduler(
        **DIFFUSERS_BETAS, algorithm_type="dpmsolver++", solver_order=order, solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero",
    )
    scheduler.set_timesteps(len(points) - 1)
    install_grid(scheduler, gmm.process, points)
    expected = run_scheduler(scheduler, eps_network(gmm), x_T)
    assert relative_difference(solve(name, gmm, x_T, sigmas), expected) <= RTOL


def dpm_multistep(gmm, timesteps, scheduler_class=DPMSolverMultistepScheduler, **config):
    scheduler = scheduler_class(**DIFFUSERS_BETAS, final_sigmas_type="zero", **config)
    use_float64_tables(scheduler, gmm.process)
    scheduler.set_timesteps(timesteps=timesteps)
    promote_sigmas(scheduler, gmm.process)
    return scheduler


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_dpmpp_3m(gmm, x_T, steps):
    """lower_order_final=False: full order up to the last step, which final_sigmas_type='zero' makes x = D."""
    timesteps = trailing_timesteps(steps)
    scheduler = dpm_multistep(gmm, timesteps, algorithm_type="dpmsolver++", solver_order=3, lower_order_final=False)
    expected = run_scheduler(scheduler, eps_network(gmm), x_T)
    assert relative_difference(solve("dpmpp_3m", gmm, x_T, grid(gmm.process, timesteps)), expected) <= RTOL


def ode_third_step_error(name):
    """A data prediction D quadratic in lambda = -log sigma~ (independent of x), over lambda steps 0.5, 0.4,
    0.45: the third (third-order) step's relative distance from the PF-ODE's exact
    x' = e^-h x + int e^-(lambda' - lambda) D(lambda) dlambda."""
    coefficients = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def model(x, sigma):
        lam = -math.log(sigma)
        return coefficients[0] + coefficients[1] * lam + coefficients[2] * lam**2

    lambdas = np.cumsum([-1.0, 0.5, 0.4, 0.45])
    sigmas, h = list(np.exp(-lambdas)), 0.45
    x = torch.ones(4, 2, dtype=torch.float64)
    x_2, x_3 = (SOLVERS[name].fn(model, x, grid) for grid in (sigmas[:3], sigmas))
    nodes, weights = np.polynomial.legendre.leggauss(20)  # exact for this integrand to rounding
    drift = h / 2 * sum(w * math.exp(-h * (1 - u) / 2) * model(None, sigmas[2] * math.exp(-h * (u + 1) / 2))
                        for w, u in zip(weights, nodes))
    exact = math.exp(-h) * x_2 + drift
    return float((x_3 - exact).norm() / exact.norm())


def test_dpmpp_3m_taylor_is_exact_for_quadratic_data_predictions_and_the_published_3m_is_not():
    """The published 3M weighs the second difference half as much as the quadratic's integral needs
    (see harness.methods.dpm_solver.dpmpp_3m); dpmpp_3m_taylor has the exact weight."""
    assert ode_third_step_error("dpmpp_3m_taylor") < 1e-13
    assert ode_third_step_error("dpmpp_3m") > 1e-4


class SDEThirdOrderFixed(DPMSolverMultistepScheduler):
    """diffusers' sde-dpmsolver++ third-order step weighs D2 by (1 - e^-2h - 2h) / (2h)^2 - 0.5 where its ODE
    step with h doubled (and k-diffusion's sample_dpmpp_3m_sde) has + 0.5: this adds the missing alpha_t D2."""

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kwargs):
        x_t = super().multistep_dpm_solver_third_order_update(model_output_list, sample=sample, noise=noise)
        lambdas = [-torch.log(self.sigmas[self.step_index + 1 - k]) for k in range(4)]  # t, s0, s1, s2
        h, h_0, h_1 = (lambdas[k] - lambdas[k + 1] for k in range(3))
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d2 = ((m0 - m1) * h / h_0 - (m1 - m2) * h / h_1) / ((h_0 + h_1) / h)  # as diffusers builds it
        alpha_t, _ = self._sigma_to_alpha_sigma_t(self.sigmas[self.step_index + 1])
        return x_t + alpha_t * d2


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name, order", [("sde_dpmpp_2m", 2), ("sde_dpmpp_3m", 3)])
def test_sde_dpmpp_multistep_with_shared_noise(gmm, x_T, name, order, steps):
    """lower_order_final=False: full order up to the last step, which final_sigmas_type='zero' makes x = D.
    Float32 steps in diffusers: ~1e-7 for 2M and (with its third-order term fixed) 3M."""
    timesteps = trailing_timesteps(steps)
    scheduler = dpm_multistep(gmm, timesteps, SDEThirdOrderFixed, algorithm_type="sde-dpmsolver++",
                              solver_order=order, lower_order_final=False)
    noise = SharedNoise(x_T.shape)
    net, sample, diffusers_noise = eps_network(gmm), x_T, noise.fresh()
    for t in scheduler.timesteps:
        sample = scheduler.step(net(sample, t), t, sample, variance_noise=diffusers_noise(None)).prev_sample
    got = solve(name, gmm, x_T, grid(gmm.process, timesteps), noise=noise.fresh())
    assert relative_difference(got, sample) <= RTOL


def third_order_step_error(h):
    """A data prediction D quadratic in lambda = -log sigma~ (and independent of x), over lambda steps
    1.3 h, 0.8 h, h: the third step's distance from the reverse SDE's x' = e^-2h x + int 2 e^-2(lambda' - lambda)
    D(lambda) dlambda (noise off)."""
    coefficients = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def model(x, sigma):
        lam = -math.log(sigma)
        return coefficients[0] + coefficients[1] * lam + coefficients[2] * lam**2

    lambdas = np.cumsum([-1.0, 1.3 * h, 0.8 * h, h])
    sigmas, no_noise = list(np.exp(-lambdas)), types.SimpleNamespace(randn_like=torch.zeros_like)
    x = torch.ones(4, 2, dtype=torch.float64)
    x_2, x_3 = (SOLVERS["sde_dpmpp_3m"].fn(model, x, grid, noise=no_noise) for grid in (sigmas[:3], sigmas))
    nodes, weights = np.polynomial.legendre.leggauss(20)
    # Gauss-Legendre on lambda = lambda_2 + (u + 1) h / 2: d lambda = h / 2 du, times the integrand's 2
    drift = h * sum(w * math.exp(-h * (1 - u)) * model(None, sigmas[2] * math.exp(-h * (u + 1) / 2))
                    for w, u in zip(weights, nodes))
    return float((x_3 - math.exp(-2 * h) * x_2 - drift).abs().max())


def test_sde_dpmpp_3m_third_order_step_has_local_error_of_order_3():
    """Halving h divides the error by ~8 (diffusers' D2 weight, off by 1, would leave an O(h^2) error)."""
    assert third_order_step_error(0.2) / third_order_step_error(0.1) > 7


# ---- UniPC, DEIS ----


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize(
    "order, variant, corrector",
    [(1, "bh2", True), (2, "bh1", True), (2, "bh2", True), (3, "bh2", True), (3, "bh1", True), (2, "bh2", False)],
)
def test_unipc(gmm, x_T, order, variant, corrector, steps):
    """The step to sigma 0 is x = D at the sample the last step starts from (its correction does not
    reach the output). diffusers' bh1 computes it as -inf * 0 = nan, so the test runs the scheduler up
    to that step and applies D itself, for every variant."""
    sigmas = grid(gmm.process, trailing_timesteps(steps))
    scheduler = UniPCMultistepScheduler(
        **DIFFUSERS_BETAS, solver_order=order, solver_type=variant, predict_x0=True, lower_order_final=True,
        final_sigmas_type="zero", disable_corrector=[] if corrector else list(range(steps)),
    )
    scheduler.set_timesteps(steps)
    install_grid(scheduler, gmm.process, sigmas)
    net, sample = eps_network(gmm), x_T
    for t in scheduler.timesteps[:-1]:
        sample = scheduler.step(net(sample, t), t, sample).prev_sample
    expected = denoise_unscaled(gmm, sample, sigmas[-2])
    got = solve("unipc", gmm, x_T, sigmas, order=order, variant=variant, corrector=corrector)
    assert relative_difference(got, expected) <= RTOL


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("name, order", [("deis_2m", 2), ("deis_3m", 3)])
def test_deis(gmm, x_T, name, order, steps):
    """diffusers' DEIS stops at sigma_min; stepbench's grid ends there with x = D(x)."""
    sigmas = grid(gmm.process, leading_timesteps(steps))
    scheduler = DEISMultistepScheduler(**DIFFUSERS_BETAS, solver_order=order, lower_order_final=False)
    scheduler.set_timesteps(steps - 1)
    install_grid(scheduler, gmm.process, sigmas[:-1])
    x_min = run_scheduler(scheduler, eps_network(gmm), x_T)
    expected = denoise_unscaled(gmm, x_min, sigmas[-2])
    assert relative_difference(solve(name, gmm, x_T, sigmas), expected) <= RTOL


# ---- linear multistep, pseudo numerical methods ----


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_lms(gmm, x_T, steps):
    sigmas = grid(gmm.process, trailing_timesteps(steps))
    scheduler = LMSDiscreteScheduler(**DIFFUSERS_BETAS)
    scheduler.set_timesteps(steps)
    install_grid(scheduler, gmm.process, sigmas)
    x_tilde = x_T / float(gmm.process.alpha(sigmas[0]))  # LMS works on x~ like stepbench
    expected = run_scheduler(scheduler, eps_network(gmm), x_tilde)
    assert relative_difference(solve("lms", gmm, x_T, sigmas), expected) <= RTOL


def pndm_scheduler(gmm, steps, skip_prk_steps):
    scheduler = PNDMScheduler(**DIFFUSERS_BETAS, skip_prk_steps=skip_prk_steps, set_alpha_to_one=True,
                              steps_offset=0, timestep_spacing="leading")
    use_float64_tables(scheduler, gmm.process)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_plms(gmm, x_T, steps):
    scheduler = pndm_scheduler(gmm, steps, skip_prk_steps=True)
    expected = run_scheduler(scheduler, eps_network(gmm), x_T)
    got = solve("plms", gmm, x_T, grid(gmm.process, leading_timesteps(steps)))
    assert relative_difference(got, expected) <= RTOL


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_pndm(gmm, x_T, steps):
    """diffusers puts the Runge-Kutta midpoints at integer timesteps halfway in t; stepbench puts them
    halfway in lambda. The test moves the alpha_bar entries at diffusers' midpoint timesteps to
    stepbench's midpoints, in the table both the scheduler and the network read."""
    timesteps = leading_timesteps(steps)
    sigmas = grid(gmm.process, timesteps)
    table = gmm.process.alphas_cumprod.copy()
    half = (1000 // steps) // 2
    for t, s, s_next in zip(timesteps[:3], sigmas[:3], sigmas[1:4]):
        table[t - half] = 1 / (1 + s * s_next)  # sigma~_mid^2 = s * s_next
    scheduler = pndm_scheduler(gmm, steps, skip_prk_steps=False)
    scheduler.alphas_cumprod = torch.from_numpy(table)
    table_sigmas = np.sqrt((1 - table) / table)
    expected = run_scheduler(scheduler, eps_network(gmm, sigma_of_t=lambda t: table_sigmas[int(t)]), x_T)
    assert relative_difference(solve("pndm", gmm, x_T, sigmas), expected) <= RTOL


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_ipndm(gmm, x_T, steps):
    """IPNDMScheduler carries its own angular schedule (sigma, alpha tables, v-prediction input); the
    test replaces the tables with the DDPM ones of the grid and feeds it v."""
    sigmas = grid(gmm.process, trailing_timesteps(steps))
    scheduler = IPNDMScheduler()
    scheduler.set_timesteps(steps)
    scaled = torch.tensor(sigmas, dtype=torch.float64)
    scheduler.alphas = (1 + scaled**2) ** -0.5
    scheduler.betas = scaled * scheduler.alphas  # its "betas" are the unscaled sigma
    scheduler.timesteps = torch.from_numpy(np.asarray(gmm.process.t(np.asarray(sigmas[:-1]))))
    expected = run_scheduler(scheduler, eps_network(gmm, prediction="v"), x_T)
    assert relative_difference(solve("ipndm", gmm, x_T, sigmas), expected) <= RTOL


# ---- ancestral samplers with shared noise ----


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_euler_ancestral_matches_euler_ancestral_discrete(gmm, x_T, steps, monkeypatch):
    sigmas = grid(gmm.process, trailing_timesteps(steps))
    noise = SharedNoise(x_T.shape)
    monkeypatch.setattr(diffusers_euler_ancestral, "randn_tensor", noise.fresh())
    scheduler = EulerAncestralDiscreteScheduler(**DIFFUSERS_BETAS)
    scheduler.set_timesteps(steps)
    install_grid(scheduler, gmm.process, sigmas)
    expected = run_scheduler(scheduler, eps_network(gmm), x_T / float(gmm.process.alpha(sigmas[0])))
    got = solve("euler_ancestral", gmm, x_T, sigmas, noise=noise.fresh())
    assert relative_difference(got, expected) <= RTOL


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_euler_ancestral_matches_ddim_eta(gmm, x_T, steps, eta):
    scheduler = ddim_scheduler(steps, "trailing")
    use_float64_tables(scheduler, gmm.process)
    noise = SharedNoise(x_T.shape)
    net, sample, diffusers_noise = eps_network(gmm), x_T, noise.fresh()
    for t in scheduler.timesteps:
        sample = scheduler.step(net(sample, t), t, sample, eta=eta, variance_noise=diffusers_noise()).prev_sample
    got = solve("euler_ancestral", gmm, x_T, grid(gmm.process, scheduler.timesteps), noise=noise.fresh(), eta=eta)
    assert relative_difference(got, sample) <= RTOL


def install_kdpm2_grid(scheduler, process, sigmas, s_down):
    """After set_timesteps with the right count: KDPM2's layout (each level twice, the step's midpoint between
    them) on the exact sigma~ list; each step from sigmas[i] ends at s_down[i] (sigmas[i + 1] without noise),
    its midpoint at sqrt(sigmas[i] s_down[i]), and the last step (to 0) is Euler's."""
    levels = torch.tensor(sigmas, dtype=torch.float64)
    mids = torch.tensor([math.sqrt(s * d) for s, d in zip(sigmas[:-2], s_down[:-1])] + [0.0], dtype=torch.float64)
    t_of = lambda v: torch.from_numpy(np.asarray(process.t(v.numpy())))  # noqa: E731
    scheduler.sigmas = torch.cat([levels[:1], levels[1:].repeat_interleave(2), levels[-1:]])
    scheduler.timesteps = torch.cat([t_of(levels[:1]), torch.stack([t_of(mids[:-1]), t_of(levels[1:-1])], 1).flatten()])
    # diffusers indexes its midpoint lists one entry later in the plain scheduler than in the ancestral one
    shift = 1 if isinstance(scheduler, KDPM2DiscreteScheduler) else 0
    mid_list = torch.cat([levels[:shift], mids])
    scheduler.sigmas_interpol = torch.cat([mid_list[:1], mid_list[1:].repeat_interleave(2), mid_list[-1:]])
    if not shift:
        up = torch.tensor([math.sqrt(max(n**2 - d**2, 0.0)) for n, d in zip(sigmas[1:], s_down)] + [0.0])
        down = torch.tensor(list(s_down) + [0.0], dtype=torch.float64)
        scheduler.sigmas_up = torch.cat([up[:1], up[1:].repeat_interleave(2), up[-1:]]).double()
        scheduler.sigmas_down = torch.cat([down[:1], down[1:].repeat_interleave(2), down[-1:]])


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_dpm_solver_2_is_kdpm2(gmm, x_T, steps):
    """k-diffusion's DPM2 (diffusers' KDPM2DiscreteScheduler) is DPM-Solver-2 on scaled variables."""
    sigmas = grid(gmm.process, trailing_timesteps(steps))
    scheduler = KDPM2DiscreteScheduler(**DIFFUSERS_BETAS)
    scheduler.set_timesteps(steps)
    install_kdpm2_grid(scheduler, gmm.process, sigmas, sigmas[1:])
    expected = run_scheduler(scheduler, eps_network(gmm), x_T / float(gmm.process.alpha(sigmas[0])))
    assert relative_difference(solve("dpm_solver_2", gmm, x_T, sigmas), expected) <= RTOL


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_dpm2_ancestral_matches_kdpm2_ancestral(gmm, x_T, steps, monkeypatch):
    sigmas = grid(gmm.process, trailing_timesteps(steps))
    s_down = [math.sqrt(n**2 - n**2 * (s**2 - n**2) / s**2) for s, n in zip(sigmas[:-1], sigmas[1:])]
    noise = SharedNoise(x_T.shape)
    monkeypatch.setattr(diffusers_kdpm2_ancestral, "randn_tensor", noise.fresh())
    scheduler = KDPM2AncestralDiscreteScheduler(**DIFFUSERS_BETAS)
    scheduler.set_timesteps(steps)
    install_kdpm2_grid(scheduler, gmm.process, sigmas, s_down)
    expected = run_scheduler(scheduler, eps_network(gmm), x_T / float(gmm.process.alpha(sigmas[0])))
    got = solve("dpm2_ancestral", gmm, x_T, sigmas, noise=noise.fresh())
    assert relative_difference(got, expected) <= RTOL


def process_for(name, denoiser):
    """The noise process a sampler hands a solver registered with needs_process, as keyword arguments."""
    return {"process": denoiser.process} if SOLVERS[name].needs_process else {}


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("variance_type, name", [("fixed_small", "euler_ancestral"), ("fixed_large", "ddpm_large")])
def test_ddpm(gmm, x_T, steps, variance_type, name, monkeypatch):
    """DDPM over skipped steps: diffusers' variances come from current_beta_t = 1 - alpha_bar_t / alpha_bar_prev
    of the whole step. The posterior's ("fixed_small") is DDIM with eta = 1, the forward step's ("fixed_large")
    ddpm_large. The last timestep is 0 so that no noise is added on the step to the data."""
    timesteps = leading_timesteps(steps)
    noise = SharedNoise(x_T.shape)
    monkeypatch.setattr(diffusers_ddpm, "randn_tensor", noise.fresh())
    scheduler = DDPMScheduler(**DIFFUSERS_BETAS, variance_type=variance_type, clip_sample=False,
                              prediction_type="epsilon")
    use_float64_tables(scheduler, gmm.process)
    scheduler.set_timesteps(timesteps=timesteps)
    expected = run_scheduler(scheduler, eps_network(gmm), x_T)
    got = solve(name, gmm, x_T, grid(gmm.process, timesteps), noise=noise.fresh(), **process_for(name, gmm))
    assert relative_difference(got, expected) <= RTOL


@pytest.mark.parametrize("process", [{"kind": "vp_discrete"}, {"kind": "vp_continuous"}, {"kind": "edm"},
                                     {"kind": "rectified_flow"}])
def test_ddpm_large_adds_the_forward_step_variance_on_every_process(process):
    """One step of a zero denoiser from x~ = 0 with z = 1 leaves the noise std on x~'; on unscaled x' = alpha' x~'
    its square is Var q(x_t | x_t') = sigma_t^2 - (alpha_t / alpha_t')^2 sigma_t'^2 (beta_t on VP processes)."""
    process = make_process(process)
    s, s_next = 1.5, 0.4
    ones = types.SimpleNamespace(randn_like=torch.ones_like)
    std = SOLVERS["ddpm_large"].fn(lambda x, sigma: torch.zeros_like(x), torch.zeros(1, dtype=torch.float64),
                                   [s, s_next], noise=ones, process=process)
    alpha, alpha_next = float(process.alpha(s)), float(process.alpha(s_next))
    forward_variance = (alpha * s) ** 2 - (alpha / alpha_next) ** 2 * (alpha_next * s_next) ** 2
    assert float(alpha_next * std) ** 2 == pytest.approx(forward_variance, rel=1e-13)


def test_stochastic_solvers_refuse_to_run_without_noise(gmm, x_T):
    sigmas = grid(gmm.process, trailing_timesteps(5))
    for name in ("euler_ancestral", "ddpm_large", "sde_dpmpp_2m", "sde_dpmpp_3m"):
        with pytest.raises(ValueError, match="per-sample noise"):
            solve(name, gmm, x_T, sigmas, **process_for(name, gmm))


# ---- the NFE each solver declares is the NFE it spends ----


ZOO_MODULES = {f"harness.methods.{m}" for m in ("solvers", "ancestral", "deis", "dpm_solver", "lms", "pndm", "unipc")}


@pytest.mark.parametrize("name", sorted(n for n, s in SOLVERS.items() if s.fn.__module__ in ZOO_MODULES))
def test_declared_nfe_is_measured_nfe(gmm, x_T, name):
    rule = SOLVERS[name].nfe
    for steps in (rule.min_steps, rule.min_steps + 1, rule.min_steps + 6):
        sigmas = grid(gmm.process, np.linspace(999, 0, steps).round())
        calls = []
        x = x_T / float(gmm.process.alpha(sigmas[0]))
        SOLVERS[name].fn(lambda x, s: calls.append(s) or gmm(x, s), x, sigmas, noise=SharedNoise(x_T.shape),
                         **process_for(name, gmm))
        assert len(calls) == rule.nfe(steps), f"{name}: {steps} steps"
