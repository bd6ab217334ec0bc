"""DC-Solver (Zhao, Wang, Rao, Lu & Zhou, "DC-Solver: Improving Predictor-Corrector Diffusion Sampler
via Dynamic Compensation", ECCV 2024; reference code github.com/wl-zhao/DC-Solver, dc_solver.py).

In a predictor-corrector multistep sampler (UniPC) the evaluation at sigma_i is taken at the
predicted point, but the trajectory continues from the corrected one: the stored output is
misaligned. Dynamic compensation replaces it, before each step, by the Lagrange interpolation of the
last three outputs in native time at t_i* = r_i t_i + (1 - r_i) t_{i-1}; r_i = 1 is plain UniPC. The
ratios r_i are fitted per step, greedily, so that the sampler's state after the step matches a
high-accuracy reference trajectory from the same noise on `calibration_samples` (10) calibration
draws. The search evaluates the network through the corrector, as the reference does; all of it
happens in the preparation (scope nfe: ratios for this schedule), sampling only applies them.

Faithful: base UniPC-`order` (harness.methods.unipc, bh1 and order 3 as the reference's defaults),
interpolation order 2 in native time, the warm-up steps (fewer than three outputs) left
uncompensated, greedy per-step fits on 10 samples against the reference trajectory's state, MSE loss.
Differs: the reference runs 40 AdamW steps (lr 0.1) from r = 1; here Brent's method from a bracket at
r = 1 finds the nearest local minimum without gradients (so networks need no backward pass). The
reference trajectory is DPM-Solver++(2M) with `reference_substeps` log-uniform substeps per step (the
reference code uses a 200-step DDIM and matches each step to the nearest earlier stored point). The
final step to sigma~ = 0 returns the compensated data prediction, so the last ratio is fitted against
the reference's final sample. The cascade polynomial regression that predicts ratios for unseen
NFE/guidance (paper Sec. 3.3) is not implemented: ratios are fitted for each NFE. NFE: one evaluation
per step (NFE = steps), as UniPC. Calibration samples whose reference diverges (NaN/Inf) are left out of
the loss, a diverged run scores +inf, and a step with no finite loss keeps r = 1.

Checked side by side with the reference code (not committed) on the same ratios, order 3, bh1 and bh2,
NFE 5-10: samples agree to 5e-15 on gmm2d; on digits-ideal to 2e-7, because the reference interpolates
native time between training steps in log alpha where VPDiscrete does in log sigma~. With Brent put in
its search, the reference finds the same ratios to 1e-7.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar

from harness.errors import ConfigError
from harness.methods.solver_base import finite_rows, keep_rows, solver
from harness.methods.unipc import VARIANTS, _correct, _predict
from harness.noise import SampleNoise

INTERPOLATION_ORDER = 2  # Lagrange through the last three outputs, as the reference's dc_order
# the outputs a step reads: UniPC up to order 3 and the interpolation both reach three back
REACH = max(3, INTERPOLATION_ORDER + 1)


def _forget_unreachable(outputs):
    """Free the batch-sized outputs no later step reads; the list keeps its indices (they pair with times)."""
    if len(outputs) > REACH:
        outputs[-REACH - 1] = None


def _compensated(outputs, times, i, ratio):
    """The output at sigma_i replaced by the interpolation of outputs i-2..i at r t_i + (1-r) t_{i-1}."""
    if i < INTERPOLATION_ORDER or ratio == 1.0:
        return outputs[i]
    target = ratio * times[i] + (1 - ratio) * times[i - 1]
    nodes = range(i - INTERPOLATION_ORDER, i + 1)
    value = 0
    for j in nodes:
        weight = math.prod((target - times[k]) / (times[j] - times[k]) for k in nodes if k != j)
        value = value + weight * outputs[j]
    return value


def _step(model, x, outputs, sigmas, times, i, order, variant, ratio):
    """Compensate the output at sigma_i, then UniPC from sigma_i: predict, evaluate, correct.
    Returns the state at sigma_{i+1} and the outputs (the step to sigma~ = 0 returns the prediction)."""
    lambdas = [-math.log(s) for s in sigmas[:-1]]
    outputs = outputs[:i] + [_compensated(outputs, times, i, ratio)]
    step_order = min(order, len(sigmas) - 1 - i, i + 1)
    x_predicted = _predict(x, outputs, lambdas, sigmas, i, step_order, variant)
    if sigmas[i + 1] == 0:
        return x_predicted, outputs
    evaluated = model(x_predicted, sigmas[i + 1])
    return _correct(x, evaluated, outputs, lambdas, sigmas, i + 1, step_order, variant), \
        outputs + [evaluated]


def _reference_states(model, x, sigmas, substeps):
    """States of a DPM-Solver++(2M) run with `substeps` log-uniform substeps per step, at every sigma
    of the schedule; the last entry is the final sample (the data prediction at sigma_min)."""
    states, old_denoised, h_last = [x], None, None
    for s, s_next in zip(sigmas[:-2], sigmas[1:-1]):
        fine = np.exp(np.linspace(math.log(s), math.log(s_next), substeps + 1))
        for a, b in zip(fine[:-1], fine[1:]):
            denoised = model(x, float(a))
            h = math.log(a / b)
            d = denoised if old_denoised is None else denoised + 0.5 * (h / h_last) * (denoised - old_denoised)
            x = (b / a) * x - math.expm1(-h) * d
            old_denoised, h_last = denoised, h
        states.append(x)
    states.append(model(x, sigmas[-2]))
    return states


def fit_compensation_ratios(denoiser, sigmas, calibration_seed, order=3, variant="bh1", calibration_samples=10,
                            reference_substeps=50, **unused) -> dict:
    """Per-step ratios fitted greedily against the reference trajectory (prepare, scope nfe)."""
    process, info = denoiser.process, denoiser.info
    times = [float(t) for t in process.t(np.asarray(sigmas[:-1]))]
    draws = SampleNoise(calibration_seed, range(calibration_samples), device=info.device)
    x = draws.randn(info.data_shape, dtype=info.dtype) * process.prior_std(sigmas[0])
    reference = _reference_states(denoiser, x, sigmas, reference_substeps)
    outputs, ratios, diverged, unfitted = [denoiser(x, sigmas[0])], [], 0, []
    for i in range(len(sigmas) - 1):
        # A calibration sample whose reference or whose own run diverged (NaN/Inf) cannot score a ratio: fit
        # on the others (the loss is unchanged when none diverged). Its own run is judged by the plain step.
        target = reference[i + 1]
        finite = finite_rows(target)
        if i >= INTERPOLATION_ORDER:
            plain, _ = _step(denoiser, x, outputs, sigmas, times, i, order, variant, 1.0)
            finite &= finite_rows(plain)
        diverged = max(diverged, int((~finite).sum()))
        finite_target = keep_rows(target, finite)

        def loss(ratio):
            state, _ = _step(denoiser, x, outputs, sigmas, times, i, order, variant, float(ratio))
            value = float(((keep_rows(state, finite) - finite_target) ** 2).mean())
            # a diverged run loses: Brent returns NaN as soon as it meets one NaN value
            return value if math.isfinite(value) else math.inf

        ratio = 1.0
        if i >= INTERPOLATION_ORDER:
            fit = minimize_scalar(loss, bracket=(1.0, 1.05), method="brent", options={"maxiter": 40})
            if math.isfinite(fit.fun):  # else no ratio tried gave a finite loss: keep the plain UniPC step
                ratio = float(fit.x)
            else:
                unfitted.append(i)
        ratios.append(ratio)
        x, outputs = _step(denoiser, x, outputs, sigmas, times, i, order, variant, ratio)
        _forget_unreachable(outputs)
    return {"ratios": ratios, "times": times, "calibration_samples_diverged": diverged, "unfitted_steps": unfitted}


@solver("dc_solver", order=3, prepare=fit_compensation_ratios, prepare_scope="nfe")
def dc_solver(model, x, sigmas, noise=None, prepared=None, order=3, variant="bh1", **calibration):
    """UniPC-`order` with the fitted dynamic compensation ratios; `calibration` holds the preparation's
    settings (calibration_samples, reference_substeps), unused here."""
    if variant not in VARIANTS or order not in (1, 2, 3):
        raise ConfigError(f"dc_solver: variant must be one of {VARIANTS} and order 1..3; got {variant!r}, {order}")
    ratios, times = prepared["ratios"], prepared["times"]
    if len(ratios) != len(sigmas) - 1:
        raise ValueError(f"dc_solver: {len(ratios)} fitted ratios for {len(sigmas) - 1} steps (prepared for another NFE)")
    outputs = [model(x, sigmas[0])]
    for i, ratio in enumerate(ratios):
        x, outputs = _step(model, x, outputs, sigmas, times, i, order, variant, ratio)
        _forget_unreachable(outputs)
    return x
