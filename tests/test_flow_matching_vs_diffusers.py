"""Cross-check stepbench's solvers and its flow_shift schedule against diffusers' flow-matching schedulers.

Model: the exact gmm2d denoiser under a rectified flow, x_t = (1 - t) x0 + t eps, in float64. diffusers sees a
network predicting the flow velocity v = dx_t/dt = eps - x0 = (x_t - x0_hat) / t on unscaled x_t (its schedulers
step x_t' = x_t + (t' - t) v and read x0 = x_t - t v); stepbench sees the Denoiser on x~ = x_t / (1 - t) at
sigma~ = t / (1 - t), starts from x~ = x_t / (1 - t) and ends at t = 0, where x~ = x.

Time steps are each scheduler's own (set_timesteps, SD3's shift 3, shift 1, Flux's mu). stepbench's flow_shift
schedule on a RectifiedFlow whose t_range is diffusers' second (or first) and last level gives the others
(test_flow_shift_gives_diffusers_levels checks them against diffusers' float32 values). Those float64 levels
replace diffusers' float32 ones (UniPC's 1 - 1e-6 is 1.3% off in 1 - t, so in sigma~), and the network reads the
exact t where diffusers would hand it int(1000 t): the algorithm is compared, not rounding.

What differs, and how each test handles it:
- FlowMatchEuler and FlowMatchHeun start at t = 1, where sigma~ is infinite and no stepbench level can be.
  For Euler, diffusers takes that step (at t = 1 the exact x0 is the data mean) and stepbench goes on from
  diffusers' sample at the second level. Heun leaves the t = 1 level out on both sides.
- FlowMatchHeun is Heun's rule on dx_t/dt = v in t: stepbench's heun with variables='flow'. Its default (EDM's)
  is Heun's rule on dx~/dsigma~ = eps in sigma~. Their Euler predictors agree (both are DDIM), their trapezoidal
  corrections do not: the rule is not invariant under the time-dependent rescaling x~ = x_t / (1 - t). The test
  checks agreement for the first and that the second converges to it at second order.
- UniPC's first level is 1 - 1e-6 (diffusers moves it off t = 1). Its step to t = 0 is x = D, applied by the
  test as in test_solver_zoo (diffusers' bh1 computes it as nan).
- FlowMatchEuler and DPMSolverMultistep round each step's sample to float32 (agreement ~1e-7); UniPC does not
  (~1e-15).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from test_solvers_vs_diffusers import RTOL, relative_difference, x_T  # noqa: E402,F401  (x_T: fixture)

import harness.methods.family_solver  # noqa: E402,F401  (registers the solvers)
from harness.errors import ConfigError  # noqa: E402
from harness.methods.solver_base import SOLVERS  # noqa: E402
from harness.models import load_denoiser  # noqa: E402
from harness.schedules import RectifiedFlow, sigma_grid  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
STEP_COUNTS = (5, 10, 20)
SHIFTS = (1.0, 3.0)  # diffusers' default and SD3's
FLUX_SHIFT = math.exp(1.15)  # Flux's mu at 1024 x 1024 (its max_shift), as shift e^mu
EULER_GRIDS = [("flow_match_euler", 1.0), ("flow_match_euler", 3.0), ("flux", FLUX_SHIFT)]


@pytest.fixture(scope="module")
def gmm():
    return load_denoiser({"adapter": "gmm2d", "process": {"kind": "rectified_flow"}, "metrics": []})


def shifted(u, shift):
    """diffusers' shift of flow time, in float64 (used only for the ends of the process)."""
    return shift * u / (1 + (shift - 1) * u)


def flow_shift_times(t_max, t_min, n, shift):
    """stepbench's flow_shift levels on RectifiedFlow(t_min, t_max), as flow times t."""
    sigmas = sigma_grid(RectifiedFlow(t_min, t_max), n, {"kind": "flow_shift", "shift": shift})[:-1]
    return sigmas / (1 + sigmas)


