"""SA-Solver (Xue et al. 2023): the stochastic Adams predictor-corrector for diffusion SDEs.

The reverse SDE family with stochasticity tau (tau = 0: the PF-ODE, tau = 1: the reverse diffusion SDE) has,
on scaled variables x~ = x / alpha and lambda = -log sigma~, the exact step over lambda_s -> lambda_t
(h = lambda_t - lambda_s, k = 1 + tau^2)

    x~_t = e^{-k h} x~_s + k int_{lambda_s}^{lambda_t} e^{-k (lambda_t - lambda)} D(lambda) dlambda
           + sigma~_t sqrt(1 - e^{-2 tau^2 h}) z.

SA-Solver replaces D by the Lagrange polynomial through earlier data predictions (the SA-Predictor, an
Adams-Bashforth step of `predictor_order` points) and then, once the network has been evaluated at the
predicted point, redoes the step with the polynomial through that new evaluation and `corrector_order - 1`
earlier ones (the SA-Corrector, Adams-Moulton), with the same z. The evaluation at the predicted point is
the one the next predictor uses, so the corrector costs no network call ("PEC" mode, one evaluation a step).

Faithful to the paper's reference code (scxue/SA-Solver, its recommended `few_steps` mode) and to diffusers'
SASolverScheduler with algorithm_type="data_prediction" (its default): the integrals of the exponential
against the interpolating polynomial are exact; orders rise with the history (predictor min(p, i + 1),
corrector min(c, i + 2) on step i) and with lower_order_final fall to the number of steps left (predictor
min(p, steps - i), corrector min(c, steps - i + 1)); at order 2 both codes apply the "rescaling trick"
(their comments cite the paper's Appendix D): the exponentially weighted first moment
int_0^1 e^{-khu} (1 - u) du of the linear interpolant's slope term (u = (lambda_t - lambda) / h) is replaced
by its unweighted value 1/2, an O(h^3) change per step that the authors found to help at few steps.
Predictor and corrector orders are 1..4 as there. Agrees with diffusers to 2e-14 (float64, shared noise;
tests/test_sa_solver.py). With tau = 0 it converges with order min(c, p + 1) (measured on gmm2d: 2 at
diffusers' defaults p = c = 2, the registered order; 3 at 2, 3 and 3, 3; 4 at 3, 4).

What differs:
- tau is a constant, or a window (sigma_lo, sigma_hi): tau = 1 on the steps that start at a noise level
  sigma~ in [sigma_lo, sigma_hi] (ends included), 0 elsewhere. diffusers evaluates its tau_func at the
  timestep a step starts from, as here; its default, tau = 1 for timesteps 200..800, is the window
  DIFFUSERS_TAU_WINDOW = (0.72359, 25.736): sigma~(200) = 0.723591 and sigma~(800) = 25.73598 of the DDPM
  linear-beta process (diffusers' default betas) rounded outwards, so that on that process exactly the
  training timesteps 200..800 lie inside. It is the default here, and being in sigma~ it is the same noise
  levels on every process (diffusers' timestep window moves with the beta schedule). The reference code
  evaluates tau at the step's end instead, which moves the window's edges by one step, and in few_steps mode
  takes its last step with tau = 0; here, as in diffusers, every step takes the tau of its start (on the step to 0
  that only matters with noise prediction).
- The last step, to sigma~ = 0, is x = D(x) (the limit of the first-order step, as every stepbench solver
  takes it; the SDE adds no noise there). diffusers cannot step to 0 (lambda = inf) and stops at sigma~ of
  timestep 0 without denoising: stepbench's grid [..., sigma_min, 0] is diffusers' grid down to sigma_min
  and one evaluation more. D is evaluated at the predicted point and the corrector of that last level is
  not computed (it could not change the output: PEC uses the evaluation of the predicted point).
  With noise prediction the limit of the first-order step is x - (1 + tau^2) sigma~ eps + tau sigma~ z from
  the corrected point (what diffusers' noise_prediction step does to sigma~ ~ 0), so there the corrector of
  the level before counts, and tau > 0 draws noise on that step too.
- `prediction: noise` is diffusers' algorithm_type="noise_prediction" (the authors recommend data, the default):
  the same predictor and corrector on the noise predictions eps = (x~ - D) / sigma~ at the evaluated points,
  over the step x~_t = x~_s - k int_{lambda_s}^{lambda_t} e^{-lambda} eps(lambda) dlambda
  + tau sqrt(sigma~_s^2 - sigma~_t^2) z (the kernel without k, as there), and without the rescaling trick
  (diffusers applies it to data prediction only). Agrees with diffusers to 5e-11 (tests, stepping to
  sigma~ = 1e-15 there), most of it diffusers' rounding: its weights, from powers of lambda itself, are off by
  up to 4e-13 (these by 2e-15; both against mpmath), and with exact weights in diffusers it agrees to 5e-13.
  Orders min(c, p + 1) as for data (measured 1.95 at 2, 2; 3.04 at 2, 3).
- Stateless and allocation-light: the corrector's change to x is a combination of the data (or noise)
  predictions alone (the same x~_s and z), so it is folded into the next predictor, and each step is one in-place
  fused combination of x and the history plus the noise: the corrected sample is never formed.

NFE: one evaluation per step, NFE = steps (the levels sigma_0 .. sigma_{steps-1}). Noise: per-sample draws
from `noise.randn_like(x)`, one per step that has tau > 0 (with data prediction none on the step to 0), so a
sample does not depend on its batch; with tau = 0 everywhere no noise is needed.
"""

