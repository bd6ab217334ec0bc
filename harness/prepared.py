"""Prepared artifacts: a method's side data, cached per (model, method, params[, NFE], preparing code).

Preparation runs in its own job (`stepbench prepare`, rules/prepare.smk); a sampling job only loads
the file and fails with one line if it is missing, so side data is never recomputed silently and its
cost is reported apart from the cell's. Calibration noise comes from seeds disjoint from every
cell's, so a fitted method is never tuned on the noise it is evaluated on.
"""

from __future__ import annotations

import time
from pathlib import Path


from harness.config import config_hash
from harness.errors import StepbenchError
from harness.files import load_artifact, save_artifact
from harness.models import load_denoiser
from harness.models.base import Denoiser, WrappedDenoiser
from harness.nfe import CountingDenoiser

CALIBRATION_SEED = 2**31 - 1  # cells use small seeds; calibration draws never coincide with theirs


def artifact_path(cache_dir, model_id: str, model_spec: dict, method_id: str, method_spec: dict, sampler,
                  nfe: int) -> Path | None:
    scope = sampler.prepare_scope
    if scope is None:
        return None
    key_nfe = nfe if scope == "nfe" else None
    # the preparing code is part of the key: after a fix to it, an artifact it made before is not used again
    key = config_hash(model_spec, method_spec, key_nfe, CALIBRATION_SEED, sampler.prepare_code())
    suffix = f"-nfe{nfe}" if scope == "nfe" else ""
    return Path(cache_dir) / "prepared" / model_id / f"{method_id}{suffix}-{key}.safetensors"


def prepare(sampler, cache_dir, model_id, model_spec, method_id, method_spec, nfe: int, device="cpu") -> Path:
    path = artifact_path(cache_dir, model_id, model_spec, method_id, method_spec, sampler, nfe)
    if path is None:
        raise StepbenchError(f"method {method_id!r} has nothing to prepare")
    if path.exists():
        return path
    denoiser = CountingDenoiser(calibration_labels(load_denoiser(model_spec, device, cache_dir, model_id)))
    t0 = time.perf_counter()
    artifact = sampler.prepare(denoiser, nfe if sampler.prepare_scope == "nfe" else None, CALIBRATION_SEED)
    cost = {"wall_s": time.perf_counter() - t0, "denoiser_rows": denoiser.rows, "network_s": denoiser.network_s}
    save_artifact(path, {"artifact": artifact, "cost": cost})
    return path


class _CalibrationLabels(WrappedDenoiser):
    """A conditional denoiser called without conditions during calibration: row r gets the condition sample r
    of the calibration seed gets (balanced over the classes), instead of the unconditional model."""

    def denoise(self, x, sigma, cond=None):
        if cond is None:
            cond = self.inner.conditions(CALIBRATION_SEED, range(len(x)))
        return self.inner.denoise(x, sigma, cond)


def calibration_labels(denoiser: Denoiser) -> Denoiser:
    return _CalibrationLabels(denoiser) if denoiser.conditions(CALIBRATION_SEED, range(1)) is not None else denoiser


def load(sampler, cache_dir, model_id, model_spec, method_id, method_spec, nfe: int) -> dict | None:
    """Hand the artifact to the sampler; returns its record for cell.json (None if nothing needed)."""
    path = artifact_path(cache_dir, model_id, model_spec, method_id, method_spec, sampler, nfe)
    if path is None:
        return None
    if not path.exists():
        raise StepbenchError(
            f"{path}: prepared artifact missing; run `stepbench prepare --model {model_id} --method {method_id}"
            f" --nfe {nfe}` first"
        )
    saved = load_artifact(path)  # data only: a file planted in a shared cache cannot run code here
    sampler.use_prepared(saved["artifact"])
    return {"path": str(path), **saved["cost"], "summary": sampler.prepared_summary(saved["artifact"], nfe, model_spec)}
