"""Noise processes and time-step schedules.

Every process is x_t = alpha(t) * x0 + sigma(t) * eps.  Samplers work on the scaled variables of
EDM / k-diffusion, x~ = x_t / alpha and sigma~ = sigma / alpha, where every process becomes
x~ = x0 + sigma~ * eps and the probability-flow ODE is dx~/dsigma~ = (x~ - D(x~, sigma~)) / sigma~.
A process therefore only has to say how its native time t maps to sigma~ (for time-uniform grids and
for calling networks) and how big the prior is at the start.

Schedules are plain functions (process, n) -> n decreasing sigma~ values from sigma_max to sigma_min;
`sigma_grid` appends the final 0, so n points mean n solver steps.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from typing import Callable

import numpy as np

from harness.errors import ConfigError, valid_names


class NoiseProcess(ABC):
    """Maps native time t to scaled noise level sigma~ and back (vectorised over numpy arrays)."""

    kind: str

    @abstractmethod
    def sigma(self, t):
        """Scaled noise level sigma~ = sigma(t) / alpha(t)."""

    @abstractmethod
    def t(self, sigma):
        """Native time for a scaled noise level (inverse of `sigma`)."""

    @abstractmethod
    def alpha(self, sigma):
        """Signal scale alpha at the time whose scaled noise level is `sigma`."""

    @property
    @abstractmethod
    def t_range(self) -> tuple[float, float]:
        """(t at sigma_min, t at sigma_max): the interval a sampler integrates over."""

    @property
    def sigma_min(self) -> float:
        return float(self.sigma(self.t_range[0]))

    @property
    def sigma_max(self) -> float:
        return float(self.sigma(self.t_range[1]))

    def prior_std(self, sigma: float) -> float:
        """Std of x~ at the start, per coordinate: x_T = sigma(T) * eps, scaled by 1/alpha."""
        return float(sigma)

    def describe(self) -> dict:
        return {"kind": self.kind, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


class VPDiscrete(NoiseProcess):
    """DDPM: alpha_bar_k = prod(1 - beta_i) on integer steps k = 0..T-1; t is continuous in between.

    Between integer steps log sigma~ is interpolated linearly, as k-diffusion's DiscreteSchedule does,
    so any solver can ask for any sigma~ in range and a network gets a fractional timestep.
    """

    kind = "vp_discrete"

    def __init__(self, betas):
        self.betas = np.asarray(betas, dtype=np.float64)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas)
        self.sigmas = np.sqrt((1.0 - self.alphas_cumprod) / self.alphas_cumprod)
        self._log_sigmas = np.log(self.sigmas)

    @classmethod
    def from_config(cls, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000):
        n = int(num_train_timesteps)
        if beta_schedule == "linear":
            betas = np.linspace(beta_start, beta_end, n, dtype=np.float64)
        elif beta_schedule == "scaled_linear":  # Stable Diffusion
            betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float64) ** 2
        elif beta_schedule == "squaredcos_cap_v2":  # improved DDPM cosine
            f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
            betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
        else:
            raise ConfigError(
                f"beta_schedule {beta_schedule!r} unknown; valid: linear, scaled_linear, squaredcos_cap_v2"
            )
        return cls(betas)

    def sigma(self, t):
        return np.exp(np.interp(t, np.arange(len(self.sigmas)), self._log_sigmas))

    def t(self, sigma):
        return np.interp(np.log(sigma), self._log_sigmas, np.arange(len(self.sigmas)))

    def alpha(self, sigma):
        return 1.0 / np.sqrt(1.0 + np.asarray(sigma) ** 2)

    @property
    def t_range(self):
        return 0.0, float(len(self.sigmas) - 1)

    def prior_std(self, sigma):
        # DDPM starts from x_T ~ N(0, I), i.e. x~ = x_T / alpha_T.
        return float(math.sqrt(1.0 + sigma**2))


class VPContinuous(NoiseProcess):
    """Score-SDE VP with linear beta(t) on t in [t_eps, 1]."""

    kind = "vp_continuous"

    def __init__(self, beta_min=0.1, beta_max=20.0, t_eps=1e-3):
        self.beta_min, self.beta_d, self.t_eps = float(beta_min), float(beta_max - beta_min), float(t_eps)

    def _log_mean_coeff_sq(self, t):  # -log alpha(t)^2
        t = np.asarray(t, dtype=np.float64)
        return 0.5 * self.beta_d * t**2 + self.beta_min * t

    def sigma(self, t):
        return np.sqrt(np.expm1(self._log_mean_coeff_sq(t)))

    def t(self, sigma):
        log1p_s2 = np.log1p(np.asarray(sigma, dtype=np.float64) ** 2)
        return (np.sqrt(self.beta_min**2 + 2 * self.beta_d * log1p_s2) - self.beta_min) / self.beta_d

    def alpha(self, sigma):
        return 1.0 / np.sqrt(1.0 + np.asarray(sigma) ** 2)

    @property
    def t_range(self):
        return self.t_eps, 1.0

    def prior_std(self, sigma):
        return float(math.sqrt(1.0 + sigma**2))


class EDM(NoiseProcess):
    """Variance exploding, in EDM's parametrisation sigma(t) = t, alpha = 1."""

    kind = "edm"

    def __init__(self, sigma_min=0.002, sigma_max=80.0):
        self._range = (float(sigma_min), float(sigma_max))

    def sigma(self, t):
        return np.asarray(t, dtype=np.float64)

    def t(self, sigma):
        return np.asarray(sigma, dtype=np.float64)

    def alpha(self, sigma):
        return np.ones_like(np.asarray(sigma, dtype=np.float64))

    @property
    def t_range(self):
        return self._range


