"""Linear multistep (k-diffusion's sample_lms, diffusers' LMSDiscreteScheduler): Adams-Bashforth on the
PF-ODE dx~/dsigma~ = (x~ - D) / sigma~ with the derivative fitted by a Lagrange polynomial in sigma~
through the latest steps, integrated exactly over each (variable) step.
"""

from __future__ import annotations

import numpy as np

from harness.methods.solver_base import solver


def _sigma_integrals(nodes: list[float], s_from: float, s_to: float) -> list[float]:
    """Integrals from s_from to s_to of the Lagrange basis polynomials on `nodes`."""
    weights = []
    for j, node in enumerate(nodes):
        basis = np.poly1d([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                basis = basis * np.poly1d([1.0, -other]) / (node - other)
        antiderivative = np.polyint(basis)
        weights.append(antiderivative(s_to) - antiderivative(s_from))
    return weights


@solver("lms", order=4)
def lms(model, x, sigmas, noise=None, order=4):
    """LMS of the given order (default 4, the registered order), lower orders while history builds up."""
    history = []  # (derivative, sigma~) of the latest steps, newest first
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        history = [((x - model(x, s)) / s, s)] + history[: order - 1]
        weights = _sigma_integrals([node for _, node in history], s, s_next)
        x = x + sum(w * d for w, (d, _) in zip(weights, history))
    return x
