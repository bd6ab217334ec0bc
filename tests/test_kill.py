"""A grid killed outright (SIGKILL to Snakemake and its jobs, as a lost node or an OOM killer would) in three
phases, restarted each time as the README says, ends with the results an uninterrupted run gives."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_workflow import SNAKEMAKE, _grid

TIMING_COLUMNS = {"wall_s", "peak_mem_mb", "prep_s"}  # prep_s: a prepared artifact's own wall time
TIMING_METRICS = {"wall_s_per_sample", "peak_mem_mb"}
PHASES = ("prepare", "sample", "evaluate")  # the job kind running when each kill comes


def _env(where: Path) -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "STEPBENCH_WORKER_DIR": str(where / "workers"), "STEPBENCH_WORKER_IDLE_S": "10"}


def _snakemake(where: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--directory", str(where), *args], capture_output=True, text=True,
                          env=_env(where), timeout=900)


def _kill_when(where: Path, grid: Path, phase: str) -> None:
    """Start the grid; SIGKILL its whole process group as soon as a new job of `phase` has started."""
    logs = where / "results" / "logs" / phase
    before = set(logs.glob("*.log")) if logs.is_dir() else set()
    run = subprocess.Popen([*SNAKEMAKE, "--directory", str(where), "--configfile", str(grid)], env=_env(where),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and run.poll() is None:
        if logs.is_dir() and set(logs.glob("*.log")) - before:
            time.sleep(0.3)  # inside the job, not at its first line
            break
        time.sleep(0.02)
    assert run.poll() is None, f"the grid ended before a {phase} job started"
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()


def _comparable(where: Path) -> list[dict]:
    rows = []
    for row in csv.DictReader((where / "reports" / "results.csv").open()):
        row = {k: v for k, v in row.items() if k not in TIMING_COLUMNS}
        if row["metric"] in TIMING_METRICS:
            row["value"] = row["ci_low"] = row["ci_high"] = "timing"
        rows.append(row)
    return rows


@pytest.mark.slow
def test_three_kills_in_three_phases_then_the_uninterrupted_results(tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    grids = {}
    for where in (clean, killed):
        where.mkdir()
        grids[where] = _grid(where, models=["gmm2d", "digits-ideal"], methods=["euler", "heun", "dc_solver"],
                             nfe=[5, 9], seeds=[0], num_samples=300)
    assert _snakemake(clean, "--configfile", str(grids[clean])).returncode == 0

    for phase in PHASES:
        _kill_when(killed, grids[killed], phase)
        refused = _snakemake(killed, "--configfile", str(grids[killed]))  # what a user sees first
        assert refused.returncode != 0
        assert "was killed and left Snakemake's lock; run `snakemake --unlock`" in refused.stderr, refused.stderr[-2000:]
        assert _snakemake(killed, "--configfile", str(grids[killed]), "--unlock").returncode == 0

    finished = _snakemake(killed, "--configfile", str(grids[killed]))
    assert finished.returncode == 0, finished.stderr[-3000:]
    ours, theirs = _comparable(killed), _comparable(clean)
    differing = [(i, k, a[k], b.get(k)) for i, (a, b) in enumerate(zip(ours, theirs)) for k in a if a[k] != b.get(k)]
    assert len(ours) == len(theirs) and not differing, differing[:5]
    assert "Nothing to be done" in _snakemake(killed, "--configfile", str(grids[killed]), "--dry-run").stdout
