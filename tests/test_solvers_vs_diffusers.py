"""Cross-check stepbench's solvers against diffusers' schedulers, and the prediction-type conversions.

Both sides run the exact gmm2d denoiser under the DDPM linear-beta process in float64, from the same
x_T over the same integer time steps. diffusers sees it as an eps-prediction network on unscaled x_t;
stepbench sees the Denoiser on scaled x~ = x_t / alpha. diffusers builds its noise tables in float32,
so the tests hand it the float64 tables stepbench uses: what is compared is the algorithm, not rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, HeunDiscreteScheduler  # noqa: E402

from harness.methods.solvers import dpmpp_2m, euler, heun  # noqa: E402
from harness.models import load_denoiser  # noqa: E402
from harness.models.base import DenoiserInfo, NetworkDenoiser  # noqa: E402

# diffusers calls np.array() on torch tensors in set_timesteps; numpy 2 warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

VP_PROCESS = {"kind": "vp_discrete", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
              "num_train_timesteps": 1000}
DIFFUSERS_BETAS = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
RTOL = 1e-5  # DDIM and Heun agree to ~1e-15; DPM-Solver to ~1e-7 (see test_dpmpp_2m_matches_diffusers)
STEP_COUNTS = (5, 10, 25)


@pytest.fixture(scope="module")
def gmm():
    return load_denoiser({"adapter": "gmm2d", "process": VP_PROCESS, "metrics": []})


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def eps_network(denoiser, sigma_of_t=None, prediction="eps"):
    """The exact denoiser as a diffusers network net(x_t, t) on unscaled x_t, predicting eps (or v).

    sigma_of_t maps a timestep to sigma~; by default the process's own map, which at integer t is
    sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]) and in between interpolates log sigma~."""
    sigma_of_t = sigma_of_t or denoiser.process.sigma

    def net(x_t, t):
        sigma_tilde = float(sigma_of_t(float(t)))
        alpha = (1 + sigma_tilde**2) ** -0.5
        x0 = denoiser(x_t / alpha, sigma_tilde)
        eps = (x_t - alpha * x0) / (alpha * sigma_tilde)
        return eps if prediction == "eps" else alpha * eps - alpha * sigma_tilde * x0

    return net


def use_float64_tables(scheduler, process):
    """Before set_timesteps: the float64 alpha_bar table that stepbench's process holds."""
    scheduler.alphas_cumprod = torch.from_numpy(process.alphas_cumprod)


def promote_sigmas(scheduler, process):
    """After set_timesteps: diffusers rounds its sigma list to float32; put back the float64 training
    sigmas each entry was rounded from (adjacent training sigmas differ far more than float32 rounding)."""
    rounded = scheduler.sigmas.numpy().astype(np.float64)
    exact = np.zeros_like(rounded)
    positive = rounded > 0
    nearest = np.abs(np.log(rounded[positive])[:, None] - np.log(process.sigmas)[None]).argmin(1)
    exact[positive] = process.sigmas[nearest]
    np.testing.assert_allclose(exact, rounded, rtol=1e-6)
    scheduler.sigmas = torch.from_numpy(exact)


def run_scheduler(scheduler, net, sample):
    for t in scheduler.timesteps:
        eps = net(scheduler.scale_model_input(sample, t), t)
        sample = scheduler.step(eps, t, sample).prev_sample
    return sample


def run_stepbench(solver_fn, denoiser, x_T, timesteps):
    """A stepbench solver on sigma~(t_k) for the diffusers time steps plus the final 0, from x~ = x_T / alpha_T."""
    process = denoiser.process
    sigmas = [float(process.sigmas[int(t)]) for t in timesteps] + [0.0]
    x = x_T / float(process.alpha(sigmas[0]))
    return solver_fn(lambda x, sigma: denoiser(x, sigma), x, sigmas)  # final sigma~ 0: alpha 1, x~ = x


def relative_difference(a, b):
    return float((a - b).norm() / b.norm())


