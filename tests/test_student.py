"""The student family and the consistency parametrisation, cross-checked against diffusers on the same input.

Tiny random UNet2DModels are saved with save_pretrained as hub checkpoints are (a ConsistencyModelPipeline
folder with a CMStochasticIterativeScheduler, as openai/diffusers-cd_imagenet64_l2) and loaded through the
diffusers_unet adapter. From the same noise and labels, stepbench's procedures are compared with diffusers'
own loops; where diffusers draws intermediate noise (randn_tensor), the test hands it the draws stepbench's
per-sample generator makes, so what is compared is the procedure, not the random numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
import diffusers.schedulers.scheduling_consistency_models as cm_scheduling  # noqa: E402
import diffusers.schedulers.scheduling_lcm as lcm_scheduling  # noqa: E402
from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, LCMScheduler, UNet2DModel  # noqa: E402

from harness.errors import ConfigError, StepbenchError, UnsupportedNFE  # noqa: E402
from harness.methods import make_sampler  # noqa: E402
from harness.models import check_model, load_denoiser  # noqa: E402
from harness.nfe import CountingDenoiser  # noqa: E402
from harness.noise import SampleNoise  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

CLASSES = 4
RTOL = 1e-4  # float32 on both sides
EDM = {"kind": "edm", "sigma_min": 0.002, "sigma_max": 80.0}
LINEAR = {"kind": "vp_discrete", "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
          "num_train_timesteps": 1000}
CONSISTENCY = {"family": "student", "procedure": "consistency"}


def tiny_unet(num_class_embeds=CLASSES, gain=10.0):
    """3 channels: ConsistencyModelPipeline accepts given latents of 3 channels only. The output layer is scaled
    up so that the outputs are of order 1 and clip_denoised clamps some of them."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, num_class_embeds=num_class_embeds)
    with torch.no_grad():
        unet.conv_out.weight.mul_(gain)
        unet.conv_out.bias.mul_(gain)
    return unet


def relative_difference(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=[True, False], ids=["clip", "no-clip"])
def cm_folder(request, tmp_path_factory):
    """A consistency checkpoint as the hub stores one: model_index.json, unet/, scheduler/."""
    folder = tmp_path_factory.mktemp("cm-pipeline")
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0,
                                               sigma_data=0.5, clip_denoised=request.param)
    ConsistencyModelPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(folder)
    return folder


def cm_spec(folder, **extra):
    return {"adapter": "diffusers_unet", "source": str(folder), "process": EDM, "metrics": [], "classes": CLASSES - 1,
            **extra}


def stepbench_run(denoiser, method, nfe, seed=3, rows=range(5)):
    """(samples, initial noise, labels, measured NFE) of a stepbench run, as harness.cells.generate makes it."""
    generator = SampleNoise(seed, rows)
    noise = generator.randn(denoiser.info.data_shape, dtype=torch.float32)
    labels = torch.arange(len(rows)) % CLASSES if denoiser.info.num_classes else None
    counted = CountingDenoiser(denoiser)
    out = make_sampler(method).sample(counted, noise, nfe, labels, generator)
    return out, noise, labels, counted.nfe_per_sample(len(rows))


def later_draws(seed, rows):
    """randn_tensor's stand-in: the draws 1, 2, ... of the samples' own streams (draw 0 is the initial noise)."""
    generator = SampleNoise(seed, rows)
    generator.randn((1,))  # skip draw 0

    def randn_tensor(shape, generator=None, device=None, dtype=None, **_):
        return _draw.randn(tuple(shape[1:]), dtype=dtype)

    _draw = generator
    return randn_tensor


@pytest.mark.parametrize("steps", [1, 2])
def test_consistency_student_equals_diffusers_pipeline(cm_folder, steps, monkeypatch):
    denoiser = load_denoiser(cm_spec(cm_folder))
    assert denoiser.info.prediction == "x0" and denoiser.info.num_classes == CLASSES - 1
    ours, noise, labels, nfe = stepbench_run(denoiser, CONSISTENCY, steps)
    assert nfe == steps

    monkeypatch.setattr(cm_scheduling, "randn_tensor", later_draws(3, range(5)))
    pipe = ConsistencyModelPipeline.from_pretrained(cm_folder)
    pipe.set_progress_bar_config(disable=True)
    final = {}
    pipe(batch_size=5, class_labels=labels, num_inference_steps=steps, latents=noise.clone(), output_type="pt",
         callback=lambda i, t, sample: final.update(sample=sample), callback_steps=1)
    theirs = final["sample"]  # before the pipeline's [0, 1] post-processing
    assert relative_difference(ours, theirs) <= RTOL
    inside = (ours.abs() < 1).float().mean()
    assert inside > 0.2  # not all clamped: the comparison sees the network
    if denoiser.info.extra["consistency"].clip_denoised:
        assert inside < 0.95  # and the clamp is seen too
    else:
        assert ours.abs().max() > 1.5


