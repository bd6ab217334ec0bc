"""family quantized on a tiny class-conditional UNet2DModel saved as a diffusers folder (the real loading path).

The cells here run the eager graphs (`compile: false`: int8-rounded tensors, fp32 kernels) so the suite needs no
compilation; the compiled w8a8 kernels are checked in tests/test_quantization.py, and one slow test here runs a
compiled cell.
"""

import json

import numpy as np
import pytest
import torch
import yaml

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("torchao")

from harness import prepared
from harness.cells import run_cell
from harness.config import load_methods
from harness.errors import ConfigError
from harness.evaluate import evaluate_cell
from harness.methods import family_quantized, make_sampler
from harness.workflow import plan

LINEAR = {"kind": "vp_discrete", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
          "num_train_timesteps": 1000}
TINY_CALIBRATION = {"timesteps": "uniform", "samples": 8, "trajectories": 4, "trajectory_steps": 4}


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-unet")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=3)
    unet.save_pretrained(folder)
    diffusers.DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                            num_train_timesteps=1000).save_pretrained(folder)
    return folder


@pytest.fixture
def model_spec(unet_folder):
    return {"adapter": "diffusers_unet", "source": str(unet_folder), "process": LINEAR, "classes": 2,
            "num_samples": 6, "batch_size": 6, "metrics": ["wall_s_per_sample"], "params": {"network_batch": 4}}


def methods_file(tmp_path, extra: dict):
    """The repo's methods.yaml plus `extra` entries, loaded as the workflow loads it (base_spec resolved)."""
    from conftest import REPO

    data = yaml.safe_load((REPO / "methods.yaml").read_text())
    data.update(extra)
    path = tmp_path / "methods.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def quantized(base, scheme="w8a8", **settings):
    calibration = settings.pop("calibration", TINY_CALIBRATION)
    entry = {"base": base, "scheme": scheme, "compile": False, **settings}
    if calibration is not None:
        entry["calibration"] = calibration
    return {"family": "quantized", "quantized": entry}


def cell(tmp_path, model_spec, methods, method_id, nfe, name=None, keep_noise=False):
    spec = methods[method_id]
    sampler = make_sampler(spec)
    if sampler.prepare_scope is not None:
        prepared.prepare(sampler, tmp_path / "cache", "tiny", model_spec, method_id, spec, nfe)
    out = tmp_path / "results" / "cells" / "tiny" / method_id / f"nfe{nfe}" / "seed0"
    record = run_cell("tiny", model_spec, method_id, spec, nfe, out, 6, cache_dir=tmp_path / "cache",
                      keep_noise=keep_noise)
    return record, out


# every solver kind: first order, multistep, predictor-corrector, singlestep high order, stochastic, Heun
BASES = [("euler", 4), ("dpmpp_2m", 5), ("unipc", 5), ("dpm_solver_3", 7), ("euler_ancestral", 4), ("heun", 5)]


@pytest.mark.parametrize("base,nfe", BASES)
def test_every_solver_kind_runs_quantised_with_its_nfe_and_noise(tmp_path, model_spec, base, nfe):
    methods = load_methods(methods_file(tmp_path, {"q": quantized(base)}))
    q, q_dir = cell(tmp_path, model_spec, methods, "q", nfe, keep_noise=True)
    fp, fp_dir = cell(tmp_path, model_spec, methods, base, nfe, keep_noise=True)
    assert q["nfe_measured"] == fp["nfe_measured"] == nfe  # the NFE audit is the base solver's
    assert q["status"] == "ok"
    qs, fs = np.load(q_dir / "samples.npz"), np.load(fp_dir / "samples.npz")
    np.testing.assert_array_equal(qs["noise"], fs["noise"])  # paired noise unchanged
    assert not np.array_equal(qs["samples"], fs["samples"])  # the network really is another one
    rel = np.linalg.norm(qs["samples"] - fs["samples"]) / np.linalg.norm(fs["samples"])
    assert rel < 0.5, rel  # random weights: close to fp32, not equal
    record = q["method_record"]["quantization"]
    assert record["scheme"] == "w8a8" and record["base"] == base
    assert record["size_bytes"] < record["fp32_size_bytes"]
    assert q["gflops_per_sample"] == pytest.approx(fp["gflops_per_sample"])  # the same multiply-adds