def diffusers_levels(kind, steps, shift):
    """The flow times at which each scheduler evaluates the network after set_timesteps(steps), in float64."""
    if kind in ("flow_match_euler", "flow_match_heun"):
        # its sigma_min is 1/1000 already shifted at construction, and set_timesteps shifts it again
        base = np.linspace(1, shifted(1e-3, shift), steps)
        return np.append(1.0, flow_shift_times(shifted(base[1], shift), shifted(base[-1], shift), steps - 1, shift))
    if kind == "flux":  # FluxPipeline's sigmas linspace(1, 1/N, N), shifted by e^mu
        ends = shifted(1 - 1 / steps, shift), shifted(1 / steps, shift)
        return np.append(1.0, flow_shift_times(*ends, steps - 1, shift))
    if kind == "dpm":  # 1 - linspace(1, 1/1000, N + 1), shifted, without the final 0
        return flow_shift_times(shifted(0.999, shift), shifted(0.999 / steps, shift), steps, shift)
    if kind == "unipc":  # linspace(1, 1/1000, N + 1)[:-1], shifted, the first level moved to 1 - 1e-6
        ends = shifted(1 - 0.999 / steps, shift), shifted(1 - 0.999 * (steps - 1) / steps, shift)
        return np.append(1 - 1e-6, flow_shift_times(*ends, steps - 1, shift))
    raise ValueError(kind)


def scheduler(kind, steps, shift, **config):
    """A diffusers scheduler after its own set_timesteps(steps) with this shift."""
    if kind == "flow_match_euler":
        made = FlowMatchEulerDiscreteScheduler(shift=shift)
    elif kind == "flow_match_heun":
        made = FlowMatchHeunDiscreteScheduler(shift=shift)
    elif kind == "flux":
        made = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
        made.set_timesteps(sigmas=np.linspace(1, 1 / steps, steps), mu=math.log(shift))
        return made
    else:
        made = {"dpm": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler}[kind](
            use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction", final_sigmas_type="zero",
            **config)
    made.set_timesteps(steps)
    return made


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("kind, shift", EULER_GRIDS + [("flow_match_heun", 3.0), ("dpm", 1.0), ("dpm", 3.0),
                                                       ("unipc", 1.0), ("unipc", 3.0)])
def test_flow_shift_gives_diffusers_levels(kind, shift, steps):
    """To float32 rounding of t (leaving out diffusers' second shift of FlowMatch's sigma_min would be 6e-3 off)."""
    theirs = scheduler(kind, steps, shift).sigmas.double().numpy()
    theirs = theirs[np.append(True, np.diff(theirs) != 0)][:-1]  # Heun's repeated levels once, no final 0
    np.testing.assert_allclose(diffusers_levels(kind, steps, shift), theirs, rtol=0, atol=1e-6)


def velocity_network(gmm):
    """The exact denoiser as diffusers' network net(x_t, timestep) -> v = (x_t - x0) / t, t = timestep / 1000.
    At t = 1 (sigma~ infinite) the exact x0 is the data mean."""
    mean = torch.softmax(gmm.log_w, 0) @ gmm.means

    def net(x_t, timestep):
        t = float(timestep) / 1000
        x0 = mean.expand_as(x_t) if t == 1 else gmm(x_t / (1 - t), t / (1 - t))
        return (x_t - x0) / t

    return net


def install(scheduler, levels):
    """The float64 levels (flow times) and timesteps 1000 t in place of diffusers' float32 ones."""
    scheduler.sigmas = torch.from_numpy(np.append(levels, 0.0))
    scheduler.timesteps = torch.from_numpy(1000 * levels)


