"""Bias-corrected percentile bootstrap over a cell's samples: resample feature rows, never re-extract.

The interval describes the uncertainty from the finite number of generated samples (the reference set
is held fixed). Resample indices come from a fixed seed, so a cell's interval is reproducible.
A resample repeats samples, which biases plug-in statistics (FID rises: duplicates look like less
diversity), so a plain percentile interval can miss the reported value altogether. The replicates are
therefore shifted by their mean bias (mean of replicates - estimate) before taking percentiles: the
interval keeps the bootstrap's spread, centred on the value the report shows.
models.yaml `bootstrap: {resamples, confidence, seed}` sets it per model; `resamples: 0` turns it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from harness.errors import ConfigError

DEFAULT_RESAMPLES = 50  # cheap on CPU for the embedded zoo; raise it for publication intervals
DEFAULT_CONFIDENCE = 0.95
DEFAULT_SEED = 20240601


@dataclass(frozen=True)
class BootstrapSpec:
    resamples: int = DEFAULT_RESAMPLES
    confidence: float = DEFAULT_CONFIDENCE
    seed: int = DEFAULT_SEED

    @classmethod
    def from_model_spec(cls, model_spec: dict, model_id: str) -> "BootstrapSpec":
        raw = model_spec.get("bootstrap") or {}
        spec = cls(int(raw.get("resamples", DEFAULT_RESAMPLES)), float(raw.get("confidence", DEFAULT_CONFIDENCE)),
                   int(raw.get("seed", DEFAULT_SEED)))
        if spec.resamples < 0 or not 0.0 < spec.confidence < 1.0:
            raise ConfigError(f"key '{model_id}.bootstrap': resamples >= 0 and 0 < confidence < 1 "
                              f"needed; got {raw}")
        return spec

    def provenance(self) -> dict:
        return {"method": "bias-corrected percentile bootstrap over samples (reference fixed)",
                "resamples": self.resamples,
                "confidence": self.confidence, "seed": self.seed}


def resample_indices(num: int, spec: BootstrapSpec) -> torch.Tensor:
    """[resamples, num] row indices drawn with replacement, from the spec's seed alone."""
    generator = torch.Generator().manual_seed(spec.seed)
    return torch.randint(0, num, (spec.resamples, num), generator=generator)


def percentile_interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.asarray(values, dtype=np.float64), [alpha, 1.0 - alpha])
    return float(low), float(high)


def bootstrap_interval(statistic: Callable[[torch.Tensor], float], num: int, spec: BootstrapSpec,
                       estimate: float) -> tuple[float, float] | None:
    """Interval of statistic(indices) over the resamples, bias-corrected towards `estimate` (the value
    reported for all samples); None when turned off or no resample gives a finite value."""
    replicates = bootstrap_replicates(statistic, num, spec)
    return None if replicates is None else bootstrap_interval_of(replicates, spec, estimate)


def bootstrap_replicates(statistic: Callable[[torch.Tensor], float], num: int, spec: BootstrapSpec) -> np.ndarray | None:
    """statistic(indices) for every resample (None when turned off). The indices depend on (num, seed) alone, so
    two cells of a model with paired noise get the same resamples: replicate r of one method minus replicate r of
    another is a paired bootstrap replicate of their difference (the report's paired significance)."""
    if spec.resamples == 0:
        return None
    return np.array([statistic(indices) for indices in resample_indices(num, spec)], dtype=np.float64)


def bootstrap_interval_of(values: np.ndarray, spec: BootstrapSpec, estimate: float) -> tuple[float, float] | None:
    """The bias-corrected interval of replicates computed elsewhere (e.g. all at once); None without finite ones."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if spec.resamples == 0 or not len(values):
        return None
    return percentile_interval(values - (values.mean() - estimate), spec.confidence)