def test_calibration_is_a_cached_artifact_and_cells_do_not_recalibrate(tmp_path, model_spec, monkeypatch):
    methods = load_methods(methods_file(tmp_path, {"q": quantized("dpmpp_2m")}))
    spec = methods["q"]
    sampler = make_sampler(spec)
    path = prepared.prepare(sampler, tmp_path / "cache", "tiny", model_spec, "q", spec, 5)
    stamp = path.stat().st_mtime_ns
    artifact = prepared.load_artifact(path)["artifact"]
    assert artifact["calibration"]["inputs"] == 8 and artifact["calibration"]["trajectories"] == 4

    def no_calibration(*args, **kwargs):
        raise AssertionError("recalibrated")

    monkeypatch.setattr(family_quantized, "calibration_inputs", no_calibration)
    # the second preparation finds the file (one artifact for every NFE: scope model), the cell only loads it
    assert prepared.prepare(make_sampler(spec), tmp_path / "cache", "tiny", model_spec, "q", spec, 8) == path
    assert path.stat().st_mtime_ns == stamp
    out = tmp_path / "cell"
    record = run_cell("tiny", model_spec, "q", spec, 8, out, 6, cache_dir=tmp_path / "cache")
    assert record["prepared"]["path"] == str(path)
    assert record["method_record"]["quantization"]["calibration_summary"]["inputs"] == 8


def test_calibration_inputs_come_from_fp32_trajectories_at_the_chosen_steps(model_spec):
    from harness.models import load_denoiser
    from harness.prepared import CALIBRATION_SEED, calibration_labels

    denoiser = calibration_labels(load_denoiser(model_spec))
    network = family_quantized.network_of(denoiser)
    setting = {**TINY_CALIBRATION, "trajectory_steps": 20, "samples": 256}
    uniform, su = family_quantized.calibration_inputs(denoiser, network, setting, CALIBRATION_SEED)
    normal, sn = family_quantized.calibration_inputs(denoiser, network, {**setting, "timesteps": "ptq4dm_normal"},
                                                     CALIBRATION_SEED)
    again, _ = family_quantized.calibration_inputs(denoiser, network, setting, CALIBRATION_SEED)
    for (a, ta, ca), (b, tb, cb) in zip(uniform, again):  # deterministic
        assert torch.equal(a, b) and torch.equal(ta, tb) and torch.equal(ca, cb)
    assert su["inputs"] == sn["inputs"] == 256
    assert su["distinct_t"] == 20  # evenly spread: every step of the trajectory
    assert sn["t_mean"] < su["t_mean"]  # N(0.4T, 0.4T) clipped sits below uniform's 0.5T (256 draws)
    # each input's time step is the trajectory step nearest the chooser's
    steps = np.unique(np.concatenate([t.numpy() for _, t, _ in uniform]))
    wanted = family_quantized.native_timesteps(denoiser.process, "ptq4dm_normal", 256, CALIBRATION_SEED)
    got = np.concatenate([t.numpy() for _, t, _ in normal])
    np.testing.assert_allclose(got, steps[np.abs(steps[None] - wanted[:, None]).argmin(1)], atol=1e-3)
    # the noisiest input is the trajectory's start: x_T = noise from the calibration seed
    from harness.noise import SampleNoise

    start = SampleNoise(CALIBRATION_SEED, range(4)).randn((1, 8, 8), dtype=torch.float32)
    x, t, c = (torch.cat(v) for v in zip(*uniform))
    last = int(t.argmax())
    assert t[last] == pytest.approx(999, abs=1)
    torch.testing.assert_close(x[last], start[last % 4], rtol=1e-5, atol=1e-5)
    assert c.tolist() == [int(v) for v in denoiser.conditions(CALIBRATION_SEED, range(4))] * 64


def test_compiled_network_is_built_once_per_process(tmp_path, model_spec):
    methods = load_methods(methods_file(tmp_path, {"q": quantized("euler", "w8", calibration=None)}))
    first, _ = cell(tmp_path, model_spec, methods, "q", 4)
    second, _ = cell(tmp_path, model_spec, methods, "q", 6)
    assert first["method_record"]["quantization"]["built_in_this_cell"] is True
    assert second["method_record"]["quantization"]["built_in_this_cell"] is False


def test_mse_fp32_reads_the_twin_and_the_size_and_kernels_are_the_records(tmp_path, model_spec):
    methods = load_methods(methods_file(tmp_path, {
        "q8": quantized("dpmpp_2m", "w8a8"), "q4": quantized("dpmpp_2m", "w4a8", simulate=True)}))
    _, fp_dir = cell(tmp_path, model_spec, methods, "dpmpp_2m", 5)
    values = {}
    for method in ("q8", "q4"):
        record, out = cell(tmp_path, model_spec, methods, method, 5)
        metrics = evaluate_cell(out, model_spec, methods, ["wall_s_per_sample"], tmp_path / "cache")
        ours = np.load(out / "samples.npz")["samples"].astype(np.float64)
        theirs = np.load(fp_dir / "samples.npz")["samples"].astype(np.float64)
        assert metrics["mse_fp32"] == pytest.approx(((ours - theirs) ** 2).mean())
        assert metrics["model_bytes"] == record["method_record"]["quantization"]["size_bytes"]
        assert metrics["int8_kernels"] == 0  # eager graphs: no int8 kernel ran, and the record says so
        values[method] = metrics["mse_fp32"]
    assert values["q8"] > 0 and values["q4"] > 0  # random weights: no order between the two is implied
    assert make_sampler(methods["q4"]).record() == {"quantization": {}}  # nothing measured before a cell


