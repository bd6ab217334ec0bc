"""The cell contract: paired batch-independent noise, audited NFE, diverged cells as results."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness import prepared
from harness.cells import generate, run_cell
from harness.config import load_methods, load_models
from harness.evaluate import evaluate_cell
from harness.methods import make_sampler
from harness.models import load_denoiser
from harness.models.base import Denoiser
from harness.noise import SampleNoise

from conftest import REPO

MODELS = load_models(REPO / "models.yaml")
METHODS = load_methods(REPO / "methods.yaml")


def _cell(tmp_path, name, model="digits-ideal", method="dpmpp_2m", nfe=8, n=40, batch=None, keep_noise=False):
    out, cache = tmp_path / name, tmp_path / "cache"
    sampler = make_sampler(METHODS[method])
    if sampler.prepare_scope is not None:  # its side data first, as the workflow's prepare job makes it
        prepared.prepare(sampler, cache, model, MODELS[model], method, METHODS[method], nfe)
    run_cell(model, MODELS[model], method, METHODS[method], nfe, out, n, seed=3, batch_size=batch,
             keep_noise=keep_noise, device="cpu", cache_dir=cache)
    return out


@pytest.mark.parametrize("model", ["gmm2d", "digits-ideal"])
@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m", "euler_ancestral", "ddpm_large", "sde_dpmpp_2m",
                                    "sde_dpmpp_3m", "heun_churn", "dpmpp_2s_ancestral"])
def test_samples_byte_identical_across_runs_and_batch_sizes(tmp_path, model, method):
    # the stochastic solvers draw their step noise from the per-sample generators too
    runs = [_cell(tmp_path, f"b{b}-{i}", model, method, nfe=9, batch=b) for i, b in enumerate([40, 40, 7, 1])]
    arrays = [np.load(r / "samples.npz")["samples"] for r in runs]
    assert arrays[0].dtype == np.float32 and arrays[0].shape[0] == 40
    for other in arrays[1:]:
        assert arrays[0].tobytes() == other.tobytes()


def test_sample_i_depends_only_on_seed_and_index(tmp_path):
    small = np.load(_cell(tmp_path, "n10", n=10) / "samples.npz")["samples"]
    large = np.load(_cell(tmp_path, "n40", n=40) / "samples.npz")["samples"]
    assert small.tobytes() == large[:10].tobytes()


def test_methods_share_the_initial_noise(tmp_path):
    a = np.load(_cell(tmp_path, "a", method="euler", keep_noise=True) / "samples.npz")["noise"]
    b = np.load(_cell(tmp_path, "b", method="heun", nfe=9, keep_noise=True) / "samples.npz")["noise"]
    expected = SampleNoise(3, range(40)).randn((1, 8, 8), dtype=torch.float32).numpy()
    assert a.tobytes() == b.tobytes() == expected.tobytes()


@pytest.mark.parametrize("method", ["euler", "heun", "dpmpp_2m"])
def test_measured_nfe_equals_requested(tmp_path, method):
    for nfe in (4, 5, 8, 9, 20, 21):
        sampler = make_sampler(METHODS[method])
        try:
            sampler.check_nfe(nfe)
        except Exception:
            assert method == "heun" and nfe % 2 == 0
            continue
        cell = json.loads((_cell(tmp_path, f"{method}{nfe}", "gmm2d", method, nfe, n=12, batch=5) / "cell.json").read_text())
        assert cell["nfe"] == nfe and cell["nfe_measured"] == nfe


def test_cell_json_carries_contract_fields(tmp_path):
    cell = json.loads((_cell(tmp_path, "c") / "cell.json").read_text())
    for key in ("model", "method", "family", "nfe", "nfe_measured", "num_samples", "seed", "wall_s",
                "peak_mem_mb", "status", "provenance"):
        assert key in cell
    # 40 samples, digits-ideal's configured batch is larger: the record says the batch that ran
    assert cell["batch_size"] == cell["num_samples"] == 40 < MODELS["digits-ideal"].get("batch_size", 250)
    assert type(cell["nfe_measured"]) is int  # a whole count is written as one
    prov = cell["provenance"]
    assert prov["config_hash"] and prov["device"].startswith("cpu") and "torch" in prov["packages"]


class _Exploding(Denoiser):
    """Returns huge values so a solver overflows: a diverged cell must be a result, not a crash."""

    def __init__(self, inner):
        self.info = inner.info

    def denoise(self, x, sigma, cond=None):
        return x * torch.tensor(float("inf"), dtype=x.dtype)


def test_diverged_cell_is_a_result(tmp_path):
    denoiser = _Exploding(load_denoiser(MODELS["gmm2d"]))
    result = generate(denoiser, make_sampler(METHODS["euler"]), 4, 0, 6, 6)
    assert result.status == "diverged"


def test_evaluate_diverged_cell_gives_null_quality(tmp_path):
    out = _cell(tmp_path, "d", "gmm2d", "euler", nfe=4, n=6)
    cell = json.loads((out / "cell.json").read_text())
    cell["status"] = "diverged"
    (out / "cell.json").write_text(json.dumps(cell))
    result = evaluate_cell(out, MODELS["gmm2d"], METHODS, ["exact_err", "wall_s_per_sample"], tmp_path / "cache")
    assert result["exact_err"] is None and result["wall_s_per_sample"] > 0


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, capture_output=True, text=True)


def test_cli_sample_and_evaluate_round_trip(repo_files):
    out = repo_files / "cell"
    run = _cli("sample", "--model", "gmm2d", "--method", "heun", "--nfe", "21", "--out", str(out),
               "--num-samples", "20", "--keep-noise", cwd=repo_files)
    assert run.returncode == 0, run.stderr
    data = np.load(out / "samples.npz")
    assert data["samples"].shape == (20, 2) and data["noise"].shape == (20, 2)
    run = _cli("evaluate", str(out), "--metrics", "exact_err,wall_s_per_sample", "--cache-dir",
               str(repo_files / "cache"), cwd=repo_files)
    assert run.returncode == 0, run.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["exact_err"] < 1.0
    assert metrics["provenance"]["exact_err"]["solver"] == "scipy DOP853"
    # sampling into the cell again makes the old metrics stale: they go with the old samples
    run = _cli("sample", "--model", "gmm2d", "--method", "euler", "--nfe", "4", "--out", str(out),
               "--num-samples", "20", cwd=repo_files)
    assert run.returncode == 0, run.stderr
    assert not (out / "metrics.json").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "nope", "--method", "euler", "--nfe", "4"], "models.yaml: no model 'nope'; nearest valid: "),
        (["--model", "gmm2d", "--method", "nope", "--nfe", "4"], "methods.yaml: no method 'nope'; nearest valid: "),
        (["--model", "gmm2d", "--method", "heun", "--nfe", "8"], "NFE=8 cannot be met; nearest: 7, 9"),
        (["--model", "gmm2d", "--method", "euler", "--nfe", "4", "--models-file", "missing.yaml"],
         "missing.yaml: file not found"),
        (["--model", "gmm2d", "--method", "euler", "--nfe", "6.5"],  # Click's own errors: one line as well
         "stepbench: error: Invalid value for '--nfe': '6.5' is not a valid integer range. (see "),
        (["--model", "gmm2d", "--nfe", "6"], "stepbench: error: Missing option '--method'."),
    ],
)
def test_cli_bad_input_is_one_line(repo_files, args, expected):
    run = _cli("sample", *args, "--out", str(repo_files / "x"), cwd=repo_files)
    assert run.returncode != 0
    assert expected in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr
    assert not (repo_files / "x").exists()


@pytest.mark.parametrize(
    "edit, expected",
    [
        ("gmm2d:\n  adapter: gmm2d\n  process: {kind: edm\n", "models.yaml: malformed YAML at line"),
        ("gmm2d:\n  adapter: gmm2d\n  process: {kind: warp}\n  metrics: []\n",
         "models.yaml: key 'gmm2d.process.kind': 'warp' is not one of"),
        ("gmm2d:\n  adapter: nope\n  process: {kind: edm}\n  metrics: []\n",
         "models.yaml: key 'gmm2d.adapter': 'nope' unknown; valid: diffusers_audioldm, diffusers_dit, diffusers_lcm, diffusers_sd, diffusers_sd3, diffusers_sdxl, diffusers_unet, digits_gaussian, digits_ideal, gmm2d"),
        ("gmm2d:\n  adapter: gmm2d\n  process: {kind: edm}\n  metrics: [fidd]\n",
         "models.yaml: key 'gmm2d.metrics.0': 'fidd' unknown (did you mean 'fid'?); "),
    ],
)
def test_cli_bad_config_is_one_line(repo_files, edit, expected):
    (repo_files / "models.yaml").write_text(edit)
    run = _cli("sample", "--model", "gmm2d", "--method", "euler", "--nfe", "4", "--out", str(repo_files / "x"),
               cwd=repo_files)
    assert run.returncode != 0 and expected in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


def test_cli_methods_lists_nfe_rules_side_data_and_a_budget(repo_files):
    run = _cli("methods", "--nfe", "8", cwd=repo_files)
    assert run.returncode == 0, run.stderr
    rows = {line.split()[0]: line for line in run.stdout.splitlines()}
    assert rows["method"].split()[:3] == ["method", "NFE", "8"]
    assert "n/a (NFE = 2*steps-1; nearest 7, 9)" in rows["heun"] and "edm_rho, rho=7.0" in rows["heun"]
    assert rows["dc_solver"].split()[1:5] == ["yes", "solver", "dc_solver", "steps"] and "per nfe" in rows["dc_solver"]
    assert rows["ddpm"].rstrip().endswith("eta=1.0")
    assert len(rows) == len(METHODS) + 1  # every entry of methods.yaml, and the header


def test_prepared_artifact_key_follows_the_preparing_code(tmp_path, monkeypatch):
    import harness.methods.family_solver as family_solver

    def path():
        sampler = make_sampler(METHODS["dc_solver"])
        return prepared.artifact_path(tmp_path, "gmm2d", MODELS["gmm2d"], "dc_solver", METHODS["dc_solver"], sampler, 8)

    before = path()
    assert path() == before  # the same code, the same artifact
    monkeypatch.setattr(family_solver, "preparation_code_hash", lambda module: f"{module} after a fix")
    assert path() != before and path().parent == before.parent


@pytest.mark.parametrize("entry, expected", [
    ("typo:\n  family: solver\n  solver: heun\n  params: {s_chrun: 40}\n",
     "methods.yaml: key 'typo.params.s_chrun': unknown for solver 'heun' (did you mean 's_churn'?); valid: variables, s_churn, s_tmin"),
    ("typo:\n  family: solver\n  solver: dc_solver\n  params: {calibration_sample: 4}\n",
     "key 'typo.params.calibration_sample': unknown for solver 'dc_solver' (did you mean "
     "'calibration_samples'?); valid: order, variant, calibration_samples"),
])
def test_cli_misspelt_solver_param_is_one_line(repo_files, entry, expected):
    with open(repo_files / "methods.yaml", "a") as f:
        f.write(entry)
    run = _cli("sample", "--model", "gmm2d", "--method", "euler", "--nfe", "4", "--out", str(repo_files / "x"),
               cwd=repo_files)
    assert run.returncode != 0 and expected in run.stderr, run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("edited, counts", [("methods/unipc.py", True), ("methods/solvers.py", True),
                                            ("schedules.py", True), ("report/site.py", False)])
def test_preparation_code_hash_covers_what_a_preparation_runs(tmp_path, monkeypatch, edited, counts):
    """dc_solver's fit runs UniPC's steps, the searches run solvers by name and the schedules: an edit there
    gives new artifacts; an edit to the report does not. The key comes from the files, whatever is loaded."""
    import shutil

    import harness.methods.family_solver as family_solver

    hashed = family_solver.preparation_code_hash.__wrapped__  # uncached
    before = hashed("harness.methods.dc_solver")
    copy = tmp_path / "harness"
    shutil.copytree(family_solver.HARNESS, copy)
    monkeypatch.setattr(family_solver, "HARNESS", copy)
    assert hashed("harness.methods.dc_solver") == before  # same sources, same key
    with open(copy / edited, "a") as f:
        f.write("# edited\n")
    assert (hashed("harness.methods.dc_solver") != before) == counts


@pytest.mark.parametrize("params, schedule, expected", [
    ("{variant: bh3}", "{kind: edm_rho}", "stepbench: error: unipc: variant must be one of"),
    ("{eta: fast}", "{kind: edm_rho}", "stepbench: error: euler_ancestral: eta must be in [0, inf]; got 'fast'"),
    ("{}", "{kind: edm_rho, rho: 0}", "stepbench: error: edm_rho: rho must be a positive number; got 0"),
])
def test_cli_wrong_param_value_is_one_line(repo_files, params, schedule, expected):
    solver = "unipc" if "variant" in params else "euler_ancestral"
    with open(repo_files / "methods.yaml", "a") as f:
        f.write(f"bad:\n  family: solver\n  solver: {solver}\n  schedule: {schedule}\n  params: {params}\n")
    run = _cli("sample", "--model", "gmm2d", "--method", "bad", "--nfe", "4", "--out", str(repo_files / "x"),
               cwd=repo_files)
    assert run.returncode != 0 and run.stderr.strip().startswith(expected), run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_misspelt_reference_method_names_the_model_and_the_methods_file(tmp_path):
    from harness import references
    from harness.errors import ConfigError

    spec = {**MODELS["gmm2d"], "reference": {"method": "dpmpp_2mm", "nfe": 100}}
    with pytest.raises(ConfigError) as err:
        references.reference_path(tmp_path, "gmm2d", spec, "solver", 0, 10, METHODS)
    assert str(err.value).startswith(f"model 'gmm2d': key 'reference.method': 'dpmpp_2mm' is not in "
                                     f"{REPO / 'methods.yaml'} (did you mean 'dpmpp_2m'?); nearest valid: dpmpp_2m, ")
