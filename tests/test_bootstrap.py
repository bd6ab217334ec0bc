"""Bootstrap intervals of FID/KID/IS/precision/recall (digits-cnn): reproducible, narrower with more
samples, and carried through evaluate into metrics.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import write_evaluable_cell
from harness.datasets import load_dataset
from harness.errors import ConfigError
from harness.metrics.base import EvalContext
from harness.metrics.bootstrap import BootstrapSpec, bootstrap_interval, percentile_interval, resample_indices
from harness.metrics.fidelity import FID, KID, InceptionScore, Precision, Recall

METRICS = (FID, KID, InceptionScore, Precision, Recall)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def noisy_digits(num: int, seed: int = 0) -> np.ndarray:
    images = load_dataset("digits")[0]
    rng = np.random.default_rng(seed)
    chosen = images[rng.choice(len(images), num, replace=False)]
    return (chosen + 0.3 * rng.standard_normal(chosen.shape)).astype(np.float32)


def intervals(samples: np.ndarray, cache_dir, resamples: int = 40) -> dict:
    spec = {"dataset": "digits", "feature_extractor": "digits-cnn", "bootstrap": {"resamples": resamples}}
    ctx = EvalContext(cell_dir=cache_dir, cell={"model": "digits-ideal"}, samples=samples, model_spec=spec,
                      methods={}, cache_dir=cache_dir)
    return {cls.name: cls().compute(ctx) for cls in METRICS}


def test_intervals_shrink_as_the_sample_count_grows(cache_dir):
    small, large = intervals(noisy_digits(150), cache_dir), intervals(noisy_digits(1200), cache_dir)
    for name in small:
        width_small = small[name].ci_high - small[name].ci_low
        width_large = large[name].ci_high - large[name].ci_low
        assert 0 < width_large < width_small, (name, width_small, width_large)


def test_intervals_are_reproducible_and_bracket_their_value(cache_dir):
    samples = noisy_digits(400)
    first, second = intervals(samples, cache_dir), intervals(samples, cache_dir)
    for name, value in first.items():
        assert (value.ci_low, value.ci_high) == (second[name].ci_low, second[name].ci_high)
        assert value.provenance["bootstrap"]["resamples"] == 40
    # resampling features of a fixed set: the statistics that are means of per-sample terms centre on it
    for name in ("is", "precision"):
        assert first[name].ci_low <= first[name].value <= first[name].ci_high, name


def test_resampling_is_seeded_and_percentiles_are_plain_quantiles():
    spec = BootstrapSpec(resamples=5, confidence=0.9, seed=3)
    assert torch.equal(resample_indices(10, spec), resample_indices(10, spec))
    assert not torch.equal(resample_indices(10, spec), resample_indices(10, BootstrapSpec(5, 0.9, 4)))
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    with pytest.raises(ConfigError, match="'m.bootstrap'"):
        BootstrapSpec.from_model_spec({"bootstrap": {"confidence": 1.5}}, "m")


def test_evaluate_writes_intervals_to_metrics_json(cache_dir, tmp_path):
    from harness.evaluate import evaluate_cell

    write_evaluable_cell(tmp_path, noisy_digits(200), model="digits-ideal")
    spec = {"dataset": "digits", "feature_extractor": "digits-cnn", "bootstrap": {"resamples": 10}}
    out = evaluate_cell(tmp_path, spec, {}, ["fid", "kid", "is", "precision", "recall"], cache_dir)
    written = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("fid", "kid", "is", "precision", "recall"):  # each interval holds the value it qualifies
        low, high = written["ci"][name]
        assert low < written[name] < high and out["ci"][name] == [low, high]
        if name != "is":  # IS needs no reference data
            assert written["provenance"][name]["reference"]["stats_sha256"]


def test_interval_is_centred_on_the_estimate_even_for_a_biased_statistic():
    # The largest value of a resample is biased low (duplicates hide the top); a plain percentile
    # interval of it can lie wholly below the estimate. The corrected interval keeps the estimate.
    values = np.random.default_rng(0).standard_normal(400)
    estimate = float(values.max())
    spec = BootstrapSpec(resamples=200, confidence=0.9, seed=1)
    low, high = bootstrap_interval(lambda i: float(values[i.numpy()].max()), len(values), spec, estimate)
    raw = percentile_interval(np.array([values[i.numpy()].max() for i in resample_indices(len(values), spec)]), 0.9)
    assert raw[1] <= estimate + 1e-12  # the uncorrected interval never rises above the estimate
    assert low < estimate < high