def test_plan_adds_the_fp32_twin_and_makes_evaluation_wait_for_it(tmp_path, model_spec):
    models = tmp_path / "models.yaml"
    models.write_text(yaml.safe_dump({"tiny": model_spec}))
    methods = methods_file(tmp_path, {"q": quantized("dpmpp_2m")})
    result = plan({"models_file": str(models), "methods_file": str(methods), "results_dir": str(tmp_path / "r"),
                   "models": ["tiny"], "methods": ["q"], "nfe": [5]})
    assert {(c.method, c.nfe) for c in result.cells} == {("q", 5), ("dpmpp_2m", 5)}
    twin = result.twin_inputs("tiny", "q", 5, "", 0)
    assert twin == [tmp_path / "r" / "cells" / "tiny" / "dpmpp_2m" / "nfe5" / "seed0" / n for n in ("cell.json", "samples.npz")]
    assert result.twin_inputs("tiny", "dpmpp_2m", 5, "", 0) == []
    assert ("tiny", "q", 5) in result.prepared


@pytest.mark.parametrize("entry,message", [
    ({"base": "dpmpp_2m", "scheme": "w3a3"}, "no fast kernel here: set simulate: true"),
    ({"base": "dpmpp_2m", "scheme": "w8a8"}, "needs calibration"),
    ({"base": "dpmpp_2m", "scheme": "w8", "calibration": TINY_CALIBRATION}, "calibrates nothing"),
    ({"base": "dpmpp_2m", "scheme": "w8a8", "calibration": {"timesteps": "normal"}}, "timesteps 'normal' unknown"),
    ({"base": "dpmpp_2m", "scheme": "w8a8", "calibration": {"sample": 4}}, "calibration.sample: unknown"),
    ({"base": "dpmpp_2m", "scheme": "w8a8", "calibration": {"samples": 1}}, "samples must be an integer >= 2"),
    ({"base": "dpmpp_2m", "scheme": "w8", "bits": 8}, "quantized.bits: unknown"),
    ({"base": "dpm_solver_v3", "scheme": "w8"}, "has prepared side data"),
    ({"base": "nonexistent", "scheme": "w8"}, "quantized.base"),
    ({"base": "dpmpp_2m", "scheme": "w1a8", "simulate": True}, "expected wNaM"),
])
def test_bad_entries_are_one_line_at_loading(tmp_path, entry, message):
    path = methods_file(tmp_path, {"bad": {"family": "quantized", "quantized": entry}})
    with pytest.raises(ConfigError) as err:
        load_methods(path)
    assert message in str(err.value) and "\n" not in str(err.value) and str(path) in str(err.value)


def test_finding_compares_calibrations_and_reports_speed_and_size():
    import pandas as pd

    from harness.report.findings import quantisation

    methods = {"dpmpp_2m": {"family": "solver"},
               "u": {"family": "quantized", "quantized": {"base": "dpmpp_2m", "scheme": "w8a8",
                                                          "calibration": {"timesteps": "uniform"}}},
               "p": {"family": "quantized", "quantized": {"base": "dpmpp_2m", "scheme": "w8a8",
                                                          "calibration": {"timesteps": "ptq4dm_normal"}}},
               "s": {"family": "quantized", "quantized": {"base": "dpmpp_2m", "scheme": "w4a8", "simulate": True,
                                                          "calibration": {"timesteps": "uniform"}}}}
    rows = []
    for method, wall, fid, mse, size in [("dpmpp_2m", 2.0, 10.0, None, None), ("u", 1.0, 10.5, 0.01, 1e6),
                                         ("p", 1.0, 11.0, 0.02, 1e6), ("s", 4.0, 14.0, 0.1, 5e5)]:
        for metric, value in [("wall_s_per_sample", wall), ("fid", fid), ("mse_fp32", mse), ("model_bytes", size)]:
            if value is not None:
                rows.append({"model": "m", "method": method, "nfe": 8, "metric": metric, "value": value, "status": "ok"})
    (finding,) = quantisation(pd.DataFrame(rows), methods)
    assert finding.verdict.startswith("uniform time-step calibration is closer")
    table = {r[0]: r for r in finding.rows}
    assert table["u"][4] == "2" and table["u"][6] == "+0.5" and table["u"][5] == "1"
    assert table["s"][4] == "— (simulated)"


@pytest.mark.slow
def test_compiled_w8a8_cell_runs_int8_kernels(tmp_path, model_spec):
    methods = load_methods(methods_file(tmp_path, {"q": {**quantized("dpmpp_2m")}}))
    methods["q"]["quantized"]["compile"] = True
    record, out = cell(tmp_path, model_spec, methods, "q", 5)
    q = record["method_record"]["quantization"]
    assert q["int8_kernels"] > 0 and q["precision"].startswith("int8")
    assert q["warm_up_s"] >= 0 and record["nfe_measured"] == 5