from __future__ import annotations

import math
from numbers import Real

import torch

from harness.errors import ConfigError
from harness.methods.solver_base import combine, require_noise, solver

# diffusers' default tau_func (tau = 1 for timesteps 200..800) as noise levels: sigma~(200), sigma~(800) of the
# DDPM linear-beta process rounded outwards (see the module docstring)
DIFFUSERS_TAU_WINDOW = (0.72359, 25.736)
ORDERS = (1, 2, 3, 4)
PREDICTIONS = ("data", "noise")


def _taus(tau, levels) -> list[float]:
    """tau of each step, from the level it starts at: a constant, or 1 inside the window (sigma_lo, sigma_hi)."""
    if isinstance(tau, Real) and not isinstance(tau, bool) and tau >= 0:
        return [float(tau)] * len(levels)
    if isinstance(tau, (list, tuple)) and len(tau) == 2 and all(isinstance(v, Real) for v in tau) \
            and 0 <= tau[0] <= tau[1]:
        lo, hi = tau
        return [1.0 if lo <= s <= hi else 0.0 for s in levels]
    raise ConfigError(f"sa_solver: tau must be a number >= 0 or a window [sigma_lo, sigma_hi] with "
                      f"0 <= sigma_lo <= sigma_hi; got {tau!r}")


def _exp_moments(c: float, n: int) -> list[float]:
    """M_m = int_0^1 e^{-c u} u^m du for m = 0..n, accurate for every real c."""
    if c < -2:
        # by parts, M_m = (m M_{m-1} - e^{-c}) / c: each step scales an error by m / |c| < 2 (n <= 3)
        moments = [math.expm1(-c) / -c]
        for m in range(1, n + 1):
            moments.append((m * moments[-1] - math.exp(-c)) / c)
        return moments
    if c > 2:
        # closed form m!/c^{m+1} (1 - e^{-c} sum_{i<=m} c^i / i!): no cancellation worth the name for c > 2
        moments, partial, term, factorial = [], 0.0, 1.0, 1.0
        for m in range(n + 1):
            partial += term  # sum_{i<=m} c^i / i!
            moments.append(factorial / c ** (m + 1) * (1 - math.exp(-c) * partial))
            term *= c / (m + 1)
            factorial *= m + 1
        return moments
    # m! e^{-c} sum_j c^j / (m + j + 1)!: |c| <= 2, so 30 terms reach 2^30 / 31! ~ 1e-25
    moments = []
    for m in range(n + 1):
        total, term = 0.0, 1.0 / math.factorial(m + 1)
        for j in range(30):
            total += term
            term *= c / (m + j + 2)
        moments.append(math.factorial(m) * math.exp(-c) * total)
    return moments


def _weights(lambdas, start: int, newest: int, order: int, k: float, prediction: str) -> list[float]:
    """The weights w_j, newest first, of the predictions at lambdas[newest], lambdas[newest - 1], ... in the step
    lambdas[start] -> lambdas[start + 1] = lambda_t, P the Lagrange polynomial through those `order` points
    (newest = start: predictor, start + 1: corrector): for data, in k int e^{-k (lambda_t - lambda)} P dlambda
    (they sum to 1 - e^{-k h}); for noise, in -k int e^{-lambda} P dlambda (sum -k (sigma~_s - sigma~_t))."""
    h = lambdas[start + 1] - lambdas[start]
    data = prediction == "data"
    # in u = (lambda_t - lambda) / h the step is u in [0, 1] (lambda_s at u = 1): w_j = scale int_0^1 e^{-cu} l_j(u) du
    sigma_t = math.exp(-lambdas[start + 1])
    c, scale = (k * h, k * h) if data else (-h, -k * h * sigma_t)
    if order == 1:
        return [-math.expm1(-k * h) if data else -k * sigma_t * math.expm1(h)]
    nodes = [(lambdas[start + 1] - lambdas[newest - j]) / h for j in range(order)]
    moments = _exp_moments(c, order - 1)
    if order == 2 and data:
        # the rescaling trick (see the module docstring): int_0^1 e^{-khu} (1 - u) du = M_0 - M_1 replaced by 1/2
        moments[1] = moments[0] - 0.5
    weights = []
    for j, node in enumerate(nodes):
        coefficients, denominator = [1.0], 1.0  # l_j(u) = prod_{m != j} (u - u_m) / (u_j - u_m), powers of u upwards
        for m, other in enumerate(nodes):
            if m != j:
                coefficients = [a - other * b for a, b in zip([0.0] + coefficients, coefficients + [0.0])]
                denominator *= node - other
        weights.append(scale * sum(a * moment for a, moment in zip(coefficients, moments)) / denominator)
    return weights


