"""The DPM-Solver family (Lu et al. 2022): exponential integrators in lambda = -log sigma~.

On scaled variables every process has the same exponential-integrator form, so these solvers need only
the sigma~ list: the first-order step is x~_t = x~_s - (sigma_s - sigma_t) eps = (sigma_t / sigma_s) x~_s
+ (1 - sigma_t / sigma_s) D, i.e. DPM-Solver-1 = DDIM = `euler`.

Singlestep solvers put their intermediate points at fixed fractions of each step in lambda (the paper's
r = 1/2 for order 2 and 1/3, 2/3 for order 3) and follow diffusers' "midpoint" updates. Every solver takes
the step to sigma~ = 0 as x = D(x) (the first-order step there), so its NFE rule saves the remaining
stages of the last step. Multistep solvers raise their order as history builds up and keep full order
until that last step (diffusers with lower_order_final=False).
"""

from __future__ import annotations

import math

import torch

from harness.methods.solver_base import NFERule, combine, require_noise, solver


def _eps(model, x, sigma):
    return (x - model(x, sigma)) / sigma


@solver("dpm_solver_2", order=2, nfe=NFERule(per_step=2, saved_at_end=1))
def dpm_solver_2(model, x, sigmas, noise=None):
    """DPM-Solver-2, singlestep on the noise prediction, intermediate point at r = 1/2 in lambda."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = dpm_solver_2_step(model, x, s, s_next)
    return x


def dpm_solver_2_step(model, x, s, s_to):
    """One DPM-Solver-2 step from s to s_to (x = D when s_to = 0). On scaled variables it is the midpoint rule
    on dx~/dsigma~ = eps with the midpoint at sqrt(s s_to) (r = 1/2 in lambda, where the paper's
    eps + (eps_mid - eps) / 2r is eps_mid): what k-diffusion calls DPM2 (sample_dpm_2, diffusers'
    KDPM2DiscreteScheduler), the same method under another name: side by side with k-diffusion's sample_dpm_2
    they agree to 1e-15 (tests/test_solver_zoo.py checks it against KDPM2)."""
    if s_to == 0:
        return model(x, s)
    s_mid = math.sqrt(s * s_to)
    x_mid = torch.lerp(model(x, s), x, s_mid / s)  # the first-order (DDIM) step to s_mid
    # x - (s - s_to) eps_mid with eps_mid = (x_mid - D_mid) / s_mid, the difference taken in place in x_mid
    return x.add(x_mid.sub_(model(x_mid, s_mid)), alpha=(s_to - s) / s_mid)


@solver("dpm_solver_3", order=3, nfe=NFERule(per_step=3, saved_at_end=2))
def dpm_solver_3(model, x, sigmas, noise=None):
    """DPM-Solver-3, singlestep on the noise prediction, intermediate points at 1/3 and 2/3 in lambda."""
    r1, r2 = 1 / 3, 2 / 3
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        if s_next == 0:
            return model(x, s)
        h = math.log(s / s_next)
        s1, s2 = s * math.exp(-r1 * h), s * math.exp(-r2 * h)
        eps0 = _eps(model, x, s)
        eps1 = _eps(model, x - (s - s1) * eps0, s1)
        # second-order (midpoint) step from s to s2, using eps1 at the fraction r1 / r2 of it
        eps2 = _eps(model, x - (s - s2) * (eps0 + (eps1 - eps0) * r2 / (2 * r1)), s2)
        x = x - (s - s_next) * eps0 - s_next * (math.expm1(h) / h - 1) * (eps2 - eps0) / r2
    return x


@solver("dpmpp_2s", order=2, nfe=NFERule(per_step=2, saved_at_end=1))
def dpmpp_2s(model, x, sigmas, noise=None):
    """DPM-Solver++(2S), singlestep on the data prediction, intermediate point at r = 1/2 in lambda."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = dpmpp_2s_step(model, x, s, s_next)
    return x


def dpmpp_2s_step(model, x, s, s_to):
    """One DPM-Solver++(2S) step from s to s_to (x = D when s_to = 0)."""
    r = 0.5
    denoised = model(x, s)
    if s_to == 0:
        return denoised
    h = math.log(s / s_to)
    s_mid = s * math.exp(-r * h)
    # (s_mid / s) x - expm1(-r h) D is a lerp, since -expm1(-r h) = 1 - s_mid / s (likewise below)
    denoised_mid = model(torch.lerp(denoised, x, s_mid / s), s_mid)
    d = torch.lerp(denoised, denoised_mid, 1 / (2 * r))  # D + (D_mid - D) / 2r
    return torch.lerp(d, x, s_to / s)


@solver("dpmpp_3s", order=3, nfe=NFERule(per_step=3, saved_at_end=2))
def dpmpp_3s(model, x, sigmas, noise=None):
    """DPM-Solver++(3S), singlestep on the data prediction, intermediate points at 1/3 and 2/3 in lambda."""
    r1, r2 = 1 / 3, 2 / 3
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d0 = model(x, s)
        if s_next == 0:
            return d0
        h = math.log(s / s_next)
        s1, s2 = s * math.exp(-r1 * h), s * math.exp(-r2 * h)
        # (s1 / s) x - expm1(-r1 h) D is a lerp, since -expm1(-r1 h) = 1 - s1 / s (likewise below)
        d1 = model(torch.lerp(d0, x, s1 / s), s1)
        d2 = model(torch.lerp(torch.lerp(d0, d1, r2 / (2 * r1)), x, s2 / s), s2)
        # (s_next / s) x - expm1(-h) d0 + k (d2 - d0), with one weight per tensor: one fused combination
        k = (math.expm1(-h) / h + 1) / r2
        x = combine([(s_next / s, x), (-math.expm1(-h) - k, d0), (k, d2)])
    return x


