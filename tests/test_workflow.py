"""The Snakemake workflow end to end on a tiny grid: cells, metrics, report, nothing left to do."""

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO

SNAKEMAKE = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--cores", "2"]


def _grid(tmp_path: Path, **overrides) -> Path:
    grid = {
        "models": ["gmm2d"],
        "methods": ["euler", "heun"],
        "nfe": [4, 21],
        "seeds": [0, 1],
        "num_samples": 40,
        "models_file": str(REPO / "models.yaml"),
        "methods_file": str(REPO / "methods.yaml"),
        **overrides,
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


def _run(tmp_path, *args, env=None):
    # rules call the `stepbench` console script installed next to this interpreter
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **(env or {})}
    return subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), *args], capture_output=True, text=True, env=env)


def test_tiny_grid_end_to_end_and_second_run_has_nothing_to_do(tmp_path):
    grid = _grid(tmp_path)
    run = _run(tmp_path, "--configfile", str(grid))
    assert run.returncode == 0, run.stderr[-3000:]
    rows = list(csv.DictReader((tmp_path / "reports" / "results.csv").open()))
    # the grid file replaces the default grid: none of the default's extra blocks run
    assert {(r["model"], r["method"]) for r in rows} == {("gmm2d", "euler"), ("gmm2d", "heun")}
    by_cell = {(r["method"], r["nfe"], r["metric"]): r for r in rows}
    assert float(by_cell[("euler", "4", "exact_err")]["value"]) > float(by_cell[("euler", "21", "exact_err")]["value"])
    assert by_cell[("heun", "4", "")]["status"] == "unsupported"  # heun needs odd NFE
    assert "n/a (" in (tmp_path / "reports" / "models" / "gmm2d.html").read_text()
    for r in rows:
        if r["status"] == "ok":
            assert float(r["nfe_measured"]) == float(r["nfe"])
            assert r["n_seeds"] == "2" and float(r["ci_low"]) <= float(r["value"]) <= float(r["ci_high"])
    per_seed = list(csv.DictReader((tmp_path / "reports" / "results_per_seed.csv").open()))
    assert {r["seed"] for r in per_seed if r["metric"] == "exact_err"} == {"0", "1"}
    again = _run(tmp_path, "--configfile", str(grid), "--dry-run")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout + again.stderr


def test_grid_with_unknown_model_is_one_clear_line(tmp_path):
    run = _run(tmp_path, "--configfile", str(_grid(tmp_path, models=["nope"])), "--dry-run")
    assert run.returncode != 0
    assert "stepbench: error:" in run.stderr and "no model 'nope'; nearest valid: " in run.stderr
    assert "Traceback" not in run.stderr


def test_missing_checkpoint_is_one_line_before_any_job(tmp_path):
    models = tmp_path / "models.yaml"
    models.write_text((REPO / "models.yaml").read_text() + yaml.safe_dump({"my-unet": {
        "adapter": "diffusers_unet", "source": "./checkpoints/my-ddpm", "metrics": ["mse_ref"],
        "reference": {"method": "dpmpp_2m", "nfe": 50},
        "process": {"kind": "vp_discrete", "beta_schedule": "linear", "num_train_timesteps": 1000}}}))
    run = _run(tmp_path, "--configfile", str(_grid(tmp_path, models=["gmm2d", "my-unet"], models_file=str(models))))
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert errors == [f"stepbench: error: {models}: model 'my-unet': diffusers_unet: source ./checkpoints/my-ddpm: "
                      "no such folder"], run.stderr[-2000:]
    assert not (tmp_path / "results").exists()  # nothing ran


