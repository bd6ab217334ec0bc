"""The workflow through profiles/slurm on a real SLURM cluster: every job an sbatch job, results as local.

Needs a cluster that answers `sinfo` (CI starts a single-node one on localhost with .ci/start-slurm) and
the executor plugin; skips otherwise. That cluster keeps no accounting database, so job states come from
squeue (`--slurm-status-command squeue`) and no account is asked for: options of the cluster, not of
the profile.
"""

from __future__ import annotations

import csv
import json
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


def test_tiny_grid_through_the_slurm_profile(tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({
        "models": ["gmm2d"], "methods": ["euler", "heun"], "nfe": [4, 21], "seed": 0, "num_samples": 40,
        "blocks": [], "models_file": str(REPO / "models.yaml"), "methods_file": str(REPO / "methods.yaml"),
    }))
    profile = ["--workflow-profile", str(REPO / "profiles" / "slurm"), "--configfile", str(grid)]
    run = _run(tmp_path, *profile, *CLUSTER_OPTIONS)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "has been submitted with SLURM jobid" in run.stdout + run.stderr

    cells = sorted((tmp_path / "results" / "cells").glob("*/*/*/*/cell.json"))
    assert len(cells) == 3  # euler at 4 and 21, heun at 21 (heun cannot meet NFE 4)
    for path in cells:
        cell = json.loads(path.read_text())
        assert cell["provenance"]["slurm_job_id"], f"{path} was not made by a SLURM job"
        assert cell["nfe_measured"] == cell["nfe"]
    rows = list(csv.DictReader((tmp_path / "reports" / "results.csv").open()))
    assert {(r["method"], r["nfe"]) for r in rows if r["metric"] == "exact_err"} == {
        ("euler", "4"), ("euler", "21"), ("heun", "21")}

    again = _run(tmp_path, *profile, *CLUSTER_OPTIONS, "--dry-run")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr
