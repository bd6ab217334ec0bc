"""family: stitch — T-Stitch (Pan et al. 2024): a small model for the noisiest part of the trajectory, the large
model (the grid's) for the rest, under any solver of the zoo.

    tstitch_40_dpmpp_2m:
      family: stitch
      stitch: {small: digits-unet-small, fraction: 0.4, base: dpmpp_2m}

NVlabs/T-Stitch's DiT sampler runs the small model while t / 1000 >= 1 - ratio, t the model's discrete time:
`fraction` is the share of the earliest (noisiest) time the small model takes. The switch is on the noise
level, not on the step index, so a method means the same at every NFE (crowsonkb/k-diffusion#36 advises the
same): with tau the native time normalised to [0, 1] over the process's range, the small model denoises where
tau >= 1 - fraction (fraction 0: never; 1: always). Both models predict x0 in the same space, so a multistep
solver keeps its history across the switch. The cell counts each model's passes apart, for its FLOPs.
"""

from __future__ import annotations

import torch

from harness.errors import ConfigError, UnsupportedNFE
from harness.methods.base import Sampler
from harness.models.base import Denoiser, WrappedDenoiser, condition_rows


class StitchedDenoiser(WrappedDenoiser):
    """Rows whose noise level is at or above the switch go to the small model, the others to the large one (the
    inner one: its conditions, decoder and data space are the cell's)."""

    def __init__(self, large: Denoiser, small: Denoiser, fraction: float):
        super().__init__(large)
        self.large, self.small, self.fraction = large, small, fraction
        lo, hi = self.info.process.t_range
        self.t_lo, self.t_hi = float(lo), float(hi)

    def uses_small(self, sigma: torch.Tensor) -> torch.Tensor:
        if self.fraction == 0:
            return torch.zeros(sigma.shape, dtype=torch.bool, device=sigma.device)
        t = torch.as_tensor(self.info.process.t(sigma.detach().cpu().double().numpy()), device=sigma.device)
        tau = (t - self.t_lo) / (self.t_hi - self.t_lo)
        return tau >= 1.0 - self.fraction - 1e-12  # the rounding of t(sigma(t)) must not move the switch

    def denoise(self, x, sigma, cond=None):
        small = self.uses_small(sigma)
        if bool(small.all()):
            return self.small.denoise(x, sigma, cond)
        if not bool(small.any()):
            return self.large.denoise(x, sigma, cond)
        out = torch.empty_like(x)
        for mask, model in ((small, self.small), (~small, self.large)):
            out[mask] = model.denoise(x[mask], sigma[mask], condition_rows(cond, mask))  # a text model's: a dict
        return out


class StitchSampler(Sampler):
    family = "stitch"

    def __init__(self, spec: dict):
        super().__init__(spec)
        from harness.methods import make_sampler

        settings = spec.get("stitch") or {}
        for key in ("small", "fraction", "base"):
            if key not in settings:
                raise ConfigError(f"family stitch needs 'stitch: {{small, fraction, base}}'; {key!r} missing")
        fraction = settings["fraction"]
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
            raise ConfigError(f"stitch.fraction must be a number in [0, 1], not {fraction!r}")
        if "base_spec" not in spec:
            raise ConfigError("stitch.base must name a solver entry of the methods file")
        self.small_id, self.fraction = settings["small"], float(fraction)
        self.base = make_sampler(spec["base_spec"])
        self.prepare_scope = None  # a base with side data would need it prepared for the stitched pair
        if self.base.prepare_scope is not None:
            raise ConfigError(f"stitch.base {settings['base']!r} has prepared side data; stitch a solver without")
        self.small: Denoiser | None = None

    def summary(self) -> dict[str, str]:
        return {**self.base.summary(), "family": self.family,
                "params": f"small={self.small_id}, fraction={self.fraction:g}, base={self.spec['stitch']['base']}"}

    def extra_models(self) -> list[str]:
        return [self.small_id]

    def use_models(self, denoisers: dict[str, Denoiser]) -> None:
        self.small = denoisers[self.small_id]

    def check_nfe(self, nfe: int) -> None:
        try:
            self.base.check_nfe(nfe)
        except UnsupportedNFE as err:
            raise UnsupportedNFE(f"stitch base: {err}", err.reason) from None

    def denoiser_for(self, denoiser: Denoiser) -> Denoiser:
        if self.small is None:
            raise RuntimeError("StitchSampler.use_models must give the small model first")
        small, large = self.small.info, denoiser.info
        if small.data_shape != large.data_shape or small.process.describe() != large.process.describe():
            raise ConfigError(f"stitch: {self.small_id} ({small.data_shape}, {small.process.describe()['kind']}) "
                              f"does not share the large model's data space and noise process")
        mismatch = denoiser.condition_mismatch(self.small)
        if mismatch is not None:  # the small network runs on the large model's conditions
            raise ConfigError(f"stitch: {self.small_id} cannot take the large model's conditions: {mismatch}")
        return StitchedDenoiser(denoiser, self.small, self.fraction)

    def sample(self, denoiser, noise, nfe, cond=None, generator=None):
        """`denoiser`: the stitched pair (denoiser_for), counted."""
        return self.base.sample(denoiser, noise, nfe, cond, generator)