def solve(name, gmm, x_t, levels, **params):
    """A stepbench solver from unscaled x_t at the first level over sigma~ = t / (1 - t), then 0."""
    sigmas = [float(t / (1 - t)) for t in levels] + [0.0]
    return SOLVERS[name].fn(lambda x, s: gmm(x, s), x_t / (1 - levels[0]), sigmas, **params)


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("kind, shift", EULER_GRIDS)
def test_euler_matches_flow_match_euler(gmm, x_T, kind, shift, steps):
    """diffusers runs its whole grid from x_1 = eps at t = 1; stepbench goes on from diffusers' sample after
    the first step (the one from t = 1) over the other levels, which flow_shift gives."""
    levels = diffusers_levels(kind, steps, shift)
    flow_match = scheduler(kind, steps, shift)
    install(flow_match, levels)
    net, sample, after_first = velocity_network(gmm), x_T, None
    for t in flow_match.timesteps:
        sample = flow_match.step(net(sample, t), t, sample).prev_sample
        after_first = sample if after_first is None else after_first
    assert relative_difference(solve("euler", gmm, after_first, levels[1:]), sample) <= RTOL


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("name, order", [("dpmpp_2m", 2), ("dpmpp_3m", 3)])
def test_dpmpp_multistep_matches_dpm_solver_flow_sigmas(gmm, x_T, name, order, shift, steps):
    """lower_order_final for 2M as in test_dpmpp_2m_matches_diffusers; none for 3M (full order up to the last
    step, which final_sigmas_type='zero' makes x = D) as in test_solver_zoo's test_dpmpp_3m."""
    levels = diffusers_levels("dpm", steps, shift)
    dpm = scheduler("dpm", steps, shift, algorithm_type="dpmsolver++", solver_order=order,
                    lower_order_final=order == 2)
    install(dpm, levels)
    net, sample = velocity_network(gmm), levels[0] * x_T  # x_t = t eps: stepbench's prior x~ = sigma~ eps
    for t in dpm.timesteps:
        sample = dpm.step(net(sample, t), t, sample).prev_sample
    assert relative_difference(solve(name, gmm, levels[0] * x_T, levels), sample) <= RTOL


@pytest.mark.parametrize("steps", STEP_COUNTS)
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("order, variant", [(1, "bh2"), (2, "bh1"), (2, "bh2"), (3, "bh2")])
def test_unipc_matches_unipc_flow_sigmas(gmm, x_T, order, variant, shift, steps):
    """UniC on every step; the step to t = 0 is x = D at the sample the last step starts from."""
    levels = diffusers_levels("unipc", steps, shift)
    unipc = scheduler("unipc", steps, shift, solver_order=order, solver_type=variant, lower_order_final=True)
    install(unipc, levels)
    net, sample = velocity_network(gmm), levels[0] * x_T
    for t in unipc.timesteps[:-1]:
        sample = unipc.step(net(sample, t), t, sample).prev_sample
    expected = gmm(sample / (1 - levels[-1]), levels[-1] / (1 - levels[-1]))
    got = solve("unipc", gmm, levels[0] * x_T, levels, order=order, variant=variant, corrector=True)
    assert relative_difference(got, expected) <= RTOL


@pytest.mark.parametrize("shift", SHIFTS)
def test_heun_in_flow_variables_matches_flow_match_heun_and_edm_heun_converges_to_it(gmm, x_T, shift):
    """stepbench's heun with variables='flow' is FlowMatchHeun (Heun's rule in (t, x_t)); its default, EDM's
    Heun in (sigma~, x~), is another discretisation of the same ODE: both leave the t = 1 level out, and the
    difference falls like steps^-2 (by ~4 per doubling), as between two second-order methods, not to rounding."""
    differences = []
    for steps in (10, 20, 40):
        levels = diffusers_levels("flow_match_heun", steps + 1, shift)[1:]
        flow_match = scheduler("flow_match_heun", steps, shift)
        flow_match.sigmas = torch.from_numpy(np.concatenate([levels[:1], np.repeat(levels[1:], 2), [0.0]]))
        timesteps = torch.from_numpy(1000 * levels)
        flow_match.timesteps = torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)])
        net, sample = velocity_network(gmm), levels[0] * x_T
        for t in flow_match.timesteps:
            sample = flow_match.step(net(sample, t), t, sample).prev_sample
        assert relative_difference(solve("heun", gmm, levels[0] * x_T, levels, variables="flow"), sample) <= RTOL
        differences.append(relative_difference(solve("heun", gmm, levels[0] * x_T, levels), sample))
    assert differences[0] > 1e-3
    assert differences[0] / differences[1] > 3 and differences[1] / differences[2] > 3


def test_heun_refuses_unknown_variables(gmm, x_T):
    with pytest.raises(ConfigError, match="heun: variables must be 'sigma' or 'flow'"):
        solve("heun", gmm, x_T, [0.5, 0.1], variables="time")
