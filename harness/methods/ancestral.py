"""Ancestral samplers: a deterministic step to a lower noise level, then fresh noise back up to the target.

On scaled variables DDIM with eta, DDPM's ancestral sampler (posterior variance, "fixed_small") and
Euler ancestral are one update: with sigma_up = eta * sigma' * sqrt(1 - sigma'^2 / sigma^2) and
sigma_down = sqrt(sigma'^2 - sigma_up^2), x~' = D + (sigma_down / sigma) (x~ - D) + sigma_up z.
eta = 1 is DDPM and Euler ancestral; eta = 0 is DDIM (= euler).

DDPM with the large variance ("fixed_large", sigma_t^2 = beta_t) keeps that posterior mean and adds the
variance of the forward step q(x_t | x_t') instead. Over a strided step that is diffusers' current_beta_t =
1 - alpha_bar_t / alpha_bar_t', not the training beta at t: on unscaled x it is
sigma_t^2 - (alpha_t / alpha_t')^2 sigma_t'^2 for every process, i.e. (alpha_t / alpha_t')^2 (sigma~^2 - sigma~'^2)
on x~'. It depends on alpha, not only on sigma~, so the solver is registered needs_process and the sampler
passes it the model's process.
"""

from __future__ import annotations

import math

import torch

from harness.errors import ConfigError
from harness.methods.dpm_solver import dpm_solver_2_step, dpmpp_2s_step
from harness.methods.solver_base import NFERule, require_noise, require_process, solver


def _ancestral(model, x, sigmas, noise, name, scales):
    """x~' = D + w (x~ - D) + std z with (w, std) = scales(sigma~, sigma~') and z from the per-sample streams
    of `noise`; the step to sigma~ = 0 is x = D (DDPM adds no noise on its step from t = 0)."""
    require_noise(noise, name)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = model(x, s)
        if s_next == 0:
            return denoised
        w, std = scales(s, s_next)
        # D + w (x - D) as one lerp, then the noise added in place (fused multiply-add)
        x = torch.lerp(denoised, x, w).add_(noise.randn_like(x), alpha=std)
    return x


def ancestral_split(s, s_next, eta):
    """(sigma_down, sigma_up) of an ancestral step from s to s_next: sigma_up = eta sigma' sqrt(1 - sigma'^2 /
    sigma^2) (at most sigma'), sigma_down = sqrt(sigma'^2 - sigma_up^2)."""
    sigma_up = min(s_next, eta * s_next * math.sqrt(1 - (s_next / s) ** 2))
    return math.sqrt(s_next**2 - sigma_up**2), sigma_up


def _check_eta(eta, name: str, at_most: float = math.inf) -> None:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= at_most:
        raise ConfigError(f"{name}: eta must be in [0, {at_most:g}]; got {eta!r}")


@solver("euler_ancestral", order=1)
def euler_ancestral(model, x, sigmas, noise=None, eta=1.0):
    """Euler ancestral / DDIM(eta) / DDPM ancestral with the posterior variance (eta = 1)."""
    _check_eta(eta, "euler_ancestral")

    def scales(s, s_next):
        sigma_down, sigma_up = ancestral_split(s, s_next, eta)
        return sigma_down / s, sigma_up

    return _ancestral(model, x, sigmas, noise, "euler_ancestral", scales)


def _ancestral_second_order(step, model, x, sigmas, noise, eta, name):
    """k-diffusion's second-order ancestral samplers: `step` (a two-evaluation step) down to sigma_down, then
    noise of std sigma_up; the step to 0 is x = D, without noise: NFE = 2 steps - 1."""
    _check_eta(eta, name, 1)  # beyond 1, sigma_down could reach 0 before the last step and change the NFE
    require_noise(noise, name)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        sigma_down, sigma_up = ancestral_split(s, s_next, eta)
        x = step(model, x, s, sigma_down)
        if s_next > 0:
            x.add_(noise.randn_like(x), alpha=sigma_up)
    return x


@solver("dpm2_ancestral", order=1, nfe=NFERule(per_step=2, saved_at_end=1))
def dpm2_ancestral(model, x, sigmas, noise=None, eta=1.0):
    """k-diffusion's DPM2 ancestral ("DPM2 a"; diffusers' KDPM2AncestralDiscreteScheduler) with DPM-Solver-2
    steps (k-diffusion's DPM2 is DPM-Solver-2 on scaled variables). Side by side with k-diffusion's own
    (crowsonkb/k-diffusion sampling.py, float64, gmm2d, the same draws): agree to 1e-14."""
    return _ancestral_second_order(dpm_solver_2_step, model, x, sigmas, noise, eta, "dpm2_ancestral")


@solver("dpmpp_2s_ancestral", order=1, nfe=NFERule(per_step=2, saved_at_end=1))
def dpmpp_2s_ancestral(model, x, sigmas, noise=None, eta=1.0):
    """k-diffusion's sample_dpmpp_2s_ancestral ("DPM++ 2S a") with DPM-Solver++(2S) steps. Side by side with
    k-diffusion's own (crowsonkb/k-diffusion sampling.py, float64, gmm2d, the same draws): agree to 1e-15."""
    return _ancestral_second_order(dpmpp_2s_step, model, x, sigmas, noise, eta, "dpmpp_2s_ancestral")


@solver("ddpm_large", order=1, needs_process=True)
def ddpm_large(model, x, sigmas, noise=None, process=None):
    """DDPM ancestral sampling with the forward step's variance (diffusers' variance_type="fixed_large")."""
    alpha = require_process(process, "ddpm_large").alpha

    def scales(s, s_next):
        # the posterior mean of eta = 1 (sigma_down / s = (s_next / s)^2), the forward step's std on x~'
        return (s_next / s) ** 2, float(alpha(s) / alpha(s_next)) * math.sqrt(s**2 - s_next**2)

    return _ancestral(model, x, sigmas, noise, "ddpm_large", scales)
