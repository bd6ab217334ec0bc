"""A number on the leaderboard always comes from the samples it claims to: damaged cells are recomputed or shown
as damaged, duplicate config keys are errors, cached files cannot run code, bad input is one line."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from test_workflow import _grid, _run

from harness.cells import run_cell
from harness.config import load_methods, load_models
from harness.errors import ConfigError

BIN = Path(sys.executable).parent
CELL = Path("results/cells/gmm2d/euler/nfe4/seed0")


def _cli(*args, cwd):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "STEPBENCH_WORKERS": "0"}
    return subprocess.run([str(BIN / "stepbench"), *args], cwd=cwd, capture_output=True, text=True, env=env)


def _rows(where: Path) -> dict:
    return {(r["method"], r["nfe"], r["metric"]): r for r in csv.DictReader((where / "reports" / "results.csv").open())}


def _truncate(path: Path, keep_mtime: bool) -> None:
    stat = path.stat()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


@pytest.mark.parametrize("keep_mtime", [True, False])
def test_truncated_samples_are_recomputed_and_never_reported(tmp_path, keep_mtime):
    grid = _grid(tmp_path, methods=["euler"], nfe=[4], seeds=[0])
    assert _run(tmp_path, "--configfile", str(grid)).returncode == 0
    before = _rows(tmp_path)
    _truncate(tmp_path / CELL / "samples.npz", keep_mtime)

    # the report alone (no workflow run): the damaged cell shows as such, with none of its old numbers
    report = _cli("report", "results", "--out", "alone", "--grid", str(grid), "--models-file", str(REPO / "models.yaml"),
                  "--methods-file", str(REPO / "methods.yaml"), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    alone = list(csv.DictReader((tmp_path / "alone" / "results.csv").open()))
    assert [r["status"] for r in alone] == ["damaged"] and alone[0]["value"] == ""
    assert "sha256 differs" in alone[0]["reason"]

    evaluate = _cli("evaluate", str(CELL), "--cache-dir", "results/cache", "--models-file", str(REPO / "models.yaml"),
                    "--methods-file", str(REPO / "methods.yaml"), cwd=tmp_path)
    assert evaluate.returncode == 2 and len(evaluate.stderr.strip().splitlines()) == 1
    assert evaluate.stderr.startswith(f"stepbench: error: cell {CELL}: samples.npz: its sha256 differs"), evaluate.stderr

    again = _run(tmp_path, "--configfile", str(grid))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"stepbench: cell results/cells/gmm2d/euler/nfe4/seed0: samples.npz: its sha256 differs from the one " \
           "cell.json records (damaged or replaced); it will be sampled and evaluated again (the old files are in " \
           "results/damaged/" in again.stderr
    assert len(list((tmp_path / "results" / "damaged").rglob("samples.npz"))) == 1  # kept for inspection
    after = _rows(tmp_path)
    assert after[("euler", "4", "exact_err")]["value"] == before[("euler", "4", "exact_err")]["value"]
    assert after[("euler", "4", "exact_err")]["status"] == "ok"
    assert "Nothing to be done" in _run(tmp_path, "--configfile", str(grid), "--dry-run").stdout


def test_metrics_of_other_samples_are_recomputed(tmp_path):
    grid = _grid(tmp_path, methods=["euler"], nfe=[4], seeds=[0])
    assert _run(tmp_path, "--configfile", str(grid)).returncode == 0
    metrics = tmp_path / CELL / "metrics.json"
    record = json.loads(metrics.read_text())
    record["cell"]["samples_sha256"] = "0" * 64  # as if computed from an earlier sampling of the cell
    stat = metrics.stat()
    metrics.write_text(json.dumps(record))
    os.utime(metrics, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    planned = _run(tmp_path, "--configfile", str(grid), "--dry-run")
    assert "rule evaluate:" in planned.stdout and "rule sample:" not in planned.stdout, planned.stdout[-2000:]
    assert "metrics.json was computed from other samples" in planned.stderr


class Killed(Exception):
    pass


def test_a_killed_cell_resumes_from_its_finished_batches(tmp_path, monkeypatch):
    """Batches finished before a kill are kept (CELL/.partial); the resumed cell equals an uninterrupted one."""
    from harness.methods.family_solver import SolverSampler

    models, methods = load_models(REPO / "models.yaml"), load_methods(REPO / "methods.yaml")
    args = ("gmm2d", models["gmm2d"], "heun", methods["heun"], 9)
    run_cell(*args, tmp_path / "whole", 40, batch_size=10)

    original, calls, fail_at = SolverSampler.sample, [], [3]

    def dies_at_the_third_batch(self, *a, **k):
        calls.append(1)
        if len(calls) in fail_at:
            raise Killed  # the job killed while sampling
        return original(self, *a, **k)

    monkeypatch.setattr(SolverSampler, "sample", dies_at_the_third_batch)
    with pytest.raises(Killed):
        run_cell(*args, tmp_path / "resumed", 40, batch_size=10)
    assert not (tmp_path / "resumed" / "cell.json").exists()
    calls.clear(), fail_at.clear()
    cell = run_cell(*args, tmp_path / "resumed", 40, batch_size=10)
    assert len(calls) == 2  # only the two batches left were sampled
    whole, resumed = (np.load(tmp_path / d / "samples.npz")["samples"] for d in ("whole", "resumed"))
    assert np.array_equal(whole, resumed)
    assert cell["nfe_measured"] == 9 and not (tmp_path / "resumed" / ".partial").exists()


def test_a_key_given_twice_is_an_error_naming_file_key_and_lines(tmp_path):
    models = tmp_path / "models.yaml"
    text = (REPO / "models.yaml").read_text()
    models.write_text(text + "\ngmm2d:\n  adapter: gmm2d\n  process: {kind: edm}\n  metrics: [exact_err]\n")
    second = len(text.splitlines()) + 2
    first = 1 + next(i for i, line in enumerate(text.splitlines()) if line.startswith("gmm2d:"))
    with pytest.raises(ConfigError, match=rf"^{models}: key 'gmm2d' appears twice, at lines {first} and {second}$"):
        load_models(models)

    grid = tmp_path / "grid.yaml"
    grid.write_text(_grid(tmp_path).read_text() + "nfe: [6]\n")
    run = _run(tmp_path, "--configfile", str(grid), "--dry-run")
    errors = [line for line in run.stderr.splitlines() if "error" in line]
    assert run.returncode != 0 and len(errors) == 1 and "key 'nfe' appears twice, at lines" in errors[0], run.stderr


class _Payload:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_planted_in_the_cache_is_refused_not_run(tmp_path):
    from harness import prepared
    from harness.methods import make_sampler

    models, methods = load_models(REPO / "models.yaml"), load_methods(REPO / "methods.yaml")
    cache = tmp_path / "cache"
    path = prepared.artifact_path(cache, "gmm2d", models["gmm2d"], "dc_solver", methods["dc_solver"],
                                  make_sampler(methods["dc_solver"]), 8)
    path.parent.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"artifact": _Payload(marker), "cost": {}}, path)
    run = _cli("sample", "--model", "gmm2d", "--method", "dc_solver", "--nfe", "8", "--out", "cell", "--num-samples",
               "10", "--cache-dir", str(cache), "--models-file", str(REPO / "models.yaml"), "--methods-file",
               str(REPO / "methods.yaml"), cwd=tmp_path)
    assert run.returncode == 2 and not marker.exists()
    assert run.stderr.strip() == (f"stepbench: error: {path}: not a stepbench artifact (safetensors with its "
                                  "structure): SafetensorError; delete it to rebuild")
    lines = [line for p in (REPO / "harness").rglob("*.py") for line in p.read_text().splitlines()]
    assert not [line for line in lines if "weights_only=False" in line]
    assert not [line for line in lines if "np.load(" in line and "allow_pickle=True" in line]


def test_a_lock_left_by_a_killed_run_is_one_line_with_the_command_to_run(tmp_path):
    grid = _grid(tmp_path, methods=["euler"], nfe=[4], seeds=[0])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".snakemake" / "locks").mkdir(parents=True)
    (tmp_path / ".snakemake" / "locks" / "0.output.lock").write_text("results/grid.json\n")
    (tmp_path / ".snakemake" / "stepbench-run.json").write_text(
        json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    run = _run(tmp_path, "--configfile", str(grid))
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert (f"stepbench: error: a run in this directory (pid {int(dead.stdout)}) was killed and left Snakemake's "
            "lock; run `snakemake --unlock`, then the same command again (finished cells are kept)") in run.stderr
    assert _run(tmp_path, "--configfile", str(grid), "--unlock").returncode == 0
    assert _run(tmp_path, "--configfile", str(grid)).returncode == 0


@pytest.mark.parametrize("content, message", [
    (None, "missing.yaml: file not found"),
    ("models: [gmm2d\n", "missing.yaml: malformed YAML at line 2: did not find expected ',' or ']'"),
])
def test_a_bad_configfile_is_one_line_before_snakemake_starts(tmp_path, content, message):
    if content is not None:
        (tmp_path / "missing.yaml").write_text(content)
    run = _cli("run", "--cores", "1", "--configfile", "missing.yaml", "-s", str(REPO / "Snakefile"), cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.strip() == f"stepbench: error: {message}"


def test_errors_name_the_file_read_and_cut_long_lists(tmp_path):
    models = tmp_path / "my-models.yaml"
    spec = yaml.safe_load((REPO / "models.yaml").read_text())
    spec["digits-ideal"]["dataset"] = "digitz"
    models.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=rf"^{models}: key 'digits-ideal.dataset': 'digitz' unknown "
                                          r"\(did you mean 'digits'\?\); valid: digits$"):
        load_models(models)

    run = _run(tmp_path, "--configfile", str(_grid(tmp_path, methods=["dpmpp_2n"])), "--dry-run")
    line = next(line for line in run.stderr.splitlines() if line.startswith("stepbench: error:"))
    assert "(did you mean 'dpmpp_2m'?); nearest valid: dpmpp_2m, " in line and "see `stepbench methods`" in line
    assert len(line) < 300, line


def test_ids_cannot_reach_a_shell_and_paths_stay_paths(tmp_path):
    methods = tmp_path / "methods.yaml"
    methods.write_text((REPO / "methods.yaml").read_text() + "'x; touch pwned':\n  family: solver\n  solver: euler\n")
    with pytest.raises(ConfigError, match="does not match"):
        load_methods(methods)
    odd = tmp_path / "a dir; touch pwned"  # results and config files where a shell would split or run the name
    odd.mkdir()
    for name in ("models.yaml", "methods.yaml"):
        shutil.copy(REPO / name, odd / name)
    grid = _grid(tmp_path, methods=["euler"], nfe=[4], seeds=[0], results_dir=str(odd / "results"),
                 models_file=str(odd / "models.yaml"), methods_file=str(odd / "methods.yaml"))
    run = _run(tmp_path, "--configfile", str(grid))
    assert run.returncode == 0, run.stderr[-3000:]
    assert (odd / CELL / "metrics.json").is_file() and not (tmp_path / "pwned").exists()