class RectifiedFlow(NoiseProcess):
    """x_t = (1 - t) x0 + t eps (flow matching); sigma~ = t / (1 - t).

    The scaled variables are singular at t = 1, so sampling starts at t_max < 1 (default 1 - 1e-4).

    `shift` is the timestep shift the model was trained and is sampled with (diffusers' FlowMatch schedulers'
    `shift`; SD3: 3.0). It does not change the ODE, and the time steps are a method's schedule (flow_shift states
    its own shift); it is part of what the entry says about the model, recorded with the process and checked
    against a checkpoint's scheduler config, as a DDPM model's betas are.
    """

    kind = "rectified_flow"

    def __init__(self, t_min=1e-4, t_max=1 - 1e-4, shift=1.0):
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise ConfigError(f"process rectified_flow: shift must be a positive number; got {shift!r}")
        self._range = (float(t_min), float(t_max))
        self.shift = float(shift)

    def sigma(self, t):
        t = np.asarray(t, dtype=np.float64)
        return t / (1.0 - t)

    def t(self, sigma):
        sigma = np.asarray(sigma, dtype=np.float64)
        return sigma / (1.0 + sigma)

    def alpha(self, sigma):
        return 1.0 / (1.0 + np.asarray(sigma, dtype=np.float64))

    @property
    def t_range(self):
        return self._range

    def describe(self) -> dict:
        return {**super().describe(), "shift": self.shift}


PROCESSES: dict[str, Callable[..., NoiseProcess]] = {
    "vp_discrete": VPDiscrete.from_config,
    "vp_continuous": VPContinuous,
    "edm": EDM,
    "rectified_flow": RectifiedFlow,
}


def make_process(spec: dict) -> NoiseProcess:
    params = dict(spec)
    kind = params.pop("kind")
    if kind not in PROCESSES:
        raise ConfigError(f"process kind {kind!r} unknown{valid_names(kind, PROCESSES)}")
    return PROCESSES[kind](**params)


# ---- schedules: (process, n) -> n decreasing sigma~ values from sigma_max to sigma_min ----


def time_uniform(process: NoiseProcess, n: int) -> np.ndarray:
    t_lo, t_hi = process.t_range
    return process.sigma(np.linspace(t_hi, t_lo, n))


def logsnr_uniform(process: NoiseProcess, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(process.sigma_max), math.log(process.sigma_min), n))


def edm_rho(process: NoiseProcess, n: int, rho: float = 7.0) -> np.ndarray:
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or rho <= 0:
        raise ConfigError(f"edm_rho: rho must be a positive number; got {rho!r}")
    return karras_levels(process.sigma_max, process.sigma_min, n, rho)


