"""Heavy-ball (HB) and generalised heavy-ball (GHVB) momentum for multistep diffusion samplers.

Wizadwongsa & Suwajanakorn, "Diffusion Sampling with Momentum for Mitigating Divergence Artifacts"
(ICCV 2023), reference code github.com/sWizad/momentum-diffusion (momentum_scheduler.py).

The DDIM ODE in scaled variables is dx~/dsigma~ = eps(x~, sigma~) with eps = (x~ - D) / sigma~, so a
multistep step is x~_next = x~ + (sigma~_next - sigma~) * v for a velocity v made from past eps:

- PLMS (Adams-Bashforth on eps with the fixed, uniform-step coefficients of PNDM's PLMS, lower order
  while the history fills up), with HB: v <- (1 - beta) v + beta * AB(eps history);
- GHVB: the momentum goes inside the multistep formula: u <- (1 - beta) u + beta * eps, and v is the
  generalised Adams-Bashforth combination of the u history with the paper's beta-dependent
  coefficients (Table 1 of the paper; `AdamBmixer` in the reference code), which keeps order `order`
  as beta -> 1 and is plain PLMS at beta = 1;
- DPM-Solver++(2M) with HB on its data-prediction increment D0 + D1/2 (the reference code's
  MomentumDPMSolverMultistepScheduler): first-order first step, first-order last step to sigma~ = 0.

beta = 1 gives back the base solver exactly (tested). The reference code encodes order and beta as one
number ("order 2.8" = order 3 with beta 0.8); here they are two parameters. NFE: one evaluation per
step, like the base solvers (NFE = steps); momentum costs no evaluation.

Checked side by side with the reference code (not committed): plms_hb and plms_ghvb, orders 1-4, beta 1,
0.8 and 0.5, NFE 5-10, on gmm2d (to 1e-14) and on digits-ideal through its diffusers-based schedulers
(to 1e-11); dpmpp_2m_hb against MomentumDPMSolverMultistepScheduler on digits-ideal (to 4e-13).
"""

from __future__ import annotations

import math

from harness.errors import ConfigError
from harness.methods.solver_base import solver


def _adams_bashforth(history: list, beta: float = 1.0):
    """(Generalised) Adams-Bashforth combination of the newest len(history) values, newest last.

    beta = 1 gives the classic uniform-step coefficients (PLMS); beta < 1 gives GHVB's coefficients,
    which divided by beta make the momentum-averaged history integrate to the same order.
    """
    e = history[::-1]  # e[0] newest
    b = beta
    if len(e) == 1:
        combo = b * e[0]
    elif len(e) == 2:
        combo = ((2 + b) * e[0] - (2 - b) * e[1]) / 2
    elif len(e) == 3:
        combo = ((18 + 5 * b) * e[0] - (24 - 8 * b) * e[1] + (6 - b) * e[2]) / 12
    else:
        combo = ((46 + 9 * b) * e[0] - (78 - 19 * b) * e[1] + (42 - 5 * b) * e[2] - (10 - b) * e[3]) / 24
    return combo / b


def _check(order: int, beta: float, name: str) -> None:
    if order not in (1, 2, 3, 4) or not 0 < beta <= 1:
        raise ConfigError(f"{name}: order must be 1..4 and beta in (0, 1]; got order={order}, beta={beta}")


@solver("plms_hb", order=1)
def plms_hb(model, x, sigmas, noise=None, order=4, beta=0.8):
    """PLMS-`order` with Polyak's heavy-ball momentum (registered order 1: HB's averaging of past
    velocities is first-order accurate for beta < 1)."""
    _check(order, beta, "plms_hb")
    eps_history, velocity = [], None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        eps_history = (eps_history + [(x - model(x, s)) / s])[-order:]
        combo = _adams_bashforth(eps_history)
        velocity = combo if velocity is None else (1 - beta) * velocity + beta * combo
        x = x + (s_next - s) * velocity
    return x


@solver("plms_ghvb", order=1)
def plms_ghvb(model, x, sigmas, noise=None, order=4, beta=0.8):
    """PLMS-`order` with generalised heavy-ball momentum (GHVB); the paper shows its order rises
    towards `order` as beta -> 1, so the registered (worst-case) order is 1."""
    _check(order, beta, "plms_ghvb")
    averaged_history, averaged = [], None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        eps = (x - model(x, s)) / s
        averaged = eps if averaged is None else (1 - beta) * averaged + beta * eps
        averaged_history = (averaged_history + [averaged])[-order:]
        x = x + (s_next - s) * _adams_bashforth(averaged_history, beta)
    return x


@solver("dpmpp_2m_hb", order=1)
def dpmpp_2m_hb(model, x, sigmas, noise=None, beta=0.8):
    """DPM-Solver++(2M) with heavy-ball momentum on its increment D0 + D1/2 (midpoint form, as the
    reference MomentumDPMSolverMultistepScheduler); beta = 1 is dpmpp_2m."""
    _check(2, beta, "dpmpp_2m_hb")
    old_denoised, h_last, velocity = None, None, None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = model(x, s)
        if s_next == 0:
            x = denoised
            break
        h = math.log(s / s_next)
        if old_denoised is None:
            increment = denoised  # first step: first order, no momentum (as diffusers)
        else:
            second_order = denoised + 0.5 * (h / h_last) * (denoised - old_denoised)
            velocity = second_order if velocity is None else (1 - beta) * velocity + beta * second_order
            increment = velocity
        x = (s_next / s) * x - math.expm1(-h) * increment
        old_denoised, h_last = denoised, h
    return x
