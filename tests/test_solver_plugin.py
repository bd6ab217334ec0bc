"""A user's own solver, in a module that methods.yaml names (`module:`), runs through the same CLI, paired
noise, NFE audit and metrics as the built-in ones, without editing stepbench."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

PLUGIN = '''
from harness.methods.solver_base import SOLVERS, NFERule, solver

# the built-in Heun under another name: its samples must be the built-in's, bit for bit
solver("lab_heun", order=2, nfe=NFERule(per_step=2, saved_at_end=1))(SOLVERS["heun"].fn)


@solver("lab_midpoint_undeclared", order=2)  # declares one evaluation per step but spends two
def lab_midpoint_undeclared(model, x, sigmas, noise=None):
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        if s_next == 0:
            return model(x, s)
        s_mid = (s * s_next) ** 0.5
        x_mid = x + (s_mid - s) / s * (x - model(x, s))
        x = x + (s_next - s) / s_mid * (x_mid - model(x_mid, s_mid))
    return x
'''

ENTRIES = '''
lab_heun:
  family: solver
  module: lab_solvers
  solver: lab_heun
  schedule: {kind: edm_rho, rho: 7.0}
lab_midpoint_undeclared:
  family: solver
  module: lab_solvers
  solver: lab_midpoint_undeclared
'''


def _cli(*args, cwd, pythonpath):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env)


@pytest.fixture
def lab(repo_files):
    plugins = repo_files / "plugins"
    plugins.mkdir()
    (plugins / "lab_solvers.py").write_text(PLUGIN)
    with open(repo_files / "methods.yaml", "a") as f:
        f.write(ENTRIES)
    return repo_files, plugins


def _sample(lab, method, nfe):
    cwd, plugins = lab
    out = cwd / method
    run = _cli("sample", "--model", "gmm2d", "--method", method, "--nfe", str(nfe), "--out", str(out),
               "--num-samples", "16", cwd=cwd, pythonpath=plugins)
    assert run.returncode == 0, run.stderr
    return np.load(out / "samples.npz")["samples"], json.loads((out / "cell.json").read_text())


def test_plugin_solver_runs_like_the_built_in_one(lab):
    ours, cell = _sample(lab, "lab_heun", 9)
    builtin, _ = _sample(lab, "heun", 9)
    np.testing.assert_array_equal(ours, builtin)  # same noise, same steps, same code path
    assert cell["nfe_measured"] == 9 and cell["provenance"]["method_spec"]["module"] == "lab_solvers"


def test_plugin_solver_nfe_is_audited_not_declared(lab):
    _, cell = _sample(lab, "lab_midpoint_undeclared", 5)  # 5 steps: 4 of two evaluations, a last of one
    assert cell["nfe"] == 5 and cell["nfe_measured"] == 9


@pytest.mark.parametrize("module, expected", [
    ("no_such_lab_module", "key 'broken.module': solver module 'no_such_lab_module' cannot be imported: "
                           "ModuleNotFoundError: No module named 'no_such_lab_module'"),
    ("lab_failing", "key 'broken.module': solver module 'lab_failing' cannot be imported: ZeroDivisionError"),
])
def test_unimportable_solver_module_is_one_line_for_its_method_only(lab, module, expected):
    """A colleague's plugin that does not import here fails the commands that ask for it, in one line; the
    other methods of the shared methods.yaml still run, and `stepbench methods` lists it with the reason."""
    cwd, plugins = lab
    (plugins / "lab_failing.py").write_text("1 / 0\n")
    with open(cwd / "methods.yaml", "a") as f:
        f.write(f"broken:\n  family: solver\n  module: {module}\n  solver: euler\n")
    run = _cli("sample", "--model", "gmm2d", "--method", "broken", "--nfe", "4", "--out", str(cwd / "x"),
               cwd=cwd, pythonpath=plugins)
    assert run.returncode != 0 and expected in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and not (cwd / "x").exists()
    _sample(lab, "heun", 5)
    listing = _cli("methods", "--nfe", "4", cwd=cwd, pythonpath=plugins)
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith("broken "))
    assert "n/a (its module does not import)" in row and expected in row
