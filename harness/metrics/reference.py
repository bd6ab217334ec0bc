"""Errors against a reference solution from the same noise: exact_err and mse_ref."""

from __future__ import annotations

import numpy as np

from harness import references
from harness.cellstore import row_chunks
from harness.errors import StepbenchError
from harness.metrics.base import EvalContext, Metric, MetricValue


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


def rms_distance(samples: np.ndarray, ref: np.ndarray) -> float:
    """RMS over samples of the Euclidean distance between paired samples (exact_err's definition)."""
    return float(np.sqrt(_per_sample_sq_err(samples, ref).mean()))


class ExactError(Metric):
    """RMS over samples of the Euclidean distance to the exact PF-ODE solution."""

    name = "exact_err"

    def compute(self, ctx: EvalContext) -> MetricValue:
        ref, ref_name = _reference(ctx, "exact")
        return MetricValue(rms_distance(ctx.samples, ref), provenance={"reference": ref_name, "solver": "scipy DOP853",
                                              "rtol": references.EXACT_RTOL})


class MSEToReference(Metric):
    """Mean squared error per dimension against the high-NFE reference solution; for latent models in
    the latent space the solver works in, so a decoder's own error and scale do not enter."""

    name = "mse_ref"

    def compute(self, ctx: EvalContext) -> MetricValue:
        space = "data" if ctx.latents is None else "latent"
        samples = ctx.samples if ctx.latents is None else ctx.latents
        ref, ref_name = _reference(ctx, "solver", "samples" if ctx.latents is None else "latents")
        dims = int(np.prod(samples.shape[1:]))
        value = float(_per_sample_sq_err(samples, ref).mean() / dims)
        return MetricValue(value, provenance={"reference": ref_name, "space": space, **ctx.model_spec["reference"]})
