"""The consistency-model parametrisation (Song et al. 2023), as diffusers stores and samples it.

A consistency checkpoint is a plain UNet2DModel F beside a `CMStochasticIterativeScheduler` config (how
openai/diffusers-cd_imagenet64_l2 is stored). The model it defines, on the EDM process (alpha = 1, so x and
sigma are already the scaled variables), is

    f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, t(sigma)),
    c_skip = sigma_data^2 / ((sigma - sigma_min)^2 + sigma_data^2),
    c_out  = (sigma - sigma_min) sigma_data / sqrt(sigma^2 + sigma_data^2),
    c_in   = 1 / sqrt(sigma^2 + sigma_data^2),   t = 1000 * 0.25 * log(sigma + 1e-44),

clamped to [-1, 1] when the config says clip_denoised, so that f(x, sigma_min) = x (the boundary condition).
Checked side by side with diffusers 0.42's scheduling_consistency_models.py: c_skip/c_out are its
get_scalings_for_boundary_condition, c_in its scale_model_input, t its sigma_to_t, the clamp its step();
`inference_sigmas` is its set_timesteps (num_inference_steps, or custom `timesteps` given here as
`karras_indices`). tests/test_student.py runs the whole pipeline against stepbench on one checkpoint.

One definition for the adapter (harness.models.diffusers_unet), the student family's default spacing
(harness.methods.family_student) and the distillation that trains a student (harness.training.consistency).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from harness.errors import ConfigError, UnsupportedNFE

SCHEDULER_CLASS = "CMStochasticIterativeScheduler"


@dataclass(frozen=True)
class ConsistencyParametrisation:
    """A CMStochasticIterativeScheduler config (diffusers' defaults), and what follows from it."""

    num_train_timesteps: int = 40
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    s_noise: float = 1.0
    rho: float = 7.0
    clip_denoised: bool = True

    @classmethod
    def from_scheduler_config(cls, config: dict) -> ConsistencyParametrisation:
        fields = cls.__dataclass_fields__
        return cls(**{key: config[key] for key in fields if key in config})

    def scheduler_config(self) -> dict:
        return asdict(self)

    # ---- the model ----

    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) at noise levels sigma (any shape)."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / ((sigma - self.sigma_min) ** 2 + sd2)
        c_out = (sigma - self.sigma_min) * self.sigma_data / (sigma**2 + sd2) ** 0.5
        c_in = 1.0 / (sigma**2 + sd2) ** 0.5
        return c_skip, c_out, c_in

    @staticmethod
    def network_time(sigma: torch.Tensor) -> torch.Tensor:
        """The time F is given: 1000 * 0.25 * log(sigma + 1e-44), computed in float64 as diffusers does (its
        timesteps come from float64 numpy), then in sigma's dtype."""
        return (250.0 * torch.log(sigma.double() + 1e-44)).to(sigma.dtype)

    def apply(self, network, x: torch.Tensor, sigma: torch.Tensor, labels=None) -> torch.Tensor:
        """f(x, sigma) for network(x_in, t, labels) -> F; sigma is [B]."""
        c_skip, c_out, c_in = (c.reshape(-1, *([1] * (x.ndim - 1))) for c in self.scalings(sigma))
        out = c_skip * x + c_out * network(c_in * x, self.network_time(sigma), labels)
        return out.clamp(-1.0, 1.0) if self.clip_denoised else out

    # ---- the discretisation ----

    def karras(self, ramp) -> np.ndarray:
        """Levels at ramp in [0, 1]: 0 is sigma_max, 1 is sigma_min (uniform in sigma^(1/rho))."""
        hi, lo = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return (hi + np.asarray(ramp, dtype=np.float64) * (lo - hi)) ** self.rho

    def training_levels(self) -> np.ndarray:
        """The N = num_train_timesteps levels of the training discretisation, from sigma_max to sigma_min."""
        return self.karras(np.linspace(0.0, 1.0, self.num_train_timesteps))

    def inference_sigmas(self, steps: int | None = None, karras_indices=None) -> list[float]:
        """The levels ConsistencyModelPipeline evaluates: set_timesteps(num_inference_steps=steps) (indices
        0, T // steps, 2 T // steps, ... of the training discretisation), or set_timesteps(timesteps=...)
        with decreasing indices as the pipeline takes them (e.g. [22, 0]: 0 is sigma_max)."""
        n = self.num_train_timesteps
        if karras_indices is None:
            if not 1 <= steps <= n:
                raise UnsupportedNFE(f"consistency: the model's training discretisation has {n} levels, so "
                                     f"1 <= NFE <= {n}, not {steps}", reason=f"NFE <= {n}")
            karras_indices = (np.arange(0, steps) * (n // steps)).round()[::-1]
        indices = np.asarray(karras_indices, dtype=np.int64)
        if np.any(np.diff(indices) >= 0) or indices[0] >= n or indices[-1] < 0:
            raise ConfigError(f"consistency: karras_indices {indices.tolist()} must decrease and lie in [0, {n})")
        return [float(s) for s in self.karras(indices[::-1] / (n - 1))]


def check_edm_process(source: str, process, parametrisation: ConsistencyParametrisation) -> None:
    """A consistency checkpoint lives on the EDM process of its scheduler config's sigma range; models.yaml's
    `process` must say so (one line when not: the same check as a DDPM checkpoint's betas)."""
    kind = getattr(process, "kind", None)
    if kind != "edm":
        raise ConfigError(f"{source}: a consistency model ({SCHEDULER_CLASS}) needs process kind edm, not {kind}")
    ours, theirs = (process.sigma_min, process.sigma_max), (parametrisation.sigma_min, parametrisation.sigma_max)
    if not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(ours, theirs)):
        raise ConfigError(f"{source}: models.yaml's process (edm, sigma {ours[0]:g} to {ours[1]:g}) disagrees with "
                          f"the checkpoint's scheduler config ({SCHEDULER_CLASS}, sigma {theirs[0]:g} to {theirs[1]:g})")
