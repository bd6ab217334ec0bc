"""The neural zoo: models trained by the workflow (deterministic, cached), loaded through the diffusers adapter
a hub checkpoint uses, class labels, T-Stitch, measured FLOPs and the digits' Gaussian.

The models here are trained for a few steps only (the zoo's are in models.yaml): what is tested is the
machinery, on real trained folders, not the models' quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DModel  # noqa: E402

from conftest import REPO  # noqa: E402
from harness.cells import run_cell  # noqa: E402
from harness.config import load_methods, load_models  # noqa: E402
from harness.errors import StepbenchError  # noqa: E402
from harness.flops import measure  # noqa: E402
from harness.labels import sample_labels  # noqa: E402
from harness.methods.solvers import dpmpp_2m, euler  # noqa: E402
from harness.models import load_denoiser  # noqa: E402
from harness.references import exact_solution  # noqa: E402
from harness.training import train_model, trained_folder  # noqa: E402
from test_solvers_vs_diffusers import promote_sigmas, relative_difference, use_float64_tables  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
TINY = {"digits-unet": {"block_out_channels": [8, 16], "attention": True},
        "digits-unet-small": {"block_out_channels": [8, 8], "attention": False}}


def tiny_models(tmp_path: Path, steps: int = 6) -> Path:
    """models.yaml with the zoo's UNets shrunk to a few steps of tiny networks (the same trainer and adapter)."""
    models = yaml.safe_load((REPO / "models.yaml").read_text())
    for model_id, network in TINY.items():
        config = models[model_id]["train"]["config"]
        config.update(steps=steps, batch_size=16, warmup_steps=2, model={**config["model"], **network,
                                                                          "norm_num_groups": 4})
        models[model_id]["num_samples"] = 20
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(models))
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    models = load_models(tiny_models(root))
    for model_id in TINY:
        train_model(model_id, models, root / "cache")
    return root, models, load_methods(REPO / "methods.yaml")


def test_training_is_deterministic_and_cached(zoo, tmp_path):
    root, models, _ = zoo
    folder = trained_folder(root / "cache", models["digits-unet"])
    again = load_models(tiny_models(tmp_path))
    assert trained_folder(tmp_path / "cache", again["digits-unet"]).name == folder.name  # the same key
    retrained = train_model("digits-unet", again, tmp_path / "cache")
    weights = "diffusion_pytorch_model.safetensors"
    assert (retrained / weights).read_bytes() == (folder / weights).read_bytes()  # bit-identical weights
    stamp = (folder / "trained.json").stat().st_mtime_ns
    assert train_model("digits-unet", models, root / "cache") == folder  # cached: not trained again
    assert (folder / "trained.json").stat().st_mtime_ns == stamp
    edited = yaml.safe_load(tiny_models(tmp_path).read_text())
    edited["digits-unet"]["train"]["config"]["lr"] = 1e-3
    (tmp_path / "edited.yaml").write_text(yaml.safe_dump(edited))
    assert trained_folder(tmp_path, load_models(tmp_path / "edited.yaml")["digits-unet"]).name != folder.name


def test_an_untrained_model_is_one_line(tmp_path):
    models = load_models(tiny_models(tmp_path))
    with pytest.raises(StepbenchError, match="digits-unet is not trained yet; run `stepbench train digits-unet"):
        load_denoiser(models["digits-unet"], "cpu", tmp_path / "empty-cache", "digits-unet")


def test_labels_are_paired_balanced_and_batch_independent():
    whole = sample_labels(3, range(100), 10)
    assert np.array_equal(np.bincount(whole, minlength=10), np.full(10, 10))
    parts = np.concatenate([sample_labels(3, range(a, b), 10) for a, b in ((0, 7), (7, 64), (64, 100))])
    assert np.array_equal(parts, whole)
    assert not np.array_equal(whole, sample_labels(4, range(100), 10))  # another seed, another order


def _diffusers_loop(unet, scheduler, x_T, labels):
    sample = x_T
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(sample, t), t, class_labels=labels).sample
        sample = scheduler.step(eps, t, sample).prev_sample
    return sample


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m"])
def test_the_trained_unet_samples_as_in_diffusers(zoo, solver):
    """From the kept noise and labels of a cell, stepbench's euler / dpmpp_2m on the trained folder loaded by the
    adapter equal diffusers' DDIMScheduler / DPMSolverMultistepScheduler loops on the same checkpoint, labels
    and time steps, in float32."""
    root, models, methods = zoo
    spec = models["digits-unet"]
    folder = trained_folder(root / "cache", spec)
    unet = UNet2DModel.from_pretrained(folder).eval()
    denoiser = load_denoiser(spec, "cpu", root / "cache", "digits-unet")
    process = denoiser.process
    steps, seed = 10, 0
    labels = torch.as_tensor(sample_labels(seed, range(20), 10))
    noise = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    if solver == "euler":
        scheduler = DDIMScheduler.from_pretrained(folder, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                                  timestep_spacing="trailing")
        use_float64_tables(scheduler, process)
        scheduler.set_timesteps(steps)
    else:
        scheduler = DPMSolverMultistepScheduler.from_pretrained(
            folder, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, final_sigmas_type="zero")
        use_float64_tables(scheduler, process)
        scheduler.set_timesteps(steps)
        promote_sigmas(scheduler, process)
    with torch.no_grad():
        expected = _diffusers_loop(unet, scheduler, noise, labels)
        sigmas = [float(process.sigmas[int(t)]) for t in scheduler.timesteps] + [0.0]
        fn = euler if solver == "euler" else dpmpp_2m
        got = fn(lambda x, s: denoiser(x, s, labels), noise / float(process.alpha(sigmas[0])), sigmas)
    assert relative_difference(got, expected) <= 1e-4