def test_a_failing_job_ends_the_output_with_its_own_error(tmp_path):
    """Snakemake's error block only points to the job's log; the job's own last line follows it."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "lab_boom.py").write_text(
        "from harness.methods.solver_base import solver\n\n\n@solver('boom', order=1)\n"
        "def boom(model, x, sigmas, noise=None):\n    raise RuntimeError('boom: this solver always fails')\n")
    methods = tmp_path / "methods.yaml"
    methods.write_text((REPO / "methods.yaml").read_text() + "boom:\n  family: solver\n  module: lab_boom\n  solver: boom\n")
    grid = _grid(tmp_path, methods=["boom"], nfe=[4], seeds=[0], methods_file=str(methods))
    run = _run(tmp_path, "--configfile", str(grid), env={"PYTHONPATH": str(plugins)})
    assert run.returncode != 0
    tail = run.stderr.strip().splitlines()[-6:]
    assert ("stepbench: error: a job failed (results/logs/sample/gmm2d__boom__nfe4__seed0.log): "
            "RuntimeError: boom: this solver always fails") in tail, run.stderr[-3000:]


def test_grid_ids_are_checked_where_the_grid_names_them(tmp_path):
    """A misspelt id names the grid key it sits at, with the close valid id; a plugin method whose module does
    not import here stops only the grids that ask for it."""
    methods = tmp_path / "methods.yaml"
    methods.write_text((REPO / "methods.yaml").read_text()
                       + "colleagues_solver:\n  family: solver\n  module: not_installed_here\n  solver: x\n")
    grid = _grid(tmp_path, methods_file=str(methods), blocks=[{"methods": ["euler", "dpmpp2m"], "nfe": [6]}])
    run = _run(tmp_path, "--configfile", str(grid), "--dry-run")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert (f"stepbench: error: grid key 'blocks.0.methods.1': {methods}: no method 'dpmpp2m' "
            "(did you mean 'dpmpp_2m'?); nearest valid: dpmpp_2m, ") in run.stderr, run.stderr[-2000:]

    grid = _grid(tmp_path, methods_file=str(methods))  # euler and heun only
    assert _run(tmp_path, "--configfile", str(grid), "--dry-run").returncode == 0

    grid = _grid(tmp_path, methods_file=str(methods), methods=["euler", "colleagues_solver"])
    run = _run(tmp_path, "--configfile", str(grid), "--dry-run")
    assert run.returncode != 0 and "Traceback" not in run.stderr
    assert (f"stepbench: error: grid key 'methods.1': {methods}: key 'colleagues_solver.module': solver module "
            "'not_installed_here' cannot be imported") in run.stderr, run.stderr[-2000:]


@pytest.mark.parametrize("overrides, message", [
    ({"nfe": [6.5]}, "key 'nfe.0': 6.5 is not of type 'integer'"),
    ({"nfee": [6]}, "key '(top level)': Additional properties are not allowed ('nfee' was unexpected)"),
])
def test_grid_breaking_the_schema_is_one_line_naming_file_and_key(tmp_path, overrides, message):
    grid = _grid(tmp_path, **overrides)
    run = _run(tmp_path, "--configfile", str(grid), "--dry-run")
    errors = [line for line in run.stderr.splitlines() if "error" in line.lower()]
    assert run.returncode != 0
    assert errors == [f"stepbench: error: {grid}: {message}"], run.stderr[-2000:]
    assert "Traceback" not in run.stderr and "schema[" not in run.stderr


def test_editing_a_method_entry_reruns_its_cells(tmp_path):
    """Snakemake reruns a job whose params changed: the cell's config_hash is one, so an edited methods.yaml
    entry is not reported with samples made under the old one."""
    methods = yaml.safe_load((REPO / "methods.yaml").read_text())
    methods_file = tmp_path / "methods.yaml"
    methods_file.write_text(yaml.safe_dump(methods))
    grid = _grid(tmp_path, methods=["ddim_eta05"], nfe=[4], seeds=[0], num_samples=20, methods_file=str(methods_file))
    assert _run(tmp_path, "--configfile", str(grid)).returncode == 0
    again = _run(tmp_path, "--configfile", str(grid), "--dry-run")
    assert "Nothing to be done" in again.stdout + again.stderr
    # the same entries in a file elsewhere: no sample, metric or reference job reruns (the report does: its
    # method descriptions come from the file, and grid.json records the grid)
    moved = tmp_path / "elsewhere" / "methods.yaml"
    moved.parent.mkdir()
    moved.write_text(methods_file.read_text())
    moved_grid = _grid(moved.parent, methods=["ddim_eta05"], nfe=[4], seeds=[0], num_samples=20,
                       methods_file=str(moved))
    relocated = _run(tmp_path, "--configfile", str(moved_grid), "--dry-run")
    planned = re.findall(r"^rule (\w+):", relocated.stdout, re.M)
    assert relocated.returncode == 0 and set(planned) == {"report", "all"}, relocated.stdout[-2000:]
    methods["ddim_eta05"]["params"]["eta"] = 0.9
    methods_file.write_text(yaml.safe_dump(methods))
    edited = _run(tmp_path, "--configfile", str(grid), "--dry-run")
    assert edited.returncode == 0 and "rule sample:" in edited.stdout, edited.stdout[-2000:]


def test_config_lists_of_numbers_are_numbers(tmp_path):
    """--config nfe=[4,5] changes one key of the grid: Snakemake reads the items as strings, the Snakefile
    reads the value as YAML, as a grid file's would be."""
    grid = _grid(tmp_path, methods=["euler"], seeds=[0])
    run = _run(tmp_path, "--configfile", str(grid), "--config", "nfe=[4,5]", "--dry-run")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "nfe4" in run.stdout and "nfe5" in run.stdout and "nfe21" not in run.stdout
