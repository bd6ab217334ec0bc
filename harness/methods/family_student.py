"""family: student — a distilled generator's own few-step procedure; NFE = its network evaluations.

    consistency:        {family: student, procedure: consistency}
    dmd2_timesteps:     {family: student, procedure: fixed_timesteps,
                         params: {timesteps: {1: [399], 4: [999, 749, 499, 249]}}}

Procedures (stateless functions over the whole trajectory, on the Denoiser's scaled variables):
- `consistency`: multistep consistency sampling (Song et al. 2023, Alg. 1): x0 = f(sigma_0 z, sigma_0), then
  for each later level tau: x = x0 + s_noise sqrt(tau^2 - sigma_min^2) z', x0 = f(x, tau). The levels are
  `params.sigmas` (a list per NFE), or `params.karras_indices` per NFE (indices of the model's training
  discretisation, diffusers' ConsistencyModelPipeline `timesteps=`, e.g. [22, 0]), or by default the levels of
  diffusers' CMStochasticIterativeScheduler.set_timesteps(num_inference_steps=NFE) for the model's scheduler
  config (harness.models.consistency). sigma_min and s_noise are the consistency model's; on another model
  (given sigmas) its process's sigma_min and 1.
- `fixed_timesteps`: predict x0 at each listed level and re-noise it to the next with fresh noise,
  x~ = x0 + sigma~_next z' (x_t = alpha x0 + sigma z' unscaled), the last x0 being the sample: how DMD2,
  SD-Turbo and LCM students are sampled (diffusers' LCMScheduler loop). `params.timesteps` per NFE are the
  model's native timesteps (DMD2: [999, 749, 499, 249]), `params.sigmas` per NFE scaled levels, or
  `params.spacing: trailing` diffusers' trailing spacing at any NFE on a discrete-time model (SD-Turbo; at NFE 4
  it is DMD2's list; `lcm_timesteps` are LCMScheduler's). LCMScheduler also mixes x_t back in by its
  c_skip(t) = 0.25 / ((10 t)^2 + 0.25): that is the LCM network's parametrisation, not the procedure's, and the
  diffusers_lcm adapter applies it in its denoiser (DMD2 and SD-Turbo go without: at t >= 249 it is below 4e-8).
Both run on any Denoiser, so a teacher can be sampled the student's way. Fresh noise is the sample's own
(generator.randn_like), so samples stay paired and independent of the batch.
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import torch

from harness.errors import ConfigError, StepbenchError, UnsupportedNFE, valid_names
from harness.methods.base import Sampler
from harness.methods.solver_base import require_noise

# procedure -> the params it takes; of the level sources, at most one may be given
PROCEDURES = {
    "consistency": ("sigmas", "karras_indices"),
    "fixed_timesteps": ("timesteps", "sigmas", "spacing"),
}
SPACINGS = ("trailing",)


def consistency_sampling(model, x, sigmas, noise, sigma_min: float, s_noise: float = 1.0):
    """Song et al. 2023, Alg. 1; `model(x, sigma)` is the consistency function f, x starts at sigma_0 z."""
    x0 = model(x, sigmas[0])
    for sigma in sigmas[1:]:
        x = x0 + (s_noise * math.sqrt(sigma**2 - sigma_min**2)) * noise.randn_like(x)
        x0 = model(x, sigma)
    return x0


def fixed_timestep_sampling(model, x, sigmas, noise):
    """x0 at each level, re-noised to the next with fresh noise; x starts at the prior of sigmas[0]."""
    for i, sigma in enumerate(sigmas):
        x0 = model(x, sigma)
        if i + 1 < len(sigmas):
            x = x0 + sigmas[i + 1] * noise.randn_like(x)
    return x0


def trailing_timesteps(num_train_timesteps: int, steps: int) -> np.ndarray:
    """diffusers' timestep_spacing="trailing" (DDIMScheduler.set_timesteps): from T - 1 down in equal strides."""
    ratio = num_train_timesteps / steps
    return np.round(np.arange(num_train_timesteps, 0, -ratio)).astype(np.int64) - 1


def _per_nfe(value, key: str, integer: bool) -> dict[int, list]:
    """{NFE: list of NFE levels}; NFE keys may be strings of digits (JSON)."""
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"key 'params.{key}': a mapping NFE -> list of NFE levels, e.g. {{2: [...]}}; got {value!r}")
    out = {}
    for nfe, levels in value.items():
        n = int(nfe) if isinstance(nfe, int) or (isinstance(nfe, str) and nfe.isdigit()) else None
        if n is None or n < 1:
            raise ConfigError(f"key 'params.{key}.{nfe}': NFE keys are integers >= 1")
        kinds = (int,) if integer else (int, float)
        if (not isinstance(levels, list) or len(levels) != n
                or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in levels)):
            what = "integers" if integer else "numbers"
            raise ConfigError(f"key 'params.{key}.{nfe}': a list of {n} {what} (one per network evaluation); "
                              f"got {levels!r}")
        if any(b >= a for a, b in pairwise(levels)):
            raise ConfigError(f"key 'params.{key}.{nfe}': levels must strictly decrease; got {levels}")
        out[n] = levels
    return out