def test_a_cell_of_a_trained_model_records_labels_and_flops(zoo, tmp_path):
    root, models, methods = zoo
    cell = run_cell("digits-unet", models["digits-unet"], "dpmpp_2m", methods["dpmpp_2m"], 6, tmp_path / "c", 20,
                    batch_size=7, cache_dir=root / "cache", models=models)
    with np.load(tmp_path / "c" / "samples.npz") as data:
        assert np.array_equal(data["labels"], sample_labels(0, range(20), 10))
    denoiser = load_denoiser(models["digits-unet"], "cpu", root / "cache", "digits-unet")
    per_row = measure(denoiser, 7)["flops_per_row"]
    assert per_row > 0 and cell["gflops_per_sample"] == pytest.approx(6 * per_row / 1e9)
    assert cell["evals_by_model"] == {"digits-unet": 6}


@pytest.mark.parametrize("fraction, alone", [(0.0, "digits-unet"), (1.0, "digits-unet-small")])
def test_stitching_at_the_ends_is_one_model_alone(zoo, tmp_path, fraction, alone):
    root, models, methods = zoo
    stitched = {**methods["tstitch_40_dpmpp_2m"], "stitch": {**methods["tstitch_40_dpmpp_2m"]["stitch"],
                                                               "fraction": fraction}}
    run = dict(batch_size=10, cache_dir=root / "cache", models=models)
    cell = run_cell("digits-unet", models["digits-unet"], "stitch", stitched, 8, tmp_path / "s", 20, **run)
    # the model alone, on the same noise and labels: the small one run as a cell of its own
    single = run_cell(alone, models[alone], "dpmpp_2m", methods["dpmpp_2m"], 8, tmp_path / "a", 20, **run)
    a, b = (np.load(tmp_path / d / "samples.npz")["samples"] for d in ("s", "a"))
    assert np.array_equal(a, b)
    assert cell["evals_by_model"][alone] == 8 and cell["nfe_measured"] == 8
    assert cell["gflops_per_sample"] == pytest.approx(single["gflops_per_sample"])


def test_stitching_splits_the_evaluations_on_the_noise_level(zoo, tmp_path):
    root, models, methods = zoo
    cell = run_cell("digits-unet", models["digits-unet"], "tstitch_40_dpmpp_2m", methods["tstitch_40_dpmpp_2m"], 10,
                    tmp_path / "s", 20, batch_size=20, cache_dir=root / "cache", models=models)
    evals = cell["evals_by_model"]
    assert evals["digits-unet"] + evals["digits-unet-small"] == 10 == cell["nfe_measured"]
    assert 0 < evals["digits-unet-small"] < 10
    large = measure(load_denoiser(models["digits-unet"], "cpu", root / "cache", "u"), 20)["flops_per_row"]
    small = measure(load_denoiser(models["digits-unet-small"], "cpu", root / "cache", "s"), 20)["flops_per_row"]
    assert cell["gflops_per_sample"] == pytest.approx((evals["digits-unet"] * large + evals["digits-unet-small"] * small) / 1e9)


def test_flops_of_a_known_network_equal_a_hand_count():
    """digits-ideal's denoiser is two matmuls per call, [B', 64] x [64, N] and [B', N] x [N, 64] with the batch
    padded to B' = 256 rows (batch-independent kernels): 2 x 2 B' 64 N FLOPs, N the 1797 digits. gmm2d is
    elementwise only: 0."""
    models = load_models(REPO / "models.yaml")
    assert measure(load_denoiser(models["digits-ideal"]), 250)["flops_per_call"] == 2 * 2 * 256 * 64 * 1797
    assert measure(load_denoiser(models["gmm2d"]), 250)["flops_per_call"] == 0


def test_the_digits_gaussian_flows_in_closed_form_as_dop853_integrates():
    denoiser = load_denoiser(load_models(REPO / "models.yaml")["digits-gaussian"])
    closed = exact_solution(denoiser, 0, 12)
    integrated = exact_solution(denoiser, 0, 12, closed_form=False)
    assert np.abs(closed - integrated).max() <= 1e-8 * np.abs(closed).max()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(denoiser.exact_flow(x, 3.0, 3.0), x)  # from a noise level to itself: the identity


def test_a_grid_with_trained_models_trains_once(tmp_path):
    from test_workflow import _grid, _run

    models = tiny_models(tmp_path, steps=4)
    grid = _grid(tmp_path, models=["digits-unet"], methods=["euler", "tstitch_40_dpmpp_2m"], nfe=[4], seeds=[0],
                 num_samples=20, models_file=str(models))
    run = _run(tmp_path, "--configfile", str(grid))
    assert run.returncode == 0, run.stderr[-3000:]
    trained = sorted((tmp_path / "results" / "cache" / "models").glob("*/trained.json"))
    assert len(trained) == 2 and {json.loads(p.read_text())["model"] for p in trained} == set(TINY)
    again = _run(tmp_path, "--configfile", str(grid), "--dry-run")
    assert "Nothing to be done" in again.stdout, again.stdout[-2000:]
