"""Noise processes and time-step schedules, cross-checked against diffusers where it has them."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers import AysSchedules

from harness.config import load_methods
from harness.errors import ConfigError
from harness.schedules import (
    ALIGN_YOUR_STEPS,
    EDM,
    RectifiedFlow,
    VPContinuous,
    VPDiscrete,
    make_process,
    sigma_grid,
)

PROCESSES = [
    VPDiscrete.from_config("linear", 1e-4, 0.02, 1000),
    VPDiscrete.from_config("scaled_linear", 0.00085, 0.012, 1000),
    VPDiscrete.from_config("squaredcos_cap_v2", num_train_timesteps=1000),
    VPContinuous(),
    EDM(0.002, 80.0),
    RectifiedFlow(),
]


@pytest.mark.parametrize("beta_schedule, start, end", [("linear", 1e-4, 0.02), ("scaled_linear", 0.00085, 0.012),
                                                       ("squaredcos_cap_v2", 1e-4, 0.02)])
def test_vp_discrete_matches_diffusers_alphas_cumprod(beta_schedule, start, end):
    ours = VPDiscrete.from_config(beta_schedule, start, end, 1000)
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule=beta_schedule, beta_start=start, beta_end=end)
    # diffusers keeps betas in float32, so compare betas at float32 precision, then the products
    np.testing.assert_allclose(ours.betas, theirs.betas.double().numpy(), rtol=1e-6)
    # (the cosine schedule clips its last beta to 0.999, where float32 rounding of beta is 1e-5 of 1 - beta)
    np.testing.assert_allclose(ours.alphas_cumprod, np.cumprod(1 - theirs.betas.double().numpy()), rtol=1e-4)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.kind)
def test_time_and_sigma_are_inverse(process):
    t = np.linspace(*process.t_range, 37)
    np.testing.assert_allclose(process.t(process.sigma(t)), t, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.kind)
def test_alpha_and_sigma_reconstruct_the_process(process):
    sig = process.sigma(np.linspace(*process.t_range, 11))
    alpha = process.alpha(sig)
    if process.kind.startswith("vp"):  # variance preserving: alpha^2 + (alpha sigma~)^2 = 1
        np.testing.assert_allclose(alpha**2 + (alpha * sig) ** 2, 1.0, rtol=1e-12)
    if process.kind == "rectified_flow":  # alpha + sigma = 1
        np.testing.assert_allclose(alpha + alpha * sig, 1.0, rtol=1e-12)


@pytest.mark.parametrize("process", PROCESSES, ids=lambda p: p.kind)
@pytest.mark.parametrize("kind", ["time_uniform", "logsnr_uniform", "edm_rho", "time_quadratic", "flow_shift"])
def test_schedules_span_the_process_and_end_at_zero(process, kind):
    grid = sigma_grid(process, 10, {"kind": kind})
    assert len(grid) == 11 and grid[-1] == 0
    np.testing.assert_allclose([grid[0], grid[-2]], [process.sigma_max, process.sigma_min], rtol=1e-9)
    assert np.all(np.diff(grid) < 0)


@pytest.mark.parametrize("spec, first", [
    ({"kind": "edm_rho", "rho": 7.0}, 80.0),
    ({"kind": "logsnr_uniform"}, 80.0),
    ({"kind": "explicit", "sigmas": [14.6]}, 14.6),  # a one-step list is used as given, not replaced by sigma_max
    ({"kind": "explicit", "sigmas": [14.6, 1.0, 0.1], "interpolate": True}, 14.6),
    ({"kind": "align_your_steps", "model": "sd15"}, ALIGN_YOUR_STEPS["sd15"][0]),
])
def test_one_step_grid_starts_where_the_schedule_does(spec, first):
    np.testing.assert_allclose(sigma_grid(EDM(), 1, spec), [first, 0.0], rtol=1e-12)


def test_edm_rho_matches_diffusers_karras_sigmas():
    process = VPDiscrete.from_config("linear", 1e-4, 0.02, 1000)
    sched = DPMSolverMultistepScheduler(beta_schedule="linear", use_karras_sigmas=True)
    in_sigmas = torch.from_numpy(process.sigmas[::-1].copy())
    theirs = sched._convert_to_karras(in_sigmas=in_sigmas, num_inference_steps=12)
    ours = sigma_grid(process, 12, {"kind": "edm_rho", "rho": 7.0})[:-1]
    np.testing.assert_allclose(ours, np.asarray(theirs, dtype=np.float64), rtol=1e-10)


def test_logsnr_uniform_matches_diffusers_lu_lambdas():
    process = VPDiscrete.from_config("linear", 1e-4, 0.02, 1000)
    sched = DPMSolverMultistepScheduler(beta_schedule="linear")
    lambdas = -np.log(process.sigmas[::-1].copy())  # lambda = log(alpha / sigma), from sigma_max down
    theirs = np.exp(-np.asarray(sched._convert_to_lu(in_lambdas=torch.from_numpy(lambdas), num_inference_steps=9)))
    ours = sigma_grid(process, 9, {"kind": "logsnr_uniform"})[:-1]
    np.testing.assert_allclose(ours, theirs, rtol=1e-10)


def test_explicit_schedule_in_timesteps():
    process = VPDiscrete.from_config("linear", 1e-4, 0.02, 1000)
    grid = sigma_grid(process, 3, {"kind": "explicit", "timesteps": [999, 500, 0]})
    np.testing.assert_allclose(grid[:-1], process.sigmas[[999, 500, 0]], rtol=1e-12)


def test_explicit_schedule_interpolates_log_linearly_like_align_your_steps():
    given = [80.0, 10.0, 1.0, 0.1]
    grid = sigma_grid(EDM(), 7, {"kind": "explicit", "sigmas": given, "interpolate": True})[:-1]
    np.testing.assert_allclose(grid[::2], given, rtol=1e-12)  # the given points stay
    np.testing.assert_allclose(grid[1], np.sqrt(80.0 * 10.0), rtol=1e-12)  # geometric midpoints between them


@pytest.mark.parametrize("model, diffusers_timesteps", [("sd15", "StableDiffusionTimesteps"),
                                                       ("sdxl", "StableDiffusionXLTimesteps")])
def test_align_your_steps_levels_are_stable_diffusions_sigmas_at_diffusers_ays_timesteps(model, diffusers_timesteps):
    """Our table (NVIDIA's noise levels) against diffusers' AYS timesteps on SD's own process: the same schedule."""
    sd = VPDiscrete.from_config("scaled_linear", 0.00085, 0.012, 1000)
    grid = sigma_grid(EDM(), 10, {"kind": "align_your_steps", "model": model})
    rtol = 1e-8  # the table has 10 decimals: 1.7e-9 relative at its smallest level
    np.testing.assert_allclose(grid[:-1], sd.sigma(np.asarray(AysSchedules[diffusers_timesteps], float)), rtol=rtol)
    np.testing.assert_allclose(ALIGN_YOUR_STEPS[model][-1], sd.sigma_min, rtol=rtol)  # the table ends at SD's range


def test_align_your_steps_video_levels_match_diffusers():
    grid = sigma_grid(EDM(0.002, 700.0), 10, {"kind": "align_your_steps", "model": "svd"})
    np.testing.assert_allclose(grid, AysSchedules["StableDiffusionVideoSigmas"], rtol=1e-13)  # both end with the final 0


def test_align_your_steps_other_step_counts_follow_the_papers_recipe():
    """11 levels resampled log-linearly to n + 1 points, the last dropped: at n = 20 every published level
    stays at an even index and the odd ones are geometric means of their neighbours."""
    levels = np.asarray(ALIGN_YOUR_STEPS["sdxl"])
    grid = sigma_grid(EDM(), 20, {"kind": "align_your_steps", "model": "sdxl"})[:-1]
    np.testing.assert_allclose(grid[::2], levels[:10], rtol=1e-12)
    np.testing.assert_allclose(grid[1::2], np.sqrt(levels[:10] * levels[1:]), rtol=1e-12)


def test_misspelt_schedule_parameter_in_methods_yaml_is_one_line_error(tmp_path):
    path = tmp_path / "methods.yaml"
    path.write_text("ays:\n  family: solver\n  solver: euler\n  schedule: {kind: align_your_steps, modle: sd15}\n")
    with pytest.raises(ConfigError) as err:
        load_methods(path)
    assert str(err.value) == (f"{path}: key 'ays.schedule': schedule align_your_steps: parameter 'modle' unknown "
                              "(did you mean 'model'?); valid: model")


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "warp"}, "schedule kind 'warp' unknown; valid:"),
        ({"kind": "explicit", "sigmas": [3.0, 2.0]}, "explicit schedule has 2 points; this cell needs 3"),
        ({"kind": "explicit", "sigmas": [1.0, 2.0, 3.0]}, "strictly decreasing"),
        ({"kind": "edm_rho", "rho": 7.0, "sigma_min": 0.1}, "schedule edm_rho: parameter 'sigma_min' unknown; valid: rho"),
        ({"kind": "align_your_steps", "model": "sd3"}, "align_your_steps: model 'sd3' unknown; valid: sd15, sdxl, svd"),
        ({"kind": "flow_shift", "shift": 0.0}, "flow_shift: shift must be positive; got 0.0"),
    ],
)
def test_bad_schedules_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        sigma_grid(EDM(), 3, spec)


def test_make_process_rejects_unknown_kind():
    with pytest.raises(ConfigError, match="process kind 'warp' unknown"):
        make_process({"kind": "warp"})


def test_explicit_list_meets_only_its_own_budget_and_says_so_as_unsupported():
    """A fixed list of levels is one budget: another NFE is an n/a cell with the reason, not a failing job."""
    from harness.errors import UnsupportedNFE
    from harness.methods import make_sampler

    sampler = make_sampler({"family": "solver", "solver": "heun",
                            "schedule": {"kind": "explicit", "sigmas": [80.0, 10.0, 1.0, 0.1]}})
    sampler.check_nfe(7)  # heun: 2 * 4 - 1
    with pytest.raises(UnsupportedNFE, match="only NFE=7") as err:
        sampler.check_nfe(9)
    assert err.value.reason == "explicit schedule: NFE 7 only"
    resampled = make_sampler({"family": "solver", "solver": "heun",
                              "schedule": {"kind": "explicit", "sigmas": [80.0, 10.0, 1.0, 0.1], "interpolate": True}})
    resampled.check_nfe(9)