class StudentSampler(Sampler):
    """family: student — procedure consistency | fixed_timesteps (see the module's docstring)."""

    family = "student"

    def __init__(self, spec: dict):
        super().__init__(spec)
        procedure, params = self.procedure_and_params(PROCEDURES)
        if len(params) > 1:
            raise ConfigError(f"key 'params': give one of {', '.join(PROCEDURES[procedure])}, not {', '.join(params)}")
        self.procedure = procedure
        self.source, self.levels = (next(iter(params.items())) if params else (None, None))
        if self.source == "spacing":
            if self.levels not in SPACINGS:
                raise ConfigError(f"key 'params.spacing': {self.levels!r} unknown{valid_names(self.levels, SPACINGS)}")
        elif self.source is not None:
            self.levels = _per_nfe(self.levels, self.source, integer=self.source != "sigmas")

    def summary(self) -> dict[str, str]:
        if isinstance(self.levels, dict):
            levels = "; ".join(f"{n}: {v}" for n, v in sorted(self.levels.items()))
            return {"family": self.family, "procedure": self.procedure, "NFE": ", ".join(map(str, sorted(self.levels))),
                    "params": f"{self.source} {levels}"}
        default = "the model's CMStochasticIterativeScheduler spacing" if self.procedure == "consistency" else ""
        params = f"spacing={self.levels}" if self.source == "spacing" else default
        return {"family": self.family, "procedure": self.procedure, "NFE": "steps", "params": params}

    def check_nfe(self, nfe: int) -> None:
        if nfe < 1:
            raise UnsupportedNFE(f"{self.procedure}: NFE is the number of steps, >= 1; not {nfe}", reason="NFE >= 1")
        if isinstance(self.levels, dict) and nfe not in self.levels:
            listed = ", ".join(map(str, sorted(self.levels)))
            raise UnsupportedNFE(f"{self.procedure}: params.{self.source} lists levels for NFE {listed} only, not "
                                 f"{nfe}", reason=f"{self.source} for NFE {listed} only")

    def sigmas(self, denoiser, nfe: int) -> list[float]:
        """The NFE scaled noise levels this procedure evaluates the model at, on this model."""
        self.check_nfe(nfe)
        process = denoiser.process
        consistency = denoiser.info.extra.get("consistency")
        listed = self.levels[nfe] if isinstance(self.levels, dict) else None
        if self.source == "sigmas":
            sigmas = [float(s) for s in listed]
        elif self.source == "timesteps":
            sigmas = [float(s) for s in process.sigma(np.asarray(listed, dtype=np.float64))]
        elif self.source == "spacing":
            if not hasattr(process, "betas"):
                raise StepbenchError(f"fixed_timesteps: spacing {self.levels} needs a discrete-time model (process "
                                     f"vp_discrete), not {process.kind}: list params.timesteps or sigmas per NFE")
            if nfe > len(process.betas):
                raise UnsupportedNFE(f"fixed_timesteps: {len(process.betas)} timesteps, so NFE <= {len(process.betas)}",
                                     reason=f"NFE <= {len(process.betas)}")
            sigmas = [float(s) for s in process.sigma(trailing_timesteps(len(process.betas), nfe).astype(np.float64))]
        else:  # consistency: karras_indices or the default spacing, both of the model's own discretisation
            if consistency is None:
                raise StepbenchError("consistency: this model is not a consistency model (no CMStochasticIterativeScheduler "
                                     "config), so its levels must be given: params.sigmas per NFE")
            sigmas = consistency.inference_sigmas(nfe, listed)
        lo, hi = process.sigma_min, process.sigma_max
        if not all(lo * (1 - 1e-9) <= s <= hi * (1 + 1e-9) for s in sigmas):
            shown = ", ".join(f"{s:.6g}" for s in sigmas)
            raise StepbenchError(f"{self.procedure}: levels [{shown}] leave the model's "
                                 f"noise range [{lo:.6g}, {hi:.6g}]")
        return sigmas

    def sample(self, denoiser, noise, nfe, cond=None, generator=None):
        sigmas = self.sigmas(denoiser, nfe)
        if len(sigmas) > 1:
            require_noise(generator, f"{self.procedure} with {len(sigmas)} steps")
        x = noise * denoiser.process.prior_std(sigmas[0])

        def model(x, sigma):
            return denoiser(x, sigma, cond)

        with torch.no_grad():
            if self.procedure == "fixed_timesteps":
                return fixed_timestep_sampling(model, x, sigmas, generator)
            consistency = denoiser.info.extra.get("consistency")
            sigma_min = consistency.sigma_min if consistency else denoiser.process.sigma_min
            s_noise = consistency.s_noise if consistency else 1.0
            return consistency_sampling(model, x, sigmas, generator, sigma_min, s_noise)
