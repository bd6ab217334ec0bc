"""Ancestral samplers: a deterministic step to a lower noise level, then fresh noise back up to the target.

On scaled variables DDIM with eta, DDPM's ancestral sampler (posterior variance, "fixed_small") and
Euler ancestral are one update: with sigma_up = eta * sigma' * sqrt(1 - sigma'^2 / sigma^2) and
sigma_down = sqrt(sigma'^2 - sigma_up^2), x~' = D + (sigma_down / sigma) (x~ - D) + sigma_up z.
eta = 1 is DDPM and Euler ancestral; eta = 0 is DDIM (= euler).
"""

from __future__ import annotations

import math

import torch

from harness.methods.solver_base import solver


@solver("euler_ancestral", order=1)
def euler_ancestral(model, x, sigmas, noise=None, eta=1.0):
    """Euler ancestral / DDIM(eta) / DDPM ancestral (eta = 1); z from the per-sample streams of `noise`."""
    if noise is None:
        raise ValueError("euler_ancestral is stochastic and needs per-sample noise (harness.noise.SampleNoise)")
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = model(x, s)
        if s_next == 0:
            return denoised
        sigma_up = min(s_next, eta * s_next * math.sqrt(1 - (s_next / s) ** 2))
        sigma_down = math.sqrt(s_next**2 - sigma_up**2)
        # D + (sigma_down / s) (x - D) as one lerp, then the noise added in place (fused multiply-add)
        x = torch.lerp(denoised, x, sigma_down / s).add_(noise.randn_like(x), alpha=sigma_up)
    return x
