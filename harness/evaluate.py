"""Evaluate one cell directory: samples.npz + cell.json -> metrics.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from harness import accounting
from harness.errors import StepbenchError
from harness.metrics import METRICS
from harness.metrics.base import EvalContext

RESERVED_KEYS = ("ci", "provenance", "status")  # metrics.json keys that are not metric names


def evaluate_cell(cell_dir: Path, model_spec: dict, methods: dict, metric_names: list[str], cache_dir: Path,
                  device: str = "cpu") -> dict:
    cell_dir = Path(cell_dir)
    for name in ("cell.json", "samples.npz"):
        if not (cell_dir / name).is_file():
            raise StepbenchError(f"{cell_dir / name}: file not found (run `stepbench sample` first)")
    cell = json.loads((cell_dir / "cell.json").read_text())
    with np.load(cell_dir / "samples.npz") as arrays:
        samples = arrays["samples"]
        latents = arrays["latents"] if "latents" in arrays.files else None  # latent models only
    metric_classes = [METRICS.get(name) for name in metric_names]  # unknown names fail before any work

    out: dict = {"status": cell["status"], "ci": {}, "provenance": {}}
    ctx = EvalContext(cell_dir, cell, samples, model_spec, methods, Path(cache_dir), device, latents=latents)
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
    (cell_dir / "metrics.json").write_text(json.dumps(out, indent=2, default=str))
    return out
