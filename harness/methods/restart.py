"""Restart sampling (Xu, Deng, Ren, Tegmark & Jaakkola 2023, "Restart Sampling for Improving Generative
Processes", arXiv:2306.14878; reference code Newbeeer/diffusion_restart_sampling, generate_restart.py).

EDM's Heun over the main steps. Each restart interval [t_min, t_max] is anchored at the main level nearest
t_min; on reaching it, K times: jump forward to t_max with fresh noise, x + s_noise sqrt(t_max^2 - t_min^2) z,
then Heun back down to the anchor over n levels spaced as EDM's rho (n - 1 steps, each churned by
restart_gamma inside [s_tmin, s_tmax], as in the reference). The paper's argument: the forward noise contracts
the error accumulated so far, while the ODE steps add little discretisation error of their own.

    params: intervals: [[n, K, t_min, t_max], ...]  (the reference's restart_info values)
            s_noise, restart_gamma, s_tmin, s_tmax  (the reference's S_noise, restart_gamma, S_min, S_max)
            rho  (spacing of each restart's levels)

NFE = 2 steps - 1 (the main Heun) + sum over intervals of K * 2 (n - 1): every restart step ends above 0.
The intervals must anchor at distinct main levels, which depends on the budget (the paper's ImageNet-64
intervals do at NFE 203, not at 143): where two meet, sampling stops with a one-line error naming the level.
Noise comes from the per-sample streams, only where it is used (the reference also draws where it multiplies
it by 0). Its restart levels are float32; ours are float64. restart_gamma is capped at sqrt(2) - 1, as EDM's
churn is. Side by side with the reference's restart_sampler (its levels made float64, the same draws, gmm2d,
18 and 12 main steps, one and three intervals, restart_gamma 0 and 0.05): agree to 1e-15.
"""

from __future__ import annotations

import numpy as np

from harness.errors import ConfigError
from harness.methods.solver_base import NFERule, require_noise, solver
from harness.methods.solvers import Churn, heun_step
from harness.schedules import karras_levels

# CIFAR-10 EDM (the reference's params_cifar10_edm.txt, 18 main steps: NFE 43)
CIFAR10_EDM_INTERVALS = ([3, 2, 0.14, 0.30],)


def _checked(intervals):
    """The intervals as (n, K, t_min, t_max), or a one-line ConfigError."""
    out = []
    for interval in intervals:
        try:
            n, k, t_min, t_max = interval
            n, k, t_min, t_max = int(n), int(k), float(t_min), float(t_max)
        except (TypeError, ValueError):
            raise ConfigError(f"restart: each interval is [n, K, t_min, t_max]; got {interval!r}") from None
        if n < 2 or k < 0 or not 0 < t_min < t_max:
            raise ConfigError(f"restart: interval {interval!r} needs n >= 2, K >= 0 and 0 < t_min < t_max")
        out.append((n, k, t_min, t_max))
    return out


def _restart_nfe(intervals=CIFAR10_EDM_INTERVALS, **_):
    extra = sum(k * 2 * (n - 1) for n, k, _, _ in _checked(intervals))
    return NFERule(per_step=2, saved_at_end=1 - extra, min_steps=2)


def _anchors(sigmas, intervals):
    """Main level index -> interval, each t_min moved to its nearest main level (as the reference does)."""
    anchors = {}
    for n, k, t_min, t_max in intervals:
        index = int(np.argmin(np.abs(np.asarray(sigmas) - t_min)))
        if not 0 < index < len(sigmas) - 1 or t_max <= sigmas[index]:
            raise ConfigError(f"restart: t_min {t_min} falls on main level {sigmas[index]:.4g}; it must be a level "
                              f"between the first and the final 0, below t_max {t_max}")
        if index in anchors:
            raise ConfigError(f"restart: two intervals fall on main level {sigmas[index]:.4g}")
        anchors[index] = (n, k, t_max)
    return anchors


@solver("restart", order=0, nfe=_restart_nfe)  # stochastic: no deterministic order
def restart(model, x, sigmas, noise=None, intervals=CIFAR10_EDM_INTERVALS, s_noise=1.003, restart_gamma=0.05,
            s_tmin=0.01, s_tmax=1.0, rho=7.0):
    if restart_gamma < 0:
        raise ConfigError(f"restart: restart_gamma must be >= 0; got {restart_gamma!r}")
    intervals = _checked(intervals)
    anchors = _anchors(sigmas, intervals)
    if any(k for _, k, _, _ in intervals):  # else no restart happens, nothing is drawn: Heun
        require_noise(noise, "restart")
        # the reference's restart churn is a fixed gamma: Churn's min(s_churn / steps, sqrt(2) - 1) with steps 1
        churn = Churn("restart", 1, noise, s_churn=restart_gamma, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    for i, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x = heun_step(model, x, s, s_next)
        if i + 1 not in anchors:
            continue
        n, k, t_max = anchors[i + 1]
        levels = list(karras_levels(t_max, s_next, n, rho))[:-1] + [s_next]  # ends exactly on the main level
        for _ in range(k):
            x = x + noise.randn_like(x) * (s_noise * (t_max**2 - s_next**2) ** 0.5)
            for level, level_next in zip(levels[:-1], levels[1:]):
                x, level = churn(x, level)
                x = heun_step(model, x, level, level_next)
    return x
