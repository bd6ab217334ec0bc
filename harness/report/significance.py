"""Paired significance: is a method's difference from another (its baseline, the column's runner-up) real?

The methods of a model share their noise: sample i of every cell starts from the same x_T. Every metric's
bootstrap draws its resamples from (num_samples, seed) alone (harness/metrics/bootstrap.py), so replicate r of
two cells is the metric over the same resampled sample indices under each method, and their difference
is a paired bootstrap replicate of the metric's difference (per-sample squared errors for exact_err and
mse_ref, resampled feature sets for FID/KID). The interval of the differences, centred like the metrics'
own on the full-sample difference, says whether the difference excludes 0. With several seeds the
difference is the mean over seeds and so is each replicate: the seeds' own variation enters through
their independent samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.metrics.bootstrap import DEFAULT_CONFIDENCE, percentile_interval
from harness.report.collect import Collected, Replicates
from harness.report.layout import higher_is_better

BETTER, WORSE, SAME = "better", "worse", "no significant difference"


@dataclass(frozen=True)
class PairedDifference:
    metric: str
    estimate: float  # metric(method) - metric(other), mean over the seeds both have
    low: float
    high: float
    n_seeds: int
    resamples: int

    @property
    def verdict(self) -> str:
        """better / worse for the first method; 0 inside the interval (or a degenerate [0, 0]) is no difference."""
        if self.low > 0 or self.high < 0:
            lower = self.high < 0
            return BETTER if lower != higher_is_better(self.metric) else WORSE
        return SAME

    def describe(self) -> str:
        return f"difference {self.estimate:+.3g} [{self.low:+.3g}, {self.high:+.3g}]"


def paired_difference(values: dict[tuple, float], replicates: dict[tuple, Replicates], cell: tuple, other: tuple,
                      metric: str, confidence: float = DEFAULT_CONFIDENCE) -> PairedDifference | None:
    """cell, other: (model, method, nfe, guidance) of the same model. `values` and `replicates` are keyed by
    (*cell, seed, metric); seeds that both cells have with paired replicates count. None: nothing to pair."""
    seeds = sorted({key[4] for key in replicates if key[:4] == cell and key[5] == metric}
                   & {key[4] for key in replicates if key[:4] == other and key[5] == metric}, key=str)
    estimates, differences = [], []
    for seed in seeds:
        ours, theirs = replicates[(*cell, seed, metric)], replicates[(*other, seed, metric)]
        a, b = values.get((*cell, seed, metric)), values.get((*other, seed, metric))
        if (a is None or b is None or ours.seed != theirs.seed or ours.num_samples != theirs.num_samples
                or len(ours.values) != len(theirs.values)):
            continue  # not the same resamples: no pairing
        estimates.append(a - b)
        differences.append(ours.values - theirs.values)
    if not estimates:
        return None
    replicate_means = np.mean(differences, axis=0)
    replicate_means = replicate_means[np.isfinite(replicate_means)]
    if not len(replicate_means):
        return None
    estimate = float(np.mean(estimates))
    low, high = percentile_interval(replicate_means - (replicate_means.mean() - estimate), confidence)
    return PairedDifference(metric, estimate, low, high, len(estimates), len(replicate_means))


def value_index(per_seed: pd.DataFrame) -> dict[tuple, float]:
    """(model, method, nfe, guidance, seed, metric) -> value of ok rows with finite values."""
    ok = per_seed[(per_seed["status"] == "ok") & per_seed["metric"].notna()]
    return {(r.model, r.method, int(r.nfe), float(r.guidance if not pd.isna(r.guidance) else 1.0),
             None if pd.isna(r.seed) else int(r.seed), r.metric): float(r.value)
            for r in ok.itertuples() if r.value is not None and math.isfinite(r.value)}


@dataclass(frozen=True)
class BaselineSignificance:
    model: str
    method: str
    baseline: str
    nfe: int
    guidance: float
    difference: PairedDifference


class Significance:
    """Paired differences of one report, computed on demand and kept."""

    def __init__(self, collected: Collected, methods: dict[str, dict]):
        self.values = value_index(collected.per_seed)
        # replicates keyed like values, seeds as the per-seed table has them
        self.replicates = {(m, meth, int(n), float(g), None if s is None else int(s), metric): r
                           for (m, meth, n, g, s, metric), r in collected.replicates.items()}
        self.methods = methods
        self._cache: dict[tuple, PairedDifference | None] = {}

    def between(self, model: str, method: str, other: str, nfe: int, guidance: float,
                metric: str) -> PairedDifference | None:
        key = (model, method, other, int(nfe), float(guidance), metric)
        if key not in self._cache:
            self._cache[key] = paired_difference(self.values, self.replicates, key[:1] + key[1:2] + key[3:5],
                                                 (model, other, int(nfe), float(guidance)), metric)
        return self._cache[key]

    def versus_baseline(self, model: str, method: str, nfe: int, guidance: float, metric: str
                        ) -> BaselineSignificance | None:
        baseline = self.methods.get(method, {}).get("baseline")
        if baseline is None or baseline == method:
            return None
        difference = self.between(model, method, baseline, nfe, guidance, metric)
        return None if difference is None else BaselineSignificance(model, method, baseline, nfe, guidance, difference)

    def all_versus_baselines(self) -> list[BaselineSignificance]:
        cells = sorted({key[:4] + (key[5],) for key in self.replicates}, key=str)
        found = [self.versus_baseline(model, method, nfe, guidance, metric)
                 for model, method, nfe, guidance, metric in cells]
        return [item for item in found if item is not None]
