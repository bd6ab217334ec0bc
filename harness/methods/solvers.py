"""The basic ODE solvers: Euler (= DDIM, eta 0), EDM Heun, DPM-Solver++(2M)."""

from __future__ import annotations

import math

import torch

from harness.errors import ConfigError
from harness.methods.solver_base import NFERule, solver


@solver("euler", order=1)
def euler(model, x, sigmas, noise=None):
    """Euler on the PF-ODE in sigma~; identical to DDIM with eta = 0."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        # x_next = denoised + (s_next / s) (x - denoised), fused into one kernel
        x = torch.lerp(model(x, s), x, s_next / s)
    return x


@solver("heun", order=2, nfe=NFERule(per_step=2, saved_at_end=1))
def heun(model, x, sigmas, noise=None, variables="sigma"):
    """EDM's deterministic 2nd-order Heun (Karras et al. 2022, Alg. 1, S_churn = 0) on dx~/dsigma~, or with
    variables="flow" the same rule in flow-matching time (diffusers' FlowMatchHeun, SD3): see _heun_flow."""
    if variables not in ("sigma", "flow"):
        raise ConfigError(f"heun: variables must be 'sigma' or 'flow'; got {variables!r}")
    if variables == "flow":
        return _heun_flow(model, x, sigmas)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        # the Euler step x + (s_next - s) d with d = (x - D) / s, fused into one lerp as in euler
        x_euler = torch.lerp(model(x, s), x, s_next / s)
        if s_next == 0:
            x = x_euler
        else:
            # x + (s_next - s) (d + d_next) / 2 = the mean of x and x_euler plus half a step along
            # d_next = (x_euler - D') / s_next: three kernels, no temporaries
            half = (s_next - s) / (2 * s_next)
            denoised_next = model(x_euler, s_next)
            x = torch.lerp(x, x_euler, 0.5).add_(x_euler, alpha=half).sub_(denoised_next, alpha=half)
    return x


def _heun_flow(model, x, sigmas):
    """Heun's rule on the same PF-ODE written in flow-matching variables, t = s / (1 + s) and x_t = x / (1 + s),
    where it reads dx_t/dt = (x_t - D) / t (the velocity eps - x0): a different discretisation from EDM's, as
    Heun's trapezoid is not invariant under that time-dependent rescaling. Any process; the last step (to
    t = 0) is Euler's, x = D."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        t, t_next = s / (1 + s), s_next / (1 + s_next)
        x_t = x / (1 + s)
        velocity = (x_t - model(x, s)) / t
        x_euler = x_t + (t_next - t) * velocity
        if s_next == 0:
            return x_euler
        velocity_next = (x_euler - model(x_euler * (1 + s_next), s_next)) / t_next
        x = (x_t + (t_next - t) / 2 * (velocity + velocity_next)) * (1 + s_next)
    return x


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
