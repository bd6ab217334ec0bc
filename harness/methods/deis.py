"""DEIS (Zhang & Chen 2023), multistep in rho = sigma~ with the noise prediction fitted by a polynomial in
log rho, as diffusers' DEISMultistepScheduler ("logrho"): x~_t = x~_s + sum_j c_j eps_j with
c_j = integral from rho_s to rho_t of the j-th Lagrange basis polynomial in log rho, integrated exactly.

Order 1 is DDIM (`euler`). The order rises with the history; the step to sigma~ = 0, where log rho has no
value, is x = D(x).
"""

from __future__ import annotations

import math

import torch

from harness.methods.lms import lagrange_basis
from harness.methods.solver_base import combine, solver


def _log_rho_integrals(log_nodes: list[float], rho_from: float, rho_to: float) -> list[float]:
    """Integrals over rho of the Lagrange basis polynomials in u = log rho on `log_nodes`.

    For a polynomial P, the antiderivative of P(u) e^u du is e^u Q(u) with Q = P - P' + P'' - ...,
    i.e. Q + Q' = P: from the top degree down, q_d = p_d - (d + 1) q_{d+1}. Plain floats (cheaper than
    numpy's poly1d for a handful of nodes).
    """
    weights = []
    for j in range(len(log_nodes)):
        q = lagrange_basis(log_nodes, j)
        for d in range(len(q) - 2, -1, -1):
            q[d] -= (d + 1) * q[d + 1]

        def antiderivative(rho):
            u = math.log(rho)
            return rho * sum(c * u**d for d, c in enumerate(q))

        weights.append(antiderivative(rho_to) - antiderivative(rho_from))
    return weights


def _deis_multistep(model, x, sigmas, order):
    history = []  # (eps, log sigma~) of the latest steps, newest first
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = model(x, s)
        if s_next == 0:
            return denoised
        eps = torch.sub(x, denoised).div_(s)  # (x - D) / s, divided in place on the fresh difference
        history = [(eps, math.log(s))] + history[: order - 1]
        weights = _log_rho_integrals([log_s for _, log_s in history], s, s_next)
        # x + sum_j w_j eps_j as one fused combination
        x = combine([(1.0, x)] + [(w, eps) for w, (eps, _) in zip(weights, history)])
    return x


@solver("deis_2m", order=2)
def deis_2m(model, x, sigmas, noise=None):
    """DEIS log-rho AB2 (diffusers' DEIS, solver_order=2)."""
    return _deis_multistep(model, x, sigmas, order=2)


@solver("deis_3m", order=3)
def deis_3m(model, x, sigmas, noise=None):
    """DEIS log-rho AB3 (diffusers' DEIS, solver_order=3)."""
    return _deis_multistep(model, x, sigmas, order=3)
