"""The workflow through profiles/slurm on a real SLURM cluster: every job an sbatch job, results as local.

Needs a cluster that answers `sinfo` (CI starts a single-node one on localhost with .ci/start-slurm) and
the executor plugin; skips otherwise. That cluster keeps no accounting database, so job states come from
squeue (`--slurm-status-command squeue`) and no account is asked for: options of the cluster, not of
the profile.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess

import pytest
import yaml

from conftest import REPO
from test_workflow import _run

pytest.importorskip("snakemake_executor_plugin_slurm")


def _cluster_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return False
    return states.returncode == 0 and any(s in states.stdout for s in ("idle", "mix", "alloc"))


pytestmark = pytest.mark.skipif(not _cluster_answers(), reason="no SLURM cluster answers sinfo")
CLUSTER_OPTIONS = ["--slurm-status-command", "squeue", "--slurm-no-account",
                   "--slurm-init-seconds-before-status-checks", "5"]
# the profile gives every job that runs a network a GPU; this cluster has none
NO_GPUS = ["--set-resources", *(f"{rule}:gpu=0" for rule in ("sample", "evaluate", "prepare", "reference",
                                                               "refstats", "extractor", "flops", "train"))]
TIMINGS = {"wall_s", "peak_mem_mb", "network_s", "prep_s"}  # columns that differ between any two runs
TIMING_METRICS = {"wall_s_per_sample", "peak_mem_mb"}
MACHINE = {"device", "git"}  # the same here; listed so a cluster of other nodes would not fail the test


def _grid(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "models": ["gmm2d"], "methods": ["euler", "heun"], "nfe": [4, 21], "seed": 0, "num_samples": 40,
        "blocks": [{"models": ["digits-ideal"], "methods": ["euler"], "nfe": [6]}],
        "models_file": str(REPO / "models.yaml"), "methods_file": str(REPO / "methods.yaml"),
    }))
    return grid


def _comparable(rows: list[dict]) -> list[dict]:
    kept = []
    for row in rows:
        row = {k: v for k, v in row.items() if k not in TIMINGS | MACHINE}
        if row["metric"] in TIMING_METRICS:
            row.pop("value"), row.pop("ci_low"), row.pop("ci_high")
        kept.append(row)
    return kept


def test_tiny_grid_through_the_slurm_profile_in_groups_equals_a_local_run(tmp_path):
    cluster, local = tmp_path / "cluster", tmp_path / "local"
    cluster.mkdir(), local.mkdir()
    profile = ["--workflow-profile", str(REPO / "profiles" / "slurm"), "--configfile", str(_grid(cluster))]
    run = _run(cluster, *profile, *CLUSTER_OPTIONS, *NO_GPUS)
    assert run.returncode == 0, run.stderr[-3000:]
    log = run.stdout + run.stderr
    # the 4 cells' 8 sample and evaluate jobs go to the cluster as one group job; the cached work (references,
    # extractor, statistics) and the report as jobs of their own
    submitted = re.findall(r"has been submitted with SLURM jobid \d+ \(log: \S+/slurm_logs/(\w+)/", log)
    assert submitted.count("group_cells_evaluate_sample") == 1, submitted
    assert "rule_sample" not in submitted and "rule_evaluate" not in submitted, submitted

    cells = sorted((cluster / "results" / "cells").glob("*/*/*/*/cell.json"))
    assert len(cells) == 4  # euler at 4 and 21, heun at 21 (heun cannot meet NFE 4), digits-ideal euler at 6
    for path in cells:
        cell = json.loads(path.read_text())
        assert cell["provenance"]["slurm_job_id"], f"{path} was not made by a SLURM job"
        assert cell["nfe_measured"] == cell["nfe"]

    assert _run(local, "--configfile", str(_grid(local))).returncode == 0
    results = [list(csv.DictReader((where / "reports" / "results.csv").open())) for where in (cluster, local)]
    assert len(results[0]) == len(results[1]) > 0
    assert _comparable(results[0]) == _comparable(results[1])

    again = _run(cluster, *profile, *CLUSTER_OPTIONS, *NO_GPUS, "--dry-run")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