# ---- fixed_timesteps against diffusers' LCMScheduler loop (how DMD2 is sampled) ----

DMD2 = {"family": "student", "procedure": "fixed_timesteps",
        "params": {"timesteps": {1: [399], 2: [999, 499], 4: [999, 749, 499, 249]}}}
TRAILING = {"family": "student", "procedure": "fixed_timesteps", "params": {"spacing": "trailing"}}


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    """A class-conditional eps-prediction UNet with its DDPMScheduler config (a bare model folder)."""
    from diffusers import DDPMScheduler

    folder = tmp_path_factory.mktemp("ddpm-bare")
    tiny_unet(gain=1.0).save_pretrained(folder)
    DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000).save_pretrained(folder)
    return folder


def lcm_loop(folder, timesteps, noise, labels, monkeypatch):
    """diffusers' LCM sampling loop (LatentConsistencyModelPipeline's, without the text encoder) on the UNet."""
    monkeypatch.setattr(lcm_scheduling, "randn_tensor", later_draws(3, range(len(noise))))
    unet = UNet2DModel.from_pretrained(folder).eval()
    scheduler = LCMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000)
    scheduler.set_timesteps(timesteps=timesteps)
    sample = noise.clone() * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(scheduler.scale_model_input(sample, t), t, class_labels=labels).sample
            sample, denoised = scheduler.step(eps, t, sample, return_dict=False)
    return denoised


@pytest.mark.parametrize("timesteps", [[399], [999, 499], [999, 749, 499, 249]], ids=["1", "2", "4"])
def test_fixed_timesteps_equals_diffusers_lcm_loop(ddpm_folder, timesteps, monkeypatch):
    denoiser = load_denoiser({"adapter": "diffusers_unet", "source": str(ddpm_folder), "process": LINEAR,
                              "metrics": [], "classes": CLASSES - 1})
    ours, noise, labels, nfe = stepbench_run(denoiser, DMD2, len(timesteps))
    assert nfe == len(timesteps)
    theirs = lcm_loop(ddpm_folder, timesteps, noise, labels, monkeypatch)
    assert relative_difference(ours, theirs) <= RTOL
    if len(timesteps) == 4:  # trailing spacing at NFE 4 is DMD2's list
        trailing, *_ = stepbench_run(denoiser, TRAILING, 4)
        assert torch.equal(trailing, ours)


def test_karras_indices_equal_the_pipeline_with_custom_timesteps(cm_folder, monkeypatch):
    """openai's 2-step recipe for the ImageNet-64 students: timesteps [22, 0] of the 40-level discretisation."""
    denoiser = load_denoiser(cm_spec(cm_folder))
    method = {**CONSISTENCY, "params": {"karras_indices": {2: [22, 0]}}}
    ours, noise, labels, nfe = stepbench_run(denoiser, method, 2)
    assert nfe == 2
    monkeypatch.setattr(cm_scheduling, "randn_tensor", later_draws(3, range(5)))
    pipe = ConsistencyModelPipeline.from_pretrained(cm_folder)
    pipe.set_progress_bar_config(disable=True)
    final = {}
    pipe(batch_size=5, class_labels=labels, timesteps=[22, 0], latents=noise.clone(), output_type="pt",
         callback=lambda i, t, sample: final.update(sample=sample))
    assert relative_difference(ours, final["sample"]) <= RTOL
    default, *_ = stepbench_run(denoiser, CONSISTENCY, 2)  # [20, 0]: another level, another sample
    assert relative_difference(default, ours) > 1e-3


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 40])
def test_default_spacing_is_the_schedulers(steps):
    from harness.models.consistency import ConsistencyParametrisation

    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0)
    scheduler.set_timesteps(num_inference_steps=steps)
    ours = ConsistencyParametrisation.from_scheduler_config(dict(scheduler.config)).inference_sigmas(steps)
    np.testing.assert_allclose(ours, scheduler.sigmas[:-1].double().numpy(), rtol=1e-6)  # theirs: float32


# ---- the NFE audit and one-line refusals ----

