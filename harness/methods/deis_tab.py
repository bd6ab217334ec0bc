"""DEIS tAB (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator"):
Adams-Bashforth in the model's native time t, the variant the paper calls tAB-DEIS.

On scaled variables the exponential integrator has no linear part left (dx~/dsigma~ = eps), so a step is
x~_{i+1} = x~_i + sum_j C_ij eps_{i-j}: the noise predictions of the latest r+1 steps (fewer while the
history builds up) are fitted by the Lagrange polynomial in t, t_j = process.t(sigma~_j), and
C_ij = integral from sigma~_i to sigma~_{i+1} of the j-th Lagrange basis polynomial l_j(t(sigma~)) d sigma~.
The log-rho variant (harness.methods.deis, diffusers' DEIS) fits the same predictions by a polynomial in
log sigma~ instead, which integrates in closed form for every process; in t the integrand depends on the
process's map t(sigma~), so the coefficients are computed by quadrature. On EDM (t = sigma~) tAB is LMS;
tAB-1 is DDIM (`euler`) on every process. The step to sigma~ = 0 is x = D(x), as in deis.py.

Quadrature: composite 8-point Gauss-Legendre in u = log sigma~ (d sigma~ = e^u du), panels at most
0.25 wide. VPDiscrete interpolates log sigma~ linearly in t between its training steps, so t(u) has a
kink at each of them: panels end there, and on each panel the integrand is a polynomial times e^u, which
the rule integrates to rounding. The continuous maps (VP, EDM, flows) are smooth in u; panels this
narrow leave errors far below 1e-12 relative.

The solvers are registered with needs_process: the sampler passes the model's noise process.

Side by side with the reference JAX code (github.com/qsh-zh/deis, jax_deis.multistep) on VP with linear
beta 0.1..20, on its quadratic-in-t grids (10 and 20 steps, t from 1 to 1e-3) and a uniform one, its C_ij
scaled by 1/sqrt(alpha_bar(t_{i+1})): its default 10,000-point left Riemann sums differ by at most 2e-4
relative, falling as 1/N (2e-6 at N = 1e6); Richardson-extrapolated (N = 1e6, 2e6) they agree to 7e-12.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from harness.methods.solver_base import combine, require_process, solver
from harness.schedules import NoiseProcess, VPDiscrete

GAUSS_NODES, GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(8)
MAX_PANEL = 0.25  # widest quadrature panel in u = log sigma~


def _kinks(process: NoiseProcess) -> np.ndarray:
    """log sigma~ where t(sigma~) is not smooth: VPDiscrete's training steps (linear interpolation)."""
    if isinstance(process, VPDiscrete):
        return np.log(process.sigmas)
    return np.empty(0)


def _quadrature(process: NoiseProcess, s_from: float, s_to: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes sigma~ and weights of the integral over sigma~ from s_from to s_to (either direction)."""
    lo, hi = sorted((math.log(s_from), math.log(s_to)))
    kinks = _kinks(process)
    edges = np.concatenate([[lo], kinks[(kinks > lo) & (kinks < hi)], [hi]])
    panels = [np.linspace(a, b, math.ceil((b - a) / MAX_PANEL) + 1)[:-1] for a, b in zip(edges[:-1], edges[1:])]
    edges = np.concatenate(panels + [[hi]])
    half, mid = np.diff(edges)[:, None] / 2, (edges[:-1] + edges[1:])[:, None] / 2
    nodes = np.exp(mid + half * GAUSS_NODES).ravel()
    weights = (half * GAUSS_WEIGHTS).ravel() * nodes  # d sigma~ = e^u du
    return nodes, (weights if s_to > s_from else -weights)


def tab_weights(process: NoiseProcess, t_nodes: list[float], s_from: float, s_to: float) -> list[float]:
    """C_j = integral from s_from to s_to of the j-th Lagrange basis polynomial on `t_nodes`, l_j(t(sigma~)).

    The basis is evaluated as a product of (t - t_k) / (t_j - t_k): on VPDiscrete t runs up to ~1000, where
    monomial coefficients would cancel.
    """
    sigma, weights = _quadrature(process, s_from, s_to)
    t = np.asarray(process.t(sigma), dtype=np.float64)
    out = []
    for j, t_j in enumerate(t_nodes):
        basis = np.ones_like(t)
        for k, t_k in enumerate(t_nodes):
            if k != j:
                basis *= (t - t_k) / (t_j - t_k)
        out.append(float(weights @ basis))
    return out


def _tab_multistep(model, x, sigmas, process, order):
    history = []  # (eps, t) of the latest steps, newest first
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = model(x, s)
        if s_next == 0:
            return denoised
        eps = torch.sub(x, denoised).div_(s)  # (x - D) / s, divided in place on the fresh difference
        history = [(eps, float(process.t(s)))] + history[: order - 1]
        weights = tab_weights(process, [t for _, t in history], s, s_next)
        # x + sum_j C_j eps_j as one fused combination
        x = combine([(1.0, x)] + [(w, eps) for w, (eps, _) in zip(weights, history)])
    return x


@solver("deis_tab1", order=1, needs_process=True)
def deis_tab1(model, x, sigmas, noise=None, process=None):
    """DEIS tAB-1 (= DDIM)."""
    return _tab_multistep(model, x, sigmas, require_process(process, "deis_tab1"), order=1)


@solver("deis_tab2", order=2, needs_process=True)
def deis_tab2(model, x, sigmas, noise=None, process=None):
    """DEIS tAB-2: AB2 on eps with a linear polynomial in native time t."""
    return _tab_multistep(model, x, sigmas, require_process(process, "deis_tab2"), order=2)


@solver("deis_tab3", order=3, needs_process=True)
def deis_tab3(model, x, sigmas, noise=None, process=None):
    """DEIS tAB-3: AB3 on eps with a quadratic polynomial in native time t."""
    return _tab_multistep(model, x, sigmas, require_process(process, "deis_tab3"), order=3)