def _noise_step_to_zero(denoised, history, correction, sigma, tau, noise):
    """Noise prediction's step to sigma~ = 0: the limit of its first-order step from the corrected point,
    x - (1 + tau^2) sigma eps + tau sigma z. The predicted point less sigma eps is D (PEC: eps there), so it is
    D + the last correction - tau^2 sigma eps (+ tau sigma z). (Data prediction's limit is D whatever tau.)"""
    terms = [(w, eps) for w, eps in zip(correction, history) if w]
    if tau > 0:
        terms.append((-tau**2 * sigma, history[0]))
    x = combine([(1.0, denoised)] + terms) if terms else denoised
    return x.add_(noise.randn_like(x), alpha=tau * sigma) if tau > 0 else x


@solver("sa_solver", order=2)
def sa_solver(model, x, sigmas, noise=None, predictor_order=2, corrector_order=2, tau=DIFFUSERS_TAU_WINDOW,
              lower_order_final=True, prediction="data"):
    """SA-Solver with an SA-Predictor of `predictor_order` and an SA-Corrector of `corrector_order` points
    (1..4; diffusers' defaults 2, 2, which the registered order 2 is for, with tau = 0; the authors recommend 3, 4
    for unconditional models); tau a constant or a window [sigma_lo, sigma_hi] where it is 1 (default: diffusers'
    timesteps 200..800, see the module docstring); `prediction` data (default) or noise. Per-sample noise is
    needed where tau > 0."""
    if predictor_order not in ORDERS or corrector_order not in ORDERS:
        raise ConfigError(f"sa_solver: predictor_order and corrector_order must be in 1..4; "
                          f"got {predictor_order!r}, {corrector_order!r}")
    if prediction not in PREDICTIONS:
        raise ConfigError(f"sa_solver: prediction must be one of {', '.join(PREDICTIONS)}; got {prediction!r}")
    data = prediction == "data"
    steps = len(sigmas) - 1
    taus = _taus(tau, sigmas[:-1])
    if any(t > 0 for t, s_next in zip(taus, sigmas[1:]) if s_next > 0 or not data):  # see _noise_step_to_zero
        require_noise(noise, "sa_solver")
    lambdas = [-math.log(s) for s in sigmas if s > 0]
    depth = max(corrector_order, predictor_order + 1)  # the corrector also takes back the predictor's oldest term
    history = []  # data (or noise) predictions at sigmas[i], sigmas[i - 1], ..., newest first
    correction = []  # weights of history (after the next evaluation) taking the predicted x to the corrected one
    for i in range(steps):
        denoised = model(x, sigmas[i])
        history = [denoised if data else (x - denoised).div_(sigmas[i])] + history[: depth - 1]
        if sigmas[i + 1] == 0:
            return denoised if data else _noise_step_to_zero(denoised, history, correction, sigmas[i], taus[i], noise)
        k, h = 1 + taus[i] ** 2, lambdas[i + 1] - lambdas[i]
        decay = math.exp(-k * h) if data else 1.0
        p = min(predictor_order, i + 1, steps - i if lower_order_final else predictor_order)
        c = min(corrector_order, i + 2, steps - i + 1 if lower_order_final else corrector_order)
        predict = _weights(lambdas, i, i, p, k, prediction)
        # corrected x = predicted x + sum correction_j D_j, then the predictor: decay * corrected x + sum predict_j D_j,
        # as one weight per tensor, in place on x (the caller's x is copied by the first step's multiply)
        if i == 0:
            x = torch.mul(x, decay)
        elif decay != 1.0:  # noise prediction has no decay
            x.mul_(decay)
        for j, d in enumerate(history):
            w = decay * (correction[j] if j < len(correction) else 0.0) + (predict[j] if j < p else 0.0)
            if w:
                x.add_(d, alpha=w)
        if taus[i] > 0:
            spread = math.sqrt(-math.expm1(-2 * taus[i] ** 2 * h)) if data else taus[i] * math.sqrt(math.expm1(2 * h))
            x.add_(noise.randn_like(x), alpha=sigmas[i + 1] * spread)
        # the corrector of this step (points i + 1, i, ...) minus its predictor (points i, i - 1, ...), for the
        # history as it will stand after the evaluation at sigmas[i + 1]; same x~_s and z, so only D terms remain
        correct = _weights(lambdas, i, i + 1, c, k, prediction)
        correction = [(correct[j] if j < c else 0.0) - (predict[j - 1] if 1 <= j <= p else 0.0)
                      for j in range(max(c, p + 1))]
    return x
