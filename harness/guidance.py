"""Classifier-free guidance and dynamic thresholding: wrappers on a Denoiser, so every family runs under them.

Guidance (Ho & Salimans 2022), in diffusers' `guidance_scale` convention: D_w(x, s, c) = D(x, s, null) +
w (D(x, s, c) - D(x, s, null)); w = 1 is the conditional model alone, with one pass. A guided evaluation is one
denoiser call, and its conditional and unconditional passes go through the network as one batch of twice the
rows (what `network_evals` counts apart from the NFE). Guidance is linear in the network's output for a fixed
x_t, so guiding the x0 prediction here equals diffusers' pipelines guiding the noise prediction.

A guidance interval (Kynkaanniemi et al. 2024, as EDM2 uses it) guides only where sigma~ lies in
[sigma_lo, sigma_hi]; elsewhere only the conditional pass runs, and the passes saved show in network_evals.

Dynamic thresholding (Saharia et al. 2022, as DPM-Solver++ and diffusers' `thresholding=True` apply it to
each x0 prediction): s = the `ratio` quantile of |x0| per sample, clamped to [1, max]; x0 <- clamp(x0, -s, s) / s.
"""

from __future__ import annotations

import torch

from harness.errors import ConfigError
from harness.models.base import Denoiser, WrappedDenoiser, concat_conditions, condition_rows


class GuidedDenoiser(WrappedDenoiser):
    def __init__(self, inner: Denoiser, scale: float, interval: tuple[float, float] | None = None):
        if inner.info.null_class is None and not inner.info.extra.get("text"):
            raise ConfigError("classifier-free guidance needs a class-conditional model with a null class "
                              "(or a text-conditional one)")
        super().__init__(inner)
        self.scale, self.interval = float(scale), interval

    def denoise(self, x, sigma, cond=None):
        if cond is None:
            raise ValueError("a guided denoiser needs the samples' conditions")
        guided = torch.ones(len(x), dtype=torch.bool, device=x.device)
        if self.interval is not None:
            lo, hi = self.interval
            guided = (sigma >= lo) & (sigma <= hi)
        null = self.inner.null_condition(condition_rows(cond, guided))
        # one network call: every row conditional, the guided rows once more unconditional
        both = self.inner.denoise(torch.cat([x, x[guided]]), torch.cat([sigma, sigma[guided]]),
                                  concat_conditions([cond, null]))
        out, unconditional = both[: len(x)], both[len(x):]
        out[guided] = unconditional + self.scale * (out[guided] - unconditional)
        return out


def guided(denoiser: Denoiser, scale: float, interval: tuple[float, float] | None = None) -> Denoiser:
    """The denoiser under guidance scale `scale` (itself at w = 1: the conditional model, one pass)."""
    return denoiser if scale == 1 else GuidedDenoiser(denoiser, scale, interval)


def check_interval(interval, where: str) -> tuple[float, float] | None:
    if interval is None:
        return None
    if (not isinstance(interval, (list, tuple)) or len(interval) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval)
            or not 0 <= interval[0] < interval[1]):
        raise ConfigError(f"key '{where}': guidance_interval is [sigma_lo, sigma_hi] with 0 <= lo < hi, not {interval!r}")
    return float(interval[0]), float(interval[1])


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """diffusers' _threshold_sample: per sample, the `ratio` quantile of |x0| clamped to [1, max_value]."""
    flat = x0.reshape(len(x0), -1)
    if flat.dtype not in (torch.float32, torch.float64):  # quantile needs one of them
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)[:, None]
    return (torch.clamp(flat, -s, s) / s).reshape(x0.shape).to(x0.dtype)


def check_thresholding(settings, where: str) -> tuple[float, float] | None:
    if settings is None:
        return None
    if not isinstance(settings, dict) or set(settings) - {"ratio", "max"}:
        raise ConfigError(f"key '{where}': thresholding is {{ratio: 0.995, max: 1.0}}, not {settings!r}")
    ratio, max_value = settings.get("ratio", 0.995), settings.get("max", 1.0)
    if not 0 < ratio <= 1 or max_value < 1:
        raise ConfigError(f"key '{where}': thresholding needs 0 < ratio <= 1 and max >= 1, not {settings!r}")
    return float(ratio), float(max_value)