def test_nfe_measured_is_the_number_of_steps(cm_folder, ddpm_folder):
    student = load_denoiser(cm_spec(cm_folder))
    teacher = load_denoiser({"adapter": "diffusers_unet", "source": str(ddpm_folder), "process": LINEAR, "metrics": [],
                             "classes": CLASSES - 1})
    for steps in (1, 2, 3, 5):
        assert stepbench_run(student, CONSISTENCY, steps)[3] == steps
        assert stepbench_run(teacher, TRAILING, steps)[3] == steps
        sigmas = {steps: list(np.geomspace(40.0, 0.5, steps))}
        assert stepbench_run(student, {**DMD2, "params": {"sigmas": sigmas}}, steps)[3] == steps
        assert stepbench_run(teacher, {**CONSISTENCY, "params": {"sigmas": sigmas}}, steps)[3] == steps


def test_check_nfe_refuses_budgets_it_cannot_meet():
    sampler = make_sampler(DMD2)
    for nfe in (1, 2, 4):
        sampler.check_nfe(nfe)
    with pytest.raises(UnsupportedNFE) as err:
        sampler.check_nfe(3)
    assert str(err.value) == "fixed_timesteps: params.timesteps lists levels for NFE 1, 2, 4 only, not 3"
    assert err.value.reason == "timesteps for NFE 1, 2, 4 only"
    with pytest.raises(UnsupportedNFE, match="NFE is the number of steps, >= 1; not 0"):
        make_sampler(CONSISTENCY).check_nfe(0)
    make_sampler(CONSISTENCY).check_nfe(4)


def test_consistency_needs_levels_the_model_can_give(cm_folder, ddpm_folder):
    teacher = load_denoiser({"adapter": "diffusers_unet", "source": str(ddpm_folder), "process": LINEAR, "metrics": [],
                             "classes": CLASSES - 1})
    with pytest.raises(StepbenchError, match="not a consistency model .* params.sigmas per NFE$"):
        stepbench_run(teacher, CONSISTENCY, 2)
    student = load_denoiser(cm_spec(cm_folder))
    with pytest.raises(UnsupportedNFE, match="training discretisation has 40 levels, so 1 <= NFE <= 40, not 41"):
        stepbench_run(student, CONSISTENCY, 41)
    with pytest.raises(StepbenchError, match=r"spacing trailing needs a discrete-time model \(process vp_discrete\)"):
        stepbench_run(student, TRAILING, 2)
    with pytest.raises(StepbenchError, match=r"levels \[999, 499\] leave the model's noise range \[0.002, 80\]"):
        stepbench_run(student, {**DMD2, "params": {"timesteps": {2: [999, 499]}}}, 2)


@pytest.mark.parametrize("method, message", [
    ({"procedure": "progressive"}, "key 'procedure': 'progressive' unknown; valid: consistency, fixed_timesteps"),
    ({"procedure": "consistency", "params": {"timesteps": {1: [10]}}},
     "key 'params.timesteps': unknown for procedure 'consistency'; valid: sigmas, karras_indices"),
    ({"procedure": "fixed_timesteps", "params": {"timesteps": {2: [999]}}},
     "key 'params.timesteps.2': a list of 2 integers (one per network evaluation); got [999]"),
    ({"procedure": "fixed_timesteps", "params": {"timesteps": {2: [499, 999]}}},
     "key 'params.timesteps.2': levels must strictly decrease; got [499, 999]"),
    ({"procedure": "fixed_timesteps", "params": {"spacing": "leading"}},
     "key 'params.spacing': 'leading' unknown; valid: trailing"),
    ({"procedure": "fixed_timesteps", "params": {"spacing": "trailing", "timesteps": {1: [999]}}},
     "key 'params': give one of timesteps, sigmas, spacing, not spacing, timesteps"),
])
def test_bad_method_entries_are_one_line(method, message, tmp_path):
    import yaml

    from harness.config import load_methods

    path = tmp_path / "methods.yaml"
    path.write_text(yaml.safe_dump({"my-student": {"family": "student", **method}}))
    with pytest.raises(ConfigError) as err:
        load_methods(path)
    assert str(err.value) == f"{path}: method 'my-student': {message}"


def test_process_that_disagrees_with_the_consistency_scheduler_is_one_line(cm_folder):
    wrong = cm_spec(cm_folder, process={**EDM, "sigma_max": 40.0})
    expected = (f"{cm_folder}: models.yaml's process (edm, sigma 0.002 to 40) disagrees with the checkpoint's "
                f"scheduler config (CMStochasticIterativeScheduler, sigma 0.002 to 80)")
    for check in (check_model, load_denoiser):  # at planning (no weights read) and at loading
        with pytest.raises(ConfigError) as err:
            check(wrong)
        assert str(err.value) == expected
    with pytest.raises(ConfigError, match="^.*: a consistency model .CMStochasticIterativeScheduler. needs process kind "
                                          "edm, not vp_discrete$"):
        check_model(cm_spec(cm_folder, process=LINEAR))
    check_model(cm_spec(cm_folder))

