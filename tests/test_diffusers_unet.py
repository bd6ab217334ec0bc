"""The diffusers_unet adapter on tiny random UNets saved locally as real checkpoints are.

Nothing is downloaded: a seeded UNet2DModel and its DDPMScheduler go through save_pretrained into a
temp folder (pipeline layout and bare-model layout), and the adapter loads them as it would a hub
checkpoint. stepbench's DDIM on the loaded model is cross-checked against diffusers' own DDIM loop on
the same UNet.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from harness.errors import ConfigError, StepbenchError  # noqa: E402
from harness.methods.solvers import euler  # noqa: E402
from harness.models import check_model, load_denoiser  # noqa: E402
from test_solvers_vs_diffusers import (  # noqa: E402
    ddim_scheduler,
    relative_difference,
    run_scheduler,
    run_stepbench,
    use_float64_tables,
)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

LINEAR = {"kind": "vp_discrete", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
          "num_train_timesteps": 1000}


def tiny_unet(out_channels=3):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)


def linear_scheduler(**overrides):
    return DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000,
                         **overrides)


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm-pipeline")
    DDPMPipeline(unet=tiny_unet(), scheduler=linear_scheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bare_folder(tmp_path_factory):
    """A bare model folder, as e.g. google/ddpm-cifar10-32 on the hub: config, weights, scheduler config."""
    folder = tmp_path_factory.mktemp("ddpm-bare")
    tiny_unet(out_channels=6).save_pretrained(folder)  # learned variance, as iDDPM checkpoints
    linear_scheduler(prediction_type="v_prediction").save_pretrained(folder)
    return folder


def spec(source, **extra):
    return {"adapter": "diffusers_unet", "source": str(source), "process": LINEAR, "metrics": [], **extra}


def test_pipeline_folder_loads_with_its_shape_prediction_and_process(pipeline_folder):
    denoiser = load_denoiser(spec(pipeline_folder))
    assert denoiser.info.data_shape == (3, 8, 8)
    assert denoiser.info.prediction == "eps"
    np.testing.assert_allclose(denoiser.process.betas, linear_scheduler().betas.double().numpy(), rtol=1e-6)
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert denoiser(x, 2.0).shape == x.shape


def test_bare_folder_with_learned_variance_and_v_prediction(bare_folder):
    denoiser = load_denoiser(spec(bare_folder))
    assert denoiser.info.prediction == "v"
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert denoiser(x, 2.0).shape == x.shape  # the variance channels are dropped


def test_ddim_on_the_loaded_unet_matches_diffusers_ddim(pipeline_folder):
    """Float64 on both sides; diffusers gets stepbench's float64 alpha_bar table (see
    test_solvers_vs_diffusers), so what is compared is the adapter's variable and time conversions."""
    denoiser = load_denoiser(spec(pipeline_folder, params={"dtype": "float64"}))
    unet = UNet2DModel.from_pretrained(pipeline_folder, subfolder="unet").double().eval()
    x_T = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scheduler = ddim_scheduler(10, "leading")
    use_float64_tables(scheduler, denoiser.process)
    with torch.inference_mode():
        expected = run_scheduler(scheduler, lambda x_t, t: unet(x_t, t).sample, x_T)
        got = run_stepbench(euler, denoiser, x_T, scheduler.timesteps)
    assert relative_difference(got, expected) <= 1e-10


def test_process_that_disagrees_with_the_checkpoint_is_one_line(pipeline_folder):
    with pytest.raises(ConfigError, match=r"disagrees with the checkpoint's scheduler config \(linear, 1000 betas"):
        load_denoiser(spec(pipeline_folder, process={**LINEAR, "beta_end": 0.012}))
    with pytest.raises(ConfigError, match="disagrees with the checkpoint's scheduler config"):
        check_model(spec(pipeline_folder, process={**LINEAR, "beta_end": 0.012}))  # at planning, no weights read
    check_model(spec(pipeline_folder))
    with pytest.raises(ConfigError, match="params.prediction is 'v' but the checkpoint predicts 'epsilon'"):
        load_denoiser(spec(pipeline_folder, params={"prediction": "v"}))


def test_hub_id_loads_from_the_hugging_face_cache(bare_folder, tmp_path):
    """A hub id resolves through the cache's layout (models--owner--name/refs/main -> snapshots/<rev>)."""
    snapshot = tmp_path / "models--someone--tiny-ddpm" / "snapshots" / ("0" * 40)
    shutil.copytree(bare_folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    denoiser = load_denoiser(spec("someone/tiny-ddpm", params={"cache_dir": str(tmp_path)}))
    assert denoiser.info.prediction == "v"


def test_uncached_hub_id_is_one_line_and_nothing_is_downloaded(tmp_path):
    expected = r"google/ddpm-cifar10-32 is not in the Hugging Face cache.*hf download google/ddpm-cifar10-32"
    with pytest.raises(StepbenchError, match=expected) as err:
        load_denoiser(spec("google/ddpm-cifar10-32", params={"cache_dir": str(tmp_path)}))  # an empty cache
    assert "\n" not in str(err.value)
    with pytest.raises(StepbenchError, match=expected):  # what a grid's planning checks, before any job
        check_model(spec("google/ddpm-cifar10-32", params={"cache_dir": str(tmp_path)}))


def test_missing_local_folder_is_one_line_without_the_hub_hint(tmp_path, monkeypatch):
    with pytest.raises(ConfigError) as err:
        load_denoiser(spec(str(tmp_path / "not-there")))
    assert str(err.value) == f"diffusers_unet: source {tmp_path / 'not-there'}: no such folder"
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)  # a relative path into a folder that exists here
    with pytest.raises(ConfigError, match="^diffusers_unet: source checkpoints/my-ddpm: no such folder$"):
        load_denoiser(spec("checkpoints/my-ddpm"))


def test_cli_cell_on_a_local_checkpoint(pipeline_folder, repo_files):
    models = {"tiny-ddpm": {**spec(pipeline_folder), "num_samples": 6, "batch_size": 4}}
    (repo_files / "models.yaml").write_text(yaml.safe_dump(models))
    out = repo_files / "cell"
    run = subprocess.run([sys.executable, "-m", "harness.cli", "sample", "--model", "tiny-ddpm", "--method",
                          "dpmpp_2m", "--nfe", "5", "--out", str(out)], cwd=repo_files, capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert np.load(out / "samples.npz")["samples"].shape == (6, 3, 8, 8)
    cell = json.loads((out / "cell.json").read_text())
    assert cell["nfe_measured"] == cell["nfe"] == 5