def _multistep_update(x, denoised, h, history, second_weight=1.0):
    """One DPM-Solver++ multistep update over a lambda step h: e^-h x + (1 - e^-h) D plus the order-2 and
    order-3 corrections from `history`, the (data prediction, lambda step that led to it) of up to two
    earlier steps, newest last (diffusers' midpoint rule at order 2). `second_weight` scales the
    second-difference term (1: as published, 2: the Taylor-exact weight, see dpmpp_3m)."""
    if len(history) < 2:
        # e^-h x + (1 - e^-h) d is a lerp, and so is d = D + (h / 2 h_old) (D - D_old)
        d = denoised if not history else torch.lerp(denoised, history[-1][0], -0.5 * h / history[-1][1])
        return torch.lerp(d, x, math.exp(-h))
    (d2, h_1), (d1, h_0) = history
    r0, r1 = h_0 / h, h_1 / h
    phi_1 = math.expm1(-h)  # e^-h - 1
    # with slope_new = (D - d1) / r0 and slope_old = (d1 - d2) / r1,
    # first = slope_new + r0 / (r0 + r1) (slope_new - slope_old), second = (slope_new - slope_old) / (r0 + r1),
    # x_next = e^-h x - phi_1 D + (phi_1 / h + 1) first - ((phi_1 + h) / h^2 - 0.5) second; the float weights
    # are folded onto each tensor so that the update is one fused combination
    c_first, c_second = phi_1 / h + 1, second_weight * ((phi_1 + h) / h**2 - 0.5)
    k_new = c_first * (1 + r0 / (r0 + r1)) - c_second / (r0 + r1)
    k_old = -c_first * r0 / (r0 + r1) + c_second / (r0 + r1)
    return combine([(math.exp(-h), x), (-phi_1 + k_new / r0, denoised), (k_old / r1 - k_new / r0, d1),
                    (-k_old / r1, d2)])


def _dpmpp_multistep(model, x, sigmas, order, noise=None, second_weight=1.0):
    """DPM-Solver++ multistep of `order` (lower orders while the history builds up) on the PF-ODE or, given
    `noise`, on the reverse SDE: SDE-DPM-Solver++ is the same update with every lambda step doubled (its
    e^-2h decay and integrals of e^-2(lambda_t - lambda)), plus fresh noise of std sigma_next sqrt(1 - e^-2h)."""
    lambda_scale = 1 if noise is None else 2
    history = []
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = model(x, s)
        if s_next == 0:
            return denoised
        h = lambda_scale * math.log(s / s_next)
        x = _multistep_update(x, denoised, h, history, second_weight)
        if noise is not None:
            x.add_(noise.randn_like(x), alpha=s_next * math.sqrt(-math.expm1(-h)))  # in place (fused multiply-add)
        history = (history + [(denoised, h)])[-(order - 1):]
    return x


@solver("dpmpp_3m", order=2)
def dpmpp_3m(model, x, sigmas, noise=None):
    """DPM-Solver++(3M) as published in code (DPM-Solver's, diffusers', k-diffusion's), multistep on the
    data prediction; orders 1, 2 on the first two steps.

    Registered order 2, not 3: its second difference D2 ~ h^2 D''/2 is weighted (e^-h - 1 + h) / h^2 - 0.5
    = h/6 + O(h^2), half the h/3 + O(h^2) that integrating the quadratic through the last three data
    predictions against e^-(lambda_t - lambda) gives, so each step leaves an O(h^3) error and the
    method converges with order 2 (its order looks like 3 at small NFE, where the D2 term is small
    next to the others; tests/test_convergence.py measures both windows). dpmpp_3m_taylor is the same
    method with the exact weight.
    """
    return _dpmpp_multistep(model, x, sigmas, order=3)


@solver("dpmpp_3m_taylor", order=3)
def dpmpp_3m_taylor(model, x, sigmas, noise=None):
    """DPM-Solver++(3M) with the Taylor-exact weight on the second difference (twice the published one, see
    dpmpp_3m): exact when the data prediction is quadratic in lambda, third order."""
    return _dpmpp_multistep(model, x, sigmas, order=3, second_weight=2.0)


@solver("sde_dpmpp_2m", order=1)
def sde_dpmpp_2m(model, x, sigmas, noise=None):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022), diffusers' midpoint form; strong order 1 as an SDE solver.

    Each step draws per-sample noise from `noise`, so a sample does not depend on its batch.
    """
    require_noise(noise, "sde_dpmpp_2m")
    return _dpmpp_multistep(model, x, sigmas, order=2, noise=noise)


@solver("sde_dpmpp_3m", order=1)
def sde_dpmpp_3m(model, x, sigmas, noise=None):
    """SDE-DPM-Solver++(3M): orders 1, 2 on the first two steps, as diffusers' sde-dpmsolver++ with
    solver_order=3 and lower_order_final=False; strong order 1 as an SDE solver, per-sample noise.

    Its update is the ODE one (dpmpp_3m) with each lambda step h doubled, as diffusers' first- and
    second-order SDE steps are and as k-diffusion's sample_dpmpp_3m_sde is: the second-difference term D2 is
    weighted (1 - e^-2h - 2h) / (2h)^2 + 0.5 = O(h). diffusers (0.42) writes - 0.5 there (its ODE branch
    reads -(... - 0.5)), a sign slip that adds -D2 to every third-order step and moves the gmm samples of
    tests/test_solver_zoo.py by 13-31% of their norm; that test checks against diffusers with the term fixed.
    """
    require_noise(noise, "sde_dpmpp_3m")
    return _dpmpp_multistep(model, x, sigmas, order=3, noise=noise)
