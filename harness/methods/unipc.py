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

from harness.errors import ConfigError
from harness.methods.solver_base import combine, solver

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


def _ratios(lambdas, base, order, h):
    """r_k = (lambda_{base-k} - lambda_base) / h for the order - 1 outputs before `base`, k = 1, 2, ..."""
    return [(lambdas[base - k] - lambdas[base]) / h for k in range(1, order)]


def _predict(x, outputs, lambdas, sigmas, i, order, variant):
    """UniP-order from sigma_i to sigma_{i+1}; outputs ends with m_i (and holds at least `order` of them)."""
    s, s_next = sigmas[i], sigmas[i + 1]
    if s_next == 0:  # order is 1 here: the exact limit of the update
        return outputs[-1]
    h = math.log(s / s_next)
    rks = _ratios(lambdas, i, order, h)
    h_phi_1, b_h, rows, b = _linear_system(rks + [1.0], h, variant)
    # x_next = (s_next / s) x - h_phi_1 m_i - b_h sum_k rho_k (m_{i-k} - m_i) / r_k, with the float weights
    # folded onto each tensor so that the update is one fused combination
    w_now, older = -h_phi_1, []
    if order >= 2:
        # diffusers (and the UniPC reference code) fix rho = 1/2 for order 2
        rhos = [0.5] if order == 2 else np.linalg.solve(rows[:-1, :-1], b[:-1])
        for k, (rho, r) in enumerate(zip(rhos, rks), start=1):
            w = float(b_h * rho / r)
            w_now += w
            older.append((-w, outputs[-1 - k]))
    return combine([(s_next / s, x), (w_now, outputs[-1])] + older)


def _correct(x_last, model_now, outputs, lambdas, sigmas, i, order, variant):
    """UniC-order: redo the step sigma_{i-1} -> sigma_i with the new evaluation `model_now` at sigma_i; outputs
    ends with m_{i-1}."""
    s, s_now = sigmas[i - 1], sigmas[i]
    h = math.log(s / s_now)
    rks = _ratios(lambdas, i - 1, order, h)
    h_phi_1, b_h, rows, b = _linear_system(rks + [1.0], h, variant)
    rhos = [0.5] if order == 1 else np.linalg.solve(rows, b)
    # (s_now / s) x_last - h_phi_1 m_{i-1} - b_h [sum_k rho_k (m_{i-1-k} - m_{i-1}) / r_k
    #  + rho_last (model_now - m_{i-1})], with one float weight per tensor as in _predict
    w_last = float(b_h * rhos[-1])
    w_base, older = -h_phi_1 + w_last, []
    for k, (rho, r) in enumerate(zip(rhos[:-1], rks), start=1):
        w = float(b_h * rho / r)
        w_base += w
        older.append((-w, outputs[-1 - k]))
    return combine([(s_now / s, x_last), (w_base, outputs[-1]), (-w_last, model_now)] + older)


@solver("unipc", order=3)
def unipc(model, x, sigmas, noise=None, order=2, variant="bh2", corrector=True):
    """UniPC-`order` (1..3) with B(h) variant bh1 | bh2; the registered order 3 is the default's
    (UniP-2 with UniC). corrector=False gives the bare predictor UniP-`order`."""
    if variant not in VARIANTS or order not in (1, 2, 3):
        raise ConfigError(f"unipc: variant must be one of {VARIANTS} and order 1..3; got {variant!r}, {order}")
    steps = len(sigmas) - 1
    lambdas = [-math.log(s) for s in sigmas[:-1]]
    outputs, x_last, last_order = [], None, None
    for i in range(steps):
        denoised = model(x, sigmas[i])
        if corrector and i > 0:
            x = _correct(x_last, denoised, outputs, lambdas, sigmas, i, last_order, variant)
        outputs.append(denoised)  # the evaluation at the predicted point serves the history
        del outputs[:-order]  # as far back as any step reaches: no batch-sized tensor per step kept
        last_order = min(order, steps - i, i + 1)
        x_last = x
        x = _predict(x, outputs, lambdas, sigmas, i, last_order, variant)
    return x
