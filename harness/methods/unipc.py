"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) with a corrector (UniC) that reuses the
evaluation at the predicted point, so the corrector costs no extra network call.

Data prediction on scaled variables, lambda = -log sigma~, as diffusers' UniPCMultistepScheduler with
predict_x0 and lower_order_final: the order rises with the history and falls back to the number of steps
left near the end, so the step to sigma~ = 0 is x = D(x). With the corrector, UniP-p + UniC reach order
p + 1.
"""

from __future__ import annotations

import math

import numpy as np

from harness.methods.solver_base import solver

VARIANTS = ("bh1", "bh2")


def _linear_system(rks: list[float], h: float, variant: str):
    """h*phi_1, B(h), and UniPC's system R rho = b for the nodes rks (the last one is 1)."""
    hh = -h  # data prediction integrates e^{-lambda}
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    h_phi_k, factorial, b = h_phi_1 / hh - 1, 1, []
    for k in range(1, len(rks) + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    rows = np.vander(np.asarray(rks), len(rks), increasing=True).T  # row k: rks ** k
    return h_phi_1, b_h, rows, np.asarray(b)


def _differences(outputs, lambdas, base, order, h):
    """Divided differences (m_i - m_base) / r_i of the order - 1 outputs before `base`, and their r_i."""
    rks, diffs = [], []
    for i in range(1, order):
        r = (lambdas[base - i] - lambdas[base]) / h
        rks.append(r)
        diffs.append((outputs[base - i] - outputs[base]) / r)
    return rks, diffs


def _predict(x, outputs, lambdas, sigmas, i, order, variant):
    """UniP-order from sigma_i to sigma_{i+1}."""
    s, s_next = sigmas[i], sigmas[i + 1]
    if s_next == 0:  # order is 1 here: the exact limit of the update
        return outputs[i]
    h = math.log(s / s_next)
    rks, diffs = _differences(outputs, lambdas, i, order, h)
    h_phi_1, b_h, rows, b = _linear_system(rks + [1.0], h, variant)
    x_next = (s_next / s) * x - h_phi_1 * outputs[i]
    if order >= 2:
        # diffusers (and the UniPC reference code) fix rho = 1/2 for order 2
        rhos = [0.5] if order == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1])
        x_next = x_next - b_h * sum(rho * d for rho, d in zip(rhos, diffs))
    return x_next


def _correct(x_last, model_now, outputs, lambdas, sigmas, i, order, variant):
    """UniC-order: redo the step sigma_{i-1} -> sigma_i with the new evaluation `model_now` at sigma_i."""
    s, s_now = sigmas[i - 1], sigmas[i]
    h = math.log(s / s_now)
    rks, diffs = _differences(outputs, lambdas, i - 1, order, h)
    h_phi_1, b_h, rows, b = _linear_system(rks + [1.0], h, variant)
    rhos = [0.5] if order == 1 else np.linalg.solve(rows, b)
    residual = sum(rho * d for rho, d in zip(rhos[:-1], diffs)) + rhos[-1] * (model_now - outputs[i - 1])
    return (s_now / s) * x_last - h_phi_1 * outputs[i - 1] - b_h * residual


@solver("unipc", order=3)
def unipc(model, x, sigmas, noise=None, order=2, variant="bh2", corrector=True):
    """UniPC-`order` (1..3) with B(h) variant bh1 | bh2; the registered order 3 is the default's
    (UniP-2 with UniC). corrector=False gives the bare predictor UniP-`order`."""
    if variant not in VARIANTS or order not in (1, 2, 3):
        raise ValueError(f"unipc: variant must be one of {VARIANTS} and order 1..3; got {variant!r}, {order}")
    steps = len(sigmas) - 1
    lambdas = [-math.log(s) for s in sigmas[:-1]]
    outputs, x_last, last_order = [], None, None
    for i in range(steps):
        denoised = model(x, sigmas[i])
        if corrector and i > 0:
            x = _correct(x_last, denoised, outputs, lambdas, sigmas, i, last_order, variant)
        outputs.append(denoised)  # the evaluation at the predicted point serves the history
        last_order = min(order, steps - i, i + 1)
        x_last = x
        x = _predict(x, outputs, lambdas, sigmas, i, last_order, variant)
    return x
