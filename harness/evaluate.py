"""Evaluate one cell directory: samples.npz + cell.json -> metrics.json."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np

from harness import accounting
from harness.cellstore import NpzArray
from harness.errors import StepbenchError
from harness.files import write_json
from harness.integrity import verified_cell
from harness.metrics import METRICS
from harness.metrics.base import EvalContext

RESERVED_KEYS = ("ci", "provenance", "status", "cell", "replicates")  # metrics.json keys that are not metric names


def evaluate_cell(cell_dir: Path, model_spec: dict, methods: dict, metric_names: list[str], cache_dir: Path,
                  device: str = "cpu") -> dict:
    cell_dir = Path(cell_dir)
    cell = verified_cell(cell_dir)  # the samples are the ones cell.json describes, or one line says why not
    samples, latents, conditions = read_samples(cell_dir / "samples.npz")
    metric_names = [*metric_names, *method_metrics(cell, metric_names)]
    metric_classes = [METRICS.get(name) for name in metric_names]  # unknown names fail before any work

    out: dict = {"status": cell["status"], "ci": {}, "provenance": {}, "replicates": {},
                 # the cell these numbers describe: the report shows them only while it is unchanged
                 "cell": {"config_hash": cell["provenance"]["config_hash"], "samples_sha256": cell["samples_sha256"]}}
    ctx = EvalContext(cell_dir, cell, samples, model_spec, methods, Path(cache_dir), device, latents=latents,
                      labels=conditions.get("labels"), prompt_index=conditions.get("prompt_index"))
    for name, cls in zip(metric_names, metric_classes):
        if cell["status"] != "ok" and name not in ("wall_s_per_sample", "peak_mem_mb"):
            out[name] = None  # a diverged cell is a result: its quality metrics are undefined
            continue
        with accounting.timed("metrics"):
            result = cls().compute(ctx)
        out[name] = None if not math.isfinite(result.value) else float(result.value)
        if result.ci_low is not None:
            out["ci"][name] = [result.ci_low, result.ci_high]
        out["provenance"][name] = result.provenance
        if result.replicates is not None:  # the report's paired bootstrap between methods of this model
            out["replicates"][name] = {"seed": result.bootstrap_seed, "num_samples": len(samples),
                                       "values": [float(v) if math.isfinite(v) else None
                                                  for v in result.replicates]}
    write_json(cell_dir / "metrics.json", out)
    return out


def method_metrics(cell: dict, metric_names: list[str]) -> list[str]:
    """Metrics only the cell's method family defines (a quantised cell's distance to its fp32 twin)."""
    from harness.methods import FAMILIES

    family = cell.get("family")
    extra = FAMILIES.get(family).cell_metrics if family in FAMILIES.names() else ()
    return [name for name in extra if name not in metric_names]


CONDITION_KEYS = ("labels", "prompt_index")  # what samples.npz keeps of the conditions (Denoiser.condition_record)


def read_samples(path: Path) -> tuple[NpzArray, NpzArray | None, dict[str, np.ndarray]]:
    """samples (latents, for latent models) of a samples.npz, read in blocks by the metrics, and the conditions
    it records (labels of a class-conditional model, prompt_index of a text-conditional one); an unreadable
    file is one line."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        latents = NpzArray(path, "latents") if "latents.npy" in names else None
        conditions = {name: NpzArray(path, name).load() for name in CONDITION_KEYS if f"{name}.npy" in names}
        return NpzArray(path, "samples"), latents, conditions
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        raise StepbenchError(f"{path}: unreadable samples ({type(err).__name__}: {err}); sample the cell again") from None
