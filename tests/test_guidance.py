"""Classifier-free guidance on a class-conditional UNet saved as a checkpoint is, and dynamic thresholding:
audited passes, diffusers' guided loop, diffusers' thresholding, batch independence."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel  # noqa: E402

from conftest import REPO  # noqa: E402
from harness.cells import run_cell  # noqa: E402
from harness.config import load_methods  # noqa: E402
from harness.errors import ConfigError  # noqa: E402
from harness.guidance import dynamic_threshold  # noqa: E402
from harness.labels import sample_labels  # noqa: E402
from harness.methods.solvers import dpmpp_2m  # noqa: E402
from harness.models import load_denoiser  # noqa: E402
from harness.schedules import sigma_grid  # noqa: E402
from test_solvers_vs_diffusers import (  # noqa: E402
    DIFFUSERS_BETAS, eps_network, promote_sigmas, relative_difference, run_scheduler, run_stepbench,
    use_float64_tables)

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
LINEAR = {"kind": "vp_discrete", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
          "num_train_timesteps": 1000}
METHODS = load_methods(REPO / "methods.yaml")


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """A tiny random class-conditional UNet2DModel (10 classes + a null class), saved as a bare checkpoint."""
    folder = tmp_path_factory.mktemp("cond-unet")
    torch.manual_seed(0)
    UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                norm_num_groups=4, num_class_embeds=11).save_pretrained(folder)
    DDPMScheduler(**DIFFUSERS_BETAS).save_config(folder)
    return {"adapter": "diffusers_unet", "source": str(folder), "process": LINEAR, "classes": 10, "metrics": [],
            "batch_size": 16}


def _cell(spec, tmp_path, name, method="dpmpp_2m", nfe=8, guidance=1.0, n=12, batch=None, method_spec=None):
    return run_cell("cond", spec, method, method_spec or METHODS[method], nfe, tmp_path / name, n, batch_size=batch,
                    guidance=guidance)


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_a_guided_evaluation_is_one_call_and_two_passes(conditional, tmp_path, scale):
    cell = _cell(conditional, tmp_path, "c", guidance=scale)
    assert cell["nfe_measured"] == 8
    assert cell["network_evals"] == (16 if scale != 1 else 8)
    assert cell["gflops_per_sample"] > 0 and cell["guidance"] == scale


def test_a_guidance_interval_saves_exactly_the_passes_outside_it(conditional, tmp_path):
    spec = METHODS["dpmpp_2m_guidance_interval"]
    lo, hi = spec["guidance_interval"]
    sigmas = sigma_grid(load_denoiser(conditional).process, 10, spec["schedule"])[:-1]  # the 10 evaluated levels
    inside = int(((sigmas >= lo) & (sigmas <= hi)).sum())
    assert 0 < inside < 10  # the interval cuts the trajectory: the test can tell skipped passes from none
    cell = _cell(conditional, tmp_path, "i", "dpmpp_2m_guidance_interval", nfe=10, guidance=4.0)
    assert cell["nfe_measured"] == 10 and cell["network_evals"] == 10 + inside


def test_labels_and_guided_samples_do_not_depend_on_the_batch(conditional, tmp_path):
    for b in (1, 5, 12):
        _cell(conditional, tmp_path, f"b{b}", guidance=4.0, batch=b)
    runs = [np.load(tmp_path / f"b{b}" / "samples.npz") for b in (1, 5, 12)]
    for data in runs[1:]:
        assert np.array_equal(data["samples"], runs[0]["samples"])
        assert np.array_equal(data["labels"], runs[0]["labels"])
    assert np.array_equal(runs[0]["labels"], sample_labels(0, range(12), 10))


def test_an_unconditional_model_refuses_guidance(tmp_path):
    spec = {"adapter": "gmm2d", "process": {"kind": "edm"}, "metrics": []}
    with pytest.raises(ConfigError, match="needs a class-conditional model"):
        run_cell("gmm2d", spec, "euler", METHODS["euler"], 4, tmp_path / "g", 4, guidance=2.0)


def test_guided_dpmpp_2m_equals_diffusers_guided_loop(conditional):
    """diffusers' pipelines guide the noise prediction, eps = eps_u + w (eps_c - eps_u), around one batched UNet
    call; stepbench guides the x0 prediction, which for a fixed x_t is the same linear map."""
    unet = UNet2DModel.from_pretrained(conditional["source"]).eval()
    denoiser = load_denoiser(conditional)
    from harness.guidance import guided

    scale, steps, n = 4.0, 10, 6
    labels = torch.as_tensor(sample_labels(0, range(n), 10))
    x_T = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    scheduler = DPMSolverMultistepScheduler(**DIFFUSERS_BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                            lower_order_final=True, final_sigmas_type="zero", prediction_type="epsilon")
    use_float64_tables(scheduler, denoiser.process)
    scheduler.set_timesteps(steps)
    promote_sigmas(scheduler, denoiser.process)
    null = torch.full((n,), 10)
    with torch.no_grad():
        sample = x_T
        for t in scheduler.timesteps:
            both = unet(torch.cat([sample, sample]), t, class_labels=torch.cat([labels, null])).sample
            conditioned, unconditioned = both.chunk(2)
            eps = unconditioned + scale * (conditioned - unconditioned)
            sample = scheduler.step(eps, t, sample).prev_sample
        model = guided(denoiser, scale)
        process = denoiser.process
        sigmas = [float(process.sigmas[int(t)]) for t in scheduler.timesteps] + [0.0]
        got = dpmpp_2m(lambda x, s: model(x, s, labels), x_T / float(process.alpha(sigmas[0])), sigmas)
    assert relative_difference(got, sample) <= 1e-4


def test_dynamic_thresholding_equals_diffusers():
    """DPMSolverMultistepScheduler(thresholding=True) thresholds each data prediction; so does stepbench's
    dpmpp_2m under a thresholding entry. gmm2d's data reach |x| ~ 3, so the threshold acts (its two coordinates
    as a [1, 1, 2] image: diffusers' thresholding wants image-shaped samples)."""
    gmm = load_denoiser({"adapter": "gmm2d", "process": LINEAR, "metrics": []})

    class Image:  # gmm2d on [B, 1, 1, 2]
        process = gmm.process

        def __init__(self, threshold: bool):
            self.threshold = threshold

        def __call__(self, x, sigma):
            x0 = gmm(x.reshape(len(x), 2), sigma).reshape(x.shape)
            return dynamic_threshold(x0, 0.9, 1.5) if self.threshold else x0

    x_T = torch.randn(64, 1, 1, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    scheduler = DPMSolverMultistepScheduler(**DIFFUSERS_BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                            lower_order_final=True, final_sigmas_type="zero", thresholding=True,
                                            dynamic_thresholding_ratio=0.9, sample_max_value=1.5,
                                            prediction_type="epsilon")
    use_float64_tables(scheduler, gmm.process)
    scheduler.set_timesteps(10)
    promote_sigmas(scheduler, gmm.process)
    expected = run_scheduler(scheduler, eps_network(Image(threshold=False)), x_T)
    got = run_stepbench(dpmpp_2m, Image(threshold=True), x_T, scheduler.timesteps)
    plain = run_stepbench(dpmpp_2m, Image(threshold=False), x_T, scheduler.timesteps)
    assert relative_difference(got, expected) <= 1e-5
    assert relative_difference(plain, expected) > 1e-2  # it acted: without it the result is far off
