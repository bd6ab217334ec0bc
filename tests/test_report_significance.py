"""Paired significance on a constructed case: methods that share their noise, differing by a known per-sample
offset, are marked different, though their own intervals overlap; a method against itself is not."""

from __future__ import annotations

import numpy as np

from harness.metrics.bootstrap import BootstrapSpec, bootstrap_interval_of
from harness.metrics.reference import mean_replicates
from harness.report.collect import Replicates
from harness.report.significance import BETTER, SAME, WORSE, paired_difference

SPEC = BootstrapSpec(resamples=200, seed=7)
CELL_A, CELL_B = ("m", "a", 8, 1.0), ("m", "b", 8, 1.0)


def _cells(errors_a: np.ndarray, errors_b: np.ndarray, metric: str = "mse_ref"):
    """values and replicates as collect_results keeps them, for two cells' per-sample squared errors (seed 0),
    the replicates from the metrics' own code (mean over the shared resamples)."""
    values, replicates = {}, {}
    for cell, errors in ((CELL_A, errors_a), (CELL_B, errors_b)):
        values[(*cell, 0, metric)] = float(errors.mean())
        replicates[(*cell, 0, metric)] = Replicates(SPEC.seed, len(errors), mean_replicates(errors, SPEC))
    return values, replicates


def test_a_known_per_sample_offset_is_marked_different_where_unpaired_intervals_overlap():
    rng = np.random.default_rng(0)
    # per-sample errors vary a lot between samples (hard and easy noise), the same under both methods (paired
    # noise); method b is worse by 0.05 on every sample, plus a little noise of its own
    base = rng.exponential(1.0, size=500)
    errors_a, errors_b = base, base + 0.05 + rng.normal(0, 0.01, size=500)
    values, replicates = _cells(errors_a, errors_b)
    difference = paired_difference(values, replicates, CELL_A, CELL_B, "mse_ref")
    assert difference.estimate == np.float64(errors_a.mean() - errors_b.mean())
    assert difference.low < -0.04 and difference.high < 0 and difference.estimate > -0.06
    assert difference.verdict == BETTER  # a has the lower error
    assert paired_difference(values, replicates, CELL_B, CELL_A, "mse_ref").verdict == WORSE
    # each method's own interval overlaps the other's: only the pairing sees the offset
    intervals = [bootstrap_interval_of(replicates[(*cell, 0, "mse_ref")].values, SPEC, values[(*cell, 0, "mse_ref")])
                 for cell in (CELL_A, CELL_B)]
    assert intervals[0][1] > intervals[1][0]


def test_a_method_against_itself_is_not_different():
    errors = np.random.default_rng(1).exponential(1.0, size=300)
    values, replicates = _cells(errors, errors.copy())
    difference = paired_difference(values, replicates, CELL_A, CELL_B, "mse_ref")
    assert (difference.estimate, difference.low, difference.high) == (0.0, 0.0, 0.0)
    assert difference.verdict == SAME


def test_a_higher_is_better_metric_turns_the_verdict_and_unpaired_resamples_give_none():
    values, replicates = _cells(np.full(50, 0.9), np.full(50, 0.7), metric="is")
    assert paired_difference(values, replicates, CELL_A, CELL_B, "is").verdict == BETTER  # IS: higher is better
    other_seed = dict(replicates)
    other_seed[(*CELL_B, 0, "is")] = Replicates(SPEC.seed + 1, 50, replicates[(*CELL_B, 0, "is")].values)
    assert paired_difference(values, other_seed, CELL_A, CELL_B, "is") is None  # other resamples: no pairing
