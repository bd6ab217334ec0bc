"""How long `stepbench report` takes on a results directory the size of the default grid (not a test).

Builds a synthetic results directory: MODELS models x METHODS methods x NFES budgets (360 cells by default),
each cell 1000 digit-shaped samples with a metrics.json of five metrics with 50 bootstrap replicates each, then
times render_report in this process (CPU seconds and wall). The default grid's report runs once at the end of
the grid and should stay well under a minute on one core.

    python benchmarks/report_speed.py [--models 6 --methods 30 --nfes 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from harness.files import sha256_file
from harness.report import render_report

REPO = Path(__file__).resolve().parents[1]
METRICS = ("fid", "kid", "mse_ref", "wall_s_per_sample", "peak_mem_mb")


def build(results: Path, models: int, methods: int, nfes: int, samples: int = 1000) -> int:
    rng = np.random.default_rng(0)
    noise = rng.uniform(-1, 1, size=(samples, 1, 8, 8)).astype(np.float32)
    count = 0
    for m in range(models):
        for k in range(methods):
            for nfe in (4, 8, 12, 20)[:nfes]:
                cell_dir = results / "cells" / f"model{m}" / f"method{k:02d}" / f"nfe{nfe}" / "seed0"
                cell_dir.mkdir(parents=True)
                np.savez(cell_dir / "samples.npz", samples=np.tanh(noise * (1 + k / methods)))
                quality = 1.0 / nfe + 0.01 * k
                cell = {"model": f"model{m}", "method": f"method{k:02d}", "family": ("solver", "student")[k % 2],
                        "nfe": nfe, "nfe_measured": nfe, "network_evals": nfe, "num_samples": samples, "seed": 0,
                        "wall_s": 0.01 * nfe * (1 + k), "peak_mem_mb": 300.0 + k, "gflops_per_sample": 0.01 * nfe,
                        "status": "ok", "samples_sha256": sha256_file(cell_dir / "samples.npz"),
                        "prepared": {"wall_s": 2.0, "denoiser_rows": 500} if k % 5 == 0 else None,
                        "provenance": {"config_hash": "bench", "device": "cpu", "git": "bench"}}
                (cell_dir / "cell.json").write_text(json.dumps(cell))
                values = {name: quality * (1 + i) for i, name in enumerate(METRICS)}
                replicates = {name: {"seed": 1, "num_samples": samples,
                                     "values": list(values[name] + rng.normal(0, 0.01, 50))} for name in METRICS[:3]}
                (cell_dir / "metrics.json").write_text(json.dumps({
                    "status": "ok", "ci": {name: [v * 0.9, v * 1.1] for name, v in values.items()},
                    "provenance": {}, "replicates": replicates,
                    "cell": {"config_hash": "bench", "samples_sha256": cell["samples_sha256"]}, **values}))
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=6)
    parser.add_argument("--methods", type=int, default=30)
    parser.add_argument("--nfes", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        results = Path(scratch) / "results"
        cells = build(results, args.models, args.methods, args.nfes)
        wall, cpu = time.perf_counter(), time.process_time()
        render_report(results, Path(scratch) / "report", None, REPO / "models.yaml", REPO / "methods.yaml")
        print(f"report of {cells} cells: {time.process_time() - cpu:.1f} s CPU, {time.perf_counter() - wall:.1f} s wall")


if __name__ == "__main__":
    main()
