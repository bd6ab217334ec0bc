"""The basic ODE solvers: Euler (= DDIM, eta 0), EDM Heun (both optionally with EDM's churn), DPM-Solver++(2M)."""

from __future__ import annotations

import math

import torch

from harness.errors import ConfigError
from harness.methods.solver_base import NFERule, require_noise, solver


class Churn:
    """EDM's "increase noise temporarily" (Karras et al. 2022, Alg. 2; k-diffusion's s_churn, s_tmin, s_tmax,
    s_noise): at a level s in [s_tmin, s_tmax], raise it to s_hat = (1 + gamma) s with gamma =
    min(s_churn / steps, sqrt(2) - 1) by adding fresh noise of std s_noise sqrt(s_hat^2 - s^2), then take the
    step from s_hat. s_churn = 0 (the default) is the deterministic sampler and draws nothing; EDM's code draws
    at every step, also where gamma = 0, which changes no distribution. On a discrete-time model a raised level
    above its sigma_max is evaluated at its last timestep (as EDM's round_sigma does): keep s_tmax below it."""

    def __init__(self, name, steps, noise, s_churn, s_tmin, s_tmax, s_noise):
        if s_churn < 0:
            raise ConfigError(f"{name}: s_churn must be >= 0; got {s_churn!r}")
        self.gamma = min(s_churn / steps, math.sqrt(2) - 1)
        self.s_tmin, self.s_tmax, self.s_noise, self.noise = s_tmin, s_tmax, s_noise, noise
        if self.gamma > 0:
            require_noise(noise, name)

    def __call__(self, x, s):
        """(x_hat, s_hat): x and s unchanged outside [s_tmin, s_tmax] or without churn."""
        if self.gamma == 0 or not self.s_tmin <= s <= self.s_tmax:
            return x, s
        s_hat = s * (1 + self.gamma)
        return x + self.noise.randn_like(x) * (self.s_noise * math.sqrt(s_hat**2 - s**2)), s_hat


@solver("euler", order=1)
def euler(model, x, sigmas, noise=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """Euler on the PF-ODE in sigma~; identical to DDIM with eta = 0. With s_churn > 0, EDM's stochastic
    Euler (its ablation sampler, k-diffusion's sample_euler): see Churn. Side by side with NVlabs/edm's
    ablation_sampler(solver='euler') as for heun below: agree to 1e-15."""
    churn = Churn("euler", len(sigmas) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x, s = churn(x, s)
        # x_next = denoised + (s_next / s) (x - denoised), fused into one kernel
        x = torch.lerp(model(x, s), x, s_next / s)
    return x


@solver("heun", order=2, nfe=NFERule(per_step=2, saved_at_end=1))
def heun(model, x, sigmas, noise=None, variables="sigma", s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0):
    """EDM's 2nd-order Heun (Karras et al. 2022, Alg. 1) on dx~/dsigma~, or with variables="flow" the same rule
    in flow-matching time (diffusers' FlowMatchHeun, SD3): see _heun_flow_step. With s_churn > 0, EDM's
    stochastic sampler (Alg. 2): see Churn.

    Side by side with NVlabs/edm's edm_sampler and ablation_sampler (generate.py; float64, 18 steps on gmm2d,
    the same per-step draws, S_churn 0/10/40/80, S_noise 1 and 1.003, with and without an S_tmin/S_tmax
    window): agree to 1e-15 (and differ by 1e-3 with S_noise 1 against 1.003)."""
    step_in = {"sigma": heun_step, "flow": _heun_flow_step}
    if variables not in step_in:
        raise ConfigError(f"heun: variables must be 'sigma' or 'flow'; got {variables!r}")
    step, churn = step_in[variables], Churn("heun", len(sigmas) - 1, noise, s_churn, s_tmin, s_tmax, s_noise)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x, s = churn(x, s)
        x = step(model, x, s, s_next)
    return x


def heun_step(model, x, s, s_next):
    """One Heun step in (sigma~, x~); the last one (to 0) is Euler's."""
    # the Euler step x + (s_next - s) d with d = (x - D) / s, fused into one lerp as in euler
    x_euler = torch.lerp(model(x, s), x, s_next / s)
    if s_next == 0:
        return x_euler
    # x + (s_next - s) (d + d_next) / 2 = the mean of x and x_euler plus half a step along
    # d_next = (x_euler - D') / s_next: three kernels, no temporaries
    half = (s_next - s) / (2 * s_next)
    denoised_next = model(x_euler, s_next)
    return torch.lerp(x, x_euler, 0.5).add_(x_euler, alpha=half).sub_(denoised_next, alpha=half)


def _heun_flow_step(model, x, s, s_next):
    """One Heun step on the same PF-ODE written in flow-matching variables, t = s / (1 + s) and
    x_t = x / (1 + s), where it reads dx_t/dt = (x_t - D) / t (the velocity eps - x0): a different
    discretisation from EDM's, as Heun's trapezoid is not invariant under that time-dependent rescaling.
    Any process; the last step (to t = 0) is Euler's, x = D."""
    t, t_next = s / (1 + s), s_next / (1 + s_next)
    x_t = x / (1 + s)
    velocity = (x_t - model(x, s)) / t
    x_euler = x_t + (t_next - t) * velocity
    if s_next == 0:
        return x_euler
    velocity_next = (x_euler - model(x_euler * (1 + s_next), s_next)) / t_next
    return (x_t + (t_next - t) / 2 * (velocity + velocity_next)) * (1 + s_next)


@solver("dpmpp_2m", order=2)
def dpmpp_2m(model, x, sigmas, noise=None):
    """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep; first order on the first and
    the last step (to sigma = 0), as diffusers does with lower_order_final."""
    old_denoised, h_last = None, None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = model(x, s)
        if s_next == 0:
            x = denoised
            break
        h = math.log(s / s_next)  # lambda step, lambda = -log sigma~
        if old_denoised is None:
            d = denoised
        else:  # d = (1 + 1/2r) denoised - (1/2r) old_denoised, r = h_last / h
            d = torch.lerp(denoised, old_denoised, -h / (2 * h_last))
        x = torch.lerp(d, x, s_next / s)  # (s_next/s) x + (1 - e^-h) d, since e^-h = s_next/s
        old_denoised, h_last = denoised, h
    return x