def karras_levels(sigma_hi: float, sigma_lo: float, n: int, rho: float) -> np.ndarray:
    """n levels from sigma_hi to sigma_lo, uniform in sigma^(1/rho) (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_lo ** (1 / rho), sigma_hi ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def time_quadratic(process: NoiseProcess, n: int) -> np.ndarray:
    """Quadratic in native time (DDIM's 'quad' skip): dense near the data end."""
    t_lo, t_hi = process.t_range
    ramp = np.linspace(1.0, 0.0, n)
    return process.sigma(t_lo + (t_hi - t_lo) * ramp**2)


def loglinear_resample(values, count: int) -> np.ndarray:
    """`count` points with log sigma~ linear over the index of `values` (the ends stay, and every
    given point stays where count - 1 is a multiple of len(values) - 1)."""
    ramp = np.linspace(0.0, 1.0, len(values))
    return np.exp(np.interp(np.linspace(0.0, 1.0, count), ramp, np.log(np.asarray(values, float))))


def explicit(process: NoiseProcess, n: int, sigmas=None, timesteps=None, interpolate: bool = False) -> np.ndarray:
    """A given list of the n noise levels where the network is evaluated, as sigma~ or as native timesteps.

    Its length must be n, unless `interpolate`: then it is resampled log-linearly to n points (to reuse an
    optimised schedule at other step counts; `align_your_steps` has the published AYS lists and recipe).
    """
    if (sigmas is None) == (timesteps is None):
        raise ConfigError("explicit schedule: give exactly one of 'sigmas' or 'timesteps'")
    values = np.asarray(sigmas if sigmas is not None else process.sigma(np.asarray(timesteps, float)), float)
    if interpolate and len(values) >= 2:
        return loglinear_resample(values, n)
    if len(values) != n:
        raise ConfigError(f"explicit schedule has {len(values)} points; this cell needs {n} "
                          f"(or set interpolate: true)")
    return values


def fixed_steps(spec: dict) -> int | None:
    """The one step count a schedule allows, for an explicit list without resampling; None for any count."""
    levels = spec.get("sigmas", spec.get("timesteps"))
    if spec.get("kind") == "explicit" and not spec.get("interpolate") and isinstance(levels, list):
        return len(levels)
    return None


# Align Your Steps (Sabour, Fidler & Kreis, ICML 2024): the published optimised 10-step noise levels,
# sigma~ of each model's own process, 11 values from its sigma_max to its sigma_min
# (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html).
ALIGN_YOUR_STEPS = {
    "sd15": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
             0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "sdxl": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
    "svd": (700.00, 54.5, 15.886, 7.977, 4.248, 1.789, 0.981, 0.403, 0.173, 0.034, 0.002),
}


def align_your_steps(process: NoiseProcess, n: int, model: str | None = None) -> np.ndarray:
    """The AYS schedule optimised for `model`, by the paper's recipe for n steps: the 11 levels resampled
    log-linearly to n + 1 points, of which the last (the model's sigma_min) gives way to the final 0.
    At n = 10 these are the published levels. They are the optimised model's sigma~, used as they are
    on any process (the embedded models are not the models AYS optimised for)."""
    if model not in ALIGN_YOUR_STEPS:
        raise ConfigError(f"align_your_steps: model {model!r} unknown{valid_names(model, ALIGN_YOUR_STEPS)}")
    return loglinear_resample(ALIGN_YOUR_STEPS[model], n + 1)[:-1]


def flow_shift(process: NoiseProcess, n: int, shift: float = 3.0) -> np.ndarray:
    """The shifted flow-matching schedule of SD3 and Flux: uniform rectified-flow time u, then
    u -> shift u / (1 + (shift - 1) u) (Esser et al. 2024, arXiv:2403.03206, "Resolution-dependent shifting of
    timestep schedules"; SD3 uses shift 3). In diffusers: FlowMatchEulerDiscreteScheduler's `shift`,
    DPMSolverMultistep's and UniPC's `flow_shift`, and Flux's resolution-dependent `mu` as shift = e^mu.
    Not the Time-Shift Sampler (solver `ts_dpm`).

    On sigma~ = u / (1 - u) the map is sigma~ -> shift * sigma~, a shift of log-SNR by -2 log(shift), so
    the schedule is one list of sigma~ on every process: u is the flow time of sigma~, not the process's
    own t. Ends: the uniform u run between the flow times whose shifted images are the process's sigma_max
    and sigma_min, so the first and last levels are those of its t_range, as with every schedule here;
    shift > 1 moves the levels in between towards high noise, shift 1 is time_uniform on a rectified flow.
    diffusers' FlowMatch schedulers start at u = 1 (sigma~ infinite, which no level can be): on RectifiedFlow
    with t_max their second level and t_min their last, this gives their other levels
    (tests/test_flow_matching_vs_diffusers.py).
    """
    if not shift > 0:
        raise ConfigError(f"flow_shift: shift must be positive; got {shift!r}")
    u_hi, u_lo = (s / shift / (1 + s / shift) for s in (process.sigma_max, process.sigma_min))
    u = np.linspace(u_hi, u_lo, n)
    return shift * u / (1 - u)


SCHEDULES: dict[str, Callable[..., np.ndarray]] = {
    "time_uniform": time_uniform,
    "logsnr_uniform": logsnr_uniform,
    "edm_rho": edm_rho,
    "time_quadratic": time_quadratic,
    "explicit": explicit,
    "align_your_steps": align_your_steps,
    "flow_shift": flow_shift,
}


def schedule_function(spec: dict) -> tuple[Callable[..., np.ndarray], dict]:
    """The schedule function a spec's kind names, and the spec's other keys as its parameters;
    ConfigError for an unknown kind or parameter (a misspelt key must not silently fall back)."""
    params = dict(spec)
    kind = params.pop("kind", None)
    if kind not in SCHEDULES:
        raise ConfigError(f"schedule kind {kind!r} unknown{valid_names(kind, SCHEDULES)}")
    accepted = list(inspect.signature(SCHEDULES[kind]).parameters)[2:]  # after (process, n)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ConfigError(f"schedule {kind}: parameter {unknown[0]!r} unknown{valid_names(unknown[0], accepted)}")
    return SCHEDULES[kind], params


def sigma_grid(process: NoiseProcess, steps: int, spec: dict) -> np.ndarray:
    """steps + 1 values: `steps` noise levels where the network is evaluated, then 0."""
    schedule, params = schedule_function(spec)
    # every schedule gives its own first level at n = 1 (sigma_max for the formulas, the given point for lists)
    sigmas = np.asarray(schedule(process, steps, **params), dtype=np.float64)
    if np.any(np.diff(sigmas) >= 0) or sigmas[-1] <= 0:
        raise ConfigError(f"schedule {spec} does not give strictly decreasing positive noise levels")
    return np.append(sigmas, 0.0)
