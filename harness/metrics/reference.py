"""Errors against a reference solution from the same noise: exact_err and mse_ref."""

from __future__ import annotations

import numpy as np

from harness import references
from harness.cellstore import row_chunks
from harness.errors import StepbenchError
from harness.metrics.base import EvalContext, Metric, MetricValue
from harness.metrics.bootstrap import BootstrapSpec, bootstrap_interval_of, resample_indices


def _reference(ctx: EvalContext, kind: str, array: str = "samples") -> tuple[np.ndarray, str]:
    cell = ctx.cell
    args = (ctx.cache_dir, cell["model"], ctx.model_spec, kind, cell["seed"], cell["num_samples"], ctx.methods)
    ref = references.open_reference(*args, device=ctx.device, array=array)
    return ref, references.reference_path(*args).name


def _per_sample_sq_err(samples, ref) -> np.ndarray:
    """Squared distance of each sample to its reference, over blocks of rows (either may be an NpzArray)."""
    if len(samples) != len(ref):
        raise StepbenchError(f"{len(samples)} samples but {len(ref)} reference solutions")
    errors = []
    for ours, theirs in zip(row_chunks(samples), row_chunks(ref)):
        diff = np.asarray(ours, dtype=np.float64) - np.asarray(theirs, dtype=np.float64)
        errors.append((diff.reshape(len(diff), -1) ** 2).sum(1))
    return np.concatenate(errors) if errors else np.zeros(0)


def mean_replicates(per_sample: np.ndarray, spec: BootstrapSpec) -> np.ndarray | None:
    """The mean of per-sample terms over each resample, all resamples at once (None when turned off)."""
    if spec.resamples == 0 or not len(per_sample):
        return None
    return per_sample[resample_indices(len(per_sample), spec).numpy()].mean(1)


def _with_bootstrap(value: float, replicates: np.ndarray | None, spec: BootstrapSpec, provenance: dict) -> MetricValue:
    interval = None if replicates is None else bootstrap_interval_of(replicates, spec, value)
    low, high = interval if interval is not None else (None, None)
    if low is not None:  # an error: the corrected lower end cannot go below 0
        low = max(low, 0.0)
    return MetricValue(value, low, high, {**provenance, "bootstrap": {
        **spec.provenance(), "statistic": "mean of per-sample squared errors over each resample"}},
        replicates, spec.seed)


def rms_distance(samples: np.ndarray, ref: np.ndarray) -> float:
    """RMS over samples of the Euclidean distance between paired samples (exact_err's definition)."""
    return float(np.sqrt(_per_sample_sq_err(samples, ref).mean()))


class ExactError(Metric):
    """RMS over samples of the Euclidean distance to the exact PF-ODE solution."""

    name = "exact_err"

    def compute(self, ctx: EvalContext) -> MetricValue:
        ref, ref_name = _reference(ctx, "exact")
        spec = BootstrapSpec.from_model_spec(ctx.model_spec, ctx.cell.get("model", "?"))
        errors = _per_sample_sq_err(ctx.samples, ref)
        replicates = mean_replicates(errors, spec)
        return _with_bootstrap(float(np.sqrt(errors.mean())), None if replicates is None else np.sqrt(replicates),
                               spec, {"reference": ref_name, "solver": "scipy DOP853", "rtol": references.EXACT_RTOL})


class MSEToReference(Metric):
    """Mean squared error per dimension against the high-NFE reference solution; for latent models in
    the latent space the solver works in, so a decoder's own error and scale do not enter."""

    name = "mse_ref"

    def compute(self, ctx: EvalContext) -> MetricValue:
        space = "data" if ctx.latents is None else "latent"
        samples = ctx.samples if ctx.latents is None else ctx.latents
        ref, ref_name = _reference(ctx, "solver", "samples" if ctx.latents is None else "latents")
        dims = int(np.prod(samples.shape[1:]))
        errors = _per_sample_sq_err(samples, ref) / dims
        spec = BootstrapSpec.from_model_spec(ctx.model_spec, ctx.cell.get("model", "?"))
        return _with_bootstrap(float(errors.mean()), mean_replicates(errors, spec), spec,
                               {"reference": ref_name, "space": space, **ctx.model_spec["reference"]})
