"""Linear multistep (k-diffusion's sample_lms, diffusers' LMSDiscreteScheduler): Adams-Bashforth on the
PF-ODE dx~/dsigma~ = (x~ - D) / sigma~ with the derivative fitted by a Lagrange polynomial in sigma~
through the latest steps, integrated exactly over each (variable) step.
"""

from __future__ import annotations

import torch

from harness.methods.solver_base import combine, solver


def lagrange_basis(nodes: list[float], j: int) -> list[float]:
    """Coefficients (constant term first) of the j-th Lagrange basis polynomial on `nodes`.

    Plain floats: for the few nodes of a multistep solver this is cheaper than numpy's poly1d.
    """
    coeffs = [1.0]
    for k, other in enumerate(nodes):
        if k != j:  # multiply by (u - other) / (nodes[j] - other)
            scale = 1.0 / (nodes[j] - other)
            coeffs = [scale * (lower - other * c) for lower, c in zip([0.0] + coeffs, coeffs + [0.0])]
    return coeffs


def _sigma_integrals(nodes: list[float], s_from: float, s_to: float) -> list[float]:
    """Integrals from s_from to s_to of the Lagrange basis polynomials on `nodes`."""
    weights = []
    for j in range(len(nodes)):
        coeffs = lagrange_basis(nodes, j)
        weights.append(sum(c * (s_to ** (d + 1) - s_from ** (d + 1)) / (d + 1) for d, c in enumerate(coeffs)))
    return weights


@solver("lms", order=4)
def lms(model, x, sigmas, noise=None, order=4):
    """LMS of the given order (default 4, the registered order), lower orders while history builds up."""
    history = []  # (derivative, sigma~) of the latest steps, newest first
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        derivative = torch.sub(x, model(x, s)).div_(s)  # (x - D) / s, divided in place on the fresh difference
        history = [(derivative, s)] + history[: order - 1]
        weights = _sigma_integrals([node for _, node in history], s, s_next)
        # x + sum_j w_j d_j as one fused combination
        x = combine([(1.0, x)] + [(w, d) for w, (d, _) in zip(weights, history)])
    return x
