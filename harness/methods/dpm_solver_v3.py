"""DPM-Solver-v3 (Zheng, Lu, Chen & Zhu, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical
Model Statistics", NeurIPS 2023; reference code github.com/thu-ml/DPM-Solver-v3, dpm_solver_v3.py).

With lambda = -log sigma~ and scaled variables, the PF-ODE is dx~/dlambda = D - x~. DPM-Solver-v3
rewrites it with three per-dimension "empirical model statistics" (EMS) l, s, b of lambda:

    dx~/dlambda = -l x~ - f,   f = (1 - l) x~ - D          (f is the paper's (sigma eps - l x) / alpha)
    l*     = argmin E ||grad_x (sigma eps - l x)||_F^2  = 1 - E[diag(grad_x~ D)]
    s*, b* = argmin E ||f' - s f - b||^2                (f' = df/dlambda along the ODE)

so that g = e^{-int s} f - int e^{-int s} b is as flat as possible in lambda; the solver is an
exponential integrator with a Taylor expansion of g (multistep predictor, optional corrector that
reuses the next evaluation, optional "pseudo-order" divided differences). l = 1, s = b = 0 gives
DPM-Solver++ (tested).

Preparation (`empirical_model_statistics`, scope model): the expectations are over the model's own
marginals p_lambda, estimated on `num_samples` PF-ODE trajectories from calibration noise, integrated
with DPM-Solver++(2M) along `grid_points` lambdas uniform from sigma_max to sigma_min. At each grid
point: diag(grad D) by Hutchinson's estimator with one Rademacher probe per sample, f' along the
trajectory; s, b by per-dimension least squares over the samples; l' (needed in f') by finite
differences of l on the grid. Directional derivatives are central finite differences with step
eps^(1/3) (relative to sigma~ in x), so every adapter works, networks included (the paper uses
autograd JVPs). Defaults 256 samples x 120 lambdas (5 evaluations per sample and lambda, about a
minute for digits-ideal on 2 CPU cores) keep the calibration cheap; the paper uses 1024-4096 samples
x 120-1200 lambdas. Calibration trajectories that diverge (NaN/Inf) are left out of the expectations;
grid points left with none get DPM-Solver++'s l = 1, s = b = 0 (the artifact counts both).

Sampling (`dpm_solver_v3`): faithful to the reference `DPM_Solver_v3.sample` (multistep predictor of
`order`, lower order at the start and the end, corrector of the previous predictor's order, or +1
with `corrector_pseudo`, keeping N = sigma eps - l x of the corrected point), with time steps snapped
to the statistics grid as the reference does. Differs: the integrals of the statistics (the
reference's L, S, B, I, C and higher-order coefficients, trapezoid rule) are taken on the grid
refined `INTEGRATION_REFINE` times with l, s, b interpolated linearly, and snapping is to that finer
grid, so few calibration lambdas do not limit the accuracy of the integrator. The final step to
sigma~ = 0 returns the data prediction of the (corrected) last point, D + (1 - l)(x_corrected - x).
Defaults are the reference README's recommendation (order 3, corrector of pseudo-order +1; its EDM
script instead switches a pseudo-order predictor on for <= 5 steps and the corrector off above 6).
NFE: one evaluation per step (NFE = steps), over `steps` noise levels ending at sigma_min; the reference
spends NFE N on N + 1 levels and returns x at sigma_min, so its numbers at a given NFE are not ours.

Checked side by side with the reference code (not committed) on gmm2d, the same statistics, time steps
and noise, six predictor/corrector settings at NFE 5-10: with INTEGRATION_REFINE = 1 and the reference's
float32 time tensors made float64, samples agree to 1e-11.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from harness.errors import ConfigError
from harness.methods.solver_base import finite_rows, keep_rows, solver
from harness.noise import SampleNoise

INTEGRATION_REFINE = 8  # integration grid points per statistics grid interval


# ---- preparation: the empirical model statistics ----


def empirical_model_statistics(denoiser, sigmas, calibration_seed, num_samples=256, grid_points=120,
                               **sampling_params) -> dict:
    """l, s, b on a lambda grid uniform from sigma_max to sigma_min; arrays [grid_points, *data_shape]."""
    process, info = denoiser.process, denoiser.info
    lambdas = np.linspace(-math.log(process.sigma_max), -math.log(process.sigma_min), grid_points)
    draws = SampleNoise(calibration_seed, range(num_samples), device=info.device)
    x = draws.randn(info.data_shape, dtype=info.dtype) * process.prior_std(process.sigma_max)
    step = torch.finfo(info.dtype).eps ** (1 / 3)  # optimal central-difference step
    sums = {k: [] for k in ("l", "f", "ff", "x", "fx", "a", "fa")}
    old_denoised = None
    diverged = torch.zeros(num_samples, dtype=torch.bool, device=info.device)
    for k, lam in enumerate(lambdas):
        sigma = math.exp(-lam)
        denoised = denoiser(x, sigma)
        probe = torch.sign(draws.randn_like(x))
        dx = step * sigma  # D varies on the scale of sigma~
        jac_probe = (denoiser(x + dx * probe, sigma) - denoiser(x - dx * probe, sigma)) / (2 * dx)
        velocity = denoised - x  # dx~/dlambda
        total_derivative = (denoiser(x + step * velocity, math.exp(-(lam + step)))
                            - denoiser(x - step * velocity, math.exp(-(lam - step)))) / (2 * step)
        # Expectations over the trajectories that are finite here: one that diverged (NaN/Inf) would make
        # every mean NaN from here on. With none diverged this is the plain mean.
        finite = finite_rows(x, denoised, jac_probe, total_derivative)
        diverged |= ~finite

        def mean(v):
            return keep_rows(v, finite).mean(0)  # no finite row: NaN, replaced below

        l_k = 1 - mean(probe * jac_probe)
        f = (1 - l_k) * x - denoised
        a = (1 - l_k) * velocity - total_derivative  # f' = a - l' x
        for key, value in (("l", l_k), ("f", mean(f)), ("ff", mean(f * f)), ("x", mean(x)),
                           ("fx", mean(f * x)), ("a", mean(a)), ("fa", mean(f * a))):
            sums[key].append(value.double())
        if k + 1 < len(lambdas):  # advance the trajectories with DPM-Solver++(2M)
            h = lambdas[k + 1] - lam
            d = denoised if old_denoised is None else denoised + (denoised - old_denoised) / 2
            x = math.exp(-h) * x - math.expm1(-h) * d
            old_denoised = denoised
    m = {key: torch.stack(values) for key, values in sums.items()}
    l_slope = torch.from_numpy(np.gradient(m["l"].numpy(), lambdas, axis=0))
    mean_f, mean_df = m["f"], m["a"] - l_slope * m["x"]
    cov = m["fa"] - l_slope * m["fx"] - mean_f * mean_df
    var = m["ff"] - mean_f**2
    # dimensions whose f never varies (constant data pixels) carry no slope
    s = torch.where(var > 1e-12 * (1 + m["ff"]), cov / var.clamp_min(1e-300), torch.zeros_like(var))
    b = mean_df - s * mean_f
    # Where no calibration trajectory was finite there are no statistics: DPM-Solver++'s l = 1, s = b = 0
    # stand in (NaN would poison the integrals over the whole grid, so every cell would diverge, also
    # those that never evaluate there; one that does still diverges, from the model's own output).
    missing = ~(torch.isfinite(m["l"]) & torch.isfinite(s) & torch.isfinite(b))
    l, s, b = m["l"].masked_fill(missing, 1.0), s.masked_fill(missing, 0.0), b.masked_fill(missing, 0.0)
    return {"lambdas": torch.from_numpy(lambdas), "l": l, "s": s, "b": b,
            "num_samples": num_samples, "grid_points": grid_points,
            "diverged_samples": int(diverged.sum()),  # calibration trajectories left out somewhere
            "fallback_grid_points": int(missing.flatten(1).any(1).sum())}  # grid points with a stand-in


# ---- sampling ----


def _cumulative_trapezoid(values: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """int_{lambda_0}^{lambda_i} values, per leading index i (trapezoid rule), starting at 0."""
    widths = (lambdas[1:] - lambdas[:-1]).reshape(-1, *[1] * (values.ndim - 1))
    steps = 0.5 * widths * (values[1:] + values[:-1])
    return torch.cat([torch.zeros_like(values[:1]), torch.cumsum(steps, 0)])


class _Tables:
    """The integrals of the statistics on the refined grid (the reference's L, S, B, I, C)."""

    def __init__(self, prepared: dict, dtype, device):
        coarse = prepared["lambdas"].double()
        self.lambdas = torch.linspace(float(coarse[0]), float(coarse[-1]), (len(coarse) - 1) * INTEGRATION_REFINE + 1,
                                      dtype=torch.float64)
        position = torch.from_numpy(np.interp(self.lambdas.numpy(), coarse.numpy(), np.arange(len(coarse))))
        lo = position.floor().long().clamp(max=len(coarse) - 2)
        w = (position - lo).reshape(-1, *[1] * (prepared["l"].ndim - 1))
        l, s, b = ((1 - w) * prepared[k][lo].double() + w * prepared[k][lo + 1].double() for k in ("l", "s", "b"))
        self.l, self.L, self.S = l, _cumulative_trapezoid(l, self.lambdas), _cumulative_trapezoid(s, self.lambdas)
        self.B = _cumulative_trapezoid(torch.exp(-self.S) * b, self.lambdas)
        self.I = _cumulative_trapezoid(torch.exp(self.L + self.S), self.lambdas)
        self.C = _cumulative_trapezoid(torch.exp(self.L + self.S) * self.B, self.lambdas)
        self.dtype, self.device = dtype, device

    def snap(self, sigma: float) -> int:
        spacing = float(self.lambdas[1] - self.lambdas[0])
        return int(min(max(round((-math.log(sigma) - float(self.lambdas[0])) / spacing), 0), len(self.lambdas) - 1))

    def sigma(self, index: int) -> float:
        return math.exp(-float(self.lambdas[index]))

    def cast(self, v: torch.Tensor) -> torch.Tensor:
        return v.to(dtype=self.dtype, device=self.device)

    def taylor_coefficient(self, i_s: int, i_t: int, k: int) -> torch.Tensor:
        """int_{lambda_s}^{lambda_t} e^{(L+S)(lambda) - (L+S)(lambda_s)} (lambda - lambda_s)^k / k! dlambda."""
        window = slice(i_s, i_t + 1)
        lam = self.lambdas[window]
        weight = torch.exp(self.L[window] + self.S[window] - self.L[i_s] - self.S[i_s])
        poly = ((lam - lam[0]) ** k / math.factorial(k)).reshape(-1, *[1] * (weight.ndim - 1))
        return _cumulative_trapezoid(weight * poly, lam)[-1]


def _derivatives(lambdas: list[float], values: list, pseudo: bool) -> list:
    """g', g'', ... at lambdas[0] from values at lambdas: exact Taylor fit, or the pseudo-order
    estimate k! times the k-th divided difference."""
    n = len(values) - 1
    if pseudo:
        table, out = list(values), []
        for k in range(1, n + 1):
            table = [(table[j] - table[j + 1]) / (lambdas[j] - lambdas[j + k]) for j in range(n - k + 1)]
            out.append(table[0] * math.factorial(k))
        return out
    offsets = np.array(lambdas[1:]) - lambdas[0]
    weights = np.linalg.inv(np.stack([offsets**k for k in range(1, n + 1)], axis=1))  # [k, j]
    return [sum(weights[k, j] * (values[j + 1] - values[0]) for j in range(n)) * math.factorial(k + 1)
            for k in range(n)]


def _step(tab: _Tables, xs, denoised, indices, points: list[int], i_t: int, pseudo: bool):
    """Exponential-integrator step from history point points[0] to grid index i_t, Taylor-expanding g
    with the history points `points` (the first is the start)."""
    i_s, x_s = indices[points[0]], xs[points[0]]
    c = tab.cast
    g = []
    for p in points:
        i = indices[p]
        f = c(1 - tab.l[i]) * xs[p] - denoised[p]
        g.append(c(torch.exp(tab.S[i_s] - tab.S[i])) * f - c(torch.exp(tab.S[i_s]) * (tab.B[i] - tab.B[i_s])))
    decay = torch.exp(tab.L[i_s] - tab.L[i_t])
    x_t = (c(decay) * x_s - c(torch.exp(-tab.L[i_t] - tab.S[i_s]) * (tab.I[i_t] - tab.I[i_s])) * g[0]
           - c(torch.exp(-tab.L[i_t]) * (tab.C[i_t] - tab.C[i_s] - tab.B[i_s] * (tab.I[i_t] - tab.I[i_s]))))
    if len(points) > 1:
        lambdas = [float(tab.lambdas[indices[p]]) for p in points]
        for k, derivative in enumerate(_derivatives(lambdas, g, pseudo), start=1):
            x_t = x_t - c(decay * tab.taylor_coefficient(i_s, i_t, k)) * derivative
    return x_t


@solver("dpm_solver_v3", order=3, prepare=empirical_model_statistics, prepare_scope="model")
def dpm_solver_v3(model, x, sigmas, noise=None, prepared=None, order=3, predictor_pseudo=False, use_corrector=True,
                  corrector_pseudo=True, **calibration):
    """DPM-Solver-v3 multistep predictor(-corrector) of `order` (1..3); `calibration` holds the
    preparation's settings (num_samples, grid_points), unused here."""
    if order not in (1, 2, 3):
        raise ConfigError(f"dpm_solver_v3: order must be 1, 2 or 3; got {order}")
    tab = _Tables(prepared, x.dtype, x.device)
    indices_planned = [tab.snap(s) for s in sigmas[:-1]]
    steps = len(indices_planned) - 1  # predictor steps; the last evaluation feeds the step to sigma~ = 0
    xs, denoised, indices, predictor_order = [], [], [], 0
    for k, i_now in enumerate(indices_planned):
        d = model(x, tab.sigma(i_now))
        xs.append(x), denoised.append(d), indices.append(i_now)
        del xs[:-4], denoised[:-4], indices[:-4]  # the corrector reaches 4 points back at most (order 3 + pseudo)
        corrector_order = predictor_order + int(corrector_pseudo)
        if use_corrector and corrector_order > 1:
            points = [-2, -1] + [-j for j in range(3, corrector_order + 1)]
            x_corrected = _step(tab, xs, denoised, indices, points, i_now, corrector_pseudo)
            # keep N = sigma eps - l x of the evaluation, now at the corrected point
            denoised[-1] = d + tab.cast(1 - tab.l[i_now]) * (x_corrected - x)
            xs[-1] = x_corrected
        if k == steps:
            break
        predictor_order = min(order, k + 1, steps - k)
        points = [-j for j in range(1, predictor_order + 1)]
        x = _step(tab, xs, denoised, indices, points, indices_planned[k + 1], predictor_pseudo)
    return denoised[-1]