def ddim_scheduler(steps, spacing):
    scheduler = DDIMScheduler(**DIFFUSERS_BETAS, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                              timestep_spacing=spacing, prediction_type="epsilon", thresholding=False)
    scheduler.set_timesteps(steps)
    return scheduler


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_euler_matches_ddim(gmm, x_T, steps, spacing):
    scheduler = ddim_scheduler(steps, spacing)
    use_float64_tables(scheduler, gmm.process)  # DDIM reads alpha_bar at step time
    expected = run_scheduler(scheduler, eps_network(gmm), x_T)  # eta defaults to 0 in step()
    got = run_stepbench(euler, gmm, x_T, scheduler.timesteps)
    assert relative_difference(got, expected) <= RTOL


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_dpmpp_2m_matches_diffusers(gmm, x_T, steps):
    """DPMSolverMultistepScheduler.step casts the sample to float32 (its "upcast"), so the agreement
    stops at float32 rounding, ~1e-7."""
    timesteps = ddim_scheduler(steps, "trailing").timesteps.tolist()
    scheduler = DPMSolverMultistepScheduler(
        **DIFFUSERS_BETAS, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, final_sigmas_type="zero", use_karras_sigmas=False, thresholding=False,
        prediction_type="epsilon",
    )
    use_float64_tables(scheduler, gmm.process)
    scheduler.set_timesteps(timesteps=timesteps)
    promote_sigmas(scheduler, gmm.process)
    expected = run_scheduler(scheduler, eps_network(gmm), x_T)
    got = run_stepbench(dpmpp_2m, gmm, x_T, timesteps)
    assert relative_difference(got, expected) <= RTOL


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_heun_matches_diffusers(gmm, x_T, steps):
    """HeunDiscreteScheduler works on x~ like stepbench; with integer custom timesteps its sigmas are the
    training sigmas, and its last step to sigma 0 is Euler only, as in EDM and stepbench."""
    timesteps = ddim_scheduler(steps, "trailing").timesteps.tolist()
    scheduler = HeunDiscreteScheduler(**DIFFUSERS_BETAS, prediction_type="epsilon", use_karras_sigmas=False)
    use_float64_tables(scheduler, gmm.process)
    scheduler.set_timesteps(timesteps=timesteps)
    promote_sigmas(scheduler, gmm.process)
    x_tilde = x_T / float(gmm.process.alpha(gmm.process.sigmas[timesteps[0]]))
    expected = run_scheduler(scheduler, eps_network(gmm), x_tilde)
    got = run_stepbench(heun, gmm, x_T, timesteps)
    assert relative_difference(got, expected) <= RTOL


# ---- NetworkDenoiser: every prediction type converts back to the exact x0 ----


def prediction_network(denoiser, prediction):
    """A network on unscaled x_t and native time t that predicts `prediction`, built from the exact x0."""
    process = denoiser.process

    def net(x_t, t, cond=None):
        sigma_tilde = process.sigma(t.numpy())
        alpha = torch.from_numpy(process.alpha(sigma_tilde))[:, None]
        sigma = alpha * torch.from_numpy(sigma_tilde)[:, None]  # unscaled noise level
        x0 = denoiser(x_t / alpha, torch.from_numpy(sigma_tilde))
        eps = (x_t - alpha * x0) / sigma
        return {"x0": x0, "eps": eps, "v": alpha * eps - sigma * x0, "flow": eps - x0}[prediction]

    return net


@pytest.mark.parametrize(
    "process, prediction",
    [("vp_discrete", "eps"), ("vp_discrete", "v"), ("vp_discrete", "x0"),
     ("rectified_flow", "flow"), ("rectified_flow", "eps"), ("rectified_flow", "x0")],
)
def test_network_denoiser_recovers_exact_x0(process, prediction):
    spec = VP_PROCESS if process == "vp_discrete" else {"kind": "rectified_flow"}
    exact = load_denoiser({"adapter": "gmm2d", "process": spec, "metrics": []})
    info = DenoiserInfo(data_shape=(2,), data_range=(-4.0, 4.0), prediction=prediction, process=exact.process,
                        dtype=torch.float64)
    wrapped = NetworkDenoiser(prediction_network(exact, prediction), info)

    gen = torch.Generator().manual_seed(1)
    sigma = torch.exp(torch.linspace(np.log(exact.process.sigma_min), np.log(exact.process.sigma_max), 200,
                                     dtype=torch.float64))
    x0 = torch.from_numpy(exact.sample_data(200, seed=1))
    x = x0 + sigma[:, None] * torch.randn(200, 2, generator=gen, dtype=torch.float64)

    expected = exact(x, sigma)
    np.testing.assert_allclose(wrapped(x, sigma).numpy(), expected.numpy(), rtol=0, atol=1e-10)
